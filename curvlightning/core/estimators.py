"""Stochastic estimators built on matrix-vector products.

Every estimator takes a *matvec* (a function ``v -> A v`` on vectors of shape ``(p,)``)
and a :class:`~curvlightning.core.probes.ProbeSource`, and returns an
:class:`Estimate`: the value, its standard error and the number of matvecs spent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvlightning.core.distributed import Reducer
from curvlightning.core.probes import ProbeSource

__all__ = [
    "Estimate",
    "check_num_probes",
    "exact_estimate",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "mean_and_stderr",
    "reduce_estimate",
]

Matvec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate.

    Attributes:
        value: The estimate: a scalar, or a vector (a diagonal of shape ``(p,)``).
        stderr: Its standard error, shaped like ``value``: the standard deviation of
            the per-sample terms over ``sqrt(num_samples)``; NaN from one sample.
        num_matvecs: Matrix-vector products spent (summed over ranks).
        num_samples: Independent terms averaged (probes, or data samples).
        parts: Estimates of parts of the quantity (per layer), keyed by name.
    """

    value: Tensor
    stderr: Tensor
    num_matvecs: int
    num_samples: int
    parts: Mapping[str, Estimate] = field(default_factory=dict)

    def item(self) -> float:
        """The value of a scalar estimate as a float."""
        return float(self.value)


def exact_estimate(value: Tensor | float, num_samples: int = 0) -> Estimate:
    """A value without a sampling error (NaN stderr, no matvecs).

    For deterministic quantities logged beside estimates: distances between two
    estimates, norms of reduced vectors, the outcome of an optimizer step.
    """
    value = torch.as_tensor(value).detach()
    return Estimate(value, torch.full_like(value, float("nan")), 0, num_samples)


def check_num_probes(num_probes: int, name: str = "num_probes") -> int:
    """Validate a positive probe count and return it."""
    if isinstance(num_probes, bool) or not isinstance(num_probes, int):
        raise TypeError(f"{name} must be an int, got {num_probes!r}")
    if num_probes <= 0:
        raise ValueError(
            f"{name} must be a positive number of probes, got {num_probes}; use at "
            "least 1 (16 or more gives a useful standard error)"
        )
    return num_probes


def mean_and_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over the first dimension and its standard error (NaN for one row)."""
    n = samples.shape[0]
    mean = samples.mean(dim=0)
    if n < 2:
        return mean, torch.full_like(mean, float("nan"))
    return mean, samples.std(dim=0, correction=1) / n**0.5


def hutchinson_trace(
    matvec: Matvec,
    dim: int,
    probes: ProbeSource,
    num_probes: int,
    *,
    segments: Mapping[str, slice] | None = None,
    reduce_samples: Callable[[Tensor], Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Estimate:
    r"""Hutchinson's estimate of ``trace(A)``.

    .. math::
        \widehat{\operatorname{tr}}(A) = \frac{1}{n} \sum_{i=1}^{n} v_i^\top A v_i,
        \qquad \mathbb{E}[v v^\top] = I,

    unbiased for any square ``A``, with variance ``2 (||A||_F^2 - sum_i A_ii^2) / n``
    for Rademacher probes (exact when ``A`` is diagonal) and ``2 ||A||_F^2 / n`` for
    Gaussian ones (symmetric ``A``). The trace of a block ``A[s, s]`` is estimated
    from the same probes as ``v_i[s]^T (A v_i)[s]``.

    Args:
        matvec: ``v -> A v`` on vectors of shape ``(dim,)``.
        dim: The dimension p.
        probes: The probe source.
        num_probes: Number n of probes, at least 1.
        segments: Named index ranges whose block traces are reported in ``parts``.
        reduce_samples: Applied to the ``(n, 1 + len(segments))`` matrix of
            per-probe terms before the statistics (a weighted mean over ranks when
            all ranks share probes).
        dtype: Probe dtype.
        device: Probe device.

    Returns:
        The estimate, with the block traces in ``parts``.
    """
    check_num_probes(num_probes)
    segments = dict(segments or {})
    gen = probes.generator()
    rows = []
    for _ in range(num_probes):
        v = probes.draw(1, dim, dtype=dtype, device=device, generator=gen)[0]
        product = v * matvec(v)
        rows.append(
            torch.stack([product.sum()] + [product[s].sum() for s in segments.values()])
        )
    samples = torch.stack(rows)
    if reduce_samples is not None:
        samples = reduce_samples(samples)
    mean, stderr = mean_and_stderr(samples)
    parts = {
        name: Estimate(mean[j + 1], stderr[j + 1], num_probes, num_probes)
        for j, name in enumerate(segments)
    }
    return Estimate(mean[0], stderr[0], num_probes, num_probes, parts)


def hutchinson_diagonal(
    matvec: Matvec,
    dim: int,
    probes: ProbeSource,
    num_probes: int,
    *,
    reduce_samples: Callable[[Tensor], Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Estimate:
    r"""Hutchinson's estimate of ``diag(A)`` (Bekas et al., 2007).

    .. math::
        \widehat{\operatorname{diag}}(A) = \frac{1}{n} \sum_{i=1}^{n} v_i \odot A v_i,

    unbiased; with Rademacher probes coordinate ``j`` has variance
    ``sum_{k != j} A_jk^2 / n`` (zero for a diagonal ``A``).

    Args:
        matvec: ``v -> A v`` on vectors of shape ``(dim,)``.
        dim: The dimension p.
        probes: The probe source.
        num_probes: Number n of probes, at least 1.
        reduce_samples: Applied to each probe's term ``v * A v`` (shape ``(p,)``)
            before the statistics (a weighted mean over ranks with shared probes).
        dtype: Probe dtype.
        device: Probe device.

    Returns:
        The estimate, value and stderr of shape ``(p,)``.
    """
    check_num_probes(num_probes)
    gen = probes.generator()
    total = torch.zeros(dim, dtype=dtype, device=device)
    total_sq = torch.zeros_like(total)
    for _ in range(num_probes):
        v = probes.draw(1, dim, dtype=dtype, device=device, generator=gen)[0]
        term = v * matvec(v)
        if reduce_samples is not None:
            term = reduce_samples(term)
        total += term
        total_sq += term * term
    return _estimate_from_sums(total, total_sq, num_probes, num_probes)


def _estimate_from_sums(
    total: Tensor, total_sq: Tensor, count: int, num_matvecs: int
) -> Estimate:
    """Mean and standard error from the sum and sum of squares of ``count`` terms."""
    mean = total / count
    if count < 2:
        stderr = torch.full_like(mean, float("nan"))
    else:
        var = (total_sq - count * mean * mean).clamp_min(0) / (count - 1)
        stderr = (var / count).sqrt()
    return Estimate(mean, stderr, num_matvecs, count)


def reduce_estimate(estimate: Estimate, reducer: Reducer, weight: float) -> Estimate:
    r"""Combine per-rank estimates drawn with independent probes.

    With rank weights ``w_r`` (local sample counts) the combined value is
    ``sum_r w_r x_r / W`` and, the ranks being independent, its standard error is
    ``sqrt(sum_r w_r^2 s_r^2) / W`` with ``W = sum_r w_r``: about ``s / sqrt(R)``
    for R ranks of equal weight. Matvecs and samples are summed over ranks.

    Args:
        estimate: This rank's estimate.
        reducer: The collectives.
        weight: This rank's weight.

    Returns:
        The same combined estimate on every rank.
    """
    if reducer.world_size == 1:
        return estimate
    names = list(estimate.parts)
    values = torch.stack(
        [estimate.value.reshape(-1)]
        + [estimate.parts[n].value.reshape(-1) for n in names]
    )
    errors = torch.stack(
        [estimate.stderr.reshape(-1)]
        + [estimate.parts[n].stderr.reshape(-1) for n in names]
    )
    counts = torch.tensor([weight, estimate.num_matvecs, estimate.num_samples])
    packed = torch.cat(
        [
            (values * weight).flatten(),
            ((errors * weight) ** 2).flatten(),
            counts.to(values),
        ]
    )
    packed = reducer.all_reduce_sum(packed)
    size = values.numel()
    total_weight, matvecs, samples = packed[2 * size :].tolist()
    value = (packed[:size] / total_weight).reshape(values.shape)
    stderr = (packed[size : 2 * size].sqrt() / total_weight).reshape(values.shape)
    shape = estimate.value.shape

    def make(j: int, parts: Mapping[str, Estimate]) -> Estimate:
        return Estimate(
            value[j].reshape(shape),
            stderr[j].reshape(shape),
            int(matvecs),
            int(samples),
            parts,
        )

    parts = {n: make(j + 1, {}) for j, n in enumerate(names)}
    return make(0, parts)
