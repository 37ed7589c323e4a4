"""Every recipe builds through the CLI; the curvature-Adam recipes train and feed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.loggers import WandbLogger

from curvlightning.cli import CurvatureCLI
from curvlightning.logging.wandb_offline import find_run_files, read_history
from curvlightning.optim import DiagCurvatureAdam, adahessian_like, sophia_like

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL_RECIPES = sorted(p.name for p in RECIPES.glob("*.yaml"))
TINY = {
    "digits_cnn_curvadam.yaml": ["--model.init_args.channels=[4, 4]"],
    "charlm_curvadam.yaml": [
        "--model.init_args.context_length=16",
        "--model.init_args.n_layers=1",
        "--model.init_args.d_model=16",
        "--model.init_args.n_heads=2",
        "--data.init_args.seq_len=16",
        "--data.init_args.batch_size=4",
        "--data.init_args.max_chars=30000",
    ],
}
# Estimates handed in during 3 steps: every step (AdaHessian-like), and at step 0
# of every 10 (Sophia-like).
FEED = {
    "digits_cnn_curvadam.yaml": ("hessian", "hessian", adahessian_like, 3),
    "charlm_curvadam.yaml": ("gnb", "fisher", sophia_like, 1),
}


def _cli(recipe: str | Path, *overrides: str, run: bool = False) -> CurvatureCLI:
    args = ["--config", str(RECIPES / recipe), *overrides]
    return CurvatureCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=run,
        args=["fit", *args] if run else args,
    )


def _with_absolute_run_folder(recipe: str, root: Path) -> Path:
    """A copy of the recipe whose run folder and logger folders are under ``root``.

    wandb's service process resolves a relative ``save_dir`` against its own
    working directory, that of the test that started it, not the current one.
    """
    config = yaml.safe_load((RECIPES / recipe).read_text())
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(root / trainer["default_root_dir"])
    for logger in trainer["logger"]:
        logger["init_args"]["save_dir"] = str(root / logger["init_args"]["save_dir"])
    path = root / recipe
    path.write_text(yaml.safe_dump(config))
    return path


def _optimizer(cli: CurvatureCLI) -> torch.optim.Optimizer:
    """The recipe's optimizer, on a stand-in parameter if the model is not built."""
    callable_ = getattr(cli.model, "optimizer_callable", None)
    if callable_ is not None:
        return callable_([torch.nn.Parameter(torch.zeros(3))])
    return cli.model.configure_optimizers()


def _expected_optimizer(config: dict) -> tuple[str, dict]:
    """Class name and arguments the YAML asks for (AdamW with the model's lr)."""
    init = config["model"]["init_args"]
    if "optimizer" not in init:
        return "AdamW", {"lr": init["lr"], "weight_decay": init["weight_decay"]}
    optimizer = init["optimizer"]
    return optimizer["class_path"].rsplit(".", 1)[1], optimizer["init_args"]


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_recipe_instantiates_with_its_optimizer_callbacks_and_run_folder(
    recipe, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = yaml.safe_load((RECIPES / recipe).read_text())
    cli = _cli(recipe)

    listed = [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]]
    built = [type(c).__name__ for c in cli.trainer.callbacks]
    assert all(built.count(name) >= listed.count(name) for name in listed)

    name, init_args = _expected_optimizer(config)
    optimizer = _optimizer(cli)
    assert type(optimizer).__name__ == name
    for key, value in init_args.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert optimizer.defaults[key] == expected, key

    # a recipe's run folder and wandb run are named after its file, offline
    stem = Path(recipe).stem
    assert Path(cli.trainer.default_root_dir) == Path("runs") / stem
    (wandb,) = [lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)]
    assert wandb._wandb_init["name"] == stem
    assert wandb._offline
    assert Path(wandb.save_dir) == Path("runs") / stem


@pytest.mark.parametrize("recipe", sorted(FEED))
def test_curvadam_recipe_spells_out_its_preset(recipe, tmp_path, monkeypatch):
    # the YAML cannot name a factory, so it copies the preset: it must not drift
    monkeypatch.chdir(tmp_path)
    optimizer = _optimizer(_cli(recipe))
    _, curvature, preset, _ = FEED[recipe]
    param = torch.nn.Parameter(torch.zeros(3))
    reference = preset([param], lr=optimizer.defaults["lr"])
    assert isinstance(optimizer, DiagCurvatureAdam)
    assert optimizer.defaults == reference.defaults
    assert optimizer.defaults["curvature"] == curvature


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(FEED))
def test_curvadam_recipe_trains_and_feeds_the_curvature_ema(
    recipe, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(0)
    overrides = ["--trainer.max_steps=3", "--trainer.enable_progress_bar=false"]
    config = _with_absolute_run_folder(recipe, tmp_path)
    cli = _cli(config, *overrides, *TINY[recipe], run=True)
    source, curvature, _, num_estimates = FEED[recipe]

    (feed,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "CurvatureFeed"]
    assert feed.source == source
    assert feed.num_estimates == num_estimates
    optimizer = cli.trainer.optimizers[0]
    assert optimizer.param_groups[0]["curvature"] == curvature
    assert optimizer.num_dropped == 0
    for param in cli.model.parameters():
        state = optimizer.state[param]
        assert float(state["step"]) == 3.0
        assert float(state["curv_step"]) == num_estimates
        assert torch.isfinite(state["exp_curv"]).all()
        assert (state["exp_curv"] >= 0).all()  # D^2 (hessian), B g^2 (gnb)
        assert state["exp_curv"].abs().sum() > 0

    stem = Path(recipe).stem
    (run_file,) = find_run_files(tmp_path / "runs" / stem / "wandb")
    rows = [r for r in read_history(run_file) if f"curvature/feed_{source}_mean" in r]
    assert len(rows) == num_estimates
    assert all(math.isfinite(r[f"curvature/feed_{source}_mean"]) for r in rows)
