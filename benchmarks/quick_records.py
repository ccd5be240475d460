"""Record, or check, the metrics records of every experiment's quick run (the refactoring guard).

A behaviour-preserving refactor of the training code must leave every record of every quick run
as it was, time fields aside (issue "one training loop", item 6). Records are bit-identical only
on one machine (deterministic mode on CPU), so record on the machine that checks:

    PYTHONPATH=src python benchmarks/quick_records.py record before.json   # before the first move
    PYTHONPATH=src python benchmarks/quick_records.py check before.json    # after each step

``check`` prints the first record that differs per experiment and exits 1 if any does. The six
quick runs take about 45 s on 2 cores. Data from ``CLASSICNETS_DATA`` (or ``--data-dir``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

EXPERIMENTS = ("bn-mlp", "conv-ae", "vae", "gan", "resnet-vs-mlp", "rnn-vs-lstm")
# Fields that measure time, not training: they differ between any two runs.
TIME_FIELDS = (
    "train_time_s",
    "wall_time_s",
    "time_s",
    "tokens_per_s",
    "images_per_s",
    "steps_per_s",
)


def _clean(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIME_FIELDS and not k.endswith("_time_s")}


def quick_records(experiments, data_dir: str | None) -> dict[str, list[dict]]:
    from classicnets.experiments import run_experiment
    from classicnets.train.run import RunDir

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in experiments:
            overrides = ["progress=false"] + ([f"data_dir={data_dir}"] if data_dir else [])
            run_dir, _ = run_experiment(
                name, overrides, quick=True, device="cpu", out=Path(tmp) / name
            )
            out[name] = [_clean(r) for r in RunDir(run_dir).read_metrics()]
            print(f"{name}: {len(out[name])} records", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("record", "check"))
    parser.add_argument("file")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--only", nargs="*", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    args = parser.parse_args(argv)
    records = quick_records(args.only, args.data_dir)
    path = Path(args.file)
    if args.action == "record":
        path.write_text(json.dumps(records, indent=1) + "\n")
        print(f"recorded {sum(map(len, records.values()))} records in {path}")
        return 0
    expected = json.loads(path.read_text())
    failed = False
    for name, got in records.items():
        want = expected.get(name)
        if want == got:
            print(f"{name}: identical ({len(got)} records)")
            continue
        failed = True
        if want is None:
            print(f"{name}: not in {path}")
            continue
        for i, (a, b) in enumerate(zip(want, got)):
            if a != b:
                print(f"{name}: record {i} differs\n  was {a}\n  now {b}")
                break
        else:
            print(f"{name}: {len(want)} records before, {len(got)} now")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
