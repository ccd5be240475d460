"""The rnn-vs-lstm experiment end to end on a slice of PTB: run folder, table, plot, report,
exact resume, divergence of one model, sampling through the command line."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from classicnets.cli import main
from classicnets.experiments import resume_experiment, run_experiment
from classicnets.experiments.common import load_trained_models
from classicnets.experiments.config import validate_config
from classicnets.experiments.rnn_vs_lstm import PRESETS, RNNvsLSTMConfig
from classicnets.train.checkpoint import list_checkpoints
from classicnets.train.run import RunDir

VARIANTS = ("lstm", "rnn_tanh", "rnn_relu")


@pytest.fixture(scope="module")
def ptb_root() -> Path:
    for candidate in (
        os.environ.get("CLASSICNETS_DATA"),
        Path(__file__).parents[2] / "shared/data",
    ):
        if candidate and (Path(candidate) / "ptb").is_dir():
            return Path(candidate)
    if os.environ.get("CLASSICNETS_REQUIRE_DATA") == "1":
        pytest.fail("PTB not found (set CLASSICNETS_DATA to the data root)")
    pytest.skip("PTB not found (set CLASSICNETS_DATA to the data root)")


def _quick(root, out, *extra):
    return run_experiment(
        "rnn-vs-lstm",
        [f"data_dir={root}", "progress=false", *extra],
        quick=True,
        device="cpu",
        out=out,
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, ptb_root):
    return _quick(ptb_root, tmp_path_factory.mktemp("runs") / "full")


def test_presets_follow_zaremba_and_the_tf_tutorial():
    small, medium, large = (RNNvsLSTMConfig(config=c).resolved() for c in PRESETS)
    assert (small["hidden_size"], small["num_steps"], small["epochs"], small["dropout"]) == (
        200,
        20,
        13,
        0.0,
    )
    assert (medium["hidden_size"], medium["lr_decay"], medium["epochs_at_full_lr"]) == (650, 0.8, 6)
    assert (large["max_grad_norm"], large["init_scale"], large["dropout"]) == (10.0, 0.04, 0.65)
    assert RNNvsLSTMConfig(config="medium", hidden_size=100).resolved()["hidden_size"] == 100
    with pytest.raises(ValueError, match="config must be one of"):
        validate_config(RNNvsLSTMConfig(config="huge"))


def test_run_folder_table_plot_and_report(full_run):
    run_dir, summary = full_run
    for name in ("config.json", "metrics.jsonl", "summary.json", "report.html", "vocabulary.txt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "plots" / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["status"] == "complete" and set(summary["variants"]) == set(VARIANTS)
    records = RunDir(run_dir).read_metrics()
    for variant in VARIANTS:
        row = summary["variants"][variant]
        assert row["status"] == "complete" and row["epochs"] == 2 and row["steps"] == 120
        for split in ("valid", "test"):
            rs = [r for r in records if r["variant"] == variant and r["split"] == split]
            assert [r["epoch"] for r in rs] == [1, 2]
            assert all(r["tokens"] == 1999 for r in rs)  # every token of the slice but the first
            assert summary["perplexity_per_epoch"][variant][split] == [r["perplexity"] for r in rs]
        assert row["test_perplexity"] == summary["perplexity_per_epoch"][variant]["test"][-1]
        assert 100 < row["test_perplexity"] < 10_000  # 6,000 tokens of training: far from 115
    assert summary["variants"]["lstm"]["lr"] == 1.0
    assert any(line.startswith("epoch") for line in summary["notes"])
    html = (run_dir / "report.html").read_text()
    assert "rnn-vs-lstm" in html and "data:image/png;base64," in html
    assert "test_perplexity" in html and "Zaremba" in html


def test_stopped_and_resumed_run_is_bit_identical(full_run, ptb_root, tmp_path):
    """Stop the LSTM at step 45, drop that checkpoint (killed after the one of step 25),
    resume: every model and every metrics record must equal the uninterrupted run's."""
    full_dir, _ = full_run
    out = tmp_path / "stopped"
    _quick(ptb_root, out, "stop_after=45")
    assert RunDir(out).read_summary()["status"] == "stopped"
    step, path = list_checkpoints(out / "checkpoints", "lstm")[-1]
    assert step == 45
    path.unlink()
    path.with_suffix(".safetensors").unlink()
    record = json.loads((out / "config.json").read_text())
    record["config"]["stop_after"] = None
    (out / "config.json").write_text(json.dumps(record))
    summary = resume_experiment(out, device="cpu")
    assert summary["status"] == "complete"
    for variant in VARIANTS:
        (s1, p1), (s2, p2) = (
            list_checkpoints(d / "checkpoints", variant)[-1] for d in (full_dir, out)
        )
        assert s1 == s2 == 120
        expected, got = (
            load_file(p1.with_suffix(".safetensors")),
            load_file(p2.with_suffix(".safetensors")),
        )
        for key, tensor in expected.items():
            if key.startswith(("model.", "optimizer.")):
                assert torch.equal(tensor, got[key]), (variant, key)
    assert RunDir(out).read_metrics() == RunDir(full_dir).read_metrics()


def test_a_diverging_model_is_reported_and_the_others_go_on(ptb_root, tmp_path):
    run_dir, summary = _quick(
        ptb_root,
        tmp_path / "diverged",
        "variants=rnn_relu,lstm",
        "lr_rnn_relu=100000",  # clipped to norm 5, each step still moves weights by 5e5
        "train_limit=2000",
        "eval_limit=500",
    )
    relu, lstm = summary["variants"]["rnn_relu"], summary["variants"]["lstm"]
    assert summary["status"] == "complete"
    assert relu["status"] == "diverged" and "training loss nan" in relu["diverged_at"]
    assert lstm["status"] == "complete" and math.isfinite(lstm["test_perplexity"])
    assert any("rnn_relu diverged at step" in n for n in summary["notes"])
    assert "diverged" in (run_dir / "report.html").read_text()


def test_sample_prints_n_words_and_checks_the_prompt(full_run, capsys):
    run_dir, _ = full_run
    assert main(["sample", str(run_dir), "--n", "12", "--seed", "3", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert len(text.split()) == 12  # sentence ends are line breaks, not words
    assert (
        main(["sample", str(run_dir), "--n", "5", "--prompt", "the company", "--device", "cpu"])
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("the company ") and len(text.split()) == 7
    code = main(["sample", str(run_dir), "--prompt", "the Company", "--device", "cpu"])
    assert code == 2
    assert "prompt word 'Company' is not in the vocabulary" in capsys.readouterr().err


def test_load_models_describes_the_language_models(full_run):
    run_dir, _ = full_run
    models = load_trained_models(run_dir, device="cpu")
    assert set(models) == set(VARIANTS)
    lstm = models["lstm"]
    assert lstm.step == 120 and not lstm.model.training
    info = lstm.info
    assert info["kind"] == "language_model" and info["cell"] == "lstm"
    assert len(info["vocabulary"]) == 10_000 and info["vocabulary"][:3] == ["the", "<unk>", "<eos>"]
    assert (info["num_layers"], info["hidden_size"]) == (2, 16)
