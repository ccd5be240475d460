"""Runs side by side: the report of a sweep and of ``classicnets report A B ... --compare``.

``compare_runs(run_dirs, curves)`` reads run folders of one experiment and works out what a
reader compares them by; ``write_comparison`` draws it into one self-contained HTML page:

- **the table**: one row per run; the config keys whose values differ between the runs, the
  status, the wall time, then each variant's final metrics (``summary.json``). In each metric's
  column the best run is marked, where the metric's name says which way is better
  (``better``: accuracies and F1 up, losses, NLLs, perplexities, distances and times down).
- **the curves**: one plot per metric of ``curves`` (the experiment's plot specs, e.g. the
  test accuracy against the step), a panel per variant, one line per run, from the runs'
  ``metrics.jsonl``.
- the config all the runs share, and each run's folder.

Reading takes the standard library only; matplotlib is imported to draw the plots.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from classicnets.files import atomic_write_text
from classicnets.report.curves import Curve
from classicnets.report.html import (
    ReportError,
    RunRecord,
    format_metric,
    is_number,
    key_value_table,
    metric_cell,
    page,
    plot_figure,
    read_run,
)

__all__ = [
    "ComparedRun",
    "Comparison",
    "Overlay",
    "better",
    "compare_runs",
    "draw_overlays",
    "write_comparison",
]

# Which way a metric is better, by the words in its name (first match wins). A GAN's losses and
# D's outputs have no better direction: they measure the two networks against each other.
_NEUTRAL = ("d_loss", "g_loss", "d_real", "d_fake", "diversity", "lr")
_HIGHER = ("per_s", "accuracy", "f1")
_LOWER = ("loss", "nll", "neg_elbo", "perplexity", "at_best_valid", "frechet", "mse", "bce",
          "recon", "error", "time_s")  # fmt: skip
MAX_LABEL_KEYS = 3  # a run differing in more keys is named by its folder (the table has them)
_NOT_COMPARED = ("steps", "step", "parameters", "warnings", "complete")  # counts, not outcomes


def better(key: str) -> str | None:
    """``"higher"``, ``"lower"`` or None (no better direction: a learning rate, a D(x)).

    >>> better("test_accuracy"), better("neg_elbo_nats"), better("tokens_per_s"), better("lr")
    ('higher', 'lower', 'higher', None)
    """
    name = key.lower()
    if name in _NEUTRAL or name.startswith(("lr_", "diversity")):
        return None
    if any(word in name for word in _HIGHER):
        return "higher"
    if any(word in name for word in _LOWER):
        return "lower"
    return None


@dataclass
class ComparedRun:
    """One row of the table.

    Attributes:
        record: the run folder as ``read_run`` read it.
        label: how the table's row and the plots' lines name it: its differing values
            (``lr=0.1, seed=2``), else (none, or more than three) the folder's name.
        values: its value of each differing key.
        metrics: per variant, the final metrics that are numbers.
    """

    record: RunRecord
    label: str
    values: dict[str, Any]
    metrics: dict[str, dict[str, float]]

    @property
    def status(self) -> str:
        if self.record.summary is None:
            return "unfinished"
        return str(self.record.summary.get("status", "unfinished"))

    @property
    def wall_time_s(self) -> float | None:
        wall = (self.record.summary or {}).get("wall_time_s")
        return float(wall) if is_number(wall) else None


@dataclass
class Overlay:
    """One comparison plot: metric ``key`` of the ``split`` records; per variant (a panel), per
    run label (a line), the ``(x, y)`` points."""

    file: str
    split: str
    key: str
    ylabel: str
    x: str
    logy: bool
    ylim: tuple[float, float] | None = None
    panels: dict[str, dict[str, tuple[list, list]]] = field(default_factory=dict)


@dataclass
class Comparison:
    """What ``write_comparison`` shows (see the module's docstring)."""

    experiment: str
    keys: list[str]
    shared: dict[str, Any]
    runs: list[ComparedRun]
    columns: list[tuple[str, str]]  # (variant, metric)
    best: dict[tuple[str, str], set[int]]  # column -> the rows holding its best value
    overlays: list[Overlay]


def compare_runs(run_dirs: Sequence[str | os.PathLike], curves: Sequence[Curve] = ()) -> Comparison:
    """Read the run folders and compare them (see the module's docstring).

    Raises:
        ReportError: fewer than two folders, one that cannot be read (``read_run``), or runs
            of different experiments; the message names the folders.
    """
    if len(run_dirs) < 2:
        raise ReportError(f"a comparison needs at least two run folders, got {len(run_dirs)}")
    records = [read_run(d) for d in run_dirs]
    experiments = {str(r.config.get("experiment")) for r in records}
    if len(experiments) != 1:
        found = ", ".join(f"{r.run_dir} ({r.config.get('experiment')})" for r in records)
        raise ReportError(f"runs of different experiments cannot be compared: {found}")
    configs = [_resolved(r) for r in records]
    names = list(dict.fromkeys(k for c in configs for k in c))
    keys = [k for k in names if len({_canonical(c.get(k)) for c in configs}) > 1]
    shared = {k: configs[0][k] for k in names if k not in keys and k in configs[0]}
    runs = []
    for record, config in zip(records, configs):
        values = {k: config.get(k) for k in keys}
        label = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
        if not label or len(keys) > MAX_LABEL_KEYS:
            label = record.run_dir.name
        runs.append(ComparedRun(record, label, values, _final_metrics(record)))
    _distinct_labels(runs)
    columns = list(dict.fromkeys((v, m) for run in runs for v, row in run.metrics.items()
                                 for m in row))  # fmt: skip
    best = {column: _best_rows(runs, column) for column in columns}
    overlays = _overlays(runs, curves)
    return Comparison(experiments.pop(), keys, shared, runs, columns, best, overlays)


def _resolved(record: RunRecord) -> dict[str, Any]:
    config = record.config.get("config")
    if not isinstance(config, dict):
        raise ReportError(f"{record.run_dir / 'config.json'}: no resolved config to compare")
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_quick"}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _final_metrics(record: RunRecord) -> dict[str, dict[str, float]]:
    variants = (record.summary or {}).get("variants")
    out: dict[str, dict[str, float]] = {}
    for variant, row in (variants if isinstance(variants, dict) else {}).items():
        if isinstance(row, dict):
            out[str(variant)] = {k: v for k, v in row.items()
                                 if is_number(v) and k not in _NOT_COMPARED}  # fmt: skip
    return out


def _distinct_labels(runs: list[ComparedRun]) -> None:
    """Runs whose differing values are the same (two seeds of one sweep?) get their folder's
    name added, so that no two rows or lines share a name."""
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.label} ({run.record.run_dir.name})"


def _best_rows(runs: list[ComparedRun], column: tuple[str, str]) -> set[int]:
    direction = better(column[1])
    values = {i: run.metrics.get(column[0], {}).get(column[1]) for i, run in enumerate(runs)}
    finite = {i: float(v) for i, v in values.items() if v is not None and math.isfinite(v)}
    if direction is None or not finite:
        return set()
    target = (max if direction == "higher" else min)(finite.values())
    # Ties as the table shows them: 6.0 s and 6.0 s are both the fastest, or neither.
    shown = format_metric(target, column[1])
    best = {i for i, v in finite.items() if format_metric(v, column[1]) == shown}
    return best if len(best) < len(finite) else set()  # all alike: nothing to choose between


def _overlays(runs: list[ComparedRun], curves: Sequence[Curve]) -> list[Overlay]:
    overlays: dict[tuple[str, str], Overlay] = {}
    for curve in curves:
        for key, _ in ((curve.key, curve.label), *curve.also):
            if (curve.split, key) in overlays:
                continue
            file = re.sub(r"[^A-Za-z0-9_.-]", "_", f"compare_{curve.split}_{key}.png")
            ylabel = curve.ylabel if key == curve.key else key.replace("_", " ")
            ylim = curve.ylim if key == curve.key else None
            overlay = Overlay(file, curve.split, key, ylabel, curve.x, curve.logy, ylim)
            for run in runs:
                for r in run.record.records:
                    value = r.get(key)
                    if r.get("split") != curve.split or not is_number(value):
                        continue
                    if not math.isfinite(value) or not is_number(r.get(curve.x)):
                        continue
                    step = r.get("step", 0)
                    if not is_number(step) or step < curve.from_step:  # a damaged record
                        continue
                    lines = overlay.panels.setdefault(str(r.get("variant", "")), {})
                    xs, ys = lines.setdefault(run.label, ([], []))
                    xs.append(r[curve.x])
                    ys.append(float(value))
            if overlay.panels:
                overlays[(curve.split, key)] = overlay
    return list(overlays.values())


def draw_overlays(comparison: Comparison, folder: str | os.PathLike) -> list[Path]:
    """Draw each ``Overlay`` into ``folder`` (its ``file``); the paths written."""
    from classicnets.report.plots import Panel, multi_panel_plot  # matplotlib: lazily

    written = []
    for overlay in comparison.overlays:
        xlabel = "training step" if overlay.x == "step" else overlay.x
        what = overlay.ylabel
        if overlay.split not in what:
            what = f"{overlay.split} {what}"
        panels = [Panel(title=f"{variant}: {what}", xlabel=xlabel, ylabel=overlay.ylabel,
                        series=lines, logy=overlay.logy, ylim=overlay.ylim)
                  for variant, lines in overlay.panels.items()]  # fmt: skip
        title = f"{what}: one line per run"
        written.append(multi_panel_plot(Path(folder) / overlay.file, panels, title=title))
    return written


def write_comparison(
    comparison: Comparison,
    out_path: str | os.PathLike,
    plots_dir: str | os.PathLike | None = None,
    title: str | None = None,
    intro: str = "",
) -> Path:
    """Write the comparison page to ``out_path``; its plots are also kept in ``plots_dir``
    (None: drawn in a temporary folder, embedded in the page only). ``intro`` is HTML put
    under the title. Returns ``out_path``."""
    title = title or f"{comparison.experiment}: {len(comparison.runs)} runs compared"
    with tempfile.TemporaryDirectory(prefix="classicnets-compare-") as scratch:
        plots = draw_overlays(comparison, plots_dir if plots_dir is not None else scratch)
        figures = "".join(plot_figure(p) for p in plots)
        table = _table(comparison, Path(out_path).parent)
        body = [f"<h1>{_e(title)}</h1>", intro, "<h2>Runs</h2>", table]
        if figures:
            body.append(f'<h2>Curves</h2><div class="plots">{figures}</div>')
        if comparison.shared:
            body += ["<h2>Shared configuration</h2>", key_value_table(comparison.shared)]
        return atomic_write_text(Path(out_path), page(title, "\n".join(body)))


def _link(run: ComparedRun, page_folder: Path) -> str:
    """The run's label, linked to its own report (relative to the page) when it has one."""
    report = run.record.run_dir / "report.html"
    if not report.is_file():
        return _e(run.label)
    href = Path(os.path.relpath(report.resolve(), page_folder.resolve())).as_posix()
    return f'<a href="{_e(quote(href))}">{_e(run.label)}</a>'


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(comparison: Comparison, page_folder: Path) -> str:
    head = ["#", "run", *comparison.keys, "status", "wall time"]
    head += [f"{variant} {metric}" for variant, metric in comparison.columns]
    rows = []
    for i, run in enumerate(comparison.runs):
        status = run.status
        css = "".join(ch for ch in status if ch.isalnum() or ch in "-_")
        cells = [f'<td class="num">{i + 1}</td>', f"<th>{_link(run, page_folder)}</th>"]
        cells += [f"<td><code>{_e(_short(run.values[k]))}</code></td>" for k in comparison.keys]
        cells.append(f'<td><span class="status status-{css}">{_e(status)}</span></td>')
        cells.append(metric_cell(run.wall_time_s, "wall_time_s"))
        for column in comparison.columns:
            value = run.metrics.get(column[0], {}).get(column[1])
            best = "best" if i in comparison.best[column] else ""
            cells.append(metric_cell(value, column[1], best) if value is not None else "<td></td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    folders = "".join(
        f"<li>{i + 1}. <code>{_e(run.record.run_dir)}</code> ({_e(format_metric(run.status))})</li>"
        for i, run in enumerate(comparison.runs)
    )
    head_html = "".join(f"<th>{_e(h)}</th>" for h in head)
    return (
        f"<table><thead><tr>{head_html}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        '<p class="meta">&#9733; the best run of a column, where the metric has a better '
        f"direction.</p><h3>Folders</h3><ul>{folders}</ul>"
    )
