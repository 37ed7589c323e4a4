"""Hessian trace: time per probe and peak memory, curvlightning against the anchors.

Every method estimates a trace with Hutchinson's estimator on the same model and
batch, in one process: curvlightning's Hessian-vector products (double backward
with the gradient graph reused, batched double backward, vmapped and sequential
forward-over-reverse, finite differences), its Gauss-Newton trace (parameter-space
probes and output-space sampling), PyHessian's ``trace``, curvlinops'
``HessianLinearOperator`` and BackPACK's block-diagonal ``HMP`` (exact
``DiagHessian``/``DiagGGNExact`` traces as references). Times are medians over
interleaved repeats, divided by the median time of one gradient (forward and
backward of the mean loss) and by the number of probes. Peak memory is measured
per method in a fresh subprocess (see ``benchmarks/README.md``).

Usage: ``python benchmarks/hessian.py [--models mlp cnn transformer]
[--num-probes 16] [--repeats 5] [--threads 1] [--no-memory]``. Anchors that are not
installed appear as "not installed" rows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlightning.core import (
    FunctionalModel,
    HessianOperator,
    ProbeSource,
    get_likelihood,
)
from curvlightning.core.estimators import mean_and_stderr
from curvlightning.core.functional import unflatten
from curvlightning.core.ggn import GGNOperator, ggn_trace_output_sampling
from curvlightning.core.products import (
    BatchedHessianOperator,
    FiniteDifferenceHessianOperator,
    curvature_sdpa,
)
from curvlightning.core.quadform import SequentialQuadraticForm

MODELS = ("mlp", "cnn", "transformer")
TARGET_GRADIENTS = 1.5


# ----------------------------------------------------------------------------------
# Problems


CATEGORICAL = get_likelihood("categorical")


@dataclass
class Problem:
    name: str
    net: nn.Module
    inputs: Tensor
    targets: Tensor
    description: str
    sequential: bool  # BackPACK needs an nn.Sequential of layers it knows
    attention: bool = False
    params: list[Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.params = [p for p in self.net.parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def second_order(self) -> contextlib.AbstractContextManager:
        """The math SDPA kernel for second-order autodiff through attention."""
        return curvature_sdpa() if self.attention else contextlib.nullcontext()


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A causal two-block transformer; logits of shape ``(N * T, vocab)``."""

    def __init__(self, vocab: int, width: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(seq, width))
        self.blocks = nn.Sequential(Block(width, heads), Block(width, heads))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.blocks(self.embed(tokens) + self.position)
        return self.head(hidden).reshape(-1, self.head.out_features)


def make_problem(name: str, seed: int) -> Problem:
    torch.manual_seed(seed)
    if name == "mlp":
        net = nn.Sequential(
            nn.Linear(64, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
        x, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
        return Problem(name, net, x, y, "MLP 64-256-256-10, batch 512", True)
    if name == "cnn":
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 8 * 8, 10),
        )
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        text = "CNN conv8-conv16-linear on 3x32x32, batch 64"
        return Problem(name, net, x, y, text, True)
    net = Transformer(vocab=32, width=32, heads=4, seq=32)
    x, y = torch.randint(0, 32, (16, 32)), torch.randint(0, 32, (16 * 32,))
    text = "transformer 2 blocks, width 32, 4 heads, seq 32, vocab 32, batch 16"
    return Problem(name, net, x, y, text, False, attention=True)


# ----------------------------------------------------------------------------------
# Methods: each ``setup(problem, probes, seed)`` does the untimed preparation and
# returns the timed estimate, a function returning per-probe terms (or one exact
# value, as a tensor of one element with ``exact=True``).


@dataclass
class Method:
    name: str
    quantity: str
    setup: Callable[[Problem, Tensor, int], Callable[[], Tensor]]
    anchor: str | None = None  # module to import; a missing one gives a row saying so
    exact: bool = False
    per_probe: bool = True


class NotApplicable(Exception):
    """The method does not apply to this model."""


def functional(problem: Problem) -> FunctionalModel:
    return FunctionalModel(problem.net, loss=F.cross_entropy)


def quadratic_forms(probes: Tensor, products: Tensor) -> Tensor:
    return (probes * products).sum(dim=1)


def hessian_operator(backend: str):
    def setup(problem: Problem, probes: Tensor, seed: int) -> Callable[[], Tensor]:
        model = functional(problem)

        def run() -> Tensor:
            with problem.second_order():
                op = HessianOperator(model, problem.inputs, problem.targets, backend)
                return torch.stack([v @ op(v) for v in probes])

        return run

    return setup


def batched_operator(backend: str, chunk_size: int | None = None):
    def setup(problem: Problem, probes: Tensor, seed: int) -> Callable[[], Tensor]:
        model = functional(problem)
        chunk = chunk_size or probes.shape[0]

        def run() -> Tensor:
            op = BatchedHessianOperator(
                model, problem.inputs, problem.targets, backend, chunk_size=chunk
            )
            return quadratic_forms(probes, op.matmat(probes))

        return run

    return setup


def finite_difference(problem: Problem, probes: Tensor, seed: int):
    model = functional(problem)

    def run() -> Tensor:
        op = FiniteDifferenceHessianOperator(model, problem.inputs, problem.targets)
        return quadratic_forms(probes, op.matmat(probes))

    return run


def sequential_forms(problem: Problem, probes: Tensor, seed: int):
    """Exact v^T H v from second-order tangents (sequential MLPs only)."""
    try:
        SequentialQuadraticForm(
            problem.net, problem.inputs[:2], problem.targets[:2], CATEGORICAL
        )
    except TypeError as why:
        raise NotApplicable(str(why)) from why

    def run() -> Tensor:
        form = SequentialQuadraticForm(
            problem.net, problem.inputs, problem.targets, CATEGORICAL
        )
        return torch.stack([form(v) for v in probes])

    return run


def ggn_hutchinson(problem: Problem, probes: Tensor, seed: int):
    model = functional(problem)

    def run() -> Tensor:
        op = GGNOperator(model, problem.inputs, problem.targets, "categorical")
        return quadratic_forms(probes, op.matmat(probes))

    return run


def ggn_output_sampling(problem: Problem, probes: Tensor, seed: int):
    model = functional(problem)
    source = ProbeSource(seed=seed, stream="output")

    def run() -> Tensor:
        estimate = ggn_trace_output_sampling(
            model, problem.inputs, "categorical", source, probes.shape[0]
        )
        # Rebuild the per-probe terms' statistics from the estimate's.
        return torch.stack([estimate.value, estimate.stderr])

    return run


def pyhessian_trace(problem: Problem, probes: Tensor, seed: int):
    from pyhessian import hessian

    net = copy.deepcopy(problem.net)  # PyHessian switches the model to eval mode

    def run() -> Tensor:
        torch.manual_seed(seed)  # PyHessian draws its own probes
        with problem.second_order():
            computer = hessian(
                net,
                nn.CrossEntropyLoss(),
                data=(problem.inputs, problem.targets),
                cuda=False,
            )
            terms = computer.trace(maxIter=probes.shape[0], tol=-math.inf)
        for p in net.parameters():
            p.grad = None  # PyHessian leaves the graph of its gradient in .grad
        return torch.tensor(terms)

    return run


def curvlinops_hessian(problem: Problem, probes: Tensor, seed: int):
    from curvlinops import HessianLinearOperator

    net = copy.deepcopy(problem.net)
    params = [p for p in net.parameters() if p.requires_grad]
    data = [(problem.inputs, problem.targets)]

    def run() -> Tensor:
        with problem.second_order():
            op = HessianLinearOperator(
                net, nn.CrossEntropyLoss(), params, data, check_deterministic=False
            )
            return quadratic_forms(probes, (op @ probes.T).T)

    return run


def backpack_model(problem: Problem):
    if not problem.sequential:
        raise NotApplicable("BackPACK needs an nn.Sequential of supported layers")
    from backpack import extend

    # extend() installs hooks that break torch.func on the same module: use a copy.
    return extend(copy.deepcopy(problem.net)), extend(nn.CrossEntropyLoss())


def backpack_hmp(problem: Problem, probes: Tensor, seed: int):
    from backpack import backpack
    from backpack.extensions import HMP

    net, loss_fn = backpack_model(problem)
    params = [p for p in net.parameters() if p.requires_grad]
    pieces = unflatten(probes, params)  # (n, *shape) per parameter

    def run() -> Tensor:
        loss = loss_fn(net(problem.inputs), problem.targets)
        with backpack(HMP()):
            loss.backward()
        terms = sum(
            (v * p.hmp(v)).reshape(v.shape[0], -1).sum(1)
            for p, v in zip(params, pieces, strict=True)
        )
        net.zero_grad(set_to_none=True)
        return terms

    return run


def backpack_exact(extension: str):
    def setup(problem: Problem, probes: Tensor, seed: int) -> Callable[[], Tensor]:
        import backpack.extensions as extensions
        from backpack import backpack

        net, loss_fn = backpack_model(problem)
        attribute = {"DiagHessian": "diag_h", "DiagGGNExact": "diag_ggn_exact"}

        def run() -> Tensor:
            loss = loss_fn(net(problem.inputs), problem.targets)
            with backpack(getattr(extensions, extension)()):
                loss.backward()
            total = sum(
                getattr(p, attribute[extension]).sum() for p in net.parameters()
            )
            net.zero_grad(set_to_none=True)
            return total.reshape(1)

        return run

    return setup


METHODS = (
    Method("curvlightning double backward, graph reused", "tr(H)",
           hessian_operator("double_backward")),
    Method("curvlightning batched double backward (is_grads_batched)", "tr(H)",
           batched_operator("double_backward")),
    Method("curvlightning batched double backward, chunks of 4", "tr(H)",
           batched_operator("double_backward", 4)),
    Method("curvlightning vmapped forward-over-reverse", "tr(H)",
           batched_operator("forward_over_reverse")),
    Method("curvlightning sequential forward-over-reverse", "tr(H)",
           hessian_operator("forward_over_reverse")),
    Method("curvlightning finite difference", "tr(H)", finite_difference),
    Method("curvlightning exact quadratic forms (sequential)", "tr(H)",
           sequential_forms),
    Method("PyHessian trace (own probes)", "tr(H)", pyhessian_trace, "pyhessian"),
    Method("curvlinops HessianLinearOperator @ V", "tr(H)", curvlinops_hessian,
           "curvlinops"),
    Method("BackPACK HMP (block-diagonal H)", "tr(H)", backpack_hmp, "backpack"),
    Method("BackPACK DiagHessian", "tr(H)", backpack_exact("DiagHessian"),
           "backpack", exact=True, per_probe=False),
    Method("curvlightning GGN products", "tr(G)", ggn_hutchinson),
    Method("curvlightning GGN output sampling (own probes)", "tr(G)",
           ggn_output_sampling),
    Method("BackPACK DiagGGNExact", "tr(G)", backpack_exact("DiagGGNExact"),
           "backpack", exact=True, per_probe=False),
)  # fmt: skip

METHOD_NAMES = {m.name: m for m in METHODS}


def summarize(method: Method, out: Tensor) -> tuple[float, float]:
    """The estimate and its standard error from a method's output."""
    out = out.detach()
    if method.exact:
        return float(out[0]), 0.0
    if method.setup is ggn_output_sampling:
        return float(out[0]), float(out[1])
    mean, stderr = mean_and_stderr(out.double())
    return float(mean), float(stderr)


# ----------------------------------------------------------------------------------
# Timing


def clock(kind: str) -> Callable[[], float]:
    return time.process_time if kind == "process" else time.perf_counter


def gradient_run(problem: Problem) -> Callable[[], object]:
    def run() -> tuple[Tensor, ...]:
        loss = F.cross_entropy(problem.net(problem.inputs), problem.targets)
        return torch.autograd.grad(loss, problem.params)

    return run


@dataclass
class Row:
    method: Method
    status: str = "ok"
    seconds: float = math.nan
    value: float = math.nan
    stderr: float = math.nan
    peak_mib: float = math.nan


def prepare(method: Method, problem: Problem, probes: Tensor, seed: int):
    """The timed function, or a status string when the method cannot run."""
    if method.anchor is not None:
        try:
            __import__(method.anchor)
        except ImportError:
            return "not installed"
    try:
        return method.setup(problem, probes, seed)
    except NotApplicable as why:
        return f"not applicable: {why}"


def first_run(row: Row, run: Callable[[], Tensor]) -> bool:
    try:
        out = run()
    except Exception as error:  # an anchor failing on a model is a result
        row.status = f"failed: {type(error).__name__}: {str(error)[:80]}"
        return False
    row.value, row.stderr = summarize(row.method, out)
    return True


def time_methods(problem: Problem, args: argparse.Namespace) -> tuple[float, list]:
    probes = ProbeSource(seed=args.seed).draw(args.num_probes, problem.num_params)
    tick = clock(args.clock)
    runs: dict[str, Callable] = {"gradient": gradient_run(problem)}
    rows = []
    for method in selected_methods(args):
        row = Row(method)
        rows.append(row)
        run = prepare(method, problem, probes, args.seed)
        if isinstance(run, str):
            row.status = run
        elif first_run(row, run):
            runs[method.name] = run
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so that noise hits all alike
        for name, run in runs.items():
            start = tick()
            run()
            samples[name].append(tick() - start)
    for row in rows:
        if row.method.name in samples:
            row.seconds = statistics.median(samples[row.method.name])
    return statistics.median(samples["gradient"]), rows


def selected_methods(args: argparse.Namespace) -> list[Method]:
    if not args.methods:
        return list(METHODS)
    return [m for m in METHODS if any(s in m.name for s in args.methods)]


# ----------------------------------------------------------------------------------
# Memory: a fresh process per method


def status_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak() -> bool:
    """Reset the peak resident set size (Linux 4.0+); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def child_peak(model: str, method: str, args: argparse.Namespace) -> dict:
    """Run one method twice in this (fresh) process; the second run's peak in MiB.

    The first run pages in torch's kernels and fills its lazy caches; with glibc's
    mmap threshold pinned (see ``measure_peak``) the tensors it freed have gone
    back to the system, so the second run's peak above the resident size before
    it is the memory the method itself holds at its peak.
    """
    torch.set_num_threads(args.threads)
    problem = make_problem(model, args.seed)
    probes = ProbeSource(seed=args.seed).draw(args.num_probes, problem.num_params)
    if method == "gradient":
        run = gradient_run(problem)
    else:
        run = prepare(METHOD_NAMES[method], problem, probes, args.seed)
        if isinstance(run, str):
            return {"status": run}
    run()
    gc.collect()
    baseline = status_kib("VmRSS")
    if not reset_peak():  # then the peak of the first run would hide the second
        return {"status": "cannot reset the peak resident size"}
    run()
    # Not getrusage's ru_maxrss: it also keeps the peak of the process image
    # before exec (the parent's, copied by fork), which clear_refs does not reset.
    peak = status_kib("VmHWM")
    return {"status": "ok", "peak_mib": (peak - baseline) / 1024}


def measure_peak(model: str, method: str, args: argparse.Namespace) -> float:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        model,
        method,
        "--threads",
        str(args.threads),
        "--num-probes",
        str(args.num_probes),
        "--seed",
        str(args.seed),
    ]
    # Allocations from 64 KiB up are mmapped and unmapped when freed: no freed
    # tensor lingers in malloc's arenas to be reused unseen by the second run.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return math.nan
    result = json.loads(lines[-1])
    return result.get("peak_mib", math.nan)


# ----------------------------------------------------------------------------------
# Report


def fmt(x: float, digits: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def fmt_estimate(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.5g}"


def table(problem: Problem, grad_s: float, grad_mib: float, rows: list, args) -> str:
    head = [
        f"### {problem.description} ({problem.num_params:,} parameters)",
        "",
        f"One gradient: {grad_s * 1e3:.1f} ms ({args.clock} time), peak "
        f"{fmt(grad_mib, 1)} MiB; {args.num_probes} probes, {args.threads} "
        f"thread(s), median of {args.repeats}.",
        "",
        "| method | quantity | ms / estimate | gradients / probe | peak MiB "
        "| estimate | stderr |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    body = []
    for row in rows:
        m = row.method
        if row.status != "ok":
            body.append(f"| {m.name} | {m.quantity} | {row.status} | | | | |")
            continue
        per_probe = row.seconds / grad_s / (args.num_probes if m.per_probe else 1)
        unit = "" if m.per_probe else " (total)"
        stderr = "exact" if m.exact else fmt_estimate(row.stderr)
        body.append(
            f"| {m.name} | {m.quantity} | {row.seconds * 1e3:.0f} | "
            f"{per_probe:.2f}{unit} | {fmt(row.peak_mib, 1)} | "
            f"{fmt_estimate(row.value)} | {stderr} |"
        )
    return "\n".join(head + body)


def benchmark(model: str, args: argparse.Namespace) -> str:
    problem = make_problem(model, args.seed)
    grad_s, rows = time_methods(problem, args)
    grad_mib = math.nan
    if args.memory:
        grad_mib = measure_peak(model, "gradient", args)
        for row in rows:
            if row.status == "ok":
                row.peak_mib = measure_peak(model, row.method.name, args)
    return table(problem, grad_s, grad_mib, rows, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--methods", nargs="+", help="substrings of method names")
    parser.add_argument("--num-probes", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=("auto", "process", "wall"),
        default="auto",
        help="process CPU time (auto with one thread) or wall time",
    )
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"))
    args = parser.parse_args(argv)
    if args.clock == "auto":
        args.clock = "process" if args.threads == 1 else "wall"
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child_peak(*args.child, args)))
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")
    for model in args.models:
        print(benchmark(model, args), end="\n\n", flush=True)
    print(
        f"Target: at most {TARGET_GRADIENTS} gradients per probe at 16 probes on the "
        "MLP, one thread."
    )


if __name__ == "__main__":
    main()
