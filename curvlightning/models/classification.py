"""Training and validation steps shared by the classifiers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ClassificationSteps"]


class ClassificationSteps:
    """Cross-entropy steps for a LightningModule whose forward returns logits.

    Logs ``train/loss`` and ``train/acc`` every step and the epoch means
    ``val/loss`` and ``val/acc`` (reduced over ranks).
    """

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        """Cross-entropy on one batch; logs ``train/loss`` and ``train/acc``."""
        loss, acc = self._loss_and_accuracy(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", acc)
        return loss

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> None:
        """Logs the epoch means ``val/loss`` and ``val/acc``."""
        loss, acc = self._loss_and_accuracy(batch)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        self.log("val/acc", acc, prog_bar=True, on_epoch=True, sync_dist=True)

    def _loss_and_accuracy(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=-1) == y).float().mean()
        return loss, acc
