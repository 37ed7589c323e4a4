"""Curvature callbacks under Lightning's ``ddp_spawn`` on 2 CPU ranks.

Two ranks holding 8 samples each, with shared probes, must log what one device
holding the same 16 samples logs. The learning rate is 0, so the parameters at every
step are the initial ones and a core computation can serve as a second reference.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import NamedTuple

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from distributed import free_port, terminate_on_timeout
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from curvlightning import (
    CurvatureMixin,
    FisherDiagonal,
    HessianSpectrum,
    HessianTrace,
    JacobianRows,
)
from curvlightning.core import FunctionalModel, fisher_diagonal

pytestmark = pytest.mark.distributed

NUM_SAMPLES, LOCAL_BATCH = 64, 8
STEPS = (2, 4)
TRACE = "curvature/hessian_trace"
FISHER = "curvature/fisher_empirical_trace"
EIGEN = "curvature/hessian_eigenvalues"
DENSITY_TRACE = "curvature/hessian_density_trace"
ROW = "curvature/jacobian_row_norm"


class Classifier(CurvatureMixin, pl.LightningModule):
    """A 4-8-3 tanh MLP trained with cross-entropy by SGD at learning rate 0."""

    curvature_likelihood = "categorical"

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        """Rank r of R reads samples r, r + R, ... in order, 16 / R at a time.

        Lightning's own sampler would shuffle the training data whatever the
        loader says; this one keeps the order, so the ranks' batches at step k
        together are samples 16 k to 16 k + 15 on any number of ranks.
        """
        world_size = self.trainer.world_size
        sampler = DistributedSampler(
            _dataset(), world_size, self.trainer.global_rank, shuffle=False
        )
        return DataLoader(
            _dataset(), batch_size=2 * LOCAL_BATCH // world_size, sampler=sampler
        )


def _dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_SAMPLES, 4, generator=gen)
    y = torch.randint(0, 3, (NUM_SAMPLES,), generator=gen)
    return TensorDataset(x, y)


def _callbacks() -> list[pl.Callback]:
    schedule = {"every_n_steps": 2, "curvature_batch": "fixed", "dtype": "float64"}
    return [
        HessianTrace(num_probes=8, shared_probes=True, **schedule),
        FisherDiagonal(kind="empirical", log_histograms=False, **schedule),
        HessianSpectrum(
            top_k=3, num_steps=12, density_probes=2, density_steps=12, **schedule
        ),
        JacobianRows(num_probes=0, log_heatmap=False, **schedule),
    ]


class Run(NamedTuple):
    """A finished fit: its folder, trainer and (main-process) module."""

    root: Path
    trainer: pl.Trainer
    module: Classifier


def _spawned(trainer: pl.Trainer) -> list:
    """The rank processes ``ddp_spawn`` started (empty before the start)."""
    launcher = getattr(trainer.strategy, "_launcher", None)
    return list(getattr(launcher, "procs", []))


def _fit(root: Path, devices: int) -> Run:
    """Four steps on ``devices`` ranks of ``LOCAL_BATCH * 2 / devices`` samples."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=4,
        callbacks=_callbacks(),
        logger=CSVLogger(root, name="logs"),
        default_root_dir=root,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=1,
    )
    module = Classifier()
    with terminate_on_timeout(120.0, lambda: _spawned(trainer)):
        trainer.fit(module)
    return Run(root, trainer, module)


def _logged(root: Path) -> dict[tuple[str, int], float]:
    """Every ``(metric, step) -> value`` in the run's CSV file."""
    files = sorted(root.glob("logs/version_*/metrics.csv"))
    assert len(files) == 1, files
    out = {}
    with files[0].open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row.pop("step"))
            out.update({(k, step): float(v) for k, v in row.items() if v != ""})
    return out


def _fisher_trace(module: Classifier, indices: range) -> float:
    """The empirical Fisher trace of ``module`` on samples ``indices``, in float64."""
    x, y = _dataset()[list(indices)]
    model = FunctionalModel(module, loss=module.curvature_loss, dtype=torch.float64)
    return float(fisher_diagonal(model, x, y, module.likelihood).value.sum())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MASTER_ADDR", "127.0.0.1")
        env.setenv("MASTER_PORT", str(free_port()))
        env.setenv("GLOO_SOCKET_IFNAME", "lo")
        two = _fit(tmp_path_factory.mktemp("two_ranks"), devices=2)
    one = _fit(tmp_path_factory.mktemp("one_device"), devices=1)
    return two, one


def test_two_ranks_log_what_one_device_logs(runs):
    two, one = runs
    got, expected = _logged(two.root), _logged(one.root)
    keys = {key for key, _ in expected}
    assert {TRACE, f"{TRACE}_stderr", FISHER, f"{FISHER}_stderr"} <= keys
    assert {f"{TRACE}/net.0", f"{TRACE}/net.2", f"{FISHER}/net.0"} <= keys
    assert {f"{EIGEN}/1", f"{EIGEN}/3", DENSITY_TRACE} <= keys
    assert {f"{ROW}/class0", f"{ROW}/class0/net.0"} <= keys
    assert {step for _, step in expected} == set(STEPS)
    assert set(got) == set(expected)
    for (key, step), value in expected.items():
        assert math.isfinite(value), (key, step)
        assert got[key, step] == pytest.approx(value, rel=1e-5), (key, step)


def test_fixed_batch_at_fixed_parameters_gives_one_fisher(runs):
    # The probes of the trace change with the step; the empirical Fisher has none.
    logged = _logged(runs[0].root)
    for key in (FISHER, f"{FISHER}_stderr", f"{FISHER}/net.0"):
        assert logged[key, 2] == pytest.approx(logged[key, 4], rel=1e-12), key
    assert logged[TRACE, 2] != logged[TRACE, 4]


def test_metrics_come_back_to_the_main_process(runs):
    two = runs[0]
    logged = _logged(two.root)
    for key in (TRACE, f"{TRACE}_stderr", FISHER):
        assert float(two.trainer.callback_metrics[key]) == pytest.approx(
            logged[key, 4], rel=1e-6
        ), key
    fresh = Classifier()
    for name, tensor in fresh.state_dict().items():
        torch.testing.assert_close(two.module.state_dict()[name], tensor, msg=name)


def test_fixed_batch_is_the_first_training_batch_of_each_rank(runs):
    # "fixed" is documented as the first training batch: on 2 ranks, samples 0-15.
    two = runs[0]
    logged = _logged(two.root)[FISHER, 2]
    first = _fisher_trace(two.module, range(0, 2 * LOCAL_BATCH))
    second = _fisher_trace(two.module, range(2 * LOCAL_BATCH, 4 * LOCAL_BATCH))
    assert logged == pytest.approx(first, rel=1e-5), (
        f"logged empirical Fisher trace {logged:.8g}; the first batches (samples "
        f"0-15) give {first:.8g}, the second ones (16-31, trained on at step 2, "
        f"the first scheduled estimate) give {second:.8g}"
    )
