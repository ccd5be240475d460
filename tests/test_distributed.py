"""DDP through torchrun on CPU (gloo): two processes with synchronized BN and the global batch
split in two end with the same weights as one process over the global batch; one run folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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


def _weights(run_dir: Path, variant: str) -> dict:
    _, path = list_checkpoints(run_dir / "checkpoints", variant)[-1]
    return {k: v for k, v in load_file(path.with_suffix(".safetensors")).items()
            if k.startswith("model.")}  # fmt: skip


def test_two_processes_with_sync_bn_equal_one_process(tmp_path, data_root):
    single = tmp_path / "single"
    run_experiment("bn-mlp", [*SETTINGS, f"data_dir={data_root}"], device="cpu", out=single)

    ddp = tmp_path / "ddp"
    env = {
        **os.environ,
        "PYTHONPATH": SRC,
        "CLASSICNETS_DATA": str(data_root),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "classicnets", "run", "bn-mlp", "--device", "cpu", "--out", str(ddp),
        *[x for s in SETTINGS for x in ("--set", s)],
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    for variant in ("plain", "bn"):
        a, b = _weights(single, variant), _weights(ddp, variant)
        assert a.keys() == b.keys()
        for key in a:
            if a[key].is_floating_point():
                torch.testing.assert_close(b[key], a[key], atol=TOL, rtol=0, msg=key)
            else:
                assert torch.equal(a[key], b[key]), key
    # Written once: one folder, each record once (rank 1 wrote nothing).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    records = RunDir(ddp).read_metrics()
    keys = [(r["variant"], r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys))
    assert len(records) == len(RunDir(single).read_metrics())
    assert done.stdout.count("run folder:") == 2  # each rank reports; only rank 0 wrote
