"""A callback that samples rows of the logit Jacobian."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from curvlightning.core.estimators import (
    Estimate,
    check_num_probes,
    exact_estimate,
    reduce_estimate,
)
from curvlightning.core.jacobian import jacobian_frobenius_estimate, jacobian_rows
from curvlightning.lightning.base import (
    CurvatureCallback,
    _check_positive_int,
    _Context,
    layer_segments,
)
from curvlightning.logging.wandb_media import log_image

__all__ = ["JacobianRows"]

_ROW_KINDS = ("all", "top")


class JacobianRows(CurvatureCallback):
    r"""Sampled rows of the logit Jacobian ``J = dz/dtheta``, never the whole k x p.

    Row ``c`` is the gradient of the batch-mean logit ``(1/N) sum_n z_{n c}``, one
    vector-Jacobian product; rows are batched through one backward pass and chunked
    to a memory budget. Across ranks the rows (p numbers each) are summed before
    their norms are taken, so they are the global batch's rows. Logs

    - ``curvature/jacobian_row_norm/<row>`` and ``.../<row>/<layer>``: the norm of
      each sampled row (per-class sensitivity of the mean logit), whole and per
      layer;
    - ``curvature/jacobian_frobenius_sq``: Hutchinson's estimate of
      ``||J||_F^2 / N = (1/N) sum_n ||dz_n/dtheta||_F^2`` from ``num_probes``
      output-space probes (one VJP each), with its standard error and per layer;
    - a wandb heatmap of squared row norms, layers by rows.

    Args:
        rows: ``"all"`` (every class), ``"top"`` (the ``num_top`` largest logits of
            each sample) or a list of class indices.
        num_top: Rows for ``rows="top"``.
        num_probes: Probes of the Frobenius estimate (0: none).
        log_heatmap: Log the heatmap to wandb.
        **kwargs: Scheduling options of :class:`CurvatureCallback`.

    Warning:
        Rows are of the batch-mean logit: opposite per-sample sensitivities cancel.
        The Frobenius estimate measures the per-sample Jacobians instead; with
        ``shared_probes=True`` on R ranks it all-reduces one p-vector per probe
        and reproduces one rank exactly when the ranks hold consecutive slices of
        the global batch in rank order (probes belong to positions in the batch).
    """

    def __init__(
        self,
        rows: str | Sequence[int] = "all",
        num_top: int = 1,
        num_probes: int = 8,
        log_heatmap: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(rows, str):
            if rows not in _ROW_KINDS:
                raise ValueError(
                    f"rows must be one of {_ROW_KINDS} or a list of class indices, "
                    f"got {rows!r}"
                )
        elif not rows or not all(isinstance(r, int) and r >= 0 for r in rows):
            raise ValueError(
                f"rows must be a non-empty list of class indices >= 0, got {rows!r}"
            )
        _check_positive_int("num_top", num_top)
        if num_probes:
            check_num_probes(num_probes)
        self.rows = rows if isinstance(rows, str) else list(rows)
        self.num_top = num_top
        self.num_probes = num_probes
        self.log_heatmap = log_heatmap
        self._last_rows: dict[str, dict[str, float]] = {}

    def summary_keys(self) -> list[str]:
        """The Frobenius estimate."""
        return [f"{self.name}/jacobian_frobenius_sq"] if self.num_probes else []

    def estimate(
        self, ctx: _Context, inputs: Any, targets: Tensor
    ) -> Mapping[str, Estimate]:
        """Row norms of the global batch and the Frobenius estimate."""
        inputs = ctx.model.cast(inputs)
        layers = layer_segments(ctx.model)
        local = jacobian_rows(ctx.model, inputs, self.rows, num_top=self.num_top)
        total = ctx.reducer.all_reduce_sum(torch.tensor(float(ctx.num_samples)))
        rows = ctx.reducer.all_reduce_sum(local) / total.to(local)
        out = {}
        self._last_rows = {}
        for i, label in enumerate(self._labels(rows.shape[0])):
            row = rows[i]
            per_layer = {n: row[s].norm() for n, s in layers.items()}
            self._last_rows[label] = {n: float(v) ** 2 for n, v in per_layer.items()}
            parts = {n: exact_estimate(v) for n, v in per_layer.items()}
            whole = exact_estimate(row.norm(), ctx.num_samples)
            out[f"{self.name}/jacobian_row_norm/{label}"] = Estimate(
                whole.value, whole.stderr, 1, ctx.num_samples, parts
            )
        if self.num_probes:
            out[f"{self.name}/jacobian_frobenius_sq"] = self._frobenius(
                ctx, inputs, layers
            )
        return out

    def _labels(self, count: int) -> list[str]:
        if self.rows == "top":
            return [f"top{i + 1}" for i in range(count)]
        if self.rows == "all":
            return [f"class{c}" for c in range(count)]
        return [f"class{c}" for c in self.rows]

    def _frobenius(
        self, ctx: _Context, inputs: Any, layers: Mapping[str, slice]
    ) -> Estimate:
        if self.shared_probes and ctx.reducer.world_size > 1:
            offset, total = ctx.reducer.offset_and_total(ctx.num_samples)
            est = jacobian_frobenius_estimate(
                ctx.model,
                inputs,
                ctx.probes,
                self.num_probes,
                segments=layers,
                offset=offset,
                total=total,
                reduce_vjp=ctx.reducer.all_reduce_sum,
            )
            return _scaled(est, 1.0 / total, parts=True)
        est = jacobian_frobenius_estimate(
            ctx.model, inputs, ctx.probes, self.num_probes, segments=layers
        )
        scale = 1.0 / ctx.num_samples
        parts = {n: _scaled(p, scale) for n, p in est.parts.items()}
        local = Estimate(
            est.value * scale,
            est.stderr * scale,
            est.num_matvecs,
            est.num_samples,
            parts,
        )
        return reduce_estimate(local, ctx.reducer, ctx.num_samples)

    def log_media(
        self, trainer: pl.Trainer, ctx: _Context, estimates: Mapping[str, Estimate]
    ) -> None:
        """A heatmap of squared row norms, layers by rows, to wandb."""
        if not (self.log_heatmap and self._last_rows):
            return
        from matplotlib.figure import Figure

        labels = list(self._last_rows)
        layers = list(next(iter(self._last_rows.values())))
        grid = [[self._last_rows[r][n] for r in labels] for n in layers]
        figure = Figure(figsize=(1 + 0.5 * len(labels), 1 + 0.4 * len(layers)))
        axes = figure.subplots()
        image = axes.imshow(grid, aspect="auto", cmap="viridis")
        axes.set_xticks(range(len(labels)), labels, rotation=90)
        axes.set_yticks(range(len(layers)), layers)
        axes.set_title(f"squared Jacobian row norms, step {ctx.step}")
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        log_image(trainer, f"{self.name}/jacobian_rows_heatmap", figure, ctx.step)


def _scaled(estimate: Estimate, scale: float, parts: bool = False) -> Estimate:
    scaled = {n: _scaled(p, scale) for n, p in estimate.parts.items()} if parts else {}
    return Estimate(
        estimate.value * scale,
        estimate.stderr * scale,
        estimate.num_matvecs,
        estimate.num_samples,
        scaled,
    )
