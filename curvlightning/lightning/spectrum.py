"""Callbacks for the Hessian's spectrum and the local quadratic model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from curvlightning.core.estimators import Estimate, exact_estimate
from curvlightning.core.functional import flatten
from curvlightning.core.lanczos import spectral_density, top_eigenvalues
from curvlightning.core.newton import newton_direction, quadratic_model_change
from curvlightning.core.operators import HessianOperator
from curvlightning.core.products import hessian_operator
from curvlightning.lightning.base import (
    CurvatureCallback,
    _check_positive_int,
    _Context,
    check_backend,
)
from curvlightning.logging.wandb_media import log_line_plot

__all__ = ["HessianSpectrum", "QuadraticModelCheck"]


class HessianSpectrum(CurvatureCallback):
    r"""Top eigenvalues (Lanczos) and spectral density (stochastic Lanczos quadrature).

    Both need products with the Hessian of the global batch ``H = sum_r (N_r/N) H_r``
    itself, so every product is all-reduced (one all-reduce of p numbers per
    Lanczos step, as costly as a gradient all-reduce) and the start vectors are the
    same on all ranks. Logs ``curvature/hessian_eigenvalues`` (the largest) and
    ``curvature/hessian_eigenvalues/<i>`` for ``i = 1..top_k`` with the Ritz
    residual norms as ``..._stderr``; with ``density=True`` also the trace from the
    density's first moment, ``curvature/hessian_density_trace``, and a wandb line
    plot ``curvature/hessian_density`` of the smoothed density.

    Args:
        top_k: How many of the largest eigenvalues to report.
        num_steps: Lanczos steps for the eigenvalues (matvecs), at least ``top_k``.
        density: Also estimate the spectral density.
        density_probes: Lanczos runs averaged in the density.
        density_steps: Lanczos steps per density run.
        grid: Points of the smoothed density.
        backend: The Hessian-vector product backend.
        **kwargs: Scheduling options of :class:`CurvatureCallback`.

    Warning:
        Ritz values converge from inside the spectrum: the largest is a lower bound
        of ``lambda_max`` up to its residual. ``num_steps`` is clamped to the number
        of parameters.
    """

    def __init__(
        self,
        top_k: int = 5,
        num_steps: int = 30,
        density: bool = True,
        density_probes: int = 2,
        density_steps: int = 30,
        grid: int = 200,
        backend: str = "double_backward",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in [
            ("top_k", top_k),
            ("num_steps", num_steps),
            ("density_probes", density_probes),
            ("density_steps", density_steps),
            ("grid", grid),
        ]:
            _check_positive_int(name, value)
        if top_k > num_steps:
            raise ValueError(
                f"top_k={top_k} needs at least as many Lanczos steps; got "
                f"num_steps={num_steps}: raise num_steps"
            )
        check_backend(backend)
        self.top_k = top_k
        self.num_steps = num_steps
        self.density = density
        self.density_probes = density_probes
        self.density_steps = density_steps
        self.grid = grid
        self.backend = backend
        self.densities: list[dict[str, Any]] = []

    def summary_keys(self) -> list[str]:
        """The largest eigenvalue and the density's trace."""
        keys = [f"{self.name}/hessian_eigenvalues"]
        return keys + ([f"{self.name}/hessian_density_trace"] if self.density else [])

    def estimate(
        self, ctx: _Context, inputs: Any, targets: Tensor
    ) -> Mapping[str, Estimate]:
        """Eigenvalues and density of the global batch's Hessian."""
        operator = hessian_operator(ctx.model, inputs, targets, self.backend)
        matvec = ctx.global_matvec(operator)
        probes = dataclasses.replace(ctx.probes, shared=True)
        dim, dtype, device = operator.dim, ctx.model.dtype, ctx.model.device
        steps = min(self.num_steps, dim)
        ritz = top_eigenvalues(
            matvec,
            dim,
            min(self.top_k, steps),
            steps,
            probes,
            dtype=dtype,
            device=device,
        )
        out = {f"{self.name}/hessian_eigenvalues": _eigen_estimate(ritz, steps)}
        if self.density:
            slq = spectral_density(
                matvec,
                dim,
                dataclasses.replace(probes, stream="density"),
                self.density_probes,
                min(self.density_steps, dim),
                grid=self.grid,
                dtype=dtype,
                device=device,
            )
            first = slq.moments(1)
            trace = Estimate(
                first.value[0] * dim,
                first.stderr[0] * dim,
                slq.num_matvecs,
                slq.num_probes,
            )
            out[f"{self.name}/hessian_density_trace"] = trace
            self._last_density = (slq.grid, slq.density)
        return out

    def log_media(
        self, trainer: pl.Trainer, ctx: _Context, estimates: Mapping[str, Estimate]
    ) -> None:
        """The smoothed density as a wandb line plot."""
        if not self.density:
            return
        grid, density = self._last_density
        self.densities.append(
            {"step": ctx.step, "grid": grid.tolist(), "density": density.tolist()}
        )
        log_line_plot(
            trainer,
            f"{self.name}/hessian_density",
            grid.tolist(),
            density.tolist(),
            f"Hessian spectral density at step {ctx.step}",
            "eigenvalue",
            "density",
            ctx.step,
        )

    def state_dict(self) -> dict[str, Any]:
        """The base state and the logged densities."""
        return {**super().state_dict(), "densities": list(self.densities)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        super().load_state_dict(state_dict)
        self.densities = list(state_dict.get("densities", []))


def _eigen_estimate(ritz: Any, steps: int) -> Estimate:
    values, residuals = ritz.values, ritz.residual_norms
    parts = {
        str(i + 1): Estimate(values[i], residuals[i], steps, 1)
        for i in range(values.shape[0])
    }
    return Estimate(values[0], residuals[0], steps, 1, parts)


class QuadraticModelCheck(CurvatureCallback):
    r"""How well the local quadratic model predicts the optimizer's actual step.

    On a scheduled step it keeps the parameters ``theta_0`` and the batch before the
    optimizer moves them, and after the step compares, on that batch, the change the
    quadratic model predicts for the actual step ``s = theta_1 - theta_0``,

    .. math::
        \Delta_{\text{model}} = g^\top s + \tfrac{1}{2} s^\top H s,

    with the change that happened, ``L(theta_1) - L(theta_0)``. Logs
    ``curvature/quadratic_model/predicted``, ``.../actual``, ``.../ratio``
    (actual over predicted: 1 where the quadratic model holds) and
    ``.../first_order`` (``g^T s``). With ``newton_iters > 0`` it also solves for
    the damped Newton direction ``-(H + damping I)^{-1} g`` by conjugate gradients
    and logs the decrease the model predicts for it,
    ``.../newton_predicted``, and the cosine between the Newton direction and the
    optimizer's step, ``.../newton_cosine``: a yardstick for the optimizer.

    Args:
        newton_iters: CG iterations for the Newton direction (0: none).
        damping: Levenberg-Marquardt damping of the Newton system.
        backend: The Hessian-vector product backend.
        **kwargs: Scheduling options of :class:`CurvatureCallback`.

    Warning:
        Under several ranks every quantity is a sample-count-weighted mean of the
        per-rank values, which for ``g``, ``H`` and ``L`` equals the global batch's
        value; the CG solve then all-reduces one product per iteration.
    """

    def __init__(
        self,
        newton_iters: int = 0,
        damping: float = 1e-3,
        backend: str = "double_backward",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(newton_iters, bool) or not isinstance(newton_iters, int):
            raise TypeError(f"newton_iters must be an int, got {newton_iters!r}")
        if newton_iters < 0:
            raise ValueError(f"newton_iters must be >= 0, got {newton_iters}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        check_backend(backend)
        self.newton_iters = newton_iters
        self.damping = damping
        self.backend = backend
        self._before: tuple[tuple[Tensor, ...], Any] | None = None
        self._pending_batch: Any = None

    def on_train_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        """Nothing: the check needs the step just taken, not the epoch's end."""

    def summary_keys(self) -> list[str]:
        """The ratio of actual to predicted change."""
        return [f"{self.name}/quadratic_model/ratio"]

    def on_before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """Keep the parameters before a step that lands on the schedule."""
        if (trainer.global_step + 1) % self.every_n_steps == 0:
            params = tuple(
                p.detach().clone() for p in pl_module.parameters() if p.requires_grad
            )
            self._before = (params, self._pending_batch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        """Remember the batch the coming step trains on."""
        self._pending_batch = batch

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Compare prediction and outcome of the step just taken."""
        if self._before is not None and trainer.global_step % self.every_n_steps == 0:
            self.run(trainer, pl_module, self._before[1])
            self._before = None

    def estimate(
        self, ctx: _Context, inputs: Any, targets: Tensor
    ) -> Mapping[str, Estimate]:
        """Predicted and actual loss change of the last step."""
        model = ctx.model
        after = model.params
        model.params = tuple(p.to(model.dtype) for p in self._before[0])
        operator = hessian_operator(model, inputs, targets, self.backend)
        step = flatten(after) - flatten(model.params)
        gradient = ctx.weighted_mean(operator.gradient())
        curvature = ctx.weighted_mean(operator(step))
        first = gradient @ step
        predicted = first + 0.5 * step @ curvature
        with torch.no_grad():
            loss_after = model.loss_at(after, operator.inputs, operator.targets)
        actual = ctx.weighted_mean(loss_after - operator.loss())
        values = {
            "predicted": predicted,
            "actual": actual,
            "ratio": actual / predicted,
            "first_order": first,
        }
        if self.newton_iters:
            values.update(self._newton(ctx, operator, gradient, step))
        prefix = f"{self.name}/quadratic_model"
        return {f"{prefix}/{k}": exact_estimate(v, 1) for k, v in values.items()}

    def _newton(
        self, ctx: _Context, operator: HessianOperator, gradient: Tensor, step: Tensor
    ) -> dict[str, Tensor]:
        matvec = ctx.global_matvec(operator)
        newton = newton_direction(
            matvec, gradient, self.damping, max_iters=self.newton_iters, rtol=1e-6
        )
        direction = newton.direction
        predicted = quadratic_model_change(gradient, matvec, direction)
        cosine = direction @ step / (direction.norm() * step.norm()).clamp_min(1e-30)
        return {"newton_predicted": predicted, "newton_cosine": cosine}
