"""Core estimates on 2 gloo ranks against the single-process ones.

With shared probes (and shared label noise), R ranks holding B/R samples each must
reproduce 1 rank holding all B samples, value and standard error, whatever the
split; with independent probes the combined standard error falls by about sqrt(R).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from functools import partial

import pytest
import torch
from distributed import RankFailure, run_on_ranks, terminate_on_timeout
from torch import Tensor, nn

from curvlightning.core import (
    Estimate,
    FunctionalModel,
    HessianOperator,
    ProbeSource,
    Reducer,
    SingleProcess,
    TorchDistributed,
    default_reducer,
    fisher_diagonal,
    flatten,
    get_likelihood,
    hutchinson_diagonal,
    hutchinson_trace,
    reduce_estimate,
    segments,
    unflatten,
)

pytestmark = pytest.mark.distributed

F64 = torch.float64
CATEGORICAL = get_likelihood("categorical")
SEED, STEP = 7, 3
NUM_PROBES = 8
SPLITS = {"equal": (8, 8), "unequal": (5, 11)}
QUANTITIES = (
    "hutchinson_trace",
    "hutchinson_diagonal",
    "fisher_empirical",
    "fisher_mc",
    "fisher_gnb",
)
INDEPENDENT_BATCH, INDEPENDENT_PROBES = 256, 200


# ------------------------------------------------------------------ model and data
def _model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return net.to(F64)


def _data(size: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(size, 4, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (size,), generator=gen)
    return x, y


def _local(x: Tensor, y: Tensor, counts: tuple[int, ...], rank: int):
    start = sum(counts[:rank])
    return x[start : start + counts[rank]], y[start : start + counts[rank]]


def _functional() -> FunctionalModel:
    return FunctionalModel(_model(), loss=CATEGORICAL.loss, dtype=F64)


def _fields(estimate: Estimate) -> dict[str, Tensor]:
    out = {"value": estimate.value, "stderr": estimate.stderr}
    for name, part in estimate.parts.items():
        out[f"{name}/value"] = part.value
        out[f"{name}/stderr"] = part.stderr
    return out


# ------------------------------------------------------------- the 2-rank run
def _on_rank(rank: int, world_size: int) -> dict:
    """Everything the tests below check, computed in one 2-rank run."""
    return {
        "shared": _shared_on_rank(rank),
        "independent": _independent_on_rank(rank),
        "reducer": _reducer_on_rank(rank),
    }


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """One spawn for all the core checks (each rank imports the package)."""
    return run_on_ranks(_on_rank, world_size=2)


# ------------------------------------------------------------- shared probes
def _shared_estimates(x: Tensor, y: Tensor, reducer: Reducer) -> dict[str, dict]:
    """Every shared-probe estimate on this rank's batch, reduced over ranks."""
    model = _functional()
    blocks = segments(model)
    probes = ProbeSource(SEED, STEP, reducer.rank, shared=True)
    reduce = partial(reducer.weighted_mean, weight=y.shape[0])
    operator = HessianOperator(model, x, y)
    out = {
        "hutchinson_trace": hutchinson_trace(
            operator,
            operator.dim,
            probes,
            NUM_PROBES,
            segments=blocks,
            reduce_samples=reduce,
            dtype=F64,
        ),
        "hutchinson_diagonal": hutchinson_diagonal(
            operator, operator.dim, probes, NUM_PROBES, reduce_samples=reduce, dtype=F64
        ),
    }
    labels = ProbeSource(SEED, STEP, reducer.rank, shared=True, stream="labels")
    for kind, draws in (("empirical", 1), ("mc", 2), ("gnb", 3)):
        out[f"fisher_{kind}"] = fisher_diagonal(
            model,
            x,
            y,
            CATEGORICAL,
            kind,
            mc_samples=draws,
            probes=labels,
            reducer=reducer,
            segments=blocks,
        )
    return {key: _fields(est) for key, est in out.items()}


def _shared_on_rank(rank: int) -> dict:
    results = {}
    for name, counts in SPLITS.items():
        x, y = _local(*_data(sum(counts)), counts, rank)
        results[name] = _shared_estimates(x, y, TorchDistributed())
    return results


@pytest.fixture(scope="module")
def shared_runs(two_ranks):
    ranks = [result["shared"] for result in two_ranks]
    single = {
        name: _shared_estimates(*_data(sum(counts)), SingleProcess())
        for name, counts in SPLITS.items()
    }
    return ranks, single


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("split", SPLITS)
def test_shared_probes_reproduce_single_process(shared_runs, split, quantity):
    ranks, single = shared_runs
    expected = single[split][quantity]
    assert {"value", "stderr"} <= set(expected)
    if quantity != "hutchinson_diagonal":
        assert {"0.weight/value", "2.bias/stderr"} <= set(expected)
    assert torch.isfinite(expected["stderr"]).all()
    for rank, result in enumerate(ranks):
        got = result[split][quantity]
        assert set(got) == set(expected)
        for field, value in expected.items():
            torch.testing.assert_close(
                got[field],
                value,
                rtol=1e-5,
                atol=1e-12,
                msg=lambda m, r=rank, f=field: f"rank {r}, {f}: {m}",
            )


# ------------------------------------------------------------ independent probes
def _independent_trace(x: Tensor, y: Tensor, rank: int) -> Estimate:
    operator = HessianOperator(_functional(), x, y)
    probes = ProbeSource(SEED, STEP, rank, shared=False)
    return hutchinson_trace(
        operator, operator.dim, probes, INDEPENDENT_PROBES, dtype=F64
    )


def _independent_on_rank(rank: int) -> dict:
    half = INDEPENDENT_BATCH // 2
    x, y = _local(*_data(INDEPENDENT_BATCH), (half, half), rank)
    local = _independent_trace(x, y, rank)
    combined = reduce_estimate(local, TorchDistributed(), weight=half)
    return {"local": local.item(), "combined": combined}


def _dense_hessian(x: Tensor, y: Tensor) -> Tensor:
    model = _functional()

    def loss(theta: Tensor) -> Tensor:
        return model.loss_at(unflatten(theta, model.params), x, y)

    return torch.autograd.functional.hessian(loss, flatten(model.params))


def _rademacher_variance(hessian: Tensor) -> float:
    """Variance of one probe's term ``v^T H v``: ``2 (||H||_F^2 - sum_i H_ii^2)``."""
    return float(2 * (hessian.square().sum() - hessian.diagonal().square().sum()))


def test_independent_probes_cut_stderr_by_sqrt_ranks(two_ranks):
    ranks = [result["independent"] for result in two_ranks]
    x, y = _data(INDEPENDENT_BATCH)
    single = _independent_trace(x, y, rank=0)
    combined = ranks[0]["combined"]
    for other in ranks[1:]:
        torch.testing.assert_close(other["combined"].value, combined.value)
        torch.testing.assert_close(other["combined"].stderr, combined.stderr)
    assert ranks[0]["local"] != ranks[1]["local"]
    assert combined.num_matvecs == combined.num_samples == 2 * INDEPENDENT_PROBES

    # The ratio the dense local and global Hessians predict: about 1/sqrt(2) once
    # each rank's Hessian is close to the global one.
    half = INDEPENDENT_BATCH // 2
    local = [_dense_hessian(x[s], y[s]) for s in (slice(None, half), slice(half, None))]
    hessian = _dense_hessian(x, y)
    predicted = (sum(map(_rademacher_variance, local)) ** 0.5 / 2) / (
        _rademacher_variance(hessian) ** 0.5
    )
    ratio = float(combined.stderr / single.stderr)
    message = f"stderr ratio 2 ranks / 1 rank = {ratio:.3f}, predicted {predicted:.3f}"
    assert 0.55 <= ratio <= 0.9, message
    assert abs(ratio / predicted - 1) < 0.25, message

    dense = float(hessian.trace())
    error = abs(combined.item() - dense)
    assert error <= 4 * float(combined.stderr), (
        f"combined trace {combined.item():.5f} +- {float(combined.stderr):.5f} vs "
        f"dense {dense:.5f}"
    )


# ------------------------------------------------------------------- Reducer
def _reducer_on_rank(rank: int) -> dict:
    reducer = TorchDistributed()
    tensor = torch.tensor([1.0, -2.0], dtype=F64) * (rank + 1)
    before = tensor.clone()
    summed = reducer.all_reduce_sum(tensor)
    return {
        "rank": reducer.rank,
        "world_size": reducer.world_size,
        "default": type(default_reducer()).__name__,
        "sum": summed,
        "input_untouched": torch.equal(tensor, before),
        "weighted_mean": reducer.weighted_mean(tensor, weight=2 * rank + 1),
        "offset_and_total": reducer.offset_and_total((3, 5)[rank]),
        "gather": reducer.all_gather_scalar(rank + 0.5),
        "all_true_both": reducer.all_true(True),
        "all_true_rank0": reducer.all_true(rank == 0),
        "all_true_rank1": reducer.all_true(rank == 1),
        "all_true_none": reducer.all_true(False),
    }


def test_reducer_collectives_on_two_ranks(two_ranks):
    ranks = [result["reducer"] for result in two_ranks]
    offsets = [(0, 8), (3, 8)]
    for rank, got in enumerate(ranks):
        assert (got["rank"], got["world_size"]) == (rank, 2)
        assert got["default"] == "TorchDistributed"
        assert got["input_untouched"]
        torch.testing.assert_close(got["sum"], torch.tensor([3.0, -6.0], dtype=F64))
        # Weights 1 and 3: (1 * [1, -2] + 3 * [2, -4]) / 4, not the plain mean.
        torch.testing.assert_close(
            got["weighted_mean"], torch.tensor([1.75, -3.5], dtype=F64)
        )
        assert got["offset_and_total"] == offsets[rank]
        assert got["gather"] == [0.5, 1.5]
        assert got["all_true_both"] is True
        assert got["all_true_rank0"] is False
        assert got["all_true_rank1"] is False
        assert got["all_true_none"] is False


# -------------------------------------------------------- the rank runner itself
def _raise_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("bad value on rank one")
    return rank


def _hang_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(600)
    return rank


def test_runner_names_the_rank_that_raised():
    with pytest.raises(RankFailure, match="rank 1 of 2 raised") as info:
        run_on_ranks(_raise_on_rank_one)
    assert info.value.ranks == [1]
    assert "ValueError: bad value on rank one" in str(info.value)
    assert "_raise_on_rank_one" in str(info.value)


def test_runner_names_the_rank_that_hung():
    start = time.monotonic()
    hung = r"rank\(s\) \[1\] of 2 did not finish within 3 s"
    with pytest.raises(RankFailure, match=hung) as info:
        run_on_ranks(_hang_on_rank_one, timeout=3.0)
    assert info.value.ranks == [1]
    assert "rank(s) [0] finished" in str(info.value)
    assert time.monotonic() - start < 60


def test_watchdog_terminates_spawned_ranks_that_hang():
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=time.sleep, args=(600,), daemon=True)]
    procs[0].start()
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank\(s\) \[0\] still running") as info:
        with terminate_on_timeout(1.0, lambda: procs):
            procs[0].join()
    assert info.value.ranks == [0]
    assert not procs[0].is_alive()
    assert time.monotonic() - start < 30
