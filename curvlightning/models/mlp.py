"""A multilayer perceptron classifier with the curvature mixin."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningModule
from torch import nn

from curvlightning.lightning.mixin import CurvatureMixin
from curvlightning.models.classification import ClassificationSteps


class MLPClassifier(ClassificationSteps, CurvatureMixin, LightningModule):
    """Fully connected classifier trained with cross-entropy and AdamW.

    The network is ``[Linear, ReLU, Dropout] * len(hidden_sizes)`` followed by a
    linear layer to ``num_classes`` logits; dropout layers are left out when
    ``dropout`` is 0. Inputs of any shape ``(batch, ...)`` are flattened, so the
    same model takes 64-vectors or 1x8x8 images of the digits.

    Args:
        in_features: Number of input features after flattening.
        hidden_sizes: Width of each hidden layer; empty for a linear model.
        num_classes: Number of output logits.
        dropout: Dropout probability after each hidden activation, in [0, 1).
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.

    Raises:
        ValueError: If a size, ``dropout``, ``lr`` or ``weight_decay`` is out of
            its range.
    """

    curvature_likelihood = "categorical"

    def __init__(
        self,
        in_features: int = 64,
        hidden_sizes: Sequence[int] = (128, 128),
        num_classes: int = 10,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_sizes = [int(size) for size in hidden_sizes]
        _check_args(in_features, hidden_sizes, num_classes, dropout, lr, weight_decay)
        self.save_hyperparameters()
        self.net = _mlp(in_features, hidden_sizes, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(batch, num_classes)`` for inputs ``(batch, ...)``."""
        return self.net(x.flatten(start_dim=1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over all parameters with the module's ``lr`` and ``weight_decay``."""
        return torch.optim.AdamW(
            self.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
        )


def _mlp(
    in_features: int, hidden_sizes: list[int], num_classes: int, dropout: float
) -> nn.Sequential:
    """Build the ``Linear, ReLU(, Dropout)`` stack and the output layer."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _check_args(
    in_features: int,
    hidden_sizes: list[int],
    num_classes: int,
    dropout: float,
    lr: float,
    weight_decay: float,
) -> None:
    """Raise a ValueError naming the first argument out of its range."""
    sizes = {"in_features": in_features, "num_classes": num_classes}
    sizes.update({f"hidden_sizes[{i}]": s for i, s in enumerate(hidden_sizes)})
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(
                f"`{name}` must be a positive integer: got {size!r}. "
                "Pass a layer width of at least 1."
            )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(
            f"`dropout` must be in [0, 1): got {dropout!r}. Pass 0.0 for no dropout."
        )
    if not lr > 0.0:
        raise ValueError(f"`lr` must be positive: got {lr!r}. Pass e.g. lr=1e-3.")
    if weight_decay < 0.0:
        raise ValueError(
            f"`weight_decay` must be non-negative: got {weight_decay!r}. "
            "Pass 0.0 for no weight decay."
        )
