"""DiagCurvatureAdam on 2 gloo ranks: averaged estimates, ZeRO and FSDP2.

One spawn of 2 ranks runs every scenario (the start of the processes costs more
than the scenarios); each test then checks its part of the results:

- the feed's averaging (``curvature_estimate`` + ``set_curvature``) with each
  rank's own probes leaves identical optimizer state on both ranks;
- with shared probes and shared label noise, 2 ranks of B/2 samples equal one
  process on B samples;
- ``ZeroRedundancyOptimizer(optimizer_class=DiagCurvatureAdam)`` under DDP equals
  DDP with the optimizer itself;
- under FSDP2 (``fully_shard``, DTensor parameters) the state is sharded like the
  parameters and training equals DDP, for the squared-gradient source and for an
  estimate-fed source (full-tensor estimates, one of them NaN and dropped).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_on_ranks
from torch import Tensor, nn

from curvlightning.core import (
    FunctionalModel,
    ProbeSource,
    Reducer,
    SingleProcess,
    TorchDistributed,
    get_likelihood,
    unflatten,
)
from curvlightning.lightning.feed import curvature_estimate
from curvlightning.optim import DiagCurvatureAdam, adahessian_like, sophia_like

pytestmark = pytest.mark.distributed

F64 = torch.float64
CATEGORICAL = get_likelihood("categorical")
SPLIT = (6, 10)  # unequal local batches: the means are weighted by sample count
STEPS = 20
FEED_CASES = {"hessian": ("hessian", 1), "gnb": ("fisher", 2), "mc": ("fisher", 3)}


# ------------------------------------------------------------------ model and data
def _mlp() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return net.to(F64)


def _batch(step: int, size: int = sum(SPLIT)) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(size, 4, generator=gen, dtype=F64)
    return x, torch.randint(0, 3, (size,), generator=gen)


def _local(step: int, rank: int, split: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    x, y = _batch(step)
    start = sum(split[:rank])
    return x[start : start + split[rank]], y[start : start + split[rank]]


def _state(opt: DiagCurvatureAdam, params: list[Tensor]) -> list[dict[str, Tensor]]:
    keys = ("exp_avg", "exp_curv", "step", "curv_step")
    return [{k: _full(opt.state[p][k]) for k in keys} for p in params]


def _full(tensor: Tensor) -> Tensor:
    full = getattr(tensor, "full_tensor", None)
    return (full() if full is not None else tensor).detach().clone()


# ------------------------------------------------------------- feed averaging
def _train_with_feed(
    reducer: Reducer, rank: int, split: tuple[int, ...], source: str, shared: bool
) -> dict:
    """STEPS steps: averaged gradient, averaged estimate every k steps, step."""
    net = _mlp()
    params = list(net.parameters())
    curvature, every = FEED_CASES[source]
    make = adahessian_like if curvature == "hessian" else sophia_like
    opt = make(params, lr=0.05, update_every=every)
    for step in range(STEPS):
        x, y = _local(step, rank, split)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        for p in params:
            p.grad = reducer.weighted_mean(p.grad, len(y))
        if step % every == 0:
            model = FunctionalModel(net, loss=CATEGORICAL.loss, dtype=F64)
            probes = ProbeSource(seed=9, step=step, rank=rank, shared=shared)
            values = curvature_estimate(
                model,
                x,
                y,
                source,
                probes=probes,
                reducer=reducer,
                num_samples=len(y),
                num_probes=3,
                mc_samples=2,
                likelihood=CATEGORICAL,
            )
            assert opt.set_curvature(list(unflatten(values, model.params)))
        opt.step()
    return {"params": [_full(p) for p in params], "state": _state(opt, params)}


def _feed_scenarios(rank: int) -> dict:
    reducer = TorchDistributed()
    return {
        (source, shared): _train_with_feed(reducer, rank, SPLIT, source, shared)
        for source in FEED_CASES
        for shared in (False, True)
    }


# ----------------------------------------------------------------- ZeRO, DDP
def _ddp_run(rank: int, source: str, zero: bool = False) -> list[Tensor]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    net = _mlp()
    model = DistributedDataParallel(net)
    kwargs = {"lr": 0.05, "weight_decay": 0.1, "curvature": source}
    if zero:
        opt = ZeroRedundancyOptimizer(
            net.parameters(), optimizer_class=DiagCurvatureAdam, **kwargs
        )
    else:
        opt = DiagCurvatureAdam(net.parameters(), **kwargs)
    for step in range(STEPS):
        x, y = _local(step, rank, (8, 8))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if source != "squared_gradient" and step % 2 == 0:
            _set_local_curvature(opt, list(net.parameters()), step)
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def _set_local_curvature(opt, params: list[Tensor], step: int) -> None:
    """As the feed does: one decision on finiteness, each rank its own parameters.

    ``ZeroRedundancyOptimizer`` gives each rank's local optimizer (``opt.optim``)
    a part of the parameters.
    """
    target = getattr(opt, "optim", opt)
    estimate = _fed_estimate(params, step)
    finite = all(bool(torch.isfinite(e).all()) for e in estimate)
    owned = {id(p) for group in target.param_groups for p in group["params"]}
    local = {p: e for p, e in zip(params, estimate, strict=True) if id(p) in owned}
    target.set_curvature(local, drop=not finite)


def _fed_estimate(params: list[Tensor], step: int) -> list[Tensor]:
    """A GNB-like ``N g^2`` from the full gradient; NaN at step 4 (dropped)."""
    estimate = [16 * _full(p.grad) ** 2 for p in params]
    if step == 4:
        estimate[0] = torch.full_like(estimate[0], float("nan"))
    return estimate


# --------------------------------------------------------------------- FSDP2
def _fsdp_run(source: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    net = _mlp()
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    params = list(net.parameters())
    opt = DiagCurvatureAdam(params, lr=0.05, weight_decay=0.1, curvature=source)
    for step in range(STEPS):
        x, y = _local(step, dist.get_rank(), (8, 8))
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if source != "squared_gradient" and step % 2 == 0:
            opt.set_curvature(_fed_estimate(params, step))
        opt.step()
    placements = [
        (
            isinstance(p, DTensor),
            p.placements,
            opt.state[p]["exp_avg"].placements,
            opt.state[p]["exp_curv"].placements,
        )
        for p in params
    ]
    return {
        "params": [_full(p) for p in params],
        "placements": placements,
        "num_dropped": opt.num_dropped,
    }


def _sharding_scenarios(rank: int) -> dict:
    out = {"ddp": {}, "zero": {}, "fsdp": {}}
    for source in ("squared_gradient", "fisher"):
        out["ddp"][source] = _ddp_run(rank, source)
        out["fsdp"][source] = _fsdp_run(source)
        out["zero"][source] = _ddp_run(rank, source, zero=True)
    return out


def _all_scenarios(rank: int, world_size: int) -> dict:
    return {"feed": _feed_scenarios(rank), "sharded": _sharding_scenarios(rank)}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_on_ranks(_all_scenarios, world_size=2, timeout=240)


# ---------------------------------------------------------------------- tests
def _assert_trees_close(a, b, **tol) -> None:
    if isinstance(a, Tensor):
        torch.testing.assert_close(a, b, **tol)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_trees_close(a[key], b[key], **tol)
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_trees_close(x, y, **tol)


@pytest.mark.parametrize("source", list(FEED_CASES))
def test_averaged_estimates_leave_identical_state_on_every_rank(
    results: list[dict], source: str
) -> None:
    rank0, rank1 = (r["feed"][(source, False)] for r in results)
    _assert_trees_close(rank0, rank1, rtol=0, atol=0)
    curv_steps = {float(s["curv_step"]) for s in rank0["state"]}
    assert curv_steps == {len(range(0, STEPS, FEED_CASES[source][1]))}
    assert all((s["exp_curv"] != 0).any() for s in rank0["state"])


@pytest.mark.parametrize("source", list(FEED_CASES))
def test_shared_probes_on_two_ranks_equal_one_process_on_the_full_batch(
    results: list[dict], source: str
) -> None:
    single = _train_with_feed(SingleProcess(), 0, (sum(SPLIT),), source, True)
    for rank in results:
        _assert_trees_close(rank["feed"][(source, True)], single, rtol=1e-5, atol=0)


@pytest.mark.parametrize("source", ["squared_gradient", "fisher"])
def test_zero_redundancy_optimizer_equals_ddp(results: list[dict], source: str) -> None:
    for rank in results:
        sharded = rank["sharded"]
        _assert_trees_close(
            sharded["zero"][source], sharded["ddp"][source], rtol=1e-5, atol=0
        )


@pytest.mark.parametrize("source", ["squared_gradient", "fisher"])
def test_fsdp2_state_is_sharded_like_the_parameters_and_equals_ddp(
    results: list[dict], source: str
) -> None:
    for rank in results:
        fsdp = rank["sharded"]["fsdp"][source]
        for is_dtensor, placement, exp_avg, exp_curv in fsdp["placements"]:
            assert is_dtensor
            assert placement == exp_avg == exp_curv
            assert "Shard" in str(placement)
        _assert_trees_close(
            fsdp["params"], rank["sharded"]["ddp"][source], rtol=1e-5, atol=1e-12
        )
        assert fsdp["num_dropped"] == (source == "fisher")
