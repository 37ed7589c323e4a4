"""A small character-level transformer language model with the curvature mixin."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from curvlightning.lightning.mixin import CurvatureMixin
from curvlightning.models.cnn import build_optimizer, check_optimizer_args

__all__ = ["CausalSelfAttention", "CharTransformerLM", "TransformerBlock"]

_INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    r"""Multi-head self-attention in which position t sees positions ``<= t`` only.

    ``q, k, v = x W_qkv + b`` split into ``n_heads`` heads of width
    ``d = d_model / n_heads``; each head computes
    ``softmax(q k^T / sqrt(d) + M) v`` with ``M`` the causal mask (``-inf``
    above the diagonal), through ``F.scaled_dot_product_attention(is_causal=True)``;
    the heads are concatenated and projected by ``W_o``.

    Args:
        d_model: Width of the residual stream.
        n_heads: Number of heads; must divide ``d_model``.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, L, d_model)`` to ``(B, L, d_model)``."""
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_heads, width // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``.

    The MLP is ``Linear(d, 4d), GELU, Linear(4d, d)``.

    Args:
        d_model: Width of the residual stream.
        n_heads: Number of attention heads.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, L, d_model)`` to ``(B, L, d_model)``."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformerLM(CurvatureMixin, LightningModule):
    r"""Decoder-only transformer that predicts the next character.

    Character ids ``(B, L)`` are embedded (token plus learned position
    embeddings), passed through ``n_layers`` pre-LayerNorm blocks
    (:class:`TransformerBlock`), a final LayerNorm and an untied linear head to
    logits ``(B, L, V)`` for a vocabulary of ``V`` characters. The loss is the
    mean cross-entropy over all ``B L`` positions, in nats per character; the
    validation also logs it in bits per character, ``bpc = loss / ln 2``.
    Linear and embedding weights start from ``N(0, 0.02^2)``, biases from 0.
    With ``V = 166``, 2 layers and ``d_model = 128`` the model has 455,846
    parameters.

    ``vocab_size=None`` takes the size from the data module's ``vocab_size``
    when the Trainer sets the model up (``configure_model``), so a recipe works
    with whatever corpus the data module reads; the size is then written into
    the hyperparameters and the checkpoint.

    **Curvature.** The callbacks see the model as a classifier of tokens:
    :meth:`curvature_outputs` returns the logits reshaped to ``(B L, V)`` and
    :meth:`curvature_targets` the targets reshaped to ``(B L,)``, so the
    categorical likelihood's mean NLL equals the training loss, and the
    "samples" of the curvature estimates (their counts, the weights of the
    cross-rank means, the labels drawn for the Fisher) are the ``B L`` tokens,
    not the ``B`` sequences. ``curvature_batch_size`` still counts sequences.
    Training uses the fused attention kernels; every curvature pass goes
    through :class:`~curvlightning.core.functional.FunctionalModel`, which runs
    attention on the math kernel (``sdpa_kernel(SDPBackend.MATH)``, see
    :func:`~curvlightning.core.functional.math_attention`): the fused kernels
    (flash attention on CPU and GPU) have no double-backward or forward-mode
    derivative, the math kernel computes the same function with ops that have.

    Args:
        vocab_size: Number of characters ``V``; None to take it from the data.
        context_length: Longest input sequence (rows of the position embedding).
        n_layers: Number of transformer blocks.
        d_model: Width of the residual stream.
        n_heads: Attention heads; must divide ``d_model``.
        lr: AdamW learning rate when ``optimizer`` is None (default 1e-3).
        weight_decay: AdamW weight decay when ``optimizer`` is None (default 0).
        optimizer: A callable that maps the parameters to an optimizer (a recipe
            sets ``class_path`` and ``init_args``); None for AdamW.

    Raises:
        ValueError: If a size is out of its range, ``n_heads`` does not divide
            ``d_model``, or ``lr`` or ``weight_decay`` is out of its range or
            given together with ``optimizer``.

    Warning:
        ``FisherDiagonal(kind="empirical")`` and ``kind="mc"`` need per-sample
        gradients over the same samples as the targets, and vmap over the
        sequences of the inputs while the targets are tokens: they fail on this
        model. Use ``kind="gnb"``, which needs one batch gradient per draw.

        LightningCLI's top-level ``--optimizer`` builds its optimizer before
        training starts, when a model without ``vocab_size`` has no parameters
        yet; choose the optimizer under ``model.init_args.optimizer`` instead, or
        pass ``vocab_size``.

    Example:
        >>> model = CharTransformerLM(vocab_size=50, context_length=16)
        >>> model(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 50])
    """

    curvature_likelihood = "categorical"

    def __init__(
        self,
        vocab_size: int | None = None,
        context_length: int = 128,
        n_layers: int = 2,
        d_model: int = 128,
        n_heads: int = 4,
        lr: float | None = None,
        weight_decay: float | None = None,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(vocab_size, context_length, n_layers, d_model, n_heads)
        check_optimizer_args(lr, weight_decay, optimizer)
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_callable = optimizer
        self.built = False
        if vocab_size is not None:
            self._build(vocab_size)

    def configure_model(self) -> None:
        """Build the layers with the data module's ``vocab_size`` if none was given.

        Raises:
            ValueError: If the model's ``vocab_size`` is smaller than the data's.
            RuntimeError: If no size was given and the data module has none.
        """
        data_size = _data_vocab_size(self)
        if self.built:
            if data_size is not None and data_size > self.hparams.vocab_size:
                raise ValueError(
                    f"`vocab_size`={self.hparams.vocab_size} is smaller than the "
                    f"data's {data_size} characters: pass vocab_size={data_size} "
                    "or leave it unset to take it from the data."
                )
            return
        if data_size is None:
            raise RuntimeError(
                "CharTransformerLM has no `vocab_size` and the data module has "
                "none either: pass vocab_size=..., or fit with a data module that "
                "has a `vocab_size` attribute (such as CharTextDataModule)."
            )
        self.hparams.vocab_size = data_size
        self._build(data_size)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(B, L, V)`` for character ids ``(B, L)``."""
        self._require_built()
        length = tokens.shape[1]
        if length > self.hparams.context_length:
            raise ValueError(
                f"inputs of {length} characters exceed `context_length`="
                f"{self.hparams.context_length}: pass a larger context_length or "
                "shorter sequences."
            )
        positions = torch.arange(length, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def curvature_outputs(self, inputs: Tensor) -> Tensor:
        """Logits ``(B L, V)``, one row per token."""
        logits = self(inputs)
        return logits.reshape(-1, logits.shape[-1])

    def curvature_targets(self, batch: Any) -> Tensor:
        """Targets ``(B L,)``, one per token, in the order of the logits' rows."""
        return super().curvature_targets(batch).reshape(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Mean cross-entropy per character; logs ``train/loss``."""
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs the epoch means ``val/loss`` (nats) and ``val/bpc`` (bits)."""
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        bpc = loss / math.log(2.0)
        self.log("val/bpc", bpc, prog_bar=True, on_epoch=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The injected optimizer, or AdamW with ``lr`` and ``weight_decay``."""
        self._require_built()
        return build_optimizer(
            self.parameters(),
            self.optimizer_callable,
            self.hparams.lr,
            self.hparams.weight_decay,
        )

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        tokens, targets = batch
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def _build(self, vocab_size: int) -> None:
        hp = self.hparams
        self.tok_emb = nn.Embedding(vocab_size, hp.d_model)
        self.pos_emb = nn.Embedding(hp.context_length, hp.d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(hp.d_model, hp.n_heads) for _ in range(hp.n_layers)
        )
        self.ln_f = nn.LayerNorm(hp.d_model)
        self.head = nn.Linear(hp.d_model, vocab_size)
        self.apply(_init_weights)
        self.built = True

    def _require_built(self) -> None:
        if not self.built:
            raise RuntimeError(
                "CharTransformerLM has no layers yet: pass `vocab_size`, or let the "
                "Trainer call `configure_model()` with a data module that has a "
                "`vocab_size`."
            )


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=_INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def _data_vocab_size(model: LightningModule) -> int | None:
    """The ``vocab_size`` of the trainer's data module, if there is one."""
    trainer = model._trainer
    data = getattr(trainer, "datamodule", None) if trainer is not None else None
    size = getattr(data, "vocab_size", None)
    return int(size) if size is not None else None


def _check_sizes(
    vocab_size: int | None,
    context_length: int,
    n_layers: int,
    d_model: int,
    n_heads: int,
) -> None:
    """Raise a ValueError naming the first size out of its range."""
    sizes = {
        "context_length": context_length,
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
    }
    if vocab_size is not None:
        sizes = {"vocab_size": vocab_size, **sizes}
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(
                f"`{name}` must be a positive integer: got {size!r}. "
                "Pass a size of at least 1."
            )
    if d_model % n_heads:
        raise ValueError(
            f"`n_heads`={n_heads} must divide `d_model`={d_model}: pass e.g. "
            f"n_heads=4 with d_model=128."
        )
