"""Data parallelism through torchrun on CPU (gloo), for every paradigm of ``train.fit``: two
processes with the global batch split in two end with the same weights and records as one process
over the global batch, written into one run folder, and a run killed under torchrun resumes."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from classicnets.experiments import run_experiment
from classicnets.train.checkpoint import list_checkpoints
from classicnets.train.run import RunDir
from tolerances import two_orders

SRC = str(Path(__file__).resolve().parents[1] / "src")
SETTINGS = [
    "steps=60",
    "batch_size=60",
    "eval_every=30",
    "log_every=10",
    "checkpoint_every=30",
    "train_limit=3000",
    "progress=false",
    "sync_bn=true",
]


# Per step, the two processes' gradient (two half-batch sums, all-reduced) and the one process's
# (one sum over the batch of 60) are two orders of the same sum: within two_orders(60, sum|g_i|),
# with per-example gradient terms of the bn-mlp below 1 in magnitude once averaged (sum|g_i| / 60
# <= 1). An SGD step moves the difference by lr (<= 2) times that; over the 60 steps the
# differences add up, as long as training does not amplify them, which near the start of
# training with these rates it does not (the loss falls smoothly).
TOL = 60 * 2 * two_orders(60, 1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(data_root, *argv: str) -> subprocess.CompletedProcess:
    """``python -m classicnets *argv`` in two gloo processes under torchrun; it must exit 0."""
    env = {
        **os.environ,
        "PYTHONPATH": SRC,
        "CLASSICNETS_DATA": str(data_root),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "classicnets",
        *argv,
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _run(experiment: str, out: Path, sets: list[str], quick: bool = True) -> list[str]:
    """The arguments of ``classicnets run`` on the CPU with ``--set`` for each of ``sets``."""
    settings = [x for s in sets for x in ("--set", s)]
    return ["run", experiment, *(["--quick"] if quick else []), "--device", "cpu", "--out",
            str(out), *settings]  # fmt: skip


def _assert_same_weights(single, ddp, variant: str, tol: float) -> None:
    """The newest checkpoints of ``variant`` in two run folders hold the same tensors: floats
    within ``tol`` absolute, the rest (counters, RNG states) exactly."""
    a, b = _weights(single, variant), _weights(ddp, variant)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], atol=tol, rtol=0, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


def _weights(run_dir: Path, variant: str) -> dict:
    _, path = list_checkpoints(run_dir / "checkpoints", variant)[-1]
    return {k: v for k, v in load_file(path.with_suffix(".safetensors")).items()
            if k.startswith("model.")}  # fmt: skip


def test_two_processes_with_sync_bn_equal_one_process(tmp_path, data_root):
    single = tmp_path / "single"
    run_experiment("bn-mlp", [*SETTINGS, f"data_dir={data_root}"], device="cpu", out=single)

    ddp = tmp_path / "ddp"
    done = _torchrun(data_root, *_run("bn-mlp", ddp, SETTINGS, quick=False))

    for variant in ("plain", "bn"):
        _assert_same_weights(single, ddp, variant, TOL)
    # Written once: one folder, each record once (rank 1 wrote nothing).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    records = RunDir(ddp).read_metrics()
    keys = [(r["variant"], r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys))
    assert len(records) == len(RunDir(single).read_metrics())
    assert done.stdout.count("run folder:") == 2  # each rank reports; only rank 0 wrote


# Adam's update m / sqrt(v) does not depend on the gradient's scale; a gradient with relative
# error rho changes it by at most 2 rho (first order: rho for m, rho / 2 twice for sqrt(v)) times
# its size, and its size is at most (1 - b1) / sqrt((1 - b2) (1 - b1^2 / b2)) (Cauchy-Schwarz on
# the two moving averages): 7.3 for b1 = 0.9, 18 for the GAN's b1 = 0.5 (b2 = 0.999). The
# gradient is a sum of B per-example terms, summed in another order by two processes (two halves,
# all-reduced): rho <= two_orders(B, sum|g_i|) / |sum g_i|, and we assume no coordinate cancels
# below 1 / B of its terms' magnitudes (sum|g_i| / |sum g_i| <= B). Over `steps` steps at rate lr
# the differences add up while training does not amplify them (the start of training, smooth
# losses). A process that stepped with its own half-batch gradient instead would differ by about
# lr per step, hundreds of times more.
def _adam(steps: int, lr: float, batch: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    size = (1 - beta1) / math.sqrt((1 - beta2) * (1 - beta1**2 / beta2))
    return steps * lr * 2 * batch * two_orders(batch, 1.0) * size


# Plain SGD (the language models, rate lr, gradients clipped to a norm, which scales them and
# keeps their relative error): a window's gradient is a sum over its rows x num_steps tokens,
# divided by the rows; with per-token terms below 1 (as for the bn-mlp above) its terms add up to
# at most num_steps. The forward passes differ too (5 rows against 10 per matrix product), which
# the same bound covers at this size of network (hidden 16).
def _sgd(steps: int, lr: float, terms: int, abs_sum: float) -> float:
    return steps * lr * two_orders(terms, abs_sum)


PARADIGMS = {
    # experiment: (--set values, tolerance of weights, relative tolerance of records)
    "conv-ae": (["variants=transpose,nearest", "sync_bn=true"], _adam(20, 1e-3, 64)),
    "vae": (["variants=vae-bce,cvae-bce"], _adam(32, 3e-3, 64)),
    "gan": (
        [
            "variants=gan,cgan",
            "dropout=0",
            "steps=60",
            "log_every=20",
            "grid_every=30",
            "checkpoint_every=30",
        ],
        _adam(60, 1e-3, 64, beta1=0.5),
    ),  # fmt: skip
    "rnn-vs-lstm": (["variants=lstm,rnn_tanh", "dropout=0"], _sgd(120, 1.0, 100, 10.0)),
}


@pytest.mark.parametrize("experiment", list(PARADIGMS))
def test_two_processes_equal_one_process_for_every_paradigm(tmp_path, data_root, experiment):
    """Dropout is off: its masks are drawn per process (the same seed, other rows), so they can
    not equal one process's. Everything else (data order, the GAN's and VAE's noise, the
    language model's rows and hidden state) is the global batch's, split."""
    sets, tol = PARADIGMS[experiment]
    sets = [*sets, "progress=false", f"data_dir={data_root}"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_experiment(experiment, sets, quick=True, device="cpu", out=single)
    done = _torchrun(data_root, *_run(experiment, ddp, sets))

    one, two = RunDir(single).read_metrics(), RunDir(ddp).read_metrics()
    variants = sorted({r["variant"] for r in one})
    assert len(variants) == 2
    for variant in variants:
        _assert_same_weights(single, ddp, variant, tol)
    # The same records, each once (rank 1 wrote nothing); their values are means of losses (or
    # norms, perplexities) of weights that agree within tol (weights and inputs of size <= 1):
    # to first order they agree within the same relative size.
    assert [(r["variant"], r["step"], r["split"]) for r in two] == [
        (r["variant"], r["step"], r["split"]) for r in one
    ]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float) and not key.endswith("_s"):
                assert b[key] == pytest.approx(value, rel=tol, abs=tol), (a, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    assert RunDir(ddp).read_summary()["status"] == "complete"
    assert done.stdout.count("run folder:") == 2


@pytest.mark.parametrize("experiment", ["gan", "rnn-vs-lstm"])
def test_a_run_killed_under_torchrun_resumes_under_torchrun(tmp_path, data_root, experiment):
    """Stopped after a few steps (a simulated kill, with its checkpoint) and resumed with two
    processes, a run ends with the records of an uninterrupted two-process run. The GAN's are
    bit-identical: the checkpoint holds the state every process shares, the interval's values
    averaged over the processes among it (averaging them again at the log changes nothing). The
    language model's epoch NLL is a running sum averaged over the processes at a checkpoint,
    which may round its sum otherwise: within two_orders of the epoch's 60 windows."""
    sets, _ = PARADIGMS[experiment]
    sets = [*sets, "progress=false", f"data_dir={data_root}"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _torchrun(data_root, *_run(experiment, whole, sets))
    _torchrun(data_root, *_run(experiment, killed, [*sets, "stop_after=25"]))
    assert RunDir(killed).read_summary()["status"] != "complete"
    record = json.loads((killed / "config.json").read_text())
    record["config"]["stop_after"] = None  # the resumed session runs to the end
    (killed / "config.json").write_text(json.dumps(record))
    _torchrun(data_root, "resume", str(killed), "--device", "cpu")

    want, got = RunDir(whole).read_metrics(), RunDir(killed).read_metrics()
    assert [(r["variant"], r["step"], r["split"]) for r in got] == [
        (r["variant"], r["step"], r["split"]) for r in want
    ]
    for a, b in zip(want, got):
        for key, value in a.items():
            if key.endswith("_s"):
                continue
            if experiment == "gan" or not isinstance(value, float):
                assert b[key] == value, (a, key)
            else:
                assert b[key] == pytest.approx(value, rel=two_orders(60, 1.0)), (a, key)
    assert RunDir(killed).read_summary()["status"] == "complete"
