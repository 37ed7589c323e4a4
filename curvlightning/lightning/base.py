"""The scheduling base that every curvature callback is built on."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from curvlightning.core.distributed import Reducer, default_reducer
from curvlightning.core.estimators import Estimate
from curvlightning.core.functional import FunctionalModel
from curvlightning.core.probes import ProbeSource, mix_seed
from curvlightning.core.products import BATCHED_HVP_BACKENDS
from curvlightning.lightning.mixin import CurvatureMixin

__all__ = [
    "CURVATURE_BATCHES",
    "CurvatureCallback",
    "check_backend",
    "layer_of",
    "layer_segments",
    "log_scalars",
]

CURVATURE_BATCHES = ("current", "fixed")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def layer_of(name: str) -> str:
    """The layer (owning module) of a parameter: ``net.0.weight`` -> ``net.0``."""
    return name.rpartition(".")[0] or name


def layer_segments(model: FunctionalModel) -> dict[str, slice]:
    """Slices of the flat parameter vector, one per layer (module).

    Parameters are grouped by the module that owns them (``net.0.weight`` and
    ``net.0.bias`` form ``net.0``); ``named_parameters`` lists a module's parameters
    together, so every group is one contiguous slice.
    """
    out: dict[str, slice] = {}
    start = 0
    for name, p in zip(model.names, model.params, strict=True):
        layer = layer_of(name)
        stop = start + p.numel()
        if layer in out and out[layer].stop == start:
            out[layer] = slice(out[layer].start, stop)
        else:
            out[name if layer in out else layer] = slice(start, stop)
        start = stop
    return out


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class CurvatureCallback(Callback):
    """Runs a curvature estimate on a schedule and logs it.

    Every ``every_n_steps`` optimizer steps (and at the end of each training epoch
    with ``at_epoch_end=True``) the subclass' :meth:`estimate` runs on the unwrapped
    ``LightningModule`` (never through a DDP or sharded wrapper), on every rank, on
    that rank's curvature batch; the subclass reduces its estimate across ranks.
    All ranks take the same branch: the schedule depends on ``trainer.global_step``
    only, and a non-finite estimate is skipped on all ranks together and counted.

    Args:
        every_n_steps: Optimizer steps between two estimates.
        seed: Seeds probes and sampled labels, mixed with the step and the rank.
        curvature_batch: ``"current"`` (the batch just trained on) or ``"fixed"``
            (the first training batch, kept for the whole run and saved in the
            checkpoint, so that estimates at different steps are comparable).
        curvature_batch_size: Use only the first samples of each rank's curvature
            batch; ``None`` keeps the whole batch.
        at_epoch_end: Also estimate at the end of every training epoch.
        dtype: ``"float32"`` or ``"float64"``: the precision of the pass, whatever
            the training precision.
        shared_probes: Draw the same probes on all ranks (then R ranks of B/R
            samples reproduce 1 rank of B samples exactly); by default each rank
            draws its own, which cuts the variance by R at no extra cost.
    """

    #: Prefix of the logged metric names.
    name = "curvature"

    def __init__(
        self,
        every_n_steps: int = 50,
        seed: int = 0,
        curvature_batch: str = "current",
        curvature_batch_size: int | None = None,
        at_epoch_end: bool = False,
        dtype: str = "float32",
        shared_probes: bool = False,
    ) -> None:
        _check_positive_int("every_n_steps", every_n_steps)
        if curvature_batch not in CURVATURE_BATCHES:
            raise ValueError(
                f"curvature_batch must be one of {CURVATURE_BATCHES}, got "
                f"{curvature_batch!r}"
            )
        if curvature_batch_size is not None:
            _check_positive_int("curvature_batch_size", curvature_batch_size)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
        _check_bool("at_epoch_end", at_epoch_end)
        _check_bool("shared_probes", shared_probes)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.curvature_batch = curvature_batch
        self.curvature_batch_size = curvature_batch_size
        self.at_epoch_end = at_epoch_end
        self.dtype = dtype
        self.shared_probes = shared_probes
        self.history: list[dict[str, Any]] = []
        self.num_skipped = 0
        self._fixed_batch: Any = None
        self._last_step = -1
        self._last_batch: Any = None

    @property
    def state_key(self) -> str:
        """Tells apart two callbacks of one class in a checkpoint."""
        return self._generate_state_key(**self._identity())

    def _identity(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps, "seed": self.seed}

    # ----------------------------------------------------------------- subclass API
    def estimate(
        self, ctx: _Context, inputs: Any, targets: Tensor
    ) -> Mapping[str, Estimate]:
        """Compute the estimates, reduced over ranks, keyed by metric name."""
        raise NotImplementedError

    def log_media(
        self, trainer: pl.Trainer, ctx: _Context, estimates: Mapping[str, Estimate]
    ) -> None:
        """Log histograms or plots (rank zero); the base logs scalars only."""

    # ------------------------------------------------------------------ Lightning
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str):
        """Check that the module exposes what the estimates need."""
        if not isinstance(pl_module, CurvatureMixin):
            raise TypeError(
                f"{type(self).__name__} needs a LightningModule that inherits "
                f"CurvatureMixin; got {type(pl_module).__name__}. Add the mixin: "
                f"class {type(pl_module).__name__}(CurvatureMixin, LightningModule)"
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Estimate when an optimizer step lands on the schedule."""
        self._last_batch = batch
        if self.curvature_batch == "fixed" and self._fixed_batch is None:
            self._fixed_batch = _to_cpu(batch)
        step = trainer.global_step
        if step == self._last_step or step == 0 or step % self.every_n_steps:
            return
        self.run(trainer, pl_module, batch)

    def on_train_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        """Estimate at the epoch end when asked, on the last batch trained on."""
        if self.at_epoch_end and self._last_batch is not None:
            if trainer.global_step != self._last_step:
                self.run(trainer, pl_module, self._last_batch)

    def state_dict(self) -> dict[str, Any]:
        """History, skip count and the fixed curvature batch."""
        return {
            "history": list(self.history),
            "num_skipped": self.num_skipped,
            "fixed_batch": _to_cpu(self._fixed_batch),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.history = list(state_dict.get("history", []))
        self.num_skipped = int(state_dict.get("num_skipped", 0))
        self._fixed_batch = state_dict.get("fixed_batch")
        self._last_step = int(state_dict.get("last_step", -1))

    # --------------------------------------------------------------------- running
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any):
        """One scheduled estimate: compute, check finiteness on all ranks, log."""
        step = trainer.global_step
        self._last_step = step
        batch = self._select_batch(batch, pl_module)
        inputs = pl_module.curvature_inputs(batch)
        targets = pl_module.curvature_targets(batch)
        ctx = _Context(self, trainer, pl_module, step, _num_samples(targets))
        estimates = self.estimate(ctx, inputs, targets)
        finite = all(_finite(e) for e in estimates.values())
        if not ctx.reducer.all_true(finite):
            self.num_skipped += 1
            rank_zero_warn(
                f"{type(self).__name__}: a non-finite estimate at step {step} was "
                f"skipped on all ranks ({self.num_skipped} so far)"
            )
            self._log_scalars(trainer, {f"{self.name}/skipped": self.num_skipped}, step)
            return
        self._record(trainer, step, estimates)
        if trainer.is_global_zero:
            self.log_media(trainer, ctx, estimates)

    def _select_batch(self, batch: Any, pl_module: pl.LightningModule) -> Any:
        if self.curvature_batch == "fixed":
            if self._fixed_batch is None:
                self._fixed_batch = _to_cpu(batch)
            batch = _to_device(self._fixed_batch, pl_module.device)
        if self.curvature_batch_size is not None:
            batch = _head(batch, self.curvature_batch_size)
        return batch

    def _record(
        self, trainer: pl.Trainer, step: int, estimates: Mapping[str, Estimate]
    ) -> None:
        scalars: dict[str, float] = {}
        for key, est in estimates.items():
            if est.value.dim() != 0:
                continue
            row = {
                "step": step,
                "value": est.item(),
                "stderr": float(est.stderr),
                "num_matvecs": est.num_matvecs,
                "per_layer": {n: part.item() for n, part in est.parts.items()},
            }
            self.history.append({"key": key, **row})
            scalars[key] = row["value"]
            if not math.isnan(row["stderr"]):
                scalars[f"{key}_stderr"] = row["stderr"]
            for layer, value in row["per_layer"].items():
                scalars[f"{key}/{layer}"] = value
        self._log_scalars(trainer, scalars, step)

    def _log_scalars(
        self, trainer: pl.Trainer, scalars: Mapping[str, float], step: int
    ) -> None:
        log_scalars(trainer, scalars, step)

    def summary_keys(self) -> list[str]:
        """The scalar metrics this callback logs (without layers and errors)."""
        return []

    def summary_lines(self, trainer: pl.Trainer) -> list[str]:
        """Last value of each scalar estimate, from ``trainer.callback_metrics``.

        Read from the metrics (not from :attr:`history`) so that it also works in
        the main process of a ``ddp_spawn`` run, which gets only the metrics back.
        """
        metrics = trainer.callback_metrics
        lines = []
        for key in self.summary_keys():
            if key in metrics:
                err = metrics.get(f"{key}_stderr")
                tail = f" +- {float(err):.4g}" if err is not None else ""
                lines.append(f"{key} = {float(metrics[key]):.4g}{tail}")
        if self.num_skipped or f"{self.name}/skipped" in metrics:
            lines.append(f"{type(self).__name__}: non-finite estimates skipped")
        return lines


class _Context:
    """What an estimate needs to know about the run at this step."""

    def __init__(
        self,
        callback: CurvatureCallback,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        step: int,
        num_samples: int,
    ) -> None:
        self.trainer = trainer
        self.pl_module = pl_module
        self.step = step
        self.num_samples = num_samples
        self.reducer: Reducer = default_reducer()
        self.probes = ProbeSource(
            seed=callback.seed,
            step=step,
            rank=self.reducer.rank,
            shared=callback.shared_probes,
            stream=type(callback).__name__,
        )
        self.model = FunctionalModel(
            pl_module,
            forward=pl_module.checked_curvature_outputs,
            loss=pl_module.curvature_loss,
            rng_seed=mix_seed(callback.seed, step, self.reducer.rank, "dropout"),
            dtype=_DTYPES[callback.dtype],
        )

    def weighted_mean(self, tensor: Tensor) -> Tensor:
        """Mean over ranks weighted by their sample counts."""
        return self.reducer.weighted_mean(tensor, self.num_samples)

    def global_matvec(self, matvec: Any) -> Any:
        """``v -> H v`` with the global batch's ``H = sum_r (N_r / N) H_r``.

        One all-reduce of p numbers per product; ``matvec`` itself on one rank.
        """
        if self.reducer.world_size == 1:
            return matvec
        return lambda v: self.weighted_mean(matvec(v))


def log_scalars(trainer: pl.Trainer, scalars: Mapping[str, float], step: int) -> None:
    """Send scalars to every logger (rank zero) and to ``trainer.callback_metrics``.

    Written straight to the loggers at ``step`` rather than through
    ``LightningModule.log``, whose on-step values reach the loggers only every
    ``log_every_n_steps`` steps; ``callback_metrics`` carries them back to the main
    process of a ``ddp_spawn`` run.
    """
    metrics = trainer.callback_metrics
    for key, value in scalars.items():
        metrics[key] = torch.tensor(value)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(dict(scalars), step=step)


def check_backend(backend: str) -> None:
    """Raise a ``ValueError`` unless ``backend`` names a Hessian-vector product."""
    if backend not in BATCHED_HVP_BACKENDS:
        raise ValueError(
            f"backend must be one of {BATCHED_HVP_BACKENDS}, got {backend!r}"
        )


def _finite(estimate: Estimate) -> bool:
    return bool(torch.isfinite(estimate.value).all())


def _num_samples(targets: Any) -> int:
    if isinstance(targets, Tensor) and targets.dim() > 0:
        return int(targets.shape[0])
    raise TypeError(
        "curvature_targets(batch) must return a tensor with the batch dimension "
        f"first; got {type(targets).__name__}"
    )


def _map(batch: Any, fn: Any) -> Any:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(v, fn) for v in batch)
    return batch


def _to_cpu(batch: Any) -> Any:
    return _map(batch, lambda t: t.detach().cpu())


def _to_device(batch: Any, device: torch.device) -> Any:
    return _map(batch, lambda t: t.to(device))


def _head(batch: Any, size: int) -> Any:
    return _map(batch, lambda t: t[:size] if t.dim() > 0 else t)
