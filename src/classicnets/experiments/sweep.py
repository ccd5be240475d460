"""Sweeps: one experiment at every point of a grid of config values, compared in one report.

    classicnets sweep bn-mlp --grid lr_bn=0.1,0.5 --grid seed=0,1 --quick

runs the four points ``lr_bn=0.1 seed=0``, ``lr_bn=0.1 seed=1``, ... into one sweep folder
(default ``runs/sweep-<experiment>-<time>/``)::

    sweep.json                     what was asked: experiment, grid, --set, quick, device, jobs
    run.lock                       held while the sweep trains (a second writer is refused)
    0-lr_bn=0.1,seed=0/ ...        one run folder per point, as ``classicnets run`` makes it
    report.html, plots/compare_*   the comparison (``report.compare``): a row and a line per point

How it trains: every variant of every point is one worker job (``train.jobs``, the machinery
of ``--set jobs``), all in one pool, at most ``jobs`` at a time on their share of the threads
(``resolve_jobs``: by default as many as the CPU threads, on CUDA the GPUs). Before the pool
starts, each point's run goes as far as its training in this process (``Job.prepare_only``:
the GAN trains its scoring classifier there, once per point); after it, each point whose
variants all finished completes here as a run does (``run_lifecycle`` with the workers'
results: its summary, plots and report). A point whose variant diverged is recorded
``diverged`` and the others go on: a learning rate too large is what sweeps find.

Stopping: SIGINT / SIGTERM reach every worker, which checkpoints; a SIGKILLed sweep's workers
get SIGTERM (``die_with_parent``). ``classicnets resume SWEEP`` then trains what is unfinished
(every point not ``complete`` or ``diverged``), from the checkpoints, to the records an
uninterrupted sweep logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from classicnets.experiments.common import (
    ExperimentError,
    Job,
    VariantOutcomes,
    VariantsPrepared,
    get_experiment,
    record_divergence,
    remove_if_empty,
    resolve_device,
    resolve_jobs,
    run_lifecycle,
    tensorboard_of,
    variant_worker,
)
from classicnets.experiments.config import ConfigError, apply_overrides, config_to_dict
from classicnets.files import (
    LOCK_NAME,
    SWEEP_NAME,
    atomic_write_text,
    hold_folder,
    read_json_object,
)
from classicnets.train.run import RunDir, RunError, new_run_dir

__all__ = [
    "SWEEP_FILE",
    "Point",
    "Sweep",
    "compare_report",
    "is_sweep",
    "parse_grid",
    "resume_sweep",
    "run_sweep",
    "write_sweep_report",
]

SWEEP_FILE = SWEEP_NAME
FORMAT = 1
MAX_POINTS = 1000  # more is a mistyped grid, not a request
FINAL = ("complete", "diverged")  # a point in one of these is not trained again on resume


@dataclass
class Point:
    """One point of the grid: its folder's ``name``, the grid's ``values`` there (as typed) and
    the checked config."""

    name: str
    values: dict[str, str]
    config: Any


@dataclass
class Sweep:
    """A sweep folder: what ``sweep.json`` asks for, and its points in grid order."""

    path: Path
    experiment: str
    grid: list[tuple[str, list[str]]]
    sets: list[str]
    quick: bool
    device: str
    jobs: int
    points: list[Point]

    def run_dir(self, point: Point) -> RunDir:
        return RunDir(self.path / point.name)

    def record(self) -> dict[str, Any]:
        from classicnets import __version__

        return {
            "format": FORMAT,
            "experiment": self.experiment,
            "grid": [[key, values] for key, values in self.grid],
            "sets": self.sets,
            "quick": self.quick,
            "device": self.device,
            "jobs": self.jobs,
            "points": [{"name": p.name, "values": p.values} for p in self.points],
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "classicnets_version": __version__,
        }


# --------------------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
    """``v1,v2,...`` split at the commas outside brackets, so that a list-valued key takes
    JSON lists: ``widths=[64,64],[128,128]``.

    >>> split_values("0.1,0.5"), split_values("[64,64],[128]")
    (['0.1', '0.5'], ['[64,64]', '[128]'])
    """
    values, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``--grid key=v1,v2,...`` items as ``(key, [values])``, checked for form: a key, at least
    one value, no empty or repeated value, no key twice. Types and ranges are checked by
    ``plan_points``, against the experiment's config."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid expects key=v1,v2,..., got {item!r}")
        values = split_values(text)
        if any(not v for v in values):
            raise ConfigError(f"--grid {item!r}: an empty value; expected key=v1,v2,...")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"--grid {key}: {', '.join(repeated)} given twice")
        if key in (k for k, _ in grid):
            raise ConfigError(f"--grid {key} is given twice; put all its values in one --grid")
        if key == "jobs":
            raise ConfigError("--grid jobs: a sweep chooses its workers itself; use --jobs N")
        grid.append((key, values))
    if not grid:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2,...")
    return grid


def plan_points(experiment, grid, sets: list[str], quick: bool) -> list[Point]:
    """Every point of ``grid`` (the product of its keys' values, the first key slowest), each
    config built as ``classicnets run`` builds it and checked: an error names the point."""
    import itertools

    set_keys = {s.partition("=")[0].strip() for s in sets}
    for key, _ in grid:
        if key in set_keys:
            raise ConfigError(f"--grid {key} and --set {key} both given; keep one")
    count = 1
    for _, values in grid:
        count *= len(values)
    if count < 2:
        raise ConfigError("a sweep needs at least two points; one is a run: classicnets run")
    if count > MAX_POINTS:
        raise ConfigError(f"the grid has {count:,} points; at most {MAX_POINTS:,} are allowed")
    base = experiment.config_cls.quick() if quick else experiment.config_cls()
    base = apply_overrides(base, list(sets))
    width = len(str(count - 1))
    points = []
    for index, combo in enumerate(itertools.product(*(values for _, values in grid))):
        values = {key: value for (key, _), value in zip(grid, combo)}
        pairs = [f"{k}={v}" for k, v in values.items()]
        try:
            config = apply_overrides(base, pairs)
        except ConfigError as exc:
            raise ConfigError(f"grid point {' '.join(pairs)}: {exc}") from None
        label = re.sub(r"[^A-Za-z0-9._=,+-]+", "-", ",".join(pairs))[:60].strip("-")
        points.append(Point(f"{index:0{width}d}-{label}", values, config))
    return points


# --------------------------------------------------------------------------- running


def run_sweep(
    name: str,
    grid: list[str],
    overrides: list[str] | None = None,
    quick: bool = False,
    device: str = "auto",
    out: str | Path | None = None,
    jobs: int = 0,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run experiment ``name`` at every point of ``grid`` (``--grid`` items) into a new sweep
    folder; return it and one line of results per point (``point_results``)."""
    from classicnets.train.distributed import get_context

    experiment = get_experiment(name)
    sets = list(overrides or [])
    parsed = parse_grid(grid)
    points = plan_points(experiment, parsed, sets, quick)
    if jobs < 0:
        raise ExperimentError(f"--jobs {jobs}: expected 0 (automatic) or more")
    device = resolve_device(device)
    if get_context().enabled or _under_torchrun():
        raise ExperimentError("a sweep runs its points as worker processes; not under torchrun")
    if os.name != "posix":  # the workers are stopped together through POSIX process groups
        raise ExperimentError("sweeps need POSIX process groups (Linux, macOS); run each point")
    tensorboard_of(points[0].config)  # tensorboard=true without the package: before any file
    with new_run_dir(out, f"sweep-{name}") as path:
        sweep = Sweep(path, name, parsed, sets, quick, device, jobs, points)
        atomic_write_text(path / SWEEP_FILE, json.dumps(sweep.record(), indent=2))
        _make_point_folders(sweep)
        try:
            _train(sweep, resume=False)
        except BaseException:
            _remove_untouched(sweep)
            raise
    return path, point_results(sweep)


def resume_sweep(path: str | Path, device: str | None = None) -> list[dict[str, Any]]:
    """Train what the sweep in ``path`` left unfinished; one line of results per point."""
    path = Path(path)
    read_sweep(path)  # checked before the lock: a folder that is no sweep gets no lock file
    with hold_folder(path):  # one writer: a second resume, or the sweep still going, is refused
        sweep = read_sweep(path)
        if device is not None:
            sweep.device = resolve_device(device)
        _make_point_folders(sweep)  # those a killed sweep had no time to make
        _train(sweep, resume=True)
    return point_results(sweep)


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _make_point_folders(sweep: Sweep) -> None:
    for point in sweep.points:
        run = sweep.run_dir(point)
        if run.config_path.is_file():
            continue
        run.path.mkdir(exist_ok=True)
        record = {**config_to_dict(point.config), "_quick": sweep.quick, "_device": sweep.device,
                  "_sweep": point.values}  # fmt: skip
        run.write_config(sweep.experiment, record)


def _remove_untouched(sweep: Sweep) -> None:
    """A new sweep that failed before training anything (a missing data file, ...) leaves no
    folder behind; one that trained keeps everything, for ``resume``."""
    runs = [sweep.run_dir(point) for point in sweep.points]
    if any(run.metrics_path.exists() or run.checkpoints.exists() for run in runs):
        return
    for run in runs:
        remove_if_empty(run)
    if any(p.is_dir() for p in sweep.path.iterdir()):
        return  # a folder that is not ours (or a GAN's scorer cache): leave it all
    (sweep.path / SWEEP_FILE).unlink(missing_ok=True)
    (sweep.path / LOCK_NAME).unlink(missing_ok=True)  # ours: the folder was empty when claimed
    with contextlib.suppress(OSError):
        sweep.path.rmdir()


def _status(run: RunDir) -> str | None:
    try:
        return run.read_summary().get("status")
    except RunError:
        return None  # a damaged summary: the point trains again from its checkpoints


def _train(sweep: Sweep, resume: bool) -> None:
    """Prepare the unfinished points, train all their variants in one pool of workers, finish
    the points that completed, write the report; then raise the first stop or failure."""
    import torch

    from classicnets.train.jobs import run_workers
    from classicnets.train.settings import set_deterministic

    experiment = get_experiment(sweep.experiment)
    with contextlib.ExitStack() as stack:
        for point in sweep.points:  # the workers take no lock: this process holds them all
            stack.enter_context(hold_folder(sweep.run_dir(point).path))
        pending = [p for p in sweep.points if _status(sweep.run_dir(p)) not in FINAL]
        for point in pending:  # each run up to its training: what its workers share
            set_deterministic(point.config.deterministic)
            with contextlib.suppress(VariantsPrepared):
                experiment.run(point.config, Job(sweep.run_dir(point), sweep.device, resume,
                                                 prepare_only=True))  # fmt: skip
        jobs = [(p, v) for p in pending for v in p.config.variants]
        workers = resolve_jobs(sweep.jobs, len(jobs), sweep.device)
        threads = max(1, torch.get_num_threads() // workers)
        gpus = torch.cuda.device_count() if sweep.device == "cuda" else 0
        with tempfile.TemporaryDirectory(prefix="classicnets-sweep-") as scratch:
            specs = [
                variant_worker(sweep.run_dir(point), variant, sweep.device, resume,
                               Path(scratch) / f"{i}.json", threads,
                               i % gpus if gpus > 1 else None, f"{point.name} {variant}")
                for i, (point, variant) in enumerate(jobs)
            ]  # fmt: skip
            outcomes = run_workers(specs, workers) if specs else []
        unfinished = []
        for point in pending:
            mine = [dataclasses.replace(o, name=variant)
                    for (p, variant), o in zip(jobs, outcomes) if p is point]  # fmt: skip
            found = VariantOutcomes.of(mine)
            if found.stopped or found.unfinished:
                unfinished.append((point, found))
                continue
            _finish(experiment, sweep, point, found, _span(mine), resume)
    write_sweep_report(sweep.path)
    if unfinished:
        _raise_first(unfinished, sweep.path)


def _raise_first(unfinished: list[tuple[Point, VariantOutcomes]], path: Path) -> None:
    """The first stop of the unfinished points (``StopRequested``, naming the sweep to
    resume), else their failures (``WorkerFailed``, a line per variant naming its point)."""
    from classicnets.train.faults import StopRequested
    from classicnets.train.jobs import WorkerFailed

    stops = [stop for _, found in unfinished for stop in found.stopped]
    if stops:
        raise StopRequested(stops[0]["signal"], stops[0]["step"], stops[0]["checkpoint"],
                            resume_path=str(path))  # fmt: skip
    failed = [f"point {point.name}, {line}" for point, found in unfinished
              for line in found.unfinished]  # fmt: skip
    raise WorkerFailed(f"{'; '.join(failed)} (resume with: classicnets resume {path})")


def _span(outcomes) -> float:
    """The seconds from the first of the workers' starts to the last of their ends."""
    started = [o.started for o in outcomes if o.started is not None]
    ended = [o.ended for o in outcomes if o.ended is not None]
    return max(ended) - min(started) if started and ended else 0.0


def _finish(experiment, sweep: Sweep, point: Point, found: VariantOutcomes, seconds: float,
            resume: bool) -> None:  # fmt: skip
    """A point whose workers all ended: its run completes as a run does, or is recorded
    diverged."""
    from classicnets.train.loop import NonFiniteLossError

    run = sweep.run_dir(point)
    if found.diverged:
        first = found.diverged[0]
        record_divergence(run, NonFiniteLossError(first["message"], first["step"]))
        summary = run.read_summary()
        summary["wall_time_s"] = summary.get("wall_time_s", 0.0) + seconds
        run.write_summary(summary)
        return
    run_lifecycle(experiment, point.config, run, sweep.device, resume, 1, found.results, seconds)


# --------------------------------------------------------------------------- sweep.json


def is_sweep(path: str | Path) -> bool:
    """Whether ``path`` is a sweep folder (it holds ``sweep.json``)."""
    return (Path(path) / SWEEP_FILE).is_file()


def read_sweep(path: str | Path) -> Sweep:
    """The sweep in folder ``path``, its ``sweep.json`` checked: every field of the right
    type, the points those of its grid (so no folder name comes from the file itself)."""
    path = Path(path)
    file = path / SWEEP_FILE
    if not path.is_dir():
        raise RunError(f"sweep folder {path} does not exist")
    if not file.exists():
        raise RunError(f"{path} is not a sweep folder: {file} is missing")
    record = read_json_object(file, RunError)

    def bad(what: str) -> RunError:
        return RunError(f"{file}: {what}; the file was not written by classicnets sweep")

    if record.get("format") != FORMAT:
        raise bad(f"expected format {FORMAT}")
    experiment, sets = record.get("experiment"), record.get("sets")
    quick, device, jobs = record.get("quick"), record.get("device"), record.get("jobs")
    grid = record.get("grid")
    if not isinstance(experiment, str):
        raise bad("experiment is not a name")
    if not (isinstance(sets, list) and all(isinstance(s, str) for s in sets)):
        raise bad("sets is not a list of key=value strings")
    if not isinstance(quick, bool) or not isinstance(device, str):
        raise bad("quick is not true or false, or device is not a name")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 0:
        raise bad("jobs is not a whole number >= 0")
    if not (isinstance(grid, list) and all(
        isinstance(g, list) and len(g) == 2 and isinstance(g[0], str) and isinstance(g[1], list)
        and all(isinstance(v, str) for v in g[1]) for g in grid
    )):  # fmt: skip
        raise bad("grid is not a list of [key, [values]]")
    items = [f"{key}={','.join(values)}" for key, values in grid]
    try:
        exp = get_experiment(experiment)
        points = plan_points(exp, parse_grid(items), sets, quick)
    except (ConfigError, ExperimentError) as exc:
        raise RunError(f"{file}: {exc}") from None
    listed = record.get("points")
    names = [p.get("name") for p in listed] if isinstance(listed, list) and all(
        isinstance(p, dict) for p in listed) else None  # fmt: skip
    if names != [p.name for p in points]:
        raise bad("its points are not those of its grid")
    return Sweep(path, experiment, parse_grid(items), sets, quick, device, jobs, points)


def point_results(sweep: Sweep) -> list[dict[str, Any]]:
    """Per point: its name, folder, status (None before its first summary), wall time and its
    variants' final metrics, as its ``summary.json`` has them."""
    out = []
    for point in sweep.points:
        run = sweep.run_dir(point)
        try:
            summary = run.read_summary()
        except RunError:
            summary = {}
        out.append({"name": point.name, "folder": str(run.path), "status": summary.get("status"),
                    "wall_time_s": summary.get("wall_time_s"),
                    "variants": summary.get("variants", {})})  # fmt: skip
    return out


# --------------------------------------------------------------------------- reports


def write_sweep_report(path: str | Path, hold: bool = False) -> Path:
    """``SWEEP/report.html`` (and ``SWEEP/plots/compare_*.png``): the points compared. ``hold``:
    take the sweep folder's lock first (``classicnets report SWEEP``; a sweep still training
    is refused)."""
    if hold:
        read_sweep(path)  # checked before the lock: a folder that is no sweep gets no lock file
        with hold_folder(path):
            return write_sweep_report(path)
    from classicnets.report.compare import compare_runs, write_comparison

    sweep = read_sweep(path)
    experiment = get_experiment(sweep.experiment)
    folders = [sweep.run_dir(p).path for p in sweep.points if sweep.run_dir(p).config_path.exists()]
    comparison = compare_runs(folders, experiment.plots)
    done = sum(run.status == "complete" for run in comparison.runs)
    grid = " ".join(f"--grid {key}={','.join(values)}" for key, values in sweep.grid)
    sets = " ".join(f"--set {s}" for s in sweep.sets)
    command = f"classicnets sweep {sweep.experiment} {grid} {sets}{' --quick' * sweep.quick}"
    intro = (f'<p class="meta"><span><code>{_e(" ".join(command.split()))}</code></span>'
             f"<span>{done} of {len(sweep.points)} points complete</span>"
             f"<span>folder <code>{_e(sweep.path)}</code></span></p>")  # fmt: skip
    title = f"sweep of {sweep.experiment}: {len(sweep.points)} points"
    return write_comparison(comparison, sweep.path / "report.html", sweep.path / "plots", title,
                            intro)  # fmt: skip


def compare_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """``classicnets report A B ... --compare -o FILE``: the runs' comparison page."""
    from classicnets.report.compare import compare_runs, write_comparison
    from classicnets.report.html import ReportError, read_run

    if len(run_dirs) < 2:
        raise ReportError(f"--compare needs at least two run folders, got {len(run_dirs)}")
    name = read_run(run_dirs[0]).config.get("experiment")
    try:
        curves = get_experiment(str(name)).plots
    except ExperimentError:
        curves = ()  # a run of an experiment this version does not know: the table only
    return write_comparison(compare_runs(run_dirs, curves), out)


def _e(value: Any) -> str:
    import html

    return html.escape(str(value), quote=True)
