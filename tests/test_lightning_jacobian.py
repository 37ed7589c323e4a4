"""JacobianRows against the dense Jacobian of a tiny model."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from curvlightning import CurvatureMixin, JacobianRows


class Tiny(CurvatureMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _dense_jacobian(module, x) -> torch.Tensor:
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach() for p in module.parameters())

    def logits(*ps):
        return functional_call(module, dict(zip(names, ps, strict=True)), (x,))

    blocks = jacrev(logits, argnums=tuple(range(len(params))))(*params)
    return torch.cat([b.reshape(x.shape[0], 3, -1) for b in blocks], dim=-1)


def _fit(callback):
    module = Tiny()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, _loader())
    return trainer, module


def test_rows_and_frobenius_match_the_dense_jacobian():
    callback = JacobianRows(
        every_n_steps=2, num_probes=2000, curvature_batch="fixed", dtype="float64"
    )
    trainer, module = _fit(callback)
    x, _ = callback._fixed_batch
    dense = _dense_jacobian(module, x)
    mean_rows = dense.mean(0)
    metrics = trainer.callback_metrics
    for c in range(3):
        logged = float(metrics[f"curvature/jacobian_row_norm/class{c}"])
        assert logged == pytest.approx(float(mean_rows[c].norm()), rel=1e-6)
    exact = float(dense.pow(2).sum() / x.shape[0])
    value = float(metrics["curvature/jacobian_frobenius_sq"])
    stderr = float(metrics["curvature/jacobian_frobenius_sq_stderr"])
    assert abs(value - exact) < 4 * stderr
    assert stderr < 0.05 * exact


def test_top_rows_and_arguments():
    callback = JacobianRows(every_n_steps=2, rows="top", num_top=2, num_probes=0)
    trainer, _ = _fit(callback)
    assert "curvature/jacobian_row_norm/top2" in trainer.callback_metrics
    with pytest.raises(ValueError, match="rows must be one of"):
        JacobianRows(rows="random")
    with pytest.raises(ValueError, match="non-empty list of class indices"):
        JacobianRows(rows=[-1])
