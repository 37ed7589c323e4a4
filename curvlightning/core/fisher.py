r"""Diagonals of the Fisher information: empirical, Monte-Carlo, Gauss-Newton-Bartlett.

For a negative log-likelihood the expected Hessian over the model's own predictive
distribution is the Fisher, ``E_{y ~ p(y|x)}[H] = E[g g^T]``, so squared gradients
estimate curvature. Three kinds, all scaled by the likelihood's loss scale ``c`` so
that they estimate the diagonal of the Gauss-Newton matrix of the training loss
``L = (1/N) sum_n l_n`` (see :mod:`curvlightning.core.likelihoods`):

- ``"empirical"``: ``c (1/N) sum_n g_n(y_n)^2`` at the true labels. Not an unbiased
  estimate of the Fisher: it equals it only where the model is calibrated.
- ``"mc"``: ``c (1/N) sum_n (1/S) sum_s g_n(y_ns)^2`` with ``S = mc_samples`` labels
  ``y_ns ~ p(y | x_n)``: unbiased for ``c (1/N) sum_n E_y[g_n^2]``, the diagonal of
  the Fisher (equal to the Gauss-Newton diagonal ``(1/N) sum_n diag(J_n^T H_z J_n)``).
- ``"gnb"`` (Gauss-Newton-Bartlett, as in Sophia, Liu et al. 2023): one gradient
  ``g_hat`` of the batch loss at sampled labels, ``c N g_hat^2``. Since
  ``E_y[g_n] = 0`` for labels drawn from the model, the cross terms vanish in
  expectation and it is unbiased for the same diagonal as ``"mc"``, at the price of
  one backward pass instead of N per-sample gradients.

Across ranks, sample sums (``"empirical"``, ``"mc"``) and the batch gradient
(``"gnb"``) are reduced before squaring, so R ranks of N/R samples with shared label
noise give exactly the single-process result on N samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from curvlightning.core.distributed import Reducer, SingleProcess
from curvlightning.core.estimators import Estimate, _estimate_from_sums, mean_and_stderr
from curvlightning.core.functional import FunctionalModel, flatten
from curvlightning.core.likelihoods import Likelihood
from curvlightning.core.operators import per_sample_gradients
from curvlightning.core.probes import ProbeSource

__all__ = ["FISHER_KINDS", "fisher_diagonal"]

FISHER_KINDS = ("empirical", "mc", "gnb")
FISHER_METHODS = ("auto", "sumsq", "vmap")


def check_fisher_kind(kind: str, mc_samples: int) -> None:
    """Validate ``kind`` and ``mc_samples``."""
    if kind not in FISHER_KINDS:
        raise ValueError(f"kind must be one of {FISHER_KINDS}, got {kind!r}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int):
        raise TypeError(f"mc_samples must be an int, got {mc_samples!r}")
    if mc_samples <= 0:
        raise ValueError(
            f"mc_samples must be a positive number of sampled labels, got {mc_samples}"
        )


def fisher_diagonal(
    model: FunctionalModel,
    inputs: Any,
    targets: Tensor,
    likelihood: Likelihood,
    kind: str = "empirical",
    *,
    mc_samples: int = 1,
    probes: ProbeSource | None = None,
    reducer: Reducer | None = None,
    chunk_size: int | None = None,
    segments: Mapping[str, slice] | None = None,
    method: str = "auto",
) -> Estimate:
    """A diagonal of the Fisher information on one batch, reduced over ranks.

    Args:
        model: The functional model.
        inputs: This rank's inputs, batch size N_r.
        targets: This rank's targets.
        likelihood: The likelihood whose loss the model trains on.
        kind: ``"empirical"``, ``"mc"`` or ``"gnb"`` (see the module docstring).
        mc_samples: Sampled labels per input (``"mc"``), or independent draws
            (``"gnb"``: each a full backward pass; the standard error needs 2).
        probes: Seeds the label noise; with ``shared=True`` the noise of sample n
            does not depend on how the batch is split over ranks.
        reducer: The collectives; ``None`` for a single process.
        chunk_size: Samples per vmapped chunk for per-sample gradients.
        segments: Named index ranges whose block traces (sums of the diagonal)
            are reported in ``parts``, each with its own standard error (the
            coordinates of one sample are correlated, so it is not the quadrature
            sum of the coordinates' errors).
        method: How ``"empirical"`` and ``"mc"`` get their squared per-sample
            gradients: ``"sumsq"`` from layer inputs and output gradients without
            forming per-sample gradients (:mod:`curvlightning.core.sumsq`; Linear
            and Conv2d layers, ``vmap`` for the others), ``"vmap"`` from
            per-sample gradients, ``"auto"`` (``"sumsq"`` unless a segment cuts a
            parameter or BatchNorm is in training mode).

    Returns:
        The diagonal (shape ``(p,)``) with its standard error: over samples for
        ``"empirical"`` and ``"mc"``, over the ``mc_samples`` draws for ``"gnb"``.
    """
    check_fisher_kind(kind, mc_samples)
    if method not in FISHER_METHODS:
        raise ValueError(f"method must be one of {FISHER_METHODS}, got {method!r}")
    if kind != "gnb" and _use_sumsq(method, model, segments):
        from curvlightning.core.sumsq import fisher_sumsq

        return fisher_sumsq(
            model,
            inputs,
            targets,
            likelihood,
            kind,
            mc_samples=mc_samples,
            probes=probes,
            reducer=reducer,
            segments=segments,
        )
    reducer = reducer or SingleProcess()
    probes = probes or ProbeSource()
    inputs, targets = model.cast(inputs), model.cast(targets)
    with torch.no_grad():
        outputs = model.outputs(model.params, inputs)
    likelihood.check(outputs, targets)
    scale = likelihood.loss_scale(outputs)
    segments = dict(segments or {})
    if kind == "gnb":
        return _gnb(
            model, inputs, outputs, likelihood, mc_samples, probes, reducer, segments
        )
    if kind == "empirical":
        sq = _squared_grads(model, inputs, targets, likelihood, chunk_size)
    else:
        noise = _label_noise(likelihood, outputs, mc_samples, probes, reducer)
        sq = (
            sum(
                _squared_grads(
                    model,
                    inputs,
                    likelihood.sample(outputs, noise[:, s]),
                    likelihood,
                    chunk_size,
                )
                for s in range(mc_samples)
            )
            / mc_samples
        )
    sq = sq * scale
    blocks = _block_sums(sq, segments)
    terms = torch.cat([sq, blocks], dim=1)
    sums = reducer.all_reduce_sum(
        torch.cat([terms.sum(0), (terms * terms).sum(0), sq.new_tensor([sq.shape[0]])])
    )
    width = terms.shape[1]
    count = int(sums[-1].item())
    whole = _estimate_from_sums(sums[:width], sums[width : 2 * width], count, 0)
    return _split_parts(whole, sq.shape[1], segments)


def _block_sums(terms: Tensor, segments: Mapping[str, slice]) -> Tensor:
    """Sums of ``terms`` (shape ``(n, p)``) over each segment: shape ``(n, G)``."""
    columns = [terms[:, s].sum(dim=1) for s in segments.values()]
    return torch.stack(columns, dim=1) if columns else terms[:, :0]


def _split_parts(whole: Estimate, dim: int, segments: Mapping[str, slice]) -> Estimate:
    """Cut a joint estimate of ``(diagonal, block sums)`` into value and parts."""
    parts = {
        name: Estimate(
            whole.value[dim + j],
            whole.stderr[dim + j],
            whole.num_matvecs,
            whole.num_samples,
        )
        for j, name in enumerate(segments)
    }
    return Estimate(
        whole.value[:dim],
        whole.stderr[:dim],
        whole.num_matvecs,
        whole.num_samples,
        parts,
    )


def _use_sumsq(
    method: str, model: FunctionalModel, segments: Mapping[str, slice] | None
) -> bool:
    """Whether the sums-of-squares path applies (``method="auto"`` decides here)."""
    if method != "auto":
        return method == "sumsq"
    for m in model.module.modules():
        if isinstance(m, _BatchNorm) and m.training:
            return False
    bounds = set()
    start = 0
    for p in model.params:
        bounds.add(start)
        start += p.numel()
    bounds.add(start)
    for s in (segments or {}).values():
        lo, hi, _ = s.indices(start)
        if lo not in bounds or hi not in bounds:
            return False
    return True


def _squared_grads(
    model: FunctionalModel,
    inputs: Any,
    targets: Tensor,
    likelihood: Likelihood,
    chunk_size: int | None,
) -> Tensor:
    grads = per_sample_gradients(
        model, inputs, targets, likelihood.per_sample_loss, chunk_size=chunk_size
    )
    return grads * grads


def _label_noise(
    likelihood: Likelihood,
    outputs: Tensor,
    mc_samples: int,
    probes: ProbeSource,
    reducer: Reducer,
) -> Tensor:
    """Noise of shape ``(N_r, S, ...)`` for this rank's rows of the global batch."""
    rows = outputs.shape[0]
    offset, total = 0, rows
    if probes.shared:
        offset, total = reducer.offset_and_total(rows)
    event = likelihood.noise_shape(outputs)[1:]
    shape = (total, mc_samples, *event)
    gen = probes.generator()
    if likelihood.noise_is_normal():
        noise = torch.randn(shape, generator=gen, dtype=outputs.dtype)
    else:
        noise = torch.rand(shape, generator=gen, dtype=outputs.dtype)
    return noise[offset : offset + rows].to(outputs.device)


def _gnb(
    model: FunctionalModel,
    inputs: Any,
    outputs: Tensor,
    likelihood: Likelihood,
    draws: int,
    probes: ProbeSource,
    reducer: Reducer,
    segments: Mapping[str, slice],
) -> Estimate:
    rows = outputs.shape[0]
    noise = _label_noise(likelihood, outputs, draws, probes, reducer)
    total = reducer.all_reduce_sum(outputs.new_tensor(float(rows)))
    scale = likelihood.loss_scale(outputs)
    estimates = []
    for s in range(draws):
        sampled = likelihood.sample(outputs, noise[:, s])
        grad = _batch_gradient(model, inputs, sampled, likelihood)
        grad = reducer.weighted_mean(grad, rows)
        estimates.append(scale * total * grad * grad)
    draws_matrix = torch.stack(estimates)
    terms = torch.cat([draws_matrix, _block_sums(draws_matrix, segments)], dim=1)
    value, stderr = mean_and_stderr(terms)
    whole = Estimate(value, stderr, 0, draws)
    return _split_parts(whole, draws_matrix.shape[1], segments)


def _batch_gradient(
    model: FunctionalModel, inputs: Any, targets: Tensor, likelihood: Likelihood
) -> Tensor:
    leaves = tuple(p.detach().requires_grad_(True) for p in model.params)
    with torch.enable_grad():
        loss = likelihood.loss(model.outputs(leaves, inputs), targets)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return flatten(
        [
            torch.zeros_like(p) if g is None else g
            for g, p in zip(grads, leaves, strict=True)
        ]
    )
