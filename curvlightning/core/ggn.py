r"""Generalised Gauss-Newton products and its trace by sampling in output space.

For a likelihood loss ``L = (1/N) sum_n l_n(z_n)`` of outputs ``z = f(x; theta)``
(``N`` samples of ``k`` outputs each), the generalised Gauss-Newton matrix is

.. math::
    G = J^\top H_z J, \qquad
    J = \frac{\partial z}{\partial \theta} \in \mathbb{R}^{Nk \times p}, \qquad
    H_z = \frac{\partial^2 L}{\partial z^2}
        = \frac{1}{N} \operatorname{blockdiag}(H_1, \dots, H_N),

with ``H_n = d^2 l_n / d z_n^2`` the Hessian of one sample's loss with respect to
its outputs (:mod:`curvlightning.core.likelihoods` fixes the losses):

- categorical, ``l_n = CE(z_n, y_n)``: ``H_n = diag(p_n) - p_n p_n^T`` with
  ``p_n = softmax(z_n)``;
- gaussian, ``l_n = (1/k) ||z_n - y_n||^2``: ``H_n = (2/k) I``;
- bernoulli, ``l_n = (1/k) sum_j BCE(z_nj, y_nj)``: ``H_n = diag(p_n (1 - p_n)) / k``
  with ``p_n = sigmoid(z_n)``.

``G`` is the Hessian of the loss with the second derivatives of the network
dropped: it is positive semi-definite, it equals the Hessian for a model linear in
its parameters, and it equals the Fisher (times the loss scale) for these
likelihoods. None of these depend on the targets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vmap

from curvlightning.core.estimators import Estimate, check_num_probes, mean_and_stderr
from curvlightning.core.functional import FunctionalModel, flatten, unflatten
from curvlightning.core.likelihoods import Likelihood, get_likelihood
from curvlightning.core.probes import ProbeSource
from curvlightning.core.products import (
    check_chunk_size,
    check_probe_block,
    curvature_sdpa,
    run_blocks,
)

__all__ = [
    "GGNOperator",
    "ggn_trace_output_sampling",
    "loss_hessian_product",
    "loss_hessian_sqrt_product",
]


def _per_sample(outputs: Tensor, likelihood: Likelihood) -> tuple[int, int]:
    """The number N of samples and k of outputs per sample."""
    if likelihood.name == "categorical" and outputs.dim() != 2:
        raise ValueError(
            "the categorical likelihood needs outputs of shape (N, k); got "
            f"{tuple(outputs.shape)}. Reshape them in FunctionalModel.forward"
        )
    return outputs.shape[0], math.prod(outputs.shape[1:])


def loss_hessian_product(likelihood: Likelihood, outputs: Tensor, u: Tensor) -> Tensor:
    r"""``H_z u``: the Hessian of the batch loss in the outputs, times ``u``.

    ``H_z = (1/N) blockdiag(H_n)`` (see the module docstring); sample ``n`` of the
    result is ``H_n u_n / N``.

    Args:
        likelihood: The likelihood of the loss.
        outputs: Outputs ``z`` of shape ``(N, ...)``, ``(N, k)`` for the
            categorical.
        u: Directions of shape ``(*batch, *outputs.shape)``; leading batch
            dimensions (several probes) are kept.

    Returns:
        Shaped like ``u``.
    """
    num, k = _per_sample(outputs, likelihood)
    z = outputs.detach()
    if likelihood.name == "categorical":
        p = torch.softmax(z, dim=-1)
        return (p * u - p * (p * u).sum(dim=-1, keepdim=True)) / num
    if likelihood.name == "gaussian":
        return u * (2.0 / (k * num))
    p = torch.sigmoid(z)
    return u * (p * (1 - p) / (k * num))


def loss_hessian_sqrt_product(
    likelihood: Likelihood, outputs: Tensor, u: Tensor
) -> Tensor:
    r"""``S u`` with ``S`` a square root of ``H_z``: ``S S^T = H_z``.

    Per sample, ``S_n = R_n / sqrt(N)`` with ``R_n R_n^T = H_n``. For the
    categorical, with ``s = sqrt(p)``,

    .. math::
        R_n = \operatorname{diag}(s) - p s^\top, \qquad
        R_n R_n^\top = \operatorname{diag}(p) - 2 p p^\top + p (s^\top s) p^\top
        = \operatorname{diag}(p) - p p^\top,

    since ``diag(s) s = p`` and ``s^T s = 1``. So
    ``R_n u = sqrt(p) * u - p (sqrt(p)^T u)``, with no eigendecomposition. This
    ``R_n`` is not symmetric (``R_n^2 != H_n``); only ``S S^T = H_z`` is used. The
    gaussian and bernoulli ``H_n`` are diagonal and ``R_n`` is their square root.

    Args:
        likelihood: The likelihood of the loss.
        outputs: Outputs ``z`` of shape ``(N, ...)``, ``(N, k)`` for the
            categorical.
        u: Directions of shape ``(*batch, *outputs.shape)``.

    Returns:
        Shaped like ``u``.
    """
    num, k = _per_sample(outputs, likelihood)
    z = outputs.detach()
    if likelihood.name == "categorical":
        p = torch.softmax(z, dim=-1)
        s = p.sqrt()
        return (s * u - p * (s * u).sum(dim=-1, keepdim=True)) / math.sqrt(num)
    if likelihood.name == "gaussian":
        return u * math.sqrt(2.0 / (k * num))
    p = torch.sigmoid(z)
    return u * (p * (1 - p) / (k * num)).sqrt()


class _OutputGraph:
    """The outputs ``z`` with their graph, for vector-Jacobian products ``J^T u``."""

    def __init__(self, model: FunctionalModel, inputs: Any) -> None:
        self.model = model
        self.inputs = inputs
        self.leaves = tuple(p.detach().requires_grad_(True) for p in model.params)
        with torch.enable_grad(), curvature_sdpa():
            self.outputs = model.outputs(self.leaves, inputs)

    def vjp(self, u: Tensor, batched: bool) -> Tensor:
        """``J^T u`` for ``u`` shaped like the outputs (with a probe dimension)."""
        with torch.enable_grad():
            grads = torch.autograd.grad(
                self.outputs,
                self.leaves,
                grad_outputs=u,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )
        shape = u.shape[:1] if batched else ()
        pieces = [
            p.new_zeros((*shape, *p.shape)) if g is None else g
            for g, p in zip(grads, self.leaves, strict=True)
        ]
        if batched:
            return torch.cat([g.reshape(g.shape[0], -1) for g in pieces], dim=1)
        return flatten(pieces)

    def jvp(self, vector: Tensor) -> Tensor:
        """``J v`` for a flat ``v`` of shape ``(p,)``: a forward-mode pass."""
        pieces = unflatten(vector, self.model.params)

        def outputs(params: tuple[Tensor, ...]) -> Tensor:
            return self.model.outputs(params, self.inputs)

        with curvature_sdpa():
            return jvp(outputs, (self.model.params,), (pieces,))[1]

    def jvp_batched(self, block: Tensor) -> Tensor:
        """``J v_i`` for each row of ``block`` (shape ``(n, p)``), vmapped."""
        return vmap(self.jvp, randomness="same")(block)


class GGNOperator:
    r"""Products ``v -> G v = J^T H_z J v`` with the generalised Gauss-Newton matrix.

    Neither ``J`` (``Nk x p``) nor ``G`` (``p x p``) is formed: ``J v`` is a
    forward-mode product (``torch.func.jvp``), ``H_z`` acts per sample in output
    space (:func:`loss_hessian_product`), and ``J^T u`` is a backward pass through
    the graph of one forward pass, kept for the operator's lifetime. A product
    costs about one forward and one backward pass, against about two for a
    Hessian-vector product. :meth:`matmat` vmaps the forward-mode products over a
    block of probes and batches the backward pass (``is_grads_batched``), falling
    back to one probe at a time where an op has no batching rule.

    Args:
        model: The functional model; its ``forward`` must give outputs of shape
            ``(N, k)`` for the categorical, ``(N, ...)`` otherwise.
        inputs: Inputs of the batch.
        targets: Targets of the batch, used by :meth:`gradient` and :meth:`loss`
            only (``G`` does not depend on them); ``None`` if not needed.
        likelihood: ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or a
            :class:`~curvlightning.core.likelihoods.Likelihood`.
        chunk_size: Probes per vmapped pass; ``None``: the whole block.

    Attributes:
        num_matvecs: Products computed so far, one per probe.

    Raises:
        ValueError: If the likelihood is unknown, or the targets do not fit it.
    """

    def __init__(
        self,
        model: FunctionalModel,
        inputs: Any,
        targets: Any = None,
        likelihood: str | Likelihood = "categorical",
        *,
        chunk_size: int | None = None,
    ) -> None:
        check_chunk_size(chunk_size)
        self.model = model
        self.likelihood = get_likelihood(likelihood)
        self.inputs = model.cast(inputs)
        self.targets = None if targets is None else model.cast(targets)
        self.chunk_size = chunk_size
        self.num_matvecs = 0
        self._graph = _OutputGraph(model, self.inputs)
        _per_sample(self._graph.outputs, self.likelihood)
        if self.targets is not None:
            self.likelihood.check(self._graph.outputs, self.targets)
        self._batching: dict[str, bool] = {}

    @property
    def dim(self) -> int:
        """The number p of parameters."""
        return self.model.num_params

    def loss(self) -> Tensor:
        """The likelihood's loss at the current parameters (no graph)."""
        outputs = self._graph.outputs.detach()
        return self.likelihood.loss(outputs, self._require_targets("loss"))

    def gradient(self) -> Tensor:
        """The flat gradient of the likelihood's loss, shape ``(p,)``."""
        targets = self._require_targets("gradient")
        with torch.enable_grad():
            loss = self.likelihood.loss(self._graph.outputs, targets)
            return self._graph.vjp(
                torch.autograd.grad(loss, self._graph.outputs)[0], False
            )

    def _require_targets(self, method: str) -> Tensor:
        if self.targets is None:
            raise ValueError(
                f"GGNOperator.{method}() needs the targets: pass targets to the "
                "constructor (the products themselves do not use them)"
            )
        return self.targets

    def __call__(self, vector: Tensor) -> Tensor:
        """``G v`` for ``v`` of shape ``(p,)``; returns shape ``(p,)``."""
        return self.matmat(vector.reshape(1, -1))[0]

    def matmat(self, probes: Tensor) -> Tensor:
        """``G v_i`` for every row ``v_i`` of ``probes`` (shape ``(n, p)``).

        Returns:
            The products, shape ``(n, p)``.

        Raises:
            ValueError: If ``probes`` is not of shape ``(n, p)``.
        """
        check_probe_block(probes, self.dim)
        probes = probes.to(device=self.model.device, dtype=self.model.dtype)
        chunk = self.chunk_size or max(probes.shape[0], 1)
        out = torch.cat([self._block(b) for b in probes.split(chunk)])
        self.num_matvecs += probes.shape[0]
        return out

    def _block(self, block: Tensor) -> Tensor:
        graph, outputs = self._graph, self._graph.outputs
        tangents = run_blocks(
            block, graph.jvp_batched, graph.jvp, self._batching, "ggn_jvp"
        )
        u = loss_hessian_product(self.likelihood, outputs, tangents)
        return run_blocks(
            u,
            lambda b: graph.vjp(b, True),
            lambda one: graph.vjp(one, False),
            self._batching,
            "ggn_vjp",
        )


def ggn_trace_output_sampling(
    model: FunctionalModel,
    inputs: Any,
    likelihood: str | Likelihood,
    probes: ProbeSource,
    num_probes: int,
    *,
    segments: Mapping[str, slice] | None = None,
    chunk_size: int | None = None,
) -> Estimate:
    r"""Estimate ``trace(G)`` from probes drawn in output space.

    With ``S S^T = H_z`` (:func:`loss_hessian_sqrt_product`),
    ``G = (J^T S)(J^T S)^T``, so for ``u`` in output space (shape ``(N, k)``) with
    ``E[u u^T] = I``

    .. math::
        \operatorname{tr}(G) = \operatorname{tr}\big((J^\top S)^\top J^\top S\big)
        = \mathbb{E}_u \big[\, \| J^\top S u \|^2 \big],
        \qquad
        \widehat{\operatorname{tr}}(G) = \frac{1}{n} \sum_{i=1}^n \|J^\top S u_i\|^2 .

    Each term is one vector-Jacobian product (a backward pass through the graph of
    one forward pass) and is non-negative, so the estimate is too. The estimator is
    unbiased; for Gaussian ``u`` its variance is ``2 ||G||_F^2 / n`` (since
    ``||A^T A||_F = ||A A^T||_F`` for ``A = J^T S``), the variance of Hutchinson's
    estimator of ``trace(G)`` with Gaussian probes in parameter space, at less
    than half the cost per probe: one backward pass, no forward-mode pass and no
    second derivative. The block trace ``trace(G[s, s])`` uses the same probes,
    ``||(J^T S u_i)[s]||^2``.

    For a network whose outputs are affine in every single parameter once the
    others and the activation pattern are fixed (linear and convolution layers
    with ReLU and max pooling; not with smooth activations, normalisation layers
    or attention), ``d^2 z / d theta_i^2 = 0``, so ``diag(H) = diag(G)`` and this
    also estimates ``trace(H)``, at about a third of the cost of a
    Hessian-vector product per probe.

    This is the single-rank estimate on the rank's batch; combine ranks with
    :func:`~curvlightning.core.estimators.reduce_estimate`.

    Args:
        model: The functional model (outputs of shape ``(N, k)`` for the
            categorical).
        inputs: Inputs of the batch.
        likelihood: ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or a
            :class:`~curvlightning.core.likelihoods.Likelihood`.
        probes: Draws the output-space probes ``u`` (``ProbeSource.kind``:
            Rademacher or Gaussian).
        num_probes: Number n of probes, at least 1.
        segments: Named slices of the flat parameter vector whose block traces
            are reported in ``parts``.
        chunk_size: Probes per batched backward pass; ``None``: all at once.

    Returns:
        The estimate; ``num_matvecs`` counts vector-Jacobian products.

    Raises:
        ValueError: If ``num_probes`` is not positive or the likelihood unknown.
    """
    check_num_probes(num_probes)
    check_chunk_size(chunk_size)
    likelihood = get_likelihood(likelihood)
    graph = _OutputGraph(model, model.cast(inputs))
    outputs = graph.outputs
    _per_sample(outputs, likelihood)
    draws = probes.draw(
        num_probes, outputs.numel(), dtype=outputs.dtype, device=outputs.device
    ).reshape(num_probes, *outputs.shape)
    u = loss_hessian_sqrt_product(likelihood, outputs, draws)
    segments = dict(segments or {})
    batching: dict[str, bool] = {}
    rows = []
    for block in u.split(chunk_size or num_probes):
        products = run_blocks(
            block,
            lambda b: graph.vjp(b, True),
            lambda one: graph.vjp(one, False),
            batching,
            "ggn_trace_vjp",
        )
        rows.append(_squared_norms(products, segments))
    mean, stderr = mean_and_stderr(torch.cat(rows))
    parts = {
        name: Estimate(mean[j + 1], stderr[j + 1], num_probes, num_probes)
        for j, name in enumerate(segments)
    }
    return Estimate(mean[0], stderr[0], num_probes, num_probes, parts)


def _squared_norms(products: Tensor, segments: Mapping[str, slice]) -> Tensor:
    """Per row: ``||w||^2`` and ``||w[s]||^2`` per segment, shape ``(n, 1 + S)``."""
    squares = products.square()
    columns = [squares.sum(1)] + [squares[:, s].sum(1) for s in segments.values()]
    return torch.stack(columns, dim=1)
