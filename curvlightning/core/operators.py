"""Curvature products and per-sample gradients on a :class:`FunctionalModel`.

All products act on flat vectors of shape ``(p,)`` ordered like
``FunctionalModel.params``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from curvlightning.core.functional import FunctionalModel, flatten, unflatten

__all__ = [
    "HVP_BACKENDS",
    "BatchOperator",
    "HessianOperator",
    "per_sample_gradients",
    "segments",
]

HVP_BACKENDS = ("double_backward", "forward_over_reverse")


def segments(model: FunctionalModel) -> dict[str, slice]:
    """The slice of the flat parameter vector that each parameter occupies."""
    out, start = {}, 0
    for name, p in zip(model.names, model.params, strict=True):
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


class BatchOperator:
    """A curvature operator on one batch: the model, the cast batch, and its loss.

    Subclasses add ``__call__(v)`` (a product with a p x p matrix, ``v`` of shape
    ``(p,)``) and count their products in :attr:`num_matvecs`.

    Args:
        model: The functional model (its ``loss`` must be set).
        inputs: Inputs of the batch.
        targets: Targets of the batch.
    """

    def __init__(self, model: FunctionalModel, inputs: Any, targets: Any) -> None:
        self.model = model
        self.inputs = model.cast(inputs)
        self.targets = model.cast(targets)
        self.num_matvecs = 0

    @property
    def dim(self) -> int:
        """The number p of parameters."""
        return self.model.num_params

    def loss(self) -> Tensor:
        """The loss at the current parameters (no graph)."""
        with torch.no_grad():
            return self.model.loss_at(self.model.params, self.inputs, self.targets)


class HessianOperator(BatchOperator):
    r"""Products ``v -> H v`` with the Hessian of the loss on one batch.

    ``H = d^2 L / d theta^2`` (p x p) is never formed. Two backends:

    - ``"double_backward"``: one gradient with ``create_graph=True`` is computed once,
      and every product is a second backward pass through that graph,
      ``H v = d (g^T v) / d theta``. About 1.7 gradients per product; the graph
      of the first pass is kept in memory for the operator's lifetime.
    - ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``, a
      forward-mode derivative of the gradient; each product recomputes the forward
      and backward pass (about 4 gradients) but keeps no graph between products.

    A parameter the loss does not depend on gets a zero row and column.

    Args:
        model: The functional model (its ``loss`` must be set).
        inputs: Inputs of the batch.
        targets: Targets of the batch.
        backend: One of ``HVP_BACKENDS``.

    Warning:
        Ops without a double-backward or forward-mode derivative (the fused CPU
        kernel of ``F.scaled_dot_product_attention``) fail inside the product.
    """

    def __init__(
        self,
        model: FunctionalModel,
        inputs: Any,
        targets: Any,
        backend: str = "double_backward",
    ) -> None:
        if backend not in HVP_BACKENDS:
            raise ValueError(f"backend must be one of {HVP_BACKENDS}, got {backend!r}")
        super().__init__(model, inputs, targets)
        self.backend = backend
        self._leaves: tuple[Tensor, ...] = ()
        self._grads: tuple[Tensor | None, ...] = ()
        if backend == "double_backward":
            self._build_graph()

    def _build_graph(self) -> None:
        leaves = tuple(p.detach().requires_grad_(True) for p in self.model.params)
        with torch.enable_grad():
            loss = self.model.loss_at(leaves, self.inputs, self.targets)
            grads = torch.autograd.grad(
                loss, leaves, create_graph=True, allow_unused=True
            )
        self._leaves = leaves
        self._grads = grads

    def gradient(self) -> Tensor:
        """The flat gradient ``dL/dtheta`` of shape ``(p,)``."""
        if not self._grads:
            self._build_graph()
        return flatten(
            [
                torch.zeros_like(p) if g is None else g.detach()
                for g, p in zip(self._grads, self.model.params, strict=True)
            ]
        )

    def __call__(self, vector: Tensor) -> Tensor:
        """``H v`` for ``v`` of shape ``(p,)``; returns shape ``(p,)``."""
        self.num_matvecs += 1
        pieces = unflatten(vector.to(self.model.dtype), self.model.params)
        if self.backend == "double_backward":
            return flatten(self._double_backward(pieces))
        return flatten(self._forward_over_reverse(pieces))

    def _double_backward(self, pieces: tuple[Tensor, ...]) -> list[Tensor]:
        used = [
            i for i, g in enumerate(self._grads) if g is not None and g.requires_grad
        ]
        out = [torch.zeros_like(p) for p in self.model.params]
        if not used:
            return out
        with torch.enable_grad():
            products = torch.autograd.grad(
                [self._grads[i] for i in used],
                self._leaves,
                grad_outputs=[pieces[i] for i in used],
                retain_graph=True,
                allow_unused=True,
            )
        return [o if h is None else h for o, h in zip(out, products, strict=True)]

    def _forward_over_reverse(self, pieces: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        def loss_fn(params: tuple[Tensor, ...]) -> Tensor:
            return self.model.loss_at(params, self.inputs, self.targets)

        _, product = jvp(grad(loss_fn), (self.model.params,), (pieces,))
        return product


def _check_per_sample(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.training:
            raise ValueError(
                f"per-sample gradients are undefined for {type(m).__name__} in "
                "training mode (each sample's loss depends on the whole batch): use "
                "FisherDiagonal(kind='gnb'), GradientStats(noise_scale=False), or "
                "put the module in eval mode"
            )


def per_sample_gradients(
    model: FunctionalModel,
    inputs: Tensor,
    targets: Tensor,
    per_sample_loss: Callable[[Tensor, Tensor], Tensor],
    *,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Gradients ``g_n = d l_n / d theta`` of each sample's own loss.

    ``l_n`` is ``per_sample_loss(f(x_n), y_n)`` evaluated on a batch of one, so for a
    loss with ``reduction="mean"`` over N samples the batch gradient is
    ``(1/N) sum_n g_n``. Computed with ``torch.func.vmap`` over ``torch.func.grad``.

    Args:
        model: The functional model.
        inputs: Inputs of shape ``(N, ...)``.
        targets: Targets with leading dimension N.
        per_sample_loss: Maps ``(outputs, targets)`` of a batch to losses ``(N,)``.
        chunk_size: Samples per vmapped chunk (bounds memory); ``None``: all at once.

    Returns:
        Flat gradients of shape ``(N, p)``.

    Warning:
        Undefined for BatchNorm in training mode, which raises a ``ValueError``.
        Dropout draws an independent mask for each sample.
    """
    _check_per_sample(model.module)
    inputs, targets = model.cast(inputs), model.cast(targets)

    def one(params: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
        outputs = model.outputs(params, x.unsqueeze(0))
        return per_sample_loss(outputs, y.unsqueeze(0))[0]

    per_sample = vmap(
        grad(one), in_dims=(None, 0, 0), randomness="different", chunk_size=chunk_size
    )
    return flatten_batched(per_sample(model.params, inputs, targets))


def flatten_batched(tensors: tuple[Tensor, ...]) -> Tensor:
    """Concatenate tensors of shape ``(N, ...)`` into one of shape ``(N, p)``."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)
