"""Chunked per-sample gradients, the gradient noise scale and the gradient SNR."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPE, classification_batch, loop_sample_gradients, tiny_mlp
from torch import Tensor, nn

from curvlightning.core import FunctionalModel, SingleProcess, per_sample_gradients
from curvlightning.core.gradients import (
    NoiseScaleEMA,
    chunk_size_for_budget,
    gradient_snr,
    gradient_snr_from_sums,
    noise_scale_across_ranks,
    noise_scale_from_gradients,
    noise_scale_parts,
    per_sample_gradients_chunked,
)
from curvlightning.core.operators import segments
from curvlightning.core.sumsq import sum_of_squared_gradients

RTOL, ATOL = 1e-6, 1e-12
NUM_PARAMS = 51


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _batch_gradient(module: nn.Module, inputs, targets, reduction: str) -> Tensor:
    loss = F.cross_entropy(module(inputs), targets, reduction=reduction)
    grads = torch.autograd.grad(loss, list(module.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


# ------------------------------------------------------------ per-sample gradients
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_rows_reduce_to_the_batch_gradient(reduction):
    module = tiny_mlp(0)
    inputs, targets = classification_batch(0)
    rows = per_sample_gradients_chunked(
        FunctionalModel(module), inputs, targets, _cross_entropy, memory_budget=2**20
    )

    assert rows.shape == (8, NUM_PARAMS)
    torch.testing.assert_close(
        rows, loop_sample_gradients(module, F.cross_entropy, inputs, targets)
    )
    reduced = rows.mean(0) if reduction == "mean" else rows.sum(0)
    expected = _batch_gradient(module, inputs, targets, reduction)
    torch.testing.assert_close(reduced, expected, rtol=RTOL, atol=ATOL)
    # The two reductions differ by N, so the check tells them apart.
    assert (rows.sum(0) - rows.mean(0)).abs().max() > 0.01


def test_chunk_size_follows_the_budget():
    per_sample = 3 * NUM_PARAMS * 8

    assert chunk_size_for_budget(NUM_PARAMS, 8, 3 * per_sample, 8) == 3
    assert chunk_size_for_budget(NUM_PARAMS, 8, 3 * per_sample - 1, 8) == 2
    assert chunk_size_for_budget(NUM_PARAMS, 8, 100 * per_sample, 8) == 8
    with pytest.raises(ValueError, match=r"memory_budget=100 bytes.*at least 1224"):
        chunk_size_for_budget(NUM_PARAMS, 8, 100, 8)
    with pytest.raises(TypeError, match="memory_budget must be an int"):
        chunk_size_for_budget(NUM_PARAMS, 8, 1e9, 8)


def test_chunked_equals_unchunked_and_streams_reductions():
    module = tiny_mlp(1)
    inputs, targets = classification_batch(1)
    model = FunctionalModel(module)
    budget = 3 * 3 * NUM_PARAMS * 8  # chunks of 3, 3 and 2 samples
    full = per_sample_gradients(model, inputs, targets, _cross_entropy)

    chunked = per_sample_gradients_chunked(
        model, inputs, targets, _cross_entropy, memory_budget=budget
    )
    squares = per_sample_gradients_chunked(
        model,
        inputs,
        targets,
        _cross_entropy,
        memory_budget=budget,
        reduce_fn=lambda g: (g * g).sum(0),
    )
    norms = per_sample_gradients_chunked(
        module,
        inputs,
        targets,
        _cross_entropy,
        memory_budget=budget,
        reduce_fn=lambda g: g.norm(dim=1).square().sum(),
    )

    torch.testing.assert_close(chunked, full, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(squares, (full * full).sum(0), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(norms, (full * full).sum(), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- noise scale
DIM, NOISE_STD, NUM_SEEDS = 5, 0.5, 200
MICRO_BATCHES = (2, 3, 7)  # unequal: B_small is their harmonic mean


def _regression_gradients(seed: int) -> tuple[Tensor, Tensor]:
    """Per-sample gradients of ``0.5 (x^T w - y)^2`` and the offset ``w - w*``.

    With ``x ~ N(0, I)`` and ``y = x^T w* + eps``, ``eps ~ N(0, s^2)``, the gradient
    ``x (x^T delta - eps)`` has mean ``G = delta`` and covariance
    ``Sigma = (|delta|^2 + s^2) I + delta delta^T``.
    """
    gen = torch.Generator().manual_seed(seed)
    delta = 0.3 * torch.randn(DIM, generator=gen, dtype=DTYPE)
    w_star = torch.randn(DIM, generator=gen, dtype=DTYPE)
    total = NUM_SEEDS * sum(MICRO_BATCHES)
    x = torch.randn(total, DIM, generator=gen, dtype=DTYPE)
    y = x @ w_star + NOISE_STD * torch.randn(total, generator=gen, dtype=DTYPE)
    model = nn.Linear(DIM, 1, bias=False).to(DTYPE)
    with torch.no_grad():
        model.weight.copy_(w_star + delta)

    def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (outputs[:, 0] - targets).square()

    grads = per_sample_gradients_chunked(model, x, y, squared_error)
    return grads.reshape(NUM_SEEDS, sum(MICRO_BATCHES), DIM), delta


def _within(samples: Tensor, truth: Tensor, num_se: float = 3.0) -> bool:
    se = samples.std() / math.sqrt(samples.numel())
    return bool((samples.mean() - truth).abs() < num_se * se)


def test_noise_scale_estimators_are_unbiased_on_linear_regression():
    grads, delta = _regression_gradients(0)
    true_sq_norm = delta @ delta
    true_trace = DIM * (delta @ delta + NOISE_STD**2) + delta @ delta

    draws = []
    for per_sample in grads:
        parts = per_sample.split(MICRO_BATCHES)
        local = [g.mean(0) for g in parts]
        draws.append(noise_scale_from_gradients(local, MICRO_BATCHES))
    sq_norms = torch.stack([d.sq_norm for d in draws])
    traces = torch.stack([d.trace_sigma for d in draws])
    naive = torch.stack([g.mean(0) @ g.mean(0) for g in grads])

    assert draws[0].batch_small == pytest.approx(3 / (1 / 2 + 1 / 3 + 1 / 7))
    assert draws[0].batch_big == 12
    assert _within(sq_norms, true_sq_norm)
    assert _within(traces, true_trace)
    # The test has power: the plain squared norm of the big-batch gradient is
    # biased by tr(Sigma) / B_big, far outside the same band.
    assert not _within(naive, true_sq_norm, num_se=5.0)


def test_noise_scale_parts_solve_the_two_batch_equations():
    sq_norm, trace = 2.0, 30.0
    small, big = sq_norm + trace / 4, sq_norm + trace / 16

    parts = noise_scale_parts(small, big, 4, 16)

    assert float(parts.sq_norm) == pytest.approx(sq_norm)
    assert float(parts.trace_sigma) == pytest.approx(trace)
    assert float(parts.b_simple) == pytest.approx(15.0)


@pytest.mark.parametrize(
    ("grads", "sizes", "message"),
    [
        ([torch.ones(3)], [4], "at least 2 micro-batches, got 1"),
        ([torch.ones(3)] * 2, [4], "2 gradients but batch_sizes has 1"),
        ([torch.ones(3)] * 2, [4, 0], r"batch_sizes must be positive, got \[4, 0\]"),
    ],
)
def test_noise_scale_from_gradients_rejects_bad_micro_batches(grads, sizes, message):
    with pytest.raises(ValueError, match=message):
        noise_scale_from_gradients(grads, sizes)


def test_noise_scale_parts_reject_equal_batch_sizes():
    with pytest.raises(ValueError, match="batch_small=8, batch_big=8"):
        noise_scale_parts(1.0, 1.0, 8, 8)
    with pytest.raises(ValueError, match="at least 2 ranks, got world_size=1"):
        noise_scale_across_ranks(torch.ones(3), 4, SingleProcess())


def test_noise_scale_ema_bias_correction_and_state_round_trip():
    ema = NoiseScaleEMA(beta=0.9)
    assert math.isnan(ema.b_simple)
    ema.update(2.0, 10.0)
    # One draw: the bias-corrected averages are the draw itself.
    assert ema.sq_norm == pytest.approx(2.0)
    assert ema.trace_sigma == pytest.approx(10.0)
    assert ema.b_simple == pytest.approx(5.0)
    assert not ema.update(float("nan"), 1.0)
    assert ema.num_skipped == 1 and ema.step == 1

    gen = torch.Generator().manual_seed(0)
    draws = torch.rand(20, 2, generator=gen, dtype=DTYPE) + 0.5
    for sq_norm, trace in draws[:10]:
        ema.update(sq_norm, trace)
    resumed = NoiseScaleEMA(beta=0.5)
    resumed.load_state_dict(ema.state_dict())
    for sq_norm, trace in draws[10:]:
        ema.update(sq_norm, trace)
        resumed.update(sq_norm, trace)

    assert resumed.state_dict() == ema.state_dict()
    assert (resumed.sq_norm, resumed.b_simple) == (ema.sq_norm, ema.b_simple)
    with pytest.raises(KeyError, match=r"lacks \['trace_sigma'\]"):
        NoiseScaleEMA().load_state_dict(
            {k: v for k, v in ema.state_dict().items() if k != "trace_sigma"}
        )
    with pytest.raises(ValueError, match="beta must be in"):
        NoiseScaleEMA(beta=1.0)


# ------------------------------------------------------- signal-to-noise ratio
def test_gradient_snr_per_layer_matches_its_definition():
    module = tiny_mlp(2)
    inputs, targets = classification_batch(2, num_samples=16)
    model = FunctionalModel(module)
    grads = per_sample_gradients(model, inputs, targets, _cross_entropy)
    layers = segments(model)

    snr = gradient_snr(grads, layers)
    debiased = gradient_snr(grads, layers, debias=True)

    assert set(snr) == set(layers)
    for name, s in layers.items():
        block = grads[:, s]
        mean = block.mean(0)
        trace_var = block.var(0, correction=1).sum()
        torch.testing.assert_close(snr[name], mean @ mean / trace_var)
        torch.testing.assert_close(
            debiased[name], (mean @ mean - trace_var / 16) / trace_var
        )
    # The fast path: the batch gradient and the sum of squares, no (N, p) matrix.
    squares = sum_of_squared_gradients(model, inputs, targets, _cross_entropy)
    fast = gradient_snr_from_sums(grads.sum(0), squares, 16, layers)
    for name in layers:
        torch.testing.assert_close(fast[name], snr[name], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="count >= 2 gradients, got 1"):
        gradient_snr(grads[:1])
