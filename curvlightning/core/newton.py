r"""Damped Newton steps by conjugate gradients on curvature-vector products.

Newton's step ``s = -(H + lambda I)^{-1} g`` minimises the damped local quadratic
model ``m(s) = g^T s + (1/2) s^T H s + (lambda/2) ||s||^2`` of the loss. It is
found by conjugate gradients (CG) on the products ``v -> H v``, without forming
``H``; CG needs a positive definite operator, so it checks the curvature of every
search direction and stops when it is not positive.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CGResult",
    "NewtonStep",
    "conjugate_gradient",
    "newton_direction",
    "quadratic_model_change",
]

Matvec = Callable[[Tensor], Tensor]
Reduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class CGResult:
    """The output of :func:`conjugate_gradient`.

    Attributes:
        solution: The last iterate x, shape ``(p,)``.
        num_matvecs: Products with ``A`` spent (one per iteration).
        num_iters: CG iterations run.
        residual_norm: ``||b - (A + lambda I) x||`` by the CG recurrence.
        converged: True if ``residual_norm <= rtol * ||b||``.
        negative_curvature: True if CG stopped at a direction ``d`` with
            ``d^T (A + lambda I) d <= 0``.
        curvature_direction: That direction (shape ``(p,)``), else ``None``.
    """

    solution: Tensor
    num_matvecs: int
    num_iters: int
    residual_norm: float
    converged: bool
    negative_curvature: bool
    curvature_direction: Tensor | None = None


@dataclass(frozen=True)
class NewtonStep:
    """The output of :func:`newton_direction`.

    Attributes:
        direction: The step ``s ~ -(H + lambda I)^{-1} g``, shape ``(p,)``.
        num_matvecs: Products with ``H`` spent.
        residual_norm: ``||(H + lambda I) s + g||`` by the CG recurrence.
        converged: True if ``residual_norm <= rtol * ||g||``.
        negative_curvature: True if ``H + lambda I`` showed a direction of
            non-positive curvature; ``direction`` is then the last CG iterate.
        curvature_direction: That direction, else ``None``.
    """

    direction: Tensor
    num_matvecs: int
    residual_norm: float
    converged: bool
    negative_curvature: bool
    curvature_direction: Tensor | None = None


def conjugate_gradient(
    matvec: Matvec,
    rhs: Tensor,
    damping: float = 0.0,
    max_iters: int | None = None,
    rtol: float = 1e-6,
    *,
    reduce: Reduce | None = None,
) -> CGResult:
    r"""Solve ``(A + lambda I) x = b`` by conjugate gradients from ``x_0 = 0``.

    Hestenes and Stiefel (1952): with ``r_0 = d_0 = b``,

    .. math::
        a_i = \frac{r_i^\top r_i}{d_i^\top (A + \lambda I) d_i}, \quad
        x_{i+1} = x_i + a_i d_i, \quad
        r_{i+1} = r_i - a_i (A + \lambda I) d_i, \quad
        d_{i+1} = r_{i+1} + \frac{r_{i+1}^\top r_{i+1}}{r_i^\top r_i} d_i.

    For symmetric positive definite ``A + lambda I`` the iterate ``x_i`` minimises
    the quadratic ``(1/2) x^T (A + lambda I) x - b^T x`` over the Krylov space
    of dimension i, and the exact solution is reached in at most p iterations.
    CG stops when ``||r|| <= rtol * ||b||``, after ``max_iters`` iterations, or when
    a direction has ``d_i^T (A + lambda I) d_i <= 0`` (then the quadratic is
    unbounded below along ``d_i``; the iterate ``x_i`` is returned unchanged,
    Steihaug's rule).

    Args:
        matvec: ``v -> A v`` on vectors of shape ``(p,)``; ``A`` symmetric.
        rhs: The right-hand side b, shape ``(p,)``.
        damping: lambda, at least 0; it adds ``lambda ||d||^2`` to every curvature.
        max_iters: Iteration cap (one matvec each), at least 1; ``None`` means
            ``10 p`` (p the length of ``rhs``), as in SciPy: rounding delays the
            exact-arithmetic end at p iterations (a 40 x 40 system of condition
            100 needs 55 for ``rtol=1e-12`` in float64).
        rtol: Relative tolerance on the residual, positive.
        reduce: Sums over ranks when each rank holds a shard of the vectors
            (``Reducer.all_reduce_sum``); ``None`` when vectors are whole.

    Returns:
        The solution and how CG ended.

    Raises:
        ValueError: If ``rhs`` is not 1-D, ``damping`` is negative or not finite,
            ``rtol`` is not positive or ``max_iters`` is not positive.
    """
    red = _check_cg(rhs, damping, max_iters, rtol, reduce)
    max_iters = 10 * rhs.numel() if max_iters is None else max_iters
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    d = r.clone()
    rr = red(r @ r)
    target = rtol * float(rr.sqrt())
    if float(rr) == 0:
        return CGResult(x, 0, 0, 0.0, True, False)
    for i in range(max_iters):
        product = matvec(d).to(rhs.dtype) + damping * d
        curvature = red(d @ product)
        if not curvature > 0:
            return CGResult(x, i + 1, i, float(rr.sqrt()), False, True, d)
        step = rr / curvature
        x = x + step * d
        r = r - step * product
        rr_next = red(r @ r)
        if float(rr_next.sqrt()) <= target:
            return CGResult(x, i + 1, i + 1, float(rr_next.sqrt()), True, False)
        d = r + (rr_next / rr) * d
        rr = rr_next
    return CGResult(x, max_iters, max_iters, float(rr.sqrt()), False, False)


def newton_direction(
    matvec: Matvec,
    gradient: Tensor,
    damping: float = 0.0,
    max_iters: int | None = None,
    rtol: float = 1e-6,
    *,
    reduce: Reduce | None = None,
) -> NewtonStep:
    r"""The damped Newton direction ``s = -(H + lambda I)^{-1} g`` by CG.

    On a quadratic ``f(x) = (1/2) x^T H x - b^T x`` with ``H`` positive definite
    and no damping, ``x + s`` is the minimiser ``H^{-1} b`` (up to ``rtol``).

    Args:
        matvec: ``v -> H v`` on vectors of shape ``(p,)``; ``H`` symmetric.
        gradient: g, shape ``(p,)``.
        damping: lambda, at least 0 (Levenberg-Marquardt damping; any
            ``lambda > -lambda_min(H)`` makes the system positive definite).
        max_iters: CG iteration cap; ``None`` means ``10 p``.
        rtol: CG tolerance relative to ``||g||``.
        reduce: Sums over ranks for sharded vectors (see
            :func:`conjugate_gradient`).

    Returns:
        The direction and how CG ended.

    Raises:
        ValueError: As :func:`conjugate_gradient`.

    Warning:
        On negative curvature the direction is the last CG iterate, which is a
        descent direction (``g^T s < 0``) when CG ran at least one iteration, and
        zero when the first direction ``-g`` already had non-positive curvature;
        raise ``damping``, or move along ``curvature_direction``. This departs from
        Nocedal and Wright (2006, Algorithm 7.1), which returns ``-g`` there.
    """
    result = conjugate_gradient(
        matvec, -gradient, damping, max_iters, rtol, reduce=reduce
    )
    return NewtonStep(
        direction=result.solution,
        num_matvecs=result.num_matvecs,
        residual_norm=result.residual_norm,
        converged=result.converged,
        negative_curvature=result.negative_curvature,
        curvature_direction=result.curvature_direction,
    )


def quadratic_model_change(
    gradient: Tensor,
    matvec: Matvec,
    step: Tensor,
    *,
    reduce: Reduce | None = None,
) -> Tensor:
    r"""The loss change ``g^T s + (1/2) s^T H s`` that the quadratic model predicts.

    One matvec. Compare it with the measured change ``L(theta + s) - L(theta)``:
    their ratio is the trust-region agreement ratio.

    Args:
        gradient: g, shape ``(p,)``.
        matvec: ``v -> H v``.
        step: s, shape ``(p,)``.
        reduce: Sums over ranks for sharded vectors.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If ``gradient`` and ``step`` differ in shape.
    """
    if gradient.shape != step.shape:
        raise ValueError(
            f"gradient and step must have the same shape, got "
            f"{tuple(gradient.shape)} and {tuple(step.shape)}"
        )
    red = _identity if reduce is None else reduce
    curvature = step @ matvec(step).to(step.dtype)
    return red(gradient.to(step.dtype) @ step + 0.5 * curvature)


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _check_cg(
    rhs: Tensor,
    damping: float,
    max_iters: int | None,
    rtol: float,
    reduce: Reduce | None,
) -> Reduce:
    if rhs.dim() != 1:
        raise ValueError(
            f"the right-hand side must be a flat vector of shape (p,), got shape "
            f"{tuple(rhs.shape)}; flatten it first"
        )
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(
            f"damping must be a finite number >= 0, got {damping}; for an "
            "indefinite matrix use damping > -lambda_min"
        )
    if not (math.isfinite(rtol) and rtol > 0):
        raise ValueError(f"rtol must be a positive finite tolerance, got {rtol}")
    if max_iters is not None and (
        isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1
    ):
        raise ValueError(
            f"max_iters must be a positive int or None (10 p iterations), got "
            f"{max_iters!r}"
        )
    return _identity if reduce is None else reduce
