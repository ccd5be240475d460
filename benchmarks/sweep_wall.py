"""Wall time of two grid points of ``conv-ae``: one run after the other, or one sweep.

Baseline: what a user does without ``sweep``: ``run_experiment`` for each point in turn, each
with its default ``jobs`` (on a 2-core CPU: two workers of one thread; conv-ae's third variant
then trains alone, one core idle). Ours: ``run_sweep`` of the same two points, its six
(point, variant) jobs in one pool of the default size. Every variant trains on one thread in
both, so the records are the same. ``--epochs`` (default 1) of the default architecture per
variant, on all 60,000 images, the test error on the first 2,000 test images. The two alternate
over ``--rounds`` rounds (a shared machine's load drifts); the ratio is that of the median wall
times, each from the first point's start to the last point's report.

    python benchmarks/sweep_wall.py [--epochs 1] [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from classicnets.experiments import run_experiment
from classicnets.experiments.sweep import run_sweep

SEEDS = ("0", "1")


def _settings(epochs: int, quick: bool) -> list[str]:
    if quick:
        return ["train_limit=2560", "test_limit=500", "progress=false"]
    return [f"epochs={epochs}", "test_limit=2000", "eval_every=1000", "progress=false"]


def _runs(folder: Path, sets: list[str]) -> float:
    start = time.perf_counter()
    for seed in SEEDS:
        run_experiment("conv-ae", [*sets, f"seed={seed}"], device="cpu", out=folder / seed)
    return time.perf_counter() - start


def _sweep(folder: Path, sets: list[str]) -> float:
    start = time.perf_counter()
    run_sweep("conv-ae", [f"seed={','.join(SEEDS)}"], sets, device="cpu", out=folder)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs per variant")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a few steps (a smoke test)")
    args = parser.parse_args()
    os.environ.pop("CLASSICNETS_JOBS", None)  # the defaults are what is measured
    sets = _settings(args.epochs, args.quick)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; conv-ae, 2 points x 3 "
          f"variants, {' '.join(sets)}")  # fmt: skip
    walls: dict[str, list[float]] = {"runs": [], "sweep": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            walls["runs"].append(_runs(Path(scratch) / f"runs{round_}", sets))
            walls["sweep"].append(_sweep(Path(scratch) / f"sweep{round_}", sets))
    for name, label in (("runs", "run, then run"), ("sweep", "one sweep")):
        rounds = ", ".join(f"{w:.2f}" for w in walls[name])
        print(f"{label:<14} wall {statistics.median(walls[name]):6.1f} s (rounds: {rounds})")
    ratio = statistics.median(walls["runs"]) / statistics.median(walls["sweep"])
    print(f"ratio runs / sweep: {ratio:.2f}x")


if __name__ == "__main__":
    main()
