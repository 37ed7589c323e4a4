"""Conjugate gradients and damped Newton directions against dense float64 solves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlightning.core import FunctionalModel, HessianOperator, flatten, unflatten
from curvlightning.core.newton import (
    conjugate_gradient,
    newton_direction,
    quadratic_model_change,
)

F64 = torch.float64


def symmetric(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """``U diag(eigenvalues) U^T`` with a random orthogonal ``U``."""
    gen = torch.Generator().manual_seed(seed)
    dim = eigenvalues.numel()
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64)).Q
    return (basis * eigenvalues.to(F64)) @ basis.T


def vector(dim: int, seed: int) -> Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def counting(matrix: Tensor):
    calls = []

    def matvec(v: Tensor) -> Tensor:
        calls.append(1)
        return matrix @ v

    return matvec, calls


def test_one_newton_step_reaches_the_minimum_of_a_convex_quadratic():
    # f(x) = 0.5 x^T A x - b^T x, gradient A x - b, minimiser A^{-1} b.
    matrix = symmetric(torch.logspace(-1, 1, 40, dtype=F64), seed=1)
    b, x = vector(40, 2), vector(40, 3)
    matvec, calls = counting(matrix)
    step = newton_direction(matvec, matrix @ x - b, rtol=1e-12)
    torch.testing.assert_close(
        x + step.direction, torch.linalg.solve(matrix, b), atol=1e-8, rtol=0
    )
    assert step.converged and not step.negative_curvature
    assert step.curvature_direction is None
    assert step.num_matvecs == len(calls) <= 80
    assert step.residual_norm <= 1e-12 * (matrix @ x - b).norm()


def test_damped_cg_solves_the_shifted_system():
    matrix = symmetric(torch.linspace(0.0, 3.0, 30, dtype=F64), seed=4)
    rhs = vector(30, 5)
    result = conjugate_gradient(lambda v: matrix @ v, rhs, damping=0.5, rtol=1e-10)
    shifted = matrix + 0.5 * torch.eye(30, dtype=F64)
    torch.testing.assert_close(
        result.solution, torch.linalg.solve(shifted, rhs), atol=1e-9, rtol=0
    )
    true_residual = (rhs - shifted @ result.solution).norm().item()
    assert result.residual_norm == pytest.approx(true_residual, rel=1e-3, abs=1e-12)
    assert result.converged and result.num_iters == result.num_matvecs


def test_damping_beyond_the_smallest_eigenvalue_makes_an_indefinite_system_solvable():
    matrix = symmetric(torch.linspace(-1.0, 2.0, 25, dtype=F64), seed=6)
    g = vector(25, 7)
    step = newton_direction(lambda v: matrix @ v, g, damping=1.5, rtol=1e-12)
    shifted = matrix + 1.5 * torch.eye(25, dtype=F64)
    assert step.converged and not step.negative_curvature
    torch.testing.assert_close(
        step.direction, -torch.linalg.solve(shifted, g), atol=1e-9, rtol=0
    )


def test_cg_reports_negative_curvature_on_an_indefinite_matrix():
    matrix = symmetric(torch.linspace(-0.5, 3.0, 30, dtype=F64), seed=8)
    g = vector(30, 9)
    step = newton_direction(lambda v: matrix @ v, g, rtol=1e-12)
    assert step.negative_curvature and not step.converged
    assert step.num_matvecs == 3  # two CG steps, then the third direction
    d = step.curvature_direction
    assert d is not None and (d @ matrix @ d).item() <= 0
    # The last iterate before the stop is a descent direction of the model.
    assert (g @ step.direction).item() < 0


def test_negative_curvature_at_the_first_direction_returns_zero():
    matrix = -torch.eye(10, dtype=F64)
    rhs = vector(10, 10)
    result = conjugate_gradient(lambda v: matrix @ v, rhs)
    assert result.negative_curvature and result.num_iters == 0
    assert result.num_matvecs == 1
    assert torch.equal(result.solution, torch.zeros(10, dtype=F64))
    torch.testing.assert_close(result.curvature_direction, rhs)
    assert result.residual_norm == pytest.approx(rhs.norm().item())


def test_cg_stops_at_max_iters_and_on_a_zero_rhs():
    matrix = symmetric(torch.logspace(-4, 0, 50, dtype=F64), seed=11)
    matvec, calls = counting(matrix)
    capped = conjugate_gradient(matvec, vector(50, 12), max_iters=3, rtol=1e-12)
    assert capped.num_matvecs == capped.num_iters == len(calls) == 3
    assert not capped.converged and not capped.negative_curvature
    zero = conjugate_gradient(matvec, torch.zeros(50, dtype=F64))
    assert zero.converged and zero.num_matvecs == 0 and zero.residual_norm == 0
    assert torch.equal(zero.solution, torch.zeros(50, dtype=F64))


def test_quadratic_model_change_matches_dense():
    matrix = symmetric(torch.linspace(-1.0, 1.0, 20, dtype=F64), seed=13)
    g, s = vector(20, 14), vector(20, 15)
    change = quadratic_model_change(g, lambda v: matrix @ v, s)
    assert change.item() == pytest.approx(
        (g @ s + 0.5 * s @ matrix @ s).item(), rel=1e-12
    )


def test_quadratic_model_predicts_the_loss_change_of_an_mlp():
    # A small step: L(theta + s) - L(theta) = g^T s + s^T H s / 2 + O(|s|^3).
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 5)).to(F64)
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(32, 5, generator=gen, dtype=F64)
    targets = torch.randint(0, 5, (32,), generator=gen)
    model = FunctionalModel(module, loss=F.cross_entropy, dtype=F64)
    operator = HessianOperator(model, inputs, targets)
    theta = flatten(model.params)

    def loss(flat: Tensor) -> float:
        return model.loss_at(unflatten(flat, model.params), inputs, targets).item()

    g = operator.gradient()
    step = newton_direction(operator, g, damping=1.0, max_iters=20)
    step_small = 0.05 * step.direction / step.direction.norm()
    predicted = quadratic_model_change(g, operator, step_small).item()
    actual = loss(theta + step_small) - loss(theta)
    assert predicted < 0
    assert actual == pytest.approx(predicted, rel=1e-2)
    first_order = (g @ step_small).item()
    assert abs(actual - predicted) < 0.1 * abs(actual - first_order)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"rhs": torch.zeros(2, 2)},
            ValueError,
            r"flat vector of shape \(p,\), got shape \(2, 2\)",
        ),
        (
            {"damping": -0.1},
            ValueError,
            "damping must be a finite number >= 0, got -0.1",
        ),
        (
            {"damping": float("nan")},
            ValueError,
            "damping must be a finite number >= 0, got nan",
        ),
        (
            {"rtol": 0.0},
            ValueError,
            "rtol must be a positive finite tolerance, got 0.0",
        ),
        (
            {"max_iters": 0},
            ValueError,
            "max_iters must be a positive int or None .* got 0",
        ),
        (
            {"max_iters": 2.5},
            ValueError,
            "max_iters must be a positive int or None .* got 2.5",
        ),
        (
            {"max_iters": True},
            ValueError,
            "max_iters must be a positive int or None .* got True",
        ),
    ],
)
def test_cg_rejects_bad_arguments(kwargs, error, message):
    args = {"rhs": torch.ones(4, dtype=F64), **kwargs}
    with pytest.raises(error, match=message):
        conjugate_gradient(lambda v: v, **args)


def test_quadratic_model_change_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"same shape, got \(3,\) and \(4,\)"):
        quadratic_model_change(torch.ones(3), lambda v: v, torch.ones(4))
