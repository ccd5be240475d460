"""The bn-mlp experiment end to end: run folder, plots, report, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from classicnets.experiments import evaluate_run, resume_experiment, run_experiment
from classicnets.train.checkpoint import list_checkpoints
from classicnets.train.run import RunDir

# Small enough for seconds on 2 cores, long enough to cross logging, eval and checkpoint steps.
SMALL = [
    "steps=120",
    "eval_every=40",
    "log_every=20",
    "checkpoint_every=40",
    "train_limit=6000",
    "progress=false",
]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("runs") / "full"
    run_dir, summary = run_experiment(
        "bn-mlp", [*SMALL, f"data_dir={data_root}"], quick=True, device="cpu", out=out
    )
    return run_dir, summary


def _final_weights(run_dir):
    out = {}
    for variant in ("plain", "bn"):
        step, path = list_checkpoints(run_dir / "checkpoints", variant)[-1]
        out[variant] = (step, load_file(path.with_suffix(".safetensors")))
    return out


def test_run_folder_contents(full_run):
    run_dir, summary = full_run
    for name in ("config.json", "metrics.jsonl", "summary.json", "report.html"):
        assert (run_dir / name).is_file(), name
    for plot in ("test_accuracy.png", "sigmoid_input_percentiles.png", "train_loss.png"):
        assert (run_dir / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["experiment"] == "bn-mlp" and config["config"]["steps"] == 120
    assert summary["status"] == "complete" and set(summary["variants"]) == {"plain", "bn"}
    records = RunDir(run_dir).read_metrics()
    test_steps = [r["step"] for r in records if r["variant"] == "bn" and r["split"] == "test"]
    assert test_steps == [0, 40, 80, 120]
    p = [r for r in records if r["split"] == "test"][-1]
    assert p["sigmoid_input_p15"] <= p["sigmoid_input_p50"] <= p["sigmoid_input_p85"]
    html = (run_dir / "report.html").read_text()
    assert "bn-mlp" in html and html.count("data:image/png;base64,") == 3
    assert list((run_dir / "checkpoints").glob("*.tmp")) == []


def test_bn_learns_faster_than_plain_early(full_run):
    _, summary = full_run
    bn = summary["variants"]["bn"]["test_accuracy"]
    plain = summary["variants"]["plain"]["test_accuracy"]
    assert bn > 0.8 and bn > plain  # 120 steps: BN is far along, the sigmoid MLP barely started


def test_eval_matches_logged_final_accuracy(full_run):
    run_dir, summary = full_run
    results = evaluate_run(run_dir, device="cpu")
    for variant in ("plain", "bn"):
        assert results[variant]["step"] == 120
        assert results[variant]["accuracy"] == summary["variants"][variant]["test_accuracy"]


@pytest.mark.parametrize("drop", ["none", "newest", "all"])
def test_stopped_and_resumed_run_is_bit_identical(full_run, tmp_path, data_root, drop):
    """Stop at step 50 (not a multiple of the log/eval/checkpoint intervals), resume, compare.

    ``drop="newest"`` deletes the checkpoint of step 50, as if the process had been killed
    between step 40's checkpoint and step 50: the resumed run starts at step 40 and must rewrite
    the metrics logged after it identically. ``drop="all"`` deletes every checkpoint, as if
    killed before the first one: the variant starts over without duplicating its records.
    """
    full_dir, _ = full_run
    out = tmp_path / "stopped"
    run_experiment(
        "bn-mlp",
        [*SMALL, f"data_dir={data_root}", "stop_after=50"],
        quick=True,
        device="cpu",
        out=out,
    )
    assert RunDir(out).read_summary()["status"] == "stopped"
    checkpoints = list_checkpoints(out / "checkpoints", "plain")
    assert checkpoints[-1][0] == 50
    for _, path in {"none": [], "newest": checkpoints[-1:], "all": checkpoints}[drop]:
        path.unlink()
        path.with_suffix(".safetensors").unlink()
    # The resumed run must not stop again: clear stop_after in the saved config.
    config_path = out / "config.json"
    record = json.loads(config_path.read_text())
    record["config"]["stop_after"] = None
    config_path.write_text(json.dumps(record))
    summary = resume_experiment(out, device="cpu")
    assert summary["status"] == "complete"

    expected, got = _final_weights(full_dir), _final_weights(out)
    for variant in ("plain", "bn"):
        assert expected[variant][0] == got[variant][0] == 120
        for key, tensor in expected[variant][1].items():
            if key.startswith(("model.", "optimizer.")):
                assert torch.equal(tensor, got[variant][1][key]), (variant, key)
    assert RunDir(out).read_metrics() == RunDir(full_dir).read_metrics()


def test_resume_of_complete_run_changes_nothing(full_run):
    run_dir, summary = full_run
    before = (run_dir / "metrics.jsonl").read_text()
    again = resume_experiment(run_dir, device="cpu")
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert again["variants"]["bn"]["test_accuracy"] == summary["variants"]["bn"]["test_accuracy"]
