"""Send histograms, line plots and figures to the wandb loggers of a ``Trainer``.

Lightning's ``log``/``log_dict`` take scalars only; these functions reach the wandb run
behind each ``WandbLogger`` for richer media. Each call logs one row that also holds
``"trainer/global_step"``, the step axis ``WandbLogger`` declares for its own
metrics, so the media line up with the scalars. They act on global rank zero only
(other ranks return at once) and do nothing when the trainer has no ``WandbLogger``.

wandb is imported inside the functions, so importing this module costs nothing.

Example:
    >>> class HistogramCallback(Callback):  # doctest: +SKIP
    ...     def on_train_batch_end(self, trainer, pl_module, outputs, batch, idx):
    ...         tensors = {f"param/{n}": p for n, p in pl_module.named_parameters()}
    ...         log_histograms(trainer, tensors, step=trainer.global_step)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.loggers import WandbLogger

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from matplotlib.figure import Figure

__all__ = [
    "STEP_KEY",
    "log_histograms",
    "log_image",
    "log_line_plot",
    "wandb_loggers",
]

STEP_KEY = "trainer/global_step"
_MAX_BINS = 512


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    """Return the ``WandbLogger`` instances among ``trainer.loggers``, in order."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_histograms(
    trainer: Trainer,
    tensors: Mapping[str, torch.Tensor],
    step: int,
    *,
    num_bins: int = 64,
) -> int:
    """Log one ``wandb.Histogram`` per tensor to every wandb logger of a trainer.

    Each tensor is flattened and converted to float32 on the CPU. Non-finite entries
    (NaN, +-inf) are left out of its histogram and, when there are any, their count
    is logged as ``"nonfinite_count/<key>"``. A tensor with no finite entry (or no
    entry at all) gets no histogram.

    Args:
        trainer: The trainer whose ``WandbLogger`` instances receive the histograms.
        tensors: Maps a wandb key (e.g. ``"grad/layer1.weight"``) to a tensor.
        step: The global step, logged as ``"trainer/global_step"``.
        num_bins: Number of histogram bins, 1 to 512.

    Returns:
        The number of non-finite entries left out, over all tensors; 0 on ranks
        other than zero and when the trainer has no wandb logger.

    Raises:
        ValueError: If ``num_bins`` is outside 1 to 512.
    """
    if not 1 <= num_bins <= _MAX_BINS:
        raise ValueError(
            f"num_bins={num_bins} is outside 1 to {_MAX_BINS}, the range wandb "
            "accepts; pass a bin count in that range."
        )
    loggers = _rank_zero_loggers(trainer)
    if not loggers:
        return 0
    payload, num_nonfinite = _histogram_payload(tensors, num_bins)
    _log(loggers, payload, step)
    return num_nonfinite


def log_line_plot(
    trainer: Trainer,
    key: str,
    xs: Sequence[float],
    ys: Sequence[float],
    title: str,
    x_label: str,
    y_label: str,
    step: int,
) -> None:
    """Log a line plot (``wandb.plot.line`` over a ``wandb.Table``).

    Points where ``x`` or ``y`` is not finite are left out.

    Args:
        trainer: The trainer whose ``WandbLogger`` instances receive the plot.
        key: The wandb key of the plot, e.g. ``"hessian/spectral_density"``.
        xs: The x coordinates.
        ys: The y coordinates, as many as ``xs``.
        title: The plot title.
        x_label: The x axis label, also the table's first column name.
        y_label: The y axis label, also the table's second column name.
        step: The global step, logged as ``"trainer/global_step"``.

    Raises:
        ValueError: If ``xs`` and ``ys`` differ in length, or the labels are equal.
    """
    if len(xs) != len(ys):
        raise ValueError(
            f"xs has {len(xs)} values but ys has {len(ys)}; pass one y per x."
        )
    if x_label == y_label:
        raise ValueError(
            f"x_label and y_label are both {x_label!r}; wandb needs distinct column "
            "names, so pass two different labels."
        )
    loggers = _rank_zero_loggers(trainer)
    if not loggers:
        return
    import wandb

    points = [[float(x), float(y)] for x, y in zip(xs, ys, strict=True)]
    table = wandb.Table(
        columns=[x_label, y_label],
        data=[p for p in points if math.isfinite(p[0]) and math.isfinite(p[1])],
    )
    _log(loggers, {key: wandb.plot.line(table, x_label, y_label, title=title)}, step)


def log_image(
    trainer: Trainer,
    key: str,
    figure: Figure,
    step: int,
    *,
    caption: str | None = None,
) -> None:
    """Log a matplotlib figure as a ``wandb.Image``.

    The figure is rendered, not closed; close it yourself when it is no longer needed.

    Args:
        trainer: The trainer whose ``WandbLogger`` instances receive the image.
        key: The wandb key of the image.
        figure: A matplotlib figure.
        step: The global step, logged as ``"trainer/global_step"``.
        caption: An optional caption shown under the image.
    """
    loggers = _rank_zero_loggers(trainer)
    if not loggers:
        return
    import wandb

    _log(loggers, {key: wandb.Image(figure, caption=caption)}, step)


def _rank_zero_loggers(trainer: Trainer) -> list[WandbLogger]:
    """Return the wandb loggers on global rank zero, none on other ranks."""
    return wandb_loggers(trainer) if trainer.is_global_zero else []


def _log(loggers: list[WandbLogger], payload: dict[str, Any], step: int) -> None:
    """Log one row, with the global step, to each logger (nothing if it is empty)."""
    if not payload:
        return
    row = {**payload, STEP_KEY: int(step)}
    for logger in loggers:
        logger.experiment.log(row)


def _histogram_payload(
    tensors: Mapping[str, torch.Tensor], num_bins: int
) -> tuple[dict[str, Any], int]:
    """Build the histograms and non-finite counts of a set of tensors."""
    import wandb

    payload: dict[str, Any] = {}
    total_nonfinite = 0
    for key, tensor in tensors.items():
        values = tensor.detach().float().cpu().reshape(-1)
        finite = values[torch.isfinite(values)]
        num_nonfinite = values.numel() - finite.numel()
        if num_nonfinite:
            payload[f"nonfinite_count/{key}"] = num_nonfinite
            total_nonfinite += num_nonfinite
        if finite.numel():
            payload[key] = wandb.Histogram(finite.numpy(), num_bins=num_bins)
    return payload, total_nonfinite
