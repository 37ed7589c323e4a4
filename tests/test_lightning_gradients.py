"""GradientStats on one device and under DDP on 2 CPU ranks."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from distributed import terminate_on_timeout
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from curvlightning import CurvatureMixin
from curvlightning.core.gradients import noise_scale_parts
from curvlightning.lightning.gradients import GradientStats

NUM_SAMPLES = 64


def _dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_SAMPLES, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (NUM_SAMPLES,), generator=gen)
    return TensorDataset(x, y)


class Classifier(CurvatureMixin, pl.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.net.double()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size
        sampler = DistributedSampler(
            _dataset(), world, self.trainer.global_rank, shuffle=False
        )
        return DataLoader(_dataset(), batch_size=16 // world, sampler=sampler)


class ExplicitLocalNorms(pl.Callback):
    """Each rank's gradient norm on its own batch, by plain autograd."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        params = [p for p in pl_module.parameters()]
        loss = F.cross_entropy(pl_module.net(x), y)
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        self.norm = norm.double()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        stats = next(c for c in trainer.callbacks if isinstance(c, GradientStats))
        hooked = stats._local_norms[trainer.global_rank]
        ratio = hooked / float(self.norm)
        trainer.callback_metrics[f"check/ratio{trainer.global_rank}"] = torch.tensor(
            ratio, dtype=torch.float64
        )
        gathered = torch.tensor([ratio], dtype=torch.float64)
        worst = trainer.strategy.reduce((gathered - 1).abs(), reduce_op="max")
        trainer.callback_metrics["check/worst"] = worst


def _fit(devices: int, callbacks: list, max_steps: int = 4):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    module = Classifier()

    def launcher():
        return list(getattr(getattr(trainer.strategy, "_launcher", None), "procs", []))

    with terminate_on_timeout(180.0, launcher):
        trainer.fit(module)
    return trainer, module


@pytest.mark.distributed
def test_hook_reads_local_norms_and_leaves_training_unchanged():
    stats = GradientStats(every_n_steps=1, ema_beta=0.5)
    trainer, hooked = _fit(2, [stats, ExplicitLocalNorms()])
    metrics = trainer.callback_metrics
    assert float(metrics["check/worst"]) < 1e-6
    assert float(metrics["grad/local_norm/rank0"]) != float(
        metrics["grad/local_norm/rank1"]
    )
    assert "grad/noise_scale" in metrics and "grad/snr/net.0" in metrics
    _, plain = _fit(2, [])
    for a, b in zip(hooked.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_single_device_norms_and_noise_parts_match_explicit_gradients():
    stats = GradientStats(every_n_steps=1, ema_beta=0.0)

    class Check(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            x, y = self.batch
            per_sample = []
            for i in range(x.shape[0]):
                loss = F.cross_entropy(pl_module.net(x[i : i + 1]), y[i : i + 1])
                grads = torch.autograd.grad(loss, list(pl_module.parameters()))
                per_sample.append(torch.cat([g.reshape(-1) for g in grads]))
            g = torch.stack(per_sample)
            small = float(g.pow(2).sum(1).mean())
            big = float(g.mean(0).pow(2).sum())
            self.expected = noise_scale_parts(small, big, 1.0, float(x.shape[0]))
            self.grad_norm = float(
                torch.sqrt(sum(p.grad.pow(2).sum() for p in pl_module.parameters()))
            )

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch

    check = Check()
    trainer, _ = _fit(1, [check, stats], max_steps=2)
    metrics = trainer.callback_metrics
    assert float(metrics["grad/norm"]) == pytest.approx(check.grad_norm, rel=1e-6)
    assert float(metrics["grad/sq_norm_est"]) == pytest.approx(
        float(check.expected.sq_norm), rel=1e-6
    )
    assert float(metrics["grad/trace_sigma_est"]) == pytest.approx(
        float(check.expected.trace_sigma), rel=1e-6
    )
    assert float(metrics["grad/noise_scale"]) == pytest.approx(
        float(check.expected.trace_sigma / check.expected.sq_norm), rel=1e-6
    )


def test_gradient_stats_state_round_trips():
    stats = GradientStats(every_n_steps=1, ema_beta=0.9)
    _fit(1, [stats], max_steps=3)
    restored = GradientStats(every_n_steps=1, ema_beta=0.9)
    restored.load_state_dict(stats.state_dict())
    assert restored.ema.b_simple == pytest.approx(stats.ema.b_simple)
    assert set(restored.layer_emas) == {"net.0", "net.2"}


def test_gradient_stats_arguments_are_checked():
    with pytest.raises(ValueError, match="every_n_steps must be a positive int"):
        GradientStats(every_n_steps=0)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
        GradientStats(ema_beta=1.0)


def test_layer_without_gradient_gets_nan_snr():
    class WithUnused(Classifier):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(4, 2).double()

    stats = GradientStats(every_n_steps=1, ema_beta=0.5)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        callbacks=[stats],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(WithUnused())
    metrics = trainer.callback_metrics
    assert float(metrics["grad/norm/unused"]) == 0.0
    assert torch.isnan(metrics["grad/snr/unused"])
    assert torch.isfinite(metrics["grad/snr/net.0"])


def _torchrun(kind: str, out, port: int) -> dict:
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("fsdp_gradient_norms.py")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        str(script),
        kind,
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
def test_sharded_gradient_norms_equal_the_ddp_ones(tmp_path):
    from distributed import free_port

    ddp = _torchrun("ddp", tmp_path / "ddp.json", free_port())
    fsdp = _torchrun("fsdp", tmp_path / "fsdp.json", free_port())
    keys = {"grad/norm", "grad/norm/net.0", "grad/norm/net.2"}
    assert keys <= set(ddp) and keys <= set(fsdp)
    for key in keys:
        assert fsdp[key] == pytest.approx(ddp[key], rel=1e-5), key
