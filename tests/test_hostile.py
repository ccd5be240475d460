"""Hostile input: what a user types or tampers with never gets a traceback or loses data.

One table, ``CASES``: each row is a command line, run against a fresh copy of a small finished
bn-mlp run (and its NumPy export) after an optional tampering step. Every row must end with exit
code 2, one line on stderr that contains the expected words, no traceback, and every file under
the working folder byte-for-byte as it was (nothing overwritten, nothing half written, no new
run folder). The live-run cases below it use real processes: a second writer of a run folder is
refused while the first is still training, and no record is written twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from classicnets.cli import main
from classicnets.files import holder_pid

SMALL = [
    "steps=20",
    "eval_every=10",
    "log_every=10",
    "checkpoint_every=10",
    "train_limit=600",
    "progress=false",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root) -> Path:
    """A finished two-variant bn-mlp run and a NumPy export of its BN model."""
    base = tmp_path_factory.mktemp("hostile")
    sets = [a for s in [*SMALL, f"data_dir={data_root}"] for a in ("--set", s)]
    assert (
        main(["run", "bn-mlp", "--quick", "--device", "cpu", "--out", str(base / "run"), *sets])
        == 0
    )
    export = ["--format", "numpy", "--variant", "bn", "--out", str(base / "export")]
    assert main(["export", str(base / "run"), *export]) == 0
    return base


# --------------------------------------------------------------------------- tampering helpers


def _json_edit(relative: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def tamper(work: Path) -> None:
        path = work / relative
        record = json.loads(path.read_text())
        change(record)
        path.write_text(json.dumps(record))

    return tamper


def _config(**values) -> Callable[[Path], None]:
    return _json_edit("run/config.json", lambda r: r["config"].update(values))


def _manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return _json_edit("export/bn/manifest.json", change)


def _write(relative: str, data: bytes | str) -> Callable[[Path], None]:
    def tamper(work: Path) -> None:
        path = work / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return tamper


def _npy(relative: str, array: np.ndarray) -> Callable[[Path], None]:
    def tamper(work: Path) -> None:
        np.save(work / relative, array)

    return tamper


def _png(relative: str, size: int) -> Callable[[Path], None]:
    def tamper(work: Path) -> None:
        from PIL import Image

        Image.fromarray(np.zeros((size, size), dtype=np.uint8)).save(work / relative)

    return tamper


def _metrics_line(number: int, text: str) -> Callable[[Path], None]:
    def tamper(work: Path) -> None:
        path = work / "run" / "metrics.jsonl"
        lines = path.read_text().splitlines()
        lines[number] = text
        path.write_text("\n".join(lines) + "\n")

    return tamper


def _zip_bomb(work: Path) -> None:
    """weights.npz replaced by a small archive whose one array inflates 1000-fold."""
    path = work / "export" / "bn" / "weights.npz"
    path.unlink()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("head.weight.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.zeros(4_000_000, dtype=np.float32))


def _reshape(shape: list) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        manifest["layers"][0]["attrs"]["shape"] = shape

    return change


def _layer(index: int, **fields) -> Callable[[dict], None]:
    return lambda m: m["layers"][index].update(fields)


@dataclass
class Case:
    argv: list[str]  # {run}, {export}, {bundle}, {work} are replaced by paths
    expected: str  # words the one-line message must contain
    tamper: Callable[[Path], None] | None = None
    env: dict[str, str] | None = None  # set for the command


RUN = ["run", "bn-mlp", "--quick", "--device", "cpu"]
SWEEP = ["sweep", "bn-mlp", "--quick", "--device", "cpu"]
KERAS_FIXTURE = str(Path(__file__).resolve().parent / "keras_fixtures" / "dense.keras")
BUNDLE = "{work}/export/bn"

CASES: dict[str, Case] = {
    # ---- values only torch would have rejected, and values it would have taken silently
    "momentum=-1": Case([*RUN, "--set", "momentum=-1"], "momentum=-1.0: expected in [0, 1)"),
    "momentum=1": Case([*RUN, "--set", "momentum=1"], "momentum=1.0: expected in [0, 1)"),
    "lr_plain=-1": Case([*RUN, "--set", "lr_plain=-1"], "lr_plain=-1.0: expected a finite"),
    "lr_plain=nan": Case([*RUN, "--set", "lr_plain=nan"], "lr_plain=nan"),
    "lr_bn=inf": Case([*RUN, "--set", "lr_bn=inf"], "lr_bn=inf"),
    "bn_eps=-1": Case([*RUN, "--set", "bn_eps=-1"], "bn_eps=-1.0: expected a finite number > 0"),
    "bn_momentum=2": Case([*RUN, "--set", "bn_momentum=2"], "bn_momentum=2.0: expected in (0, 1]"),
    "train_limit=0": Case([*RUN, "--set", "train_limit=0"], "train_limit=0"),
    "train_limit below a batch": Case(
        [*RUN, "--set", "train_limit=10"], "train_limit=10: expected at least one batch"
    ),
    "checkpoint_every=-1": Case([*RUN, "--set", "checkpoint_every=-1"], "checkpoint_every=-1"),
    "steps=0": Case([*RUN, "--set", "steps=0"], "steps=0: expected a finite number >= 1"),
    "batch_size=0": Case([*RUN, "--set", "batch_size=0"], "batch_size=0"),
    "hidden size 0": Case([*RUN, "--set", "hidden_sizes=100,0"], "hidden_sizes=0"),
    "seed=-1": Case([*RUN, "--set", "seed=-1"], "seed=-1"),
    "weight_decay=-1": Case(
        ["run", "resnet-vs-mlp", "--quick", "--set", "weight_decay=-1"], "weight_decay=-1.0"
    ),
    "gan lr_generator=0": Case(
        ["run", "gan", "--quick", "--set", "lr_generator=0"], "lr_generator"
    ),
    "vae latent_size=0": Case(["run", "vae", "--quick", "--set", "latent_size=0"], "latent_size=0"),
    "lm dropout=1.5": Case(
        ["run", "rnn-vs-lstm", "--quick", "--set", "dropout=1.5"], "dropout=1.5"
    ),
    "jobs=-1": Case([*RUN, "--set", "jobs=-1"], "jobs=-1: expected a finite number >= 0"),
    "jobs=two": Case([*RUN, "--set", "jobs=two"], "jobs='two': expected an integer"),
    "CLASSICNETS_JOBS=many": Case(
        RUN, "CLASSICNETS_JOBS='many': expected a whole number", env={"CLASSICNETS_JOBS": "many"}
    ),
    "CLASSICNETS_JOBS=-2 on resume": Case(
        ["resume", "{run}"],
        "CLASSICNETS_JOBS='-2': expected 0 or more",
        env={"CLASSICNETS_JOBS": "-2"},
    ),  # fmt: skip
    "vae iw_samples=-1": Case(["run", "vae", "--quick", "--set", "iw_samples=-1"], "iw_samples=-1"),
    "vae binarize=maybe": Case(
        ["run", "vae", "--quick", "--set", "binarize=maybe"], "binarize='maybe': expected a boolean"
    ),
    "vae binarize_seed=-1": Case(
        ["run", "vae", "--quick", "--set", "binarize_seed=-1"], "binarize_seed=-1"
    ),
    "mlp_step=maybe": Case([*RUN, "--set", "mlp_step=maybe"], "mlp_step='maybe': expected a"),
    "tensorboard=maybe": Case(
        [*RUN, "--set", "tensorboard=maybe"], "tensorboard='maybe': expected true or false or none"
    ),
    "runs of a missing folder": Case(["runs", "{work}/nothing"], "nothing: no such folder"),
    "runs of a file": Case(
        ["runs", "{work}/notes.txt"], "a file, not a folder of runs", _write("notes.txt", "mine")
    ),  # fmt: skip
    "conv-ae kernel_size=0": Case(
        ["run", "conv-ae", "--quick", "--set", "kernel_size=0"], "kernel_size=0"
    ),
    # ---- --out where a run cannot go
    "--out is a file": Case(
        [*RUN, "--out", "{work}/notes.txt"], "is a file, not a folder", _write("notes.txt", "mine")
    ),
    "--out under a file": Case(
        [*RUN, "--out", "{work}/notes.txt/run"], "notes.txt", _write("notes.txt", "mine")
    ),
    "--out a user's folder": Case(
        [*RUN, "--out", "{work}/mine"],
        "is not empty and is not a run folder",
        _write("mine/report.html", "<p>my own report</p>"),
    ),
    "--out an existing run": Case([*RUN, "--out", "{run}"], "already holds a run"),
    "--out on a file system that refuses it": Case(
        [*RUN, "--out", "/proc/classicnets-hostile/run"], "/proc/classicnets-hostile"
    ),
    # ---- a run folder's files damaged or edited
    "config value of the wrong type": Case(
        ["resume", "{run}"], 'steps="ten"', _config(steps="ten")
    ),
    "config value out of range": Case(["resume", "{run}"], "momentum=-1", _config(momentum=-1)),
    "config unknown key": Case(["resume", "{run}"], "bogus", _config(bogus=1)),
    "config device not a name": Case(
        ["resume", "{run}"], "config.json: _device=7: expected", _config(_device=7)
    ),
    "config.json not JSON": Case(
        ["resume", "{run}"], "cannot read", _write("run/config.json", "{")
    ),
    "config.json experiment a number": Case(
        ["resume", "{run}"],
        "lacks the 'experiment'",
        _json_edit("run/config.json", lambda r: r.update(experiment=5)),
    ),  # fmt: skip
    "config.json config a list": Case(
        ["eval", "{run}"],
        "lacks the 'experiment'",
        _json_edit("run/config.json", lambda r: r.update(config=[])),
    ),  # fmt: skip
    "metrics line damaged": Case(
        ["resume", "{run}"], "metrics.jsonl:2: not a metrics record", _metrics_line(1, "{oops")
    ),
    "metrics step a string": Case(
        ["resume", "{run}"],
        "metrics.jsonl:1: not a metrics record",
        _metrics_line(0, '{"variant": "plain", "step": "ten", "split": "train"}'),
    ),
    "summary.json damaged": Case(
        ["report", "{run}"], "summary.json", _write("run/summary.json", "[1, 2")
    ),
    "resume of no folder": Case(["resume", "{work}/nothing"], "does not exist"),
    "resume of a file": Case(
        ["resume", "{work}/notes.txt"], "is a file, not a run folder", _write("notes.txt", "x")
    ),
    "resume of a folder that is no run": Case(
        ["resume", "{work}/mine"], "is not a run folder", _write("mine/a.txt", "x")
    ),
    # ---- sweep, its folder and the comparison report
    "sweep --grid without values": Case([*SWEEP, "--grid", "lr_bn"], "--grid expects key=v1,v2"),
    "sweep --grid an empty value": Case([*SWEEP, "--grid", "lr_bn=0.1,"], "an empty value"),
    "sweep --grid a value twice": Case([*SWEEP, "--grid", "lr_bn=1,1"], "lr_bn: 1 given twice"),
    "sweep --grid a key twice": Case(
        [*SWEEP, "--grid", "lr_bn=1,2", "--grid", "lr_bn=3"], "lr_bn is given twice"
    ),
    "sweep --grid an unknown key": Case([*SWEEP, "--grid", "nope=1,2"], "unknown config key"),
    "sweep --grid a value of the wrong type": Case(
        [*SWEEP, "--grid", "lr_bn=0.1,fast"], "grid point lr_bn=fast: lr_bn='fast'"
    ),
    "sweep --grid a value out of range": Case(
        [*SWEEP, "--grid", "lr_bn=0.1,-1"], "lr_bn=-1.0: expected a finite number > 0"
    ),
    "sweep --grid jobs": Case([*SWEEP, "--grid", "jobs=1,2"], "use --jobs N"),
    "sweep --grid and --set of one key": Case(
        [*SWEEP, "--grid", "lr_bn=1,2", "--set", "lr_bn=3"], "--grid lr_bn and --set lr_bn"
    ),
    "sweep of one point": Case([*SWEEP, "--grid", "lr_bn=1"], "at least two points"),
    "sweep without --grid": Case(SWEEP, "at least one --grid"),
    "sweep of a grid too large": Case(
        [
            *SWEEP,
            "--grid",
            "seed=" + ",".join(map(str, range(40))),
            "--grid",
            "lr_bn=" + ",".join(str(i + 1) for i in range(30)),
        ],
        "1,200 points",
    ),  # fmt: skip
    "sweep --jobs -1": Case([*SWEEP, "--grid", "lr_bn=1,2", "--jobs", "-1"], "--jobs -1"),
    "sweep --jobs two": Case([*SWEEP, "--grid", "lr_bn=1,2", "--jobs", "two"], "--jobs"),
    "sweep of an unknown experiment": Case(
        ["sweep", "bn-cnn", "--grid", "lr=1,2"], "unknown experiment 'bn-cnn'"
    ),
    "sweep --device tpu": Case([*SWEEP[:-2], "--grid", "lr_bn=1,2", "--device", "tpu"], "tpu"),
    "sweep under torchrun": Case(
        [*SWEEP, "--grid", "lr_bn=1,2"], "not under torchrun", env={"WORLD_SIZE": "2"}
    ),
    "report of a sweep whose sweep.json is damaged": Case(
        ["report", "{work}/sweep"], "sweep.json: cannot read", _write("sweep/sweep.json", "[")
    ),
    "sweep --out an existing run": Case(
        [*SWEEP, "--grid", "lr_bn=1,2", "--out", "{run}"], "already holds a run"
    ),
    "sweep --out a file": Case(
        [*SWEEP, "--grid", "lr_bn=1,2", "--out", "{work}/notes.txt"],
        "is a file, not a folder",
        _write("notes.txt", "mine"),
    ),  # fmt: skip
    "sweep without its data leaves no folder": Case(
        [
            *SWEEP,
            "--grid",
            "lr_bn=1,2",
            "--out",
            "{work}/new",
            "--set",
            "data_dir={work}/nodata",
            "--set",
            "download=false",
        ],
        "nodata",
    ),  # fmt: skip
    "resume of a sweep.json not JSON": Case(
        ["resume", "{work}/sweep"], "sweep.json: cannot read", _write("sweep/sweep.json", "{")
    ),
    "resume of a sweep.json of another format": Case(
        ["resume", "{work}/sweep"], "format 1", _write("sweep/sweep.json", '{"format": 9}')
    ),
    "resume of a sweep whose points leave its folder": Case(
        ["resume", "{work}/sweep"],
        "its points are not those of its grid",
        _write(
            "sweep/sweep.json",
            json.dumps(
                {
                    "format": 1,
                    "experiment": "bn-mlp",
                    "grid": [["lr_bn", ["1", "2"]]],
                    "sets": [],
                    "quick": True,
                    "device": "cpu",
                    "jobs": 0,
                    "points": [{"name": "../run"}, {"name": "1-lr_bn=2"}],
                }
            ),
        ),
    ),  # fmt: skip
    "report --compare without -o": Case(
        ["report", "{run}", "{run}", "--compare"], "--compare needs -o FILE"
    ),
    "report --compare of one run": Case(
        ["report", "{run}", "--compare", "-o", "{work}/c.html"], "at least two run folders"
    ),
    "report --compare of a folder that is no run": Case(
        ["report", "{run}", "{work}/mine", "--compare", "-o", "{work}/c.html"],
        "is not a run folder",
        _write("mine/a.txt", "x"),
    ),  # fmt: skip
    "report --compare of two experiments": Case(
        ["report", "{run}", "{work}/vae", "--compare", "-o", "{work}/c.html"],
        "runs of different experiments",
        _write("vae/config.json", '{"experiment": "vae", "config": {}}'),
    ),  # fmt: skip
    # ---- sample
    "sample --n -5": Case(["sample", "{run}", "--n", "-5"], "--n must be in [1, 10000], got -5"),
    "sample --n 100000000": Case(["sample", "{run}", "--n", "100000000"], "got 100000000"),
    "sample --temperature nan": Case(["sample", "{run}", "--temperature", "nan"], "--temperature"),
    # ---- predict: inputs that do not fit the model
    "predict a 56x56 PNG": Case(
        ["predict", BUNDLE, "{work}/big.png"],
        "input of shape [56, 56] does not fit",
        _png("big.png", 56),
    ),  # fmt: skip
    "predict a 1568-vector": Case(
        ["predict", BUNDLE, "{work}/x.npy"],
        "input of shape [1568] does not fit",
        _npy("x.npy", np.zeros(1568, dtype=np.float32)),
    ),
    "predict NaN pixels": Case(
        ["predict", BUNDLE, "{work}/x.npy"],
        "NaN or infinite",
        _npy("x.npy", np.full((28, 28), np.nan, dtype=np.float32)),
    ),
    "predict infinite pixels": Case(
        ["predict", BUNDLE, "{work}/x.npy"],
        "NaN or infinite",
        _npy("x.npy", np.full((1, 28, 28), np.inf, dtype=np.float32)),
    ),
    "predict an empty .npy": Case(
        ["predict", BUNDLE, "{work}/x.npy"], "empty", _npy("x.npy", np.zeros((0,), dtype=np.uint8))
    ),
    "predict a missing input": Case(["predict", BUNDLE, "{work}/none.png"], "no such file"),
    "predict a .npy that is text": Case(
        ["predict", BUNDLE, "{work}/x.npy"],
        "refused, inputs are read with allow_pickle=False",
        _write("x.npy", "hello"),
    ),  # fmt: skip
    "predict --top 0": Case(["predict", BUNDLE, "{work}/none.png", "--top", "0"], "--top"),
    # ---- predict: malformed bundles
    "weights.file leads out": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "weights.file must be a file name inside the bundle folder",
        _manifest(lambda m: m["weights"].update(file="../../etc/passwd")),
    ),
    "weights.file absolute": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "weights.file must be a file name inside",
        _manifest(lambda m: m["weights"].update(file="/etc/passwd")),
    ),
    "weights not an object": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "'weights' must be an object",
        _manifest(lambda m: m.update(weights=3)),
    ),  # fmt: skip
    "inputs: 5": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "'inputs' must be a non-empty list",
        _manifest(lambda m: m.update(inputs=5)),
    ),  # fmt: skip
    "inputs: []": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "'inputs' must be a non-empty list",
        _manifest(lambda m: m.update(inputs=[])),
    ),  # fmt: skip
    "input shape with a string": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "shape of positive integers",
        _manifest(lambda m: m["inputs"][0].update(shape=[None, "a"])),
    ),
    "layers a string": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "'layers' must be a non-empty list",
        _manifest(lambda m: m.update(layers="x")),
    ),  # fmt: skip
    "layer attrs a string": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "attrs must be an object",
        _manifest(_layer(1, attrs="x")),
    ),  # fmt: skip
    "layer inputs a string": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "inputs must be a list",
        _manifest(_layer(1, inputs="x")),
    ),  # fmt: skip
    "linear in_features a string": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "the layer expects",
        _manifest(lambda m: m["layers"][1]["attrs"].update(in_features="784")),
    ),
    "bad reshape": Case(
        ["predict", BUNDLE, "{work}/x.npy"],
        "(reshape) failed on inputs of shape [1, 1, 28, 28]",
        lambda w: (
            _manifest(_reshape([-1, 783]))(w),
            _npy("x.npy", np.zeros((28, 28), np.uint8))(w),
        ),
    ),
    "class_names a number": Case(
        ["predict", BUNDLE, "{work}/x.npy"],
        "class_names must list the model's 10 classes",
        lambda w: (
            _manifest(lambda m: m.update(class_names=5))(w),
            _npy("x.npy", np.zeros((28, 28), np.uint8))(w),
        ),
    ),  # fmt: skip
    "kind a number": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "does not know models of kind 7",
        _manifest(lambda m: m.update(kind=7)),
    ),  # fmt: skip
    "format_version 99": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "format_version 99",
        _manifest(lambda m: m.update(format_version=99)),
    ),  # fmt: skip
    "outputs a number": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "'outputs' must be names",
        _manifest(lambda m: m.update(outputs=5)),
    ),  # fmt: skip
    "manifest not JSON": Case(
        ["predict", BUNDLE, "{work}/none.png"],
        "unreadable manifest",
        _write("export/bn/manifest.json", "{"),
    ),  # fmt: skip
    # ---- import-keras, bn-check, recalibrate
    "import-keras a missing file": Case(
        ["import-keras", "{work}/none.keras", "--out", "{work}/m"], "none.keras: no such file"
    ),
    "import-keras a text file": Case(
        ["import-keras", "{work}/notes.txt", "--out", "{work}/m"],
        "neither a .keras archive nor an HDF5",
        _write("notes.txt", "x"),
    ),
    "import-keras into a user's folder": Case(
        ["import-keras", KERAS_FIXTURE, "--out", "{work}/mine"],
        "exists and is not an empty folder",
        _write("mine/a.txt", "x"),
    ),
    "bn-check of no folder": Case(["bn-check", "{work}/nothing"], "does not exist"),
    "bn-check --inputs missing": Case(
        ["bn-check", "{run}", "--inputs", "{work}/none.npy"], "none.npy: no such file"
    ),
    "bn-check --inputs NaN": Case(
        ["bn-check", "{run}", "--inputs", "{work}/x.npy"],
        "holds NaN or infinite values",
        _npy("x.npy", np.full((4, 1, 28, 28), np.nan, dtype=np.float32)),
    ),
    "bn-check --inputs of another shape": Case(
        ["bn-check", "{run}", "--inputs", "{work}/x.npy"],
        "shape [4, 784], the model takes [N, 1, 28, 28]",
        _npy("x.npy", np.zeros((4, 784), dtype=np.float32)),
    ),
    "bn-check --inputs not an array": Case(
        ["bn-check", "{run}", "--inputs", "{work}/x.npy"],
        "not a numeric .npy",
        _write("x.npy", "x"),
    ),
    "recalibrate --inputs empty": Case(
        ["recalibrate", "{run}", "--inputs", "{work}/x.npy"],
        "expected a non-empty numeric array",
        _npy("x.npy", np.zeros((0, 1, 28, 28), dtype=np.float32)),
    ),
    "zip bomb": Case(
        ["predict", BUNDLE, "{work}/none.png"], "refused before decompressing", _zip_bomb
    ),
}


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``folder`` with its bytes (None for folders)."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case_is_one_line_exit_2_and_changes_nothing(
    name, finished, tmp_path, monkeypatch, capsys
):
    case = CASES[name]
    work = tmp_path / "work"
    shutil.copytree(finished, work)
    if case.tamper is not None:
        case.tamper(work)
    monkeypatch.chdir(work)  # a default runs/ folder would appear here
    for key, value in (case.env or {}).items():
        monkeypatch.setenv(key, value)
    before = _snapshot(work)
    paths = {"run": work / "run", "export": work / "export", "work": work}
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in case.argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert case.expected in err, err
    assert _snapshot(work) == before


# --------------------------------------------------------------------------- not a hostile exit


def test_edited_checkpoint_step_falls_back_and_loses_no_record(finished, tmp_path):
    """The newest checkpoint's state.step edited from 20 to 7: it is skipped (its checksum and
    name disagree), the run resumes from step 10 and rewrites steps 11-20 identically."""
    work = tmp_path / "run"
    shutil.copytree(finished / "run", work)
    before = (work / "metrics.jsonl").read_text()
    for variant in ("plain", "bn"):
        _json_edit(f"checkpoints/{variant}-step00000020.json", lambda r: r["state"].update(step=7))(
            work
        )
    with pytest.warns(UserWarning, match="step00000020.json"):
        assert main(["resume", str(work), "--device", "cpu"]) == 0
    assert _by_variant((work / "metrics.jsonl").read_text()) == _by_variant(before)
    assert json.loads((work / "summary.json").read_text())["status"] == "complete"


def _by_variant(text: str) -> dict[str, list[dict]]:
    """Each variant's records in order (a resumed run appends one variant after the other)."""
    out: dict[str, list[dict]] = {}
    for line in text.splitlines():
        record = json.loads(line)
        out.setdefault(record["variant"], []).append(record)
    return out


def test_full_disk_mid_run_is_exit_2_and_the_run_resumes(
    finished, data_root, tmp_path, monkeypatch, capsys
):
    """ENOSPC on the second checkpoint write: one line, exit 2; then resume finishes the run with
    the same records as the uninterrupted one."""
    import classicnets.files as files

    real_replace, calls = os.replace, []

    def full_disk(src, dst):
        calls.append(dst)
        if str(dst).endswith("plain-step00000020.safetensors"):
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", full_disk)
    out = tmp_path / "run"
    sets = [a for s in [*SMALL, f"data_dir={data_root}"] for a in ("--set", s)]
    assert main([*RUN, "--out", str(out), *sets]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err
    assert "plain-step00000020.safetensors" in err
    assert list(out.rglob(".*.tmp")) == []  # the failed write left no temporary file
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert main(["resume", str(out)]) == 0
    expected = (finished / "run" / "metrics.jsonl").read_text()
    assert _by_variant((out / "metrics.jsonl").read_text()) == _by_variant(expected)


def test_explosive_learning_rate_is_recorded_as_diverged(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    sets = [
        a
        for s in [*SMALL, f"data_dir={data_root}", "lr_plain=1e30", "variants=plain"]
        for a in ("--set", s)
    ]
    assert main([*RUN, "--out", str(out), *sets]) == 1
    err = capsys.readouterr().err
    assert "diverged" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and "times its first value" in summary["error"]


# --------------------------------------------------------------------------- live runs


def _classicnets(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "classicnets", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def test_second_writer_of_a_live_run_is_refused(data_root, tmp_path):
    out = tmp_path / "live"
    # Long enough never to finish during the checks on any machine; stopped with SIGTERM after.
    sets = ["steps=50000", "eval_every=1000", "log_every=50", "checkpoint_every=1000"]
    sets += ["train_limit=600", "progress=false", f"data_dir={data_root}"]
    first = _classicnets(*RUN, "--out", str(out), *[a for s in sets for a in ("--set", s)])
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # wait until it is training
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        busy = f"{out} is in use by another classicnets process (PID {first.pid})"
        for argv, expected in (
            (["resume", str(out)], busy),
            (["eval", str(out)], busy),
            (["export", str(out), "--format", "numpy"], busy),  # into RUN/export by default
            ([*RUN, "--out", str(out)], busy),
        ):
            second = _classicnets(*argv)
            _, err = second.communicate(timeout=120)
            assert second.returncode == 2, err
            assert len(err.strip().splitlines()) == 1, err
            assert expected in err
        assert first.poll() is None  # still training: the checks ran against a live run
        first.send_signal(signal.SIGTERM)  # checkpoints and stops, as Ctrl-C would
        _, err = first.communicate(timeout=120)
        assert "classicnets resume" in err, err
    finally:
        first.kill()
        first.communicate()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["variant"], r["split"], r["step"]) for r in records]
    assert len(keys) == len(set(keys))  # no record written twice
    assert holder_pid(out) is None  # the lock went with the process


def test_two_runs_racing_for_one_new_out_folder(data_root, tmp_path):
    """Started together on the same new --out: exactly one trains, the other is refused."""
    out = tmp_path / "race"
    sets = [a for s in [*SMALL, f"data_dir={data_root}"] for a in ("--set", s)]
    procs = [_classicnets(*RUN, "--out", str(out), *sets) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (err,) = [err for code, err in results if code == 2]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # Refused by the lock while the other starts, or by its config.json once it has begun.
    assert "in use by another classicnets process" in err or "already holds a run" in err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["variant"], r["split"], r["step"]) for r in records]
    assert len(keys) == len(set(keys))


def test_stale_temporaries_of_a_killed_write_go_with_the_next_writer(finished, tmp_path):
    """A write killed between its temporary file and the rename leaves ``.NAME.*.tmp``; the
    next process that takes the folder's lock removes it (and nothing else)."""
    work = tmp_path / "run"
    shutil.copytree(finished / "run", work)
    stale = [
        work / ".metrics.jsonl.0badc0de.tmp",
        work / "checkpoints" / ".bn-step00000030.json.1.tmp",
    ]
    for path in stale:
        path.write_text("torn")
    before = _snapshot(work)
    assert main(["resume", str(work), "--device", "cpu"]) == 0  # a complete run: nothing to do
    after = _snapshot(work)
    assert not any(path.exists() for path in stale)
    removed = {str(p.relative_to(work)) for p in stale}
    assert set(before) - set(after) == removed
