"""Fisher diagonals in units of one gradient: sums of squares, vmap and BackPACK.

An MLP 64-256-256-10 with cross-entropy on a batch of 512, on one CPU thread by
default. Each method's median time is divided by the median time of one gradient
(forward and backward of the mean loss) measured in the same process, so the ratios
survive a noisy machine better than the times. The clock is the process' CPU time
by default (``--clock wall`` for wall time): on a shared machine it does not count
the time the process waits for a core. The functional model does not pin the RNG
(the MLP has no dropout), for the sums of squares and vmap alike. Values are
compared with the vmap reference as ``max |a - ref| / max |ref|`` over the
diagonal; for the Monte-Carlo Fisher, BackPACK samples its own labels, so only its
trace is comparable, and only up to sampling noise.

Usage: ``python benchmarks/fisher.py [--batch 512] [--repeats 20] [--quick]``.
BackPACK (``backpack-for-pytorch``) is optional; without it its rows read
"not installed".
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlightning.core import (
    FunctionalModel,
    ProbeSource,
    fisher_diagonal,
    get_likelihood,
)
from curvlightning.core.sumsq import fisher_sumsq

CATEGORICAL = get_likelihood("categorical")
TARGET_GRADIENTS = 1.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="batch 64, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 64, 2
    return args


def make_problem(batch: int, seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    inputs = torch.randn(batch, 64)
    targets = torch.randint(0, 10, (batch,))
    return model, inputs, targets


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def median_time(
    fn: Callable[[], object], repeats: int, clock: str, cap_s: float = 3.0
) -> float:
    """Median of up to ``repeats`` runs after a warm-up, 3 at least, about ``cap_s``."""
    now = CLOCKS[clock]
    fn()  # warm-up
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < cap_s):
        start = now()
        fn()
        times.append(now() - start)
    return statistics.median(times)


def gradient_fn(model: nn.Module, inputs: Tensor, targets: Tensor) -> Callable:
    params = list(model.parameters())

    def run() -> tuple[Tensor, ...]:
        loss = F.cross_entropy(model(inputs), targets)
        return torch.autograd.grad(loss, params)

    return run


def curvlightning_fns(
    model: nn.Module, inputs: Tensor, targets: Tensor, seed: int
) -> dict[str, Callable[[], Tensor]]:
    functional = FunctionalModel(model, rng_seed=None)
    probes = ProbeSource(seed=seed)

    def call(fn: Callable, kind: str, **options: object) -> Callable[[], Tensor]:
        def run() -> Tensor:
            args = (functional, inputs, targets, CATEGORICAL, kind)
            return fn(*args, probes=probes, **options).value

        return run

    return {
        "empirical/sumsq": call(fisher_sumsq, "empirical"),
        "empirical/sumsq, no coordinate stderr": call(
            fisher_sumsq, "empirical", coordinate_stderr=False
        ),
        "empirical/vmap": call(fisher_diagonal, "empirical", method="vmap"),
        "mc/sumsq": call(fisher_sumsq, "mc"),
        "mc/sumsq, no coordinate stderr": call(
            fisher_sumsq, "mc", coordinate_stderr=False
        ),
        "mc/vmap": call(fisher_diagonal, "mc", method="vmap"),
    }


def backpack_fns(
    model: nn.Module, inputs: Tensor, targets: Tensor
) -> dict[str, Callable[[], Tensor]] | None:
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNMC, SumGradSquared
    except ImportError:
        return None
    # A copy: BackPACK's hooks would break torch.func transforms on the original.
    extended = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss())
    batch = inputs.shape[0]

    def run(extension: object, attribute: str, scale: float) -> Tensor:
        with backpack(extension):
            loss = loss_fn(extended(inputs), targets)
            loss.backward()
        out = torch.cat(
            [getattr(p, attribute).reshape(-1) for p in extended.parameters()]
        )
        extended.zero_grad(set_to_none=True)
        return scale * out

    # SumGradSquared on a mean loss sums (g_n / N)^2; the empirical Fisher is
    # (1/N) sum_n g_n^2, so multiply by N. DiagGGNMC is the MC Fisher of the mean.
    return {
        "empirical/backpack SumGradSquared": lambda: run(
            SumGradSquared(), "sum_grad_squared", float(batch)
        ),
        "mc/backpack DiagGGNMC": lambda: run(DiagGGNMC(), "diag_ggn_mc", 1.0),
    }


def relative_difference(value: Tensor, reference: Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max())


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    # BackPACK's hooks warn that they fire on outputs when no input needs a grad.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    model, inputs, targets = make_problem(args.batch, args.seed)
    num_params = sum(p.numel() for p in model.parameters())
    gradient = median_time(
        gradient_fn(model, inputs, targets), args.repeats, args.clock
    )
    fns = curvlightning_fns(model, inputs, targets, args.seed)
    anchors = backpack_fns(model, inputs, targets)
    print(
        f"MLP 64-256-256-10 (p = {num_params}), batch {args.batch}, "
        f"{args.threads} thread(s), median {args.clock} time of up to "
        f"{args.repeats} runs; "
        "one gradient = "
        f"{gradient * 1e3:.1f} ms"
    )
    header = ("method", "ms", "gradients", "max rel diff", "trace rel diff")
    print("{:<40} {:>8} {:>10} {:>13} {:>15}".format(*header))
    references = {}
    for name in ["empirical/vmap", "mc/vmap"]:
        references[name.split("/")[0]] = fns[name]()
    rows = list(fns.items()) + list((anchors or {}).items())
    for name, fn in rows:
        seconds = median_time(fn, args.repeats, args.clock)
        reference = references[name.split("/")[0]]
        value = fn()
        trace = abs(float(value.sum() / reference.sum()) - 1.0)
        print(
            f"{name:<40} {seconds * 1e3:8.1f} {seconds / gradient:10.2f} "
            f"{relative_difference(value, reference):13.2e} {trace:15.2e}"
        )
    if anchors is None:
        for name in ["empirical/backpack SumGradSquared", "mc/backpack DiagGGNMC"]:
            print(f"{name:<40} {'not installed':>8}")
    print(
        f"target: the sums-of-squares path at most {TARGET_GRADIENTS} gradients; "
        "timings on a shared machine are noisy"
    )


if __name__ == "__main__":
    main()
