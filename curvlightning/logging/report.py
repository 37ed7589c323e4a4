"""Write a human-readable report of a run: Markdown, PNG figures and the raw data.

:func:`write_report` leaves in ``<run_dir>/report/``:

- ``report.md``: the summary as a table, then one figure per quantity with a caption
  giving its last finite value and standard error;
- one PNG per quantity (value against step, with a band of +-2 standard errors where
  the rows carry ``"stderr"``), and a second PNG with one line per layer for a
  quantity whose rows carry ``"per_layer"``;
- ``series.json``: the title, the summary and every row as given, so nothing the
  figures leave out is lost.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, so the
report never changes the user's pyplot backend.

Example:
    >>> series = {"hessian/trace": [{"step": 10, "value": 1.2, "stderr": 0.1}]}
    >>> write_report("runs/0", series, {"lr": 1e-3}, "Digits MLP")  # doctest: +SKIP
    PosixPath('runs/0/report/report.md')
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["write_report"]

_MAX_LEGEND_LAYERS = 12
_NO_ESTIMATES = "No estimates were computed."


def write_report(
    run_dir: str | Path,
    series: Mapping[str, Sequence[Mapping[str, Any]]],
    summary: Mapping[str, Any],
    title: str,
) -> Path:
    """Write the report of a run into ``run_dir/report``.

    Args:
        run_dir: The run folder; ``report/`` is created inside it (and ``run_dir``
            too when missing). Files from an earlier report are overwritten.
        series: Maps a quantity name (e.g. ``"hessian/trace"``) to its rows in step
            order. A row holds ``"step"`` and ``"value"``, optionally ``"stderr"``,
            and optionally ``"per_layer"``, a dict from layer name to value; a row
            may carry ``"per_layer"`` without ``"value"``. NaN and infinite values
            are kept in ``series.json``, drawn as gaps and left out of captions.
        summary: Values to list in the summary table (hyperparameters, final
            metrics); anything JSON cannot encode is written with ``str``.
        title: The report's heading.

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: If a row lacks ``"step"``, has neither ``"value"`` nor
            ``"per_layer"``, or has a ``"per_layer"`` that is not a dict.
    """
    for name, rows in series.items():
        _check_rows(name, rows)
    report_dir = Path(run_dir) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    _write_json(report_dir / "series.json", title, series, summary)
    sections = [
        _quantity_section(report_dir, name, rows, stem)
        for (name, rows), stem in zip(series.items(), _file_stems(series), strict=True)
    ]
    path = report_dir / "report.md"
    path.write_text(_markdown(title, summary, sections), encoding="utf-8")
    return path


def _check_rows(name: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Raise if a row of the series ``name`` cannot be drawn."""
    for index, row in enumerate(rows):
        if "step" not in row:
            raise ValueError(
                f"series[{name!r}][{index}] = {dict(row)!r} has no 'step'; give "
                "every row the training step it was computed at."
            )
        if not isinstance(row.get("per_layer", {}), Mapping):
            raise ValueError(
                f"series[{name!r}][{index}]['per_layer'] = {row['per_layer']!r} is "
                "not a dict; pass a dict from layer name to value."
            )
        if "value" not in row and "per_layer" not in row:
            raise ValueError(
                f"series[{name!r}][{index}] = {dict(row)!r} has neither 'value' nor "
                "'per_layer'; give every row at least one of them."
            )


def _write_json(
    path: Path,
    title: str,
    series: Mapping[str, Sequence[Mapping[str, Any]]],
    summary: Mapping[str, Any],
) -> None:
    """Write the raw report data; NaN and infinities use Python's JSON tokens."""
    data = {"title": title, "summary": summary, "series": series}
    path.write_text(json.dumps(data, indent=1, default=_jsonable), encoding="utf-8")


def _jsonable(value: Any) -> Any:
    """Convert a value JSON cannot encode: arrays and scalars to lists and numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    return str(value)


def _file_stems(series: Mapping[str, Any]) -> list[str]:
    """Give each quantity a distinct file-system-safe file stem."""
    stems: list[str] = []
    for name in series:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "quantity"
        candidate, count = stem, 1
        while candidate in stems:
            count += 1
            candidate = f"{stem}_{count}"
        stems.append(candidate)
    return stems


def _quantity_section(
    report_dir: Path, name: str, rows: Sequence[Mapping[str, Any]], stem: str
) -> str:
    """Draw the figures of one quantity and return its Markdown section."""
    lines = [f"### {_escape(name)}", ""]
    if not rows:
        return "\n".join([*lines, "No estimates were computed for this quantity."])
    if any("value" in row for row in rows):
        _save(_value_figure(name, rows), report_dir / f"{stem}.png")
        lines += [f"![{_escape(name)}]({stem}.png)", "", _value_caption(rows), ""]
    if any("per_layer" in row for row in rows):
        _save(_layer_figure(name, rows), report_dir / f"{stem}_per_layer.png")
        lines += [
            f"![{_escape(name)} per layer]({stem}_per_layer.png)",
            "",
            _layer_caption(rows),
            "",
        ]
    return "\n".join(lines).rstrip()


def _new_figure(name: str, y_label: str) -> tuple[Figure, Axes]:
    """Create a figure on the Agg canvas, with labelled axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(name)
    axes.set_xlabel("step")
    axes.set_ylabel(y_label)
    axes.grid(alpha=0.3)
    return figure, axes


def _value_figure(name: str, rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Plot value against step, with a +-2 standard error band where known."""
    figure, axes = _new_figure(name, "value")
    steps = [float(row["step"]) for row in rows if "value" in row]
    values = [_number(row["value"]) for row in rows if "value" in row]
    axes.plot(steps, values, marker="o", markersize=3, label="estimate")
    if any("stderr" in row for row in rows):
        errors = [_number(row.get("stderr")) for row in rows if "value" in row]
        lower = [v - 2 * e for v, e in zip(values, errors, strict=True)]
        upper = [v + 2 * e for v, e in zip(values, errors, strict=True)]
        axes.fill_between(steps, lower, upper, alpha=0.25, label="±2 stderr")
        axes.legend()
    return figure


def _layer_figure(name: str, rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Plot one line per layer against step."""
    figure, axes = _new_figure(name, "value per layer")
    layers = _layer_names(rows)
    for layer in layers:
        points = [
            (float(row["step"]), _number(row["per_layer"].get(layer)))
            for row in rows
            if "per_layer" in row
        ]
        axes.plot(*zip(*points, strict=True), marker=".", label=layer)
    if len(layers) <= _MAX_LEGEND_LAYERS:
        axes.legend(fontsize="small")
    return figure


def _save(figure: Figure, path: Path) -> None:
    """Write a figure as PNG."""
    figure.savefig(path, format="png", dpi=100)


def _layer_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """List the layer names of a series, in order of first appearance."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.get("per_layer", {})))
    return list(names)


def _number(value: Any) -> float:
    """Convert a value to float; a missing or non-numeric one becomes NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _value_caption(rows: Sequence[Mapping[str, Any]]) -> str:
    """Describe the last finite value of a series and its standard error."""
    finite = [r for r in rows if "value" in r and math.isfinite(_number(r["value"]))]
    skipped = sum("value" in r for r in rows) - len(finite)
    note = f" ({skipped} non-finite left out)" if skipped else ""
    if not finite:
        return f"No finite value was computed{note}."
    last = finite[-1]
    stderr = _number(last.get("stderr"))
    error = f" ± {_format(stderr)}" if math.isfinite(stderr) else ""
    return (
        f"Last value, at step {last['step']}: {_format(_number(last['value']))}"
        f"{error}; {len(finite)} estimates{note}."
    )


def _layer_caption(rows: Sequence[Mapping[str, Any]]) -> str:
    """Describe the per-layer figure: its layer count and last step."""
    layered = [row for row in rows if "per_layer" in row]
    layers = _layer_names(layered)
    legend = "" if len(layers) <= _MAX_LEGEND_LAYERS else " (too many for a legend)"
    return (
        f"One line per layer, {len(layers)} layers{legend}; last at step "
        f"{layered[-1]['step']}."
    )


def _markdown(title: str, summary: Mapping[str, Any], sections: list[str]) -> str:
    """Assemble the report text."""
    lines = [f"# {_escape(title)}", "", "## Summary", "", *_summary_table(summary)]
    lines += ["", "## Estimates", ""]
    lines += ["\n\n".join(sections) if sections else _NO_ESTIMATES]
    return "\n".join(lines) + "\n"


def _summary_table(summary: Mapping[str, Any]) -> list[str]:
    """Render the summary as a two-column Markdown table."""
    if not summary:
        return ["No summary values were given."]
    rows = [f"| {_escape(k)} | {_escape(_format(v))} |" for k, v in summary.items()]
    return ["| quantity | value |", "| --- | --- |", *rows]


def _format(value: Any) -> str:
    """Format a number to 4 significant digits, anything else with ``str``."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{float(value):.4g}"
    return str(value)


def _escape(text: Any) -> str:
    """Escape the characters that would break a Markdown table cell or a line."""
    return str(text).replace("|", "\\|").replace("\n", " ")
