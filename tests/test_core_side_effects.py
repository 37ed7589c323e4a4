import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPE,
    NUM_CLASSES,
    NUM_HIDDEN,
    NUM_INPUTS,
    classification_batch,
    dense_hessian,
    dense_matrix,
    tiny_mlp,
)
from torch import nn

from curvlightning.core import (
    HVP_BACKENDS,
    FunctionalModel,
    HessianOperator,
    ProbeSource,
    fisher_diagonal,
    flatten,
    get_likelihood,
    hutchinson_trace,
    segments,
    unflatten,
)

pytestmark = pytest.mark.usefixtures("single_thread")

CATEGORICAL = get_likelihood("categorical")


def _snapshot(module):
    """Everything a curvature pass must leave as it found it."""
    return {
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
        "dtypes": {n: p.dtype for n, p in module.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in module.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
        "buffers": {n: b.clone() for n, b in module.named_buffers()},
        "training": {n: m.training for n, m in module.named_modules()},
        "track_running_stats": {
            n: m.track_running_stats
            for n, m in module.named_modules()
            if isinstance(m, nn.BatchNorm1d)
        },
        "rng": torch.get_rng_state(),
    }


def _assert_same(before, after):
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], torch.Tensor):
            assert torch.equal(before[key], after[key]), key
            continue
        assert before[key].keys() == after[key].keys(), key
        for name, value in before[key].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == after[key][name].dtype, (key, name)
                assert torch.equal(value, after[key][name]), (key, name)
            else:
                assert value == after[key][name], (key, name)


def _batch_norm_dropout_model(dtype):
    module = tiny_mlp(0, dropout=0.3, batch_norm=True).to(dtype)
    inputs, _ = classification_batch(1, num_samples=16)
    module(inputs.to(dtype))  # running stats away from their initial values
    gen = torch.Generator().manual_seed(2)
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
    return module


@pytest.mark.parametrize(
    ("module_dtype", "pass_dtype"),
    [(torch.float64, None), (torch.float32, torch.float64)],
)
def test_curvature_passes_leave_the_module_as_they_found_it(module_dtype, pass_dtype):
    module = _batch_norm_dropout_model(module_dtype)
    inputs, targets = classification_batch(3, num_samples=16)
    inputs = inputs.to(module_dtype)
    torch.manual_seed(1234)
    before = _snapshot(module)
    assert before["buffers"]["1.num_batches_tracked"] == 1
    assert before["training"]["1"] and before["training"]["3"]

    model = FunctionalModel(module, loss=F.cross_entropy, dtype=pass_dtype)
    for backend in HVP_BACKENDS:
        operator = HessianOperator(model, inputs, targets, backend)
        product = operator(torch.ones(operator.dim))
        assert torch.isfinite(product).all() and product.abs().max() > 0
        operator.gradient()
        operator.loss()
        hutchinson_trace(operator, operator.dim, ProbeSource(seed=0), 2)
    fisher_diagonal(model, inputs, targets, CATEGORICAL, "gnb", mc_samples=3)

    _assert_same(before, _snapshot(module))


def test_batch_norm_pass_uses_batch_statistics():
    module = _batch_norm_dropout_model(DTYPE)
    inputs, targets = classification_batch(3, num_samples=16)
    model = FunctionalModel(module, loss=F.cross_entropy)

    # Training mode normalises with the batch's own statistics: the running ones
    # would give another loss.
    train_loss = F.cross_entropy(model.outputs(model.params, inputs), targets).detach()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        expected = F.cross_entropy(module(inputs), targets).detach()
    module[1].eval()
    eval_loss = F.cross_entropy(model.outputs(model.params, inputs), targets)

    torch.testing.assert_close(train_loss, expected)
    assert abs(float(train_loss - eval_loss)) > 1e-3


class _WithFrozen(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(NUM_INPUTS, NUM_HIDDEN)
        self.second = nn.Linear(NUM_HIDDEN, NUM_CLASSES)
        self.first.weight.requires_grad_(False)

    def forward(self, inputs):
        return self.second(torch.tanh(self.first(inputs)))


def _frozen_reference(module, inputs, targets):
    """The dense Hessian over the trainable parameters, the frozen one a constant."""
    frozen = module.first.weight.detach().to(DTYPE)
    like = [module.first.bias, module.second.weight, module.second.bias]

    def loss(flat):
        bias, weight, out_bias = unflatten(flat, like)
        hidden = torch.tanh(F.linear(inputs, frozen, bias))
        return F.cross_entropy(F.linear(hidden, weight, out_bias), targets)

    theta = flatten([p.detach().to(DTYPE) for p in like])
    return torch.func.hessian(loss)(theta)


def test_frozen_parameters_are_left_out():
    module = _WithFrozen().to(DTYPE)
    inputs, targets = classification_batch(4)
    model = FunctionalModel(module, loss=F.cross_entropy)

    assert model.names == ("first.bias", "second.weight", "second.bias")
    assert model.num_params == NUM_HIDDEN + NUM_HIDDEN * NUM_CLASSES + NUM_CLASSES
    expected = _frozen_reference(module, inputs, targets)
    for backend in HVP_BACKENDS:
        operator = HessianOperator(model, inputs, targets, backend)
        matrix = dense_matrix(operator, operator.dim)
        torch.testing.assert_close(matrix, expected, rtol=1e-6, atol=1e-12)
    assert not module.first.weight.requires_grad
    assert module.first.weight.grad is None


def test_frozen_parameters_follow_the_pass_dtype():
    module = _WithFrozen()  # float32, pass in float64
    inputs, targets = classification_batch(4)
    inputs = inputs.float()
    model = FunctionalModel(module, loss=F.cross_entropy, dtype=DTYPE)
    expected = _frozen_reference(module, inputs.to(DTYPE), targets)

    operator = HessianOperator(model, inputs, targets)
    matrix = dense_matrix(operator, operator.dim)
    torch.testing.assert_close(matrix, expected, rtol=1e-6, atol=1e-12)


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_mlp(5)
        self.unused = nn.Linear(2, 2).to(DTYPE)

    def forward(self, inputs):
        return self.net(inputs)


@pytest.mark.parametrize("backend", HVP_BACKENDS)
def test_unused_layer_has_zero_hessian_rows(backend):
    module = _WithUnused()
    inputs, targets = classification_batch(5)
    model = FunctionalModel(module, loss=F.cross_entropy)
    blocks = segments(model)
    used = slice(0, blocks["unused.weight"].start)
    expected = dense_hessian(module.net, F.cross_entropy, inputs, targets)

    operator = HessianOperator(model, inputs, targets, backend)
    matrix = dense_matrix(operator, operator.dim)
    torch.testing.assert_close(matrix[used, used], expected, rtol=1e-6, atol=1e-12)
    assert torch.equal(matrix[used.stop :], torch.zeros_like(matrix[used.stop :]))
    assert torch.equal(matrix[:, used.stop :], torch.zeros_like(matrix[:, used.stop :]))
    assert torch.equal(operator.gradient()[used.stop :], torch.zeros(6, dtype=DTYPE))

    estimate = hutchinson_trace(
        operator, operator.dim, ProbeSource(), 8, dtype=DTYPE, segments=blocks
    )
    assert estimate.parts["unused.weight"].value == 0
    assert estimate.parts["unused.bias"].value == 0
    assert estimate.parts["net.0.weight"].value != 0


@pytest.mark.parametrize("kind", ["empirical", "mc", "gnb"])
def test_unused_layer_has_zero_fisher(kind):
    module = _WithUnused()
    inputs, targets = classification_batch(5)
    model = FunctionalModel(module)
    unused = slice(segments(model)["unused.weight"].start, model.num_params)

    estimate = fisher_diagonal(model, inputs, targets, CATEGORICAL, kind, mc_samples=2)
    assert torch.equal(estimate.value[unused], torch.zeros(6, dtype=DTYPE))
    assert (estimate.value[: unused.start] > 0).all()


class _Tied(nn.Module):
    """``z = B tanh(A x + a) + b`` with ``B`` the same Parameter as ``A``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.first = nn.Linear(NUM_CLASSES, NUM_CLASSES)
        self.second = nn.Linear(NUM_CLASSES, NUM_CLASSES)
        self.second.weight = self.first.weight

    def forward(self, inputs):
        return self.second(torch.tanh(self.first(inputs)))


def _tied_reference(module, inputs, targets):
    """The dense gradient and Hessian with the shared matrix written out twice."""
    like = [module.first.weight, module.first.bias, module.second.bias]

    def loss(flat):
        weight, bias, out_bias = unflatten(flat, like)
        hidden = torch.tanh(F.linear(inputs, weight, bias))
        return F.cross_entropy(F.linear(hidden, weight, out_bias), targets)

    theta = flatten([p.detach() for p in like])
    return torch.func.grad(loss)(theta), torch.func.hessian(loss)(theta)


def test_tied_weight_appears_once():
    module = _Tied().to(DTYPE)
    model = FunctionalModel(module, loss=F.cross_entropy)

    assert model.names == ("first.weight", "first.bias", "second.bias")
    assert model.num_params == 9 + 3 + 3


@pytest.mark.parametrize("backend", HVP_BACKENDS)
def test_tied_weight_gets_the_curvature_of_both_uses(backend):
    module = _Tied().to(DTYPE)
    gen = torch.Generator().manual_seed(7)
    inputs = torch.randn(8, NUM_CLASSES, generator=gen, dtype=DTYPE)
    targets = torch.randint(0, NUM_CLASSES, (8,), generator=gen)
    model = FunctionalModel(module, loss=F.cross_entropy)
    gradient, hessian = _tied_reference(module, inputs, targets)

    operator = HessianOperator(model, inputs, targets, backend)
    matrix = dense_matrix(operator, operator.dim)
    torch.testing.assert_close(matrix, hessian, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(operator.gradient(), gradient, rtol=1e-6, atol=1e-12)
