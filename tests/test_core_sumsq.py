"""Sums of squared per-sample gradients against vmap, and the Fisher through them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distributed import run_on_ranks
from helpers import DTYPE, classification_batch, tiny_mlp
from torch import Tensor, nn

from curvlightning.core import (
    FunctionalModel,
    ProbeSource,
    TorchDistributed,
    fisher_diagonal,
    get_likelihood,
    per_sample_gradients,
)
from curvlightning.core.gradients import (
    noise_scale_across_ranks,
    noise_scale_from_gradients,
)
from curvlightning.core.sumsq import (
    fisher_sumsq,
    gradient_power_sums,
    sum_of_squared_gradients,
)

RTOL, ATOL = 1e-6, 1e-14
NUM_SAMPLES, NUM_CLASSES = 8, 3


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


class _Twice(nn.Module):
    """One linear layer called twice: its gradient is a sum of two outer products."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class _Sequence(nn.Module):
    """A linear layer on ``(N, T, d)`` inputs, then a mean over T."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 5)
        self.head = nn.Linear(5, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.proj(x.reshape(x.shape[0], 2, 2))).mean(1))


def _module(name: str) -> nn.Module:
    torch.manual_seed(0)
    modules = {
        "linear": lambda: nn.Linear(4, NUM_CLASSES),
        "mlp_inplace_relu": lambda: nn.Sequential(
            nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, NUM_CLASSES)
        ),
        "conv": lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2),
            nn.Flatten(),
            nn.Linear(36, NUM_CLASSES),
        ),
        "mlp_layernorm": lambda: nn.Sequential(
            nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, NUM_CLASSES)
        ),
        "linear_twice": _Twice,
        "linear_sequence": _Sequence,
    }
    return modules[name]().to(DTYPE).train()


FALLBACK = {
    "linear": (),
    "mlp_inplace_relu": (),
    "conv": (),
    "mlp_layernorm": ("1.weight", "1.bias"),
    "linear_twice": ("inner.weight", "inner.bias"),
    "linear_sequence": ("proj.weight", "proj.bias"),
}


def _batch(name: str) -> tuple[Tensor, Tensor]:
    inputs, targets = classification_batch(0, NUM_SAMPLES)
    if name == "conv":
        gen = torch.Generator().manual_seed(1)
        inputs = torch.randn(NUM_SAMPLES, 2, 6, 6, generator=gen, dtype=DTYPE)
    return inputs, targets


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", list(FALLBACK))
def test_sums_equal_squared_vmap_per_sample_gradients(name, reduction):
    module = _module(name)
    inputs, targets = _batch(name)
    model = FunctionalModel(module)
    grads = per_sample_gradients(model, inputs, targets, _cross_entropy)
    if reduction == "mean":
        # The batch loss is (1/N) sum_n l_n: each sample's term is l_n / N.
        grads = grads / NUM_SAMPLES

    sums = gradient_power_sums(
        model, inputs, targets, _cross_entropy, reduction=reduction
    )
    squares, fourth = sum_of_squared_gradients(
        module,
        inputs,
        targets,
        _cross_entropy,
        reduction=reduction,
        fourth_powers=True,
        memory_budget=2**14,  # several Conv2d and fallback chunks
    )

    expected = (grads**2).sum(0)
    torch.testing.assert_close(sums.squares, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(squares, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(fourth, (grads**4).sum(0), rtol=RTOL, atol=ATOL)
    norms = torch.stack(
        [g.reshape(NUM_SAMPLES, -1).square().sum(1) for g in _split(grads, model)],
        dim=1,
    )
    torch.testing.assert_close(sums.sample_sq_norms, norms, rtol=RTOL, atol=ATOL)
    assert sums.fallback == FALLBACK[name]


def _split(grads: Tensor, model: FunctionalModel) -> tuple[Tensor, ...]:
    return torch.split(grads, [p.numel() for p in model.params], dim=1)


def test_mean_reduction_carries_one_over_n_squared():
    module = _module("mlp_layernorm")
    inputs, targets = _batch("mlp_layernorm")

    total = sum_of_squared_gradients(module, inputs, targets, _cross_entropy)
    mean = sum_of_squared_gradients(
        module, inputs, targets, _cross_entropy, reduction="mean"
    )

    torch.testing.assert_close(mean * NUM_SAMPLES**2, total, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match=r"reduction must be one of.*'none'"):
        sum_of_squared_gradients(
            module, inputs, targets, _cross_entropy, reduction="none"
        )


def _hook_counts(module: nn.Module) -> list[tuple[int, int, int]]:
    return [
        (len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks))
        for m in module.modules()
    ]


@pytest.mark.parametrize("fails", [False, True])
def test_module_grads_and_hooks_are_left_as_found(fails):
    module = _module("mlp_layernorm")
    inputs, targets = _batch("mlp_layernorm")
    module[0].register_forward_hook(lambda m, a, o: None)  # the user's own hook
    for p in module.parameters():
        p.grad = torch.full_like(p, 7.0)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    hooks = _hook_counts(module)

    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return (
            _cross_entropy(outputs, targets)[:-1]
            if fails
            else _cross_entropy(outputs, targets)
        )

    if fails:
        with pytest.raises(ValueError, match=r"one loss per sample, shape \(8,\)"):
            sum_of_squared_gradients(module, inputs, targets, loss)
    else:
        sum_of_squared_gradients(module, inputs, targets, loss)

    assert _hook_counts(module) == hooks
    assert len(module[0]._forward_hooks) == 1
    assert all(len(m._forward_hooks) == 0 for m in list(module)[1:])
    for p in module.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key])


def test_batch_norm_in_training_mode_is_rejected():
    module = tiny_mlp(0, batch_norm=True)
    inputs, targets = classification_batch(0)

    with pytest.raises(ValueError, match="BatchNorm1d in training mode"):
        sum_of_squared_gradients(module, inputs, targets, _cross_entropy)


# ---------------------------------------------------------------------- Fisher
LIKELIHOOD_TARGETS = {
    "categorical": lambda gen: torch.randint(0, NUM_CLASSES, (8,), generator=gen),
    "gaussian": lambda gen: torch.randn(8, NUM_CLASSES, generator=gen, dtype=DTYPE),
    "bernoulli": lambda gen: torch.rand(8, NUM_CLASSES, generator=gen, dtype=DTYPE),
}
LAYERS = {"0": slice(0, 30), "1": slice(30, 42), "3": slice(42, 63)}


@pytest.mark.parametrize(("kind", "mc_samples"), [("empirical", 1), ("mc", 3)])
@pytest.mark.parametrize("likelihood", list(LIKELIHOOD_TARGETS))
def test_fisher_sumsq_equals_fisher_diagonal(likelihood, kind, mc_samples):
    module = _module("mlp_layernorm")
    inputs, _ = _batch("mlp_layernorm")
    targets = LIKELIHOOD_TARGETS[likelihood](torch.Generator().manual_seed(2))
    model = FunctionalModel(module)
    args = (model, inputs, targets, get_likelihood(likelihood), kind)
    options = {"mc_samples": mc_samples, "probes": ProbeSource(seed=5, step=1)}

    expected = fisher_diagonal(*args, segments=LAYERS, **options)
    actual = fisher_sumsq(*args, segments=LAYERS, **options)

    for got, want in [(actual, expected)] + [
        (actual.parts[n], expected.parts[n]) for n in LAYERS
    ]:
        torch.testing.assert_close(got.value, want.value, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(got.stderr, want.stderr, rtol=RTOL, atol=ATOL)
        assert got.num_samples == want.num_samples == NUM_SAMPLES
    assert float(actual.parts["3"].value) > 0.01


def test_fisher_sumsq_without_coordinate_stderr_keeps_values_and_segments():
    module = _module("mlp_layernorm")
    inputs, targets = _batch("mlp_layernorm")
    args = (module, inputs, targets, get_likelihood("categorical"), "mc")

    full = fisher_sumsq(*args, segments=LAYERS)
    cheap = fisher_sumsq(*args, segments=LAYERS, coordinate_stderr=False)

    torch.testing.assert_close(cheap.value, full.value, rtol=RTOL, atol=ATOL)
    assert torch.isnan(cheap.stderr).all() and torch.isfinite(full.stderr).all()
    for name in LAYERS:
        torch.testing.assert_close(cheap.parts[name].stderr, full.parts[name].stderr)


def test_fisher_sumsq_rejects_gnb_and_cut_parameters():
    module = _module("mlp_layernorm")
    inputs, targets = _batch("mlp_layernorm")
    args = (module, inputs, targets, get_likelihood("categorical"))

    with pytest.raises(ValueError, match="got kind='gnb'.*fisher_diagonal"):
        fisher_sumsq(*args, "gnb")
    with pytest.raises(ValueError, match=r"segments\['half'\].*cuts parameter"):
        fisher_sumsq(*args, segments={"half": slice(0, 12)})


# ------------------------------------------------------- two ranks against one
def _on_rank(rank: int, world_size: int, inputs, targets, grads, sizes):
    reducer = TorchDistributed()
    rows = slice(0, 5) if rank == 0 else slice(5, None)
    module = _module("mlp_layernorm")
    estimate = fisher_sumsq(
        module,
        inputs[rows],
        targets[rows],
        get_likelihood("categorical"),
        "mc",
        mc_samples=2,
        probes=ProbeSource(seed=5, rank=rank, shared=True),
        reducer=reducer,
        segments=LAYERS,
    )
    noise = noise_scale_across_ranks(grads[rank], sizes[rank], reducer)
    return (
        estimate.value,
        estimate.stderr,
        estimate.parts["1"].stderr,
        float(noise.sq_norm),
        float(noise.trace_sigma),
    )


@pytest.mark.distributed
def test_two_ranks_reproduce_one_process():
    module = _module("mlp_layernorm")
    inputs, targets = _batch("mlp_layernorm")
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(7, generator=gen, dtype=DTYPE) for _ in range(2)]
    sizes = [5, 3]
    fisher = fisher_sumsq(
        module,
        inputs,
        targets,
        get_likelihood("categorical"),
        "mc",
        mc_samples=2,
        probes=ProbeSource(seed=5, shared=True),
        segments=LAYERS,
    )
    noise = noise_scale_from_gradients(grads, sizes)

    results = run_on_ranks(_on_rank, inputs, targets, grads, sizes, world_size=2)

    for value, stderr, part_stderr, sq_norm, trace in results:
        torch.testing.assert_close(value, fisher.value, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(stderr, fisher.stderr, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(part_stderr, fisher.parts["1"].stderr)
        assert sq_norm == pytest.approx(float(noise.sq_norm), rel=1e-12)
        assert trace == pytest.approx(float(noise.trace_sigma), rel=1e-12)
