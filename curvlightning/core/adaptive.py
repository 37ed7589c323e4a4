"""Hutchinson estimators that draw probes until a relative tolerance is met.

The stopping rule compares the standard error with the *magnitude* of the estimate:
a test against the signed value would never stop on a matrix with a negative trace
(an indefinite Hessian near a saddle point) and would spend the whole budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from curvlightning.core.estimators import Estimate, check_num_probes, mean_and_stderr
from curvlightning.core.probes import ProbeSource

__all__ = [
    "check_stopping",
    "hutchinson_diagonal_adaptive",
    "hutchinson_trace_adaptive",
]

Matvec = Callable[[Tensor], Tensor]


def check_stopping(rtol: float, min_probes: int, max_matvecs: int) -> None:
    """Validate the arguments of the adaptive estimators.

    Raises:
        TypeError: If ``rtol`` is not a real number or a count is not an int.
        ValueError: If ``rtol`` is not positive and finite, ``min_probes < 2`` or
            ``max_matvecs < min_probes``.
    """
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)):
        raise TypeError(f"rtol must be a float, got {rtol!r}")
    if not (math.isfinite(rtol) and rtol > 0):
        raise ValueError(
            f"rtol must be a positive finite relative tolerance, got {rtol}; "
            "e.g. rtol=0.05 stops at a standard error of 5% of |value|"
        )
    check_num_probes(min_probes, "min_probes")
    if min_probes < 2:
        raise ValueError(
            f"min_probes must be at least 2 (a standard error needs two probes), "
            f"got {min_probes}"
        )
    check_num_probes(max_matvecs, "max_matvecs")
    if max_matvecs < min_probes:
        raise ValueError(
            f"max_matvecs={max_matvecs} is below min_probes={min_probes}: raise "
            "max_matvecs or lower min_probes"
        )


def hutchinson_trace_adaptive(
    matvec: Matvec,
    dim: int,
    probes: ProbeSource,
    *,
    rtol: float = 0.05,
    min_probes: int = 8,
    max_matvecs: int = 256,
    reduce_sample: Callable[[Tensor], Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Estimate:
    r"""Hutchinson's trace estimate with as many probes as a tolerance needs.

    Draws probes ``v_i`` one at a time and after each computes the running
    estimate ``t_n = (1/n) sum_i v_i^T A v_i`` and its standard error ``s_n``; it
    stops at the first ``n >= min_probes`` with

    .. math::
        s_n \le \mathrm{rtol} \cdot |t_n|,

    or at ``n = max_matvecs``. The probes are those of
    :func:`~curvlightning.core.estimators.hutchinson_trace` on the same source, so
    the result equals ``hutchinson_trace(..., num_probes=n)``.

    Args:
        matvec: ``v -> A v`` on vectors of shape ``(dim,)``.
        dim: The dimension p.
        probes: The probe source.
        rtol: Relative tolerance on the standard error, positive.
        min_probes: Probes drawn before the rule is tested, at least 2.
        max_matvecs: The budget: at most this many probes (one matvec each).
        reduce_sample: Applied to each probe's term ``v^T A v`` (a scalar tensor)
            before it enters the statistics, e.g. a weighted mean over ranks that
            share probes; every rank then sees the same terms and stops at the same
            count.
        dtype: Probe dtype.
        device: Probe device.

    Returns:
        The estimate after n probes (``num_matvecs = num_samples = n``). It met the
        tolerance iff ``stderr <= rtol * |value|``; otherwise ``n = max_matvecs``.

    Raises:
        TypeError: If ``rtol`` is not a real number or a count is not an int.
        ValueError: If ``rtol`` is not positive and finite, ``min_probes < 2`` or
            ``max_matvecs < min_probes``.

    Warning:
        With independent probes on each rank and no ``reduce_sample``, ranks stop
        at different counts; that is fine for a rank-local matvec (combine with
        :func:`~curvlightning.core.estimators.reduce_estimate`), but a matvec that
        communicates would then hang.
    """
    check_stopping(rtol, min_probes, max_matvecs)
    gen = probes.generator()
    terms: list[Tensor] = []
    while True:
        v = probes.draw(1, dim, dtype=dtype, device=device, generator=gen)[0]
        term = (v * matvec(v)).sum()
        terms.append(term if reduce_sample is None else reduce_sample(term))
        mean, stderr = mean_and_stderr(torch.stack(terms))
        n = len(terms)
        if n >= max_matvecs or (n >= min_probes and stderr <= rtol * mean.abs()):
            return Estimate(mean, stderr, n, n)


def hutchinson_diagonal_adaptive(
    matvec: Matvec,
    dim: int,
    probes: ProbeSource,
    *,
    rtol: float = 0.1,
    min_probes: int = 8,
    max_matvecs: int = 256,
    reduce_sample: Callable[[Tensor], Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Estimate:
    r"""Hutchinson's diagonal estimate with as many probes as a tolerance needs.

    The running estimate ``d_n = (1/n) sum_i v_i * A v_i`` (shape ``(p,)``) and its
    coordinate-wise standard error ``s_n`` are updated with Welford's recurrence
    (``O(p)`` memory); drawing stops at the first ``n >= min_probes`` with

    .. math::
        \|s_n\|_2 \le \mathrm{rtol} \cdot \|d_n\|_2,

    or at ``n = max_matvecs``. The probes are those of
    :func:`~curvlightning.core.estimators.hutchinson_diagonal` on the same source.

    Args:
        matvec: ``v -> A v`` on vectors of shape ``(dim,)``.
        dim: The dimension p.
        probes: The probe source.
        rtol: Relative tolerance on the norm of the standard error, positive.
        min_probes: Probes drawn before the rule is tested, at least 2.
        max_matvecs: The budget: at most this many probes (one matvec each).
        reduce_sample: Applied to each probe's term ``v * A v`` (shape ``(p,)``)
            before it enters the statistics (a weighted mean over ranks that share
            probes).
        dtype: Probe dtype.
        device: Probe device.

    Returns:
        The estimate after n probes, value and stderr of shape ``(p,)``. It met the
        tolerance iff ``||stderr|| <= rtol * ||value||``.

    Raises:
        TypeError: If ``rtol`` is not a real number or a count is not an int.
        ValueError: If ``rtol`` is not positive and finite, ``min_probes < 2`` or
            ``max_matvecs < min_probes``.

    Warning:
        The rule bounds the error of the diagonal as a whole: coordinates much
        smaller than the norm of the diagonal can keep a large relative error.
    """
    check_stopping(rtol, min_probes, max_matvecs)
    gen = probes.generator()
    mean = torch.zeros(dim, dtype=dtype, device=device)
    sum_sq_dev = torch.zeros_like(mean)
    n = 0
    while True:
        v = probes.draw(1, dim, dtype=dtype, device=device, generator=gen)[0]
        term = v * matvec(v).to(dtype)
        if reduce_sample is not None:
            term = reduce_sample(term)
        n += 1
        delta = term - mean
        mean = mean + delta / n
        sum_sq_dev = sum_sq_dev + delta * (term - mean)
        if n < min_probes:
            continue
        stderr = (sum_sq_dev / ((n - 1) * n)).sqrt()
        norm = torch.linalg.vector_norm
        if n >= max_matvecs or norm(stderr) <= rtol * norm(mean):
            return Estimate(mean, stderr, n, n)
