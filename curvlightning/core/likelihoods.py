"""Likelihoods: the negative log-likelihood losses curvature estimates assume.

A likelihood ties a loss to a predictive distribution ``p(y | z)`` over targets given
the outputs ``z``. Each matches a PyTorch loss with ``reduction="mean"`` exactly:

- ``categorical``: ``F.cross_entropy(z, y)``, ``z`` of shape ``(N, k)``, ``y``
  integer class indices of shape ``(N,)``;
- ``gaussian``: ``F.mse_loss(z, y)``, ``y`` floats shaped like ``z``;
- ``bernoulli``: ``F.binary_cross_entropy_with_logits(z, y)``, ``y`` in ``[0, 1]``
  shaped like ``z``.

The per-sample loss is ``l_n = NLL_n / c`` with a *loss scale* ``c``: 1 for the
categorical, the number ``k`` of output entries per sample for the other two (the mean
runs over entries, and the Gaussian has variance 1/2). Fisher estimates multiply by
``c`` so that they estimate the Gauss-Newton matrix of the training loss
``L = (1/N) sum_n l_n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LIKELIHOODS", "Likelihood", "get_likelihood"]


@dataclass(frozen=True)
class Likelihood:
    """A predictive distribution and its negative log-likelihood loss.

    Args:
        name: ``"categorical"``, ``"gaussian"`` or ``"bernoulli"``.
    """

    name: str

    def __post_init__(self) -> None:
        if self.name not in LIKELIHOODS:
            raise ValueError(
                f"curvature_likelihood must be one of {LIKELIHOODS}, got {self.name!r}"
            )

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The loss ``l_n`` of each sample, shape ``(N,)``."""
        if self.name == "categorical":
            return F.cross_entropy(outputs, targets, reduction="none")
        if self.name == "gaussian":
            err = F.mse_loss(outputs, targets, reduction="none")
        else:
            err = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
        return err.reshape(err.shape[0], -1).mean(dim=1)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The training loss ``L = (1/N) sum_n l_n`` (a scalar)."""
        return self.per_sample_loss(outputs, targets).mean()

    def loss_scale(self, outputs: Tensor) -> float:
        """The factor ``c`` with ``l_n = NLL_n / c``."""
        if self.name == "categorical":
            return 1.0
        return float(math.prod(outputs.shape[1:]))

    def sample(self, outputs: Tensor, noise: Tensor) -> Tensor:
        """Targets drawn from ``p(y | z)`` by transforming given noise.

        Args:
            outputs: Outputs ``z`` of shape ``(N, ...)``.
            noise: ``noise_shape(outputs)``-shaped noise: uniform on ``[0, 1)`` for
                the categorical and the Bernoulli, standard normal for the Gaussian.

        Returns:
            Targets shaped like those the loss takes.
        """
        z = outputs.detach()
        if self.name == "categorical":
            cdf = torch.softmax(z, dim=-1).cumsum(dim=-1)
            labels = (cdf < noise.unsqueeze(-1)).sum(dim=-1)
            return labels.clamp_(max=z.shape[-1] - 1)
        if self.name == "gaussian":
            return z + math.sqrt(0.5) * noise
        return (noise < torch.sigmoid(z)).to(z.dtype)

    def noise_shape(self, outputs: Tensor) -> tuple[int, ...]:
        """The shape of the noise :meth:`sample` needs for these outputs."""
        if self.name == "categorical":
            return tuple(outputs.shape[:-1])
        return tuple(outputs.shape)

    def noise_is_normal(self) -> bool:
        """Whether :meth:`sample` takes standard normal (else uniform) noise."""
        return self.name == "gaussian"

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Raise a ``ValueError`` when targets cannot belong to this likelihood."""
        if self.name == "categorical":
            if outputs.dim() != 2 or targets.shape != outputs.shape[:1]:
                raise ValueError(
                    "curvature_likelihood='categorical' needs outputs of shape (N, k) "
                    "and integer class targets of shape (N,); got outputs "
                    f"{tuple(outputs.shape)} and targets {tuple(targets.shape)}. Use "
                    "'gaussian' for regression or override curvature_outputs"
                )
            if targets.is_floating_point():
                raise ValueError(
                    "curvature_likelihood='categorical' needs integer class targets; "
                    f"got {targets.dtype}. Use 'gaussian' or 'bernoulli' for float "
                    "targets"
                )
            return
        if targets.shape != outputs.shape or not targets.is_floating_point():
            raise ValueError(
                f"curvature_likelihood={self.name!r} needs float targets shaped like "
                f"the outputs {tuple(outputs.shape)}; got {targets.dtype} targets of "
                f"shape {tuple(targets.shape)}. Use 'categorical' for class labels"
            )


LIKELIHOODS = ("categorical", "gaussian", "bernoulli")


def get_likelihood(name: str | Likelihood) -> Likelihood:
    """The likelihood called ``name``.

    Raises:
        ValueError: If ``name`` is not one of ``LIKELIHOODS``.
    """
    if isinstance(name, Likelihood):
        return name
    return Likelihood(name)
