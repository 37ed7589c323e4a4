"""The run report: Markdown, PNG figures and the raw series."""

from __future__ import annotations

import json
import math

import matplotlib
import numpy as np
import pytest

from curvlightning.logging.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _series() -> dict[str, list[dict]]:
    trace = [
        {"step": 10 * i, "value": 5.0 - 0.25 * i, "stderr": 0.1 + 0.01 * i}
        for i in range(8)
    ]
    trace[3]["value"] = float("nan")
    norm = [
        {"step": i, "value": 2.0 / (i + 1), "per_layer": {"fc1": 1.0 / (i + 1)}}
        for i in range(5)
    ]
    norm[-1]["per_layer"]["fc2"] = 0.5
    return {
        "hessian/trace": trace,
        "grad/norm": norm,
        "fisher/diag_layers": [{"step": 3, "per_layer": {"fc1": 0.1, "fc2": 0.2}}],
        "hessian/top_eig": [],
    }


def _summary() -> dict:
    return {"lr": 1e-3, "model": "mlp|64", "epochs": 3, "final_loss": float("nan")}


@pytest.fixture
def report(tmp_path):
    path = write_report(tmp_path / "run", _series(), _summary(), "Digits MLP")
    return path, path.read_text(encoding="utf-8")


def test_files_written(report):
    path, _ = report
    assert path.name == "report.md" and path.parent.name == "report"
    names = {p.name for p in path.parent.iterdir()}
    pngs = {
        "hessian_trace.png",
        "grad_norm.png",
        "grad_norm_per_layer.png",
        "fisher_diag_layers_per_layer.png",
    }
    assert names == {"report.md", "series.json"} | pngs
    for name in pngs:
        data = (path.parent / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_markdown_content(report):
    _, text = report
    assert text.startswith("# Digits MLP\n")
    for name in _series():
        assert f"### {name}" in text
    assert "| model | mlp\\|64 |" in text and "| final_loss | nan |" in text
    assert "Last value, at step 70: 3.25 ± 0.17; 7 estimates" in text
    assert "(1 non-finite left out)" in text
    assert "Last value, at step 4: 0.4;" in text
    assert "One line per layer, 2 layers; last at step 4." in text
    assert "No estimates were computed for this quantity." in text
    assert "![hessian/trace](hessian_trace.png)" in text


def test_series_json_round_trips(report):
    path, _ = report
    data = json.loads((path.parent / "series.json").read_text(encoding="utf-8"))
    assert data["title"] == "Digits MLP"
    assert math.isnan(data["series"]["hessian/trace"][3]["value"])
    expected = {"title": "Digits MLP", "summary": _summary(), "series": _series()}
    assert json.dumps(data, sort_keys=True) == json.dumps(expected, sort_keys=True)


def test_empty_series(tmp_path):
    path = write_report(tmp_path, {}, {}, "Nothing")
    text = path.read_text(encoding="utf-8")
    assert "No estimates were computed." in text
    assert "No summary values were given." in text
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.md", "series.json"]


def test_all_values_nan(tmp_path):
    rows = [{"step": 1, "value": float("nan"), "stderr": float("nan")}]
    text = write_report(tmp_path, {"q": rows}, {}, "t").read_text(encoding="utf-8")
    assert "No finite value was computed (1 non-finite left out)." in text
    assert (tmp_path / "report" / "q.png").read_bytes().startswith(PNG_MAGIC)


def test_names_that_map_to_one_file(tmp_path):
    rows = [{"step": 0, "value": 1.0}]
    write_report(tmp_path, {"a/b": rows, "a_b": rows, "??": rows}, {}, "t")
    names = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert names == ["a_b.png", "a_b_2.png", "quantity.png"]


def test_summary_values_json_cannot_encode(tmp_path):
    summary = {"weights": np.arange(3), "scale": np.float32(0.5), "path": tmp_path}
    path = write_report(tmp_path, {}, summary, "t")
    data = json.loads((path.parent / "series.json").read_text(encoding="utf-8"))
    assert data["summary"] == {
        "weights": [0, 1, 2],
        "scale": 0.5,
        "path": str(tmp_path),
    }
    assert "| scale | 0.5 |" in path.read_text(encoding="utf-8")


def test_backend_unchanged(tmp_path):
    backend = matplotlib.get_backend()
    write_report(tmp_path, {"q": [{"step": 0, "value": 1.0}]}, {}, "t")
    assert matplotlib.get_backend() == backend


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"value": 1.0}, r"series\['q'\]\[0\] = \{'value': 1.0\} has no 'step'"),
        ({"step": 1}, r"has neither 'value' nor 'per_layer'"),
        ({"step": 1, "per_layer": [1.0]}, r"\['per_layer'\] = \[1.0\] is not a dict"),
    ],
)
def test_bad_rows(tmp_path, row, message):
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path, {"q": [row]}, {}, "t")
    assert not (tmp_path / "report").exists()
