"""Small reference models that carry the curvature mixin."""

from curvlightning.models.mlp import MLPClassifier

__all__ = ["MLPClassifier"]
