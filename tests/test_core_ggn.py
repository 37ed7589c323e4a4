"""Gauss-Newton products and the output-sampling trace against dense matrices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlightning.core.functional import FunctionalModel, flatten, unflatten
from curvlightning.core.ggn import (
    GGNOperator,
    ggn_trace_output_sampling,
    loss_hessian_product,
    loss_hessian_sqrt_product,
)
from curvlightning.core.likelihoods import LIKELIHOODS, get_likelihood
from curvlightning.core.probes import ProbeSource

DT = torch.float64
N, K = 8, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors gain nothing from a thread pool, which only waits for cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def targets_for(name: str) -> torch.Tensor:
    if name == "categorical":
        return torch.randint(0, K, (N,))
    if name == "gaussian":
        return torch.randn(N, K, dtype=DT)
    return torch.rand(N, K, dtype=DT)


def make_problem(name: str, net: nn.Module | None = None, seed: int = 0):
    torch.manual_seed(seed)
    # 4*6+6 + 6*3+3 = 51 parameters.
    net = net or nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, K))
    likelihood = get_likelihood(name)
    model = FunctionalModel(net.to(DT), loss=likelihood.loss)
    return model, torch.randn(N, 4, dtype=DT), targets_for(name), likelihood


def dense_ggn(model, x, y, likelihood) -> torch.Tensor:
    """``J^T H_z J`` from the dense Jacobian and the autodiff Hessian in z."""
    theta = flatten(model.params)

    def outputs(t):
        return model.outputs(unflatten(t, model.params), x)

    jac = torch.func.jacrev(outputs)(theta).reshape(N * K, -1)
    z = outputs(theta).detach()
    h_z = torch.func.hessian(lambda o: likelihood.loss(o, y))(z).reshape(N * K, -1)
    return jac.T @ h_z @ jac


def dense_hessian(model, x, y) -> torch.Tensor:
    def loss(t):
        return model.loss_at(unflatten(t, model.params), x, y)

    return torch.func.hessian(loss)(flatten(model.params))


def assert_products_close(actual, expected, rtol=1e-6):
    atol = rtol * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk_size", [None, 1])
@pytest.mark.parametrize("name", LIKELIHOODS)
def test_ggn_products_equal_dense_jacobian_products(name, chunk_size):
    model, x, y, likelihood = make_problem(name)
    ggn = dense_ggn(model, x, y, likelihood)
    operator = GGNOperator(model, x, y, name, chunk_size=chunk_size)
    probes = torch.randn(4, model.num_params, dtype=DT)
    assert_products_close(operator.matmat(probes), probes @ ggn)
    assert_products_close(operator(probes[0]), ggn @ probes[0])
    assert operator.num_matvecs == 5 and operator.dim == model.num_params


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_loss_hessian_and_its_square_root_match_autodiff(name):
    torch.manual_seed(1)
    likelihood = get_likelihood(name)
    z, y = torch.randn(N, K, dtype=DT), targets_for(name)
    h_z = torch.func.hessian(lambda o: likelihood.loss(o, y))(z).reshape(N * K, -1)
    u = torch.randn(5, N, K, dtype=DT)
    hu = loss_hessian_product(likelihood, z, u)
    torch.testing.assert_close(hu.reshape(5, -1), u.reshape(5, -1) @ h_z)
    basis = torch.eye(N * K, dtype=DT).reshape(N * K, N, K)
    root = loss_hessian_sqrt_product(likelihood, z, basis).reshape(N * K, -1).T
    torch.testing.assert_close(root @ root.T, h_z)
    su = loss_hessian_sqrt_product(likelihood, z, u)
    torch.testing.assert_close(su.reshape(5, -1), u.reshape(5, -1) @ root.T)


@pytest.mark.parametrize("name", ["categorical", "gaussian"])
def test_ggn_equals_hessian_for_a_linear_model(name):
    model, x, y, _ = make_problem(name, net=nn.Linear(4, K))
    operator = GGNOperator(model, x, y, name)
    identity = torch.eye(model.num_params, dtype=DT)
    assert_products_close(operator.matmat(identity), dense_hessian(model, x, y))


def test_ggn_and_hessian_diagonals_agree_for_a_relu_network():
    # Outputs are affine in each single weight given the activation pattern.
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU())
    model, x, y, likelihood = make_problem(
        "categorical", nn.Sequential(*net, nn.Linear(5, K))
    )
    hessian = dense_hessian(model, x, y)
    ggn = dense_ggn(model, x, y, likelihood)
    torch.testing.assert_close(hessian.diagonal(), ggn.diagonal())
    assert float((hessian - ggn).abs().max()) > 1e-3  # off the diagonal they differ


def test_gradient_and_loss_are_the_likelihoods():
    model, x, y, likelihood = make_problem("categorical")
    operator = GGNOperator(model, x, y)
    theta = flatten(model.params)
    expected = torch.func.grad(
        lambda t: model.loss_at(unflatten(t, model.params), x, y)
    )
    torch.testing.assert_close(operator.gradient(), expected(theta))
    torch.testing.assert_close(operator.loss(), F.cross_entropy(model.module(x), y))
    with pytest.raises(ValueError, match=r"gradient\(\) needs the targets"):
        GGNOperator(model, x).gradient()


@pytest.mark.parametrize(
    ("name", "kind"), [("categorical", "rademacher"), ("bernoulli", "gaussian")]
)
def test_output_sampling_trace_converges_to_the_dense_trace(name, kind):
    model, x, y, likelihood = make_problem(name)
    exact = float(dense_ggn(model, x, y, likelihood).trace())
    segments = {"first": slice(0, 30), "second": slice(30, model.num_params)}
    estimates = [
        ggn_trace_output_sampling(
            model, x, name, ProbeSource(seed=7, kind=kind), n, segments=segments
        )
        for n in (64, 4096)
    ]
    small, large = estimates
    assert abs(large.item() - exact) <= 4 * float(large.stderr)
    assert abs(large.item() - exact) <= 0.03 * exact
    assert float(large.stderr) < float(small.stderr) / 4  # about 1/sqrt(64)
    assert large.num_matvecs == 4096 and large.num_samples == 4096
    parts = sum(float(p.value) for p in large.parts.values())
    assert parts == pytest.approx(large.item(), rel=1e-12)


def test_output_sampling_chunks_give_the_same_estimate():
    model, x, _, _ = make_problem("categorical")
    probes = ProbeSource(seed=3)
    whole = ggn_trace_output_sampling(model, x, "categorical", probes, 12)
    chunked = ggn_trace_output_sampling(
        model, x, "categorical", probes, 12, chunk_size=5
    )
    torch.testing.assert_close(chunked.value, whole.value)
    torch.testing.assert_close(chunked.stderr, whole.stderr)


def test_errors_name_the_argument():
    model, x, y, _ = make_problem("categorical")
    images = FunctionalModel(nn.Conv2d(1, 2, 3).to(DT), loss=F.mse_loss)
    with pytest.raises(ValueError, match=r"outputs of shape \(N, k\)"):
        GGNOperator(images, torch.randn(2, 1, 5, 5, dtype=DT), likelihood="categorical")
    with pytest.raises(ValueError, match="num_probes must be a positive"):
        ggn_trace_output_sampling(model, x, "categorical", ProbeSource(), 0)
    with pytest.raises(ValueError, match="curvature_likelihood must be one of"):
        GGNOperator(model, x, y, "poisson")
    with pytest.raises(ValueError, match="needs float targets"):
        GGNOperator(model, x, y, "gaussian")
