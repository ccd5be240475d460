"""``classicnets runs``: the table of run folders, every status, damaged folders listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from classicnets.cli import main
from classicnets.experiments import run_experiment
from classicnets.files import hold_folder
from classicnets.report.html import ReportError
from classicnets.report.runs import format_runs, list_runs


def _folder(root: Path, name: str, created: str | None, summary=None, experiment="bn-mlp"):
    path = root / name
    path.mkdir()
    config = {"experiment": experiment, "config": {}}
    if created is not None:
        config["created"] = created
    (path / "config.json").write_text(json.dumps(config))
    if summary is not None:
        text = summary if isinstance(summary, str) else json.dumps(summary)
        (path / "summary.json").write_text(text)
    return path


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    variants = {"plain": {"test_accuracy": 0.9791, "steps": 50000},
                "bn": {"test_accuracy": 0.9819, "steps": 50000}}  # fmt: skip
    _folder(root, "b-complete", "2026-12-01T10:00:00",
            {"status": "complete", "variants": variants, "wall_time_s": 47.7})  # fmt: skip
    _folder(root, "a-stopped", "2026-12-01T09:00:00", {"status": "stopped", "variants": {}})
    _folder(root, "c-diverged", "2026-12-01T11:00:00", {"status": "diverged", "error": "nan"})
    _folder(root, "d-failed", "2026-12-01T12:00:00")  # a config and nothing more: killed early
    _folder(root, "e-running", "2026-12-01T13:00:00", {"status": "complete", "variants": {}})
    lm = {"lstm": {"test_perplexity": 82.1}, "rnn_tanh": {"test_perplexity": float("nan")}}
    _folder(root, "f-lm", "2026-12-01T14:00:00", {"status": "complete", "variants": lm},
            experiment="rnn-vs-lstm")  # fmt: skip
    broken = root / "g-damaged-config"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    _folder(root, "h-damaged-summary", "2026-12-01T15:00:00", "[1, 2]")
    (root / "not-a-run").mkdir()  # a user's own folder: not listed
    (root / "notes.txt").write_text("mine")
    return root


def test_every_status_sorted_by_creation(runs):
    with hold_folder(runs / "e-running"):  # a live lock: running, whatever the summary says
        entries = list_runs(runs)
    by_name = {e.folder.name: e for e in entries}
    assert "not-a-run" not in by_name and len(entries) == 8
    assert {name: e.status for name, e in by_name.items()} == {
        "a-stopped": "stopped", "b-complete": "complete", "c-diverged": "diverged",
        "d-failed": "failed", "e-running": "running", "f-lm": "complete",
        "g-damaged-config": "damaged", "h-damaged-summary": "damaged",
    }  # fmt: skip
    dated = ["a-stopped", "b-complete", "c-diverged", "d-failed", "e-running", "f-lm"]
    assert [e.folder.name for e in entries if e.folder.name in dated] == dated  # by creation
    complete = by_name["b-complete"]
    assert complete.metrics == {"plain": ("test_accuracy", 0.9791), "bn": ("test_accuracy", 0.9819)}
    assert complete.wall_time_s == 47.7
    assert by_name["f-lm"].metrics == {"lstm": ("test_perplexity", 82.1)}  # NaN is no metric
    assert "config.json: cannot read" in by_name["g-damaged-config"].problem
    assert "expected a JSON object, got list" in by_name["h-damaged-summary"].problem


def test_the_table_has_one_line_per_run(runs):
    lines = format_runs(list_runs(runs)).splitlines()
    assert len(lines) == 1 + 8
    assert lines[0].split()[:4] == ["experiment", "created", "status", "wall"]
    complete = next(line for line in lines if "b-complete" in line)
    assert "complete" in complete and "47.7 s" in complete
    assert "plain test_accuracy 97.91%, bn test_accuracy 98.19%" in complete
    assert format_runs([]) == "no run folders"


def test_cli_json_and_a_real_run(tmp_path, data_root, capsys):
    out = tmp_path / "runs" / "quick"
    run_experiment("bn-mlp", ["progress=false", f"data_dir={data_root}"], quick=True,
                   device="cpu", out=out)  # fmt: skip
    assert main(["runs", str(tmp_path / "runs"), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert (entry["experiment"], entry["status"]) == ("bn-mlp", "complete")
    assert entry["folder"] == str(out)
    assert set(entry["metrics"]) == {"plain", "bn"}
    assert entry["metrics"]["bn"]["name"] == "test_accuracy" and entry["wall_time_s"] > 0
    assert main(["runs", str(out)]) == 0  # a run folder itself: its one line
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_a_missing_folder_or_a_file_is_an_error(tmp_path):
    with pytest.raises(ReportError, match="no such folder"):
        list_runs(tmp_path / "nothing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ReportError, match="a file, not a folder of runs"):
        list_runs(tmp_path / "f")


def test_listing_imports_no_torch(runs):
    import subprocess
    import sys

    code = (
        "import sys; from classicnets.cli import main; "
        f"assert main(['runs', {str(runs)!r}]) == 0; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
