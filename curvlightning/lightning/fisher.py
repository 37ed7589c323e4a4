"""Callbacks that estimate diagonals of the Fisher information."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from curvlightning.core.estimators import Estimate
from curvlightning.core.fisher import check_fisher_kind, fisher_diagonal
from curvlightning.core.functional import FunctionalModel
from curvlightning.lightning.base import CurvatureCallback, _Context, layer_segments

__all__ = ["FisherDiagonal"]

_FIT_RTOL = 1e-4
_TOTAL = "\x00total"


class FisherDiagonal(CurvatureCallback):
    r"""A diagonal of the Fisher information, summarised per layer.

    ``kind`` selects the estimator (see :mod:`curvlightning.core.fisher`):
    ``"empirical"`` (squared per-sample gradients at the true labels), ``"mc"``
    (at ``mc_samples`` labels drawn from the model) or ``"gnb"`` (Gauss-Newton-
    Bartlett: one gradient at sampled labels, squared and scaled by the batch size).
    The diagonal is reduced over ranks before it is summarised. Logs the trace
    ``curvature/fisher_<kind>_trace`` (the sum of the diagonal) with its standard
    error, the per-layer traces, and per-layer histograms of the diagonal to wandb.

    The first estimate checks that the module's ``curvature_loss`` is the negative
    log-likelihood of its ``curvature_likelihood``: the Fisher stands for the
    curvature only for that loss.

    Args:
        kind: ``"empirical"``, ``"mc"`` or ``"gnb"``.
        mc_samples: Labels sampled per input (``"mc"``) or draws (``"gnb"``).
        log_histograms: Log per-layer histograms of the diagonal to wandb loggers.
        chunk_size: Samples per vmapped chunk of per-sample gradients.
        **kwargs: Scheduling options of :class:`CurvatureCallback`.

    Raises:
        ValueError: On an unknown ``kind``, a non-positive ``mc_samples``, or a
            likelihood that does not fit the module's loss.

    Warning:
        ``"empirical"`` and ``"mc"`` need per-sample gradients, undefined for
        BatchNorm in training mode; use ``"gnb"`` for such models.
    """

    def __init__(
        self,
        kind: str = "empirical",
        mc_samples: int = 1,
        log_histograms: bool = True,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_fisher_kind(kind, mc_samples)
        self.kind = kind
        self.mc_samples = mc_samples
        self.log_histograms = log_histograms
        self.chunk_size = chunk_size
        self._checked = False
        self._last_diagonal: dict[str, Tensor] = {}

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "kind": self.kind}

    def summary_keys(self) -> list[str]:
        """The trace's metric name."""
        return [f"{self.name}/fisher_{self.kind}_trace"]

    def estimate(
        self, ctx: _Context, inputs: Any, targets: Tensor
    ) -> Mapping[str, Estimate]:
        """The Fisher diagonal on this step's curvature batch, and its traces."""
        likelihood = ctx.pl_module.likelihood
        if not self._checked:
            check_likelihood_fits_loss(ctx.pl_module, ctx.model, inputs, targets)
            self._checked = True
        layers = layer_segments(ctx.model)
        diagonal = fisher_diagonal(
            ctx.model,
            inputs,
            targets,
            likelihood,
            self.kind,
            mc_samples=self.mc_samples,
            probes=ctx.probes,
            reducer=ctx.reducer,
            chunk_size=self.chunk_size,
            segments={_TOTAL: slice(None), **layers},
        )
        self._last_diagonal = {n: diagonal.value[s] for n, s in layers.items()}
        total = diagonal.parts[_TOTAL]
        trace = Estimate(
            total.value,
            total.stderr,
            total.num_matvecs,
            total.num_samples,
            {n: diagonal.parts[n] for n in layers},
        )
        key = f"{self.name}/fisher_{self.kind}"
        return {key: diagonal, f"{key}_trace": trace}

    def log_media(
        self, trainer: pl.Trainer, ctx: _Context, estimates: Mapping[str, Estimate]
    ) -> None:
        """Per-layer histograms of the diagonal to wandb."""
        if not self.log_histograms:
            return
        from curvlightning.logging.wandb_media import log_histograms

        prefix = f"{self.name}/fisher_{self.kind}_hist"
        tensors = {f"{prefix}/{n}": v for n, v in self._last_diagonal.items()}
        log_histograms(trainer, tensors, ctx.step)


def check_likelihood_fits_loss(
    pl_module: pl.LightningModule, model: FunctionalModel, inputs: Any, targets: Tensor
) -> None:
    """Raise if ``curvature_loss`` is not the likelihood's mean NLL on this batch.

    Raises:
        ValueError: Naming both losses' values and the remedy.
    """
    likelihood = pl_module.likelihood
    inputs, targets = model.cast(inputs), model.cast(targets)
    with torch.no_grad():
        outputs = model.outputs(model.params, inputs)
        likelihood.check(outputs, targets)
        expected = float(likelihood.loss(outputs, targets))
        actual = float(pl_module.curvature_loss(outputs, targets))
    if abs(expected - actual) > _FIT_RTOL * max(abs(expected), 1e-8):
        raise ValueError(
            f"curvature_likelihood={likelihood.name!r} does not fit the loss of "
            f"{type(pl_module).__name__}: on the curvature batch its negative "
            f"log-likelihood is {expected:.6g} but curvature_loss gives {actual:.6g}. "
            "Set curvature_likelihood to the likelihood of the loss ('categorical' "
            "for cross-entropy, 'gaussian' for mean squared error, 'bernoulli' for "
            "binary cross-entropy), or make curvature_loss that likelihood's NLL"
        )
