"""Second-order products through F.scaled_dot_product_attention on CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlightning.core.functional import FunctionalModel
from curvlightning.core.ggn import GGNOperator
from curvlightning.core.operators import HessianOperator
from curvlightning.core.products import BatchedHessianOperator, curvature_sdpa

DT = torch.float64
VOCAB, D_MODEL, HEADS, SEQ = 7, 8, 2, 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors gain nothing from a thread pool, which only waits for cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def explicit_attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def fused_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def pinned_flash_attention(q, k, v):
    # A model that chooses the fused kernel itself, overriding curvature_sdpa().
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


ATTENTION = {
    "explicit": explicit_attention,
    "sdpa": fused_attention,
    "flash": pinned_flash_attention,
}


class Block(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention
        self.norm1, self.norm2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.qkv, self.proj = (
            nn.Linear(D_MODEL, 3 * D_MODEL),
            nn.Linear(D_MODEL, D_MODEL),
        )
        self.mlp = nn.Sequential(
            nn.Linear(D_MODEL, 2 * D_MODEL), nn.GELU(), nn.Linear(2 * D_MODEL, D_MODEL)
        )

    def forward(self, x):
        n, t, _ = x.shape
        heads = self.qkv(self.norm1(x)).reshape(n, t, 3, HEADS, D_MODEL // HEADS)
        q, k, v = heads.permute(2, 0, 3, 1, 4)
        attended = self.attention(q, k, v).transpose(1, 2).reshape(n, t, D_MODEL)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Two pre-norm causal blocks; logits of shape (N * SEQ, VOCAB)."""

    def __init__(self, attention: str):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.position = nn.Parameter(0.1 * torch.randn(SEQ, D_MODEL))
        self.blocks = nn.Sequential(*[Block(ATTENTION[attention]) for _ in range(2)])
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, tokens):
        hidden = self.blocks(self.embed(tokens) + self.position)
        return self.head(hidden).reshape(-1, VOCAB)


def next_token_loss(logits, targets):
    return F.cross_entropy(logits, targets.reshape(-1))


@pytest.fixture(scope="module")
def twins():
    torch.manual_seed(0)
    nets = {name: TinyTransformer(name).to(DT) for name in ATTENTION}
    for net in nets.values():
        net.load_state_dict(nets["explicit"].state_dict())
    tokens = torch.randint(0, VOCAB, (3, SEQ))
    targets = torch.randint(0, VOCAB, (3, SEQ))
    models = {n: FunctionalModel(m, loss=next_token_loss) for n, m in nets.items()}
    probes = torch.randn(3, models["sdpa"].num_params, dtype=DT)
    return models, tokens, targets, probes


def assert_products_close(actual, expected, rtol=1e-5):
    atol = rtol * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["double_backward", "forward_over_reverse"])
def test_sdpa_products_equal_explicit_attention(twins, backend):
    models, tokens, targets, probes = twins
    fused = BatchedHessianOperator(models["sdpa"], tokens, targets, backend)
    explicit = BatchedHessianOperator(models["explicit"], tokens, targets, backend)
    reference = explicit.matmat(probes)
    assert_products_close(fused.matmat(probes), reference)
    assert float(reference.norm()) > 0


def test_curvature_sdpa_makes_the_plain_operator_work(twins):
    models, tokens, targets, probes = twins
    expected = HessianOperator(models["explicit"], tokens, targets)(probes[0])
    with curvature_sdpa():
        operator = HessianOperator(models["sdpa"], tokens, targets)
        product = operator(probes[0])
    assert_products_close(product, expected)


def test_ggn_through_sdpa_equals_explicit_attention(twins):
    models, tokens, targets, probes = twins
    fused = GGNOperator(models["sdpa"], tokens, targets.reshape(-1))
    explicit = GGNOperator(models["explicit"], tokens, targets.reshape(-1))
    assert_products_close(fused.matmat(probes), explicit.matmat(probes))


def test_pinned_fused_kernel_error_names_the_op(twins):
    models, tokens, targets, probes = twins
    operator = BatchedHessianOperator(models["flash"], tokens, targets)
    with pytest.raises(RuntimeError) as caught:
        operator.matmat(probes[:1])
    message = str(caught.value)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in message
    assert 'backend="finite_difference"' in message
    assert "curvature_sdpa()" in message


def test_finite_difference_through_the_pinned_fused_kernel(twins):
    models, tokens, targets, probes = twins
    exact = BatchedHessianOperator(models["explicit"], tokens, targets)(probes[0])
    operator = BatchedHessianOperator(
        models["flash"], tokens, targets, "finite_difference"
    )
    assert_products_close(operator(probes[0]), exact, rtol=1e-6)
