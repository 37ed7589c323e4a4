"""Adaptive Hutchinson estimators: the stopping rule, its bounds and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from curvlightning.core import ProbeSource, hutchinson_diagonal, hutchinson_trace
from curvlightning.core.adaptive import (
    hutchinson_diagonal_adaptive,
    hutchinson_trace_adaptive,
)

F64 = torch.float64
DIM = 40


def symmetric(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """``U diag(eigenvalues) U^T`` with a random orthogonal ``U``."""
    gen = torch.Generator().manual_seed(seed)
    dim = eigenvalues.numel()
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64)).Q
    return (basis * eigenvalues.to(F64)) @ basis.T


@pytest.fixture(scope="module")
def spd() -> Tensor:
    return symmetric(torch.linspace(0.5, 2.0, DIM, dtype=F64), seed=1)


def matvec_of(matrix: Tensor):
    return lambda v: matrix @ v


def meets(estimate, rtol: float) -> bool:
    return bool(estimate.stderr <= rtol * estimate.value.abs())


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_trace_stops_at_the_first_count_that_meets_the_tolerance(spd, sign):
    # The same probes as hutchinson_trace: the estimate after n probes is
    # hutchinson_trace with n probes, which meets the rule, and n - 1 did not. On
    # -A the rule must use |value| (a signed value would never stop).
    matrix = sign * spd
    probes = ProbeSource(seed=2)
    rtol = 0.02
    est = hutchinson_trace_adaptive(
        matvec_of(matrix),
        DIM,
        probes,
        rtol=rtol,
        min_probes=4,
        max_matvecs=2000,
        dtype=F64,
    )
    n = est.num_samples
    assert est.num_matvecs == n and 4 < n < 2000
    assert meets(est, rtol) and torch.sign(est.value) == sign
    fixed = hutchinson_trace(matvec_of(matrix), DIM, probes, n, dtype=F64)
    torch.testing.assert_close(est.value, fixed.value, rtol=1e-12, atol=0)
    torch.testing.assert_close(est.stderr, fixed.stderr, rtol=1e-12, atol=0)
    before = hutchinson_trace(matvec_of(matrix), DIM, probes, n - 1, dtype=F64)
    assert not meets(before, rtol)
    assert abs(est.item() - torch.trace(matrix).item()) < 4 * est.stderr


def test_trace_respects_min_probes_and_max_matvecs(spd):
    calls = []

    def matvec(v):
        calls.append(1)
        return spd @ v

    loose = hutchinson_trace_adaptive(
        matvec, DIM, ProbeSource(), rtol=10.0, min_probes=7, max_matvecs=50, dtype=F64
    )
    assert loose.num_matvecs == loose.num_samples == len(calls) == 7
    calls.clear()
    tight = hutchinson_trace_adaptive(
        matvec, DIM, ProbeSource(), rtol=1e-9, min_probes=3, max_matvecs=13, dtype=F64
    )
    assert tight.num_matvecs == len(calls) == 13 and not meets(tight, 1e-9)


def test_zero_matrix_stops_at_min_probes():
    est = hutchinson_trace_adaptive(
        lambda v: 0 * v, DIM, ProbeSource(), rtol=0.1, min_probes=5, max_matvecs=50
    )
    assert est.num_samples == 5 and est.item() == 0.0 and est.stderr.item() == 0.0


def test_diagonal_stops_on_the_norm_of_the_stderr(spd):
    probes = ProbeSource(seed=3)
    rtol = 0.1
    est = hutchinson_diagonal_adaptive(
        matvec_of(spd),
        DIM,
        probes,
        rtol=rtol,
        min_probes=4,
        max_matvecs=2000,
        dtype=F64,
    )
    n = est.num_samples
    assert est.value.shape == est.stderr.shape == (DIM,) and 4 < n < 2000
    assert est.stderr.norm() <= rtol * est.value.norm()
    fixed = hutchinson_diagonal(matvec_of(spd), DIM, probes, n, dtype=F64)
    torch.testing.assert_close(est.value, fixed.value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(est.stderr, fixed.stderr, rtol=1e-8, atol=1e-12)
    before = hutchinson_diagonal(matvec_of(spd), DIM, probes, n - 1, dtype=F64)
    assert before.stderr.norm() > rtol * before.value.norm()
    assert ((est.value - spd.diagonal()).abs() < 5 * est.stderr).all()


def test_diagonal_respects_min_probes_and_max_matvecs(spd):
    loose = hutchinson_diagonal_adaptive(
        matvec_of(-spd),
        DIM,
        ProbeSource(),
        rtol=10.0,
        min_probes=6,
        max_matvecs=9,
        dtype=F64,
    )
    assert loose.num_matvecs == 6
    tight = hutchinson_diagonal_adaptive(
        matvec_of(-spd),
        DIM,
        ProbeSource(),
        rtol=1e-6,
        min_probes=6,
        max_matvecs=9,
        dtype=F64,
    )
    assert tight.num_matvecs == tight.num_samples == 9


def test_reduce_sample_sees_every_term(spd):
    # A weighted mean over ranks, here of one rank: the terms pass through it.
    seen = []

    def reduce_sample(term):
        seen.append(term)
        return 3 * term

    est = hutchinson_trace_adaptive(
        matvec_of(spd),
        DIM,
        ProbeSource(),
        rtol=10.0,
        min_probes=5,
        max_matvecs=9,
        reduce_sample=reduce_sample,
        dtype=F64,
    )
    plain = hutchinson_trace(matvec_of(spd), DIM, ProbeSource(), 5, dtype=F64)
    assert len(seen) == 5
    torch.testing.assert_close(est.value, 3 * plain.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rtol": 0.0}, ValueError, "rtol must be a positive finite .* got 0.0"),
        ({"rtol": -0.1}, ValueError, "rtol must be a positive finite .* got -0.1"),
        ({"rtol": float("nan")}, ValueError, "rtol must be a positive finite .* nan"),
        ({"rtol": float("inf")}, ValueError, "rtol must be a positive finite .* inf"),
        ({"rtol": "0.1"}, TypeError, "rtol must be a float, got '0.1'"),
        ({"rtol": True}, TypeError, "rtol must be a float, got True"),
        ({"min_probes": 1}, ValueError, "min_probes must be at least 2 .* got 1"),
        ({"min_probes": 0}, ValueError, "min_probes must be a positive number"),
        ({"min_probes": 2.0}, TypeError, "min_probes must be an int, got 2.0"),
        ({"max_matvecs": 0}, ValueError, "max_matvecs must be a positive number"),
        (
            {"min_probes": 10, "max_matvecs": 5},
            ValueError,
            "max_matvecs=5 is below min_probes=10: raise max_matvecs",
        ),
    ],
)
@pytest.mark.parametrize(
    "estimator", [hutchinson_trace_adaptive, hutchinson_diagonal_adaptive]
)
def test_bad_arguments_are_named(estimator, kwargs, error, message):
    args = {"rtol": 0.1, "min_probes": 4, "max_matvecs": 20, **kwargs}
    calls = []

    def matvec(v):
        calls.append(1)
        return v

    with pytest.raises(error, match=message):
        estimator(matvec, DIM, ProbeSource(), **args)
    assert not calls  # validated before any matvec
