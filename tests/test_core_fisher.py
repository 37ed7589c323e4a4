import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPE,
    classification_batch,
    expected_fisher_categorical,
    ggn_diagonal_gaussian,
    loop_sample_gradients,
    regression_batch,
    tiny_mlp,
)

from curvlightning.core import (
    FunctionalModel,
    ProbeSource,
    fisher_diagonal,
    get_likelihood,
    segments,
)

pytestmark = pytest.mark.usefixtures("single_thread")

CATEGORICAL = get_likelihood("categorical")
GAUSSIAN = get_likelihood("gaussian")


@pytest.fixture(scope="module")
def classifier():
    """The tiny MLP, 64 samples, and the exact expected Fisher diagonal ``(51,)``."""
    module = tiny_mlp(0)
    inputs, targets = classification_batch(0, num_samples=64)
    return module, inputs, targets, expected_fisher_categorical(module, inputs)


def test_empirical_equals_the_loop_over_batches_of_one():
    module = tiny_mlp(1)
    inputs, targets = classification_batch(1, num_samples=16)
    squares = loop_sample_gradients(module, F.cross_entropy, inputs, targets) ** 2
    estimate = fisher_diagonal(
        FunctionalModel(module), inputs, targets, CATEGORICAL, "empirical"
    )

    torch.testing.assert_close(estimate.value, squares.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        estimate.stderr, squares.std(0) / 16**0.5, rtol=1e-6, atol=0
    )
    assert estimate.num_samples == 16


def test_empirical_gaussian_is_scaled_by_the_number_of_outputs():
    module = tiny_mlp(2, num_outputs=2)
    inputs, targets = regression_batch(2, num_samples=16)
    squares = loop_sample_gradients(module, F.mse_loss, inputs, targets) ** 2
    estimate = fisher_diagonal(
        FunctionalModel(module), inputs, targets, GAUSSIAN, "empirical"
    )

    torch.testing.assert_close(estimate.value, 2 * squares.mean(0), rtol=1e-6, atol=0)


def test_empirical_differs_from_the_expected_fisher(classifier):
    module, inputs, targets, exact = classifier
    estimate = fisher_diagonal(
        FunctionalModel(module), inputs, targets, CATEGORICAL, "empirical"
    )

    assert ((estimate.value - exact).abs() / exact).max() > 0.1


def test_mc_converges_to_the_expected_fisher(classifier):
    module, inputs, targets, exact = classifier
    estimate = fisher_diagonal(
        FunctionalModel(module),
        inputs,
        targets,
        CATEGORICAL,
        "mc",
        mc_samples=400,
        probes=ProbeSource(seed=0),
    )

    torch.testing.assert_close(estimate.value, exact, rtol=0.03, atol=0)
    assert estimate.num_samples == 64


def test_gnb_is_unbiased_for_the_expected_fisher(classifier):
    module, inputs, targets, exact = classifier
    draws = 2000
    estimate = fisher_diagonal(
        FunctionalModel(module),
        inputs,
        targets,
        CATEGORICAL,
        "gnb",
        mc_samples=draws,
        probes=ProbeSource(seed=1),
    )
    z = (estimate.value - exact) / estimate.stderr

    # Each draw is c N g_hat^2 with g_hat a mean of N zero-mean terms: about
    # sigma^2 chi^2_1, relative spread sqrt(2), so the stderr is about
    # sqrt(2 / 2000) = 3% of the value (measured: 3.1% median, 3.4% at most).
    relative_stderr = estimate.stderr / exact
    assert relative_stderr.max() < 0.05
    assert relative_stderr.min() > 0.02
    assert z.abs().max() < 4.5
    assert 0.7 < z.pow(2).mean().sqrt() < 1.3
    assert estimate.num_samples == draws


def test_mc_gaussian_converges_to_the_gauss_newton_diagonal():
    module = tiny_mlp(3, num_outputs=2)
    inputs, targets = regression_batch(3, num_samples=64)
    exact = ggn_diagonal_gaussian(module, inputs)
    estimate = fisher_diagonal(
        FunctionalModel(module),
        inputs,
        targets,
        GAUSSIAN,
        "mc",
        mc_samples=600,
        probes=ProbeSource(seed=2),
    )

    torch.testing.assert_close(estimate.value, exact, rtol=0.03, atol=0)


def test_gnb_gaussian_is_unbiased_for_the_gauss_newton_diagonal():
    module = tiny_mlp(4, num_outputs=2)
    inputs, targets = regression_batch(4, num_samples=32)
    exact = ggn_diagonal_gaussian(module, inputs)
    estimate = fisher_diagonal(
        FunctionalModel(module),
        inputs,
        targets,
        GAUSSIAN,
        "gnb",
        mc_samples=1000,
        probes=ProbeSource(seed=3),
    )
    z = (estimate.value - exact) / estimate.stderr

    assert (estimate.stderr / exact).max() < 0.07
    assert z.abs().max() < 4.5


@pytest.mark.parametrize("kind", ["empirical", "mc", "gnb"])
def test_segment_parts_are_sums_of_the_diagonal_over_the_block(kind):
    module = tiny_mlp(5)
    inputs, targets = classification_batch(5, num_samples=16)
    model = FunctionalModel(module)
    blocks = segments(model)
    estimate = fisher_diagonal(
        model, inputs, targets, CATEGORICAL, kind, mc_samples=3, segments=blocks
    )

    assert list(estimate.parts) == list(model.names)
    for name, block in blocks.items():
        torch.testing.assert_close(
            estimate.parts[name].value,
            estimate.value[block].sum(),
            rtol=1e-12,
            atol=0,
        )


def test_segment_stderr_is_the_spread_of_per_sample_block_sums():
    module = tiny_mlp(6)
    inputs, targets = classification_batch(6, num_samples=16)
    model = FunctionalModel(module)
    blocks = segments(model)
    squares = loop_sample_gradients(module, F.cross_entropy, inputs, targets) ** 2
    estimate = fisher_diagonal(
        model, inputs, targets, CATEGORICAL, "empirical", segments=blocks
    )

    for name, block in blocks.items():
        sums = squares[:, block].sum(dim=1)
        expected = sums.std() / 16**0.5
        torch.testing.assert_close(
            estimate.parts[name].stderr, expected, rtol=1e-6, atol=0
        )
        # Not the quadrature sum of the coordinates' errors.
        quadrature = estimate.stderr[block].pow(2).sum().sqrt()
        assert abs(float(quadrature / expected) - 1) > 0.05


def test_fisher_runs_in_the_requested_dtype():
    module = tiny_mlp(7).float()
    inputs, targets = classification_batch(7, num_samples=8)
    estimate = fisher_diagonal(
        FunctionalModel(module, dtype=DTYPE),
        inputs.float(),
        targets,
        CATEGORICAL,
        "empirical",
    )
    reference = fisher_diagonal(
        FunctionalModel(tiny_mlp(7)), inputs, targets, CATEGORICAL, "empirical"
    )

    assert estimate.value.dtype == DTYPE
    torch.testing.assert_close(estimate.value, reference.value, rtol=1e-5, atol=1e-9)


def _fisher(module, inputs, targets, likelihood=CATEGORICAL, **kwargs):
    return fisher_diagonal(
        FunctionalModel(module), inputs, targets, likelihood, **kwargs
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kind": "exact"}, ValueError, r"kind must be one of .*got 'exact'"),
        ({"kind": "mc", "mc_samples": 0}, ValueError, "mc_samples must be a posit"),
        ({"kind": "gnb", "mc_samples": -2}, ValueError, "sampled labels, got -2"),
        ({"kind": "mc", "mc_samples": 1.5}, TypeError, "mc_samples must be an int"),
        ({"kind": "mc", "mc_samples": True}, TypeError, "must be an int, got True"),
    ],
)
def test_bad_kind_or_mc_samples_is_refused(kwargs, error, message):
    inputs, targets = classification_batch(0)
    with pytest.raises(error, match=message):
        _fisher(tiny_mlp(0), inputs, targets, **kwargs)


@pytest.mark.parametrize("kind", ["empirical", "mc", "gnb"])
def test_float_targets_for_the_categorical_are_refused(kind):
    inputs, _ = classification_batch(0)
    targets = torch.zeros(8, dtype=DTYPE)
    with pytest.raises(ValueError, match="needs integer class targets; got torch.f"):
        _fisher(tiny_mlp(0), inputs, targets, kind=kind)


def test_class_targets_of_the_wrong_shape_are_refused():
    inputs, targets = classification_batch(0)
    with pytest.raises(ValueError, match=r"targets of shape \(N,\); got outputs"):
        _fisher(tiny_mlp(0), inputs, targets[:, None])


@pytest.mark.parametrize(
    "targets",
    [
        torch.zeros(8, 3, dtype=DTYPE),
        torch.zeros(8, dtype=DTYPE),
        torch.zeros(8, 2, dtype=torch.long),
    ],
    ids=["too-wide", "flat", "integer"],
)
def test_gaussian_targets_not_shaped_like_the_outputs_are_refused(targets):
    inputs, _ = regression_batch(0)
    with pytest.raises(ValueError, match=r"'gaussian' needs float targets shaped li"):
        _fisher(tiny_mlp(0, num_outputs=2), inputs, targets, GAUSSIAN)


@pytest.mark.parametrize("kind", ["empirical", "mc"])
def test_per_sample_gradients_with_batch_norm_in_training_are_refused(kind):
    module = tiny_mlp(0, batch_norm=True)
    inputs, targets = classification_batch(0)
    with pytest.raises(ValueError, match="undefined for BatchNorm1d in training mode"):
        _fisher(module, inputs, targets, kind=kind)
    # In eval mode, or with the batch-level "gnb", the same module works.
    assert torch.isfinite(_fisher(module, inputs, targets, kind="gnb").value).all()
    assert torch.isfinite(
        _fisher(module.eval(), inputs, targets, kind=kind).value
    ).all()


def test_unknown_likelihood_name_is_refused():
    with pytest.raises(ValueError, match=r"must be one of .*got 'poisson'"):
        get_likelihood("poisson")
    assert get_likelihood(GAUSSIAN) is GAUSSIAN
