"""The HTML report of a run folder: one self-contained page that can be mailed.

A run folder (see ``DESIGN.md``, "Runs") holds::

    config.json     {"experiment": ..., "config": {...}, "created": ..., "classicnets_version": ...,
                     "torch_version": ...}                                      (required)
    summary.json    {"title": ..., "wall_time_s": ..., "variants": {name: {metric: value}},
                     "notes": [...], "status": "complete" | "running" | "stopped"}  (optional)
    metrics.jsonl   one JSON object per logged step, e.g. {"variant": "bn", "step": 500,
                     "split": "test", "accuracy": 0.95, "loss": 0.2}             (optional)
    plots/*.png

``write_report`` turns that into ``report.html``: title, status, wall time, the final metrics per
variant, the notes, the last logged metrics per variant and split, every plot (embedded as a
base64 data URI, so the page is one file), the full config and the versions. Everything taken from
the folder is HTML-escaped. ``write_combined_report`` puts several runs on one page.

Standard library only: no torch, no matplotlib, so a report can be rebuilt anywhere.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from classicnets import __version__
from classicnets.files import atomic_write_text, hold_folder

__all__ = [
    "ReportError",
    "RunRecord",
    "format_duration",
    "format_metric",
    "is_number",
    "key_value_table",
    "metric_cell",
    "page",
    "plot_figure",
    "read_run",
    "write_combined_report",
    "write_report",
]

_SUMMARY_KEYS = ("title", "wall_time_s", "variants", "notes", "status")  # shown in their own place
_METRIC_ID_KEYS = ("variant", "split")  # identify a metrics.jsonl record; not metrics themselves


class ReportError(ValueError):
    """A run folder cannot be reported: missing or unreadable ``config.json``, bad JSON, ...

    The message names the offending path.
    """


@dataclass
class RunRecord:
    """What a report shows of one run folder, as read by ``read_run``.

    Args:
        run_dir: the run folder.
        config: the parsed ``config.json`` (the whole file, ``experiment``/``config``/... keys).
        summary: the parsed ``summary.json``, or ``None`` when the file is absent.
        last_metrics: ``(variant, split)`` -> the latest value of every field logged for that
            pair in ``metrics.jsonl`` (``""`` where a record has no variant or split).
        skipped_lines: ``metrics.jsonl`` lines that were not JSON objects (e.g. the half-written
            last line of a run that is still going).
        plots: the PNG files in ``plots/``, sorted by name.
        records: every record of ``metrics.jsonl`` that is a JSON object, in order.
    """

    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None = None
    last_metrics: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    skipped_lines: int = 0
    plots: list[Path] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def title(self) -> str:
        """``summary["title"]``, else the experiment name, else the folder name."""
        summary_title = (self.summary or {}).get("title")
        if summary_title:
            return str(summary_title)
        experiment = self.config.get("experiment")
        return str(experiment) if experiment else self.run_dir.name


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def format_metric(value: Any, key: str = "") -> str:
    """Format one metric value for a table, using its key as a hint.

    Rules, in order:

    - ``None`` -> ``"–"``; booleans -> ``"yes"``/``"no"``; strings as they are.
    - NaN and infinities -> ``"nan"``, ``"inf"``, ``"-inf"``.
    - key containing ``"accuracy"``: a fraction shown as a percentage with 2 decimals.
    - key ending in ``"_s"`` (seconds): a duration, ``"12.3 s"``, ``"1 min 23 s"``,
      ``"2 h 05 min"``.
    - other integers with thousands separators; other floats with 4 significant digits.
    - anything else (lists, dicts) as compact JSON.

    Args:
        value: the value to format.
        key: the metric's name, e.g. ``"test_accuracy"``, ``"wall_time_s"``, ``"loss"``.

    Returns:
        The formatted text (not yet HTML-escaped).

    >>> format_metric(0.97234, "test_accuracy")
    '97.23%'
    >>> format_metric(83.2, "wall_time_s")
    '1 min 23 s'
    >>> format_metric(0.123456, "loss"), format_metric(50000, "step")
    ('0.1235', '50,000')
    """
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)  # 'nan', 'inf', '-inf'
        if "accuracy" in key:
            return f"{100.0 * value:.2f}%"
        if key.endswith("_s"):
            return format_duration(float(value))
        if isinstance(value, int):
            return f"{value:,}"
        return f"{value:.4g}"
    return json.dumps(value, default=str)


def format_duration(seconds: float) -> str:
    """``"12.3 s"`` under a minute, ``"1 min 23 s"`` under an hour, ``"2 h 05 min"`` beyond.

    Args:
        seconds: the duration (negative durations keep their sign).

    >>> format_duration(4.25), format_duration(83.2), format_duration(7500)
    ('4.2 s', '1 min 23 s', '2 h 05 min')
    """
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        minutes, secs = divmod(whole, 60)
        return f"{minutes} min {secs} s"
    hours, rest = divmod(whole, 3600)
    return f"{hours} h {rest // 60:02d} min"


# --------------------------------------------------------------------------------------------
# Reading a run folder
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON: {exc}") from exc


def read_run(run_dir: str | os.PathLike[str]) -> RunRecord:
    """Read what a report shows from a run folder.

    Args:
        run_dir: the run folder.

    Returns:
        The ``RunRecord``.

    Raises:
        ReportError: the folder does not exist, ``config.json`` is missing or is not a JSON
            object, or ``summary.json`` is present but not a JSON object; the message names the
            path.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a run folder (no such directory)")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ReportError(f"{config_path}: missing; {run_dir} is not a run folder")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ReportError(f"{config_path}: expected a JSON object, got {type(config).__name__}")

    summary = None
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = _read_json(summary_path)
        if not isinstance(summary, dict):
            raise ReportError(
                f"{summary_path}: expected a JSON object, got {type(summary).__name__}"
            )

    last_metrics: dict[tuple[str, str], dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    skipped = 0
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        try:
            lines = metrics_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ReportError(f"{metrics_path}: cannot read: {exc}") from exc
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(record, dict):
                skipped += 1
                continue
            records.append(record)
            pair = (str(record.get("variant", "")), str(record.get("split", "")))
            fields_ = {k: v for k, v in record.items() if k not in _METRIC_ID_KEYS}
            last_metrics.setdefault(pair, {}).update(fields_)

    plots_dir = run_dir / "plots"
    plots = sorted(plots_dir.glob("*.png")) if plots_dir.is_dir() else []
    return RunRecord(run_dir, config, summary, last_metrics, skipped, plots, records)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
:root { --fg: #1d2329; --muted: #5c6670; --line: #d9dee3; --head: #f3f5f7; --accent: #2f6db5; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px; color: var(--fg); background: #fff;
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; }
h1 { font-size: 1.7em; margin: 0 0 0.3em; }
h2 { font-size: 1.35em; margin: 1.6em 0 0.5em; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.1em; margin: 1.4em 0 0.4em; }
section.run + section.run { margin-top: 2.5em; padding-top: 1em;
  border-top: 3px solid var(--line); }
.meta { color: var(--muted); margin: 0.2em 0 1em; }
.meta span + span::before { content: " · "; }
.status { display: inline-block; padding: 0 0.55em; border-radius: 0.8em; font-size: 0.9em;
  font-weight: 600; background: #e6e9ec; color: var(--fg); }
.status-complete { background: #dcf2e0; color: #17642b; }
.status-running { background: #dde9fa; color: #1f4f8f; }
.status-stopped { background: #fbe3d6; color: #8a3a0d; }
.status-diverged, .status-failed, .status-damaged { background: #f8dcdc; color: #8f1d1d; }
td.best { font-weight: 700; background: #e6f4e8; }
td.best::after { content: " \2605"; color: #17642b; }
table { border-collapse: collapse; margin: 0.4em 0 1em; font-size: 0.93em; }
th, td { border: 1px solid var(--line); padding: 0.25em 0.7em; text-align: left;
  vertical-align: top; }
th { background: var(--head); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font: 0.9em/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  white-space: pre-wrap; word-break: break-word; }
ul.notes li { margin: 0.2em 0; }
.plots { display: flex; flex-wrap: wrap; gap: 18px; }
figure { margin: 0; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 0.9em; text-align: center; }
a { color: var(--accent); }
footer { margin-top: 3em; color: var(--muted); font-size: 0.85em; }
""".strip()


def _e(value: Any) -> str:
    """HTML-escape ``str(value)``, quotes included (safe in text and attribute values)."""
    return html.escape(str(value), quote=True)


def is_number(value: Any, finite: bool = False) -> bool:
    """Whether ``value`` is an int or float and not a bool (JSON's true is no metric), and
    with ``finite`` also not NaN or infinite."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return not finite or math.isfinite(value)


def metric_cell(value: Any, key: str, css: str = "") -> str:
    """One table cell of a metric, formatted by ``format_metric``: numbers right-aligned;
    ``css`` adds classes (``"best"``: marked as the best of its column)."""
    classes = " ".join(c for c in ("num" if is_number(value) else "", css) if c)
    cls = f' class="{_e(classes)}"' if classes else ""
    return f"<td{cls}>{_e(format_metric(value, key))}</td>"


def _ordered_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The union of the rows' keys, in order of first appearance."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return list(keys)


def _metrics_table(first_header: str, rows: Mapping[str, Mapping[str, Any]]) -> str:
    columns = _ordered_keys([r if isinstance(r, Mapping) else {} for r in rows.values()])
    head = "".join(f"<th>{_e(c)}</th>" for c in [first_header, *columns])
    body = []
    for name, row in rows.items():
        if not isinstance(row, Mapping):  # a variant given as a bare value
            row = {"value": row}
        cells = "".join(metric_cell(row[c], c) if c in row else "<td></td>" for c in columns)
        body.append(f"<tr><th>{_e(name)}</th>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _last_metrics_table(last: Mapping[tuple[str, str], Mapping[str, Any]]) -> str:
    columns = _ordered_keys(list(last.values()))
    if "step" in columns:  # the step first: it says how far the run got
        columns.remove("step")
        columns.insert(0, "step")
    head = "".join(f"<th>{_e(c)}</th>" for c in ["variant", "split", *columns])
    body = []
    for (variant, split), row in last.items():
        cells = "".join(metric_cell(row[c], c) if c in row else "<td></td>" for c in columns)
        body.append(f"<tr><th>{_e(variant)}</th><td>{_e(split)}</td>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _config_value(value: Any) -> str:
    """Strings as they are; everything else as the JSON it was saved as (nested values too)."""
    if isinstance(value, str):
        return _e(value)
    return f"<code>{_e(json.dumps(value, default=str))}</code>"


def key_value_table(items: Mapping[str, Any]) -> str:
    """A table of ``items``, one row each: the key, then the value (strings as they are, others
    as JSON)."""
    rows = "".join(
        f"<tr><th>{_e(k)}</th><td>{_config_value(v)}</td></tr>" for k, v in items.items()
    )
    return f"<table><tbody>{rows}</tbody></table>"


def plot_figure(path: Path) -> str:
    """The PNG at ``path`` as a figure embedded in the page (a data URI), with its caption."""
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as exc:
        raise ReportError(f"{path}: cannot read plot: {exc}") from exc
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(path.stem)}">'
        f"<figcaption>{_e(_caption(path))}</figcaption></figure>"
    )


def _caption(path: Path) -> str:
    """The plot's name and, for an image grid (``report.grid.write_grid``), the title and row
    names its JSON holds; a JSON that cannot be read or is not a grid's adds nothing."""
    try:
        record = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return path.name
    if not isinstance(record, dict):
        return path.name
    parts = [path.name]
    if isinstance(record.get("title"), str) and record["title"]:
        parts.append(record["title"])
    rows = record.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, (str, int)) for r in rows):
        parts.append("rows: " + ", ".join(map(str, rows)))
    return " — ".join(parts)


def _run_section(record: RunRecord, title: str, h: int, anchor: str | None = None) -> str:
    """The body of one run; ``h`` is the heading level of the run's title (sections get h+1)."""
    sub = h + 1
    summary = record.summary or {}
    config = record.config
    id_attr = f' id="{_e(anchor)}"' if anchor else ""
    parts = [f'<section class="run"{id_attr}>']
    parts.append(f"<h{h}>{_e(title)}</h{h}>")

    status = summary.get("status") if record.summary is not None else None
    meta = []
    if status is None:
        meta.append('<span class="status">no summary.json</span>')
    else:
        css_status = "".join(ch for ch in str(status) if ch.isalnum() or ch in "-_")
        meta.append(f'<span class="status status-{css_status}">{_e(status)}</span>')
    if "wall_time_s" in summary:
        wall_time = format_metric(summary["wall_time_s"], "wall_time_s")
        meta.append(f"<span>wall time {_e(wall_time)}</span>")
    if config.get("experiment"):
        meta.append(f"<span>experiment <b>{_e(config['experiment'])}</b></span>")
    if config.get("created"):
        meta.append(f"<span>created {_e(config['created'])}</span>")
    meta.append(f"<span>folder <code>{_e(record.run_dir)}</code></span>")
    parts.append(f'<p class="meta">{"".join(meta)}</p>')

    variants = summary.get("variants")
    if isinstance(variants, Mapping) and variants:
        parts.append(f"<h{sub}>Final metrics</h{sub}>")
        parts.append(_metrics_table("variant", variants))
    extra = {k: v for k, v in summary.items() if k not in _SUMMARY_KEYS}
    if extra:
        rows = "".join(f"<tr><th>{_e(k)}</th>{metric_cell(v, k)}</tr>" for k, v in extra.items())
        parts.append(f"<table><tbody>{rows}</tbody></table>")

    notes = summary.get("notes")
    if notes:
        if isinstance(notes, str):
            notes = [notes]
        items = "".join(f"<li>{_e(n)}</li>" for n in notes)
        parts.append(f'<h{sub}>Notes</h{sub}><ul class="notes">{items}</ul>')

    if record.last_metrics or record.skipped_lines:
        parts.append(f"<h{sub}>Last logged metrics</h{sub}>")
        if record.last_metrics:
            parts.append(_last_metrics_table(record.last_metrics))
        if record.skipped_lines:
            parts.append(
                f'<p class="meta">{record.skipped_lines} unreadable line(s) of metrics.jsonl '
                "skipped.</p>"
            )

    if record.plots:
        figures = "".join(plot_figure(p) for p in record.plots)
        parts.append(f'<h{sub}>Plots</h{sub}><div class="plots">{figures}</div>')

    resolved = config.get("config")
    if isinstance(resolved, Mapping):
        other = {k: v for k, v in config.items() if k != "config"}
    else:  # a config.json without the "config" wrapper: show the whole file
        resolved, other = config, {}
    parts.append(f"<h{sub}>Configuration</h{sub}>")
    parts.append(key_value_table(resolved) if resolved else '<p class="meta">(empty)</p>')
    versions = {k: v for k, v in other.items() if k not in ("experiment", "created")}
    if versions:
        parts.append(f"<h{sub}>Versions</h{sub}>")
        parts.append(key_value_table(versions))
    parts.append("</section>")
    return "\n".join(parts)


def page(title: str, body: str) -> str:
    """A whole self-contained HTML page: ``body`` (HTML) under ``title``, with the style."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n<main>\n"
        f"{body}\n"
        f"<footer>Written by classicnets {_e(__version__)} on {_e(now)}.</footer>\n"
        "</main>\n</body>\n</html>\n"
    )


def write_report(
    run_dir: str | os.PathLike[str],
    title: str | None = None,
    out_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the self-contained HTML report of one run folder.

    Args:
        run_dir: the run folder (must hold ``config.json``).
        title: page title; default ``summary.json``'s title, else the experiment name.
        out_path: where to write; default ``run_dir / "report.html"``.

    Returns:
        The path of the written report.

    Raises:
        ReportError: the folder cannot be read (see ``read_run``); the message names the path.
    """
    record = read_run(run_dir)
    title = title or record.title
    body = _run_section(record, title, h=1)
    out = Path(out_path) if out_path is not None else record.run_dir / "report.html"
    if not out.resolve().is_relative_to(record.run_dir.resolve()):
        return atomic_write_text(out, page(title, body))
    with hold_folder(record.run_dir):  # one writer per run folder (re-entrant for the run itself)
        return atomic_write_text(out, page(title, body))


def write_combined_report(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """Write one HTML page with an overview table and a section per run.

    For ``classicnets report RUN_DIR [RUN_DIR ...] -o FILE``. Every folder is read before anything
    is written, so a bad folder leaves no partial page.

    Args:
        run_dirs: the run folders, in the order they appear on the page.
        out_path: the HTML file to write (its folder is created if missing).
        title: page title; default ``"classicnets report: N runs"``.

    Returns:
        ``out_path`` as a ``Path``.

    Raises:
        ReportError: no folders given, or one cannot be read (the message names it).
    """
    if not run_dirs:
        raise ReportError("no run folders given")
    records = [read_run(d) for d in run_dirs]
    title = title or f"classicnets report: {len(records)} run{'s' if len(records) != 1 else ''}"

    overview = []
    for i, record in enumerate(records, start=1):
        summary = record.summary or {}
        status = summary.get("status", "–") if record.summary is not None else "no summary.json"
        wall = summary.get("wall_time_s")
        overview.append(
            f'<tr><td class="num">{i}</td><td><a href="#run-{i}">{_e(record.title)}</a></td>'
            f"<td>{_e(record.config.get('experiment', ''))}</td><td>{_e(status)}</td>"
            f'<td class="num">{_e(format_metric(wall, "wall_time_s"))}</td>'
            f"<td><code>{_e(record.run_dir)}</code></td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>" for h in ("#", "run", "experiment", "status", "wall time", "folder")
    )
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(overview)}</tbody></table>",
    ]
    body += [_run_section(r, r.title, h=2, anchor=f"run-{i}") for i, r in enumerate(records, 1)]
    return atomic_write_text(Path(out_path), page(title, "\n".join(body)))
