"""curvlightning: the curvature of the loss in PyTorch Lightning training.

The Lightning layer is imported on first use, so ``import curvlightning.core`` loads
only torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LIGHTNING = (
    "CurvatureCallback",
    "CurvatureFeed",
    "CurvatureMixin",
    "CurvatureReport",
    "FisherDiagonal",
    "GradientStats",
    "HessianDiagonal",
    "HessianSpectrum",
    "HessianTrace",
    "JacobianRows",
    "QuadraticModelCheck",
)

_OPTIM = ("DiagCurvatureAdam", "adahessian_like", "sophia_like")

__all__ = [*_LIGHTNING, *_OPTIM, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        return getattr(importlib.import_module("curvlightning.lightning"), name)
    if name in _OPTIM:
        return getattr(importlib.import_module("curvlightning.optim"), name)
    raise AttributeError(f"module 'curvlightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
