"""Gradient statistics across ranks: norms, per-rank norms, noise scale, SNR."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from curvlightning.core.distributed import Reducer, default_reducer
from curvlightning.core.functional import FunctionalModel, unflatten
from curvlightning.core.gradients import NoiseScaleEMA, noise_scale_parts
from curvlightning.core.products import flat_gradient
from curvlightning.core.sumsq import gradient_power_sums
from curvlightning.lightning.base import _check_positive_int, layer_of, log_scalars
from curvlightning.lightning.mixin import CurvatureMixin

__all__ = ["GradientStats"]


class _LocalNorms:
    """State of the DDP communication hook: squared local gradient norms.

    The hook sees each bucket of this rank's gradients before they are averaged
    over ranks, records the squared norm of every parameter's gradient, and then
    runs the standard all-reduce, so training is unchanged.
    """

    def __init__(self, process_group: dist.ProcessGroup | None) -> None:
        self.process_group = process_group
        self.sq_norms: dict[int, Tensor] = {}

    def record(self, bucket: dist.GradBucket) -> None:
        for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
            self.sq_norms[id(param)] = grad.detach().pow(2).sum().double()


def _recording_allreduce(state, bucket):  # noqa: ANN001, ANN201
    """Record the bucket's local gradient norms, then all-reduce it as DDP does.

    Unannotated on purpose: DDP checks the annotations of a hook against the
    runtime classes, which postponed (string) annotations would fail.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    state.record(bucket)
    return default_hooks.allreduce_hook(state.process_group, bucket)


class GradientStats(Callback):
    r"""Gradient norms, per-rank norms, the gradient noise scale and per-layer SNR.

    Every ``every_n_steps`` optimizer steps, just before the step, it logs:

    - ``grad/norm`` and ``grad/norm/<layer>``: the norm of the gradient the
      optimizer uses (reduced over ranks; for sharded DTensor gradients the norm of
      the local shards is reduced, never a shard's norm reported as the whole);
    - ``grad/local_norm/rank<r>``: each rank's own gradient norm, before DDP
      averages it, read in a DDP communication hook at no extra backward pass;
    - ``grad/noise_scale``: ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al.,
      2018, appendix A.1) from the ratio of EMAs of the unbiased estimates
      ``grad/sq_norm_est`` and ``grad/trace_sigma_est``, with the small batch the
      rank's local batch (B/R) and the big batch the global one (B);
    - ``grad/snr/<layer>``: ``|G_l|^2 / tr(Sigma_l)``, the same two estimates
      restricted to a layer: the squared mean gradient over the per-sample
      variance.

    On one device there is no second batch size, so the small batch is a single
    sample: the per-sample squared gradient norms come from
    :func:`curvlightning.core.sumsq.gradient_power_sums` (about 1.3 gradients;
    needs :class:`~curvlightning.CurvatureMixin`) and the batch gradient from one
    more backward pass of the curvature loss.

    Args:
        every_n_steps: Optimizer steps between two logs.
        per_layer: Also log per-layer norms and SNRs.
        noise_scale: Estimate the noise scale and SNRs.
        ema_beta: Decay of the EMAs of the noise-scale parts.

    Warning:
        Under DDP the callback registers its own communication hook; a strategy
        that already has one (``ddp_comm_hook``) is refused. Under sharded
        strategies (FSDP2) the norms are exact but the per-rank norms and noise
        scale are not available (the local gradients are reduce-scattered inside
        the sharded backward). With gradient accumulation the batch sizes are
        multiplied by ``accumulate_grad_batches``.
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        per_layer: bool = True,
        noise_scale: bool = True,
        ema_beta: float = 0.99,
    ) -> None:
        _check_positive_int("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer
        self.noise_scale = noise_scale
        self.ema = NoiseScaleEMA(ema_beta)
        self.layer_emas: dict[str, NoiseScaleEMA] = {}
        self._hook: _LocalNorms | None = None
        self._local_norms: list[float] = []
        self._batch: Any = None
        self._warned = False

    # ------------------------------------------------------------------ Lightning
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        """Register the communication hook on a DDP-wrapped model."""
        wrapped = trainer.strategy.model
        if isinstance(wrapped, DistributedDataParallel) and self.noise_scale:
            if getattr(trainer.strategy, "_ddp_comm_hook", None) is not None:
                raise ValueError(
                    "GradientStats reads local gradients in its own DDP communication "
                    "hook, but the strategy already has ddp_comm_hook="
                    f"{trainer.strategy._ddp_comm_hook!r}; remove it or set "
                    "noise_scale=False"
                )
            self._hook = _LocalNorms(wrapped.process_group)
            wrapped.register_comm_hook(self._hook, _recording_allreduce)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        """Remember the batch for the sample count and the single-device path."""
        self._batch = batch

    def on_before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """Compute and log the statistics of the gradient about to be used."""
        if trainer.global_step % self.every_n_steps:
            return
        reducer = default_reducer()
        layers = _layers(pl_module)
        sq = {name: _global_sq_norm(params) for name, params in layers.items()}
        metrics = {"grad/norm": math.sqrt(sum(sq.values()))}
        if self.per_layer:
            metrics.update({f"grad/norm/{n}": math.sqrt(v) for n, v in sq.items()})
        if self.noise_scale:
            metrics.update(self._noise(trainer, pl_module, reducer, layers, sq))
        log_scalars(trainer, metrics, trainer.global_step)

    # -------------------------------------------------------------------- helpers
    def _noise(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        reducer: Reducer,
        layers: Mapping[str, list[Tensor]],
        sq_big: Mapping[str, float],
    ) -> dict[str, float]:
        if self._hook is not None:
            parts = self._ddp_parts(trainer, pl_module, reducer, layers, sq_big)
        elif trainer.world_size == 1 and isinstance(pl_module, CurvatureMixin):
            parts = _single_device_parts(pl_module, self._batch, layers)
        else:
            if not self._warned:
                rank_zero_warn(
                    "GradientStats: the noise scale needs DDP (or one device and a "
                    "module with CurvatureMixin); it is not logged for this run"
                )
                self._warned = True
            return {}
        return self._fold(parts)

    def _ddp_parts(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        reducer: Reducer,
        layers: Mapping[str, list[Tensor]],
        sq_big: Mapping[str, float],
    ) -> dict[str, tuple[float, float, float, float]]:
        local = self._hook.sq_norms
        names = list(layers)
        local_sq = torch.tensor(
            [float(sum(local[id(p)] for p in layers[n])) for n in names],
            dtype=torch.float64,
        )
        gathered = reducer.all_gather_scalar(float(local_sq.sum()))
        mean_sq = reducer.all_reduce_sum(local_sq) / reducer.world_size
        batch = _batch_size(pl_module, self._batch) * trainer.accumulate_grad_batches
        sizes = reducer.all_gather_scalar(float(batch))
        small = len(sizes) / sum(1.0 / s for s in sizes)
        big = float(sum(sizes))
        self._local_norms = [math.sqrt(v) for v in gathered]
        return {
            n: (float(mean_sq[i]), sq_big[n], small, big) for i, n in enumerate(names)
        }

    def _fold(
        self, parts: Mapping[str, tuple[float, float, float, float]]
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        total_small = sum(p[0] for p in parts.values())
        total_big = sum(p[1] for p in parts.values())
        _, _, small, big = next(iter(parts.values()))
        whole = noise_scale_parts(total_small, total_big, small, big)
        self.ema.update(whole.sq_norm, whole.trace_sigma)
        metrics["grad/sq_norm_est"] = float(whole.sq_norm)
        metrics["grad/trace_sigma_est"] = float(whole.trace_sigma)
        metrics["grad/noise_scale"] = self.ema.b_simple
        for i, norm in enumerate(self._local_norms):
            metrics[f"grad/local_norm/rank{i}"] = norm
        if self.per_layer:
            for name, (s, b, small, big) in parts.items():
                est = noise_scale_parts(s, b, small, big)
                ema = self.layer_emas.setdefault(name, NoiseScaleEMA(self.ema.beta))
                ema.update(est.sq_norm, est.trace_sigma)
                metrics[f"grad/snr/{name}"] = _ratio(ema.sq_norm, ema.trace_sigma)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The EMAs of the noise-scale parts, in total and per layer."""
        return {
            "ema": self.ema.state_dict(),
            "layers": {n: e.state_dict() for n, e in self.layer_emas.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.ema.load_state_dict(state_dict["ema"])
        self.layer_emas = {}
        for name, state in state_dict.get("layers", {}).items():
            self.layer_emas[name] = NoiseScaleEMA(self.ema.beta)
            self.layer_emas[name].load_state_dict(state)


def _ratio(num: float, den: float) -> float:
    """``num / den``, NaN where the denominator is zero or not finite."""
    return num / den if den != 0 and math.isfinite(den) else math.nan


def _layers(pl_module: pl.LightningModule) -> dict[str, list[Tensor]]:
    """Trainable parameters grouped by the module that owns them."""
    out: dict[str, list[Tensor]] = {}
    for name, p in pl_module.named_parameters():
        if p.requires_grad:
            out.setdefault(layer_of(name), []).append(p)
    return out


def _global_sq_norm(params: list[Tensor]) -> float:
    """Squared norm of the gradients of ``params``, whole even when sharded."""
    total = 0.0
    for p in params:
        if p.grad is None:
            continue
        norm = torch.linalg.vector_norm(p.grad.detach().double())
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        total += float(norm) ** 2
    return total


def _batch_size(pl_module: pl.LightningModule, batch: Any) -> int:
    if isinstance(pl_module, CurvatureMixin):
        return int(pl_module.curvature_targets(batch).shape[0])
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(first.shape[0])


def _single_device_parts(
    pl_module: pl.LightningModule, batch: Any, layers: Mapping[str, list[Tensor]]
) -> dict[str, tuple[float, float, float, float]]:
    """Per-layer parts with B_small = 1 (per-sample) and B_big = N (the batch)."""
    inputs = pl_module.curvature_inputs(batch)
    targets = pl_module.curvature_targets(batch)
    model = FunctionalModel(
        pl_module,
        forward=pl_module.checked_curvature_outputs,
        loss=pl_module.curvature_loss,
        rng_seed=None,
    )
    inputs, targets = model.cast(inputs), model.cast(targets)
    likelihood = pl_module.likelihood
    sums = gradient_power_sums(
        model, inputs, targets, likelihood.per_sample_loss, fourth_powers=False
    )
    flat = flat_gradient(model, model.params, inputs, targets)
    grads = unflatten(flat, model.params)
    count = int(targets.shape[0])
    owners: dict[str, list[int]] = {name: [] for name in layers}
    for i, name in enumerate(model.names):
        owners[layer_of(name)].append(i)
    parts = {}
    for name, idx in owners.items():
        small = float(sums.sample_sq_norms[:, idx].sum()) / count
        big = float(sum(grads[i].pow(2).sum() for i in idx))
        parts[name] = (small, big, 1.0, float(count))
    return parts
