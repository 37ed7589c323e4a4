"""The CNN and the character transformer: shapes, training, curvature hooks."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlightning import HessianTrace
from curvlightning.core.functional import FunctionalModel, flatten, unflatten
from curvlightning.core.operators import HessianOperator
from curvlightning.data.digits import DigitsDataModule
from curvlightning.data.text import CharTextDataModule
from curvlightning.models.charlm import CharTransformerLM
from curvlightning.models.cnn import CNNClassifier

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# training_step calls self.log, which only warns outside a Trainer
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")
TINY_LM = {"context_length": 16, "n_layers": 1, "d_model": 16, "n_heads": 2}


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train(model: pl.LightningModule, batch, steps: int = 20) -> list[float]:
    """Plain AdamW steps on one batch with the model's own optimizer."""
    optimizer = model.configure_optimizers()
    losses = []
    for _ in range(steps):
        loss = model.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_cnn_maps_digit_images_to_logits():
    model = CNNClassifier()
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert _num_params(model) == 160 + 4_640 + 5_130


def test_cnn_loss_decreases_on_a_fixed_digits_batch():
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=64, flatten=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    losses = _train(CNNClassifier(lr=1e-2), batch)
    assert losses[-1] < 0.3 * losses[0]


def test_optimizer_defaults_to_adamw_and_can_be_injected():
    default = CNNClassifier(lr=0.01, weight_decay=0.1).configure_optimizers()
    assert isinstance(default, torch.optim.AdamW)
    assert default.defaults["lr"] == 0.01
    assert default.defaults["weight_decay"] == 0.1
    sgd = functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9)
    injected = CharTransformerLM(vocab_size=7, **TINY_LM, optimizer=sgd)
    optimizer = injected.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9
    assert len(optimizer.param_groups[0]["params"]) == len(list(injected.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.1, "optimizer": torch.optim.SGD}, "`lr`=0.1 is ignored when"),
        ({"weight_decay": 0.0, "optimizer": torch.optim.SGD}, "`weight_decay`=0.0"),
        ({"lr": 0.0}, r"`lr` must be positive: got 0.0"),
        ({"weight_decay": -1.0}, r"`weight_decay` must be non-negative: got -1.0"),
        ({"channels": [8]}, r"two convolutions: got \[8\]"),
        ({"channels": [8, 0]}, r"`channels\[1\]` must be a positive integer"),
        ({"image_size": 1}, "`image_size` must be at least 2"),
    ],
)
def test_cnn_names_a_bad_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CNNClassifier(**kwargs)


def test_charlm_shapes_and_parameter_count():
    model = CharTransformerLM(vocab_size=166)
    assert _num_params(model) == 455_846
    tokens = torch.randint(166, (2, 16))
    assert model(tokens).shape == (2, 16, 166)
    with pytest.raises(ValueError, match="exceed `context_length`=128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_charlm_names_a_bad_argument():
    with pytest.raises(ValueError, match="`n_heads`=3 must divide `d_model`=16"):
        CharTransformerLM(vocab_size=5, **{**TINY_LM, "n_heads": 3})
    with pytest.raises(ValueError, match="`vocab_size` must be a positive integer"):
        CharTransformerLM(vocab_size=0)
    with pytest.raises(RuntimeError, match="no layers yet: pass `vocab_size`"):
        CharTransformerLM()(torch.zeros(1, 4, dtype=torch.long))


def test_charlm_is_causal():
    torch.manual_seed(0)
    model = CharTransformerLM(vocab_size=11, **TINY_LM).eval()
    tokens = torch.randint(11, (1, 12))
    changed = tokens.clone()
    changed[0, 7] = (tokens[0, 7] + 1) % 11
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_charlm_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    text = torch.arange(200) % 9  # a periodic sequence: learnable from context
    tokens = text[:-1].unfold(0, 16, 16)[:8]
    targets = text[1:].unfold(0, 16, 16)[:8]
    model = CharTransformerLM(vocab_size=9, **TINY_LM, lr=1e-2)
    losses = _train(model, (tokens, targets))
    assert losses[0] == pytest.approx(math.log(9), rel=0.05)
    assert losses[-1] < 0.3 * losses[0]


def test_charlm_curvature_view_is_one_sample_per_token():
    torch.manual_seed(0)
    model = CharTransformerLM(vocab_size=13, **TINY_LM)
    tokens, targets = torch.randint(13, (3, 10)), torch.randint(13, (3, 10))
    batch = (tokens, targets)
    outputs = model.curvature_outputs(model.curvature_inputs(batch))
    flat_targets = model.curvature_targets(batch)
    assert outputs.shape == (30, 13)
    assert flat_targets.shape == (30,)
    torch.testing.assert_close(flat_targets.view(3, 10), targets)
    torch.testing.assert_close(
        model.curvature_loss(outputs, flat_targets), model.training_step(batch, 0)
    )


def test_charlm_hessian_products_match_finite_differences():
    # float64: double backward through the token view and the attention against
    # forward-over-reverse and central differences of ordinary gradients. (No dense
    # torch.func.hessian here: in torch 2.13 its vmapped path gets the block between
    # a LayerNorm weight and the LayerNorm's input wrong, and not symmetric.)
    torch.manual_seed(0)
    model = CharTransformerLM(vocab_size=5, context_length=6, d_model=8, n_heads=2)
    model = model.double()
    batch = (torch.randint(5, (2, 6)), torch.randint(5, (2, 6)))
    inputs, targets = model.curvature_inputs(batch), model.curvature_targets(batch)
    functional = FunctionalModel(
        model, forward=model.curvature_outputs, loss=model.curvature_loss
    )
    double = HessianOperator(functional, inputs, targets, "double_backward")
    forward = HessianOperator(functional, inputs, targets, "forward_over_reverse")

    def gradient(theta: torch.Tensor) -> torch.Tensor:
        params = unflatten(theta, functional.params)
        leaves = [p.requires_grad_(True) for p in params]
        with sdpa_kernel(SDPBackend.MATH):
            loss = F.cross_entropy(
                functional_call(
                    model, dict(zip(functional.names, leaves, strict=True)), inputs
                ).flatten(0, 1),
                batch[1].flatten(),
            )
        return flatten(torch.autograd.grad(loss, leaves))

    theta, eps = flatten(functional.params), 1e-6
    for v in torch.randn(3, double.dim, dtype=torch.float64):
        v = v / v.norm()
        fd = (gradient(theta + eps * v) - gradient(theta - eps * v)) / (2 * eps)
        product = double(v)
        torch.testing.assert_close(product, forward(v), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(product, fd, rtol=1e-6, atol=1e-8)


def test_hessian_trace_runs_on_the_charlm_in_a_trainer(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
    data = CharTextDataModule(paths=str(corpus), seq_len=16, batch_size=4)
    model = CharTransformerLM(**TINY_LM)  # vocab_size from the data
    trace = HessianTrace(every_n_steps=1, num_probes=4, curvature_batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        callbacks=[trace],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    assert model.hparams.vocab_size == data.vocab_size == len(set(corpus.read_text()))
    assert model.head.out_features == data.vocab_size
    values = [row["value"] for row in trace.history]
    assert [row["step"] for row in trace.history] == [1, 2]
    assert all(math.isfinite(v) and v != 0.0 for v in values)
    assert trace.num_skipped == 0


def test_charlm_refuses_a_vocab_smaller_than_the_data(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefghij" * 20)
    data = CharTextDataModule(paths=str(corpus), seq_len=8, batch_size=2)
    model = CharTransformerLM(vocab_size=4, **TINY_LM)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False
    )
    with pytest.raises(ValueError, match="`vocab_size`=4 is smaller than the data"):
        trainer.fit(model, datamodule=data)
