"""DiagCurvatureAdam against AdamW, hand-computed updates, state and errors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlightning.core import (
    FunctionalModel,
    HessianOperator,
    ProbeSource,
    hutchinson_diagonal,
    unflatten,
)
from curvlightning.optim import (
    ADAHESSIAN_DEFAULTS,
    SOPHIA_DEFAULTS,
    DiagCurvatureAdam,
    adahessian_like,
    sophia_like,
)

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh())
    net.append(nn.Linear(7, 3))
    return net.to(dtype)


def _groups(net: nn.Sequential) -> list[dict]:
    """Three groups with their own lr and weight decay (one with the defaults)."""
    return [
        {"params": net[0].parameters(), "lr": 1e-2, "weight_decay": 0.1},
        {"params": net[2].parameters(), "lr": 3e-3, "weight_decay": 0.0},
        {"params": net[4].parameters()},
    ]


def _data(seed: int = 1, n: int = 16, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=dtype), torch.randint(
        0, 3, (n,), generator=gen
    )


def _backward(net: nn.Module, step: int, dtype: torch.dtype = torch.float32) -> None:
    x, y = _data(seed=step, dtype=dtype)
    F.cross_entropy(net(x), y).backward()


# --------------------------------------------------------------------- AdamW
@pytest.mark.parametrize("maximize", [False, True])
def test_squared_gradient_equals_adamw_over_50_steps(maximize: bool) -> None:
    net_ref, net = _mlp(), _mlp()
    ref = torch.optim.AdamW(_groups(net_ref), lr=2e-3, maximize=maximize)
    opt = DiagCurvatureAdam(_groups(net), lr=2e-3, maximize=maximize)
    for step in range(50):
        for model, optimizer in ((net_ref, ref), (net, opt)):
            optimizer.zero_grad()
            _backward(model, step)
            optimizer.step()
    for p_ref, p in zip(net_ref.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(
            opt.state[p]["exp_curv"], ref.state[p_ref]["exp_avg_sq"], rtol=1e-6, atol=0
        )
        assert float(opt.state[p]["curv_step"]) == 50


def test_squared_gradient_update_every_refreshes_h_on_schedule() -> None:
    net = _mlp()
    opt = DiagCurvatureAdam(net.parameters(), update_every=3)
    history = []
    for step in range(7):
        opt.zero_grad()
        _backward(net, step)
        p = net[0].weight
        expected = None
        if step % 3 == 0 and step:
            expected = 0.999 * opt.state[p]["exp_curv"] + 0.001 * p.grad**2
        previous = opt.state[p]["exp_curv"].clone() if opt.state[p] else None
        opt.step()
        history.append(float(opt.state[p]["curv_step"]))
        if expected is not None:
            torch.testing.assert_close(opt.state[p]["exp_curv"], expected)
        elif previous is not None:
            assert torch.equal(opt.state[p]["exp_curv"], previous)
    assert history == [1, 1, 1, 2, 2, 2, 3]


# ------------------------------------------------------- hessian (AdaHessian)
class Quadratic(nn.Module):
    """A parameter vector that is its own output, whatever the input."""

    def __init__(self, theta: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, inputs: Tensor) -> Tensor:
        return self.theta


def _separable_quadratic() -> tuple[nn.Module, Tensor, Tensor]:
    """``L = 0.5 sum_i a_i theta_i^2``: gradient ``a * theta``, Hessian ``diag(a)``.

    The curvatures span a clipped coordinate (0.25), a negative one (-1) and one
    below ``eps`` (1e-6).
    """
    a = torch.tensor([4.0, 0.25, -1.0, 1e-6, 9.0], dtype=F64)
    theta = torch.tensor([0.5, -2.0, 1.0, 3.0, -0.1], dtype=F64)
    return Quadratic(theta), a, theta


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_hessian_source_matches_hand_computed_update(power: float) -> None:
    module, a, theta0 = _separable_quadratic()

    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (a * outputs * outputs).sum()

    lr, wd, eps, (b1, b2) = 0.1, 0.01, 1e-4, (0.9, 0.999)
    opt = DiagCurvatureAdam(
        module.parameters(),
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        weight_decay=wd,
        curvature="hessian",
        hessian_power=power,
    )

    # Hutchinson with Rademacher probes is exact for a diagonal Hessian
    model = FunctionalModel(module, loss=loss, dtype=F64)
    operator = HessianOperator(model, torch.zeros(1), torch.zeros(1))
    diagonal = hutchinson_diagonal(operator, 5, ProbeSource(seed=3), 2, dtype=F64)
    torch.testing.assert_close(diagonal.value, a, rtol=0, atol=1e-15)
    assert opt.set_curvature({module.theta: diagonal.value}) is True

    module.theta.grad = a * theta0
    opt.step()
    # t = 1, s = 1: m_hat = g, h_hat = a^2, u = g / (|a|^q + eps), clipped to 1
    expected = [
        t * (1 - lr * wd) - lr * max(-1.0, min(1.0, ai * t / (abs(ai) ** power + eps)))
        for ai, t in zip(a.tolist(), theta0.tolist(), strict=True)
    ]
    torch.testing.assert_close(module.theta.detach(), torch.tensor(expected, dtype=F64))

    # second step without a new estimate: t = 2 but s stays 1
    theta1 = module.theta.detach().clone()
    g2 = a * theta1
    module.theta.grad = g2
    opt.step()
    g1 = (a * theta0).tolist()
    m = [b1 * (1 - b1) * x + (1 - b1) * y for x, y in zip(g1, g2.tolist(), strict=True)]
    expected = [
        t * (1 - lr * wd)
        - lr * max(-1.0, min(1.0, mi / (1 - b1**2) / (abs(ai) ** power + eps)))
        for ai, t, mi in zip(a.tolist(), theta1.tolist(), m, strict=True)
    ]
    torch.testing.assert_close(module.theta.detach(), torch.tensor(expected, dtype=F64))


# ---------------------------------------------------------- fisher (Sophia)
def test_fisher_source_matches_hand_computed_update() -> None:
    theta = nn.Parameter(torch.ones(5, dtype=F64))
    opt = DiagCurvatureAdam(
        [theta],
        lr=0.1,
        betas=(0.5, 0.9),
        eps=0.01,
        weight_decay=0.1,
        curvature="fisher",
        rho=1.0,
    )
    opt.set_curvature([torch.tensor([10.0, 0.0, -2.0, 100.0, 5.0], dtype=F64)])
    theta.grad = torch.tensor([2.0, -3.0, 1.0, 0.5, 4.0], dtype=F64)
    opt.step()
    # m = 0.5 g = [1, -1.5, 0.5, 0.25, 2] (no bias correction)
    # h = 0.1 D = [1, 0, -0.2, 10, 0.5]; max(rho h, eps) = [1, .01, .01, 10, .5]
    # u = [1, -150, 50, 0.025, 4], clipped: [1, -1, 1, 0.025, 1]
    # theta = 1 * (1 - 0.1 * 0.1) - 0.1 u
    expected = torch.tensor([0.89, 1.09, 0.89, 0.9875, 0.89], dtype=F64)
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-14, atol=1e-15)


def test_estimate_fed_source_takes_clipped_sign_steps_before_first_estimate() -> None:
    for curvature in ("hessian", "fisher"):
        theta = nn.Parameter(torch.zeros(3, dtype=F64))
        opt = DiagCurvatureAdam([theta], lr=0.1, weight_decay=0, curvature=curvature)
        theta.grad = torch.tensor([1e-3, -5.0, 0.0], dtype=F64)
        opt.step()
        torch.testing.assert_close(
            theta.detach(), torch.tensor([-0.1, 0.1, 0.0], dtype=F64)
        )


# ------------------------------------------------------- spatial averaging
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, kernel_size=(3, 2)),
        nn.Conv1d(5, 2, kernel_size=3),
        nn.Conv3d(2, 2, kernel_size=2, groups=2),
    ],
    ids=["conv2d", "conv1d", "conv3d-grouped"],
)
@pytest.mark.parametrize("curvature", ["hessian", "fisher"])
def test_spatial_averaging_of_convolution_kernels(
    conv: nn.Module, curvature: str
) -> None:
    conv = conv.to(F64)
    opt = DiagCurvatureAdam(
        conv.parameters(), curvature=curvature, spatial_averaging=True
    )
    gen = torch.Generator().manual_seed(0)
    weight_d = torch.randn(conv.weight.shape, generator=gen, dtype=F64)
    bias_d = torch.randn(conv.bias.shape, generator=gen, dtype=F64)
    opt.set_curvature({conv.weight: weight_d, conv.bias: bias_d})

    # each (output channel, input channel) pair: mean of |D| over its kernel
    out_c, in_c = weight_d.shape[:2]
    averaged = torch.empty(out_c, in_c, dtype=F64)
    for o in range(out_c):
        for i in range(in_c):
            averaged[o, i] = weight_d[o, i].abs().sum() / weight_d[o, i].numel()
    averaged = averaged.reshape(out_c, in_c, *[1] * (weight_d.dim() - 2))
    entered = averaged**2 if curvature == "hessian" else averaged
    bias_entered = bias_d**2 if curvature == "hessian" else bias_d
    h_weight = opt.state[conv.weight]["exp_curv"]
    assert h_weight.shape == conv.weight.shape
    torch.testing.assert_close(h_weight, 0.001 * entered.expand_as(weight_d))
    torch.testing.assert_close(opt.state[conv.bias]["exp_curv"], 0.001 * bias_entered)


# ------------------------------------------------------------- state dicts
def _run(net, opt, steps, start, dtype=F64):
    for step in range(start, start + steps):
        opt.zero_grad()
        _backward(net, step, dtype)
        if opt.param_groups[0]["curvature"] != "squared_gradient" and step % 2 == 0:
            estimates = [p.grad * p.grad * 16 - 1e-3 for p in net.parameters()]
            if step == 2:
                estimates[1] = estimates[1].clone().fill_(math.nan)
            opt.set_curvature(estimates)
        opt.step()


@pytest.mark.parametrize("curvature", ["squared_gradient", "hessian", "fisher"])
def test_state_dict_round_trip_mid_run_continues_identically(curvature: str) -> None:
    net = _mlp(dtype=F64)
    opt = DiagCurvatureAdam(net.parameters(), lr=1e-2, curvature=curvature)
    _run(net, opt, steps=5, start=0)

    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    net2 = _mlp(seed=5, dtype=F64)
    net2.load_state_dict(saved["model"])
    opt2 = DiagCurvatureAdam(net2.parameters(), lr=1e-2, curvature=curvature)
    opt2.load_state_dict(saved["opt"])
    assert opt2.num_dropped == opt.num_dropped == (curvature != "squared_gradient")

    _run(net, opt, steps=5, start=5)
    _run(net2, opt2, steps=5, start=5)
    for p, p2 in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, p2)
        for key in ("exp_avg", "exp_curv", "step", "curv_step"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key]), key
        assert opt2.state[p2]["curv_step"].dtype == torch.float32


# ------------------------------------------------------------------ presets
def test_presets_carry_the_papers_defaults_and_take_overrides() -> None:
    net = _mlp()
    ada = adahessian_like(net.parameters())
    group = ada.param_groups[0]
    for key, value in ADAHESSIAN_DEFAULTS.items():
        assert group[key] == value, key
    sophia = sophia_like(net.parameters(), lr=3e-4, weight_decay=0.2)
    group = sophia.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (3e-4, 0.2)
    assert group["betas"] == SOPHIA_DEFAULTS["betas"] == (0.965, 0.99)
    assert (sophia.update_every, group["curvature"]) == (10, "fisher")
    # rho defaults to 0.04 and the clip to 1: one coordinate with h = 1 / 0.04
    theta = nn.Parameter(torch.zeros(3))
    opt = sophia_like([theta], lr=1.0, betas=(0.0, 0.0), weight_decay=0.0)
    opt.set_curvature([torch.full((3,), 25.0)])
    theta.grad = torch.tensor([0.5, -3.0, 0.0])
    opt.step()
    torch.testing.assert_close(theta.detach(), torch.tensor([-0.5, 1.0, 0.0]))


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1e-3}, "Invalid lr: -0.001"),
        ({"betas": (1.0, 0.999)}, r"Invalid betas\[0\]: 1.0"),
        ({"betas": (0.9, -0.1)}, r"Invalid betas\[1\]: -0.1"),
        ({"betas": (0.9,)}, "Invalid betas"),
        ({"eps": -1.0}, "Invalid eps: -1.0"),
        ({"curvature": "hessian", "eps": 0.0}, "Invalid eps: 0.0.*eps > 0"),
        ({"weight_decay": -0.1}, "Invalid weight_decay: -0.1"),
        ({"curvature": "newton"}, "Invalid curvature: 'newton'.*squared_gradient"),
        ({"update_every": 0}, "Invalid update_every: 0"),
        ({"rho": 0.04}, "Invalid rho: 0.04.*only to curvature='fisher'"),
        ({"curvature": "fisher", "rho": -1.0}, "Invalid rho: -1.0"),
        ({"clip": 0.0}, "Invalid clip: 0.0"),
        ({"curvature": "hessian", "hessian_power": 2.0}, "Invalid hessian_power"),
        ({"hessian_power": 0.5}, "Invalid hessian_power: 0.5.*curvature='hessian'"),
        ({"spatial_averaging": True}, "Invalid spatial_averaging"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiagCurvatureAdam(_mlp().parameters(), **kwargs)


def test_bad_group_option_names_the_group() -> None:
    net = _mlp()
    groups = _groups(net)
    groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"Invalid lr \(parameter group 1\): -1.0"):
        DiagCurvatureAdam(groups)


def test_set_curvature_errors_name_the_problem() -> None:
    net = _mlp()
    opt = DiagCurvatureAdam(net.parameters(), curvature="hessian")
    weight = net[0].weight
    with pytest.raises(ValueError, match=r"shape \(7,\) for parameter #0 of shape"):
        opt.set_curvature({weight: torch.ones(7)})
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.set_curvature({weight.detach().clone(): torch.ones_like(weight)})
    with pytest.raises(ValueError, match="sequence of 2 estimates.*6 parameters"):
        opt.set_curvature([torch.ones_like(weight)] * 2)
    with pytest.raises(ValueError, match="got a float for parameter #0"):
        opt.set_curvature({weight: 1.0})
    plain = DiagCurvatureAdam(net.parameters())
    with pytest.raises(ValueError, match="curvature='squared_gradient'"):
        plain.set_curvature({weight: torch.ones_like(weight)})
    assert not opt.state[weight] and opt.num_dropped == 0


def test_non_finite_estimate_is_dropped_whole_and_counted() -> None:
    net = _mlp()
    opt = DiagCurvatureAdam(net.parameters(), curvature="fisher")
    estimates = [torch.ones_like(p) for p in net.parameters()]
    estimates[3] = estimates[3].clone()
    estimates[3][0] = math.inf
    assert opt.set_curvature(estimates) is False
    drop = [torch.ones_like(p) for p in net.parameters()]
    assert opt.set_curvature(drop, drop=True) is False
    assert opt.num_dropped == 2
    assert all(not opt.state[p] for p in net.parameters())
    assert opt.set_curvature([torch.ones_like(p) for p in net.parameters()]) is True
    state = copy.deepcopy(opt.state_dict())
    assert state["num_dropped"] == 2
    assert all(float(s["curv_step"]) == 1 for s in state["state"].values())


def test_square_that_overflows_is_dropped() -> None:
    theta = nn.Parameter(torch.zeros(2))
    opt = DiagCurvatureAdam([theta], curvature="hessian")
    assert opt.set_curvature([torch.tensor([1e20, 1.0])]) is False
    assert opt.num_dropped == 1


def test_estimate_list_is_cast_to_parameter_dtype() -> None:
    theta = nn.Parameter(torch.zeros(2, dtype=F64))
    opt = DiagCurvatureAdam([theta], curvature="fisher")
    opt.set_curvature([torch.tensor([1.0, 2.0], dtype=torch.float32)])
    assert opt.state[theta]["exp_curv"].dtype == F64


def test_unflattened_flat_diagonal_is_accepted() -> None:
    net = _mlp()
    params = list(net.parameters())
    opt = DiagCurvatureAdam(params, curvature="hessian")
    flat = torch.arange(sum(p.numel() for p in params), dtype=torch.float32)
    assert opt.set_curvature(list(unflatten(flat, params)))
    torch.testing.assert_close(
        opt.state[params[-1]]["exp_curv"], 0.001 * flat[-3:] ** 2
    )
