"""A callback that leaves a report with figures when a run ends."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from curvlightning.lightning.base import CurvatureCallback

__all__ = ["CurvatureReport"]

_SUMMARY_PREFIXES = ("val/", "train/")


class CurvatureReport(Callback):
    """Writes ``report/report.md`` with one figure per estimate at the end of a run.

    Collects the history of every :class:`CurvatureCallback` of the trainer, the last
    training and validation metrics and the module's hyperparameters, and calls
    :func:`curvlightning.logging.report.write_report` on rank zero (all ranks hold
    the same reduced history). The report is also written when training stops on an
    exception, so a crashed run keeps what it measured. Each scalar series is also
    logged to wandb as a line plot.

    Args:
        dirpath: The run folder; ``None`` uses ``trainer.default_root_dir``.
        title: The report's heading; ``None`` uses the module's class name.
    """

    def __init__(self, dirpath: str | None = None, title: str | None = None) -> None:
        self.dirpath = dirpath
        self.title = title
        self.path: Path | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the report."""
        self.write(trainer, pl_module)

    def on_exception(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        exception: BaseException,
    ) -> None:
        """Write what was measured before the exception."""
        self.write(trainer, pl_module)

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Write the report on rank zero; return its path there, else ``None``."""
        if not trainer.is_global_zero:
            return None
        from curvlightning.logging.report import write_report

        series = collect_series(trainer)
        run_dir = Path(self.dirpath or trainer.default_root_dir)
        title = self.title or f"{type(pl_module).__name__}: curvature report"
        self.path = write_report(run_dir, series, _summary(trainer, pl_module), title)
        _log_plots(trainer, series)
        rank_zero_info(f"curvature report written to {self.path}")
        return self.path


def collect_series(trainer: pl.Trainer) -> dict[str, list[dict[str, Any]]]:
    """The rows of every curvature callback's history, grouped by metric name."""
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for callback in trainer.callbacks:
        if isinstance(callback, CurvatureCallback):
            for row in callback.history:
                series[row["key"]].append({k: v for k, v in row.items() if k != "key"})
    return dict(series)


def _summary(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "world_size": trainer.world_size,
    }
    for key, value in sorted(trainer.callback_metrics.items()):
        if key.startswith(_SUMMARY_PREFIXES):
            summary[key] = float(value)
    hparams = dict(pl_module.hparams)
    summary.update({f"hparams/{k}": v for k, v in hparams.items() if k[:1] != "_"})
    return summary


def _log_plots(trainer: pl.Trainer, series: dict[str, list[dict[str, Any]]]) -> None:
    from curvlightning.logging.wandb_media import log_line_plot

    for key, rows in series.items():
        steps = [row["step"] for row in rows]
        values = [row["value"] for row in rows]
        log_line_plot(
            trainer,
            f"{key}_plot",
            steps,
            values,
            key,
            "step",
            "value",
            trainer.global_step,
        )
