"""A small convolutional classifier with the curvature mixin."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from curvlightning.lightning.mixin import CurvatureMixin
from curvlightning.models.classification import ClassificationSteps

__all__ = ["CNNClassifier", "build_optimizer"]

_DEFAULT_LR = 1e-3
_DEFAULT_WEIGHT_DECAY = 0.0


class CNNClassifier(ClassificationSteps, CurvatureMixin, LightningModule):
    """Two-convolution classifier for small images, trained with cross-entropy.

    The network is ``Conv2d(3x3, padding 1), ReLU, Conv2d(3x3, padding 1), ReLU,
    MaxPool2d(2), Flatten, Linear``: an image of shape ``(in_channels, s, s)``
    keeps its size through both convolutions, is halved by the pooling, and the
    head maps ``channels[1] * (s // 2)^2`` features to ``num_classes`` logits.
    For the 1x8x8 digits (``DigitsDataModule(flatten=False)``) with the default
    ``channels=(16, 32)`` that is 160 + 4,640 + 5,130 = 9,930 parameters.

    The optimizer is AdamW with ``lr`` and ``weight_decay`` unless ``optimizer``
    is given; a LightningCLI recipe then names its class and arguments under
    ``model.init_args.optimizer`` (see :func:`build_optimizer`).

    Args:
        channels: Output channels of the two convolutions.
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        image_size: Height (and width) of the square input images; at least 2.
        lr: AdamW learning rate when ``optimizer`` is None (default 1e-3).
        weight_decay: AdamW decoupled weight decay when ``optimizer`` is None
            (default 0).
        optimizer: A callable that maps the parameters to an optimizer, such as
            ``functools.partial(torch.optim.SGD, lr=0.1)``; None for AdamW.

    Raises:
        ValueError: If a size, ``lr`` or ``weight_decay`` is out of its range, or
            ``lr`` or ``weight_decay`` is given together with ``optimizer``.

    Example:
        >>> model = CNNClassifier(channels=(8, 16))
        >>> model(torch.zeros(5, 1, 8, 8)).shape
        torch.Size([5, 10])
    """

    curvature_likelihood = "categorical"

    def __init__(
        self,
        channels: Sequence[int] = (16, 32),
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        lr: float | None = None,
        weight_decay: float | None = None,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        _check_sizes(channels, num_classes, in_channels, image_size)
        check_optimizer_args(lr, weight_decay, optimizer)
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_callable = optimizer
        self.net = _cnn(channels, num_classes, in_channels, image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(batch, num_classes)`` for images ``(batch, c, s, s)``."""
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The injected optimizer, or AdamW with ``lr`` and ``weight_decay``."""
        return build_optimizer(
            self.parameters(),
            self.optimizer_callable,
            self.hparams.lr,
            self.hparams.weight_decay,
        )


def build_optimizer(
    params: Iterable[torch.Tensor],
    optimizer: OptimizerCallable | None,
    lr: float | None,
    weight_decay: float | None,
) -> torch.optim.Optimizer:
    """The optimizer of a model that takes an injectable ``optimizer`` argument.

    ``optimizer(params)`` when a callable is given (jsonargparse builds one from
    ``class_path`` and ``init_args``, which then hold the learning rate and the
    weight decay); otherwise ``torch.optim.AdamW(params, lr, weight_decay)`` with
    the defaults 1e-3 and 0 for arguments left at None.

    Args:
        params: The parameters (or parameter groups) to optimise.
        optimizer: A callable from parameters to an optimizer, or None.
        lr: AdamW's learning rate, or None for 1e-3.
        weight_decay: AdamW's weight decay, or None for 0.

    Returns:
        The optimizer.

    Example:
        A recipe that trains with SGD instead of AdamW::

            model:
              init_args:
                optimizer:
                  class_path: torch.optim.SGD
                  init_args: {lr: 0.05, momentum: 0.9}
    """
    if optimizer is not None:
        return optimizer(params)
    return torch.optim.AdamW(
        params,
        lr=_DEFAULT_LR if lr is None else lr,
        weight_decay=_DEFAULT_WEIGHT_DECAY if weight_decay is None else weight_decay,
    )


def check_optimizer_args(
    lr: float | None, weight_decay: float | None, optimizer: OptimizerCallable | None
) -> None:
    """Raise a ValueError for AdamW arguments out of range or next to ``optimizer``.

    ``lr`` and ``weight_decay`` configure the default AdamW only: given together
    with ``optimizer`` they would be ignored, so that is refused.
    """
    if optimizer is not None:
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if value is not None:
                raise ValueError(
                    f"`{name}`={value!r} is ignored when `optimizer` is given: set "
                    f"`{name}` in the optimizer's init_args instead and leave the "
                    f"model's `{name}` unset."
                )
        return
    if lr is not None and not lr > 0.0:
        raise ValueError(f"`lr` must be positive: got {lr!r}. Pass e.g. lr=1e-3.")
    if weight_decay is not None and not weight_decay >= 0.0:
        raise ValueError(
            f"`weight_decay` must be non-negative: got {weight_decay!r}. "
            "Pass 0.0 for no weight decay."
        )


def _cnn(
    channels: list[int], num_classes: int, in_channels: int, image_size: int
) -> nn.Sequential:
    """Build the two convolutions, the pooling and the linear head."""
    pooled = image_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels[0], channels[1], kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels[1] * pooled * pooled, num_classes),
    )


def _check_sizes(
    channels: list[int], num_classes: int, in_channels: int, image_size: int
) -> None:
    """Raise a ValueError naming the first size out of its range."""
    if len(channels) != 2:
        raise ValueError(
            f"`channels` must hold the widths of the two convolutions: got "
            f"{channels!r}. Pass e.g. channels=[16, 32]."
        )
    sizes = {"num_classes": num_classes, "in_channels": in_channels}
    sizes.update({f"channels[{i}]": c for i, c in enumerate(channels)})
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(
                f"`{name}` must be a positive integer: got {size!r}. "
                "Pass a size of at least 1."
            )
    if image_size < 2:
        raise ValueError(
            f"`image_size` must be at least 2 for the 2x2 pooling: got "
            f"{image_size!r}. Pass the height of the square input images."
        )
