"""Hutchinson against Hutch++ at equal matvecs.

For each spectrum and budget m, prints the mean relative error
``|estimate - trace| / |trace|`` over seeds of both estimators, both spending m
matvecs, on ``A = U diag(lambda) U^T`` with a random orthogonal ``U`` (p x p):

- ``power``: ``lambda_i = i^-2`` (a few eigenvalues carry most of the trace);
- ``exponential``: ``lambda_i = exp(-i / 10)``;
- ``flat``: ``lambda_i`` uniform in ``[1, 2]`` (nothing for the sketch to find).

Run: ``python benchmarks/hutchpp.py --seeds 50 --dim 500`` (well under a minute).
"""

from __future__ import annotations

import argparse
import time

import torch

from curvlightning.core.estimators import hutchinson_trace
from curvlightning.core.hutchpp import hutchpp_trace
from curvlightning.core.probes import ProbeSource

BUDGETS = (12, 24, 48, 96)


def spectra(dim: int) -> dict[str, torch.Tensor]:
    """The eigenvalues of the three test matrices."""
    index = torch.arange(1, dim + 1, dtype=torch.float64)
    uniform = torch.rand(dim, generator=torch.Generator().manual_seed(1))
    return {
        "power": index**-2.0,
        "exponential": torch.exp(-index / 10),
        "flat": 1 + uniform.to(torch.float64),
    }


def random_symmetric(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    """``U diag(eigenvalues) U^T`` with a random orthogonal ``U``."""
    gen = torch.Generator().manual_seed(seed)
    dim = eigenvalues.numel()
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return (basis.Q * eigenvalues) @ basis.Q.T


def mean_relative_errors(
    matrix: torch.Tensor, budget: int, seeds: int
) -> tuple[float, float]:
    """Mean relative error of Hutchinson and of Hutch++ over ``seeds`` seeds."""
    trace = float(torch.trace(matrix))
    dim = matrix.shape[0]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return matrix @ v

    errors = torch.zeros(2, seeds, dtype=torch.float64)
    for seed in range(seeds):
        probes = ProbeSource(seed=seed)
        kwargs = {"dtype": torch.float64}
        plain = hutchinson_trace(matvec, dim, probes, budget, **kwargs).item()
        sketched = hutchpp_trace(matvec, dim, probes, budget, **kwargs).item()
        errors[0, seed] = abs(plain - trace) / abs(trace)
        errors[1, seed] = abs(sketched - trace) / abs(trace)
    mean = errors.mean(dim=1)
    return float(mean[0]), float(mean[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50, help="seeds per cell")
    parser.add_argument("--dim", type=int, default=500, help="matrix dimension p")
    args = parser.parse_args()

    start = time.perf_counter()
    print(f"mean relative error over {args.seeds} seeds, p = {args.dim}")
    header = f"{'spectrum':<12}{'matvecs':>8}{'Hutchinson':>12}{'Hutch++':>10}"
    print(header + f"{'ratio':>8}")
    for name, eigenvalues in spectra(args.dim).items():
        matrix = random_symmetric(eigenvalues, seed=0)
        for budget in BUDGETS:
            plain, sketched = mean_relative_errors(matrix, budget, args.seeds)
            row = f"{name:<12}{budget:>8}{plain:>12.4f}{sketched:>10.4f}"
            print(row + f"{sketched / plain:>8.2f}")
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
