"""Exact quadratic forms of sequential networks against the dense Hessian."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_hessian
from torch import nn

from curvlightning.core import (
    FunctionalModel,
    HessianOperator,
    ProbeSource,
    get_likelihood,
    hutchinson_trace,
)
from curvlightning.core.quadform import SequentialQuadraticForm, quadratic_form_trace

pytestmark = pytest.mark.usefixtures("single_thread")


def _net(activation: type[nn.Module]) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), activation(), nn.Linear(6, 5), activation(), nn.Linear(5, 3)
    ).double()


def _batch(kind: str):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    if kind == "categorical":
        return x, torch.randint(0, 3, (10,), generator=gen)
    return x, torch.randn(10, 3, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("activation", [nn.Tanh, nn.Sigmoid, nn.ReLU])
@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_forms_equal_the_dense_hessian(activation, kind):
    net = _net(activation)
    x, y = _batch(kind)
    likelihood = get_likelihood(kind)
    dense = dense_hessian(net, likelihood.loss, x, y)
    form = SequentialQuadraticForm(net, x, y, likelihood)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        v = torch.randn(form.dim, generator=gen, dtype=torch.float64)
        assert float(form(v)) == pytest.approx(float(v @ dense @ v), rel=1e-9)
    assert form.num_matvecs == 5


def test_trace_equals_hutchinson_with_the_same_probes():
    net = _net(nn.Tanh)
    x, y = _batch("categorical")
    likelihood = get_likelihood("categorical")
    model = FunctionalModel(net, loss=likelihood.loss, dtype=torch.float64)
    operator = HessianOperator(model, x, y)
    probes = ProbeSource(seed=4)
    expected = hutchinson_trace(operator, operator.dim, probes, 9, dtype=torch.float64)
    got = quadratic_form_trace(net, x, y, likelihood, probes, 9)
    assert float(got.value) == pytest.approx(float(expected.value), rel=1e-9)
    assert float(got.stderr) == pytest.approx(float(expected.stderr), rel=1e-9)
    assert got.num_matvecs == 9


def test_unsupported_networks_are_named():
    x, y = _batch("categorical")
    likelihood = get_likelihood("categorical")
    with pytest.raises(TypeError, match="does not support Conv1d"):
        SequentialQuadraticForm(nn.Sequential(nn.Conv1d(1, 1, 1)), x, y, likelihood)
    with pytest.raises(TypeError, match="needs an nn.Sequential, got Linear"):
        SequentialQuadraticForm(nn.Linear(4, 3), x, y, likelihood)
    with pytest.raises(ValueError, match="supports the 'categorical' and 'gaussian'"):
        SequentialQuadraticForm(_net(nn.Tanh), x, y, get_likelihood("bernoulli"))
    frozen = _net(nn.Tanh)
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="needs every Linear parameter trainable"):
        SequentialQuadraticForm(frozen, x, y, likelihood)
