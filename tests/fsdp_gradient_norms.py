"""Run by ``test_lightning_gradients.py`` under torchrun: GradientStats norms.

``python -m torch.distributed.run --nproc_per_node=2 fsdp_gradient_norms.py
{ddp,fsdp} OUT.json`` trains a small MLP for three steps on 2 CPU ranks, plain DDP or
FSDP2 (Lightning's ModelParallelStrategy with ``fully_shard``), and rank zero writes
the gradient norms GradientStats logged.
"""

from __future__ import annotations

import json
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from curvlightning import CurvatureMixin, GradientStats


def _dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    )


class Classifier(CurvatureMixin, pl.LightningModule):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        self.shard = shard
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(
            _dataset(), self.trainer.world_size, self.trainer.global_rank, shuffle=False
        )
        return DataLoader(_dataset(), batch_size=8, sampler=sampler)


def main(kind: str, out: str) -> None:
    shard = kind == "fsdp"
    strategy = (
        ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        if shard
        else "ddp"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=3,
        callbacks=[GradientStats(every_n_steps=1, noise_scale=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(Classifier(shard))
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        with open(out, "w") as handle:
            json.dump(metrics, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
