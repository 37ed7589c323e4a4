r"""Hessian products on blocks of probes, and a product that needs no double backward.

:class:`~curvlightning.core.operators.HessianOperator` multiplies one vector at a
time. The operators here serve the same estimators but also take a block of probes
``V`` of shape ``(n, p)`` (one probe per row) and return ``V H`` (``H`` is
symmetric, so row ``i`` is ``H v_i``):

- :class:`BatchedHessianOperator` reuses one ``create_graph=True`` gradient for all
  probes and runs the second backward pass vmapped over the probes
  (``torch.autograd.grad(..., is_grads_batched=True)``), or vmaps
  forward-over-reverse products (``torch.func.vmap`` of ``jvp(grad(L))``), which
  share the primal forward and backward pass between probes;
- :class:`FiniteDifferenceHessianOperator` takes central differences of two ordinary
  gradients, for models whose ops (or whose parameter sharding) admit no second
  derivative.

Second-order automatic differentiation through ``F.scaled_dot_product_attention``
needs its math kernel on CPU (the fused kernel has neither a double-backward nor a
forward-mode derivative): the operators here select it themselves, and
:func:`curvature_sdpa` lets any other caller of a
:class:`~curvlightning.core.functional.FunctionalModel` do the same.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from curvlightning.core.functional import FunctionalModel, flatten, unflatten
from curvlightning.core.operators import HVP_BACKENDS, BatchOperator, HessianOperator

__all__ = [
    "BATCHED_HVP_BACKENDS",
    "BatchedHessianOperator",
    "FiniteDifferenceHessianOperator",
    "check_chunk_size",
    "check_probe_block",
    "curvature_sdpa",
    "finite_difference_hvp",
    "finite_difference_step",
    "flat_gradient",
    "lacks_derivative",
    "run_blocks",
    "unsupported_op",
]

BATCHED_HVP_BACKENDS = (
    "auto",
    "double_backward",
    "forward_over_reverse",
    "finite_difference",
)

_AUTOMATIC_BACKENDS = ("double_backward", "forward_over_reverse")

# Messages torch raises when an op lacks a derivative of the order asked for, and
# when a transform (vmap) cannot handle an op.
_DERIVATIVE_PATTERNS = (
    re.compile(r"derivative for (?:aten::)?'?([\w.]+?)'? is not implemented"),
    re.compile(r"forward AD with ([\w.]+) that does not support it"),
)
_UNSUPPORTED_PATTERNS = (
    *_DERIVATIVE_PATTERNS,
    re.compile(r"Batching rule not implemented for (?:aten::)?([\w.]+)"),
)


@contextlib.contextmanager
def curvature_sdpa() -> Iterator[None]:
    """Run ``F.scaled_dot_product_attention`` on its twice-differentiable kernel.

    On CPU, ``F.scaled_dot_product_attention`` dispatches to the fused kernel
    ``_scaled_dot_product_flash_attention_for_cpu``, which has neither a
    double-backward nor a forward-mode derivative: a Hessian-vector product through
    it fails. Inside this context it uses the math kernel (a composition of matmul,
    softmax and dropout), which has both. Wrap the forward of any second-order pass
    (the ``create_graph=True`` gradient, or a whole ``torch.func`` transform) in it;
    models without attention are unaffected.

    Example:
        >>> with curvature_sdpa():
        ...     operator = HessianOperator(model, inputs, targets)  # doctest: +SKIP
        ...     product = operator(vector)  # doctest: +SKIP

    Warning:
        A model that selects a fused kernel inside its own forward (its own
        ``sdpa_kernel`` context) overrides this one; its products then fail with
        an error that names the kernel.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def unsupported_op(error: BaseException) -> str | None:
    """The op an autograd error says lacks a derivative, or ``None``.

    Recognises torch's messages for a missing double-backward formula
    (``derivative for aten::<op>_backward is not implemented``), a missing
    forward-mode formula (``forward AD with <op>``), a custom
    ``autograd.Function`` marked ``@once_differentiable`` or lacking the
    ``setup_context`` that ``torch.func`` transforms need (module hooks such as
    BackPACK's install such Functions), and a missing vmap batching rule. The
    suffixes ``_backward`` and ``_forward`` are dropped, so the name is that of
    the op the model calls (``_cdist_backward`` and ``_cdist_forward`` both name
    ``aten::_cdist``, which ``torch.cdist`` calls).

    Args:
        error: The exception raised inside a product.

    Returns:
        The op's name (``"aten::cdist"``), or ``None`` if the message names none.
    """
    message = str(error)
    if "once_differentiable" in message:
        return "a custom autograd.Function marked @once_differentiable"
    if "must override the setup_context" in message:
        return "a custom autograd.Function without setup_context (torch.func)"
    for pattern in _UNSUPPORTED_PATTERNS:
        match = pattern.search(message)
        if match:
            name = match.group(1).removeprefix("aten::").removesuffix(".default")
            return "aten::" + re.sub(r"_(backward|forward)(_data|_input)?$", "", name)
    return None


def second_order_error(errors: dict[str, RuntimeError]) -> RuntimeError:
    """The error to raise when no automatic-differentiation backend works.

    Args:
        errors: The error each backend raised, keyed by the backend's name.

    Returns:
        A ``RuntimeError`` that names the op (when torch's message names one) and
        suggests ``backend="finite_difference"``.
    """
    ops = {op for op in map(unsupported_op, errors.values()) if op}
    tried = ", ".join(errors)
    remedy = (
        'use backend="finite_difference" (central differences of two ordinary '
        "gradients per product), or replace the op with a twice-differentiable one"
    )
    if ops:
        named = " and ".join(sorted(ops))
        hint = ""
        if any("scaled_dot_product" in op for op in ops):
            hint = (
                "; the model selects a fused attention kernel itself: let "
                "curvature_sdpa() choose the math kernel instead"
            )
        if any("setup_context" in op for op in ops):
            hint = (
                "; torch.func cannot transform it (module hooks such as BackPACK's "
                'install one): backend="double_backward" uses plain autograd'
            )
        return RuntimeError(
            f"{named} cannot be differentiated twice (tried {tried}): {remedy}{hint}"
        )
    details = "; ".join(f"{b}: {_first_line(e)}" for b, e in errors.items())
    return RuntimeError(f"second-order products failed ({details}): {remedy}")


def lacks_derivative(error: BaseException) -> bool:
    """Whether an autograd error says an op has no derivative of the order asked.

    Unlike a failing vmap batching rule (or a custom ``autograd.Function`` that
    ``torch.func`` cannot transform), such an error recurs when the products are
    computed one probe at a time.
    """
    message = str(error)
    return "once_differentiable" in message or any(
        p.search(message) for p in _DERIVATIVE_PATTERNS
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def run_blocks(
    block: Tensor,
    batched: Callable[[Tensor], Tensor],
    single: Callable[[Tensor], Tensor],
    state: dict[str, bool],
    name: str,
) -> Tensor:
    """Apply a vmapped function to a block of probes, or loop when it cannot batch.

    The batched function is tried once; if it fails for a reason other than a
    missing derivative (a vmap batching rule that is missing or wrong for some
    op) and the first probe alone succeeds, the failure is remembered in
    ``state[name]``, a warning says so, and this and every later block are
    computed one probe at a time.

    Args:
        block: Probes of shape ``(n, ...)``.
        batched: Maps the block to the stacked results.
        single: Maps one probe (``block[i]``) to its result.
        state: Remembers, per name, whether batching works.
        name: The key of this computation in ``state``.

    Returns:
        The results stacked along the first dimension.

    Raises:
        RuntimeError: If the batched function fails because an op lacks a
            derivative (the loop would fail the same way), or if one probe alone
            fails too.
    """
    if block.shape[0] < 2 or not state.get(name, True):
        return torch.stack([single(v) for v in block])
    try:
        return batched(block)
    except RuntimeError as error:
        if lacks_derivative(error):
            raise
        reason = _first_line(error)
    first = single(block[0])  # if the loop fails too, its error propagates
    state[name] = False
    warnings.warn(
        f"{name}: the vmapped products failed ({reason}); computing them one "
        "probe at a time instead",
        RuntimeWarning,
        stacklevel=3,
    )
    return torch.stack([first] + [single(v) for v in block[1:]])


def check_probe_block(block: Tensor, dim: int) -> None:
    """Raise a ``ValueError`` unless ``block`` has shape ``(n, dim)``."""
    if block.dim() != 2 or block.shape[1] != dim:
        raise ValueError(
            f"probes must have shape (num_probes, {dim}), one probe per row; got "
            f"{tuple(block.shape)}. Pass a single vector through __call__"
        )


def check_chunk_size(chunk_size: int | None) -> None:
    """Raise unless ``chunk_size`` is ``None`` or a positive int."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {chunk_size!r}")
    if chunk_size <= 0:
        raise ValueError(
            f"chunk_size must be a positive number of probes per pass, got "
            f"{chunk_size}; use None for all probes in one pass"
        )


def flat_gradient(
    model: FunctionalModel, params: tuple[Tensor, ...], inputs: Any, targets: Any
) -> Tensor:
    """The flat gradient ``dL/dtheta`` at ``params``, shape ``(p,)``, no graph kept.

    An ordinary backward pass: no ``create_graph``. A parameter the loss does not
    depend on gets a zero gradient.
    """
    leaves = tuple(p.detach().requires_grad_(True) for p in params)
    with torch.enable_grad():
        loss = model.loss_at(leaves, inputs, targets)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    pairs = zip(grads, params, strict=True)
    return flatten([torch.zeros_like(p) if g is None else g for g, p in pairs])


class BatchedHessianOperator(BatchOperator):
    r"""Products of the loss Hessian with blocks of probes.

    ``H = d^2 L / d theta^2`` (p x p) is never formed. :meth:`matmat` takes probes
    ``V`` of shape ``(n, p)`` and returns the ``(n, p)`` block whose row ``i`` is
    ``H v_i``, in as few passes as the backend allows; :meth:`__call__` takes one
    vector, so the operator is a drop-in matvec for the estimators. Backends:

    - ``"double_backward"``: one gradient ``g`` with ``create_graph=True`` is kept
      and ``H v = d (g^T v) / d theta`` is a backward pass through its graph.
      Blocks of ``chunk_size`` probes go through one vmapped backward pass
      (``is_grads_batched=True``); when the vmap batching rule of some op in the
      graph is missing or wrong (``group_norm``'s double backward, torch 2.13),
      the products fall back to one backward pass per probe, with a warning.
    - ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``,
      vmapped over the probes of a block, so that the primal forward and backward
      pass is computed once per block; no graph is kept between blocks.
    - ``"finite_difference"``: central differences of ordinary gradients
      (see :func:`finite_difference_hvp`); for ops without second derivatives,
      in smooth models only (not ReLU: see its warning).
    - ``"auto"``: ``"double_backward"``, then ``"forward_over_reverse"`` if the
      first product fails; the backend that worked is kept in :attr:`resolved`.
      If neither works, a ``RuntimeError`` names the op that torch reports as
      not twice differentiable and suggests ``"finite_difference"``.

    The forward of every automatic-differentiation product runs inside
    :func:`curvature_sdpa`, so models written with
    ``F.scaled_dot_product_attention`` work on CPU.

    Cost, per probe, on the MLP 64-256-256-10 at batch 512 (one CPU thread), in
    units of one gradient: matrix products alone put an exact Hessian-vector
    product at about 1.9 gradients (14 GEMMs against 8). On CPU the vmapped double
    backward is slower than one backward pass per probe (batched tensors are
    transposed and copied, and ``n`` times larger activations leave the cache), so
    ``chunk_size=None`` means one probe per pass for ``"double_backward"`` on
    CPU and the whole block elsewhere; ``benchmarks/hessian.py`` measures both.

    Args:
        model: The functional model (its ``loss`` must be set).
        inputs: Inputs of the batch.
        targets: Targets of the batch.
        backend: One of ``BATCHED_HVP_BACKENDS``.
        chunk_size: Probes per vmapped pass (bounds memory: a pass holds
            ``chunk_size`` copies of the activations); ``None`` picks the default
            above.

    Attributes:
        num_matvecs: Products computed so far, one per probe.
        resolved: The backend in use once the first product is done (``None``
            before).

    Raises:
        ValueError: If ``backend`` or ``chunk_size`` is invalid.

    Warning:
        ``"double_backward"`` keeps the graph of one gradient pass alive for the
        operator's lifetime, and a batched pass holds ``chunk_size`` times the
        tensors of one product.
    """

    def __init__(
        self,
        model: FunctionalModel,
        inputs: Any,
        targets: Any,
        backend: str = "auto",
        *,
        chunk_size: int | None = None,
    ) -> None:
        if backend not in BATCHED_HVP_BACKENDS:
            raise ValueError(
                f"backend must be one of {BATCHED_HVP_BACKENDS}, got {backend!r}"
            )
        check_chunk_size(chunk_size)
        super().__init__(model, inputs, targets)
        self.backend = backend
        self.chunk_size = chunk_size
        self.resolved: str | None = None
        self._batching: dict[str, bool] = {}
        self._leaves: tuple[Tensor, ...] = ()
        self._grads: tuple[Tensor | None, ...] = ()
        self._fd: FiniteDifferenceHessianOperator | None = None

    def gradient(self) -> Tensor:
        """The flat gradient ``dL/dtheta`` of shape ``(p,)``."""
        if self._grads:
            return flatten(
                [
                    torch.zeros_like(p) if g is None else g.detach()
                    for g, p in zip(self._grads, self.model.params, strict=True)
                ]
            )
        return flat_gradient(self.model, self.model.params, self.inputs, self.targets)

    def __call__(self, vector: Tensor) -> Tensor:
        """``H v`` for ``v`` of shape ``(p,)``; returns shape ``(p,)``."""
        return self.matmat(vector.reshape(1, -1))[0]

    def matmat(self, probes: Tensor) -> Tensor:
        """``H v_i`` for every row ``v_i`` of ``probes`` (shape ``(n, p)``).

        Returns:
            The products, shape ``(n, p)``, in the model's dtype.

        Raises:
            ValueError: If ``probes`` is not of shape ``(n, p)``.
            RuntimeError: If no backend can differentiate the model twice.
        """
        check_probe_block(probes, self.dim)
        probes = probes.to(device=self.model.device, dtype=self.model.dtype)
        out = self._products(probes)
        self.num_matvecs += probes.shape[0]
        return out

    def _chunk(self, backend: str, n: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        if backend == "double_backward" and self.model.device.type == "cpu":
            return 1
        return max(n, 1)

    def _products(self, block: Tensor) -> Tensor:
        if self.resolved is not None:
            return self._run(self.resolved, block)
        # The first product tries each candidate backend and keeps the first that
        # works; a failure of the first-order pass propagates unchanged.
        candidates = _AUTOMATIC_BACKENDS if self.backend == "auto" else (self.backend,)
        if "double_backward" in candidates:
            self._build_graph()
        errors: dict[str, RuntimeError] = {}
        for backend in candidates:
            try:
                out = self._run(backend, block)
            except RuntimeError as error:
                errors[backend] = error
                continue
            self.resolved = backend
            if backend != "double_backward":
                self._leaves, self._grads = (), ()
            return out
        raise second_order_error(errors) from next(iter(errors.values()))

    def _run(self, backend: str, probes: Tensor) -> Tensor:
        chunk = self._chunk(backend, probes.shape[0])
        return torch.cat([self._run_block(backend, b) for b in probes.split(chunk)])

    def _run_block(self, backend: str, block: Tensor) -> Tensor:
        if backend == "double_backward":
            return run_blocks(
                block,
                self._double_backward_batched,
                self._double_backward_single,
                self._batching,
                "double_backward",
            )
        if backend == "forward_over_reverse":
            return run_blocks(
                block,
                self._forward_over_reverse_batched,
                self._forward_over_reverse_single,
                self._batching,
                "forward_over_reverse",
            )
        if self._fd is None:
            self._fd = FiniteDifferenceHessianOperator(
                self.model, self.inputs, self.targets
            )
        return torch.stack([self._fd(v) for v in block])

    def _build_graph(self) -> None:
        if self._grads:
            return
        leaves = tuple(p.detach().requires_grad_(True) for p in self.model.params)
        with torch.enable_grad(), curvature_sdpa():
            loss = self.model.loss_at(leaves, self.inputs, self.targets)
            grads = torch.autograd.grad(
                loss, leaves, create_graph=True, allow_unused=True
            )
        self._leaves, self._grads = leaves, grads

    def _double_backward(self, pieces: tuple[Tensor, ...], batched: bool) -> Tensor:
        used = [
            i for i, g in enumerate(self._grads) if g is not None and g.requires_grad
        ]
        shape = pieces[0].shape[:1] if batched else ()
        out = [p.new_zeros((*shape, *p.shape)) for p in self._leaves]
        if used:
            with torch.enable_grad():
                products = torch.autograd.grad(
                    [self._grads[i] for i in used],
                    self._leaves,
                    grad_outputs=[pieces[i] for i in used],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=batched,
                )
            out = [o if h is None else h for o, h in zip(out, products, strict=True)]
        if batched:
            return torch.cat([o.reshape(o.shape[0], -1) for o in out], dim=1)
        return flatten(out)

    def _double_backward_batched(self, block: Tensor) -> Tensor:
        return self._double_backward(unflatten(block, self.model.params), True)

    def _double_backward_single(self, vector: Tensor) -> Tensor:
        return self._double_backward(unflatten(vector, self.model.params), False)

    def _hvp(self, pieces: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        def loss_fn(params: tuple[Tensor, ...]) -> Tensor:
            return self.model.loss_at(params, self.inputs, self.targets)

        return jvp(grad(loss_fn), (self.model.params,), (pieces,))[1]

    def _forward_over_reverse_batched(self, block: Tensor) -> Tensor:
        pieces = unflatten(block, self.model.params)
        with curvature_sdpa():
            products = vmap(self._hvp, randomness="same")(pieces)
        return torch.cat([h.reshape(h.shape[0], -1) for h in products], dim=1)

    def _forward_over_reverse_single(self, vector: Tensor) -> Tensor:
        with curvature_sdpa():
            return flatten(self._hvp(unflatten(vector, self.model.params)))


def finite_difference_step(
    params_norm: float, vector_norm: float, dtype: torch.dtype
) -> float:
    r"""The step ``h`` of a central difference of gradients along ``v``.

    .. math::
        h = \epsilon^{1/3} \, \frac{1 + \|\theta\|}{\|v\|}

    with ``epsilon`` the machine epsilon of ``dtype``. The central difference has
    truncation error ``O(h^2)`` and rounding error ``O(epsilon / h)``; their sum is
    smallest for ``h`` of order ``epsilon^{1/3}`` times the scale on which the
    gradient varies, taken here as ``1 + ||theta||`` (the forward-difference rule
    ``sqrt(epsilon) (1 + ||theta||) / ||v||`` of Newton-Krylov solvers, with the
    exponent for central differences). The step ``h v`` then has length
    ``epsilon^{1/3} (1 + ||theta||)``: about ``5e-3 (1 + ||theta||)`` in float32
    and ``6e-6 (1 + ||theta||)`` in float64.

    Args:
        params_norm: ``||theta||``.
        vector_norm: ``||v||``, positive.
        dtype: The floating dtype of the gradients.

    Returns:
        The step ``h``.

    Raises:
        ValueError: If ``vector_norm`` is not positive and finite.
    """
    if not math.isfinite(vector_norm) or vector_norm <= 0:
        raise ValueError(
            f"the probe's norm must be positive and finite, got {vector_norm}: a "
            "finite-difference product needs a nonzero direction"
        )
    eps = torch.finfo(dtype).eps
    return eps ** (1 / 3) * (1.0 + params_norm) / vector_norm


def finite_difference_hvp(
    model: FunctionalModel,
    inputs: Any,
    targets: Any,
    vector: Tensor,
    step: float | None = None,
) -> Tensor:
    r"""``H v`` from a central difference of two ordinary gradients.

    .. math::
        H v \approx \frac{g(\theta + h v) - g(\theta - h v)}{2 h},
        \qquad g = \nabla_\theta L .

    No double backward and no forward-mode derivative: only two gradient passes,
    so it works for ops without second derivatives. It is also the product for
    parameters that only an ordinary backward pass can reach (sharded ones); this
    function takes its gradients through the unwrapped :class:`FunctionalModel`
    and is tested on unsharded models only.

    Error. Taylor's theorem gives a truncation error
    ``(h^2 / 6) ||d^3 g(xi)[v, v, v]||`` for some ``xi`` on the segment
    ``theta +- h v``, where ``d^3 g`` is the fourth derivative of the loss (the
    third of the gradient: the ``O(h^2 ||d^3 L||)`` of the usual statement, for
    the function differenced, here ``g``). Each gradient carries a rounding error
    of order ``epsilon ||g||``, and rounding ``theta +- h v`` to the dtype moves
    the two points by up to ``epsilon |theta|``, so the rounding error is
    ``O(epsilon (||g|| + ||H|| ||theta||) / h)``. With the default step of
    :func:`finite_difference_step` both terms are of order ``epsilon^{2/3}``
    relative: about ``1e-10`` in float64 and ``1e-5``-``1e-4`` in float32.

    Args:
        model: The functional model (its ``loss`` must be set).
        inputs: Inputs of the batch.
        targets: Targets of the batch.
        vector: The direction ``v``, shape ``(p,)``.
        step: The step ``h``; ``None`` uses :func:`finite_difference_step`.

    Returns:
        The product, shape ``(p,)``, in the model's dtype.

    Raises:
        ValueError: If ``vector`` is zero or ``step`` is not positive.

    Warning:
        The bound assumes a smooth loss (tanh, GELU, SiLU, softmax). With a
        piecewise-linear op (ReLU, max pooling) the gradient itself jumps where
        the step ``theta +- h v`` moves a unit across its kink, and each crossed
        unit adds its jump divided by ``2 h``. Crossings become rarer as ``h``
        shrinks but their contribution grows, so the error does not vanish with
        ``h``: on the ReLU MLP 64-256-256-10 (batch 512, Rademacher ``v``) the
        product is off by 4 times its norm in float32 and by 5-200 times in
        float64. Use automatic differentiation for such models.
    """
    inputs, targets = model.cast(inputs), model.cast(targets)
    vector = vector.to(device=model.device, dtype=model.dtype)
    theta = flatten(model.params)
    if step is None:
        step = finite_difference_step(
            float(theta.norm()), float(vector.norm()), model.dtype
        )
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}")
    plus = flat_gradient(
        model, unflatten(theta + step * vector, model.params), inputs, targets
    )
    minus = flat_gradient(
        model, unflatten(theta - step * vector, model.params), inputs, targets
    )
    return (plus - minus) / (2 * step)


class FiniteDifferenceHessianOperator(BatchOperator):
    """Products ``v -> H v`` by central differences of gradients.

    The interface of :class:`~curvlightning.core.operators.HessianOperator`
    (``dim``, ``num_matvecs``, ``gradient()``, ``loss()``, ``__call__``) plus
    :meth:`matmat`. Each product costs two ordinary gradient passes and keeps no
    graph; :attr:`num_matvecs` counts products (one per probe), not gradients.
    The accuracy is that of :func:`finite_difference_hvp`: about ``epsilon^{2/3}``
    relative for smooth losses, and no accuracy at all for ReLU networks.

    Args:
        model: The functional model (its ``loss`` must be set).
        inputs: Inputs of the batch.
        targets: Targets of the batch.
        step: A fixed step ``h``; ``None`` picks one per probe with
            :func:`finite_difference_step`.

    Attributes:
        num_matvecs: Products computed so far.
        last_step: The step of the last product.
    """

    def __init__(
        self,
        model: FunctionalModel,
        inputs: Any,
        targets: Any,
        step: float | None = None,
    ) -> None:
        if step is not None and not step > 0:
            raise ValueError(f"step must be positive or None, got {step}")
        super().__init__(model, inputs, targets)
        self.step = step
        self.last_step: float | None = None
        self._theta_norm = float(flatten(model.params).norm())

    def gradient(self) -> Tensor:
        """The flat gradient ``dL/dtheta`` of shape ``(p,)``."""
        return flat_gradient(self.model, self.model.params, self.inputs, self.targets)

    def __call__(self, vector: Tensor) -> Tensor:
        """``H v`` for ``v`` of shape ``(p,)``; returns shape ``(p,)``."""
        step = self.step
        if step is None:
            step = finite_difference_step(
                self._theta_norm, float(vector.norm()), self.model.dtype
            )
        self.last_step = step
        self.num_matvecs += 1
        return finite_difference_hvp(
            self.model, self.inputs, self.targets, vector, step
        )

    def matmat(self, probes: Tensor) -> Tensor:
        """``H v_i`` for every row of ``probes`` (shape ``(n, p)``), one by one."""
        check_probe_block(probes, self.dim)
        return torch.stack([self(v) for v in probes])


def hessian_operator(
    model: FunctionalModel, inputs: Any, targets: Any, backend: str = "double_backward"
) -> HessianOperator | BatchedHessianOperator | FiniteDifferenceHessianOperator:
    """The Hessian-vector product operator for a backend name.

    ``"double_backward"`` and ``"forward_over_reverse"`` give a
    :class:`~curvlightning.core.operators.HessianOperator`; ``"auto"`` a
    :class:`BatchedHessianOperator` that picks the first backend the model
    supports and names the op that fails; ``"finite_difference"`` a
    :class:`FiniteDifferenceHessianOperator` (two ordinary gradients per product,
    for models that cannot be differentiated twice).

    Raises:
        ValueError: On an unknown backend.
    """
    if backend not in BATCHED_HVP_BACKENDS:
        raise ValueError(
            f"backend must be one of {BATCHED_HVP_BACKENDS}, got {backend!r}"
        )
    if backend in HVP_BACKENDS:
        return HessianOperator(model, inputs, targets, backend)
    if backend == "finite_difference":
        return FiniteDifferenceHessianOperator(model, inputs, targets)
    return BatchedHessianOperator(model, inputs, targets, backend)
