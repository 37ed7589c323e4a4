"""The ``curvlightning`` command line: LightningCLI with a summary after ``fit``.

Example:
    ``curvlightning fit --config recipes/digits_mlp.yaml --trainer.max_epochs=3``
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.loggers import WandbLogger

_METRICS = ("val/acc", "val/loss", "val/bpc")


class CurvatureCLI(LightningCLI):
    """LightningCLI that prints where a run went and what it measured.

    After ``fit``, rank zero prints the last validation metrics, the best score
    of the checkpoint callback, the run folder, the lines of every callback
    that has a ``summary_lines()`` method, and for each wandb logger its run
    folder and the ``wandb sync`` command that uploads an offline run.
    """

    def before_fit(self) -> None:
        """Make relative wandb folders absolute before the run starts.

        wandb's service process resolves a relative ``dir`` against its own working
        directory, which is not the caller's once the service outlives one run.
        """
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._save_dir:
                folder = os.path.abspath(logger._save_dir)
                logger._save_dir = folder
                logger._wandb_init["dir"] = folder

    def after_fit(self) -> None:
        """Print the run summary on rank zero, then close the wandb runs.

        Closing flushes the offline run file, so it is complete when the command
        returns (Lightning leaves wandb runs open).
        """
        if not self.trainer.is_global_zero:
            return
        print("\n".join(summary_lines(self.trainer)), flush=True)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()


def summary_lines(trainer: Trainer) -> list[str]:
    """Return the human-readable summary of a finished ``fit``.

    Args:
        trainer: The trainer after ``fit`` returned.

    Returns:
        One string per line, without trailing newlines.
    """
    lines = ["", "curvlightning run summary"]
    lines += _metric_lines(trainer)
    lines.append(f"  run folder: {trainer.log_dir or trainer.default_root_dir}")
    for callback in trainer.callbacks:
        summary = getattr(callback, "summary_lines", None)
        if callable(summary):
            lines += [f"  {line}" for line in summary(trainer)]
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            lines += _wandb_lines(logger)
    return lines


def _metric_lines(trainer: Trainer) -> list[str]:
    """Last validation metrics, then the checkpoint callback's best score."""
    metrics = trainer.callback_metrics
    last = [
        f"{name}={float(metrics[name]):.4f}" for name in _METRICS if name in metrics
    ]
    lines = [f"  last: {', '.join(last)}"] if last else []
    checkpoint = trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_score", None)
    if checkpoint is not None and checkpoint.monitor and best is not None:
        value = float(best)
        if math.isfinite(value):
            lines.append(f"  best: {checkpoint.monitor}={value:.4f}")
    if checkpoint is not None and checkpoint.best_model_path:
        lines.append(f"  best checkpoint: {checkpoint.best_model_path}")
    return lines


def _wandb_lines(logger: WandbLogger) -> list[str]:
    """The wandb run folder and, for an offline run, the command that uploads it."""
    run_dir = Path(logger.experiment.dir).parent
    lines = [f"  wandb run: {run_dir}"]
    if run_dir.name.startswith("offline-run"):
        lines.append(f"  upload with: wandb sync {run_dir}")
    return lines


def main(args: ArgsType = None) -> None:
    """Run the ``curvlightning`` command.

    wandb runs offline unless ``WANDB_MODE`` is already set, so no account is
    needed; ``wandb sync`` uploads a run later.

    Args:
        args: Command-line arguments (a list of strings or a dict); None reads
            ``sys.argv``.
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    CurvatureCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
    )


if __name__ == "__main__":
    main()
