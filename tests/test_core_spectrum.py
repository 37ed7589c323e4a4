"""Hutch++, Lanczos and stochastic Lanczos quadrature against dense float64 matrices.

References: dense symmetric matrices with a known spectrum, and the dense Hessian
(``torch.func.hessian``) of a 93-parameter MLP, whose products come from
``HessianOperator``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from distributed import run_on_ranks
from helpers import dense_hessian
from torch import Tensor, nn

from curvlightning.core import (
    FunctionalModel,
    HessianOperator,
    ProbeSource,
    TorchDistributed,
    hutchinson_trace,
)
from curvlightning.core.hutchpp import hutchpp_trace, split_budget
from curvlightning.core.lanczos import lanczos, spectral_density, top_eigenvalues
from curvlightning.core.newton import conjugate_gradient

F64 = torch.float64


def symmetric(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """``U diag(eigenvalues) U^T`` with a random orthogonal ``U``."""
    gen = torch.Generator().manual_seed(seed)
    dim = eigenvalues.numel()
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64)).Q
    return (basis * eigenvalues.to(F64)) @ basis.T


def power_law(dim: int) -> Tensor:
    return torch.arange(1, dim + 1, dtype=F64) ** -2.0


def matvec_of(matrix: Tensor):
    return lambda v: matrix @ v


@pytest.fixture(scope="module")
def mlp():
    """The Hessian operator of a 5-8-5 tanh MLP (93 parameters) and its dense twin."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 5)).to(F64)
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 5, generator=gen, dtype=F64)
    targets = torch.randint(0, 5, (64,), generator=gen)
    model = FunctionalModel(module, loss=F.cross_entropy, dtype=F64)
    operator = HessianOperator(model, inputs, targets)
    return operator, dense_hessian(module, F.cross_entropy, inputs, targets)


# ------------------------------------------------------------------------ Hutch++
def test_split_budget_spends_exactly_the_budget():
    for budget in range(3, 40):
        sketch, remainder = split_budget(budget)
        assert 2 * sketch + remainder == budget
        assert sketch >= 1 and remainder >= sketch


def test_hutchpp_counts_matvecs_and_remainder_probes():
    matrix = symmetric(power_law(40))
    calls = []

    def matvec(v):
        calls.append(1)
        return matrix @ v

    est = hutchpp_trace(matvec, 40, ProbeSource(seed=0), 14, dtype=F64)
    assert len(calls) == est.num_matvecs == 14
    assert est.num_samples == 14 - 2 * 4
    assert math.isfinite(est.stderr.item())
    one = hutchpp_trace(matvec, 40, ProbeSource(seed=0), 3, dtype=F64)
    assert one.num_samples == 1 and math.isnan(one.stderr.item())


def test_hutchpp_is_exact_when_the_sketch_spans_the_range():
    # Rank 3 < sketch size 4: (I - QQ^T) A = 0, the remainder has no variance.
    eigenvalues = torch.zeros(50, dtype=F64)
    eigenvalues[:3] = torch.tensor([3.0, -2.0, 0.5])
    matrix = symmetric(eigenvalues, seed=3)
    est = hutchpp_trace(matvec_of(matrix), 50, ProbeSource(seed=1), 12, dtype=F64)
    assert est.item() == pytest.approx(1.5, abs=1e-10)
    assert est.stderr.item() < 1e-10


@pytest.mark.parametrize("method", ["hutchpp", "hutchinson"])
def test_trace_estimators_are_unbiased(method):
    # 300 seeds of a 9-matvec estimate; the mean must be within 4 standard errors
    # of the mean (over seeds) of the exact trace.
    eigenvalues = torch.linspace(-1.0, 2.0, 30, dtype=F64) ** 3
    matrix = symmetric(eigenvalues, seed=5)
    estimator = hutchpp_trace if method == "hutchpp" else hutchinson_trace
    values = torch.stack(
        [
            estimator(matvec_of(matrix), 30, ProbeSource(seed=s), 9, dtype=F64).value
            for s in range(300)
        ]
    )
    stderr = values.std() / math.sqrt(values.numel())
    assert abs(values.mean() - eigenvalues.sum()) < 4 * stderr
    assert stderr < 0.1 * eigenvalues.abs().sum()


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    # lambda_i = i^-2, p = 200, 30 matvecs: mean absolute error over 50 seeds.
    eigenvalues = power_law(200)
    matrix = symmetric(eigenvalues, seed=2)
    trace = eigenvalues.sum().item()
    errors = {"hutchpp": [], "hutchinson": []}
    for seed in range(50):
        probes = ProbeSource(seed=seed)
        for name, fn in (("hutchpp", hutchpp_trace), ("hutchinson", hutchinson_trace)):
            est = fn(matvec_of(matrix), 200, probes, 30, dtype=F64)
            errors[name].append(abs(est.item() - trace))
    hutchpp_error = sum(errors["hutchpp"]) / 50
    hutchinson_error = sum(errors["hutchinson"]) / 50
    assert hutchpp_error < 0.5 * hutchinson_error


def test_hutchpp_rejects_small_or_non_integer_budgets():
    matvec = matvec_of(torch.eye(5, dtype=F64))
    with pytest.raises(ValueError, match="num_matvecs must be at least 3.*got 2"):
        hutchpp_trace(matvec, 5, ProbeSource(), 2)
    with pytest.raises(TypeError, match="num_matvecs must be an int, got 6.0"):
        hutchpp_trace(matvec, 5, ProbeSource(), 6.0)


# ------------------------------------------------------------------------ Lanczos
def test_lanczos_basis_is_orthonormal_and_satisfies_the_decomposition():
    # A V = V T + beta_m q_{m+1} e_m^T: the residual of A V - V T is confined to the
    # last column and has norm beta_m.
    matrix = symmetric(torch.linspace(-3, 5, 60, dtype=F64))
    start = torch.randn(60, generator=torch.Generator().manual_seed(0), dtype=F64)
    result = lanczos(matvec_of(matrix), 60, 20, start)
    basis = result.basis.T
    assert result.num_steps == result.num_matvecs == 20 and not result.breakdown
    torch.testing.assert_close(
        basis.T @ basis, torch.eye(20, dtype=F64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        basis.T @ matrix @ basis, result.tridiagonal(), atol=1e-10, rtol=0
    )
    residual = matrix @ basis - basis @ result.tridiagonal()
    assert residual[:, :-1].abs().max() < 1e-10
    assert residual[:, -1].norm().item() == pytest.approx(
        result.residual_norm, rel=1e-8
    )
    torch.testing.assert_close(basis[:, 0], start / start.norm())


def test_reorthogonalisation_keeps_the_basis_orthonormal_where_plain_lanczos_fails():
    matrix = symmetric(power_law(80) * 100)
    start = torch.ones(80, dtype=F64)
    plain = lanczos(matvec_of(matrix), 80, 60, start, reorthogonalize=False)
    full = lanczos(matvec_of(matrix), 80, 60, start, reorthogonalize=True)
    eye = torch.eye(60, dtype=F64)
    assert (plain.basis @ plain.basis.T - eye).abs().max() > 1e-2
    assert (full.basis @ full.basis.T - eye).abs().max() < 1e-12


def test_top5_of_the_mlp_hessian_with_p_steps(mlp):
    operator, hessian = mlp
    dim = operator.dim
    exact = torch.linalg.eigvalsh(hessian).flip(0)
    ritz = top_eigenvalues(operator, dim, 5, dim, ProbeSource(seed=0), dtype=F64)
    torch.testing.assert_close(ritz.values, exact[:5], rtol=1e-6, atol=0)
    assert ritz.num_matvecs == ritz.num_steps == dim == 93
    assert (ritz.residual_norms < 1e-6 * exact[0]).all()
    # Ritz vectors are unit eigenvectors: H x = theta x.
    for value, vector in zip(ritz.values, ritz.vectors, strict=True):
        torch.testing.assert_close(hessian @ vector, value * vector, atol=1e-8, rtol=0)
    estimate = ritz.to_estimate()
    assert estimate.stderr is ritz.residual_norms and estimate.num_matvecs == dim


def test_residual_norms_bound_the_distance_to_the_spectrum():
    # After few steps the Ritz values are not converged, but each lies within its
    # residual norm of an eigenvalue of A.
    eigenvalues = torch.linspace(0, 1, 100, dtype=F64) ** 4 * 10
    matrix = symmetric(eigenvalues, seed=4)
    ritz = top_eigenvalues(
        matvec_of(matrix), 100, 4, 12, ProbeSource(seed=3), dtype=F64
    )
    distance = (ritz.values[:, None] - eigenvalues[None, :]).abs().min(dim=1).values
    assert (distance <= ritz.residual_norms * (1 + 1e-8) + 1e-12).all()
    assert ritz.residual_norms.max() > 1e-6  # not converged: the bound is tested


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("largest", [4.0, 3.0, 2.0]),
        ("smallest", [-6.0, -1.0, 0.5]),
        ("magnitude", [-6.0, 4.0, 3.0]),
    ],
)
def test_top_eigenvalue_orders(which, expected):
    matrix = symmetric(torch.tensor([-6.0, -1.0, 0.5, 1.0, 2.0, 3.0, 4.0]))
    ritz = top_eigenvalues(
        matvec_of(matrix), 7, 3, 7, ProbeSource(), which=which, dtype=F64
    )
    torch.testing.assert_close(ritz.values, torch.tensor(expected, dtype=F64))


def test_breakdown_stops_without_nans_and_restarts_find_multiplicities():
    # Three distinct eigenvalues: the Krylov space of any start vector has
    # dimension 3, and beta_3 = 0.
    eigenvalues = torch.tensor([1.0, 2.0, 3.0], dtype=F64).repeat_interleave(10)
    matrix = symmetric(eigenvalues, seed=6)
    start = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=F64)
    result = lanczos(matvec_of(matrix), 30, 10, start)
    assert result.breakdown and result.num_steps == 3 and result.residual_norm < 1e-10
    values, _ = result.ritz()
    torch.testing.assert_close(values, torch.tensor([1.0, 2.0, 3.0], dtype=F64))

    ritz = top_eigenvalues(matvec_of(matrix), 30, 6, 12, ProbeSource(seed=0), dtype=F64)
    assert ritz.num_steps == 12
    torch.testing.assert_close(
        ritz.values, torch.tensor([3.0] * 4 + [2.0] * 2, dtype=F64)
    )
    assert torch.isfinite(ritz.vectors).all()

    zero = lanczos(lambda v: torch.zeros_like(v), 30, 5, start)
    assert zero.breakdown and zero.num_steps == 1 and zero.alphas.item() == 0.0


def test_lanczos_rejects_bad_arguments():
    matvec = matvec_of(torch.eye(6, dtype=F64))
    start = torch.ones(6, dtype=F64)
    with pytest.raises(
        ValueError, match="num_steps must be between 1 and the dimension 6, got 7"
    ):
        lanczos(matvec, 6, 7, start)
    with pytest.raises(ValueError, match="num_steps must be between 1 .* got 0"):
        lanczos(matvec, 6, 0, start)
    with pytest.raises(TypeError, match="num_steps must be an int, got 2.0"):
        lanczos(matvec, 6, 2.0, start)
    with pytest.raises(ValueError, match=r"start must have shape \(6,\).*got \(5,\)"):
        lanczos(matvec, 6, 3, start[:5])
    with pytest.raises(ValueError, match="start must be a nonzero finite vector"):
        lanczos(matvec, 6, 3, torch.zeros(6, dtype=F64))
    with pytest.raises(ValueError, match="restart needs reorthogonalize=True"):
        lanczos(matvec, 6, 3, start, reorthogonalize=False, restart=lambda: start)
    with pytest.raises(
        ValueError, match="k=4 eigenvalues need at least k Lanczos steps"
    ):
        top_eigenvalues(matvec, 6, 4, 3, ProbeSource())
    with pytest.raises(ValueError, match="which must be one of .* got 'top'"):
        top_eigenvalues(matvec, 6, 1, 3, ProbeSource(), which="top")
    with pytest.raises(ValueError, match="k must be a positive number"):
        top_eigenvalues(matvec, 6, 0, 3, ProbeSource())


# ---------------------------------------------------------------------------- SLQ
def test_slq_density_and_moments_of_the_mlp_hessian(mlp):
    operator, hessian = mlp
    dim = operator.dim
    density = spectral_density(operator, dim, ProbeSource(seed=0), 24, 8, dtype=F64)
    assert density.num_matvecs == 24 * 8 and density.num_probes == 24
    torch.testing.assert_close(density.weights.sum(dim=1), torch.ones(24, dtype=F64))
    assert torch.trapezoid(density.density, density.grid).item() == pytest.approx(
        1, abs=1e-6
    )

    # With 8 nodes the quadrature is exact up to degree 15, so each probe's k-th
    # moment is q^T H^k q, unbiased for trace(H^k)/p; the error of the mean over 24
    # probes is judged by the spread over probes: within 4 standard errors, and the
    # standard error itself is small (a loose one would make the check empty).
    moments = density.moments(4)
    exact = torch.stack(
        [torch.trace(torch.linalg.matrix_power(hessian, k)) / dim for k in range(1, 5)]
    )
    assert ((moments.value - exact).abs() <= 4 * moments.stderr).all()
    assert (moments.stderr < 0.25 * exact.abs()).all()
    assert moments.num_samples == 24


def test_slq_moments_are_the_quadratic_forms_of_each_probe():
    # Gauss quadrature with m = 3 nodes is exact for degrees <= 5.
    matrix = symmetric(torch.linspace(-2, 3, 40, dtype=F64), seed=7)
    probes = ProbeSource(seed=4, kind="gaussian")
    density = spectral_density(matvec_of(matrix), 40, probes, 1, 3, dtype=F64)
    q = probes.draw(1, 40, dtype=F64)[0]
    q = q / q.norm()
    forms = torch.stack(
        [q @ torch.linalg.matrix_power(matrix, k) @ q for k in range(1, 6)]
    )
    torch.testing.assert_close(density.moments(5).value, forms, atol=1e-10, rtol=1e-10)


def test_slq_with_an_exhausted_krylov_space_is_exact_and_finite():
    eigenvalues = torch.tensor([-1.0, 0.5, 2.0], dtype=F64).repeat_interleave(8)
    matrix = symmetric(eigenvalues, seed=8)
    density = spectral_density(
        matvec_of(matrix), 24, ProbeSource(seed=1), 6, 10, dtype=F64
    )
    assert torch.isfinite(density.nodes).all() and torch.isfinite(density.density).all()
    assert density.num_matvecs == 6 * 3  # each probe stops after 3 steps
    assert (density.weights[:, 3:] == 0).all()
    assert torch.trapezoid(density.density, density.grid).item() == pytest.approx(
        1, abs=1e-6
    )
    # All orders are exact per probe; Rademacher probes weigh the three
    # eigenspaces unequally, so compare with the per-probe quadratic forms' mean.
    gen = ProbeSource(seed=1).generator()
    forms = []
    for _ in range(6):
        q = ProbeSource(seed=1).draw(1, 24, dtype=F64, generator=gen)[0] / 24**0.5
        forms.append(
            [q @ torch.linalg.matrix_power(matrix, k) @ q for k in range(1, 9)]
        )
    torch.testing.assert_close(
        density.moments(8).value, torch.tensor(forms).mean(dim=0)
    )


def test_spectral_density_grid_and_sigma():
    matrix = symmetric(torch.linspace(0, 1, 20, dtype=F64))
    grid = torch.linspace(-0.5, 1.5, 2001, dtype=F64)
    density = spectral_density(
        matvec_of(matrix), 20, ProbeSource(), 4, 20, grid=grid, sigma=0.05, dtype=F64
    )
    assert density.grid is not None and density.sigma == 0.05
    torch.testing.assert_close(density.grid, grid)
    torch.testing.assert_close(density.smooth(grid, 0.05), density.density)
    # 20 steps on a 20-dim matrix: the nodes are the eigenvalues.
    torch.testing.assert_close(density.nodes[0], torch.linspace(0, 1, 20, dtype=F64))
    wide = density.smooth(grid, 0.2)
    assert wide.max() < density.density.max()
    with pytest.raises(
        ValueError, match="sigma must be a positive finite kernel width, got 0"
    ):
        spectral_density(matvec_of(matrix), 20, ProbeSource(), 2, 5, sigma=0.0)
    with pytest.raises(ValueError, match="grid must have at least 2 points, got 1"):
        spectral_density(matvec_of(matrix), 20, ProbeSource(), 2, 5, grid=1)
    with pytest.raises(ValueError, match="num_probes must be a positive number"):
        spectral_density(matvec_of(matrix), 20, ProbeSource(), 0, 5)


# -------------------------------------------------------------------- two ranks
def _local_matrix(rank: int) -> Tensor:
    return symmetric(torch.linspace(-1, 4, 24, dtype=F64) * (1 + rank), seed=10 + rank)


def _lanczos_on_ranks(rank: int, world_size: int) -> dict[str, Tensor]:
    reducer = TorchDistributed()
    local = _local_matrix(rank)

    # Whole vectors: the matvec averages the ranks' products, the probes are shared.
    def mean_matvec(v: Tensor) -> Tensor:
        return reducer.all_reduce_sum(local @ v) / world_size

    shared = ProbeSource(seed=3, rank=rank, shared=True)
    whole = top_eigenvalues(mean_matvec, 24, 3, 24, shared, dtype=F64)
    moments = spectral_density(mean_matvec, 24, shared, 4, 6, dtype=F64).moments(2)

    # Sharded vectors: rank r holds rows [12 r, 12 r + 12) of every vector.
    full = sum(_local_matrix(r) for r in range(world_size)) / world_size
    rows = slice(12 * rank, 12 * rank + 12)

    def sharded_matvec(v: Tensor) -> Tensor:
        return reducer.all_reduce_sum(full[:, rows] @ v)[rows]

    own = ProbeSource(seed=3, rank=rank)
    sharded = top_eigenvalues(
        sharded_matvec, 12, 3, 24, own, dtype=F64, reduce=reducer.all_reduce_sum
    )
    rhs = torch.arange(24, dtype=F64)[rows] / 24
    solve = conjugate_gradient(
        sharded_matvec, rhs, damping=2.0, rtol=1e-12, reduce=reducer.all_reduce_sum
    )
    return {
        "solution": solve.solution,
        "whole": whole.values,
        "moments": moments.value,
        "sharded": sharded.values,
        "vectors": sharded.vectors,
    }


@pytest.mark.distributed
def test_lanczos_and_cg_on_two_ranks_whole_and_sharded():
    out = run_on_ranks(_lanczos_on_ranks, world_size=2, timeout=60)
    full = (_local_matrix(0) + _local_matrix(1)) / 2
    exact = torch.linalg.eigvalsh(full).flip(0)[:3]
    for rank in range(2):
        torch.testing.assert_close(out[rank]["whole"], exact, rtol=1e-10, atol=0)
        torch.testing.assert_close(out[rank]["sharded"], exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(out[0]["moments"], out[1]["moments"], rtol=0, atol=0)
    single = spectral_density(
        matvec_of(full), 24, ProbeSource(seed=3, shared=True), 4, 6, dtype=F64
    )
    torch.testing.assert_close(out[0]["moments"], single.moments(2).value)
    # The shards of each Ritz vector form a unit eigenvector of the full matrix.
    vectors = torch.cat([out[0]["vectors"], out[1]["vectors"]], dim=1)
    torch.testing.assert_close(
        vectors @ full, exact[:, None] * vectors, atol=1e-8, rtol=0
    )
    # The shards of the CG solution form the solution of the damped system.
    solution = torch.cat([out[0]["solution"], out[1]["solution"]])
    shifted = full + 2.0 * torch.eye(24, dtype=F64)
    expected = torch.linalg.solve(shifted, torch.arange(24, dtype=F64) / 24)
    torch.testing.assert_close(solution, expected, atol=1e-10, rtol=0)
