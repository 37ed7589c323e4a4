"""Callbacks that estimate the Hessian of the training loss."""

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
    hutchinson_diagonal,
    hutchinson_trace,
    reduce_estimate,
)
from curvlightning.core.fisher import check_fisher_kind, fisher_diagonal
from curvlightning.core.hutchpp import hutchpp_trace
from curvlightning.core.operators import HessianOperator
from curvlightning.core.products import hessian_operator
from curvlightning.core.quadform import quadratic_form_trace, sequential_network
from curvlightning.lightning.base import (
    CurvatureCallback,
    _Context,
    check_backend,
    layer_segments,
)
from curvlightning.lightning.fisher import check_likelihood_fits_loss
from curvlightning.logging.wandb_media import log_histograms

__all__ = ["HessianDiagonal", "HessianTrace", "TRACE_ESTIMATORS", "compare_diagonals"]

TRACE_ESTIMATORS = ("hutchinson", "hutch++", "quadratic_form")


class HessianTrace(CurvatureCallback):
    r"""Hutchinson's estimate of ``trace(H)``, in total and per layer.

    On each rank r, ``n = num_probes`` probes give
    ``t_r = (1/n) sum_i v_i^T H_r v_i`` for the Hessian ``H_r`` of the loss on that
    rank's curvature batch; the ranks' estimates are averaged with weights equal to
    their sample counts, which is unbiased for the Hessian of the global batch
    (``H = sum_r (N_r / N) H_r``). A layer's trace uses the same probes restricted
    to its parameters. Logs ``curvature/hessian_trace``, its standard error
    ``curvature/hessian_trace_stderr`` and ``curvature/hessian_trace/<layer>``.

    With ``estimator="quadratic_form"`` each probe costs one exact form
    ``v^T H v`` by second-order tangents (about 1.1-1.3 gradients on an MLP against
    1.8 for a Hessian-vector product), for modules whose outputs are those of one
    ``nn.Sequential`` of Linear layers and ReLU, Tanh or Sigmoid holding every
    trainable parameter, with the categorical or Gaussian likelihood; it reports no
    per-layer traces. Anything else is refused with the reason.

    With ``estimator="hutch++"`` the ``num_probes`` products are spent on Hutch++
    (Meyer et al., 2021): a third sketch the top of the spectrum, whose trace is
    taken exactly, and Hutchinson runs on the remainder. On a decaying spectrum its
    error falls as ``1/m`` instead of ``1/sqrt(m)``; on a flat one it is worse than
    Hutchinson. It reports no per-layer traces.

    Args:
        num_probes: Probes (matvecs) per rank and estimate; at least 3 for Hutch++.
        backend: The Hessian-vector product: ``"double_backward"`` (reuses one
            gradient graph for all probes), ``"forward_over_reverse"``, ``"auto"``
            (the first that the model supports; an op that supports neither is
            named in the error) or ``"finite_difference"`` (two ordinary gradients
            per product; not for ReLU networks, see
            :func:`curvlightning.core.products.finite_difference_hvp`).
        estimator: ``"hutchinson"`` or ``"hutch++"``.
        per_layer: Also log the trace of each layer's diagonal block (Hutchinson).
        **kwargs: Scheduling options of :class:`CurvatureCallback`
            (``every_n_steps``, ``seed``, ``curvature_batch``, ...).

    Raises:
        ValueError: If ``num_probes`` is not positive or ``backend`` is unknown.

    Warning:
        ``backend="double_backward"`` keeps the graph of one gradient pass alive for
        the duration of the estimate (the memory of one training step).
    """

    name = "curvature"

    def __init__(
        self,
        num_probes: int = 16,
        backend: str = "double_backward",
        estimator: str = "hutchinson",
        per_layer: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_num_probes(num_probes)
        check_backend(backend)
        if estimator not in TRACE_ESTIMATORS:
            raise ValueError(
                f"estimator must be one of {TRACE_ESTIMATORS}, got {estimator!r}"
            )
        if estimator == "quadratic_form" and per_layer:
            per_layer = False
        if estimator == "hutch++" and num_probes < 3:
            raise ValueError(
                f"estimator='hutch++' needs num_probes >= 3, got {num_probes}"
            )
        self.num_probes = num_probes
        self.backend = backend
        self.estimator = estimator
        self.per_layer = per_layer
        self._network: torch.nn.Sequential | None = None

    def summary_keys(self) -> list[str]:
        """The trace's metric name."""
        return [f"{self.name}/hessian_trace"]

    def estimate(
        self, ctx: _Context, inputs: Any, targets: Tensor
    ) -> Mapping[str, Estimate]:
        """The trace of the Hessian on this step's curvature batch."""
        if self.estimator == "quadratic_form":
            return {f"{self.name}/hessian_trace": self._forms(ctx, inputs, targets)}
        operator = hessian_operator(ctx.model, inputs, targets, self.backend)
        if self.estimator == "hutch++":
            return {f"{self.name}/hessian_trace": self._hutchpp(ctx, operator)}
        segments = layer_segments(ctx.model) if self.per_layer else None
        estimate = hutchinson_trace(
            operator,
            operator.dim,
            ctx.probes,
            self.num_probes,
            segments=segments,
            reduce_samples=ctx.weighted_mean if self.shared_probes else None,
            dtype=ctx.model.dtype,
            device=ctx.model.device,
        )
        if not self.shared_probes:
            estimate = reduce_estimate(estimate, ctx.reducer, ctx.num_samples)
        return {f"{self.name}/hessian_trace": estimate}

    def _forms(self, ctx: _Context, inputs: Any, targets: Tensor) -> Estimate:
        """Hutchinson from exact quadratic forms of the module's sequential network."""
        if self._network is None:
            self._network = sequential_network(ctx.model, inputs)
            check_likelihood_fits_loss(ctx.pl_module, ctx.model, inputs, targets)
        likelihood = ctx.pl_module.likelihood
        estimate = quadratic_form_trace(
            self._network,
            ctx.model.cast(inputs),
            ctx.model.cast(targets),
            likelihood,
            ctx.probes,
            self.num_probes,
            reduce_samples=ctx.weighted_mean if self.shared_probes else None,
        )
        if self.shared_probes:
            return estimate
        return reduce_estimate(estimate, ctx.reducer, ctx.num_samples)

    def _hutchpp(self, ctx: _Context, operator: HessianOperator) -> Estimate:
        """Hutch++ on each rank's Hessian, or on the global one with shared probes."""
        matvec = ctx.global_matvec(operator) if self.shared_probes else operator
        estimate = hutchpp_trace(
            matvec,
            operator.dim,
            ctx.probes,
            self.num_probes,
            dtype=ctx.model.dtype,
            device=ctx.model.device,
        )
        if self.shared_probes:
            return estimate
        return reduce_estimate(estimate, ctx.reducer, ctx.num_samples)


class HessianDiagonal(CurvatureCallback):
    r"""Hutchinson's estimate of ``diag(H)``, and how far Fisher diagonals are from it.

    Each rank estimates ``(1/n) sum_i v_i * H_r v_i`` with its own ``num_probes``
    probes; the per-rank diagonals are averaged with sample-count weights. Logs the
    sum of the diagonal ``curvature/hessian_diagonal_sum`` (an unbiased trace
    estimate) per layer, and per-layer histograms to wandb.

    With ``compare_fisher`` (any of ``"empirical"``, ``"mc"``, ``"gnb"``) it also
    computes those Fisher diagonals on the same batch and logs, per layer and in
    total, the relative error ``||F - D||_2 / ||D||_2`` and the Pearson correlation
    of ``F`` and ``D``: the claim ``diag(E[H]) = E[g^2]`` measured on your model. The
    Monte-Carlo and Gauss-Newton-Bartlett Fisher estimate the Gauss-Newton diagonal,
    which equals the Hessian diagonal only where the residual term vanishes; the
    empirical Fisher agrees only where the model is calibrated.

    Args:
        num_probes: Probes per rank and estimate.
        compare_fisher: Fisher kinds to compare with the Hessian diagonal.
        mc_samples: Sampled labels (``"mc"``) or draws (``"gnb"``) for the Fisher.
        backend: The Hessian-vector product backend.
        log_histograms: Log per-layer histograms of the diagonal to wandb.
        **kwargs: Scheduling options of :class:`CurvatureCallback`.

    Warning:
        The Hutchinson diagonal has variance ``sum_{k != j} H_jk^2 / n`` per
        coordinate, so the measured distance to a Fisher diagonal includes the
        probe noise: raise ``num_probes`` until the reported distance stops moving.
    """

    def __init__(
        self,
        num_probes: int = 32,
        compare_fisher: Sequence[str] = (),
        mc_samples: int = 1,
        backend: str = "double_backward",
        log_histograms: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_num_probes(num_probes)
        for kind in compare_fisher:
            check_fisher_kind(kind, mc_samples)
        check_backend(backend)
        self.num_probes = num_probes
        self.compare_fisher = tuple(compare_fisher)
        self.mc_samples = mc_samples
        self.backend = backend
        self.log_histograms = log_histograms
        self._last_diagonal: dict[str, Tensor] = {}

    def summary_keys(self) -> list[str]:
        """The diagonal's sum and the Fisher distances."""
        keys = [f"{self.name}/hessian_diagonal_sum"]
        return keys + [
            f"{self.name}/fisher_{k}_vs_hessian" for k in self.compare_fisher
        ]

    def estimate(
        self, ctx: _Context, inputs: Any, targets: Tensor
    ) -> Mapping[str, Estimate]:
        """The Hessian diagonal, its sum, and the Fisher comparisons."""
        operator = hessian_operator(ctx.model, inputs, targets, self.backend)
        diagonal = hutchinson_diagonal(
            operator,
            operator.dim,
            ctx.probes,
            self.num_probes,
            reduce_samples=ctx.weighted_mean if self.shared_probes else None,
            dtype=ctx.model.dtype,
            device=ctx.model.device,
        )
        if not self.shared_probes:
            diagonal = reduce_estimate(diagonal, ctx.reducer, ctx.num_samples)
        layers = layer_segments(ctx.model)
        self._last_diagonal = {n: diagonal.value[s] for n, s in layers.items()}
        out = {
            f"{self.name}/hessian_diagonal": diagonal,
            f"{self.name}/hessian_diagonal_sum": _block_sums(diagonal, layers),
        }
        for kind in self.compare_fisher:
            fisher = fisher_diagonal(
                ctx.model,
                inputs,
                targets,
                ctx.pl_module.likelihood,
                kind,
                mc_samples=self.mc_samples,
                probes=ctx.probes,
                reducer=ctx.reducer,
            )
            key = f"{self.name}/fisher_{kind}_vs_hessian"
            out.update(compare_diagonals(key, fisher.value, diagonal.value, layers))
        return out

    def log_media(
        self, trainer: pl.Trainer, ctx: _Context, estimates: Mapping[str, Estimate]
    ) -> None:
        """Per-layer histograms of the diagonal to wandb."""
        if self.log_histograms:
            prefix = f"{self.name}/hessian_diagonal_hist"
            tensors = {f"{prefix}/{n}": v for n, v in self._last_diagonal.items()}
            log_histograms(trainer, tensors, ctx.step)


def _block_sums(diagonal: Estimate, layers: Mapping[str, slice]) -> Estimate:
    """Sums of a diagonal estimate over each layer (errors added in quadrature).

    The probes make the coordinates' errors correlated, so the quadrature sum is
    only indicative; :class:`HessianTrace` gives the trace with an exact error.
    """

    def block(s: slice) -> Estimate:
        value = diagonal.value[s].sum()
        stderr = diagonal.stderr[s].pow(2).sum().sqrt()
        return Estimate(value, stderr, diagonal.num_matvecs, diagonal.num_samples)

    parts = {name: block(s) for name, s in layers.items()}
    whole = block(slice(None))
    return Estimate(
        whole.value, whole.stderr, whole.num_matvecs, whole.num_samples, parts
    )


def compare_diagonals(
    key: str, fisher: Tensor, hessian: Tensor, layers: Mapping[str, slice]
) -> dict[str, Estimate]:
    """Relative error and correlation of two diagonals, in total and per layer.

    Returns:
        ``{key: relative error, key + "_corr": correlation}``, each with the
        per-layer values in ``parts`` (the standard errors are NaN: these are
        distances between two estimates, not estimates of a quantity).
    """

    def rel_error(s: slice) -> Tensor:
        return (fisher[s] - hessian[s]).norm() / hessian[s].norm().clamp_min(1e-30)

    def corr(s: slice) -> Tensor:
        stacked = torch.stack([fisher[s], hessian[s]])
        if stacked.shape[1] < 2:
            return stacked.new_tensor(float("nan"))
        return torch.corrcoef(stacked)[0, 1]

    def make(fn: Any) -> Estimate:
        parts = {n: exact_estimate(fn(s)) for n, s in layers.items()}
        whole = exact_estimate(fn(slice(None)))
        return Estimate(whole.value, whole.stderr, 0, 0, parts)

    return {key: make(rel_error), f"{key}_corr": make(corr)}
