"""The Lightning layer: the module mixin and the curvature callbacks."""

from curvlightning.lightning.base import CurvatureCallback
from curvlightning.lightning.feed import CurvatureFeed
from curvlightning.lightning.fisher import FisherDiagonal
from curvlightning.lightning.gradients import GradientStats
from curvlightning.lightning.hessian import HessianDiagonal, HessianTrace
from curvlightning.lightning.jacobian import JacobianRows
from curvlightning.lightning.mixin import CurvatureMixin
from curvlightning.lightning.report import CurvatureReport
from curvlightning.lightning.spectrum import HessianSpectrum, QuadraticModelCheck

__all__ = [
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
]
