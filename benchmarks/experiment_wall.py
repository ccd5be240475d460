"""Wall time of the same ``bn-mlp`` work with its variants one after the other and side by side.

Baseline: ``jobs=1``, today's order (plain, then bn, in this process, with all its threads).
Ours: the default, ``jobs`` automatic (on a 2-core CPU: two worker processes of one thread
each). Both variants, ``--steps`` steps each (default 10,000), evaluated every 500, in fresh run
folders, in this one process. The two alternate over ``--rounds`` rounds (a shared machine's
load drifts); the ratio is that of the median wall times.

    python benchmarks/experiment_wall.py [--steps 10000] [--rounds 3] [--device cpu] [--quick]

Prints each wall time (``summary.json``'s ``wall_time_s``: from the start of the lifecycle to
the written report, the workers' start-up included), the ratio baseline / ours, and the final
test accuracies of both (equal when both use the same threads per variant; here the baseline's
variants have all the threads, so they may differ in the last digits).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from classicnets.experiments import run_experiment
from classicnets.experiments.common import resolve_jobs


def _run(out: Path, steps: int, jobs: int, device: str) -> dict:
    overrides = [f"steps={steps}", "eval_every=500", "log_every=100",
                 f"checkpoint_every={steps}", "progress=false", f"jobs={jobs}"]  # fmt: skip
    _, summary = run_experiment("bn-mlp", overrides, device=device, out=out)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10_000, help="steps per variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="1,000 steps (a smoke test)")
    args = parser.parse_args()
    steps = 1000 if args.quick else args.steps
    os.environ.pop("CLASSICNETS_JOBS", None)  # the default is what is measured
    default_jobs = resolve_jobs(0, 2, args.device)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; bn-mlp, 2 variants x "
          f"{steps} steps, device {args.device}")  # fmt: skip
    walls: dict[str, list[float]] = {"serial": [], "parallel": []}
    last: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for name, jobs in (("serial", 1), ("parallel", default_jobs)):
                last[name] = _run(Path(scratch) / f"{name}{round_}", steps, jobs, args.device)
                walls[name].append(last[name]["wall_time_s"])
    for name, label in (("serial", "jobs=1"), ("parallel", f"jobs={default_jobs} (default)")):
        variants = last[name]["variants"].items()
        accuracies = ", ".join(f"{v} {r['test_accuracy']:.4f}" for v, r in variants)
        training = ", ".join(f"{v} {r['train_time_s']:.1f} s" for v, r in variants)
        rounds = ", ".join(f"{w:.1f}" for w in walls[name])
        print(f"{label:<18} wall {statistics.median(walls[name]):6.1f} s (rounds: {rounds}); "
              f"last round's training, evaluations left out: {training}; test accuracy: "
              f"{accuracies}")  # fmt: skip
    ratio = statistics.median(walls["serial"]) / statistics.median(walls["parallel"])
    print(f"ratio jobs=1 / default: {ratio:.2f}x (target >= 1.5x on 2 cores)")


if __name__ == "__main__":
    main()
