"""The main job: the ``curvlightning`` command on the digits recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from curvlightning.cli import main
from curvlightning.logging.wandb_offline import find_run_files, read_history

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "digits_mlp.yaml"


def test_digits_recipe_trains_logs_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    main(
        [
            "fit",
            "--config",
            str(RECIPE),
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "digits_mlp"
    assert "curvlightning run summary" in out
    assert "curvature/hessian_trace = " in out
    assert "last: val/acc=" in out
    assert "wandb sync" in out

    report = (run_dir / "report" / "report.md").read_text()
    for key in ("hessian_trace", "fisher_empirical_trace", "fisher_gnb_trace"):
        assert f"curvature/{key}" in report
    assert (run_dir / "report" / "curvature_hessian_trace.png").stat().st_size > 0

    (run_file,) = find_run_files(run_dir / "wandb")
    rows = [r for r in read_history(run_file) if "curvature/hessian_trace" in r]
    assert [r["trainer/global_step"] for r in rows] == [10, 20]


def test_recipe_names_a_bad_callback_argument(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(RECIPE), "--trainer.max_epochs=1"]
    args += ["--trainer.callbacks+=curvlightning.HessianTrace"]
    args += ["--trainer.callbacks.num_probes=0"]
    with pytest.raises(ValueError, match="num_probes must be a positive number"):
        main(args)
