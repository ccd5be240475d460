"""Sweeps (``classicnets sweep``) and the comparison report (``report --compare``).

The promises checked here: every point of a sweep logs exactly the records of the same config
run alone (``classicnets run``, one variant after the other, one thread: the sweep's workers
have one thread each); a sweep SIGKILLed or stopped by SIGTERM resumes to those records; a
diverging point is recorded as such while the others finish; the report's table and overlaid
curves hold every point, the best value of a metric marked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from classicnets.cli import main
from classicnets.experiments import run_experiment
from classicnets.experiments.common import get_experiment
from classicnets.experiments.config import ConfigError
from classicnets.experiments.sweep import (
    parse_grid,
    plan_points,
    read_sweep,
    resume_sweep,
    run_sweep,
    split_values,
)
from classicnets.report.compare import better, compare_runs
from classicnets.report.html import ReportError
from classicnets.report.runs import list_runs
from classicnets.train.run import RunDir, RunError
from processes import stop_with_sigterm, wait_for_exit, wait_until

SRC = str(Path(__file__).resolve().parents[1] / "src")
STEPS = 300
SETTINGS = [f"steps={STEPS}", "eval_every=50", "log_every=10", "checkpoint_every=20",
            "train_limit=3000", "progress=false"]  # fmt: skip
GRID = ["lr_bn=0.1,0.5"]
POINTS = ["0-lr_bn=0.1", "1-lr_bn=0.5"]
TIMED = ("time", "per_s", "per_second")  # wall-clock values differ between any two runs


def _records(run_dir) -> dict[str, list[dict]]:
    """Each variant's records in the order it logged them, timings left out."""
    out: dict[str, list[dict]] = {}
    for r in RunDir(run_dir).read_metrics():
        kept = {k: v for k, v in r.items() if not any(t in k for t in TIMED)}
        out.setdefault(r["variant"], []).append(kept)
    return out


def _set_threads(n: int) -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_root) -> dict[str, Path]:
    """Each point of GRID run alone (``classicnets run bn-mlp --quick``), one variant after the
    other, on one thread."""
    base = tmp_path_factory.mktemp("sweep-references")
    before = _set_threads(1)
    try:
        return {
            name: run_experiment("bn-mlp", [*SETTINGS, "jobs=1", f"data_dir={data_root}",
                                            f"lr_bn={lr}"], quick=True, device="cpu",
                                 out=base / name)[0]
            for name, lr in zip(POINTS, ("0.1", "0.5"))
        }  # fmt: skip
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- the grid


def test_values_split_at_commas_outside_brackets():
    assert split_values("0.1,0.5,1") == ["0.1", "0.5", "1"]
    assert split_values("[64,64],[128,128]") == ["[64,64]", "[128,128]"]
    assert split_values(" a , b ") == ["a", "b"]


@pytest.mark.parametrize(
    "items, message",
    [
        ([], "at least one --grid"),
        (["lr_bn"], "expects key=v1,v2"),
        (["=1,2"], "expects key=v1,v2"),
        (["lr_bn=1,,2"], "an empty value"),
        (["lr_bn=1,2,1"], "lr_bn: 1 given twice"),
        (["lr_bn=1,2", "lr_bn=3"], "lr_bn is given twice"),
        (["jobs=1,2"], "use --jobs N"),
    ],
)
def test_a_malformed_grid_is_refused(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(items)


def test_points_are_the_product_in_grid_order_each_checked():
    experiment = get_experiment("bn-mlp")
    points = plan_points(experiment, parse_grid(["lr_bn=0.1,0.5", "seed=0,1"]), [], True)
    assert [p.values for p in points] == [
        {"lr_bn": "0.1", "seed": "0"}, {"lr_bn": "0.1", "seed": "1"},
        {"lr_bn": "0.5", "seed": "0"}, {"lr_bn": "0.5", "seed": "1"},
    ]  # fmt: skip
    assert [p.name for p in points][:2] == ["0-lr_bn=0.1,seed=0", "1-lr_bn=0.1,seed=1"]
    assert points[3].config.lr_bn == 0.5 and points[3].config.seed == 1
    lists = plan_points(experiment, parse_grid(["hidden_sizes=[64,64],[32]"]), [], True)
    assert [p.config.hidden_sizes for p in lists] == [(64, 64), (32,)]
    with pytest.raises(ConfigError, match="grid point lr_bn=-1: lr_bn=-1.0"):
        plan_points(experiment, parse_grid(["lr_bn=0.1,-1"]), [], True)
    with pytest.raises(ConfigError, match="at least two points"):
        plan_points(experiment, parse_grid(["lr_bn=0.1"]), [], True)
    with pytest.raises(ConfigError, match="--grid lr_bn and --set lr_bn"):
        plan_points(experiment, parse_grid(["lr_bn=0.1,0.2"]), ["lr_bn=1"], True)


def test_which_way_a_metric_is_better():
    assert better("test_accuracy") == better("macro_f1") == better("tokens_per_s") == "higher"
    for key in ("test_loss", "neg_elbo_nats", "iw_nll_nats", "test_perplexity",
                "test_frechet_distance", "test_mse_per_pixel", "train_time_s"):  # fmt: skip
        assert better(key) == "lower", key
    for key in ("lr", "d_loss", "g_loss", "d_real", "diversity_ratio"):
        assert better(key) is None, key


# --------------------------------------------------------------------------- a whole sweep


def test_a_quick_sweep_finishes_with_the_records_of_single_runs(tmp_path, data_root, references):
    before = _set_threads(2)  # two workers of one thread, as the references' one thread
    try:
        sets = [*SETTINGS, f"data_dir={data_root}"]
        path, points = run_sweep("bn-mlp", GRID, sets, True, "cpu", tmp_path / "sweep", jobs=2)
    finally:
        torch.set_num_threads(before)
    assert [p["name"] for p in points] == POINTS
    assert all(p["status"] == "complete" and p["wall_time_s"] > 0 for p in points)
    for name in POINTS:
        assert _records(path / name) == _records(references[name]), name
        assert (path / name / "report.html").is_file()
    assert read_sweep(path).points[1].config.lr_bn == 0.5

    comparison = compare_runs([path / n for n in POINTS], get_experiment("bn-mlp").plots)
    assert comparison.keys == ["lr_bn"]
    assert [r.label for r in comparison.runs] == ["lr_bn=0.1", "lr_bn=0.5"]
    accuracy = {(o.split, o.key): o for o in comparison.overlays}[("test", "accuracy")]
    assert set(accuracy.panels) == {"plain", "bn"}
    for lines in accuracy.panels.values():  # one line per point, every evaluation on it
        assert sorted(lines) == ["lr_bn=0.1", "lr_bn=0.5"]
        assert all(xs == list(range(0, STEPS + 1, 50)) for xs, _ in lines.values())
    bn = [r.metrics["bn"]["test_accuracy"] for r in comparison.runs]
    assert comparison.best[("bn", "test_accuracy")] == {bn.index(max(bn))}
    assert comparison.best[("plain", "test_accuracy")] == set()  # both points train plain alike

    page = (path / "report.html").read_text()
    assert "sweep of bn-mlp: 2 points" in page and "2 of 2 points complete" in page
    assert page.count('<td class="num best">') >= 1
    for label in ("lr_bn=0.1", "lr_bn=0.5"):
        assert f">{label}</a>" in page
    assert sorted(p.name for p in (path / "plots").iterdir()) == [
        "compare_test_accuracy.png", "compare_train_loss.png"]  # fmt: skip
    assert page.count("data:image/png;base64,") == 2
    assert [e.folder.name for e in list_runs(tmp_path)] == POINTS  # `runs` looks into sweeps
    (path / "report.html").unlink()
    assert main(["report", str(path)]) == 0  # a sweep's report, written again
    assert "sweep of bn-mlp: 2 points" in (path / "report.html").read_text()


def test_a_diverging_point_is_recorded_and_the_others_finish(tmp_path, data_root):
    sets = ["steps=20", "eval_every=10", "train_limit=600", "progress=false",
            f"data_dir={data_root}"]  # fmt: skip
    path, points = run_sweep("bn-mlp", ["lr_plain=0.5,1e38"], sets, quick=True, device="cpu",
                             out=tmp_path / "sweep", jobs=2)  # fmt: skip
    assert [p["status"] for p in points] == ["complete", "diverged"]
    summary = RunDir(path / points[1]["name"]).read_summary()
    assert "plain: training loss is inf" in summary["error"]
    page = (path / "report.html").read_text()
    assert "status-diverged" in page and "1 of 2 points complete" in page
    resume_sweep(path)  # nothing left to train: a diverged point stays diverged
    assert RunDir(path / points[1]["name"]).read_summary()["status"] == "diverged"


SMALL = {"conv-ae": ["train_limit=640"], "vae": ["train_limit=1280"], "gan": ["steps=40"]}


@pytest.mark.parametrize("name", list(SMALL))
def test_a_point_finishes_as_its_run_does(name, tmp_path, data_root):
    # What a run does after its variants train, a point does too, though its variants trained
    # in the sweep's workers: conv-ae's and vae's grids from their final checkpoints, the
    # scores (vae's after training, the GAN's scorer prepared first), every summary field.
    sets = [*SMALL[name], "progress=false", f"data_dir={data_root}"]
    path, points = run_sweep(name, ["seed=0,1"], sets, quick=True, device="cpu",
                             out=tmp_path / "sweep", jobs=2)  # fmt: skip
    assert [p["status"] for p in points] == ["complete", "complete"]
    run, _ = run_experiment(name, [*sets, "seed=0", "jobs=1"], quick=True, device="cpu",
                            out=tmp_path / "run")  # fmt: skip
    point = Path(points[0]["folder"])

    def shape(folder: Path) -> tuple:  # which fields are set, which plots were drawn
        summary = RunDir(folder).read_summary()
        fields = {k: v is None for k, v in summary.items() if k != "variants"}
        rows = {v: {k: x is None for k, x in row.items()} for v, row in summary["variants"].items()}
        return fields, rows, sorted(p.name for p in (folder / "plots").rglob("*"))

    assert shape(point) == shape(run)
    for grid in (point / "plots").rglob("*.json"):  # the image grids: every variant's rows
        twin = run / grid.relative_to(point)
        assert json.loads(grid.read_text()) == json.loads(twin.read_text()), grid.name


# --------------------------------------------------------------------------- stops


def _env(data_root):
    return {**os.environ, "PYTHONPATH": SRC, "CLASSICNETS_DATA": str(data_root),
            "OMP_NUM_THREADS": "2"}  # fmt: skip


def _start(path: Path, data_root) -> subprocess.Popen:
    sets = [x for s in SETTINGS for x in ("--set", s)]
    grid = [x for g in GRID for x in ("--grid", g)]
    return subprocess.Popen(
        [sys.executable, "-m", "classicnets", "sweep", "bn-mlp", "--quick", *grid, *sets,
         "--device", "cpu", "--jobs", "2", "--out", str(path)],
        env=_env(data_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _first_point_at_step_50(path: Path, data_root) -> subprocess.Popen:
    """A sweep started, once both variants of its first point have logged step 50 (its two
    workers hold both slots: the second point has not started)."""
    proc = _start(path, data_root)
    metrics = path / POINTS[0] / "metrics.jsonl"

    def both() -> bool:
        if not metrics.exists():
            return False
        steps: dict[str, int] = {}
        for r in RunDir(metrics.parent).read_metrics():
            if r.get("split") == "train":
                steps[r["variant"]] = max(steps.get(r["variant"], 0), r["step"])
        return min(steps.get("plain", 0), steps.get("bn", 0)) >= 50

    wait_until(proc, both, "step 50 of the first point")
    return proc


def _workers_of(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if "classicnets.experiments.worker" in argv and any(a.startswith(str(path)) for a in argv):
            pids.append(int(entry.name))
    return pids


def _resume(path: Path, data_root) -> str:
    done = subprocess.run([sys.executable, "-m", "classicnets", "resume", str(path)],
                          env=_env(data_root), capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds workers in /proc")
def test_a_sigkilled_sweep_resumes_to_the_records_of_single_runs(tmp_path, data_root, references):
    path = tmp_path / "sweep"
    proc = _first_point_at_step_50(path, data_root)
    workers = _workers_of(path)
    assert len(workers) == 2
    proc.kill()  # SIGKILL: each worker gets SIGTERM from Linux, checkpoints and stops
    proc.communicate(timeout=60)
    wait_for_exit(workers, "a worker")
    assert not (path / POINTS[0] / "summary.json").exists()
    assert not (path / POINTS[1] / "metrics.jsonl").exists()
    out = _resume(path, data_root)
    assert f"report: {path / 'report.html'}" in out
    for name in POINTS:
        assert _records(path / name) == _records(references[name]), name
        assert RunDir(path / name).read_summary()["status"] == "complete"
    page = (path / "report.html").read_text()
    assert "2 of 2 points complete" in page
    assert all(f">{label}</a>" in page for label in ("lr_bn=0.1", "lr_bn=0.5"))


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds workers in /proc")
def test_a_killed_worker_leaves_the_other_points_finishing(tmp_path, data_root, references):
    path = tmp_path / "sweep"
    proc = _first_point_at_step_50(path, data_root)
    point = path / POINTS[0]
    bn = [pid for pid in _workers_of(point) if "bn" in _argv(pid)]
    assert len(bn) == 1
    os.kill(bn[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err
    line = err.strip().splitlines()[-1]
    assert f"point {POINTS[0]}, variant 'bn': its worker was killed by SIGKILL" in line
    assert f"(resume with: classicnets resume {path})" in line
    assert RunDir(path / POINTS[1]).read_summary()["status"] == "complete"  # it went on
    assert not (point / "summary.json").exists()
    _resume(path, data_root)
    for name in POINTS:
        assert _records(path / name) == _records(references[name]), name


def _argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_sigterm_stops_a_sweep_and_names_the_sweep_to_resume(tmp_path, data_root, references):
    path = tmp_path / "sweep"
    stop_with_sigterm(_first_point_at_step_50(path, data_root), path)  # not its point: the sweep
    _resume(path, data_root)
    for name in POINTS:
        assert _records(path / name) == _records(references[name]), name


# --------------------------------------------------------------------------- sweep.json


def _sweep_json(path: Path, **changes) -> Path:
    record = {"format": 1, "experiment": "bn-mlp", "grid": [["lr_bn", ["0.1", "0.5"]]],
              "sets": [], "quick": True, "device": "cpu", "jobs": 0,
              "points": [{"name": "0-lr_bn=0.1"}, {"name": "1-lr_bn=0.5"}]}  # fmt: skip
    record.update(changes)
    path.mkdir()
    (path / "sweep.json").write_text(json.dumps(record))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": 2}, "format 1"),
        ({"experiment": 3}, "experiment is not a name"),
        ({"experiment": "nope"}, "unknown experiment 'nope'"),
        ({"sets": "steps=1"}, "sets is not a list"),
        ({"jobs": -1}, "jobs is not a whole number"),
        ({"grid": [["lr_bn", "0.1"]]}, "grid is not a list"),
        ({"grid": [["lr_bn", ["0.1", "x"]]]}, "lr_bn='x': expected a number"),
        ({"points": [{"name": "../elsewhere"}, {"name": "1-lr_bn=0.5"}]}, "not those of its grid"),
    ],
)
def test_a_tampered_sweep_json_is_refused(tmp_path, changes, message):
    path = _sweep_json(tmp_path / "sweep", **changes)
    with pytest.raises(RunError, match=message):
        read_sweep(path)
    assert sorted(p.name for p in path.iterdir()) == ["sweep.json"]  # no lock, no point folder


def test_compare_report_of_runs(tmp_path, references, capsys):
    out = tmp_path / "compare.html"
    assert main(["report", *map(str, references.values()), "--compare", "-o", str(out)]) == 0
    page = out.read_text()
    assert "bn-mlp: 2 runs compared" in page and "<th>lr_bn</th>" in page
    assert page.count("data:image/png;base64,") == 2
    with pytest.raises(ReportError, match="at least two run folders"):
        compare_runs([references[POINTS[0]]])
    damaged = tmp_path / "damaged"  # records a reader cannot plot are left out, not a traceback
    shutil.copytree(references[POINTS[1]], damaged)
    with (damaged / "metrics.jsonl").open("a") as file:
        file.write('{"variant": "bn", "split": "test", "step": "ten", "accuracy": 0.5}\n[1]\n')
    curves = get_experiment("bn-mlp").plots
    comparison = compare_runs([references[POINTS[0]], damaged], curves)
    accuracy = {(o.split, o.key): o for o in comparison.overlays}[("test", "accuracy")]
    assert all(xs == list(range(0, STEPS + 1, 50)) for xs, _ in accuracy.panels["bn"].values())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"experiment": "vae", "config": {}}))
    with pytest.raises(ReportError, match="runs of different experiments"):
        compare_runs([references[POINTS[0]], tmp_path / "other"])
