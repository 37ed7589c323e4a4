"""CurvatureFeed in a Lightning Trainer: it trains; a resumed run is the same run."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from curvlightning import CurvatureMixin
from curvlightning.lightning.feed import CurvatureFeed
from curvlightning.optim import DiagCurvatureAdam, adahessian_like, sophia_like

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_SAMPLES, BATCH = 40, 8  # 5 steps per epoch


class TinyClassifier(CurvatureMixin, pl.LightningModule):
    curvature_likelihood = "categorical"

    def __init__(self, optimizer: str = "adahessian") -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.optimizer = optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer == "adahessian":
            return adahessian_like(self.parameters(), lr=0.05)
        if self.optimizer == "sophia":
            return sophia_like(self.parameters(), lr=0.02, update_every=3)
        return torch.optim.AdamW(self.parameters())


def _data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_SAMPLES, 4, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(*_data()), batch_size=BATCH, shuffle=False)


def _trainer(max_steps: int, feed: CurvatureFeed, *extra: pl.Callback) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=bool(extra),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[feed, *extra],
    )


def _full_loss(module: TinyClassifier) -> float:
    x, y = _data()
    with torch.no_grad():
        return float(F.cross_entropy(module(x), y))


def _fit(max_steps, feed, optimizer, ckpt_path=None, *extra: pl.Callback):
    module = TinyClassifier(optimizer)
    trainer = _trainer(max_steps, feed, *extra)
    trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return trainer, module


def test_feed_with_sophia_like_trains_and_fills_the_curvature_ema() -> None:
    initial = _full_loss(TinyClassifier())
    feed = CurvatureFeed(source="gnb", mc_samples=2, seed=3)
    trainer, module = _fit(10, feed, "sophia")
    opt = trainer.optimizers[0]
    assert isinstance(opt, DiagCurvatureAdam)
    # estimates at steps 0, 3, 6, 9 (every update_every = 3 steps)
    assert feed.num_estimates == 4 and opt.num_dropped == 0
    for p in module.parameters():
        state = opt.state[p]
        assert float(state["curv_step"]) == 4 and float(state["step"]) == 10
        assert (state["exp_curv"] > 0).all()
    assert _full_loss(module) < 0.9 * initial


def _snapshot(trainer: pl.Trainer, module: TinyClassifier) -> dict[str, Tensor]:
    opt = trainer.optimizers[0]
    out = {}
    for name, p in module.named_parameters():
        out[name] = p.detach().clone()
        for key in ("exp_avg", "exp_curv", "curv_step", "step"):
            out[f"{name}/{key}"] = opt.state[p][key].clone()
    return out


def test_crash_and_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """The run stops at step 10 with the checkpoint written inside that step.

    (A checkpoint written by ``trainer.save_checkpoint`` after ``fit`` stopped at
    an epoch's last batch resumes with one extra batch in Lightning 2.6, so it
    would not test the optimizer.)
    """

    def feed() -> CurvatureFeed:
        return CurvatureFeed(source="hessian", num_probes=2, every_n_steps=2, seed=5)

    whole_trainer, whole_module = _fit(20, feed(), "adahessian")
    whole = _snapshot(whole_trainer, whole_module)

    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1)
    _fit(10, feed(), "adahessian", None, saver)
    ckpt = tmp_path / "epoch=1-step=10.ckpt"
    resumed_feed = feed()
    resumed_trainer, resumed_module = _fit(20, resumed_feed, "adahessian", ckpt)
    resumed = _snapshot(resumed_trainer, resumed_module)

    assert resumed_trainer.global_step == 20 and resumed_feed.num_estimates == 10
    assert float(whole["net.0.weight/curv_step"]) == 10
    assert whole.keys() == resumed.keys()
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-6, atol=0, msg=key)
    assert not torch.equal(whole["net.0.weight"], TinyClassifier().net[0].weight)


class PoisonedCurvature(TinyClassifier):
    """Its curvature loss is NaN at step 2: the Hessian estimate there is NaN."""

    def curvature_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        loss = super().curvature_loss(outputs, targets)
        return loss * math.nan if self.trainer.global_step == 2 else loss


def test_non_finite_estimate_is_dropped_counted_and_logged(tmp_path: Path) -> None:
    feed = CurvatureFeed(source="hessian", every_n_steps=1)
    module = PoisonedCurvature()
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="run", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[feed],
    )
    with pytest.warns(UserWarning, match="non-finite hessian estimate at step 2"):
        trainer.fit(module, _loader())
    opt = trainer.optimizers[0]
    assert opt.num_dropped == 1 and feed.num_estimates == 4
    for p in module.parameters():
        assert float(opt.state[p]["curv_step"]) == 3
        assert (
            torch.isfinite(p).all() and torch.isfinite(opt.state[p]["exp_curv"]).all()
        )
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    dropped = [float(r["curvature/feed_hessian_dropped"]) for r in rows]
    assert dropped == [0.0, 0.0, 1.0, 1.0]
    means = [r["curvature/feed_hessian_mean"] for r in rows]
    assert means[2] == ""
    assert all(math.isfinite(float(m)) for i, m in enumerate(means) if i != 2)


def test_feed_refuses_an_optimizer_without_estimates() -> None:
    with pytest.raises(TypeError, match=r"configure_optimizers returned \['AdamW'\]"):
        _fit(1, CurvatureFeed(), "adamw")


def test_feed_refuses_a_module_without_the_mixin() -> None:
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 3)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return adahessian_like(self.parameters())

    with pytest.raises(TypeError, match="inherits CurvatureMixin"):
        _trainer(1, CurvatureFeed()).fit(Plain(), _loader())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "newton"}, "source must be one of"),
        ({"num_probes": 0}, "num_probes must be a positive"),
        ({"mc_samples": 0}, "mc_samples must be a positive"),
        ({"every_n_steps": 0}, "every_n_steps must be a positive int or None"),
        ({"dtype": "float16"}, "dtype must be one of"),
        ({"backend": "magic"}, "backend must be one of"),
    ],
)
def test_feed_bad_arguments_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CurvatureFeed(**kwargs)
