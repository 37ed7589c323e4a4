"""curvlightning: the curvature of the loss in PyTorch Lightning training."""

from curvlightning.lightning import (
    CurvatureCallback,
    CurvatureMixin,
    CurvatureReport,
    FisherDiagonal,
    HessianDiagonal,
    HessianTrace,
)

__version__ = "0.1.0"

__all__ = [
    "CurvatureCallback",
    "CurvatureMixin",
    "CurvatureReport",
    "FisherDiagonal",
    "HessianDiagonal",
    "HessianTrace",
    "__version__",
]
