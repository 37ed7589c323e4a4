"""End-to-end runs of the curvature callbacks inside a Lightning Trainer."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvlightning import (
    CurvatureMixin,
    CurvatureReport,
    FisherDiagonal,
    HessianTrace,
)
from curvlightning.core import (
    FunctionalModel,
    HessianOperator,
    ProbeSource,
    get_likelihood,
    hutchinson_trace,
)
from curvlightning.data import DigitsDataModule
from curvlightning.logging.wandb_offline import (
    find_run_files,
    read_histograms,
    read_history,
)
from curvlightning.models import MLPClassifier

TRACE = "curvature/hessian_trace"


def _trainer(tmp_path: Path, callbacks: list, max_steps: int = 6, **kwargs):
    kwargs.setdefault("logger", CSVLogger(tmp_path, name="csv"))
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        **{"enable_checkpointing": False, **kwargs},
    )


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_recipe_model_logs_trace_to_csv_and_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_logger = WandbLogger(save_dir=tmp_path, offline=True, project="test")
    csv_logger = CSVLogger(tmp_path, name="csv")
    trace = HessianTrace(every_n_steps=2, num_probes=4, curvature_batch="fixed")
    fisher = FisherDiagonal(kind="empirical", every_n_steps=3)
    trainer = _trainer(
        tmp_path,
        [trace, fisher, CurvatureReport()],
        logger=[csv_logger, wandb_logger],
    )
    trainer.fit(MLPClassifier(hidden_sizes=[16]), DigitsDataModule(batch_size=32))
    wandb_logger.experiment.finish()

    expected = {row["step"]: row["value"] for row in trace.history}
    assert sorted(expected) == [2, 4, 6]

    rows = [r for r in _csv_rows(Path(csv_logger.log_dir) / "metrics.csv") if r[TRACE]]
    assert {int(r["step"]): float(r[TRACE]) for r in rows} == pytest.approx(expected)

    (run_file,) = find_run_files(tmp_path)
    history = [r for r in read_history(run_file) if TRACE in r]
    logged = {r["trainer/global_step"]: r[TRACE] for r in history}
    assert logged == pytest.approx(expected)
    key = "curvature/fisher_empirical_hist/net.0"
    histograms = read_histograms(run_file, key, step_key="trainer/global_step")
    assert [h.step for h in histograms] == [3, 6]
    assert all(h.values.sum() == 16 * 64 + 16 for h in histograms)

    report = tmp_path / "report" / "report.md"
    assert TRACE in report.read_text()


class _Plain(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _WithMixin(CurvatureMixin, _Plain):
    pass


class _Regression(CurvatureMixin, _Plain):
    curvature_likelihood = "categorical"

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def curvature_loss(self, outputs, targets):
        return F.mse_loss(outputs, targets)


def _loader(targets: str = "class", dict_batch: bool = False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=gen)
    if targets == "class":
        y = torch.randint(0, 3, (32,), generator=gen)
    else:
        y = torch.randn(32, 3, generator=gen)
    if dict_batch:
        data = [
            {"features": x[i : i + 8], "extra": y[i : i + 8]} for i in range(0, 32, 8)
        ]
        return DataLoader(data, batch_size=None)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def test_module_without_mixin_is_refused(tmp_path):
    trainer = _trainer(tmp_path, [HessianTrace(every_n_steps=1)])
    with pytest.raises(TypeError, match="inherits CurvatureMixin.*_Plain"):
        trainer.fit(_Plain(), _loader())


def test_batch_without_targets_is_refused(tmp_path):
    class DictModule(_WithMixin):
        def training_step(self, batch, batch_idx):
            return self(batch["features"]).sum()

    trainer = _trainer(tmp_path, [HessianTrace(every_n_steps=1)])
    with pytest.raises(TypeError, match=r"override curvature_targets\(batch\)"):
        trainer.fit(DictModule(), _loader(dict_batch=True))


def test_likelihood_that_does_not_fit_the_loss_is_refused(tmp_path):
    trainer = _trainer(tmp_path, [FisherDiagonal(every_n_steps=1)])
    with pytest.raises(ValueError, match="categorical.*needs outputs of shape"):
        trainer.fit(_Regression(), _loader("regression"))

    class Smoothed(_WithMixin):
        def curvature_loss(self, outputs, targets):
            return F.cross_entropy(outputs, targets, label_smoothing=0.2)

    trainer = _trainer(tmp_path, [FisherDiagonal(every_n_steps=1)])
    with pytest.raises(ValueError, match="does not fit the loss of Smoothed"):
        trainer.fit(Smoothed(), _loader())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_probes": 0}, "num_probes must be a positive number of probes, got 0"),
        ({"num_probes": -3}, "got -3"),
        ({"every_n_steps": 0}, "every_n_steps must be a positive int, got 0"),
        ({"curvature_batch": "held_out"}, "curvature_batch must be one of"),
        ({"backend": "magic"}, "backend must be one of"),
        ({"dtype": "float16"}, "dtype must be one of"),
    ],
)
def test_hessian_trace_arguments_are_checked(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        HessianTrace(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "exact"}, "kind must be one of"),
        ({"kind": "mc", "mc_samples": 0}, "mc_samples must be a positive"),
    ],
)
def test_fisher_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FisherDiagonal(**kwargs)


def test_unknown_likelihood_is_refused(tmp_path):
    class Poisson(_WithMixin):
        curvature_likelihood = "poisson"

    trainer = _trainer(tmp_path, [HessianTrace(every_n_steps=1)])
    with pytest.raises(ValueError, match="curvature_likelihood must be one of"):
        trainer.fit(Poisson(), _loader())


def test_trace_equals_a_direct_computation_at_the_logged_step(tmp_path):
    """The callback's value is Hutchinson on the fixed batch at that step's weights."""
    torch.manual_seed(0)
    module = _WithMixin()
    trace = HessianTrace(
        every_n_steps=2, num_probes=3, curvature_batch="fixed", dtype="float64"
    )

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    snapshot = Snapshot()
    _trainer(tmp_path, [snapshot, trace], max_steps=2).fit(module, _loader())
    x, y = trace._fixed_batch
    module.load_state_dict(snapshot.state)
    model = FunctionalModel(
        module, loss=get_likelihood("categorical").loss, dtype=torch.float64
    )
    operator = HessianOperator(model, x, y)
    probes = ProbeSource(seed=0, step=2, rank=0, stream="HessianTrace")
    direct = hutchinson_trace(operator, operator.dim, probes, 3, dtype=torch.float64)
    assert trace.history[0]["value"] == pytest.approx(direct.item(), rel=1e-10)
    assert trace.history[0]["stderr"] == pytest.approx(float(direct.stderr), rel=1e-10)
    per_layer = trace.history[0]["per_layer"]
    assert sum(per_layer.values()) == pytest.approx(trace.history[0]["value"], rel=1e-9)


def test_crash_and_resume_keeps_the_curvature_history(tmp_path):
    def run(max_steps, ckpt_path=None, root=tmp_path / "a"):
        torch.manual_seed(0)
        trace = HessianTrace(every_n_steps=2, num_probes=4, curvature_batch="fixed")
        fisher = FisherDiagonal(kind="gnb", every_n_steps=2, mc_samples=2)
        checkpoint = ModelCheckpoint(
            dirpath=root / "ckpt", save_last=True, every_n_train_steps=1
        )
        trainer = _trainer(
            root,
            [trace, fisher, checkpoint],
            max_steps=max_steps,
            enable_checkpointing=True,
            max_epochs=-1,
        )
        trainer.fit(_WithMixin(), _loader(), ckpt_path=ckpt_path)
        return trace, fisher

    straight_trace, straight_fisher = run(8, root=tmp_path / "straight")
    run(4, root=tmp_path / "crashed")
    resumed_trace, resumed_fisher = run(
        8,
        ckpt_path=tmp_path / "crashed" / "ckpt" / "last.ckpt",
        root=tmp_path / "crashed",
    )
    assert [r["step"] for r in resumed_trace.history] == [2, 4, 6, 8]
    for a, b in zip(resumed_trace.history, straight_trace.history, strict=True):
        assert a["value"] == pytest.approx(b["value"], rel=1e-6)
        assert a["stderr"] == pytest.approx(b["stderr"], rel=1e-6)
    for a, b in zip(resumed_fisher.history, straight_fisher.history, strict=True):
        assert a["value"] == pytest.approx(b["value"], rel=1e-6)


def test_non_finite_estimates_are_skipped_and_counted(tmp_path):
    class Exploding(_WithMixin):
        def curvature_loss(self, outputs, targets):
            return F.cross_entropy(outputs * float("inf"), targets)

    trace = HessianTrace(every_n_steps=2, num_probes=2)
    with pytest.warns(UserWarning, match="non-finite estimate at step 2 was skipped"):
        _trainer(tmp_path, [trace], max_steps=4).fit(Exploding(), _loader())
    assert trace.num_skipped == 2
    assert trace.history == []


def test_outputs_that_are_not_a_tensor_are_refused(tmp_path):
    class DictOutputs(_WithMixin):
        def forward(self, x):
            return {"logits": self.net(x)}

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x)["logits"], y)

    trainer = _trainer(tmp_path, [HessianTrace(every_n_steps=1)])
    with pytest.raises(TypeError, match=r"dict with keys \['logits'\]. Override"):
        trainer.fit(DictOutputs(), _loader())


def test_default_likelihood_refuses_regression_targets(tmp_path):
    class Regression(_WithMixin):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self(x), y)

    trainer = _trainer(tmp_path, [HessianTrace(every_n_steps=1)])
    with pytest.raises(ValueError, match="categorical.*Use .gaussian. for regression"):
        trainer.fit(Regression(), _loader("regression"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shared_probes": "no"}, "shared_probes must be True or False"),
        ({"at_epoch_end": 1}, "at_epoch_end must be True or False"),
        ({"seed": "a"}, "seed must be an int"),
    ],
)
def test_scheduling_flags_are_type_checked(kwargs, message):
    with pytest.raises(TypeError, match=message):
        HessianTrace(**kwargs)
