r"""The Lanczos process, extreme eigenvalues and the spectral density.

``m`` steps of Lanczos on a symmetric ``A`` (p x p) from a unit vector ``q_1`` build
an orthonormal basis ``V = [q_1, ..., q_m]`` of the Krylov space
``span{q_1, A q_1, ..., A^{m-1} q_1}`` and the tridiagonal ``T = V^T A V`` with

.. math::
    A V = V T + \beta_m q_{m+1} e_m^\top,

diagonal ``alpha_1..alpha_m`` and off-diagonal ``beta_1..beta_{m-1}``. The
eigenvalues ``theta_i`` of ``T`` (Ritz values) approximate the extreme eigenvalues of
``A`` first; the Ritz pair ``(theta_i, V s_i)`` has residual
``||A V s_i - theta_i V s_i|| = |beta_m s_{m,i}|``, a bound on the distance from
``theta_i`` to the nearest eigenvalue of ``A``. The same decomposition gives the
Gauss quadrature ``q_1^T f(A) q_1 ~ sum_i tau_i^2 f(theta_i)`` with
``tau_i = s_{1,i}``, which is what stochastic Lanczos quadrature averages over random
``q_1``.

Across ranks the basis vectors are either whole on every rank (the matvec
all-reduces its result and the start vector is identical on all ranks, drawn from
``ProbeSource(shared=True)``), or sharded like the parameters: then ``reduce`` sums
the partial inner products over ranks and each rank draws its own shard of the start
vector (``ProbeSource(shared=False)``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlightning.core.estimators import Estimate, check_num_probes, mean_and_stderr
from curvlightning.core.probes import ProbeSource

__all__ = [
    "EIGENVALUE_ORDERS",
    "LanczosResult",
    "RitzPairs",
    "SpectralDensity",
    "lanczos",
    "spectral_density",
    "top_eigenvalues",
]

Matvec = Callable[[Tensor], Tensor]
Reduce = Callable[[Tensor], Tensor]

EIGENVALUE_ORDERS = ("largest", "smallest", "magnitude")


@dataclass(frozen=True)
class LanczosResult:
    """The output of :func:`lanczos` after ``m`` steps.

    Attributes:
        alphas: Diagonal of ``T``, shape ``(m,)``.
        betas: Off-diagonal of ``T``, shape ``(m - 1,)``; zero where the process
            restarted after a breakdown.
        residual_norm: ``beta_m = ||A q_m - V T e_m||``, the norm of the part of
            ``A q_m`` outside the basis.
        basis: The orthonormal basis ``V^T``, shape ``(m, p)`` (rows ``q_j``).
        num_matvecs: Products with ``A`` spent (``m``).
        breakdown: True if the Krylov space became invariant (``beta ~ 0``) and
            the process stopped before ``num_steps``, or restarted.
    """

    alphas: Tensor
    betas: Tensor
    residual_norm: float
    basis: Tensor
    num_matvecs: int
    breakdown: bool

    @property
    def num_steps(self) -> int:
        """The number m of steps taken (columns of the basis)."""
        return self.alphas.numel()

    def tridiagonal(self) -> Tensor:
        """The symmetric tridiagonal ``T = V^T A V``, shape ``(m, m)``."""
        return (
            torch.diag(self.alphas)
            + torch.diag(self.betas, 1)
            + torch.diag(self.betas, -1)
        )

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues (ascending, ``(m,)``) and eigenvectors (columns, ``(m, m)``).

        The eigenproblem of ``T`` is solved in float64 and cast back.
        """
        values, vectors = torch.linalg.eigh(self.tridiagonal().double())
        return values.to(self.alphas.dtype), vectors.to(self.alphas.dtype)


@dataclass(frozen=True)
class RitzPairs:
    """Ritz approximations of extreme eigenpairs.

    Attributes:
        values: Ritz values, shape ``(k,)``, in the requested order.
        residual_norms: ``|beta_m s_{m,i}|``, shape ``(k,)``: for symmetric ``A``
            an eigenvalue lies within this distance of each Ritz value.
        vectors: Unit Ritz vectors ``V s_i`` as rows, shape ``(k, p)``.
        num_matvecs: Products with ``A`` spent.
        num_steps: Lanczos steps taken.
    """

    values: Tensor
    residual_norms: Tensor
    vectors: Tensor
    num_matvecs: int
    num_steps: int

    def to_estimate(self) -> Estimate:
        """The values as an :class:`Estimate` whose ``stderr`` is the residual bound.

        The bound is deterministic, not a standard error; ``num_samples`` is 1
        (one start vector).
        """
        return Estimate(self.values, self.residual_norms, self.num_matvecs, 1)


@dataclass(frozen=True)
class SpectralDensity:
    r"""A spectral density from stochastic Lanczos quadrature.

    Probe ``l`` gives the quadrature nodes ``theta_{l,i}`` and weights
    ``w_{l,i} = tau_{l,i}^2`` (summing to 1) of the measure
    ``mu_l = sum_i w_{l,i} delta(t - theta_{l,i})``; its expectation over unit
    probes is the spectral measure ``(1/p) sum_j delta(t - lambda_j)``.

    Attributes:
        nodes: Ritz values per probe, shape ``(n, m)``; zero-padded (with zero
            weight) where a probe's Krylov space was exhausted before m steps.
        weights: Quadrature weights, shape ``(n, m)``; each row sums to 1.
        grid: Points of the smoothed density, shape ``(g,)``.
        density: The smoothed density on ``grid``, shape ``(g,)``.
        sigma: Standard deviation of the Gaussian kernel.
        num_matvecs: Products with ``A`` spent (all probes).
    """

    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    sigma: float
    num_matvecs: int

    @property
    def num_probes(self) -> int:
        """The number n of probes (Lanczos runs)."""
        return self.nodes.shape[0]

    def smooth(self, grid: Tensor, sigma: float) -> Tensor:
        r"""The density convolved with a Gaussian, on other points, without matvecs.

        ``phi(t) = (1/n) sum_l sum_i w_{l,i} N(t; theta_{l,i}, sigma^2)``; it
        integrates to 1 over the real line.

        Args:
            grid: Points, shape ``(g,)``.
            sigma: Kernel standard deviation, positive.

        Returns:
            The density at ``grid``, shape ``(g,)``.
        """
        _check_sigma(sigma)
        return _smooth(self.nodes, self.weights, grid.to(self.nodes), sigma)

    def moments(self, k: int) -> Estimate:
        r"""Quadrature estimates of ``trace(A^j) / p`` for ``j = 1..k``.

        Probe ``l`` gives ``sum_i w_{l,i} theta_{l,i}^j = q_l^T A^j q_l`` exactly
        while ``j <= 2m - 1`` (Gauss quadrature with m nodes), and the mean over
        unit probes with ``E[q q^T] = I / p`` is unbiased for ``trace(A^j) / p``.

        Args:
            k: The highest order, at least 1.

        Returns:
            Value and standard error (over probes) of shape ``(k,)``; entry
            ``j - 1`` is order j.

        Warning:
            Orders above ``2m - 1`` are no longer exact per probe and carry a bias.
        """
        check_num_probes(k, "k")
        orders = torch.arange(1, k + 1, device=self.nodes.device)
        powers = self.nodes[:, :, None] ** orders
        per_probe = (self.weights[:, :, None] * powers).sum(dim=1)
        mean, stderr = mean_and_stderr(per_probe)
        return Estimate(mean, stderr, self.num_matvecs, self.num_probes)


def lanczos(
    matvec: Matvec,
    dim: int,
    num_steps: int,
    start: Tensor,
    reorthogonalize: bool = True,
    reduce: Reduce | None = None,
    *,
    restart: Callable[[], Tensor] | None = None,
    breakdown_tol: float | None = None,
) -> LanczosResult:
    r"""``num_steps`` steps of the Lanczos process from ``start``.

    Step j computes ``w = A q_j - alpha_j q_j - beta_{j-1} q_{j-1}`` with
    ``alpha_j = q_j^T A q_j``, then (``reorthogonalize=True``) removes from ``w``
    its components along all earlier ``q_i``, twice (classical Gram-Schmidt
    twice, which keeps ``V`` orthonormal to working precision), and sets
    ``beta_j = ||w||``, ``q_{j+1} = w / beta_j``.

    Breakdown: when ``beta_j <= breakdown_tol * ||A||`` (``||A||`` estimated from
    the ``alphas`` and ``betas`` so far) the Krylov space is invariant and its
    Ritz values are eigenvalues of ``A``. Without ``restart`` the process stops
    there and returns the steps taken so far; with it a fresh vector from
    ``restart()`` is orthogonalised against the basis and the process continues
    with ``beta_j = 0``, so that repeated eigenvalues are found too. No division
    by a zero norm happens either way.

    Args:
        matvec: ``v -> A v`` on vectors of shape ``(dim,)``; ``A`` symmetric.
        dim: The (local) dimension p of the vectors.
        num_steps: The number m of steps, from 1 to the global dimension.
        start: The start vector, shape ``(dim,)``, nonzero; it is normalised. Its
            dtype and device are those of the computation.
        reorthogonalize: Orthogonalise every new vector against the whole basis.
            Without it Lanczos loses orthogonality as Ritz values converge and
            produces spurious copies of them ("ghosts").
        reduce: Sums a tensor over ranks when each rank holds a shard of the
            vectors (``Reducer.all_reduce_sum``); ``None`` when vectors are whole.
        restart: Draws a new start vector of shape ``(dim,)`` after a breakdown;
            needs ``reorthogonalize=True``.
        breakdown_tol: Relative threshold of a breakdown; ``None`` means
            ``eps ** 0.75`` of the dtype (about ``2e-12`` in float64).

    Returns:
        The tridiagonal, the residual norm ``beta_m`` and the basis.

    Raises:
        TypeError: If ``num_steps`` is not an int.
        ValueError: If ``num_steps`` is outside ``[1, p]``, ``start`` has the
            wrong shape or is zero, or ``restart`` comes without
            ``reorthogonalize``.

    Note:
        The basis is kept in memory (``m * p`` numbers) in both modes, and
        ``basis`` is returned even without reorthogonalisation.
    """
    red = _identity if reduce is None else reduce
    _check_lanczos(dim, num_steps, start, red, restart, reorthogonalize)
    tol = breakdown_tol
    if tol is None:
        tol = torch.finfo(start.dtype).eps ** 0.75

    basis = start.new_zeros(num_steps, dim)
    basis[0] = _normalise(start, red, "start")
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    beta_prev = start.new_zeros(())
    scale, breakdown = 0.0, False
    for j in range(num_steps):
        # Three-term recurrence (beta_0 = 0), then Gram-Schmidt twice on the basis.
        w = matvec(basis[j]).to(start.dtype)
        alpha = red(basis[j] @ w)
        w = w - alpha * basis[j] - beta_prev * basis[j - 1]
        if reorthogonalize:
            w, correction = _project_out(w, basis[: j + 1], red)
            alpha = alpha + correction[j]
        beta = red(w @ w).sqrt()
        alphas.append(alpha)
        scale = max(scale, float(alpha**2 + beta_prev**2 + beta**2) ** 0.5)
        if j == num_steps - 1:
            break

        # Next basis vector; on a breakdown restart or stop.
        if beta > tol * scale:
            basis[j + 1] = w / beta
        else:
            breakdown = True
            fresh = None if restart is None else _fresh(restart, basis[: j + 1], red)
            if fresh is None:
                return _result(alphas, betas, beta, basis[: j + 1], breakdown)
            basis[j + 1] = fresh
            beta = torch.zeros_like(beta)
        betas.append(beta)
        beta_prev = beta
    return _result(alphas, betas, beta, basis, breakdown)


def top_eigenvalues(
    matvec: Matvec,
    dim: int,
    k: int,
    num_steps: int,
    probes: ProbeSource,
    *,
    which: str = "largest",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    reduce: Reduce | None = None,
) -> RitzPairs:
    r"""The k extreme eigenvalues of a symmetric ``A`` by Lanczos.

    Runs ``num_steps`` steps of :func:`lanczos` with full reorthogonalisation
    from a probe, restarting from further probes after a breakdown (so an
    eigenvalue of multiplicity r can appear r times), and returns the extreme Ritz
    values with their residual norms ``|beta_m s_{m,i}|``. With ``num_steps = p``
    the Ritz values are the eigenvalues up to rounding.

    Args:
        matvec: ``v -> A v`` on vectors of shape ``(dim,)``; ``A`` symmetric.
        dim: The (local) dimension p.
        k: The number of eigenvalues, from 1 to ``num_steps``.
        num_steps: Lanczos steps (matvecs), from k to p; the extreme eigenvalues
            typically converge in a few tens of steps when they are separated.
        probes: Source of the start vector (and of restarts); it must be
            identical on all ranks when the matvec all-reduces
            (``ProbeSource(shared=True)``).
        which: ``"largest"`` (largest algebraic, descending), ``"smallest"``
            (smallest algebraic, ascending) or ``"magnitude"`` (largest ``|theta|``,
            by descending magnitude).
        dtype: Dtype of the start vector and of the computation.
        device: Device of the start vector.
        reduce: Sums over ranks when the vectors are sharded (see :func:`lanczos`).

    Returns:
        Ritz values, residual norms and Ritz vectors.

    Raises:
        TypeError: If ``k`` or ``num_steps`` is not an int.
        ValueError: If ``which`` is unknown, ``k > num_steps`` or ``num_steps`` is
            outside ``[1, p]``.

    Warning:
        A residual bound says that *some* eigenvalue is near each Ritz value, not
        that no eigenvalue was missed: an eigenvector nearly orthogonal to the
        start vector converges late. A breakdown perturbs the residuals by up to
        ``breakdown_tol * ||A||``.
    """
    check_num_probes(k, "k")
    if which not in EIGENVALUE_ORDERS:
        raise ValueError(f"which must be one of {EIGENVALUE_ORDERS}, got {which!r}")
    if isinstance(num_steps, int) and k > num_steps:
        raise ValueError(
            f"k={k} eigenvalues need at least k Lanczos steps, got "
            f"num_steps={num_steps}; raise num_steps"
        )
    gen = probes.generator()

    def draw() -> Tensor:
        return probes.draw(1, dim, dtype=dtype, device=device, generator=gen)[0]

    result = lanczos(matvec, dim, num_steps, draw(), True, reduce, restart=draw)
    values, vectors = result.ritz()
    order = _order(values, which)[:k]
    if order.numel() < k:
        warnings.warn(
            f"only {order.numel()} Ritz values exist after {result.num_steps} "
            f"steps; returning them instead of k={k}",
            stacklevel=2,
        )
    return RitzPairs(
        values=values[order],
        residual_norms=(result.residual_norm * vectors[-1, order]).abs(),
        vectors=vectors[:, order].T @ result.basis,
        num_matvecs=result.num_matvecs,
        num_steps=result.num_steps,
    )


def spectral_density(
    matvec: Matvec,
    dim: int,
    probes: ProbeSource,
    num_probes: int,
    num_steps: int,
    *,
    grid: Tensor | int = 1000,
    sigma: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    reduce: Reduce | None = None,
) -> SpectralDensity:
    r"""The spectral density of a symmetric ``A`` by stochastic Lanczos quadrature.

    Ubaru, Chen and Saad (2017), as in PyHessian (Yao et al., 2020): for each of
    ``n`` probes ``v_l``, ``q_l = v_l / ||v_l||`` is the start of ``m`` Lanczos
    steps with full reorthogonalisation; the eigenpairs ``(theta_i, s_i)`` of
    ``T`` give the nodes ``theta_i`` and weights ``tau_i^2 = s_{1,i}^2`` of the Gauss
    quadrature ``q^T f(A) q ~ sum_i tau_i^2 f(theta_i)``, exact for polynomials of
    degree up to ``2m - 1``. Rademacher probes have ``||v||^2 = p`` and Gaussian
    ones give ``q`` uniform on the sphere, so in both cases ``E[q q^T] = I / p``
    and

    .. math::
        \frac{1}{n} \sum_{l=1}^{n} \sum_{i=1}^{m} \tau_{l,i}^2 f(\theta_{l,i})
        \approx \frac{1}{p} \operatorname{tr} f(A)
        = \int f(t)\, \frac{1}{p} \sum_j \delta(t - \lambda_j)\, dt.

    The density is this measure convolved with a Gaussian of standard deviation
    ``sigma``. A probe whose Krylov space is exhausted before m steps (beta ~ 0)
    stops there: its quadrature is then exact for every f.

    Args:
        matvec: ``v -> A v`` on vectors of shape ``(dim,)``; ``A`` symmetric.
        dim: The (local) dimension p.
        probes: The probe source; identical on all ranks when the matvec
            all-reduces (``ProbeSource(shared=True)``).
        num_probes: The number n of Lanczos runs, at least 1.
        num_steps: Steps per run (matvecs per probe), from 1 to p.
        grid: Points of the density, shape ``(g,)``, or their number, spread
            evenly over ``[min theta - 5 sigma, max theta + 5 sigma]``.
        sigma: Kernel standard deviation; ``None`` means 1% of the range of the
            nodes (the spacing of an integer grid is then about ``sigma / 9``).
        dtype: Probe dtype and dtype of the computation.
        device: Probe device.
        reduce: Sums over ranks when the vectors are sharded (see :func:`lanczos`).

    Returns:
        Nodes, weights and the smoothed density; :meth:`SpectralDensity.moments`
        estimates ``trace(A^j) / p``.

    Raises:
        TypeError: If a count is not an int.
        ValueError: If a count is not positive, ``num_steps > p``, ``sigma`` is not
            positive or ``grid`` has fewer than 2 points.

    Note:
        PyHessian smooths with a fixed variance of ``1e-5`` on a grid padded by 1
        around the extreme nodes; here the kernel width scales with the spectrum,
        so the default works for any scale of ``A``.
    """
    check_num_probes(num_probes)
    if sigma is not None:
        _check_sigma(sigma)
    _check_grid(grid)
    gen = probes.generator()
    nodes = torch.zeros(num_probes, num_steps, dtype=dtype, device=device)
    weights = torch.zeros_like(nodes)
    valid = torch.zeros_like(nodes, dtype=torch.bool)
    num_matvecs = 0
    for row in range(num_probes):
        start = probes.draw(1, dim, dtype=dtype, device=device, generator=gen)[0]
        result = lanczos(matvec, dim, num_steps, start, True, reduce)
        values, vectors = result.ritz()
        nodes[row, : result.num_steps] = values
        weights[row, : result.num_steps] = vectors[0] ** 2
        valid[row, : result.num_steps] = True
        num_matvecs += result.num_matvecs

    sigma = _default_sigma(nodes[valid]) if sigma is None else sigma
    grid = _make_grid(grid, nodes[valid], sigma)
    density = _smooth(nodes, weights, grid, sigma)
    return SpectralDensity(nodes, weights, grid, density, sigma, num_matvecs)


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _check_lanczos(
    dim: int,
    num_steps: int,
    start: Tensor,
    red: Reduce,
    restart: Callable[[], Tensor] | None,
    reorthogonalize: bool,
) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise TypeError(f"num_steps must be an int, got {num_steps!r}")
    if start.shape != (dim,):
        raise ValueError(
            f"start must have shape ({dim},) like the vectors, got {tuple(start.shape)}"
        )
    total = int(red(start.new_tensor(float(dim))))
    if not 1 <= num_steps <= total:
        raise ValueError(
            f"num_steps must be between 1 and the dimension {total}, got "
            f"{num_steps}: a Krylov space has at most p dimensions"
        )
    if restart is not None and not reorthogonalize:
        raise ValueError(
            "restart needs reorthogonalize=True: a restarted vector must be kept "
            "orthogonal to the whole basis"
        )


def _normalise(vector: Tensor, red: Reduce, name: str) -> Tensor:
    norm = red(vector @ vector).sqrt()
    if not (torch.isfinite(norm) and norm > 0):
        raise ValueError(
            f"{name} must be a nonzero finite vector, got norm {float(norm)}"
        )
    return vector / norm


def _project_out(w: Tensor, basis: Tensor, red: Reduce) -> tuple[Tensor, Tensor]:
    """Remove from ``w`` its components along the rows of ``basis``, twice."""
    total = torch.zeros(basis.shape[0], dtype=w.dtype, device=w.device)
    for _ in range(2):
        coefficients = red(basis @ w)
        w = w - coefficients @ basis
        total = total + coefficients
    return w, total


def _fresh(restart: Callable[[], Tensor], basis: Tensor, red: Reduce) -> Tensor | None:
    """A unit vector orthogonal to ``basis``; None if the space is exhausted."""
    vector = restart().to(basis)
    before = red(vector @ vector).sqrt()
    vector, _ = _project_out(vector, basis, red)
    after = red(vector @ vector).sqrt()
    if not after > torch.finfo(basis.dtype).eps ** 0.5 * before:
        return None
    return vector / after


def _result(
    alphas: list[Tensor],
    betas: list[Tensor],
    residual: Tensor,
    basis: Tensor,
    breakdown: bool,
) -> LanczosResult:
    off_diagonal = torch.stack(betas) if betas else basis.new_zeros(0)
    return LanczosResult(
        alphas=torch.stack(alphas),
        betas=off_diagonal,
        residual_norm=float(residual),
        basis=basis,
        num_matvecs=len(alphas),
        breakdown=breakdown,
    )


def _order(values: Tensor, which: str) -> Tensor:
    if which == "largest":
        return torch.argsort(values, descending=True)
    if which == "smallest":
        return torch.argsort(values)
    return torch.argsort(values.abs(), descending=True)


def _check_sigma(sigma: float) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma must be a float, got {sigma!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"sigma must be a positive finite kernel width, got {sigma}; "
            "pass None for 1% of the spectral range"
        )


def _default_sigma(nodes: Tensor) -> float:
    spread = float(nodes.max() - nodes.min())
    size = float(nodes.abs().max())
    scale = max(spread, 1e-3 * size)
    return 0.01 * scale if scale > 0 else 0.01


def _check_grid(grid: Tensor | int) -> None:
    if isinstance(grid, Tensor):
        if grid.dim() != 1 or grid.numel() < 2:
            raise ValueError(
                f"grid must be a 1-D tensor of at least 2 points, got shape "
                f"{tuple(grid.shape)}"
            )
        return
    check_num_probes(grid, "grid")
    if grid < 2:
        raise ValueError(f"grid must have at least 2 points, got {grid}")


def _make_grid(grid: Tensor | int, nodes: Tensor, sigma: float) -> Tensor:
    if isinstance(grid, Tensor):
        return grid.to(nodes)
    low = float(nodes.min()) - 5 * sigma
    high = float(nodes.max()) + 5 * sigma
    return torch.linspace(low, high, grid, dtype=nodes.dtype, device=nodes.device)


def _smooth(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """``(1/n) sum_l sum_i w_li N(t; theta_li, sigma^2)`` at each point t."""
    diff = (grid[:, None] - nodes.reshape(1, -1)) / sigma
    kernel = torch.exp(-0.5 * diff**2) / (sigma * math.sqrt(2 * math.pi))
    return kernel @ weights.reshape(-1) / nodes.shape[0]
