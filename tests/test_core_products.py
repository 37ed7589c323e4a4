"""Batched and finite-difference Hessian products against the dense Hessian."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlightning.core.functional import FunctionalModel, flatten, unflatten
from curvlightning.core.products import (
    BatchedHessianOperator,
    FiniteDifferenceHessianOperator,
    finite_difference_hvp,
    finite_difference_step,
    unsupported_op,
)

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors gain nothing from a thread pool, which only waits for cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp() -> nn.Module:
    # 4*6+6 + 6*5+5 + 5*3+3 = 83 parameters, smooth everywhere.
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    )


def cnn() -> nn.Module:
    # 3*9+3 + 12*3+3 = 69 parameters.
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 3),
    )


def make_problem(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    net = (mlp() if kind == "mlp" else cnn()).to(DT)
    shape = (10, 4) if kind == "mlp" else (10, 1, 6, 6)
    x = torch.randn(*shape, dtype=DT)
    y = torch.randint(0, 3, (10,))
    return FunctionalModel(net, loss=F.cross_entropy), x, y


def dense_hessian(model: FunctionalModel, x, y) -> torch.Tensor:
    def loss(theta):
        return model.loss_at(unflatten(theta, model.params), x, y)

    return torch.func.hessian(loss)(flatten(model.params))


def assert_products_close(actual, expected, rtol=1e-6):
    atol = rtol * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def problem(request):
    model, x, y = make_problem(request.param)
    return model, x, y, dense_hessian(model, x, y)


@pytest.mark.parametrize(
    ("backend", "chunk_size"),
    [
        ("auto", None),
        ("double_backward", 1),
        ("double_backward", 3),
        ("forward_over_reverse", None),
        ("forward_over_reverse", 2),
    ],
)
def test_matmat_equals_dense_hessian(problem, backend, chunk_size):
    model, x, y, hessian = problem
    probes = torch.randn(5, model.num_params, dtype=DT)
    operator = BatchedHessianOperator(model, x, y, backend, chunk_size=chunk_size)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", RuntimeWarning
        )  # no fallback to the loop on these models
        products = operator.matmat(probes)
    assert_products_close(products, probes @ hessian)
    assert operator.num_matvecs == 5
    assert operator.resolved == ("double_backward" if backend == "auto" else backend)


def test_call_is_a_matvec_counted_per_probe(problem):
    model, x, y, hessian = problem
    operator = BatchedHessianOperator(model, x, y)
    vector = torch.randn(model.num_params, dtype=DT)
    assert_products_close(operator(vector), hessian @ vector)
    operator.matmat(torch.randn(4, model.num_params, dtype=DT))
    assert operator.num_matvecs == 5
    assert operator.dim == model.num_params


def test_gradient_and_loss_match_autograd(problem):
    model, x, y, _ = problem
    theta = flatten(model.params)
    expected = torch.func.grad(
        lambda t: model.loss_at(unflatten(t, model.params), x, y)
    )(theta)
    for backend in ("double_backward", "forward_over_reverse", "finite_difference"):
        operator = BatchedHessianOperator(model, x, y, backend)
        operator(torch.ones(model.num_params, dtype=DT))
        torch.testing.assert_close(operator.gradient(), expected)
        torch.testing.assert_close(operator.loss(), F.cross_entropy(model.module(x), y))


class ClipNorm(torch.autograd.Function):
    """Identity whose backward rescales the cotangent to norm at most 1.

    Its backward branches on a tensor's value, which vmap cannot batch: the
    batched second backward pass fails, the loop works.
    """

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        norm = g.norm()
        return g / norm if norm > 1.0 else g


class ClippedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(ClipNorm.apply(torch.tanh(self.a(x))))


def test_batched_double_backward_falls_back_to_loop_with_a_warning():
    torch.manual_seed(0)
    model = FunctionalModel(ClippedMLP().to(DT), loss=F.cross_entropy)
    x, y = torch.randn(10, 4, dtype=DT), torch.randint(0, 3, (10,))
    probes = torch.randn(4, model.num_params, dtype=DT)
    operator = BatchedHessianOperator(model, x, y, chunk_size=4)
    with pytest.warns(RuntimeWarning, match="one probe at a time"):
        products = operator.matmat(probes)
    assert operator.resolved == "double_backward"
    reference = BatchedHessianOperator(model, x, y, "double_backward", chunk_size=1)
    assert_products_close(products, reference.matmat(probes))
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", RuntimeWarning
        )  # warned once; later blocks loop silently
        operator.matmat(probes)


def test_group_norm_products_are_exact():
    # The vmap rule of group_norm's double backward is wrong in torch 2.13; the
    # products must be right whichever path computes them.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).to(DT)
    model = FunctionalModel(net, loss=F.cross_entropy)
    x, y = torch.randn(6, 1, 4, 4, dtype=DT), torch.randint(0, 3, (6,))
    probes = torch.randn(3, model.num_params, dtype=DT)
    operator = BatchedHessianOperator(model, x, y, "double_backward", chunk_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        products = operator.matmat(probes)
    assert_products_close(products, probes @ dense_hessian(model, x, y))


def test_module_hooks_keep_double_backward_and_name_the_torch_func_failure():
    # A full backward hook wraps the module in an autograd.Function that
    # torch.func cannot transform; plain autograd (and its vmap) still works.
    model, x, y = make_problem("mlp")
    probes = torch.randn(3, model.num_params, dtype=DT)
    expected = probes @ dense_hessian(model, x, y)
    model.module[0].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    operator = BatchedHessianOperator(model, x, y, chunk_size=3)
    assert_products_close(operator.matmat(probes), expected)
    operator = BatchedHessianOperator(model, x, y, "forward_over_reverse")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no promise of a fallback
        with pytest.raises(RuntimeError, match='setup_context.*"double_backward"'):
            operator.matmat(probes)


class RBF(nn.Module):
    """Radial basis features exp(-||x - c_j||) with learned centres c."""

    def __init__(self, explicit: bool = False):
        super().__init__()
        self.centres = nn.Parameter(torch.randn(5, 4))
        self.out = nn.Linear(5, 3)
        self.explicit = explicit

    def forward(self, x):
        if self.explicit:
            dist = (x[:, None, :] - self.centres).square().sum(-1).sqrt()
        else:
            dist = torch.cdist(x, self.centres)
        return self.out(torch.exp(-dist))


@pytest.mark.parametrize("backend", ["auto", "double_backward", "forward_over_reverse"])
def test_unsupported_op_error_names_the_op_and_the_remedy(backend):
    torch.manual_seed(0)
    model = FunctionalModel(RBF().to(DT), loss=F.cross_entropy)
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    operator = BatchedHessianOperator(model, x, y, backend)
    with pytest.raises(RuntimeError, match=r"aten::_cdist .*finite_difference"):
        operator.matmat(torch.randn(2, model.num_params, dtype=DT))


def test_finite_difference_backend_is_the_remedy():
    torch.manual_seed(0)
    net = RBF().to(DT)
    twin = RBF(explicit=True).to(DT)
    twin.load_state_dict(net.state_dict())
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    model = FunctionalModel(net, loss=F.cross_entropy)
    exact = dense_hessian(FunctionalModel(twin, loss=F.cross_entropy), x, y)
    probes = torch.randn(3, model.num_params, dtype=DT)
    operator = BatchedHessianOperator(model, x, y, "finite_difference")
    assert_products_close(operator.matmat(probes), probes @ exact, rtol=1e-7)
    assert operator.resolved == "finite_difference"


@pytest.mark.parametrize(
    ("message", "op"),
    [
        (
            "derivative for aten::_ctc_loss_backward is not implemented",
            "aten::_ctc_loss",
        ),
        ("the derivative for '_cdist_backward' is not implemented.", "aten::_cdist"),
        (
            "Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu"
            " that does not support it because it has not been implemented yet.",
            "aten::_scaled_dot_product_flash_attention_for_cpu",
        ),
        (
            "trying to differentiate twice a function that was marked with "
            "@once_differentiable",
            "a custom autograd.Function marked @once_differentiable",
        ),
        ("The size of tensor a (6) must match the size of tensor b (2)", None),
    ],
)
def test_unsupported_op_parses_torch_messages(message, op):
    assert unsupported_op(RuntimeError(message)) == op


def smooth_problem():
    model, x, y = make_problem("mlp", seed=1)
    return model.module, x, y


def d3_gradient(model, x, y, vector):
    """``d^3 g [v, v, v]`` at theta: the third derivative of g(theta + t v)."""
    theta = flatten(model.params)

    def along(t):
        loss = lambda p: model.loss_at(unflatten(p, model.params), x, y)  # noqa: E731
        return torch.func.grad(loss)(theta + t * vector)

    def derivative(f):
        return lambda t: torch.func.jvp(f, (t,), (torch.ones_like(t),))[1]

    return derivative(derivative(derivative(along)))(torch.zeros((), dtype=DT))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_finite_difference_within_its_documented_error_bound(dtype):
    net, x, y = smooth_problem()
    exact_model = FunctionalModel(net, loss=F.cross_entropy, dtype=DT)
    hessian = dense_hessian(exact_model, x, y)
    theta = flatten(exact_model.params)
    grad_norm = float(BatchedHessianOperator(exact_model, x, y).gradient().norm())
    model = FunctionalModel(net, loss=F.cross_entropy, dtype=dtype)
    eps = torch.finfo(dtype).eps
    torch.manual_seed(3)
    for _ in range(3):
        vector = torch.randn(model.num_params, dtype=DT)
        step = finite_difference_step(float(theta.norm()), float(vector.norm()), dtype)
        error = finite_difference_hvp(model, x, y, vector).double() - hessian @ vector
        truncation = step**2 / 6 * float(d3_gradient(exact_model, x, y, vector).norm())
        spectral = float(torch.linalg.matrix_norm(hessian, 2))
        rounding = eps * (grad_norm + spectral * float(theta.norm())) / step
        assert float(error.norm()) <= 2 * (truncation + rounding)
        relative = float(error.norm() / (hessian @ vector).norm())
        assert relative <= 10 * eps ** (2 / 3)


def test_finite_difference_truncation_error_is_second_order():
    net, x, y = smooth_problem()
    model = FunctionalModel(net, loss=F.cross_entropy)
    vector = torch.randn(model.num_params, dtype=DT)
    exact = dense_hessian(model, x, y) @ vector
    errors = [
        float((finite_difference_hvp(model, x, y, vector, step=h) - exact).norm())
        for h in (2e-3, 1e-3)
    ]
    assert errors[0] / errors[1] == pytest.approx(4.0, rel=0.05)


def test_finite_difference_operator_interface():
    model, x, y = make_problem("mlp")
    hessian = dense_hessian(model, x, y)
    operator = FiniteDifferenceHessianOperator(model, x, y)
    probes = torch.randn(3, model.num_params, dtype=DT)
    assert_products_close(operator.matmat(probes), probes @ hessian, rtol=1e-7)
    assert operator.num_matvecs == 3 and operator.dim == model.num_params
    theta_norm = float(flatten(model.params).norm())
    assert operator.last_step == finite_difference_step(
        theta_norm, float(probes[-1].norm()), DT
    )
    fixed = FiniteDifferenceHessianOperator(model, x, y, step=1e-4)
    fixed(probes[0])
    assert fixed.last_step == 1e-4


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backend": "reverse"}, ValueError, "backend must be one of"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive"),
        ({"chunk_size": 2.0}, TypeError, "chunk_size must be an int"),
    ],
)
def test_invalid_arguments_are_named(kwargs, error, match):
    model, x, y = make_problem("mlp")
    with pytest.raises(error, match=match):
        BatchedHessianOperator(model, x, y, **kwargs)


def test_probe_shape_and_step_errors():
    model, x, y = make_problem("mlp")
    operator = BatchedHessianOperator(model, x, y)
    with pytest.raises(ValueError, match=r"probes must have shape \(num_probes, 83\)"):
        operator.matmat(torch.ones(83, 2, dtype=DT))
    with pytest.raises(ValueError, match="nonzero direction"):
        finite_difference_hvp(model, x, y, torch.zeros(83, dtype=DT))
    with pytest.raises(ValueError, match="step must be positive"):
        FiniteDifferenceHessianOperator(model, x, y, step=-1.0)
