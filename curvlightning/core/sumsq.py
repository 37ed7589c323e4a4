r"""Sums over the batch of squared per-sample gradients, without forming them.

For a layer ``z_n = W a_n + b`` the gradient of sample n's loss is the outer
product ``g_n(W) = b_n a_n^T`` of the gradient ``b_n = dL/dz_n`` at the layer's
output and its input ``a_n``. Its elementwise square factors, so the sum over the
batch is one matrix product,

.. math::
    \sum_n g_n(W)^{\odot 2} = (b^{\odot 2})^\top (a^{\odot 2}), \qquad
    \sum_n g_n(W)^{\odot 4} = (b^{\odot 4})^\top (a^{\odot 4}),

with ``a`` of shape ``(N, d_in)`` and ``b`` of shape ``(N, d_out)``: one forward
pass, one backward pass to the layers' outputs (no weight gradients) and one
product per layer (two with the fourth powers), instead of N per-sample gradients.
On an MLP that is about one gradient for the squares and 1.3 with the fourth
powers. Dangel et al. (2020), "BackPACK: Packing more into backprop", compute the
same with module extensions.

Inputs ``a`` are recorded by forward hooks; the gradients ``b`` come from
``torch.autograd.grad`` with respect to the recorded outputs, so no backward hook
is registered (a full backward hook wraps the outputs in a custom autograd
function, which ``torch.func`` rejects and an in-place operation after the layer
breaks) and ``.grad`` is never written. The hooks are removed before anything
else runs, also on error.

Covered layers:

- ``nn.Linear`` with 2-D inputs ``(N, d_in)``: the product above, exact and cheap.
  A sequence dimension ``(N, T, d_in)`` makes ``g_n = sum_t b_nt a_nt^T`` a sum
  of outer products whose square does not factor; such calls fall back.
- ``nn.Conv2d`` (zero padding, any stride, dilation and groups): with the input
  unfolded into patches ``U_n = unfold(a_n)`` of shape ``(C_in k_h k_w, L)``, the
  per-sample weight gradient is ``b_n U_n^T`` with ``b_n`` of shape ``(C_out, L)``.
  Its square does not factor, so it is formed for a chunk of samples at a time
  (``memory_budget`` bounds the chunk): ``O(N C_out C_in k_h k_w L)`` operations,
  the cost of the weight gradient itself, and ``n_chunk`` weight-sized buffers.
- biases: the per-sample gradient is ``b_n`` (summed over positions for Conv2d).

Every other parameter (LayerNorm, Embedding, a layer called twice, a tied or
parametrised weight, a layer whose call does not fit the cases above) falls back to
``torch.func.vmap`` per-sample gradients of those parameters only, after the hooks
are removed (module hooks break ``torch.func`` transforms).

The loss scale: the backward pass differentiates ``sum_n l_n`` for
``reduction="sum"`` and ``(1/N) sum_n l_n`` for ``reduction="mean"``, so with
``"mean"`` every captured ``b_n`` carries a factor ``1/N`` and the sums are those of
the gradients of ``l_n / N``: ``(1/N^2) sum_n g_n^2`` (BackPACK's
``SumGradSquared`` on a mean-reduced loss). The fallback is scaled to match.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from curvlightning.core.distributed import Reducer, SingleProcess
from curvlightning.core.estimators import Estimate, _estimate_from_sums
from curvlightning.core.fisher import _label_noise, _split_parts, check_fisher_kind
from curvlightning.core.functional import FunctionalModel
from curvlightning.core.gradients import (
    DEFAULT_MEMORY_BUDGET,
    INTERMEDIATE_FACTOR,
    as_functional,
    chunk_size_for_budget,
)
from curvlightning.core.likelihoods import Likelihood
from curvlightning.core.operators import _check_per_sample, flatten_batched
from curvlightning.core.probes import ProbeSource

__all__ = [
    "REDUCTIONS",
    "GradientPowerSums",
    "fisher_sumsq",
    "gradient_power_sums",
    "sum_of_squared_gradients",
]

REDUCTIONS = ("sum", "mean")
_HANDLED = (nn.Linear, nn.Conv2d)

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]
TargetSets = Callable[[Tensor], Sequence[Tensor]]


@dataclass(frozen=True)
class GradientPowerSums:
    r"""Sums over the batch of powers of per-sample gradients.

    With S target sets (S = 1 for plain targets) and ``g_ns`` the gradient of
    sample n's loss at target set s, let ``q_n = sum_s g_ns^2`` (elementwise).

    Attributes:
        squares: ``sum_n q_n``, shape ``(p,)``, ordered like
            ``FunctionalModel.params``.
        fourth_powers: ``sum_n q_n^2``, shape ``(p,)`` (``sum_n g_n^4`` for one
            target set), or ``None`` when not requested.
        sample_sq_norms: ``sum_j q_nj`` over the entries j of each parameter
            tensor, shape ``(N, T)`` for T parameter tensors.
        fallback: Names of the parameters computed by ``vmap``.
    """

    squares: Tensor
    fourth_powers: Tensor | None
    sample_sq_norms: Tensor
    fallback: tuple[str, ...]


@dataclass
class _Layer:
    """A covered layer, its trainable parameters and what its calls recorded."""

    module: nn.Module
    params: dict[str, int]
    inputs: list[Any] = field(default_factory=list)
    outputs: list[Tensor | None] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    def overwritten(self) -> bool:
        """Whether an in-place operation changed a recorded output."""
        tensors = [t for t in self.outputs if t is not None]
        return any(t._version != v for t, v in zip(tensors, self.versions, strict=True))


@dataclass
class _Sums:
    """One parameter tensor's ``sum_n q_n``, ``sum_n q_n^2`` and norms ``(N,)``."""

    squares: Tensor
    fourth: Tensor | None
    norms: Tensor


def sum_of_squared_gradients(
    model: FunctionalModel | nn.Module,
    inputs: Tensor,
    targets: Tensor,
    per_sample_loss: PerSampleLoss,
    *,
    reduction: str = "sum",
    fourth_powers: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""``sum_n g_n^2`` over the batch, without forming the per-sample gradients.

    ``g_n`` is the gradient of ``l_n`` for ``reduction="sum"`` and of ``l_n / N``
    for ``reduction="mean"`` (see the module docstring); the result equals the sum
    over rows of the squared per-sample gradients of
    :func:`~curvlightning.core.operators.per_sample_gradients`, divided by ``N^2``
    for ``"mean"``.

    Args:
        model: The model (a plain module is wrapped in a ``FunctionalModel``).
        inputs: Inputs of shape ``(N, ...)``.
        targets: Targets with leading dimension N.
        per_sample_loss: Maps ``(outputs, targets)`` of a batch to losses ``(N,)``.
        reduction: ``"sum"`` or ``"mean"``: how the batch loss is formed.
        fourth_powers: Also return ``sum_n g_n^4`` (for a standard error).
        memory_budget: Bytes one chunk of Conv2d or fallback work may take.

    Returns:
        ``sum_n g_n^2`` of shape ``(p,)``, or the pair ``(sum_n g_n^2,
        sum_n g_n^4)`` with ``fourth_powers=True``.
    """
    sums = gradient_power_sums(
        model,
        inputs,
        targets,
        per_sample_loss,
        reduction=reduction,
        fourth_powers=fourth_powers,
        memory_budget=memory_budget,
    )
    if fourth_powers:
        return sums.squares, sums.fourth_powers
    return sums.squares


def gradient_power_sums(
    model: FunctionalModel | nn.Module,
    inputs: Tensor,
    targets: Tensor | Sequence[Tensor],
    per_sample_loss: PerSampleLoss,
    *,
    reduction: str = "sum",
    fourth_powers: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> GradientPowerSums:
    """Squares, fourth powers and per-sample norms of per-sample gradients.

    Args:
        model: The model (a plain module is wrapped in a ``FunctionalModel``).
        inputs: Inputs of shape ``(N, ...)``.
        targets: Targets with leading dimension N, or a list of S such target
            sets sharing one forward pass (sampled labels): ``q_n`` then sums the
            squared gradients over the sets.
        per_sample_loss: Maps ``(outputs, targets)`` of a batch to losses ``(N,)``.
        reduction: ``"sum"`` or ``"mean"``: how the batch loss is formed.
        fourth_powers: Compute ``sum_n q_n^2`` (one more product per layer).
        memory_budget: Bytes one chunk of Conv2d or fallback work may take.

    Returns:
        The sums (see :class:`GradientPowerSums`).

    Raises:
        ValueError: On an unknown ``reduction``, losses not of shape ``(N,)``, or
            BatchNorm in training mode (per-sample gradients are undefined).

    Warning:
        The covered layers read ``b_n`` as the gradient of sample n's loss alone,
        true when samples do not interact in the forward pass. A covered layer's
        weight that the model also uses outside the layer's call (``F.linear(h,
        self.fc.weight)`` in the parent's forward) is not detected and gets only
        the layer's share. With dropout the covered layers see one batch of masks
        and the fallback draws its own.
    """
    sets = [targets] if isinstance(targets, Tensor) else list(targets)
    sums, _ = _power_sums(
        as_functional(model),
        inputs,
        lambda outputs: sets,
        per_sample_loss,
        reduction,
        fourth_powers,
        memory_budget,
    )
    return sums


def _power_sums(
    model: FunctionalModel,
    inputs: Tensor,
    target_sets: TargetSets,
    per_sample_loss: PerSampleLoss,
    reduction: str,
    fourth: bool,
    budget: int,
) -> tuple[GradientPowerSums, Tensor]:
    """The sums and the detached outputs; ``target_sets`` maps outputs to targets."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_per_sample(model.module)
    inputs = model.cast(inputs)
    layers = _candidate_layers(model)
    leaves = tuple(p.detach().requires_grad_(True) for p in model.params)
    outputs = _hooked_forward(model, leaves, inputs, layers)
    detached = outputs.detach()
    sets = [model.cast(t) for t in target_sets(detached)]
    layers = [layer for layer in layers if _usable(layer, detached.shape[0])]

    # Gradients at the covered layers' outputs, one backward pass per target set.
    grads = _output_grads(layers, outputs, sets, per_sample_loss, reduction)
    del outputs
    pieces: dict[int, _Sums] = {}
    for j, layer in enumerate(layers):
        pieces.update(_layer_sums(layer, [g[j] for g in grads], fourth, budget))

    # Everything else: vmap per-sample gradients of the remaining parameters.
    rest = [i for i in range(len(model.params)) if i not in pieces]
    scale = 1.0 if reduction == "sum" else 1.0 / detached.shape[0]
    args = (inputs, sets, per_sample_loss, scale, fourth, budget)
    pieces.update(_fallback_sums(model, rest, *args))
    return _assemble(model, pieces, rest, fourth), detached


# ----------------------------------------------------------------- recording
def _candidate_layers(model: FunctionalModel) -> list[_Layer]:
    """Covered layers whose trainable parameters belong to them alone."""
    index = {name: i for i, name in enumerate(model.names)}
    owners: dict[int, int] = {}
    for module in model.module.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    layers = []
    for prefix, module in model.module.named_modules():
        if type(module) not in _HANDLED:
            continue
        params = {
            name: index[f"{prefix}.{name}" if prefix else name]
            for name, p in module.named_parameters(recurse=False)
            if (f"{prefix}.{name}" if prefix else name) in index and owners[id(p)] == 1
        }
        if params:
            layers.append(_Layer(module, params))
    return layers


def _hooked_forward(
    model: FunctionalModel,
    leaves: Sequence[Tensor],
    inputs: Tensor,
    layers: Sequence[_Layer],
) -> Tensor:
    """The outputs, with every covered layer's input and output recorded.

    An in-place operation after a layer (``ReLU(inplace=True)``) would overwrite
    the recorded output; it is detected by the tensor's version counter, and the
    forward pass is then run again with the layers passing a copy on.
    """
    for copy in (False, True):
        for layer in layers:
            layer.inputs, layer.outputs, layer.versions = [], [], []
        with _recording(layers, copy), torch.enable_grad():
            outputs = model.outputs(leaves, inputs)
        if copy or not any(layer.overwritten() for layer in layers):
            return outputs
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _recording(layers: Sequence[_Layer], copy: bool) -> Iterator[None]:
    """Forward hooks that record each covered layer's input and output.

    With ``copy=True`` the hook passes a copy of the output on, so that nothing
    after the layer can change the recorded tensor. The hooks are removed on exit,
    also on error.
    """
    handles = []
    try:
        for layer in layers:
            hook = partial(_record, layer, copy)
            handles.append(layer.module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _record(
    layer: _Layer, copy: bool, module: nn.Module, args: tuple, output: Any
) -> Any:
    layer.inputs.append(args[0] if args else None)
    if not isinstance(output, Tensor):
        layer.outputs.append(None)
        return output
    layer.outputs.append(output)
    layer.versions.append(output._version)
    return output.clone() if copy else output


def _usable(layer: _Layer, num_samples: int) -> bool:
    """Whether the recorded call fits the closed forms (else: fallback)."""
    if len(layer.inputs) != 1 or layer.outputs[0] is None:
        return False
    a, out = layer.inputs[0], layer.outputs[0]
    if not isinstance(a, Tensor) or not out.requires_grad:
        return False
    if a.shape[0] != num_samples or out.shape[0] != num_samples:
        return False
    if isinstance(layer.module, nn.Linear):
        return a.dim() == 2
    conv = layer.module
    return a.dim() == 4 and conv.padding_mode == "zeros" and _padding(conv) is not None


def _padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The symmetric zero padding of ``conv``; ``None`` for uneven ``"same"``."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    if any(t % 2 for t in totals):
        return None
    return tuple(t // 2 for t in totals)


def _output_grads(
    layers: Sequence[_Layer],
    outputs: Tensor,
    sets: Sequence[Tensor],
    per_sample_loss: PerSampleLoss,
    reduction: str,
) -> list[list[Tensor]]:
    """``dL_s / dz`` at each covered layer's output z, for every target set s."""
    if not layers:
        return [[] for _ in sets]
    recorded = [layer.outputs[0] for layer in layers]
    last = len(sets) - 1
    with torch.enable_grad():
        return [
            _grads_at(recorded, per_sample_loss(outputs, y), reduction, s < last)
            for s, y in enumerate(sets)
        ]


def _grads_at(
    recorded: Sequence[Tensor], losses: Tensor, reduction: str, retain: bool
) -> list[Tensor]:
    """Gradients of the reduced batch loss at the recorded outputs."""
    num_samples = recorded[0].shape[0]
    _check_losses(losses, num_samples)
    loss = losses.sum() if reduction == "sum" else losses.mean()
    grads = torch.autograd.grad(loss, recorded, retain_graph=retain, allow_unused=True)
    return [
        torch.zeros_like(z) if g is None else g
        for g, z in zip(grads, recorded, strict=True)
    ]


def _check_losses(losses: Tensor, num_samples: int) -> None:
    if losses.shape != (num_samples,):
        raise ValueError(
            f"per_sample_loss must return one loss per sample, shape "
            f"({num_samples},); got shape {tuple(losses.shape)}. Pass the loss with "
            "reduction='none' (and a mean over non-batch dimensions)"
        )


# ---------------------------------------------------------------- closed forms
def _layer_sums(
    layer: _Layer, grads: Sequence[Tensor], fourth: bool, budget: int
) -> dict[int, _Sums]:
    if isinstance(layer.module, nn.Linear):
        return _linear_sums(layer, grads, fourth)
    return _conv_sums(layer, grads, fourth, budget)


def _linear_sums(
    layer: _Layer, grads: Sequence[Tensor], fourth: bool
) -> dict[int, _Sums]:
    r"""``q_n(W) = (sum_s b_ns^2) (a_n^2)^T``: sums are products over the batch.

    The squares are taken in place where the buffer is ours (the output
    gradients, then ``a^2``), so a layer allocates one input-sized buffer.
    """
    b2 = _sum_of_squares(grads, owned=True)
    weight, bias = layer.params.get("weight"), layer.params.get("bias")
    a2 = None if weight is None else layer.inputs[0].detach().square()
    squares = None if a2 is None else b2.T @ a2
    norms = None if a2 is None else b2.sum(dim=1) * a2.sum(dim=1)
    bias_sums = _bias_sums(b2, fourth=False) if bias is not None else None
    fourths = None
    if fourth:
        b4 = b2.square_()
        fourths = None if a2 is None else b4.T @ a2.square_()
        if bias_sums is not None:
            bias_sums.fourth = b4.sum(dim=0)
    out = {}
    if weight is not None:
        out[weight] = _Sums(squares, fourths, norms)
    if bias is not None:
        out[bias] = bias_sums
    return out


def _sum_of_squares(tensors: Iterable[Tensor], owned: bool = False) -> Tensor:
    """``sum_s t_s^2`` elementwise, in one buffer (the tensors may be lazy).

    With ``owned=True`` the first tensor is squared in place.
    """
    total = None
    for t in tensors:
        if total is None:
            total = t.square_() if owned else t.square()
        else:
            total.addcmul_(t, t)
    return total


def _bias_sums(q: Tensor, fourth: bool) -> _Sums:
    """Sums of per-sample bias terms ``q`` of shape ``(N, C)``."""
    q2 = q.square().sum(dim=0) if fourth else None
    return _Sums(q.sum(dim=0), q2, q.sum(dim=1))


def _conv_sums(
    layer: _Layer, grads: Sequence[Tensor], fourth: bool, budget: int
) -> dict[int, _Sums]:
    """Per-sample weight gradients ``b_n U_n^T``, formed a chunk at a time."""
    conv = layer.module
    a = layer.inputs[0].detach()
    b = [g.flatten(start_dim=2) for g in grads]
    out = {}
    if "weight" in layer.params:
        out[layer.params["weight"]] = _conv_weight_sums(conv, a, b, fourth, budget)
    if "bias" in layer.params:
        q = _sum_of_squares(g.sum(dim=2) for g in b)
        out[layer.params["bias"]] = _bias_sums(q, fourth)
    return out


def _conv_weight_sums(
    conv: nn.Conv2d, a: Tensor, b: Sequence[Tensor], fourth: bool, budget: int
) -> _Sums:
    num_samples, groups = a.shape[0], conv.groups
    weight = conv.weight
    patches = a.shape[1] * weight.shape[2] * weight.shape[3] * b[0].shape[2]
    per_sample = patches + 3 * weight.numel()
    chunk = chunk_size_for_budget(
        per_sample, a.element_size(), budget, num_samples, factor=1
    )
    squares = a.new_zeros(weight.shape[0], weight[0].numel())
    fourths = torch.zeros_like(squares) if fourth else None
    norms = []
    for start in range(0, num_samples, chunk):
        rows = slice(start, start + chunk)
        cols = F.unfold(
            a[rows],
            conv.kernel_size,
            dilation=conv.dilation,
            padding=_padding(conv),
            stride=conv.stride,
        )
        cols = cols.unflatten(1, (groups, -1))
        q = _sum_of_squares(_conv_sample_grads(g[rows], cols, groups) for g in b)
        squares += q.sum(dim=0)
        if fourths is not None:
            fourths += q.square().sum(dim=0)
        norms.append(q.sum(dim=(1, 2)))
    shape = weight.shape
    return _Sums(
        squares.reshape(shape),
        None if fourths is None else fourths.reshape(shape),
        torch.cat(norms),
    )


def _conv_sample_grads(b: Tensor, cols: Tensor, groups: int) -> Tensor:
    """Per-sample weight gradients ``(n, C_out, C_in/groups * k_h * k_w)``."""
    b = b.unflatten(1, (groups, -1))
    grads = torch.einsum("ngol,ngil->ngoi", b, cols)
    return grads.flatten(start_dim=1, end_dim=2)


# ------------------------------------------------------------------- fallback
def _fallback_sums(
    model: FunctionalModel,
    indices: Sequence[int],
    inputs: Tensor,
    sets: Sequence[Tensor],
    per_sample_loss: PerSampleLoss,
    scale: float,
    fourth: bool,
    budget: int,
) -> dict[int, _Sums]:
    """Sums from vmapped per-sample gradients of the parameters ``indices``."""
    if not indices:
        return {}
    sub = tuple(model.params[i] for i in indices)
    per_sample = vmap(
        grad(_partial_loss(model, indices, per_sample_loss)),
        in_dims=(None, 0, 0),
        randomness="different",
    )
    num_samples = inputs.shape[0]
    size = sum(p.numel() for p in sub)
    itemsize = sub[0].element_size()
    chunk = chunk_size_for_budget(
        size, itemsize, budget, num_samples, factor=INTERMEDIATE_FACTOR + 1
    )
    total: dict[int, _Sums] = {}
    for start in range(0, num_samples, chunk):
        rows = slice(start, start + chunk)
        q = _sum_of_squares(
            scale * flatten_batched(per_sample(sub, inputs[rows], y[rows]))
            for y in sets
        )
        for i, part in _split_fallback(q, sub, indices, fourth).items():
            total[i] = _merge(total[i], part) if i in total else part
    return total


def _merge(first: _Sums, second: _Sums) -> _Sums:
    """The sums over two disjoint chunks of samples, in sample order."""
    fourth = None if first.fourth is None else first.fourth + second.fourth
    norms = torch.cat([first.norms, second.norms])
    return _Sums(first.squares + second.squares, fourth, norms)


def _partial_loss(
    model: FunctionalModel, indices: Sequence[int], per_sample_loss: PerSampleLoss
) -> Callable[[tuple[Tensor, ...], Tensor, Tensor], Tensor]:
    """One sample's loss as a function of the parameters ``indices`` only."""

    def loss(sub: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
        params = list(model.params)
        for i, p in zip(indices, sub, strict=True):
            params[i] = p
        outputs = model.outputs(params, x.unsqueeze(0))
        return per_sample_loss(outputs, y.unsqueeze(0))[0]

    return loss


def _split_fallback(
    q: Tensor, sub: Sequence[Tensor], indices: Sequence[int], fourth: bool
) -> dict[int, _Sums]:
    pieces = torch.split(q, [p.numel() for p in sub], dim=1)
    return {
        i: _Sums(
            piece.sum(dim=0).reshape(p.shape),
            piece.square().sum(dim=0).reshape(p.shape) if fourth else None,
            piece.sum(dim=1),
        )
        for i, p, piece in zip(indices, sub, pieces, strict=True)
    }


def _assemble(
    model: FunctionalModel,
    pieces: Mapping[int, _Sums],
    fallback: Sequence[int],
    fourth: bool,
) -> GradientPowerSums:
    order = [pieces[i] for i in range(len(model.params))]
    return GradientPowerSums(
        squares=torch.cat([s.squares.reshape(-1) for s in order]),
        fourth_powers=(
            torch.cat([s.fourth.reshape(-1) for s in order]) if fourth else None
        ),
        sample_sq_norms=torch.stack([s.norms for s in order], dim=1),
        fallback=tuple(model.names[i] for i in fallback),
    )


# --------------------------------------------------------------------- Fisher
def fisher_sumsq(
    model: FunctionalModel | nn.Module,
    inputs: Tensor,
    targets: Tensor,
    likelihood: Likelihood,
    kind: str = "empirical",
    *,
    mc_samples: int = 1,
    probes: ProbeSource | None = None,
    reducer: Reducer | None = None,
    segments: Mapping[str, slice] | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    coordinate_stderr: bool = True,
) -> Estimate:
    r"""The empirical or Monte-Carlo Fisher diagonal from sums of squares.

    The same estimate as :func:`~curvlightning.core.fisher.fisher_diagonal` with
    ``kind="empirical"`` or ``"mc"`` (same sampled labels, same standard errors,
    same reduction over ranks), computed by :func:`gradient_power_sums`: the term
    of sample n is ``c q_n / S`` with ``q_n = sum_s g_n(y_ns)^2`` and the loss
    scale ``c``; its sum over the batch is ``c/S sum_n q_n`` and the sum of its
    squares ``(c/S)^2 sum_n q_n^2``. The S labels share one forward pass. A
    segment's per-sample term is the sum of the per-parameter norms it covers.

    Args:
        model: The model (a plain module is wrapped in a ``FunctionalModel``).
        inputs: This rank's inputs, batch size N_r.
        targets: This rank's targets.
        likelihood: The likelihood whose loss the model trains on.
        kind: ``"empirical"`` or ``"mc"``.
        mc_samples: Sampled labels per input for ``"mc"``.
        probes: Seeds the label noise, as in ``fisher_diagonal``.
        reducer: The collectives; ``None`` for a single process.
        segments: Named index ranges made of whole parameter tensors (such as
            per-layer slices), reported in ``parts``.
        memory_budget: Bytes one chunk of Conv2d or fallback work may take.
        coordinate_stderr: Compute the standard error of every coordinate, which
            needs ``sum_n q_n^2`` (one more product per layer); with ``False``
            it is NaN, while the segments keep theirs.

    Returns:
        The diagonal (shape ``(p,)``) with its standard error over samples.

    Raises:
        ValueError: For ``kind="gnb"`` (one backward pass already; use
            ``fisher_diagonal``), or a segment that cuts a parameter tensor.
    """
    check_fisher_kind(kind, mc_samples)
    if kind == "gnb":
        raise ValueError(
            "fisher_sumsq computes kind='empirical' or 'mc', got kind='gnb'; "
            "Gauss-Newton-Bartlett needs no per-sample gradients: use "
            "fisher_diagonal(kind='gnb')"
        )
    model = as_functional(model)
    reducer = reducer or SingleProcess()
    draws = mc_samples if kind == "mc" else 1
    targets = model.cast(targets)

    def target_sets(outputs: Tensor) -> list[Tensor]:
        likelihood.check(outputs, targets)
        if kind == "empirical":
            return [targets]
        noise = _label_noise(
            likelihood, outputs, draws, probes or ProbeSource(), reducer
        )
        return [likelihood.sample(outputs, noise[:, s]) for s in range(draws)]

    sums, outputs = _power_sums(
        model,
        inputs,
        target_sets,
        likelihood.per_sample_loss,
        "sum",
        coordinate_stderr,
        memory_budget,
    )
    factor = likelihood.loss_scale(outputs) / draws
    blocks = sums.sample_sq_norms @ _membership(model, segments or {})
    return _reduced_estimate(sums, blocks, factor, segments or {}, reducer)


def _membership(model: FunctionalModel, segments: Mapping[str, slice]) -> Tensor:
    """A ``(T, G)`` 0/1 matrix: parameter tensor t lies in segment g."""
    bounds, start = [], 0
    for p in model.params:
        bounds.append((start, start + p.numel()))
        start += p.numel()
    matrix = torch.zeros(len(bounds), len(segments), dtype=model.dtype)
    for g, (name, s) in enumerate(segments.items()):
        lo, hi, _ = s.indices(start)
        for t, (a, b) in enumerate(bounds):
            if lo <= a and b <= hi:
                matrix[t, g] = 1.0
            elif a < hi and lo < b:
                raise ValueError(
                    f"segments[{name!r}]={s} cuts parameter {model.names[t]!r} "
                    f"(entries {a}:{b}); the sum-of-squares path has per-sample "
                    "norms per whole parameter tensor: use per-layer segments or "
                    "fisher_diagonal"
                )
    return matrix.to(model.device)


def _reduced_estimate(
    sums: GradientPowerSums,
    blocks: Tensor,
    factor: float,
    segments: Mapping[str, slice],
    reducer: Reducer,
) -> Estimate:
    """The estimate from this rank's sums, reduced over ranks."""
    dim, num_samples = sums.squares.shape[0], blocks.shape[0]
    fourth = sums.fourth_powers
    if fourth is None:  # NaN sums give NaN standard errors
        fourth = torch.full_like(sums.squares, float("nan"))
    packed = torch.cat(
        [
            factor * sums.squares,
            factor * blocks.sum(dim=0),
            factor**2 * fourth,
            factor**2 * blocks.square().sum(dim=0),
            sums.squares.new_tensor([num_samples]),
        ]
    )
    packed = reducer.all_reduce_sum(packed)
    width = dim + blocks.shape[1]
    count = int(packed[-1].item())
    whole = _estimate_from_sums(packed[:width], packed[width : 2 * width], count, 0)
    return _split_parts(whole, dim, segments)
