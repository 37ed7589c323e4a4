"""A functional view of an ``nn.Module`` for curvature passes.

A curvature pass evaluates the loss as a function of the trainable parameters
``theta`` (p numbers) while leaving the module exactly as it found it: parameters,
``.grad``, buffers, ``requires_grad`` flags and the global RNG state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.stateless import _reparametrize_module

__all__ = [
    "FunctionalModel",
    "flatten",
    "math_attention",
    "trainable_parameters",
    "unflatten",
]


def trainable_parameters(
    module: nn.Module,
) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
    """Names and tensors of the parameters a curvature pass differentiates.

    A parameter shared by several submodules (tied weights) appears once, under the
    first name ``named_parameters`` gives it; parameters with ``requires_grad=False``
    are left out.

    Args:
        module: The model.

    Returns:
        The names and the parameter tensors, in registration order.

    Raises:
        ValueError: If the module has no trainable parameter.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            f"module {type(module).__name__} has no trainable parameter: a curvature "
            "pass needs at least one parameter with requires_grad=True"
        )
    names, params = zip(*named, strict=True)
    return tuple(names), tuple(params)


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one vector of shape ``(p,)``."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Split a vector of shape ``(..., p)`` into tensors shaped like ``like``.

    Leading batch dimensions of ``vector`` are kept in front of each piece.
    """
    batch = vector.shape[:-1]
    pieces = torch.split(vector, [t.numel() for t in like], dim=-1)
    return tuple(
        piece.reshape(*batch, *t.shape) for piece, t in zip(pieces, like, strict=True)
    )


@contextlib.contextmanager
def _frozen_batch_norm_stats(module: nn.Module) -> Iterator[None]:
    """Stop BatchNorm layers in training mode from updating their running stats.

    In training mode they still normalise with the statistics of the batch, which is
    the loss that training differentiates; no buffer is written.
    """
    changed = [
        m
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


@dataclass
class FunctionalModel:
    """The loss and the outputs of a module as functions of its trainable parameters.

    Every call runs the module with parameters substituted (``theta`` given as a
    sequence of tensors shaped like :attr:`params`), with cloned buffers, with
    BatchNorm running statistics frozen, outside autocast, with attention on its
    differentiable math kernel (:func:`math_attention`), and with the RNG pinned to
    ``rng_seed`` so that dropout draws the same mask in every product of one
    estimate. The global RNG state is restored after each call.

    Args:
        module: The model; it is never modified.
        forward: Maps inputs to outputs (logits), evaluated inside the
            reparametrisation; defaults to ``module.__call__``.
        loss: Maps ``(outputs, targets)`` to the scalar training loss.
        rng_seed: Seed of the pinned RNG; ``None`` leaves the RNG free (dropout then
            draws a new mask at every call).
        dtype: Floating dtype of the pass (``torch.float32`` or ``torch.float64``);
            ``None`` keeps the parameters' dtype, upcasting half precision to float32.
    """

    module: nn.Module
    forward: Callable[[Any], Tensor] | None = None
    loss: Callable[[Tensor, Any], Tensor] | None = None
    rng_seed: int | None = 0
    dtype: torch.dtype | None = None
    names: tuple[str, ...] = field(init=False)
    params: tuple[Tensor, ...] = field(init=False)

    def __post_init__(self) -> None:
        names, params = trainable_parameters(self.module)
        dtype = self.dtype or _working_dtype(params[0].dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.dtype = dtype
        self.names = names
        self.params = tuple(p.detach().to(dtype) for p in params)

    @property
    def num_params(self) -> int:
        """The number p of trainable parameters."""
        return sum(p.numel() for p in self.params)

    @property
    def device(self) -> torch.device:
        """The device of the parameters."""
        return self.params[0].device

    def cast(self, data: Any) -> Any:
        """Move floating tensors in ``data`` to the pass' dtype and device."""
        if isinstance(data, Tensor):
            data = data.to(self.device)
            return data.to(self.dtype) if data.is_floating_point() else data
        if isinstance(data, (list, tuple)):
            return type(data)(self.cast(d) for d in data)
        if isinstance(data, dict):
            return {k: self.cast(v) for k, v in data.items()}
        return data

    def outputs(self, params: Sequence[Tensor], inputs: Any) -> Tensor:
        """The module's outputs at parameters ``params`` (no side effects)."""
        mapping = self._frozen()
        mapping.update(zip(self.names, params, strict=True))
        mapping.update(self._buffers())
        forward = self.forward or self.module
        with (
            self._context(),
            _reparametrize_module(self.module, mapping, tie_weights=True),
        ):
            return forward(inputs)

    def loss_at(self, params: Sequence[Tensor], inputs: Any, targets: Any) -> Tensor:
        """The scalar loss at parameters ``params`` (no side effects)."""
        if self.loss is None:
            raise ValueError("FunctionalModel needs a loss to evaluate loss_at")
        return self.loss(self.outputs(params, inputs), targets)

    def _frozen(self) -> dict[str, Tensor]:
        """Frozen floating parameters in the pass' dtype (constants of the pass)."""
        return {
            name: p.detach().to(self.dtype)
            for name, p in self.module.named_parameters()
            if not p.requires_grad and p.is_floating_point()
        }

    def _buffers(self) -> dict[str, Tensor]:
        return {
            name: b.detach().to(self.dtype, copy=True)
            if b.is_floating_point()
            else b.detach().clone()
            for name, b in self.module.named_buffers()
            if b is not None
        }

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        device = self.device
        devices = [device] if device.type == "cuda" else []
        with contextlib.ExitStack() as stack:
            stack.enter_context(_frozen_batch_norm_stats(self.module))
            stack.enter_context(torch.autocast(device.type, enabled=False))
            stack.enter_context(math_attention())
            if self.rng_seed is not None:
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.manual_seed(self.rng_seed)
            yield


def math_attention() -> contextlib.AbstractContextManager:
    """Route ``F.scaled_dot_product_attention`` to its differentiable math kernel.

    The fused kernels (flash attention on CPU, among others) have neither a
    double-backward derivative nor forward-mode AD; the math kernel has both and
    computes the same function.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point:
        return torch.float32
    return dtype
