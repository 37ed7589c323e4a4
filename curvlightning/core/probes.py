"""Seeded random probe vectors.

A *probe* is a random vector ``v`` with ``E[v v^T] = I``. Probes are drawn from a
generator seeded by ``(seed, step, rank)``, so every estimate is reproducible and the
ranks of a distributed run draw independent probes; with ``shared=True`` the rank is
left out of the seed and all ranks draw the same probes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ProbeSource", "mix_seed"]

_KINDS = ("rademacher", "gaussian")


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from any number of integers or strings.

    Nearby inputs (``(0, 1)`` and ``(1, 0)``) give unrelated seeds.
    """
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1


@dataclass(frozen=True)
class ProbeSource:
    """Draws probes of a fixed dimension, reproducibly.

    Args:
        seed: The user's seed.
        step: The training step the estimate belongs to.
        rank: The rank drawing the probes.
        shared: If true, all ranks draw the same probes (the rank is not mixed in).
        kind: ``"rademacher"`` (entries +-1, minimal variance for the trace of a
            matrix with a heavy diagonal) or ``"gaussian"`` (standard normal).
        stream: A name that separates independent uses at the same step.
    """

    seed: int = 0
    step: int = 0
    rank: int = 0
    shared: bool = False
    kind: str = "rademacher"
    stream: str = "probes"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator at the start of this source's stream."""
        rank = "shared" if self.shared else self.rank
        gen = torch.Generator(device=device)
        gen.manual_seed(mix_seed(self.seed, self.step, rank, self.stream))
        return gen

    def draw(
        self,
        num_probes: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``num_probes`` probes of dimension ``dim``.

        Returns:
            A tensor of shape ``(num_probes, dim)``.
        """
        gen = generator or self.generator("cpu")
        if self.kind == "gaussian":
            out = torch.randn(num_probes, dim, generator=gen, dtype=dtype)
        else:
            bits = torch.randint(0, 2, (num_probes, dim), generator=gen)
            out = bits.to(dtype).mul_(2).sub_(1)
        return out.to(device)
