"""The UCI handwritten digits as a Lightning data module.

scikit-learn ships the 1,797 8x8 grey-scale images with its wheel, so this data
module needs no download and runs anywhere the package installs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

_MIN_STD = 1e-6
_IMAGE_SHAPE = (1, 8, 8)
_NUM_SAMPLES = 1797
_NUM_CLASSES = 10


class DigitsDataModule(LightningDataModule):
    """Stratified train/validation split of scikit-learn's digits, standardised.

    Each pixel is standardised with the mean and standard deviation of the
    training split only, ``x' = (x - mean_train) / std_train``. A pixel whose
    standard deviation on the training split is below ``1e-6`` (constant, as
    at the image borders) is only centred, with ``std_train`` taken as 1: it is
    zero on the training split, and a validation image that lights it up gets
    a value of pixel scale instead of one blown up by ``1 / 1e-6``.

    Args:
        batch_size: Samples per batch for both splits.
        val_fraction: Fraction of the 1,797 samples held out for validation, in
            the open interval (0, 1).
        seed: Seed of the stratified split and of the training shuffle.
        num_workers: Worker processes for each data loader.
        flatten: If True, an input is a vector of 64 features; otherwise an image
            of shape ``(1, 8, 8)``.

    Raises:
        ValueError: If an argument is out of its range.

    Example:
        >>> data = DigitsDataModule(batch_size=32)
        >>> data.setup("fit")
        >>> x, y = next(iter(data.train_dataloader()))
        >>> x.shape, y.dtype
        (torch.Size([32, 64]), torch.int64)
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        flatten: bool = True,
    ) -> None:
        super().__init__()
        _check_args(batch_size, val_fraction, num_workers)
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.flatten = flatten
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def num_features(self) -> int:
        """Number of input features (64 pixels)."""
        return int(np.prod(_IMAGE_SHAPE))

    @property
    def num_classes(self) -> int:
        """Number of classes (the digits 0 to 9)."""
        return _NUM_CLASSES

    def setup(self, stage: str | None = None) -> None:
        """Load, split and standardise the data once; later calls do nothing.

        Args:
            stage: Lightning's stage name; every stage gets both splits.
        """
        if self.train_set is not None:
            return
        x_train, x_val, y_train, y_val = _split(self.val_fraction, self.seed)
        mean, std = _standardisation(x_train)
        self.train_set = self._to_dataset((x_train - mean) / std, y_train)
        self.val_set = self._to_dataset((x_val - mean) / std, y_val)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, in an order fixed by ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(self._require(self.train_set), True, generator)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self._require(self.val_set), False, None)

    def _to_dataset(self, x: np.ndarray, y: np.ndarray) -> TensorDataset:
        inputs = torch.as_tensor(x, dtype=torch.float32)
        if not self.flatten:
            inputs = inputs.reshape(-1, *_IMAGE_SHAPE)
        return TensorDataset(inputs, torch.as_tensor(y, dtype=torch.int64))

    def _loader(
        self,
        dataset: TensorDataset,
        shuffle: bool,
        generator: torch.Generator | None,
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    @staticmethod
    def _require(dataset: TensorDataset | None) -> TensorDataset:
        if dataset is None:
            raise RuntimeError(
                "DigitsDataModule has no data yet: call `setup()` before asking "
                "for a data loader (the Trainer does this for you)."
            )
        return dataset


def _check_args(batch_size: int, val_fraction: float, num_workers: int) -> None:
    """Raise a ValueError naming the first argument out of its range."""
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive integer: got {batch_size!r}. "
            "Pass e.g. batch_size=64."
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"`val_fraction` must be in (0, 1): got {val_fraction!r}. "
            "Pass e.g. val_fraction=0.2 to hold out a fifth of the samples."
        )
    num_val = math.ceil(val_fraction * _NUM_SAMPLES)
    if min(num_val, _NUM_SAMPLES - num_val) < _NUM_CLASSES:
        raise ValueError(
            f"`val_fraction`={val_fraction!r} leaves {num_val} of {_NUM_SAMPLES} "
            f"samples for validation; a stratified split needs at least "
            f"{_NUM_CLASSES} in each split. Pass a value in [0.01, 0.99]."
        )
    if not _is_int(num_workers) or num_workers < 0:
        raise ValueError(
            f"`num_workers` must be a non-negative integer: got {num_workers!r}. "
            "Pass num_workers=0 to load in the main process."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _split(val_fraction: float, seed: int) -> list[np.ndarray]:
    """Return ``x_train, x_val, y_train, y_val``, stratified by class."""
    x, y = load_digits(return_X_y=True)
    return train_test_split(
        x.astype(np.float64),
        y.astype(np.int64),
        test_size=val_fraction,
        random_state=seed,
        stratify=y,
    )


def _standardisation(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation of the train split.

    A standard deviation below 1e-6 (a constant feature) is replaced by 1.
    """
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    return mean, np.where(std < _MIN_STD, 1.0, std)
