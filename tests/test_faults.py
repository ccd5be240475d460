"""A run killed at any moment resumes to the same result as an uninterrupted one.

Real processes: ``python -m classicnets run`` is killed with SIGKILL at a random step (no chance
to clean up), or stopped with SIGTERM (which writes a checkpoint first), then continued with
``classicnets resume``; final weights, optimizer states and every logged metric must be
bit-identical to an uninterrupted run (CPU, deterministic mode).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from classicnets.experiments import run_experiment
from classicnets.train.checkpoint import list_checkpoints
from classicnets.train.run import RunDir
from processes import wait_until

SRC = str(Path(__file__).resolve().parents[1] / "src")
STEPS = 300
SETTINGS = [
    f"steps={STEPS}",
    "eval_every=50",
    "log_every=10",
    "checkpoint_every=20",
    "train_limit=3000",
    "progress=false",
]


def _env(data_root):
    return {**os.environ, "PYTHONPATH": SRC, "CLASSICNETS_DATA": str(data_root)}


def _cli(*args):
    return [sys.executable, "-m", "classicnets", *args]


def _sets():
    return [x for s in SETTINGS for x in ("--set", s)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("faults") / "reference"
    run_experiment("bn-mlp", [*SETTINGS, f"data_dir={data_root}"], device="cpu", out=out)
    return out


def _progress(run_dir: Path) -> int:
    """Steps done so far over both variants (plain first, then bn), from metrics.jsonl."""
    done = 0
    for r in RunDir(run_dir).read_metrics():
        if r.get("split") == "train":
            done = max(done, r["step"] + (STEPS if r["variant"] == "bn" else 0))
    return done


def _start_and_signal(run_dir, data_root, sig, target, timeout=240):
    proc = subprocess.Popen(
        _cli("run", "bn-mlp", "--device", "cpu", "--out", str(run_dir), *_sets()),
        env=_env(data_root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(proc, lambda: _progress(run_dir) >= target, f"step {target}", timeout)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _assert_same_as_reference(run_dir, reference):
    for variant in ("plain", "bn"):
        (s1, p1), (s2, p2) = (
            list_checkpoints(d / "checkpoints", variant)[-1] for d in (reference, run_dir)
        )
        assert s1 == s2 == STEPS
        a, b = (load_file(p.with_suffix(".safetensors")) for p in (p1, p2))
        for key, tensor in a.items():
            if key.startswith(("model.", "optimizer.")):
                assert torch.equal(tensor, b[key]), (variant, key)
    assert RunDir(run_dir).read_metrics() == RunDir(reference).read_metrics()


def _resume(run_dir, data_root):
    done = subprocess.run(
        _cli("resume", str(run_dir)), env=_env(data_root), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, data_root, reference):
    seed = int.from_bytes(os.urandom(4), "little")
    target = random.Random(seed).randrange(25, 2 * STEPS - 20)
    run_dir = tmp_path / "killed"
    code, _ = _start_and_signal(run_dir, data_root, signal.SIGKILL, target)
    assert code == -signal.SIGKILL, f"seed {seed}: the run finished before the kill"
    _resume(run_dir, data_root)
    _assert_same_as_reference(run_dir, reference)


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(tmp_path, data_root, reference):
    run_dir = tmp_path / "terminated"
    code, err = _start_and_signal(run_dir, data_root, signal.SIGTERM, target=STEPS + 45)
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at step" in err and f"classicnets resume {run_dir}" in err
    step = int(err.split("at step ")[1].split(";")[0])
    assert list_checkpoints(run_dir / "checkpoints", "bn")[-1][0] == step  # written on the signal
    assert "Traceback" not in err
    _resume(run_dir, data_root)
    _assert_same_as_reference(run_dir, reference)
