"""The diagonal-curvature Adam family: AdamW, AdaHessian-like and Sophia-like."""

from curvlightning.optim.diag_adam import (
    ADAHESSIAN_DEFAULTS,
    CURVATURE_SOURCES,
    SOPHIA_DEFAULTS,
    DiagCurvatureAdam,
    adahessian_like,
    sophia_like,
    spatial_average,
)

__all__ = [
    "ADAHESSIAN_DEFAULTS",
    "CURVATURE_SOURCES",
    "SOPHIA_DEFAULTS",
    "DiagCurvatureAdam",
    "adahessian_like",
    "sophia_like",
    "spatial_average",
]
