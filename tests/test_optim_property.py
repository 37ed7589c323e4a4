"""Whatever the curvature estimate, an estimate-fed step is bounded and descends.

Over random curvature values (negative, zero, tiny, huge, NaN, inf), random
gradients and momentum histories, every coordinate of every step of the
``"hessian"`` and ``"fisher"`` sources moves by at most ``lr`` beyond the decoupled
weight decay, never against the sign of the momentum ``m``; non-finite estimates
(including squares that overflow) are dropped and counted.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from curvlightning.optim import DiagCurvatureAdam

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
SHAPES = ((5,), (2, 3, 2))

special = st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e200, -1e-300])
curvature_value = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False), st.floats(-1e-8, 1e-8), special
)
gradient_value = st.floats(-1e3, 1e3, allow_nan=False)


@st.composite
def histories(draw: st.DrawFn) -> dict:
    shape = draw(st.sampled_from(SHAPES))
    numel = math.prod(shape)
    steps = draw(st.integers(1, 6))
    return {
        "shape": shape,
        "curvature": draw(st.sampled_from(["hessian", "fisher"])),
        "spatial_averaging": len(shape) >= 3 and draw(st.booleans()),
        "lr": draw(st.sampled_from([1e-3, 0.1, 1.0])),
        "weight_decay": draw(st.sampled_from([0.0, 0.1])),
        "betas": (draw(st.floats(0.0, 0.99)), draw(st.floats(0.0, 0.999))),
        "eps": draw(st.sampled_from([1e-12, 1e-8, 1e-3])),
        "hessian_power": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "rho": draw(st.sampled_from([1e-3, 0.04, 10.0])),
        "theta": draw(st.lists(gradient_value, min_size=numel, max_size=numel)),
        "grads": draw(
            st.lists(
                st.lists(gradient_value, min_size=numel, max_size=numel),
                min_size=steps,
                max_size=steps,
            )
        ),
        "estimates": draw(
            st.lists(
                st.none() | st.lists(curvature_value, min_size=numel, max_size=numel),
                min_size=steps,
                max_size=steps,
            )
        ),
    }


def _optimizer(theta: nn.Parameter, case: dict) -> DiagCurvatureAdam:
    extra = {"hessian_power": case["hessian_power"]}
    if case["curvature"] == "fisher":
        extra = {"rho": case["rho"]}
    return DiagCurvatureAdam(
        [theta],
        lr=case["lr"],
        betas=case["betas"],
        eps=case["eps"],
        weight_decay=case["weight_decay"],
        curvature=case["curvature"],
        spatial_averaging=case["spatial_averaging"],
        **extra,
    )


def _enters_finite(estimate: Tensor, case: dict) -> bool:
    """Whether the value that enters h is finite (computed independently)."""
    if case["spatial_averaging"]:
        estimate = estimate.abs().mean(dim=2, keepdim=True)
    if case["curvature"] == "hessian":
        estimate = estimate * estimate
    return bool(torch.isfinite(estimate).all())


@settings(max_examples=300, deadline=None)
@given(histories())
def test_step_is_bounded_by_lr_and_follows_the_momentum(case: dict) -> None:
    theta = nn.Parameter(torch.tensor(case["theta"], dtype=F64).reshape(case["shape"]))
    opt = _optimizer(theta, case)
    lr, wd = case["lr"], case["weight_decay"]
    expected_dropped = 0
    for grad, estimate in zip(case["grads"], case["estimates"], strict=True):
        if estimate is not None:
            estimate = torch.tensor(estimate, dtype=F64).reshape(case["shape"])
            finite = _enters_finite(estimate, case)
            expected_dropped += not finite
            assert opt.set_curvature([estimate]) is finite
        theta.grad = torch.tensor(grad, dtype=F64).reshape(case["shape"])
        decayed = theta.detach() * (1 - lr * wd)
        opt.step()

        move = theta.detach() - decayed
        momentum = opt.state[theta]["exp_avg"]
        assert torch.isfinite(theta).all()
        # the step itself is at most lr; storing theta rounds by an ulp of theta
        rounding = 2 * torch.finfo(F64).eps * decayed.abs()
        assert (move.abs() <= lr * (1 + 1e-12) + rounding).all(), (move, lr)
        assert (move * momentum <= 0).all(), (move, momentum)
        assert opt.state[theta]["exp_curv"].isfinite().all()
    assert opt.num_dropped == expected_dropped
