"""Sampled Jacobian rows against the dense Jacobian from ``torch.func.jacrev``."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPE, classification_batch
from torch import Tensor, nn

from curvlightning.core import FunctionalModel, ProbeSource, flatten, unflatten
from curvlightning.core.jacobian import (
    class_sensitivity,
    jacobian_frobenius_estimate,
    jacobian_row_norms,
    jacobian_rows,
)
from curvlightning.core.operators import segments

RTOL, ATOL = 1e-6, 1e-12
NUM_SAMPLES, NUM_CLASSES = 5, 3


def _module() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, NUM_CLASSES)
    )
    return net.to(DTYPE)


def _setup() -> tuple[FunctionalModel, Tensor, Tensor]:
    """The model, a batch of inputs, and the dense Jacobian ``(N, k, p)``."""
    model = FunctionalModel(_module())
    inputs, _ = classification_batch(0, NUM_SAMPLES)

    def outputs(theta: Tensor) -> Tensor:
        return model.outputs(unflatten(theta, model.params), inputs)

    dense = torch.func.jacrev(outputs)(flatten(model.params))
    return model, inputs, dense


@pytest.mark.parametrize("batched", [True, False])
def test_class_rows_equal_dense_rows(batched):
    model, inputs, dense = _setup()

    rows = jacobian_rows(model, inputs, [2, 0, 2], batched=batched)

    assert dense.shape == (NUM_SAMPLES, NUM_CLASSES, model.num_params)
    expected = dense[:, [2, 0, 2]].sum(0)
    torch.testing.assert_close(rows, expected, rtol=RTOL, atol=ATOL)
    assert expected.abs().max() > 0.1


def test_projection_rows_equal_dense_products():
    model, inputs, dense = _setup()
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(4, NUM_SAMPLES, NUM_CLASSES, generator=gen, dtype=DTYPE)
    one_sample = torch.zeros(1, NUM_SAMPLES, NUM_CLASSES, dtype=DTYPE)
    one_sample[0, 3, 1] = 1.0

    rows = jacobian_rows(model, inputs, u, memory_budget=2 * 3 * 8 * 63)
    per_sample = jacobian_rows(model, inputs, one_sample)

    expected = torch.einsum("rnk,nkp->rp", u, dense)
    torch.testing.assert_close(rows, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(per_sample[0], dense[3, 1], rtol=RTOL, atol=ATOL)


def test_top_rows_follow_each_samples_ranking():
    model, inputs, dense = _setup()
    logits = model.outputs(model.params, inputs)
    order = logits.argsort(dim=1, descending=True)

    rows = jacobian_rows(model, inputs, "top", num_top=2)

    for i in range(2):
        expected = dense[torch.arange(NUM_SAMPLES), order[:, i]].sum(0)
        torch.testing.assert_close(rows[i], expected, rtol=RTOL, atol=ATOL)
    # Samples disagree on their top class, so "top" is not one class's row.
    assert order[:, 0].unique().numel() > 1


def test_row_norms_and_per_layer_parts_equal_dense():
    model, inputs, dense = _setup()
    layers = segments(model)
    summed = dense.sum(0)  # (k, p): the rows of every class

    norms = class_sensitivity(model, inputs, segments=layers)
    picked = jacobian_row_norms(model, inputs, [1], segments=layers)

    expected = summed.square().sum(1)
    torch.testing.assert_close(norms.sq_norms, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(norms.norms, expected.sqrt(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(picked.sq_norms, expected[1:2], rtol=RTOL, atol=ATOL)
    for name, s in layers.items():
        torch.testing.assert_close(
            norms.parts[name], summed[:, s].square().sum(1), rtol=RTOL, atol=ATOL
        )
    torch.testing.assert_close(
        sum(norms.parts.values()), norms.sq_norms, rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_frobenius_estimate_converges_to_the_dense_norm(kind):
    model, inputs, dense = _setup()
    layers = segments(model)
    exact = dense.square().sum()
    probes = ProbeSource(seed=4, kind=kind)

    few = jacobian_frobenius_estimate(model, inputs, probes, 16)
    many = jacobian_frobenius_estimate(
        model, inputs, probes, 2000, segments=layers, memory_budget=2**20
    )

    assert many.num_matvecs == many.num_samples == 2000
    assert abs(float(many.value - exact)) < 3 * float(many.stderr)
    assert float(many.stderr) < 0.02 * float(exact)
    assert float(many.stderr) < float(few.stderr) / 5
    for name, s in layers.items():
        part = many.parts[name]
        block = dense[..., s].square().sum()
        assert abs(float(part.value - block)) < 3 * float(part.stderr) + 1e-12


@pytest.mark.parametrize(
    ("rows", "num_top", "message"),
    [
        ([0, 3], 1, r"class indices in \[0, 3\), got \[0, 3\]"),
        ([], 1, r"non-empty class indices"),
        ("bottom", 1, r"rows must be one of \('top', 'all'\).*'bottom'"),
        ("top", 4, r"num_top must be in \[1, 3\].*got 4"),
        (torch.zeros(2, 5, 4), 1, r"= \(r, 5, 3\); got \(2, 5, 4\)"),
    ],
)
def test_invalid_rows_are_rejected(rows, num_top, message):
    model, inputs, _ = _setup()

    with pytest.raises(ValueError, match=message):
        jacobian_rows(model, inputs, rows, num_top=num_top)


def _frobenius_on_rank(rank, world_size, inputs, sizes):
    from curvlightning.core import TorchDistributed

    reducer = TorchDistributed()
    start = sum(sizes[:rank])
    model = FunctionalModel(_shared_model(), dtype=torch.float64)
    est = jacobian_frobenius_estimate(
        model,
        inputs[start : start + sizes[rank]],
        ProbeSource(seed=3, shared=True),
        6,
        offset=start,
        total=sum(sizes),
        reduce_vjp=reducer.all_reduce_sum,
    )
    return float(est.value), float(est.stderr)


def _shared_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()


@pytest.mark.distributed
def test_shared_output_probes_on_two_ranks_reproduce_one_process():
    from distributed import run_on_ranks

    inputs = torch.randn(
        12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    sizes = [5, 7]
    model = FunctionalModel(_shared_model(), dtype=torch.float64)
    single = jacobian_frobenius_estimate(
        model, inputs, ProbeSource(seed=3, shared=True), 6
    )
    results = run_on_ranks(_frobenius_on_rank, inputs, sizes, world_size=2)
    for value, stderr in results:
        assert value == pytest.approx(float(single.value), rel=1e-10)
        assert stderr == pytest.approx(float(single.stderr), rel=1e-10)
