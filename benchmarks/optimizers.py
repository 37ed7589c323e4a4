"""Diagonal-curvature Adam against AdamW: validation loss per step and per second.

Two tasks: the digits CNN (``CNNClassifier`` on scikit-learn's 8x8 digits, the
``digits_cnn`` recipe's model and data) and the character transformer
(``CharTransformerLM`` on the standard library's source files; a smaller model
and step budget than the ``charlm_adamw`` recipe by default, the recipe's with
``--charlm-budget full``). On each task and seed, one model per method:

- ``adamw``: ``torch.optim.AdamW`` on a small learning-rate grid (the recipes'
  betas and weight decay);
- ``adahessian_like``: ``DiagCurvatureAdam`` with a Hutchinson Hessian diagonal
  every step (``CurvatureFeed(source="hessian")``);
- ``sophia_like``: ``DiagCurvatureAdam`` with a Gauss-Newton-Bartlett diagonal
  every k = 10 steps (``CurvatureFeed(source="gnb")``), on a learning-rate grid
  too (its learning rate is the largest step of a coordinate, not AdamW's);
- ``adahessian_anchor``: torch-optimizer's ``Adahessian`` (hessian power 1, no
  weight decay), the outside anchor. It needs ``loss.backward(create_graph=True)``,
  so it trains with manual optimization, without gradient clipping (Lightning
  clips only under automatic optimization).

Every run is a plain Lightning Trainer (no logger, no checkpointing, no progress
bar, one device). A callback times each training step with ``time.perf_counter``
from ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward,
curvature estimate and optimizer step, not data loading and not validation. Every
``val_every`` steps the validation loss is recorded against the step and the summed
step times ("training time"). Runs go task by task, seed by seed, the methods of a
seed back to back, so a burst of load on the machine hits neighbours alike.

Reported per method and learning rate:

- the final validation loss, mean and standard deviation over seeds;
- the *target*: per seed, the final validation loss of the tuned AdamW (the grid's
  learning rate with the lowest mean final loss) on the same seed. Steps and
  training time until a run's validation loss first reaches it (at the resolution
  of ``val_every``), averaged over the seeds that reach it; the tuned AdamW itself
  reaches it at its last evaluation or earlier (the curve need not fall
  monotonically);
- time to target relative to the tuned AdamW's, per seed, then averaged;
- training time per step (including the steps that compute a curvature estimate)
  relative to the tuned AdamW of the same seed, leaving out the first
  ``--warmup`` steps (lazy initialisation).

For the Sophia-like preset at its best learning rate (lowest mean final loss) the
table is followed by its two targets: time to the tuned AdamW's loss at most 0.8x
AdamW's, and per-step overhead at most 10%.

Outputs, under ``--out``: ``optimizers.md`` (the table, also printed),
``optimizers.json`` (settings, every run's curves and step times, the summary),
``optimizers.png`` (validation loss against steps and against training time).

Usage:
    python benchmarks/optimizers.py                # 3 seeds, default budgets (~15 min)
    python benchmarks/optimizers.py --quick        # 1 seed, tiny budgets (< 1 min)
    python benchmarks/optimizers.py --charlm-budget full --seeds 3
    python benchmarks/optimizers.py --tasks charlm --methods adamw sophia_like \\
        --lr sophia_like.charlm=1e-3,3e-3 --lr adamw.charlm=3e-3

The anchor needs torch-optimizer (``pip install --no-deps torch-optimizer
pytorch-ranger``); without it its rows say "not installed".
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from curvlightning.core.functional import math_attention
from curvlightning.data.digits import DigitsDataModule
from curvlightning.data.text import CharTextDataModule
from curvlightning.lightning.feed import CurvatureFeed
from curvlightning.models.charlm import CharTransformerLM
from curvlightning.models.cnn import CNNClassifier
from curvlightning.optim import adahessian_like, sophia_like

TASKS = ("digits", "charlm")
METHODS = ("adamw", "adahessian_like", "sophia_like", "adahessian_anchor")
ANCHOR = "torch_optimizer.Adahessian"
TIME_RATIO_TARGET = 0.8
OVERHEAD_TARGET = 0.10

# Learning rates per (method, task). Pilot runs on seed 0 at the default budgets
# chose the presets' values: AdaHessian-like 0.15 (of 0.005 to 0.3 on the digits,
# of 0.01, 0.03, 0.15 on the LM); Sophia-like keeps a grid like AdamW's (on the
# digits 1e-3 and above oscillate, on the LM 3e-3 is worst). The anchor takes the
# AdaHessian-like learning rate.
DEFAULT_LRS: dict[tuple[str, str], tuple[float, ...]] = {
    ("adamw", "digits"): (1e-3, 3e-3, 1e-2),
    ("adamw", "charlm"): (1e-3, 3e-3, 1e-2),
    ("adahessian_like", "digits"): (0.15,),
    ("adahessian_like", "charlm"): (0.15,),
    ("sophia_like", "digits"): (1e-4, 3e-4, 1e-3),
    ("sophia_like", "charlm"): (1e-4, 3e-4, 1e-3),
    ("adahessian_anchor", "digits"): (0.15,),
    ("adahessian_anchor", "charlm"): (0.15,),
}


# ----------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Task:
    """One model on one data set, with its step budget."""

    name: str
    steps: int
    val_every: int
    model: dict[str, Any]
    data: dict[str, Any]
    adamw: dict[str, Any]
    grad_clip: float | None = None
    limit_val_batches: int | float = 1.0


DIGITS = Task(
    name="digits",
    steps=460,  # 20 epochs of 23 batches, the digits_cnn recipe's budget
    val_every=23,
    model={"channels": (16, 32)},
    data={"batch_size": 64, "val_fraction": 0.2, "flatten": False},
    adamw={"weight_decay": 1e-4},
)
CHARLM = {
    "small": Task(
        name="charlm",
        steps=400,
        val_every=25,
        model={"context_length": 64, "n_layers": 2, "d_model": 64, "n_heads": 4},
        data={"seq_len": 64, "batch_size": 32, "max_chars": 500_000},
        adamw={"betas": (0.9, 0.99), "weight_decay": 0.01},
        grad_clip=1.0,
    ),
    "full": Task(  # the charlm_adamw recipe's model, data and steps
        name="charlm",
        steps=300,
        val_every=25,
        model={"context_length": 128, "n_layers": 2, "d_model": 128, "n_heads": 4},
        data={"seq_len": 128, "batch_size": 32, "max_chars": 2_000_000},
        adamw={"betas": (0.9, 0.99), "weight_decay": 0.01},
        grad_clip=1.0,
    ),
}
QUICK = {
    "digits": replace(DIGITS, steps=40, val_every=10),
    "charlm": Task(
        name="charlm",
        steps=20,
        val_every=10,
        model={"context_length": 32, "n_layers": 1, "d_model": 16, "n_heads": 2},
        data={"seq_len": 32, "batch_size": 8, "max_chars": 100_000},
        adamw={"betas": (0.9, 0.99), "weight_decay": 0.01},
        grad_clip=1.0,
        limit_val_batches=5,
    ),
}


def make_data(task: Task, seed: int) -> pl.LightningDataModule:
    """The task's data module; ``seed`` draws the split (digits) and the batches."""
    if task.name == "digits":
        return DigitsDataModule(seed=seed, **task.data)
    return CharTextDataModule(seed=seed, **task.data)


# ----------------------------------------------------------------------------------
# Models and optimizers


class CreateGraphStep:
    """Manual optimization with ``loss.backward(create_graph=True)``.

    torch-optimizer's ``Adahessian`` differentiates the gradient inside ``step``,
    so the backward pass keeps its graph; attention runs on the math kernel,
    which has a second derivative. The gradients (and the graph they hold) are
    released after the step.
    """

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        with math_attention():
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss, create_graph=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class ManualCNN(CreateGraphStep, CNNClassifier):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False


class ManualCharLM(CreateGraphStep, CharTransformerLM):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False


def optimizer_callable(method: str, lr: float, task: Task) -> Callable:
    """A map from parameters to the method's optimizer."""
    if method == "adamw":
        return functools.partial(torch.optim.AdamW, lr=lr, **task.adamw)
    if method == "adahessian_like":
        return functools.partial(adahessian_like, lr=lr)
    if method == "sophia_like":
        return functools.partial(sophia_like, lr=lr)
    import torch_optimizer  # the anchor: imported only when it runs

    return functools.partial(
        torch_optimizer.Adahessian, lr=lr, weight_decay=0.0, hessian_power=1.0
    )


def make_model(task: Task, method: str, lr: float) -> pl.LightningModule:
    """The task's model with the method's optimizer injected."""
    manual = method == "adahessian_anchor"
    optimizer = optimizer_callable(method, lr, task)
    if task.name == "digits":
        cls = ManualCNN if manual else CNNClassifier
    else:
        cls = ManualCharLM if manual else CharTransformerLM
    return cls(optimizer=optimizer, **task.model)


def make_feeds(method: str, seed: int) -> list[Callback]:
    """The curvature feed of a preset (none for AdamW and the anchor)."""
    if method == "adahessian_like":
        return [CurvatureFeed(source="hessian", seed=seed)]
    if method == "sophia_like":  # every_n_steps: the optimizer's update_every, 10
        return [CurvatureFeed(source="gnb", seed=seed)]
    return []


# ----------------------------------------------------------------------------------
# Training and timing


class StepClock(Callback):
    """Times training steps and records the validation loss as training goes."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.evals: list[tuple[int, float, float]] = []  # (step, seconds, loss)
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_times.append(time.perf_counter() - self._start)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        loss = float(trainer.callback_metrics["val/loss"])
        self.evals.append((trainer.global_step, math.fsum(self.step_times), loss))


@dataclass
class Run:
    """One training run: its curve, its step times, or why it failed."""

    task: str
    method: str
    lr: float
    seed: int
    steps: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def final(self) -> float:
        return self.val_loss[-1] if self.val_loss else math.nan


def make_trainer(task: Task, method: str, callbacks: list[Callback]) -> pl.Trainer:
    manual = method == "adahessian_anchor"
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=task.steps,
        val_check_interval=task.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=task.limit_val_batches,
        num_sanity_val_steps=0,
        gradient_clip_val=None if manual else task.grad_clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def train(task: Task, method: str, lr: float, seed: int, data) -> Run:
    """Train one model; a failure becomes the run's ``error``."""
    run = Run(task.name, method, lr, seed)
    clock = StepClock()
    try:
        pl.seed_everything(seed, verbose=False)
        model = make_model(task, method, lr)
        trainer = make_trainer(task, method, [clock, *make_feeds(method, seed)])
        trainer.fit(model, datamodule=data)
    except ImportError as err:
        run.error = f"not installed ({err.name})"
    except Exception as err:  # a row that says why, instead of no table at all
        run.error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    run.step_times = [round(t, 7) for t in clock.step_times]
    run.steps = [s for s, _, _ in clock.evals]
    run.times = [t for _, t, _ in clock.evals]
    run.val_loss = [v for _, _, v in clock.evals]
    return run


# ----------------------------------------------------------------------------------
# Summary


@dataclass
class Row:
    """One (task, method, lr): statistics over seeds."""

    task: str
    method: str
    lr: float
    finals: list[float]
    reached: int
    seeds: int
    steps_to_target: float
    time_to_target: float
    time_ratio: float
    seconds_per_step: float
    overhead: float
    tuned: bool = False
    error: str | None = None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def rank_key(finals: Sequence[float]) -> float:
    """Mean final loss for ranking: runs that never finished rank last."""
    mean = mean_std(finals)[0]
    return mean if math.isfinite(mean) else math.inf


def first_reach(run: Run, target: float) -> tuple[int, float] | None:
    """Step and training time of the first evaluation at or below ``target``."""
    for step, seconds, loss in zip(run.steps, run.times, run.val_loss, strict=True):
        if loss <= target:
            return step, seconds
    return None


def seconds_per_step(run: Run, warmup: int) -> float:
    times = run.step_times[warmup:] or run.step_times
    return statistics.fmean(times) if times else math.nan


def group_runs(runs: list[Run], task: str) -> dict[tuple[str, float], list[Run]]:
    groups: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        if run.task == task:
            groups.setdefault((run.method, run.lr), []).append(run)
    return groups


def tuned_adamw(groups: dict[tuple[str, float], list[Run]]) -> tuple[str, float]:
    """The AdamW learning rate with the lowest mean final validation loss."""
    keys = [k for k, runs in groups.items() if k[0] == "adamw" and _finished(runs)]
    if not keys:
        raise ValueError("no AdamW run finished: the targets need one")
    return min(keys, key=lambda k: rank_key([r.final for r in groups[k]]))


def _finished(runs: list[Run]) -> bool:
    return all(not run.error for run in runs)


def summarize_group(
    key: tuple[str, float], runs: list[Run], reference: dict[int, Run], warmup: int
) -> Row:
    """Statistics of one group against the tuned AdamW of the same seeds."""
    reaches, ratios, overheads = [], [], []
    for run in runs:
        base = reference[run.seed]
        reach = first_reach(run, base.final) if not run.error else None
        base_reach = first_reach(base, base.final)
        if reach is not None:
            reaches.append(reach)
        if reach is not None and base_reach is not None:
            ratios.append(reach[1] / base_reach[1])
        if run.step_times:
            ratio = seconds_per_step(run, warmup) / seconds_per_step(base, warmup)
            overheads.append(ratio - 1.0)
    errors = {run.error for run in runs if run.error}
    return Row(
        task=runs[0].task,
        method=key[0],
        lr=key[1],
        finals=[run.final for run in runs],
        reached=len(reaches),
        seeds=len(runs),
        steps_to_target=mean_std([r[0] for r in reaches])[0],
        time_to_target=mean_std([r[1] for r in reaches])[0],
        time_ratio=mean_std(ratios)[0],
        seconds_per_step=mean_std([seconds_per_step(r, warmup) for r in runs])[0],
        overhead=mean_std(overheads)[0],
        error="; ".join(sorted(errors)) or None,
    )


def summarize(runs: list[Run], task: str, warmup: int) -> list[Row]:
    groups = group_runs(runs, task)
    tuned = tuned_adamw(groups)
    reference = {run.seed: run for run in groups[tuned]}
    rows = []
    for key, members in groups.items():
        row = summarize_group(key, members, reference, warmup)
        row.tuned = key == tuned
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------
# Report


def _num(value: float, fmt: str) -> str:
    return format(value, fmt) if math.isfinite(value) else "-"


def method_label(method: str) -> str:
    return ANCHOR if method == "adahessian_anchor" else method


def table_line(row: Row) -> str:
    name = method_label(row.method) + (" (tuned)" if row.tuned else "")
    mean, std = mean_std(row.finals)
    if row.error and not math.isfinite(mean):
        return f"| {row.task} | {name} | {row.lr:g} | failed: {row.error} |" + (
            " |" * 6
        )
    final = f"{mean:.4f} ± {std:.4f}" if math.isfinite(mean) else "diverged"
    if row.reached == 0:
        reach = ["not reached", "-", "-", "-"]
    else:
        reach = [
            f"{row.reached}/{row.seeds}",
            _num(row.steps_to_target, ".0f"),
            _num(row.time_to_target, ".2f"),
            _num(row.time_ratio, ".2f") + "x",
        ]
    cells = [row.task, name, f"{row.lr:g}", final, *reach]
    cells += [_num(1e3 * row.seconds_per_step, ".1f"), _num(100 * row.overhead, "+.0f")]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| task | method | lr | final val loss | reached target | steps to target "
    "| time to target (s) | time vs AdamW | ms/step | step overhead (%) |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def target_lines(rows: list[Row]) -> list[str]:
    """The Sophia-like preset's two targets, per task (its best learning rate)."""
    lines = []
    for task in dict.fromkeys(row.task for row in rows):
        candidates = [r for r in rows if r.task == task and r.method == "sophia_like"]
        if not candidates:
            continue
        row = min(candidates, key=lambda r: rank_key(r.finals))
        if not math.isfinite(mean_std(row.finals)[0]):
            lines.append(f"- {task}, Sophia-like: no run finished ({row.error})")
            continue
        if row.reached:
            ok = "met" if row.time_ratio <= TIME_RATIO_TARGET else "not met"
            speed = (
                f"reaches AdamW's final loss in {row.time_ratio:.2f}x AdamW's time "
                f"({row.reached}/{row.seeds} seeds; target <= 0.8x: {ok})"
            )
        else:
            speed = "never reaches AdamW's final loss (target <= 0.8x: not met)"
        ok = "met" if row.overhead <= OVERHEAD_TARGET else "not met"
        lines.append(
            f"- {task}, Sophia-like (k=10, lr {row.lr:g}): {speed}; per-step "
            f"overhead {100 * row.overhead:+.1f}% (target <= +10%: {ok})"
        )
    return lines


def markdown(rows: list[Row], settings: dict[str, Any]) -> str:
    lines = [
        f"Seeds: {settings['seeds']}; threads: {settings['threads']}; "
        f"torch {torch.__version__}; steps: "
        + ", ".join(f"{t} {n}" for t, n in settings["steps"].items()),
        "",
        HEADER,
        *[table_line(row) for row in rows],
        "",
        *target_lines(rows),
    ]
    return "\n".join(lines) + "\n"


def mean_curve(runs: list[Run]) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean training time and mean loss over the runs that finished."""
    done = [r for r in runs if not r.error and r.val_loss]
    if not done:
        return [], [], []
    length = min(len(r.val_loss) for r in done)
    steps = done[0].steps[:length]
    times = [statistics.fmean(r.times[i] for r in done) for i in range(length)]
    losses = [statistics.fmean(r.val_loss[i] for r in done) for i in range(length)]
    return steps, times, losses


def plot(runs: list[Run], rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(row.task for row in rows))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for (ax_steps, ax_time), task in zip(axes, tasks, strict=True):
        tuned_keys = {(r.method, r.lr) for r in rows if r.task == task and r.tuned}
        for key, members in group_runs(runs, task).items():
            steps, times, losses = mean_curve(members)
            tuned = key in tuned_keys
            label = f"{method_label(key[0])} lr={key[1]:g}"
            style = {"lw": 2.2 if tuned else 1.2, "marker": ".", "label": label}
            ax_steps.plot(steps, losses, **style)
            ax_time.plot(times, losses, **style)
        for ax in (ax_steps, ax_time):
            ax.set(title=f"{task}: validation loss (mean over seeds)", yscale="log")
        ax_steps.set(xlabel="step", ylabel="loss")
        ax_time.set(xlabel="training time (s)")
        ax_time.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------
# Command line


def parse_lrs(specs: list[str]) -> dict[tuple[str, str], tuple[float, ...]]:
    """``METHOD.TASK=LR[,LR...]`` overrides on top of :data:`DEFAULT_LRS`."""
    lrs = dict(DEFAULT_LRS)
    for spec in specs:
        try:
            key, values = spec.split("=")
            method, task = key.split(".")
            parsed = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise SystemExit(f"--lr {spec!r}: write METHOD.TASK=LR[,LR...]") from None
        if method not in METHODS or task not in TASKS:
            raise SystemExit(f"--lr {spec!r}: method in {METHODS}, task in {TASKS}")
        lrs[(method, task)] = parsed
    return lrs


def build_tasks(args: argparse.Namespace) -> list[Task]:
    tasks = {"digits": DIGITS, "charlm": CHARLM[args.charlm_budget]}
    if args.quick:
        tasks = dict(QUICK)
    if args.digits_steps:
        tasks["digits"] = replace(tasks["digits"], steps=args.digits_steps)
    if args.charlm_steps:
        tasks["charlm"] = replace(tasks["charlm"], steps=args.charlm_steps)
    for task in tasks.values():
        if task.steps % task.val_every:
            raise SystemExit(
                f"{task.name}: steps={task.steps} is not a multiple of the "
                f"validation interval {task.val_every}: pass a multiple"
            )
    return [tasks[name] for name in args.tasks]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. n-1")
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny budgets")
    parser.add_argument("--charlm-budget", choices=tuple(CHARLM), default="small")
    parser.add_argument("--charlm-steps", type=int, help="override the LM's steps")
    parser.add_argument("--digits-steps", type=int, help="override the CNN's steps")
    parser.add_argument("--lr", action="append", default=[], metavar="M.T=LR,...")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = 1
    return args


def quiet() -> None:
    """Silence Lightning's banners and the warnings every run would repeat."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for message in (
        ".*does not have many workers.*",
        ".*create_graph=True.*reference cycle.*",
        ".*smaller than the logging interval.*",
        ".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=message)


def run_all(args: argparse.Namespace, tasks: list[Task], lrs) -> list[Run]:
    runs = []
    for task in tasks:
        for seed in range(args.seeds):
            data = make_data(task, seed)
            for method in args.methods:
                for lr in lrs[(method, task.name)]:
                    run = train(task, method, lr, seed, data)
                    status = run.error or f"final val loss {run.final:.4f}"
                    spent = math.fsum(run.step_times)
                    print(
                        f"{task.name} seed {seed} {method} lr={lr:g}: {status} "
                        f"({len(run.step_times)} steps, {spent:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                    runs.append(run)
    return runs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    tasks = build_tasks(args)
    lrs = parse_lrs(args.lr)
    if "adamw" not in args.methods:
        raise SystemExit("--methods must include adamw: it sets the targets")
    start = time.perf_counter()
    runs = run_all(args, tasks, lrs)
    rows = [row for task in tasks for row in summarize(runs, task.name, args.warmup)]
    settings = {
        "seeds": args.seeds,
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": {task.name: task.steps for task in tasks},
        "tasks": [asdict(task) for task in tasks],
        "lrs": {f"{m}.{t}": v for (m, t), v in lrs.items() if m in args.methods},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "total_seconds": time.perf_counter() - start,
    }
    text = markdown(rows, settings)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimizers.md").write_text(text)
    results = {
        "settings": settings,
        "rows": [asdict(r) for r in rows],
        "runs": [asdict(r) for r in runs],
    }
    (args.out / "optimizers.json").write_text(json.dumps(results) + "\n")
    plot(runs, rows, args.out / "optimizers.png")
    print(f"wrote {args.out}/optimizers.{{md,json,png}}", file=sys.stderr)


if __name__ == "__main__":
    main()
