import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPE,
    Quadratic,
    classification_batch,
    dense_hessian,
    quadratic_loss,
    random_spd,
    tiny_mlp,
)

from curvlightning.core import (
    FunctionalModel,
    HessianOperator,
    ProbeSource,
    hutchinson_diagonal,
    hutchinson_trace,
    segments,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def mlp_hessian():
    """The tiny MLP's functional model, batch and dense Hessian ``(51, 51)``."""
    module = tiny_mlp(0)
    inputs, targets = classification_batch(0)
    model = FunctionalModel(module, loss=F.cross_entropy)
    return (
        model,
        inputs,
        targets,
        dense_hessian(module, F.cross_entropy, inputs, targets),
    )


def _trace(matvec, dim, num_probes, seed=0, **kwargs):
    probes = ProbeSource(seed=seed)
    return hutchinson_trace(matvec, dim, probes, num_probes, dtype=DTYPE, **kwargs)


def _rademacher_stderr(matrix, num_probes):
    """``sqrt(2 (||A||_F^2 - sum_i A_ii^2) / n)``, exact for Rademacher probes."""
    off_diagonal = (matrix**2).sum() - (torch.diagonal(matrix) ** 2).sum()
    return (2 * off_diagonal / num_probes).sqrt()


def test_trace_with_the_operator_equals_trace_with_the_dense_matrix(mlp_hessian):
    model, inputs, targets, hessian = mlp_hessian
    for backend in ("double_backward", "forward_over_reverse"):
        operator = HessianOperator(model, inputs, targets, backend)
        estimate = _trace(operator, operator.dim, 10, seed=3)
        reference = _trace(lambda v: hessian @ v, operator.dim, 10, seed=3)

        torch.testing.assert_close(estimate.value, reference.value, rtol=1e-6, atol=0)
        torch.testing.assert_close(estimate.stderr, reference.stderr, rtol=1e-6, atol=0)
        assert estimate.num_matvecs == operator.num_matvecs == 10


def test_trace_converges_within_four_stderr(mlp_hessian):
    *_, hessian = mlp_hessian
    estimate = _trace(lambda v: hessian @ v, hessian.shape[0], 4000)
    exact = torch.trace(hessian)

    assert abs(estimate.value - exact) <= 4 * estimate.stderr
    assert estimate.stderr < 0.02 * exact  # the check has power
    assert estimate.num_matvecs == estimate.num_samples == 4000
    expected = _rademacher_stderr(hessian, 4000)
    assert estimate.stderr == pytest.approx(float(expected), rel=0.1)


def test_stderr_matches_the_spread_over_seeds(mlp_hessian):
    *_, hessian = mlp_hessian
    estimates = [
        _trace(lambda v: hessian @ v, hessian.shape[0], 100, seed=seed)
        for seed in range(40)
    ]
    values = torch.stack([e.value for e in estimates])
    mean_stderr = torch.stack([e.stderr for e in estimates]).mean()

    assert values.std() == pytest.approx(float(mean_stderr), rel=0.25)
    expected = _rademacher_stderr(hessian, 100)
    assert mean_stderr == pytest.approx(float(expected), rel=0.1)
    assert abs(values.mean() - torch.trace(hessian)) <= 4 * mean_stderr / 40**0.5


def test_stderr_shrinks_as_inverse_square_root_of_probes(mlp_hessian):
    *_, hessian = mlp_hessian
    ratios = [
        _trace(lambda v: hessian @ v, hessian.shape[0], 400, seed=seed).stderr
        / _trace(lambda v: hessian @ v, hessian.shape[0], 100, seed=seed).stderr
        for seed in range(3)
    ]
    for ratio in ratios:
        assert 0.4 < ratio < 0.6


def test_one_probe_has_no_stderr(mlp_hessian):
    *_, hessian = mlp_hessian
    estimate = _trace(lambda v: hessian @ v, hessian.shape[0], 1)

    assert torch.isfinite(estimate.value)
    assert torch.isnan(estimate.stderr)


@pytest.mark.parametrize("num_probes", [1, 2, 7])
def test_rademacher_trace_is_exact_for_a_diagonal_matrix(num_probes):
    diagonal = torch.linspace(-1.0, 3.0, 9, dtype=DTYPE)
    module = Quadratic(torch.linspace(-2.0, 2.0, 9, dtype=DTYPE))
    model = FunctionalModel(module, loss=quadratic_loss(torch.diag(diagonal)))
    operator = HessianOperator(model, torch.zeros(1), torch.zeros(1))

    for matvec in (lambda v: diagonal * v, operator):
        estimate = _trace(matvec, 9, num_probes, seed=num_probes)
        assert estimate.value == pytest.approx(float(diagonal.sum()), abs=1e-12)
        if num_probes > 1:
            assert estimate.stderr == pytest.approx(0.0, abs=1e-12)


def test_trace_of_a_concave_quadratic_converges_to_the_negative_value():
    matrix = random_spd(0, 12)
    module = Quadratic(torch.linspace(-1.0, 1.0, 12, dtype=DTYPE))
    model = FunctionalModel(module, loss=quadratic_loss(-matrix))
    operator = HessianOperator(model, torch.zeros(1), torch.zeros(1))
    estimate = _trace(operator, 12, 1000)
    exact = -torch.trace(matrix)

    assert estimate.value < 0
    assert abs(estimate.value - exact) <= 4 * estimate.stderr
    assert estimate.stderr < 0.05 * abs(exact)


def test_trace_of_a_negative_diagonal_is_exact():
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=DTYPE)
    module = Quadratic(torch.ones(4, dtype=DTYPE))
    model = FunctionalModel(
        module, loss=lambda theta, _: -0.5 * (weights * theta**2).sum()
    )
    operator = HessianOperator(model, torch.zeros(1), torch.zeros(1))

    estimate = _trace(operator, 4, 3)
    assert estimate.value == pytest.approx(-7.5, abs=1e-12)


def test_parts_sum_to_the_total_and_converge_to_block_traces(mlp_hessian):
    model, _, _, hessian = mlp_hessian
    blocks = segments(model)
    estimate = _trace(lambda v: hessian @ v, hessian.shape[0], 4000, segments=blocks)

    assert list(estimate.parts) == list(model.names)
    total = sum(part.value for part in estimate.parts.values())
    torch.testing.assert_close(total, estimate.value, rtol=1e-12, atol=0)
    for name, block in blocks.items():
        part, exact = estimate.parts[name], torch.trace(hessian[block, block])
        assert abs(part.value - exact) <= 4 * part.stderr, name
        assert part.stderr < 0.1 * abs(exact), name


def test_block_traces_equal_the_diagonal_summed_over_the_block(mlp_hessian):
    model, _, _, hessian = mlp_hessian
    blocks = segments(model)
    trace = _trace(lambda v: hessian @ v, hessian.shape[0], 50, segments=blocks)
    diagonal = hutchinson_diagonal(
        lambda v: hessian @ v, hessian.shape[0], ProbeSource(seed=0), 50, dtype=DTYPE
    )

    torch.testing.assert_close(trace.value, diagonal.value.sum(), rtol=1e-12, atol=0)
    for name, block in blocks.items():
        torch.testing.assert_close(
            trace.parts[name].value, diagonal.value[block].sum(), rtol=1e-12, atol=0
        )


def test_diagonal_converges_to_the_dense_diagonal(mlp_hessian):
    *_, hessian = mlp_hessian
    num_probes = 4000
    estimate = hutchinson_diagonal(
        lambda v: hessian @ v,
        hessian.shape[0],
        ProbeSource(seed=1),
        num_probes,
        dtype=DTYPE,
    )
    exact = torch.diagonal(hessian)
    z = (estimate.value - exact) / estimate.stderr

    assert z.abs().max() < 4.5
    assert 0.7 < z.pow(2).mean().sqrt() < 1.3
    # Coordinate j has variance sum_{k != j} H_jk^2 / n with Rademacher probes.
    off_diagonal = (hessian**2).sum(dim=1) - exact**2
    torch.testing.assert_close(
        estimate.stderr, (off_diagonal / num_probes).sqrt(), rtol=0.1, atol=0
    )
    assert estimate.stderr.max() < 0.01
    assert estimate.num_matvecs == num_probes


def test_diagonal_with_the_operator_equals_diagonal_with_the_dense_matrix(
    mlp_hessian,
):
    model, inputs, targets, hessian = mlp_hessian
    operator = HessianOperator(model, inputs, targets)
    probes = ProbeSource(seed=5)
    estimate = hutchinson_diagonal(operator, operator.dim, probes, 10, dtype=DTYPE)
    reference = hutchinson_diagonal(
        lambda v: hessian @ v, operator.dim, probes, 10, dtype=DTYPE
    )

    torch.testing.assert_close(estimate.value, reference.value, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(estimate.stderr, reference.stderr, rtol=1e-6, atol=1e-12)


def test_diagonal_is_exact_for_a_diagonal_matrix():
    diagonal = torch.tensor([-2.0, 0.0, 1.5, 3.0], dtype=DTYPE)
    estimate = hutchinson_diagonal(
        lambda v: diagonal * v, 4, ProbeSource(seed=2), 3, dtype=DTYPE
    )

    torch.testing.assert_close(estimate.value, diagonal, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        estimate.stderr, torch.zeros_like(diagonal), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("estimator", [hutchinson_trace, hutchinson_diagonal])
@pytest.mark.parametrize(
    ("num_probes", "error", "message"),
    [
        (0, ValueError, "num_probes must be a positive number of probes, got 0"),
        (-3, ValueError, "num_probes must be a positive number of probes, got -3"),
        (2.0, TypeError, "num_probes must be an int, got 2.0"),
        ("4", TypeError, "num_probes must be an int, got '4'"),
        (True, TypeError, "num_probes must be an int, got True"),
    ],
)
def test_bad_num_probes_is_refused(estimator, num_probes, error, message):
    calls = []

    def matvec(v):
        calls.append(v)
        return v

    with pytest.raises(error, match=message):
        estimator(matvec, 3, ProbeSource(), num_probes)
    assert not calls


def test_unknown_probe_kind_is_refused():
    with pytest.raises(ValueError, match=r"kind must be one of .*'sphere'"):
        ProbeSource(kind="sphere")
