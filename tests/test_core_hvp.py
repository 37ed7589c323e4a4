import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPE,
    classification_batch,
    dense_hessian,
    dense_hessian_pinned,
    dense_matrix,
    sample_gradient,
    tiny_mlp,
)

from curvlightning.core import HVP_BACKENDS, FunctionalModel, HessianOperator

pytestmark = pytest.mark.usefixtures("single_thread")

RTOL, ATOL = 1e-6, 1e-12


def _operator(module, inputs, targets, backend, rng_seed=0):
    model = FunctionalModel(module, loss=F.cross_entropy, rng_seed=rng_seed)
    return HessianOperator(model, inputs, targets, backend)


@pytest.mark.parametrize("backend", HVP_BACKENDS)
def test_hvp_equals_dense_hessian(backend):
    module = tiny_mlp(0)
    inputs, targets = classification_batch(0)
    expected = dense_hessian(module, F.cross_entropy, inputs, targets)
    operator = _operator(module, inputs, targets, backend)

    assert operator.dim == expected.shape[0] == 51
    matrix = dense_matrix(operator, operator.dim)
    torch.testing.assert_close(matrix, expected, rtol=RTOL, atol=ATOL)
    assert operator.num_matvecs == operator.dim
    # The tiny model is not degenerate: a wrong product would show.
    assert expected.abs().max() > 0.1
    assert (expected - torch.diag(torch.diagonal(expected))).abs().max() > 0.01


@pytest.mark.parametrize("backend", HVP_BACKENDS)
def test_hvp_of_random_vectors_is_linear_in_the_vector(backend):
    module = tiny_mlp(1)
    inputs, targets = classification_batch(1)
    expected = dense_hessian(module, F.cross_entropy, inputs, targets)
    operator = _operator(module, inputs, targets, backend)
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(3, operator.dim, generator=gen, dtype=DTYPE)

    for v in vectors:
        torch.testing.assert_close(operator(v), expected @ v, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(
        operator(2.0 * vectors[0] - vectors[1]),
        expected @ (2.0 * vectors[0] - vectors[1]),
        rtol=RTOL,
        atol=ATOL,
    )


def test_gradient_equals_ordinary_backward():
    module = tiny_mlp(2)
    inputs, targets = classification_batch(2)
    expected = sample_gradient(module, F.cross_entropy(module(inputs), targets))
    operator = _operator(module, inputs, targets, "double_backward")

    torch.testing.assert_close(operator.gradient(), expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(
        operator.loss(), F.cross_entropy(module(inputs), targets).detach()
    )


def test_dropout_backends_share_the_pinned_mask_of_the_dense_hessian():
    module = tiny_mlp(3, dropout=0.5)
    inputs, targets = classification_batch(3)
    seed = 7
    expected = dense_hessian_pinned(module, F.cross_entropy, inputs, targets, seed)

    matrices = {
        backend: dense_matrix(
            _operator(module, inputs, targets, backend, rng_seed=seed),
            expected.shape[0],
        )
        for backend in HVP_BACKENDS
    }
    torch.testing.assert_close(
        matrices["double_backward"],
        matrices["forward_over_reverse"],
        rtol=RTOL,
        atol=ATOL,
    )
    for matrix in matrices.values():
        torch.testing.assert_close(matrix, expected, rtol=RTOL, atol=ATOL)

    # The mask matters: another seed, or no dropout at all, gives another Hessian,
    # so agreement above means the same mask was drawn in every product.
    other = dense_hessian_pinned(module, F.cross_entropy, inputs, targets, seed + 1)
    assert (other - expected).abs().max() > 1e-3
    without_dropout = dense_hessian(module.eval(), F.cross_entropy, inputs, targets)
    assert (without_dropout - expected).abs().max() > 1e-3


def test_unknown_backend_is_refused():
    module = tiny_mlp(0)
    inputs, targets = classification_batch(0)
    with pytest.raises(ValueError, match=r"backend must be one of .*'finite'"):
        _operator(module, inputs, targets, "finite")


def test_module_without_trainable_parameter_is_refused():
    module = tiny_mlp(0).requires_grad_(False)
    with pytest.raises(ValueError, match="Sequential has no trainable parameter"):
        FunctionalModel(module)
    with pytest.raises(ValueError, match="ReLU has no trainable parameter"):
        FunctionalModel(torch.nn.ReLU())


def test_loss_at_without_a_loss_is_refused():
    model = FunctionalModel(tiny_mlp(0))
    inputs, targets = classification_batch(0)
    with pytest.raises(ValueError, match="needs a loss to evaluate loss_at"):
        model.loss_at(model.params, inputs, targets)
