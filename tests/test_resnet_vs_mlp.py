"""The resnet-vs-mlp experiment (quick) and ``classicnets eval`` with confusion matrices."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from classicnets.cli import main
from classicnets.data.augment import random_shift
from classicnets.experiments import run_experiment

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("rvm") / "run"
    run_dir, summary = run_experiment(
        "resnet-vs-mlp",
        [f"data_dir={data_root}", "progress=false", "epochs=1"],
        quick=True,
        device="cpu",
        out=out,
    )
    return run_dir, summary


def test_quick_run_writes_curves_matrices_and_report(quick_run):
    run_dir, summary = quick_run
    assert summary["status"] == "complete"
    assert set(summary["variants"]) == {"resnet", "mlp"}
    for name in ("test_accuracy.png", "confusion_resnet.png", "confusion_mlp.png"):
        assert (run_dir / "plots" / name).read_bytes()[:8] == PNG, name
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    steps = {v: s["steps"] for v, s in summary["variants"].items()}
    assert steps["resnet"] == steps["mlp"] == 1280 // 64  # the same budget for both
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["resnet_model"] == "resnet-small" and config["channels_last"] is True


def test_eval_prints_accuracy_and_matrix_and_saves_plot(quick_run, capsys):
    run_dir, summary = quick_run
    (run_dir / "plots" / "confusion_mlp.png").unlink()
    assert main(["eval", str(run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    acc = 100 * summary["variants"]["mlp"]["test_accuracy"]
    assert f"mlp: step 20, test accuracy {acc:.2f}%" in out
    assert "true \\ predicted" in out
    assert (run_dir / "plots" / "confusion_mlp.png").read_bytes()[:8] == PNG


def test_fashion_mnist_class_names_in_eval(tmp_path, fashion_root, capsys):
    out = tmp_path / "fashion"
    run_experiment(
        "resnet-vs-mlp",
        [f"data_dir={fashion_root}", "dataset=fashion-mnist", "progress=false", "epochs=1",
         "variants=mlp"],
        quick=True, device="cpu", out=out,
    )  # fmt: skip
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    assert "Ankle boot" in capsys.readouterr().out


def test_unknown_resnet_model_is_a_config_error(capsys):
    assert main(["run", "resnet-vs-mlp", "--set", "resnet_model=resnet-huge"]) == 2
    assert "unknown model 'resnet-huge'" in capsys.readouterr().err


def test_random_shift_equals_pad_and_roll_and_is_reproducible():
    x = torch.rand(6, 2, 9, 7)
    y = random_shift(x, step=11, max_shift=2, seed=3)
    assert torch.equal(y, random_shift(x, step=11, max_shift=2, seed=3))
    assert not torch.equal(y, random_shift(x, step=12, max_shift=2, seed=3))
    g = torch.Generator().manual_seed(3 * 1_000_003 + 11)
    shifts = torch.randint(-2, 3, (6, 2), generator=g)
    for i in range(6):
        padded = F.pad(x[i : i + 1], (2, 2, 2, 2))
        rolled = torch.roll(padded, (int(shifts[i, 0]), int(shifts[i, 1])), dims=(2, 3))
        assert torch.equal(rolled[..., 2:-2, 2:-2], y[i : i + 1])
    assert torch.equal(random_shift(x, 5, max_shift=0), x)
