"""Data modules over data that ships with a library or lives on every machine."""

from curvlightning.data.digits import DigitsDataModule
from curvlightning.data.text import CharTextDataModule

__all__ = ["CharTextDataModule", "DigitsDataModule"]
