"""The gradient as one VJP against forming the Jacobian and multiplying.

For an MLP ``64 -> h -> k`` (tanh) whose hidden width h is chosen to hit a target
parameter count p, the gradient of the cross-entropy on a batch of B inputs is
computed three ways:

- ``vjp``: one backward pass, ``(dl/dz)^T J`` without forming J;
- ``loop``: J (``B k x p``) formed row by row with ``B k`` backward passes, then
  ``J^T (dl/dz)``;
- ``jacrev``: J formed by ``torch.func.jacrev`` (the rows vmapped), then the same
  product.

Time (median over repeats of short runs, one run of long ones) and peak memory
(the growth of the resident set above its level before the run, from ``VmHWM``
after resetting it through ``/proc/self/clear_refs``; Linux only, else "n/a") go
to a table, a CSV file and a PNG plot in ``--out``. Sizes whose predicted memory
exceeds ``--budget-gib`` are reported as "would need N GiB" and not run. The
three gradients are checked against each other. Timings on a shared machine are
noisy.

Usage: ``python benchmarks/jacobian.py [--out DIR] [--budget-gib 8] [--quick]``.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

D_IN, ITEMSIZE = 64, 4
GIB = 2**30
METHODS = ("vjp", "loop", "jacrev")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--ps", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("jacobian-benchmark"))
    parser.add_argument("--quick", action="store_true", help="k=10, p<=1e5")
    args = parser.parse_args()
    if args.quick:
        args.ks, args.ps, args.repeats = [10], [1e4, 1e5], 1
    return args


# ------------------------------------------------------------------- the problem
def make_model(target_p: float, k: int) -> nn.Module:
    """``64 -> h -> k``: ``p = h (65 + k) + k``, as near the target as h allows."""
    hidden = max(1, round((target_p - k) / (D_IN + 1 + k)))
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, hidden), nn.Tanh(), nn.Linear(hidden, k))


def gradient_by_vjp(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    return torch.cat([g.reshape(-1) for g in grads])


def gradient_by_loop(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    params = list(model.parameters())
    outputs = model(x)
    flat = outputs.reshape(-1)
    jac = torch.empty(flat.numel(), sum(p.numel() for p in params))
    for i in range(flat.numel()):
        row = torch.autograd.grad(flat[i], params, retain_graph=True)
        torch.cat([g.reshape(-1) for g in row], out=jac[i])
    return jac.T @ _output_gradient(outputs, y)


def gradient_by_jacrev(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    params = {name: p.detach() for name, p in model.named_parameters()}

    def outputs_of(theta: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(model, theta, (x,))

    pieces = torch.func.jacrev(outputs_of)(params)
    rows = x.shape[0] * pieces[next(iter(pieces))].shape[1]
    jac = torch.cat([pieces[name].reshape(rows, -1) for name in params], dim=1)
    del pieces
    return jac.T @ _output_gradient(model(x), y)


def _output_gradient(outputs: Tensor, y: Tensor) -> Tensor:
    """``dl/dz`` of the mean cross-entropy, flattened to ``(B k,)``."""
    z = outputs.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(z, y), z)
    return grad.reshape(-1)


FUNCTIONS: dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]] = {
    "vjp": gradient_by_vjp,
    "loop": gradient_by_loop,
    "jacrev": gradient_by_jacrev,
}


def predicted_bytes(method: str, num_params: int, rows: int) -> int:
    """Parameters, gradient and (for the dense methods) J and its copies."""
    base = 3 * num_params * ITEMSIZE
    if method == "vjp":
        return base
    copies = 1 if method == "loop" else 2  # jacrev: the pieces and their concat
    return base + copies * rows * num_params * ITEMSIZE


# ---------------------------------------------------------------- measurement
def release_large_allocations() -> None:
    """Serve every allocation over 1 MiB by mmap, returned to the OS when freed.

    Without it glibc raises its mmap threshold after the first large free and
    keeps freed memory in the heap, and the resident set no longer tracks the
    live tensors.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(fn: Callable[[], Tensor], repeats: int) -> tuple[float, float, Tensor]:
    """Median seconds, peak growth of the resident set (bytes, NaN if unknown)."""
    gc.collect()
    can_peak = _reset_peak()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    times = [time.perf_counter() - start]
    peak = _status_kib("VmHWM")
    growth = (
        (peak - before) * 1024.0
        if can_peak and None not in (peak, before)
        else math.nan
    )
    while times[0] < 0.5 and len(times) < repeats:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), growth, result


# -------------------------------------------------------------------- the table
def warm_up(batch: int) -> None:
    """Run every method once on a tiny model: first calls pay for dispatch setup."""
    x = torch.randn(batch, D_IN)
    y = torch.zeros(batch, dtype=torch.long)
    for fn in FUNCTIONS.values():
        fn(make_model(1e3, 3), x, y)


def run_case(k: int, target_p: float, args: argparse.Namespace) -> list[dict]:
    model = make_model(target_p, k)
    num_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, D_IN, generator=gen)
    y = torch.randint(0, k, (args.batch,), generator=gen)
    rows_j = args.batch * k
    out, reference = [], None
    for method in METHODS:
        need = predicted_bytes(method, num_params, rows_j)
        row = {"k": k, "p": num_params, "method": method, "predicted_gib": need / GIB}
        if need > args.budget_gib * GIB:
            out.append({**row, "status": f"would need {need / GIB:.1f} GiB"})
            continue
        seconds, peak, grad = measure(
            lambda m=method: FUNCTIONS[m](model, x, y), args.repeats
        )
        if reference is None:
            reference = grad
        error = float((grad - reference).abs().max() / reference.abs().max())
        out.append(
            {
                **row,
                "status": "ran",
                "seconds": seconds,
                "peak_gib": peak / GIB,
                "rel_diff": error,
            }
        )
        del grad
    return out


def print_row(row: dict) -> None:
    head = f"{row['k']:>5} {row['p']:>9} {row['method']:>7}"
    if row["status"] != "ran":
        print(f"{head} {row['status']}")
        return
    print(
        f"{head} {row['seconds'] * 1e3:11.2f} {row['peak_gib'] * 1024:11.1f} "
        f"{row['predicted_gib'] * 1024:11.1f} {row['rel_diff']:9.1e}"
    )


def save(rows: list[dict], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fields = [
        "k",
        "p",
        "method",
        "status",
        "seconds",
        "peak_gib",
        "predicted_gib",
        "rel_diff",
    ]
    with open(folder / "jacobian.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, folder / "jacobian.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    styles = {"vjp": "-o", "loop": "--s", "jacrev": ":^"}
    ks = sorted({r["k"] for r in rows})
    colors = {
        k: plt.cm.viridis(0.1 + 0.75 * i / max(1, len(ks) - 1))
        for i, k in enumerate(ks)
    }
    for (k, method), group in _groups(rows).items():
        ran = [r for r in group if r["status"] == "ran"]
        if not ran:
            continue
        ps = [r["p"] for r in ran]
        label = f"{method}, k={k}"
        style = dict(color=colors[k], label=label)
        ax_time.plot(ps, [r["seconds"] for r in ran], styles[method], **style)
        ax_mem.plot(
            ps, [max(r["peak_gib"], 1e-4) for r in ran], styles[method], **style
        )
    for ax, name in (
        (ax_time, "time (s)"),
        (ax_mem, "peak memory growth (GiB, floor 1e-4)"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters p")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax_time.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle("gradient: one VJP against forming J (k backward passes, jacrev)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _groups(rows: list[dict]) -> dict[tuple[int, str], list[dict]]:
    out: dict[tuple[int, str], list[dict]] = {}
    for row in rows:
        out.setdefault((row["k"], row["method"]), []).append(row)
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    release_large_allocations()
    warm_up(args.batch)
    print(
        f"batch {args.batch}, {args.threads} thread(s), budget {args.budget_gib} GiB; "
        "times on a shared machine are noisy"
    )
    print(
        f"{'k':>5} {'p':>9} {'method':>7} {'time ms':>11} {'peak MiB':>11} "
        f"{'pred. MiB':>11} {'rel diff':>9}"
    )
    rows = []
    for k in args.ks:
        for target_p in args.ps:
            for row in run_case(k, target_p, args):
                print_row(row)
                rows.append(row)
    save(rows, args.out)
    print(f"wrote {args.out / 'jacobian.csv'} and {args.out / 'jacobian.png'}")


if __name__ == "__main__":
    main()
