r"""First-order quantities: per-sample gradients in chunks, the gradient noise scale.

Per-sample gradients ``g_n = d l_n / d theta`` are gradients of each sample's own
loss ``l_n``; with the training loss ``L = (1/N) sum_n l_n`` the batch gradient is
their mean. The *gradient noise scale* (McCandlish et al., 2018) compares the
squared norm of the true gradient ``G = E[g_n]`` with the total variance
``tr(Sigma)`` of one sample's gradient; ``B_simple = tr(Sigma) / |G|^2`` is the
batch size at which the noise of a gradient estimate starts to dominate its signal.
The per-layer *gradient signal-to-noise ratio* is the same comparison inside one
layer, from a set of gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlightning.core.distributed import Reducer
from curvlightning.core.functional import FunctionalModel
from curvlightning.core.operators import per_sample_gradients

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "INTERMEDIATE_FACTOR",
    "NoiseScale",
    "NoiseScaleEMA",
    "as_functional",
    "chunk_size_for_budget",
    "gradient_snr",
    "gradient_snr_from_sums",
    "noise_scale_across_ranks",
    "noise_scale_from_gradients",
    "noise_scale_parts",
    "per_sample_gradients_chunked",
]

#: Default bytes that one chunk of per-sample work may take (256 MiB).
DEFAULT_MEMORY_BUDGET = 2**28

#: Per-sample copies of the gradient that a vmapped chunk holds at once: the
#: per-parameter gradients, their flattened concatenation, and one more for the
#: transient buffers of the backward pass (a weight gradient before it is summed).
INTERMEDIATE_FACTOR = 3

ReduceFn = Callable[[Tensor], Tensor]


def as_functional(model: FunctionalModel | nn.Module) -> FunctionalModel:
    """``model`` itself, or a :class:`FunctionalModel` of a plain ``nn.Module``."""
    if isinstance(model, FunctionalModel):
        return model
    if isinstance(model, nn.Module):
        return FunctionalModel(model)
    raise TypeError(
        f"model must be a FunctionalModel or an nn.Module, got {type(model).__name__}"
    )


def chunk_size_for_budget(
    num_params: int,
    itemsize: int,
    memory_budget: int,
    num_samples: int,
    factor: int = INTERMEDIATE_FACTOR,
) -> int:
    """The number of samples whose gradients fit a memory budget at once.

    One sample's work is taken to need ``factor * num_params * itemsize`` bytes, so
    the chunk is ``memory_budget // (factor * num_params * itemsize)`` samples,
    capped at ``num_samples``. Activations are not counted: they scale with the
    chunk too, but are small next to ``p`` for most models.

    Args:
        num_params: The number p of parameters differentiated.
        itemsize: Bytes per number (8 for float64).
        memory_budget: Bytes one chunk may take.
        num_samples: The number N of samples; the chunk never exceeds it.
        factor: Copies of one gradient held per sample.

    Returns:
        The chunk size, between 1 and ``num_samples``.

    Raises:
        TypeError: If ``memory_budget`` is not an int.
        ValueError: If ``memory_budget`` cannot hold one sample.
    """
    per_sample = factor * num_params * itemsize
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int):
        raise TypeError(f"memory_budget must be an int (bytes), got {memory_budget!r}")
    if memory_budget < per_sample:
        raise ValueError(
            f"memory_budget={memory_budget} bytes cannot hold one sample's gradient "
            f"(needs {factor} x {num_params} numbers x {itemsize} bytes = "
            f"{per_sample} bytes); raise memory_budget to at least {per_sample}"
        )
    return max(1, min(num_samples, memory_budget // per_sample))


def per_sample_gradients_chunked(
    model: FunctionalModel | nn.Module,
    inputs: Tensor,
    targets: Tensor,
    per_sample_loss: Callable[[Tensor, Tensor], Tensor],
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    reduce_fn: ReduceFn | None = None,
) -> Tensor:
    r"""Per-sample gradients computed in chunks that fit a memory budget.

    Row ``n`` is ``g_n = d l_n / d theta``, the gradient of sample n's own loss
    ``l_n = per_sample_loss(f(x_n), y_n)`` (see
    :func:`~curvlightning.core.operators.per_sample_gradients`). Hence the batch
    gradient of a loss with ``reduction="mean"`` is ``(1/N) sum_n g_n`` and that of
    ``reduction="sum"`` is ``sum_n g_n``. The chunk size is
    :func:`chunk_size_for_budget` with :data:`INTERMEDIATE_FACTOR`.

    With ``reduce_fn`` the ``(N, p)`` matrix is never held: each chunk of rows
    ``(n_c, p)`` is passed to ``reduce_fn``, which must be additive over rows (a
    sum over the chunk, such as ``lambda g: (g * g).sum(0)`` for the sum of
    squared gradients), and the chunk results are summed.

    Args:
        model: The model (a plain module is wrapped in a ``FunctionalModel``).
        inputs: Inputs of shape ``(N, ...)``.
        targets: Targets with leading dimension N.
        per_sample_loss: Maps ``(outputs, targets)`` of a batch to losses ``(N,)``.
        memory_budget: Bytes that one chunk's gradients may take.
        reduce_fn: Maps a chunk of gradients ``(n_c, p)`` to a tensor; the results
            of the chunks are summed.

    Returns:
        The gradients ``(N, p)``, or the sum of ``reduce_fn`` over the chunks.

    Warning:
        Without ``reduce_fn`` the returned matrix itself (``N p`` numbers) is not
        counted in the budget. With dropout every chunk restarts the pinned RNG.
    """
    model = as_functional(model)
    num_samples = inputs.shape[0]
    itemsize = torch.finfo(model.dtype).bits // 8
    chunk = chunk_size_for_budget(
        model.num_params, itemsize, memory_budget, num_samples
    )
    if reduce_fn is None:
        return per_sample_gradients(
            model, inputs, targets, per_sample_loss, chunk_size=chunk
        )
    total: Tensor | None = None
    for start in range(0, num_samples, chunk):
        rows = slice(start, start + chunk)
        grads = per_sample_gradients(
            model, inputs[rows], targets[rows], per_sample_loss
        )
        part = reduce_fn(grads)
        total = part if total is None else total + part
    return total


# --------------------------------------------------------------- gradient noise scale
@dataclass(frozen=True)
class NoiseScale:
    r"""One draw of the unbiased parts of the gradient noise scale.

    Attributes:
        sq_norm: The estimate of ``|G|^2`` (may be negative on one draw).
        trace_sigma: The estimate of ``tr(Sigma)``, the summed variance of one
            sample's gradient.
        batch_small: The small batch size ``B_small``.
        batch_big: The big batch size ``B_big``.
    """

    sq_norm: Tensor
    trace_sigma: Tensor
    batch_small: float
    batch_big: float

    @property
    def b_simple(self) -> Tensor:
        """``B_simple = tr(Sigma) / |G|^2`` from this draw alone (noisy)."""
        return self.trace_sigma / self.sq_norm


def noise_scale_parts(
    sq_norm_small: Tensor | float,
    sq_norm_big: Tensor | float,
    batch_small: float,
    batch_big: float,
) -> NoiseScale:
    r"""Unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` from two batch sizes.

    A gradient averaged over B independent samples has
    ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``. Two batch sizes give two equations and
    the unbiased estimators of McCandlish et al. (2018), appendix A.1:

    .. math::
        |G|^2 \approx \frac{B_{big} |G_{big}|^2 - B_{small} |G_{small}|^2}
        {B_{big} - B_{small}}, \qquad
        \operatorname{tr}(\Sigma) \approx \frac{|G_{small}|^2 - |G_{big}|^2}
        {1/B_{small} - 1/B_{big}}.

    Args:
        sq_norm_small: ``|G_small|^2``: the mean over ranks or micro-batches of the
            squared norms of their gradients, each at batch ``batch_small``.
        sq_norm_big: ``|G_big|^2``: the squared norm of the gradient at
            ``batch_big``.
        batch_small: ``B_small`` (the harmonic mean of unequal micro-batch sizes).
        batch_big: ``B_big``, larger than ``B_small``.

    Returns:
        The two estimates.

    Raises:
        ValueError: If ``batch_small`` is not positive or not below ``batch_big``.
    """
    if not 0 < batch_small < batch_big:
        raise ValueError(
            f"batch sizes must satisfy 0 < batch_small < batch_big, got "
            f"batch_small={batch_small}, batch_big={batch_big}: the noise scale "
            "needs gradients at two different batch sizes"
        )
    small = torch.as_tensor(sq_norm_small)
    big = torch.as_tensor(sq_norm_big)
    sq_norm = (batch_big * big - batch_small * small) / (batch_big - batch_small)
    trace_sigma = (small - big) / (1.0 / batch_small - 1.0 / batch_big)
    return NoiseScale(sq_norm, trace_sigma, float(batch_small), float(batch_big))


def noise_scale_from_gradients(
    local_grads: Sequence[Tensor], batch_sizes: Sequence[int]
) -> NoiseScale:
    r"""The noise-scale parts from gradients of M disjoint micro-batches.

    Micro-batch i holds ``b_i`` samples and has the mean gradient ``g_i``. The big
    gradient is their sample-weighted mean ``G_big = sum_i b_i g_i / sum_i b_i``
    at ``B_big = sum_i b_i``; ``|G_small|^2 = (1/M) sum_i |g_i|^2``, whose
    expectation is ``|G|^2 + tr(Sigma) mean_i(1/b_i)``, so ``B_small`` is the
    harmonic mean of the ``b_i``. Both estimates are then exactly unbiased for
    unequal sizes too (the paper takes equal ones). Per-sample gradients are the
    case ``b_i = 1``.

    Args:
        local_grads: M >= 2 flat gradients of shape ``(p,)``, each the mean over
            its micro-batch.
        batch_sizes: The M micro-batch sizes.

    Returns:
        The two estimates.

    Raises:
        ValueError: With fewer than two micro-batches, a length mismatch or a
            non-positive size.
    """
    sizes = _check_micro_batches(local_grads, batch_sizes)
    grads = torch.stack([g.reshape(-1) for g in local_grads])
    weights = torch.tensor(sizes, dtype=grads.dtype, device=grads.device)
    small = (grads * grads).sum(dim=1).mean()
    big = (weights @ grads) / weights.sum()
    batch_small = len(sizes) / sum(1.0 / b for b in sizes)
    return noise_scale_parts(small, big @ big, batch_small, float(sum(sizes)))


def _check_micro_batches(
    local_grads: Sequence[Tensor], batch_sizes: Sequence[int]
) -> list[int]:
    sizes = [int(b) for b in batch_sizes]
    if len(local_grads) != len(sizes):
        raise ValueError(
            f"local_grads has {len(local_grads)} gradients but batch_sizes has "
            f"{len(sizes)} sizes; pass one size per gradient"
        )
    if len(sizes) < 2:
        raise ValueError(
            f"the noise scale needs at least 2 micro-batches, got {len(sizes)}; "
            "split the batch or pass per-sample gradients with batch size 1"
        )
    if min(sizes) <= 0:
        raise ValueError(f"batch_sizes must be positive, got {sizes}")
    return sizes


def noise_scale_across_ranks(
    local_grad: Tensor, local_batch_size: int, reducer: Reducer
) -> NoiseScale:
    r"""The noise-scale parts from each rank's local gradient.

    Rank r holds the mean gradient ``g_r`` of its ``b_r`` samples. One all-reduce
    of three numbers gives ``|G_small|^2 = (1/R) sum_r |g_r|^2`` and the harmonic
    mean ``B_small``; one of p numbers gives the global gradient
    ``sum_r b_r g_r / sum_r b_r`` at ``B_big = sum_r b_r``. Equal to
    :func:`noise_scale_from_gradients` on the R local gradients.

    Args:
        local_grad: This rank's flat gradient ``(p,)`` before any all-reduce.
        local_batch_size: This rank's number of samples ``b_r``.
        reducer: The collectives; needs at least two ranks.

    Returns:
        The same two estimates on every rank.

    Raises:
        ValueError: With one rank, or a non-positive local batch size.
    """
    if reducer.world_size < 2:
        raise ValueError(
            f"noise_scale_across_ranks needs at least 2 ranks, got "
            f"world_size={reducer.world_size}; use noise_scale_from_gradients on "
            "micro-batches in a single process"
        )
    if local_batch_size <= 0:
        raise ValueError(f"local_batch_size must be positive, got {local_batch_size}")
    flat = local_grad.reshape(-1)
    counts = flat.new_tensor([1.0 / local_batch_size, float(local_batch_size)])
    stats = torch.cat([(flat @ flat).reshape(1), counts])
    sums = reducer.all_reduce_sum(stats)
    big = reducer.weighted_mean(flat, local_batch_size)
    world = reducer.world_size
    return noise_scale_parts(
        sums[0] / world, big @ big, world / float(sums[1]), float(sums[2])
    )


class NoiseScaleEMA:
    r"""Exponential moving averages of the noise-scale parts, and ``B_simple``.

    The parts are averaged separately, ``m_t = beta m_{t-1} + (1 - beta) x_t``,
    and reported with Adam's bias correction ``m_t / (1 - beta^t)``; the noise
    scale is the ratio of the averages,
    ``B_simple = EMA[tr(Sigma)] / EMA[|G|^2]``, as McCandlish et al. (2018)
    recommend: the ratio of one draw is biased and heavy-tailed. Non-finite draws
    are skipped and counted.

    Args:
        beta: Decay of the averages, in ``[0, 1)``.

    Raises:
        ValueError: If ``beta`` is out of range.
    """

    def __init__(self, beta: float = 0.99) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.step = 0
        self.num_skipped = 0
        self._sq_norm = 0.0
        self._trace_sigma = 0.0

    def update(self, sq_norm: Tensor | float, trace_sigma: Tensor | float) -> bool:
        """Fold one draw of ``|G|^2`` and ``tr(Sigma)`` into the averages.

        Returns:
            Whether the draw was used (False when either part is not finite).
        """
        sq_norm, trace_sigma = float(sq_norm), float(trace_sigma)
        if not (math.isfinite(sq_norm) and math.isfinite(trace_sigma)):
            self.num_skipped += 1
            return False
        self.step += 1
        self._sq_norm = self.beta * self._sq_norm + (1 - self.beta) * sq_norm
        self._trace_sigma = (
            self.beta * self._trace_sigma + (1 - self.beta) * trace_sigma
        )
        return True

    def _corrected(self, value: float) -> float:
        if self.step == 0:
            return math.nan
        return value / (1.0 - self.beta**self.step)

    @property
    def sq_norm(self) -> float:
        """The bias-corrected average of ``|G|^2`` (NaN before any update)."""
        return self._corrected(self._sq_norm)

    @property
    def trace_sigma(self) -> float:
        """The bias-corrected average of ``tr(Sigma)`` (NaN before any update)."""
        return self._corrected(self._trace_sigma)

    @property
    def b_simple(self) -> float:
        """``EMA[tr(Sigma)] / EMA[|G|^2]`` (NaN before any update or at zero)."""
        if self.step == 0 or self._sq_norm == 0:
            return math.nan
        return self._trace_sigma / self._sq_norm

    def state_dict(self) -> dict[str, Any]:
        """The averages, the step count and the number of skipped draws."""
        return {
            "beta": self.beta,
            "step": self.step,
            "num_skipped": self.num_skipped,
            "sq_norm": self._sq_norm,
            "trace_sigma": self._trace_sigma,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            KeyError: If ``state`` lacks one of the keys.
        """
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise KeyError(
                f"NoiseScaleEMA state lacks {missing}; pass a dict saved by "
                "NoiseScaleEMA.state_dict"
            )
        self.beta = float(state["beta"])
        self.step = int(state["step"])
        self.num_skipped = int(state["num_skipped"])
        self._sq_norm = float(state["sq_norm"])
        self._trace_sigma = float(state["trace_sigma"])


# ------------------------------------------------------------ signal-to-noise ratio
def gradient_snr_from_sums(
    grad_sum: Tensor,
    sq_sum: Tensor,
    count: int,
    segments: Mapping[str, slice] | None = None,
    *,
    debias: bool = False,
) -> dict[str, Tensor]:
    r"""Per-layer gradient signal-to-noise ratios from sums over M gradients.

    With ``m = (1/M) sum_i g_i`` and the unbiased variance
    ``tr(Var g)[s] = (sum_i |g_i[s]|^2 - M |m[s]|^2) / (M - 1)`` over the
    coordinates ``s`` of a layer, the ratio is ``|m[s]|^2 / tr(Var g)[s]``. From
    per-sample gradients it is the ratio of one sample's gradient; from
    micro-batch gradients of size b, that of a batch of b. ``|m|^2`` overestimates
    ``|E g|^2`` by ``tr(Var g) / M``; ``debias=True`` subtracts it (the ratio can
    then be negative).

    Args:
        grad_sum: ``sum_i g_i``, shape ``(p,)``.
        sq_sum: ``sum_i g_i^2`` (elementwise), shape ``(p,)``.
        count: The number M >= 2 of gradients.
        segments: Named index ranges (layers); ``None``: one range ``"all"``.
        debias: Subtract the bias of ``|m|^2``.

    Returns:
        The ratio (a scalar tensor) per segment; NaN or inf where a layer's
        gradients do not vary.

    Raises:
        ValueError: If ``count < 2``.
    """
    if count < 2:
        raise ValueError(
            f"the gradient signal-to-noise ratio needs count >= 2 gradients, got "
            f"{count}; a variance needs at least two"
        )
    segments = dict(segments or {"all": slice(0, grad_sum.shape[0])})
    mean = grad_sum / count
    out = {}
    for name, s in segments.items():
        signal = mean[s] @ mean[s]
        noise = (sq_sum[s].sum() - count * signal) / (count - 1)
        if debias:
            signal = signal - noise / count
        out[name] = signal / noise
    return out


def gradient_snr(
    grads: Tensor,
    segments: Mapping[str, slice] | None = None,
    *,
    debias: bool = False,
) -> dict[str, Tensor]:
    """Per-layer gradient signal-to-noise ratios of the rows of ``grads``.

    See :func:`gradient_snr_from_sums`.

    Args:
        grads: M per-sample or per-micro-batch gradients, shape ``(M, p)``.
        segments: Named index ranges (layers); ``None``: one range ``"all"``.
        debias: Subtract the bias of the squared mean.

    Returns:
        The ratio per segment.
    """
    return gradient_snr_from_sums(
        grads.sum(dim=0),
        (grads * grads).sum(dim=0),
        grads.shape[0],
        segments,
        debias=debias,
    )
