"""Data modules over real data sets that ship with their libraries."""

from curvlightning.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
