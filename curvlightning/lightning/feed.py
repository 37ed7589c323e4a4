"""A callback that feeds diagonal curvature estimates to ``DiagCurvatureAdam``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from curvlightning.core.distributed import Reducer
from curvlightning.core.estimators import (
    check_num_probes,
    hutchinson_diagonal,
    reduce_estimate,
)
from curvlightning.core.fisher import check_fisher_kind, fisher_diagonal
from curvlightning.core.functional import (
    FunctionalModel,
    trainable_parameters,
    unflatten,
)
from curvlightning.core.likelihoods import Likelihood
from curvlightning.core.operators import HVP_BACKENDS, HessianOperator
from curvlightning.core.probes import ProbeSource
from curvlightning.lightning.base import _DTYPES, _Context, _num_samples
from curvlightning.lightning.fisher import check_likelihood_fits_loss
from curvlightning.lightning.mixin import CurvatureMixin
from curvlightning.optim.diag_adam import FED_SOURCES, DiagCurvatureAdam

__all__ = ["FEED_SOURCES", "CurvatureFeed", "curvature_estimate"]

#: What :class:`CurvatureFeed` estimates: the Hessian diagonal (Hutchinson), the
#: Gauss-Newton-Bartlett or the Monte-Carlo Fisher diagonal.
FEED_SOURCES = ("hessian", "gnb", "mc")


def curvature_estimate(
    model: FunctionalModel,
    inputs: Any,
    targets: Tensor,
    source: str,
    *,
    probes: ProbeSource,
    reducer: Reducer,
    num_samples: int,
    num_probes: int = 1,
    mc_samples: int = 1,
    likelihood: Likelihood | None = None,
    backend: str = "double_backward",
) -> Tensor:
    r"""A diagonal curvature estimate on this rank's batch, averaged over ranks.

    - ``"hessian"``: Hutchinson's ``(1/n) sum_i v_i * (H_r v_i)`` over
      ``num_probes`` probes; with independent probes the ranks' estimates are
      averaged with weights ``N_r / N``, unbiased for ``diag(H)`` of the global
      batch with variance down by R; with shared probes each probe's term is
      averaged before the statistics, which reproduces one rank on the global
      batch.
    - ``"gnb"``, ``"mc"``: :func:`~curvlightning.core.fisher.fisher_diagonal`,
      which reduces sample sums (or the sampled-label gradient) over ranks itself.

    Args:
        model: The functional model of the unwrapped module.
        inputs: This rank's inputs.
        targets: This rank's targets, batch size ``num_samples``.
        source: One of :data:`FEED_SOURCES`.
        probes: Probe and label-noise source.
        reducer: The collectives.
        num_samples: This rank's weight ``N_r``.
        num_probes: Hutchinson probes per rank (``"hessian"``).
        mc_samples: Sampled labels per input (``"mc"``) or draws (``"gnb"``).
        likelihood: The loss' likelihood (``"gnb"``, ``"mc"``).
        backend: The Hessian-vector product (``"hessian"``).

    Returns:
        The flat diagonal, shape ``(p,)``, the same on every rank.
    """
    if source == "hessian":
        operator = HessianOperator(model, inputs, targets, backend)
        estimate = hutchinson_diagonal(
            operator,
            operator.dim,
            probes,
            num_probes,
            reduce_samples=(
                (lambda t: reducer.weighted_mean(t, num_samples))
                if probes.shared
                else None
            ),
            dtype=model.dtype,
            device=model.device,
        )
        if not probes.shared:
            estimate = reduce_estimate(estimate, reducer, num_samples)
        return estimate.value
    if likelihood is None:
        raise ValueError(f"source={source!r} needs the likelihood of the loss")
    return fisher_diagonal(
        model,
        inputs,
        targets,
        likelihood,
        source,
        mc_samples=mc_samples,
        probes=probes,
        reducer=reducer,
    ).value


class CurvatureFeed(Callback):
    r"""Hands a diagonal curvature estimate to ``DiagCurvatureAdam`` every k steps.

    At every step with ``trainer.global_step % every_n_steps == 0``, after the
    backward pass and before ``optimizer.step()`` (``on_before_optimizer_step``, so
    the estimate is at the parameters the step starts from), the callback computes
    ``source`` on the batch of this step, on the unwrapped ``LightningModule``
    (which inherits :class:`~curvlightning.CurvatureMixin`), averages it over ranks
    with weights equal to their sample counts, and calls
    :meth:`~curvlightning.optim.DiagCurvatureAdam.set_curvature`. Every rank thus
    enters the same estimate and holds the same state. If the estimate is not
    finite on any rank, all ranks drop it together (decided by an all-reduce) and
    the optimizer counts it in ``num_dropped``.

    Pair ``"hessian"`` with ``curvature="hessian"`` (AdaHessian-like,
    :func:`~curvlightning.optim.adahessian_like`) and ``"gnb"`` or ``"mc"`` with
    ``curvature="fisher"`` (Sophia-like, :func:`~curvlightning.optim.sophia_like`);
    ``"hessian"`` with ``curvature="fisher"`` is Sophia-H.

    Args:
        source: ``"hessian"`` (Hutchinson), ``"gnb"`` (Gauss-Newton-Bartlett) or
            ``"mc"`` (Monte-Carlo Fisher).
        num_probes: Hutchinson probes per rank and estimate (``"hessian"``).
        mc_samples: Sampled labels per input (``"mc"``) or independent draws
            (``"gnb"``).
        every_n_steps: Steps between estimates; ``None`` takes the optimizer's
            ``update_every``.
        seed: Seeds the probes, the sampled labels and dropout, mixed with the
            step and the rank.
        shared_probes: Draw the same probes and label noise on all ranks (R ranks
            of B/R samples then reproduce one rank of B samples exactly).
        dtype: ``"float32"`` or ``"float64"``: the precision of the pass.
        backend: The Hessian-vector product (``"hessian"``).

    Raises:
        ValueError: On an unknown ``source``, ``dtype`` or ``backend``, or a
            non-positive count.

    Warning:
        With gradient accumulation the estimate uses the last micro-batch only. The
        pass differentiates the unwrapped module's own parameters, so it needs
        unsharded parameters (one device, DDP, ``ZeroRedundancyOptimizer``); with
        FSDP2, compute the estimate yourself and call ``set_curvature`` with it.
    """

    def __init__(
        self,
        source: str = "hessian",
        num_probes: int = 1,
        mc_samples: int = 1,
        every_n_steps: int | None = None,
        seed: int = 0,
        shared_probes: bool = False,
        dtype: str = "float32",
        backend: str = "double_backward",
    ) -> None:
        _check_options(source, num_probes, mc_samples, every_n_steps, dtype, backend)
        self.source = source
        self.num_probes = num_probes
        self.mc_samples = mc_samples
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.shared_probes = shared_probes
        self.dtype = dtype
        self.backend = backend
        self.num_estimates = 0
        self._batch: Any = None
        self._checked = False

    # ------------------------------------------------------------------ Lightning
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str):
        """Check that the module exposes what the estimate needs."""
        if not isinstance(pl_module, CurvatureMixin):
            raise TypeError(
                f"CurvatureFeed needs a LightningModule that inherits CurvatureMixin; "
                f"got {type(pl_module).__name__}. Add the mixin: class "
                f"{type(pl_module).__name__}(CurvatureMixin, LightningModule)"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        """Check that some optimizer takes estimates."""
        if not any(_fed_optimizer(opt) for opt in trainer.optimizers):
            names = [type(opt).__name__ for opt in trainer.optimizers]
            raise TypeError(
                f"CurvatureFeed feeds a DiagCurvatureAdam with curvature in "
                f"{FED_SOURCES}; configure_optimizers returned {names}. Return "
                "adahessian_like(...), sophia_like(...) or DiagCurvatureAdam(..., "
                "curvature='hessian' or 'fisher')"
            )

    def on_train_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Keep the batch for the estimate before this step's update."""
        self._batch = batch

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Estimate and hand in the curvature when the step is on the schedule."""
        target = _fed_optimizer(optimizer)
        if target is None or self._batch is None:
            return
        every = self.every_n_steps or target.update_every
        if trainer.global_step % every:
            return
        self.feed(trainer, pl_module, target)

    def state_dict(self) -> dict[str, Any]:
        """The number of estimates handed in."""
        return {"num_estimates": self.num_estimates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.num_estimates = int(state_dict.get("num_estimates", 0))

    # --------------------------------------------------------------------- feeding
    def feed(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: DiagCurvatureAdam,
    ) -> bool:
        """Compute the estimate on the kept batch and hand it to ``optimizer``.

        Returns:
            Whether the optimizer entered it (``False``: not finite, dropped).
        """
        step = trainer.global_step
        inputs = pl_module.curvature_inputs(self._batch)
        targets = pl_module.curvature_targets(self._batch)
        ctx = _Context(self, trainer, pl_module, step, _num_samples(targets))
        if self.source != "hessian" and not self._checked:
            check_likelihood_fits_loss(pl_module, ctx.model, inputs, targets)
            self._checked = True
        values = curvature_estimate(
            ctx.model,
            inputs,
            targets,
            self.source,
            probes=ctx.probes,
            reducer=ctx.reducer,
            num_samples=ctx.num_samples,
            num_probes=self.num_probes,
            mc_samples=self.mc_samples,
            likelihood=pl_module.likelihood,
            backend=self.backend,
        )
        finite = ctx.reducer.all_true(bool(torch.isfinite(values).all()))
        accepted = optimizer.set_curvature(
            _by_parameter(pl_module, ctx.model, values, optimizer), drop=not finite
        )
        self.num_estimates += 1
        self._report(trainer, step, values, optimizer, accepted)
        return accepted

    def _report(
        self,
        trainer: pl.Trainer,
        step: int,
        values: Tensor,
        optimizer: DiagCurvatureAdam,
        accepted: bool,
    ) -> None:
        if not accepted:
            rank_zero_warn(
                f"CurvatureFeed: a non-finite {self.source} estimate at step {step} "
                f"was dropped on all ranks ({optimizer.num_dropped} so far)"
            )
        metrics = {
            f"curvature/feed_{self.source}_dropped": float(optimizer.num_dropped)
        }
        if accepted:
            metrics[f"curvature/feed_{self.source}_mean"] = float(values.mean())
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)


def _check_options(
    source: str,
    num_probes: int,
    mc_samples: int,
    every_n_steps: int | None,
    dtype: str,
    backend: str,
) -> None:
    if source not in FEED_SOURCES:
        raise ValueError(f"source must be one of {FEED_SOURCES}, got {source!r}")
    check_num_probes(num_probes)
    check_fisher_kind("mc", mc_samples)
    if every_n_steps is not None and (
        isinstance(every_n_steps, bool)
        or not isinstance(every_n_steps, int)
        or every_n_steps <= 0
    ):
        raise ValueError(
            f"every_n_steps must be a positive int or None (the optimizer's "
            f"update_every), got {every_n_steps!r}"
        )
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    if backend not in HVP_BACKENDS:
        raise ValueError(f"backend must be one of {HVP_BACKENDS}, got {backend!r}")


def _fed_optimizer(optimizer: Any) -> DiagCurvatureAdam | None:
    """The ``DiagCurvatureAdam`` that takes estimates, itself or inside ZeRO."""
    inner = getattr(optimizer, "optim", optimizer)
    for candidate in (optimizer, inner):
        if isinstance(candidate, DiagCurvatureAdam) and any(
            g["curvature"] in FED_SOURCES for g in candidate.param_groups
        ):
            return candidate
    return None


def _by_parameter(
    pl_module: pl.LightningModule,
    model: FunctionalModel,
    values: Tensor,
    optimizer: DiagCurvatureAdam,
) -> dict[Tensor, Tensor]:
    """The flat estimate cut per parameter, for the parameters the optimizer feeds.

    ``ZeroRedundancyOptimizer`` gives each rank's optimizer a part of the
    parameters; each takes its own.
    """
    _, params = trainable_parameters(pl_module)
    fed = {
        id(p)
        for g in optimizer.param_groups
        if g["curvature"] in FED_SOURCES
        for p in g["params"]
    }
    pieces = unflatten(values, model.params)
    return {p: d for p, d in zip(params, pieces, strict=True) if id(p) in fed}
