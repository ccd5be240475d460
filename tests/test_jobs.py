"""Variants side by side (``jobs``): worker processes, their records, failures and signals.

The promise checked here: a run whose variants train in worker processes (``jobs=2``, one
thread each) logs exactly the records of the same run trained one variant after the other in
one process with one thread (``jobs=1``), for all six experiments; a worker killed or
diverging leaves the other variant training; a SIGTERM reaches every worker, and ``resume``
finishes what was left, to the same records.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from classicnets.experiments import run_experiment
from classicnets.experiments.common import ExperimentError, resolve_jobs
from classicnets.train.jobs import WorkerSpec, run_workers
from classicnets.train.loop import NonFiniteLossError
from classicnets.train.run import RunDir
from processes import stop_with_sigterm, wait_for_exit, wait_until

SRC = str(Path(__file__).resolve().parents[1] / "src")
EXPERIMENTS = ["bn-mlp", "conv-ae", "vae", "gan", "resnet-vs-mlp", "rnn-vs-lstm"]
FEWER_EVALUATIONS = {"resnet-vs-mlp": ["eval_every=40"]}  # its evaluations dominate at 1 thread
# Values measured in wall-clock time, and paths, differ between any two runs.
TIMED = ("time", "per_s", "per_second")


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _records(run_dir) -> dict[str, list[dict]]:
    """Each variant's records in the order it logged them, timings left out (the workers'
    lines interleave in the file)."""
    out: dict[str, list[dict]] = {}
    for r in RunDir(run_dir).read_metrics():
        kept = {k: v for k, v in r.items() if not any(t in k for t in TIMED)}
        out.setdefault(r["variant"], []).append(kept)
    return out


def _summary_values(run_dir) -> dict:
    variants = json.loads((Path(run_dir) / "summary.json").read_text())["variants"]
    return {
        v: {k: x for k, x in fields.items() if not any(t in k for t in TIMED)}
        for v, fields in variants.items()
    }


def _quick(name, out, data_root, *overrides):
    sets = ["progress=false", f"data_dir={data_root}", *overrides]
    return run_experiment(name, sets, quick=True, device="cpu", out=out)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_workers_log_the_records_of_one_process(name, tmp_path, data_root, request):
    if name == "rnn-vs-lstm":
        data_root = request.getfixturevalue("ptb_data_root")
    extra = FEWER_EVALUATIONS.get(name, [])
    with _threads(1):  # the reference: one variant after the other, one thread
        serial, _ = _quick(name, tmp_path / "serial", data_root, "jobs=1", *extra)
    with _threads(2):  # two workers of one thread each; scorers trained here use one too
        parallel, summary = _quick(name, tmp_path / "parallel", data_root, "jobs=2", *extra)
    assert summary["status"] == "complete"
    expected = _records(serial)
    assert _records(parallel) == expected
    assert len(expected) >= 2
    if name not in ("vae", "gan"):  # their scorer trains with this process's two threads
        assert _summary_values(parallel) == _summary_values(serial)
    assert (parallel / "report.html").is_file()


def test_a_diverging_variant_leaves_the_other_training(tmp_path, data_root):
    with _threads(1):
        healthy, _ = _quick("bn-mlp", tmp_path / "healthy", data_root, "jobs=1")
    out = tmp_path / "run"
    with _threads(2), pytest.raises(NonFiniteLossError, match="plain: training loss is inf"):
        _quick("bn-mlp", out, data_root, "jobs=2", "lr_plain=1e38")
    summary = RunDir(out).read_summary()
    assert summary["status"] == "diverged" and "plain" in summary["error"]
    assert _records(out)["bn"] == _records(healthy)["bn"]


# ------------------------------------------------------------------ real processes, signals

STEPS = 300
SETTINGS = [f"steps={STEPS}", "eval_every=50", "log_every=10", "checkpoint_every=20",
            "train_limit=3000", "progress=false", "jobs=2"]  # fmt: skip


def _env(data_root):
    # Two threads for the parent: one for each worker, whatever this machine's core count.
    return {**os.environ, "PYTHONPATH": SRC, "CLASSICNETS_DATA": str(data_root),
            "OMP_NUM_THREADS": "2"}  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("jobs") / "reference"
    with _threads(1):
        run_experiment("bn-mlp", [*SETTINGS[:-1], "jobs=1", f"data_dir={data_root}"],
                       device="cpu", out=out)  # fmt: skip
    return out


def _start(run_dir, data_root):
    sets = [x for s in SETTINGS for x in ("--set", s)]
    return subprocess.Popen(
        [sys.executable, "-m", "classicnets", "run", "bn-mlp", "--device", "cpu",
         "--out", str(run_dir), *sets],
        env=_env(data_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _start_both_to_step_50(run_dir: Path, data_root):
    """A jobs=2 run started, once both of its variants have logged step 50."""
    proc = _start(run_dir, data_root)

    def both() -> bool:
        done = _steps(run_dir)
        return min(done.get("plain", 0), done.get("bn", 0)) >= 50

    wait_until(proc, both, "step 50 of both variants")
    return proc


def _steps(run_dir: Path) -> dict[str, int]:
    done: dict[str, int] = {}
    if (run_dir / "metrics.jsonl").exists():
        for r in RunDir(run_dir).read_metrics():
            if r.get("split") == "train":
                done[r["variant"]] = max(done.get(r["variant"], 0), r["step"])
    return done


def _worker_pid(run_dir: Path, variant: str) -> int:
    """The pid of the worker process training ``variant`` of ``run_dir`` (from /proc)."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if "classicnets.experiments.worker" in argv and str(run_dir) in argv:
            if argv[argv.index(str(run_dir)) + 1] == variant:
                return int(entry.name)
    pytest.fail(f"no worker process of {variant}")


def _resume(run_dir, data_root):
    done = subprocess.run(
        [sys.executable, "-m", "classicnets", "resume", str(run_dir)],
        env=_env(data_root), capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds workers in /proc")
def test_a_killed_worker_is_resumed_to_the_same_records(tmp_path, data_root, reference):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, data_root)
    wait_until(proc, lambda: _steps(run_dir).get("bn", 0) >= 100, "bn's step 100")
    os.kill(_worker_pid(run_dir, "bn"), signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err
    line = err.strip().splitlines()[-1]
    assert "variant 'bn': its worker was killed by SIGKILL" in line
    assert f"classicnets resume {run_dir}" in line
    assert _steps(run_dir)["plain"] == STEPS  # the other variant trained on to its end
    _resume(run_dir, data_root)
    assert _records(run_dir) == _records(reference)
    assert RunDir(run_dir).read_summary()["status"] == "complete"


def test_sigterm_reaches_every_worker_and_resume_finishes(tmp_path, data_root, reference):
    run_dir = tmp_path / "run"
    stop_with_sigterm(_start_both_to_step_50(run_dir, data_root), run_dir)
    done = _steps(run_dir)
    assert 0 < done["plain"] < STEPS and 0 < done["bn"] < STEPS  # both stopped, not finished
    _resume(run_dir, data_root)
    assert _records(run_dir) == _records(reference)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds workers in /proc")
def test_a_killed_run_stops_its_workers_and_resume_finishes(tmp_path, data_root, reference):
    run_dir = tmp_path / "run"
    proc = _start_both_to_step_50(run_dir, data_root)
    workers = [_worker_pid(run_dir, v) for v in ("plain", "bn")]
    proc.kill()  # SIGKILL: no chance to hand anything on; each worker gets SIGTERM from Linux
    proc.communicate(timeout=60)
    wait_for_exit(workers, "a worker")
    done = _steps(run_dir)
    assert 0 < done["plain"] < STEPS and 0 < done["bn"] < STEPS  # stopped, not trained on
    _resume(run_dir, data_root)
    assert _records(run_dir) == _records(reference)


# ------------------------------------------------------------------ the worker machinery


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_workers_runs_at_most_jobs_at_once_and_keeps_order(tmp_path):
    # Each worker records when it ran; with jobs=2 the third starts after one of the first two.
    code = (
        "import json, os, sys, time; t = time.time(); time.sleep(0.3); "
        "json.dump({'start': t, 'end': time.time(), 'threads': os.environ['OMP_NUM_THREADS']}, "
        "open(sys.argv[1], 'w'))"
    )
    specs = [
        WorkerSpec(
            f"w{i}",
            [*_python(code), str(tmp_path / f"{i}.json")],
            tmp_path / f"{i}.json",
            threads=3,
        )  # fmt: skip
        for i in range(3)
    ]
    outcomes = run_workers(specs, jobs=2)
    assert [o.name for o in outcomes] == ["w0", "w1", "w2"]
    assert all(o.returncode == 0 and o.result["threads"] == "3" for o in outcomes)
    first, second, third = (o.result for o in outcomes)
    assert third["start"] >= min(first["end"], second["end"])


def test_run_workers_reports_a_crash_and_a_kill_without_a_result(tmp_path):
    specs = [
        WorkerSpec("crash", _python("raise SystemExit(3)"), tmp_path / "a.json"),
        WorkerSpec("killed", _python("import os; os.kill(os.getpid(), 9)"), tmp_path / "b.json"),
    ]
    crash, killed = run_workers(specs, jobs=2)
    assert (crash.returncode, crash.result, crash.describe()) == (3, None, "exited with code 3")
    assert killed.result is None and killed.describe() == "was killed by SIGKILL"


def test_a_signal_starts_no_further_worker_and_run_workers_returns(tmp_path):
    # The first worker sends this process SIGTERM: it is handed on to that worker (which dies
    # of it), and the two still waiting are never started; run_workers returns, not waits.
    code = "import os, signal, time; os.kill(os.getppid(), signal.SIGTERM); time.sleep(30)"
    specs = [WorkerSpec(f"w{i}", _python(code), tmp_path / f"{i}.json") for i in range(3)]
    started = time.monotonic()
    outcomes = run_workers(specs, jobs=1)
    assert time.monotonic() - started < 20
    assert outcomes[0].describe() == "was killed by SIGTERM"
    assert [o.returncode for o in outcomes[1:]] == [None, None]
    assert outcomes[1].describe() == "was not started (the run was stopped first)"


def test_workers_report_progress_to_the_parent(tmp_path, capfd):
    code = (
        "from classicnets.train.jobs import progress_to_parent\n"
        "bar = progress_to_parent(40, 10)\n"
        "bar.set_postfix({'loss': 0.5}); bar.update(30); bar.close()\n"
    )
    env = {"PYTHONPATH": SRC}
    (outcome,) = run_workers([WorkerSpec("w", _python(code), tmp_path / "r.json", env=env)], 1)
    assert outcome.returncode == 0
    err = capfd.readouterr().err
    assert "w: 100%" in err and "40/40" in err and "loss=0.5" in err


def test_resolve_jobs(monkeypatch):
    monkeypatch.delenv("CLASSICNETS_JOBS", raising=False)
    assert resolve_jobs(5, 2, "cpu") == 2  # at most one per variant
    assert resolve_jobs(0, 1, "cpu") == 1  # one variant: nothing to run beside it
    with _threads(3):
        assert resolve_jobs(0, 4, "cpu") == 3  # as many as the threads allow
        assert resolve_jobs(0, 2, "cpu") == 2
    with _threads(1):
        assert resolve_jobs(0, 4, "cpu") == 1
    monkeypatch.setenv("CLASSICNETS_JOBS", "2")
    assert resolve_jobs(0, 3, "cpu") == 2
    assert resolve_jobs(1, 3, "cpu") == 1  # the config's own choice wins
    from classicnets.train import distributed

    monkeypatch.setattr(distributed, "_CONTEXT", distributed.DistributedContext(world_size=2))
    assert resolve_jobs(2, 3, "cpu") == 1  # under torchrun: every process on each variant
    monkeypatch.undo()
    monkeypatch.setenv("CLASSICNETS_JOBS", "many")
    with pytest.raises(ExperimentError, match="CLASSICNETS_JOBS='many': expected a whole"):
        resolve_jobs(0, 3, "cpu")
