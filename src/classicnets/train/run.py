"""The run folder every experiment writes (DESIGN.md, "Runs").

runs/<experiment>-<timestamp>/
  config.json      the experiment name and its fully resolved config
  metrics.jsonl    one JSON object per logged step or evaluation
  summary.json     final figures and status, for the report
  checkpoints/     safetensors + JSON trainer states (see ``checkpoint``)
  plots/           PNG figures
  report.html      the self-contained report
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: metrics appends are then unlocked
    fcntl = None

from classicnets.files import (
    LOCK_NAME,
    FolderLockedError,
    atomic_write_text,
    hold_folder,
    holder_pid,
)

__all__ = ["RunDir", "RunError", "hold_run", "hold_run_writing", "new_run_dir"]


class RunError(ValueError):
    """A run folder is missing or unreadable."""


def json_default(value):
    """``json.dumps``'s ``default`` for what records and results hold beyond JSON: NumPy arrays
    and scalars and tensors (as lists or numbers), paths (as strings)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _clean(value):
    """NaN and infinities are not JSON; write them as strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _refuse_occupied(path: Path, ours: bool = False) -> None:
    """A run never goes into a folder holding anything but (at most) its own lock file.
    ``ours``: this process holds the folder's lock (the check after taking it)."""
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} is a file, not a folder; choose a new folder")
    if not path.is_dir():
        return
    holder = None if ours else holder_pid(path)
    if holder is not None:  # a run is starting or going on there right now
        who = f"PID {holder}" if holder > 0 else "another process"
        raise FolderLockedError(
            f"{path} is in use by another classicnets process ({who}); choose another --out"
        )
    if (path / "config.json").exists():
        raise RunError(
            f"{path} already holds a run (config.json exists); use 'classicnets resume {path}' "
            f"or choose another --out"
        )
    entries = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME)
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RunError(
            f"--out {path} is not empty and is not a run folder (it holds {shown}); "
            f"choose a new or empty folder, nothing was written"
        )


@contextmanager
def new_run_dir(out: str | os.PathLike | None, experiment: str) -> Iterator[Path]:
    """A fresh run folder, locked for the ``with`` block: ``out`` itself if given (missing or
    empty), else ``runs/<experiment>-<YYYYmmdd-HHMMSS>`` (with a suffix if that exists).

    The folder is checked again once locked, so two runs racing for one ``--out`` cannot both
    start in it: the loser is refused (``RunError`` or ``FolderLockedError``).
    """
    if out is not None:
        path = Path(out)
        _refuse_occupied(path)
        path.mkdir(parents=True, exist_ok=True)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path("runs") / f"{experiment}-{stamp}"
        base.parent.mkdir(parents=True, exist_ok=True)
        path, n = base, 1
        while True:
            try:
                path.mkdir()  # atomic: exactly one process creates a given name
                break
            except FileExistsError:
                n += 1
                path = base.with_name(f"{base.name}-{n}")
    with hold_folder(path):
        _refuse_occupied(path, ours=True)
        yield path


@contextmanager
def hold_run(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of the existing run folder ``path`` for the ``with`` block (for resume and
    every command that writes into a run); ``RunError`` if it is not a run folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunError(f"{path} is a file, not a run folder")
    if not path.is_dir():
        raise RunError(f"run folder {path} does not exist")
    if not (path / "config.json").is_file() and not (path / "model.json").is_file():
        raise RunError(f"{path} is not a run folder: {path / 'config.json'} is missing")
    with hold_folder(path):  # a run folder, or a model folder (classicnets import-keras)
        yield path


@contextmanager
def hold_run_writing(path: str | os.PathLike, target: str | os.PathLike | None) -> Iterator[Path]:
    """``hold_run(path)`` when ``target`` (None: a default inside the run) lies inside the run
    folder, so that commands writing elsewhere still read a live run."""
    path = Path(path)
    inside = target is None or Path(target).resolve().is_relative_to(path.resolve())
    if not inside:
        yield path
        return
    with hold_run(path):
        yield path


class RunDir:
    """Reads and writes one run folder; ``writer=False`` makes writes no-ops (DDP ranks > 0)."""

    def __init__(self, path: str | os.PathLike, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        # Told of every record and evaluation written here (report.tensorboard.TensorBoardLog):
        # ``record(record)``, ``evaluated(variant, step, modules)``.
        self.observers: list[Any] = []

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    # config
    def write_config(self, experiment: str, config: dict[str, Any]) -> None:
        if not self.writer:
            return
        import torch

        from classicnets import __version__

        record = {
            "experiment": experiment,
            "config": config,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "classicnets_version": __version__,
            "torch_version": torch.__version__,
        }
        atomic_write_text(self.config_path, json.dumps(record, indent=2, default=json_default))

    def read_config(self) -> dict[str, Any]:
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path} is a file, not a run folder")
        if not self.path.is_dir():
            raise RunError(f"run folder {self.path} does not exist")
        try:
            record = json.loads(self.config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(
                f"{self.path} is not a run folder: {self.config_path} is missing"
            ) from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise RunError(f"cannot read {self.config_path}: {exc}") from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("experiment"), str)
            or not isinstance(record.get("config"), dict)
        ):
            raise RunError(
                f"{self.config_path} lacks the 'experiment' (a name) and 'config' (an object) "
                f"entries"
            )
        return record

    # metrics
    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics record (a line of ``metrics.jsonl``)."""
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        record = _clean(record)
        line = (json.dumps(record, default=json_default) + "\n").encode("utf-8")
        with self._metrics_locked():  # one write: side-by-side workers never interleave a line
            fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        for observer in self.observers:
            observer.record(record)

    @contextmanager
    def _metrics_locked(self) -> Iterator[None]:
        """Hold an exclusive ``flock`` on the run folder while ``metrics.jsonl`` is appended to
        or rewritten: variants trained side by side (``jobs``) write it from several processes,
        and a rewrite (resume) must not lose another's line. No-op where there is no flock."""
        if fcntl is None:
            yield
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl``, each a JSON object with a string ``variant`` and
        an integer ``step``. A torn last line (a process killed mid-write) is skipped; a damaged
        line anywhere else is a ``RunError`` naming the file and the line."""
        if not self.metrics_path.exists():
            return []
        try:
            text = self.metrics_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RunError(f"cannot read {self.metrics_path}: {exc}") from None
        lines = text.split("\n")  # the last item is "" when the file ends with a newline
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                record = None
            if (
                isinstance(record, dict)
                and isinstance(record.get("variant"), str)
                and type(record.get("step")) is int
            ):
                records.append(record)
            elif number == len(lines):  # no newline after it: torn by a kill
                continue
            else:
                raise RunError(
                    f"{self.metrics_path}:{number}: not a metrics record (a JSON object with "
                    f"'variant' and an integer 'step'); repair or remove that line"
                )
        return records

    def records(self, split: str) -> dict[str, list[dict[str, Any]]]:
        """The metrics records of ``split``, per variant, in logged order."""
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.read_metrics():
            if r.get("split") == split:
                out.setdefault(r["variant"], []).append(r)
        return out

    def curves(
        self, split: str, key: str, rename: dict[str, str] | None = None
    ) -> dict[str, tuple[list, list]]:
        """``{variant: (steps, values)}`` of ``key`` in the records of ``split`` that have it;
        ``rename`` maps variant names to display names."""
        out: dict[str, tuple[list, list]] = {}
        for r in self.read_metrics():
            if r.get("split") == split and r.get(key) is not None:
                name = (rename or {}).get(r["variant"], r["variant"])
                xs, ys = out.setdefault(name, ([], []))
                xs.append(r["step"])
                ys.append(r[key])
        return out

    def truncate_metrics(self, keep) -> None:
        """Rewrite ``metrics.jsonl`` atomically keeping only the records where ``keep(r)``.

        On resume, records written after the checkpoint being resumed are dropped: the resumed
        run writes them again, identically.
        """
        if not self.writer or not self.metrics_path.exists():
            return
        with self._metrics_locked():
            kept = [r for r in self.read_metrics() if keep(r)]
            text = "".join(json.dumps(r, default=json_default) + "\n" for r in kept)
            atomic_write_text(self.metrics_path, text)

    # summary
    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.writer:
            return
        atomic_write_text(
            self.summary_path, json.dumps(_clean(summary), indent=2, default=json_default)
        )

    def read_summary(self) -> dict[str, Any]:
        """``summary.json`` ({} before the first one); ``RunError`` if it is damaged."""
        if not self.summary_path.exists():
            return {}
        try:
            summary = json.loads(self.summary_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise RunError(f"cannot read {self.summary_path}: {exc}") from None
        if not isinstance(summary, dict):
            raise RunError(f"{self.summary_path} is not a JSON object")
        return summary
