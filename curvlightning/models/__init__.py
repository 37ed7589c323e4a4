"""Reference models that inherit :class:`~curvlightning.CurvatureMixin`."""

from curvlightning.models.charlm import CharTransformerLM
from curvlightning.models.cnn import CNNClassifier
from curvlightning.models.mlp import MLPClassifier

__all__ = ["CNNClassifier", "CharTransformerLM", "MLPClassifier"]
