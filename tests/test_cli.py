"""The command line: one-line errors with exit code 2, and the main commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from classicnets.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


BAD_INPUT = pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "nope"], "unknown experiment 'nope'"),
        (["run", "bn-mlp", "--set", "bogus=1"], "unknown config key 'bogus'"),
        (["run", "bn-mlp", "--set", "steps=ten"], "steps='ten': expected an integer"),
        (["run", "bn-mlp", "--set", "steps"], "expects key=value"),
        (["run", "bn-mlp", "--set", "optimizer=rmsprop"], "optimizer must be sgd or adam"),
        (["run", "conv-ae", "--set", "norm=layer"], "norm must be batchnorm or none"),
        (["run", "bn-mlp", "--set", "variants=bn,bn"], "variants must be distinct names"),
        (["run", "rnn-vs-lstm", "--set", "config=huge"], "config must be one of small"),
        (["run", "bn-mlp", "--device", "tpu"], "--device 'tpu'"),
        (["resume", "/definitely/not/here"], "does not exist"),
        (["eval", "/definitely/not/here"], "does not exist"),
        (["report", "/definitely/not/here"], "not/here"),
        (["frobnicate"], "invalid choice"),
    ],
)


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


@BAD_INPUT
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _exit_code(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_missing_data_is_exit_2_and_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["run", "bn-mlp", "--quick", "--device", "cpu", "--out", str(out),
         "--set", f"data_dir={tmp_path / 'empty'}", "--set", "download=false"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "train-images-idx3-ubyte.gz" in err and "Traceback" not in err
    assert not out.exists()


def test_run_into_existing_run_folder_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["run", "bn-mlp", "--quick", "--out", str(tmp_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_list_shows_experiments_and_models(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "bn-mlp" in out and "mlp-bn" in out


def test_python_m_run_eval_report(tmp_path, data_root):
    env = {**os.environ, "PYTHONPATH": SRC, "CLASSICNETS_DATA": str(data_root)}
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "classicnets"]
    run = subprocess.run(
        [*cmd, "run", "bn-mlp", "--quick", "--device", "cpu", "--out", str(out),
         "--set", "steps=60", "--set", "eval_every=30", "--set", "train_limit=3000"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"report: {out / 'report.html'}" in run.stdout
    ev = subprocess.run(
        [*cmd, "eval", str(out), "--device", "cpu"], env=env, capture_output=True, text=True
    )
    assert ev.returncode == 0 and "bn: step 60, test accuracy" in ev.stdout, ev.stderr
    combined = tmp_path / "both.html"
    rep = subprocess.run(
        [*cmd, "report", str(out), str(out), "-o", str(combined)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert rep.returncode == 0, rep.stderr
    assert combined.read_text().startswith("<!DOCTYPE html>")


def test_help_speaks_to_users_with_an_example_for_every_command(capsys):
    from classicnets.cli import _COMMANDS, _build_parser

    parser = _build_parser()
    top = parser.format_help()
    assert "start here:" in top and "classicnets run bn-mlp --quick" in top
    assert "parses, calls library functions" not in top  # not the module docstring
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    assert set(commands) == set(_COMMANDS)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "example:\n  classicnets " + name in text, name
