"""Callbacks that estimate the Hessian of the training loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from curvlightning.core.estimators import (
    Estimate,
    check_num_probes,
    hutchinson_trace,
    reduce_estimate,
)
from curvlightning.core.operators import HVP_BACKENDS, HessianOperator
from curvlightning.lightning.base import CurvatureCallback, _Context, layer_segments

__all__ = ["HessianTrace"]


class HessianTrace(CurvatureCallback):
    r"""Hutchinson's estimate of ``trace(H)``, in total and per layer.

    On each rank r, ``n = num_probes`` probes give
    ``t_r = (1/n) sum_i v_i^T H_r v_i`` for the Hessian ``H_r`` of the loss on that
    rank's curvature batch; the ranks' estimates are averaged with weights equal to
    their sample counts, which is unbiased for the Hessian of the global batch
    (``H = sum_r (N_r / N) H_r``). A layer's trace uses the same probes restricted
    to its parameters. Logs ``curvature/hessian_trace``, its standard error
    ``curvature/hessian_trace_stderr`` and ``curvature/hessian_trace/<layer>``.

    Args:
        num_probes: Probes per rank and estimate.
        backend: The Hessian-vector product: ``"double_backward"`` (reuses one
            gradient graph for all probes) or ``"forward_over_reverse"``.
        per_layer: Also log the trace of each layer's diagonal block.
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
        per_layer: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_num_probes(num_probes)
        if backend not in HVP_BACKENDS:
            raise ValueError(f"backend must be one of {HVP_BACKENDS}, got {backend!r}")
        self.num_probes = num_probes
        self.backend = backend
        self.per_layer = per_layer

    def summary_keys(self) -> list[str]:
        """The trace's metric name."""
        return [f"{self.name}/hessian_trace"]

    def estimate(
        self, ctx: _Context, inputs: Any, targets: Tensor
    ) -> Mapping[str, Estimate]:
        """The trace of the Hessian on this step's curvature batch."""
        operator = HessianOperator(ctx.model, inputs, targets, self.backend)
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
