"""The table of runs: ``classicnets runs [DIR]``, one line per run folder under DIR.

``list_runs(root)`` reads each run folder's ``config.json`` (experiment, creation time) and
``summary.json`` (status, each variant's metrics, wall time), and asks its lock whether a
process holds it now (then the run is ``running``, whatever an earlier session's summary says).
A folder is a run folder when it holds ``config.json``, ``metrics.jsonl``, ``run.lock`` or
``checkpoints/``; a sweep folder (``sweep.json``) is looked into, each of its points a line.
One whose files cannot be read or make no sense is listed as ``damaged``, with what is wrong,
and never stops the listing. Standard library only (no torch): it is quick
on a folder of hundreds of runs.

Statuses: ``running`` (a live lock), ``complete``, ``stopped`` (by a signal or ``stop_after``;
``classicnets resume`` continues it), ``diverged`` (a NaN or exploding loss), ``failed`` (it
ended without a summary: killed, or an error before the end; ``resume`` continues it from its
last checkpoint, if it has one), ``damaged``.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from classicnets.files import LOCK_NAME, SWEEP_NAME, holder_pid, read_json_object
from classicnets.report.html import ReportError, format_duration, format_metric, is_number

__all__ = ["MAIN_METRICS", "RunEntry", "format_runs", "list_runs"]

# The metric a variant is judged by, first found first: accuracy for the classifiers, then
# perplexity, the GAN's Frechet distance, the VAE's negative ELBO and the autoencoder's error.
MAIN_METRICS = ("test_accuracy", "test_perplexity", "test_frechet_distance", "neg_elbo_nats",
                "test_mse_per_pixel", "test_loss")  # fmt: skip
_MARKERS = ("config.json", "metrics.jsonl", LOCK_NAME, "checkpoints")


@dataclass
class RunEntry:
    """One line of the table.

    Attributes:
        folder: the run folder.
        experiment: its experiment (None when unreadable).
        created: ``config.json``'s creation time (ISO 8601), else the folder's modification
            time.
        status: running, complete, stopped, diverged, failed or damaged.
        metrics: per variant ``(name, value)`` of its main metric (``MAIN_METRICS``).
        wall_time_s: the summary's wall time (None before the first summary).
        problem: for a damaged folder, what is wrong with it.
    """

    folder: Path
    experiment: str | None
    created: str
    status: str
    metrics: dict[str, tuple[str, float]] = field(default_factory=dict)
    wall_time_s: float | None = None
    problem: str | None = None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["folder"] = str(self.folder)
        out["metrics"] = {v: {"name": n, "value": x} for v, (n, x) in self.metrics.items()}
        return out


def list_runs(root: str | os.PathLike) -> list[RunEntry]:
    """The run folders in ``root`` (``root`` itself when it is one), sorted by creation.

    Raises:
        ReportError: ``root`` does not exist or is not a folder.
    """
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root}: no such folder (runs are listed from a folder of runs)")
    if not root.is_dir():
        raise ReportError(f"{root}: a file, not a folder of runs")
    if _is_run_folder(root) and not _is_sweep(root):
        folders = [root]
    else:
        folders = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            folders += _subfolders(folder) if _is_sweep(folder) else [folder]
        if _is_sweep(root):
            folders = _subfolders(root)
    entries = [_entry(f) for f in folders if _is_run_folder(f)]
    return sorted(entries, key=lambda e: (e.created, str(e.folder)))


def _is_run_folder(path: Path) -> bool:
    return any((path / name).exists() for name in _MARKERS)


def _is_sweep(path: Path) -> bool:
    """A sweep folder (``classicnets sweep``): its points are run folders, listed each."""
    return (path / SWEEP_NAME).is_file()


def _subfolders(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except OSError:
        return []


def _entry(folder: Path) -> RunEntry:
    created = _modified(folder)
    try:
        config = _read_object(folder / "config.json")
        summary_path = folder / "summary.json"
        summary = _read_object(summary_path) if summary_path.exists() else None
    except ReportError as exc:
        return RunEntry(folder, None, created, "damaged", problem=str(exc))
    experiment = config.get("experiment")
    if not isinstance(experiment, str):
        problem = f"{folder / 'config.json'}: no experiment name"
        return RunEntry(folder, None, created, "damaged", problem=problem)
    if isinstance(config.get("created"), str):
        created = config["created"]
    entry = RunEntry(folder, experiment, created, "failed")
    if summary is not None:
        entry.status = str(summary.get("status", "failed"))
        wall = summary.get("wall_time_s")
        entry.wall_time_s = float(wall) if is_number(wall, finite=True) else None
        variants = summary.get("variants")
        for variant, fields in (variants if isinstance(variants, dict) else {}).items():
            found = _main_metric(fields)
            if found is not None:
                entry.metrics[str(variant)] = found
    if holder_pid(folder) is not None:
        entry.status = "running"
    return entry


def _read_object(path: Path) -> dict[str, Any]:
    return read_json_object(path, ReportError)


def _main_metric(fields: Any) -> tuple[str, float] | None:
    if not isinstance(fields, dict):
        return None
    for name in MAIN_METRICS:
        if is_number(fields.get(name), finite=True):
            return name, float(fields[name])
    return None


def _modified(folder: Path) -> str:
    try:
        stamp = folder.stat().st_mtime
    except OSError:
        return ""
    return _dt.datetime.fromtimestamp(stamp).isoformat(timespec="seconds")


def format_runs(entries: list[RunEntry]) -> str:
    """The table as text: a header, then per run experiment, created, status, wall time, each
    variant's main metric and the folder (a damaged one: what is wrong)."""
    if not entries:
        return "no run folders"
    rows = [("experiment", "created", "status", "wall", "main metric per variant", "folder")]
    for e in entries:
        if e.problem is not None:
            metrics = e.problem
        else:
            metrics = ", ".join(
                f"{v} {name} {format_metric(value, name)}" for v, (name, value) in e.metrics.items()
            )
        wall = format_duration(e.wall_time_s) if e.wall_time_s is not None else "-"
        rows.append((e.experiment or "?", e.created, e.status, wall, metrics or "-", str(e.folder)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in rows
    )
