"""Tiny float64 models and the exact dense quantities the estimators must match.

Every reference here forms the full matrix (Hessian, Jacobian, Fisher) of a model
with about 50 parameters, by the slowest obviously right route: ``torch.func``
transforms of the loss as a function of the flat parameter vector, or plain loops
of ordinary autograd over samples and classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlightning.core.functional import FunctionalModel, flatten, unflatten

DTYPE = torch.float64
NUM_INPUTS, NUM_HIDDEN, NUM_CLASSES = 4, 6, 3

Loss = Callable[[Tensor, Tensor], Tensor]


def tiny_mlp(
    seed: int,
    *,
    dropout: float = 0.0,
    batch_norm: bool = False,
    num_outputs: int = NUM_CLASSES,
) -> nn.Sequential:
    """A 4-6-k tanh MLP in float64 (51 parameters for k = 3), in training mode."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(NUM_INPUTS, NUM_HIDDEN)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(NUM_HIDDEN))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(NUM_HIDDEN, num_outputs))
    return nn.Sequential(*layers).to(DTYPE).train()


def classification_batch(
    seed: int, num_samples: int = 8, num_classes: int = NUM_CLASSES
) -> tuple[Tensor, Tensor]:
    """Inputs ``(N, 4)`` in float64 and integer class targets ``(N,)``."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, NUM_INPUTS, generator=gen, dtype=DTYPE)
    targets = torch.randint(0, num_classes, (num_samples,), generator=gen)
    return inputs, targets


def regression_batch(
    seed: int, num_samples: int = 8, num_outputs: int = 2
) -> tuple[Tensor, Tensor]:
    """Inputs ``(N, 4)`` and float targets ``(N, k)``, both float64."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, NUM_INPUTS, generator=gen, dtype=DTYPE)
    targets = torch.randn(num_samples, num_outputs, generator=gen, dtype=DTYPE)
    return inputs, targets


class Quadratic(nn.Module):
    """A model-free parameter vector: the output is ``theta`` whatever the input.

    With a loss ``l(theta)`` of the output alone, the Hessian of the training loss is
    the Hessian of ``l``, known in closed form.
    """

    def __init__(self, theta: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, inputs: Tensor) -> Tensor:
        return self.theta


def quadratic_loss(matrix: Tensor) -> Loss:
    """The loss ``0.5 theta^T A theta`` (Hessian ``A`` when ``A`` is symmetric)."""

    def loss(theta: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * theta @ matrix @ theta

    return loss


def random_spd(seed: int, dim: int) -> Tensor:
    """A symmetric positive definite float64 matrix with large off-diagonal terms."""
    gen = torch.Generator().manual_seed(seed)
    factor = torch.randn(dim, dim, generator=gen, dtype=DTYPE)
    return factor @ factor.T / dim + 0.1 * torch.eye(dim, dtype=DTYPE)


def flat_loss(
    model: FunctionalModel, inputs: Tensor, targets: Tensor
) -> Callable[[Tensor], Tensor]:
    """The training loss as a function of the flat parameter vector ``(p,)``."""

    def loss(theta: Tensor) -> Tensor:
        return model.loss_at(unflatten(theta, model.params), inputs, targets)

    return loss


def dense_hessian(
    module: nn.Module, loss: Loss, inputs: Tensor, targets: Tensor
) -> Tensor:
    """The exact Hessian ``(p, p)`` of the loss from ``torch.func.hessian``.

    For modules without random layers; the pass is the one of ``FunctionalModel``
    (trainable parameters, cloned buffers), so it is the matrix that
    ``HessianOperator`` claims to multiply with.
    """
    model = FunctionalModel(module, loss=loss, rng_seed=None, dtype=DTYPE)
    theta = flatten(model.params)
    return torch.func.hessian(flat_loss(model, inputs, targets))(theta)


def dense_hessian_pinned(
    module: nn.Module, loss: Loss, inputs: Tensor, targets: Tensor, rng_seed: int
) -> Tensor:
    """The exact Hessian ``(p, p)`` with the RNG pinned to ``rng_seed`` at each call.

    ``torch.autograd.functional.hessian`` differentiates ordinary forward passes
    (``torch.func.hessian`` vmaps them, where dropout cannot draw one shared mask),
    so every evaluation of the loss draws the dropout mask of ``rng_seed``.
    """
    model = FunctionalModel(module, loss=loss, rng_seed=rng_seed, dtype=DTYPE)
    theta = flatten(model.params)
    return torch.autograd.functional.hessian(flat_loss(model, inputs, targets), theta)


def dense_matrix(matvec: Callable[[Tensor], Tensor], dim: int) -> Tensor:
    """The matrix ``(dim, dim)`` of a linear map, one column per unit vector."""
    eye = torch.eye(dim, dtype=DTYPE)
    return torch.stack([matvec(e) for e in eye], dim=1)


def flat_grad(module: nn.Module) -> Tensor:
    """The ``.grad`` of every trainable parameter, flattened (zeros where unset)."""
    return flatten(
        [
            torch.zeros_like(p) if p.grad is None else p.grad
            for p in module.parameters()
            if p.requires_grad
        ]
    )


def sample_gradient(module: nn.Module, loss: Tensor) -> Tensor:
    """The flat gradient of ``loss`` by one ordinary backward pass."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return flatten(
        [
            torch.zeros_like(p) if g is None else g
            for g, p in zip(grads, params, strict=True)
        ]
    )


def loop_sample_gradients(
    module: nn.Module, loss: Loss, inputs: Tensor, targets: Tensor
) -> Tensor:
    """Gradients ``(N, p)`` of each sample's loss, one batch of one at a time."""
    rows = [
        sample_gradient(module, loss(module(inputs[n : n + 1]), targets[n : n + 1]))
        for n in range(inputs.shape[0])
    ]
    return torch.stack(rows)


def expected_fisher_categorical(module: nn.Module, inputs: Tensor) -> Tensor:
    """``(1/N) sum_n sum_c p_c(x_n) g_{n,c}^2``, the classes enumerated.

    ``g_{n,c}`` is the gradient of ``-log p_c(x_n)`` on a batch of one: the exact
    diagonal of the Fisher of the mean cross-entropy.
    """
    num_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = torch.zeros(num_params, dtype=DTYPE)
    for n in range(inputs.shape[0]):
        logits = module(inputs[n : n + 1])
        probs = torch.softmax(logits.detach(), dim=-1)[0]
        for c in range(logits.shape[-1]):
            loss = F.cross_entropy(module(inputs[n : n + 1]), torch.tensor([c]))
            g = sample_gradient(module, loss)
            total += probs[c] * g * g
    return total / inputs.shape[0]


def ggn_diagonal_gaussian(module: nn.Module, inputs: Tensor) -> Tensor:
    """``(1/N) sum_n diag(J_n^T (2/k) J_n)`` from the dense Jacobian (jacrev).

    ``2/k`` is the Hessian of ``mse_loss(z, y)`` (mean over the ``k`` outputs of one
    sample) with respect to ``z``, so this is the Gauss-Newton diagonal of the
    mean-squared-error training loss.
    """
    model = FunctionalModel(module, rng_seed=None, dtype=DTYPE)
    theta = flatten(model.params)

    def outputs(flat: Tensor) -> Tensor:
        return model.outputs(unflatten(flat, model.params), inputs)

    jac = torch.func.jacrev(outputs)(theta)
    num_samples, num_outputs = jac.shape[:2]
    return (2.0 / num_outputs) * (jac * jac).sum(dim=1).mean(dim=0)
