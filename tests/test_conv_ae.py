"""conv-ae: the exact size chain, the reconstruction loop, the experiment end to end.

References: PyTorch's own module outputs (forward hooks) for the sizes, float64 NumPy for the
losses, an uninterrupted run for resume (bit for bit on CPU in deterministic mode).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from classicnets.cli import main
from classicnets.experiments import evaluate_run, resume_experiment, run_experiment
from classicnets.experiments.common import load_trained_models
from classicnets.models.autoencoder import UPSAMPLING, ConvAutoencoder
from classicnets.nn import BatchNorm, ConvTranspose2dExact, fold_bn
from classicnets.nn.batchnorm import is_batchnorm
from classicnets.train.autoencoder import (
    evaluate_reconstruction,
    reconstruction_loss,
    train_autoencoder,
)
from classicnets.train.checkpoint import list_checkpoints
from classicnets.train.loop import NonFiniteLossError
from classicnets.train.run import RunDir
from classicnets.train.settings import TrainSettings
from tolerances import network

PNG = b"\x89PNG\r\n\x1a\n"
VARIANTS = ("transpose", "nearest", "unpool")
# 10 steps of 64 per variant, crossing log (2), eval (4) and checkpoint (4) steps.
SMALL = [
    "train_limit=640",
    "test_limit=200",
    "eval_every=4",
    "log_every=2",
    "checkpoint_every=4",
    "progress=false",
]


# --- the model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("upsampling", UPSAMPLING)
def test_size_chain_28_14_7_4_7_14_28(upsampling):
    """Forward hooks on every stage: the encoder halves 28 -> 14 -> 7 -> 4 and the decoder gives
    back exactly 7, 14, 28 (no stage makes 8, 13 or 25 and nothing is cropped afterwards)."""
    model = ConvAutoencoder(upsampling, channels=(4, 8, 4))
    seen: list[tuple[str, tuple[int, ...]]] = []
    stages = [*model.encoder.named_children(), *model.decoder.named_children()]
    for name, stage in stages:
        for part_name, part in stage.named_children():
            part.register_forward_hook(
                lambda m, i, o, n=f"{name}.{part_name}": seen.append((n, tuple(o.shape[-2:])))
            )
    with torch.no_grad():
        out = model(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 1, 28, 28) and 0 < out.min() and out.max() < 1
    stage_sizes = {}
    for name, size in seen:
        stage_sizes.setdefault(name.split(".")[0], []).append(size[0])
        assert size[0] == size[1]
    # every part of a stage (upsample, conv, norm, act) already has the stage's output size
    assert {k: set(v) for k, v in stage_sizes.items()} == {
        "down1": {14},
        "down2": {7},
        "down3": {4},
        "up1": {7},
        "up2": {14},
        "up3": {28},
    }
    assert model.sizes == (28, 14, 7, 4)
    if upsampling == "transpose":
        convs = [s.conv for _, s in model.decoder.named_children()]
        assert all(isinstance(c, ConvTranspose2dExact) for c in convs)
        assert [(c.padding[0], c.output_padding[0]) for c in convs] == [(1, 0), (1, 1), (1, 1)]


def test_bn_is_injectable_and_folds():
    torch.manual_seed(0)
    plain = ConvAutoencoder("transpose", channels=(4, 8, 4), norm_layer=None)
    assert not any(is_batchnorm(m) for m in plain.modules())
    assert plain.decoder.up1.conv.bias is not None
    model = ConvAutoencoder("transpose", channels=(4, 8, 4), norm_layer=BatchNorm)
    assert model.decoder.up1.conv.bias is None  # BN's offset replaces it
    x = torch.rand(16, 1, 28, 28)
    model.train()
    for _ in range(3):
        model(x)  # running statistics away from (0, 1)
    model.eval()
    folded = fold_bn(model)
    assert not any(is_batchnorm(m) for m in folded.modules())
    with torch.no_grad():
        # Six convolutions of fan-in at most 8 * 9 (channels (4, 8, 4), 3x3 kernels), folded or
        # not: tolerances.network. Logits are O(1), so the same bound serves as atol.
        tol = network(6, 8 * 9)
        torch.testing.assert_close(
            folded(x, logits=True), model(x, logits=True), rtol=tol, atol=tol
        )
    with pytest.raises(ValueError, match="unknown upsampling 'cubic'"):
        ConvAutoencoder("cubic")


# --- the loop -----------------------------------------------------------------------------------


def test_reconstruction_losses_against_numpy():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 5, 5, dtype=torch.float64) * 4
    target = torch.rand(3, 1, 5, 5, dtype=torch.float64)
    p, x = torch.sigmoid(logits).numpy(), target.numpy()
    bce = -(x * np.log(p) + (1 - x) * np.log1p(-p)).reshape(3, -1).sum(1)
    mse = ((p - x) ** 2).reshape(3, -1).sum(1)
    np.testing.assert_allclose(reconstruction_loss(logits, target, "bce").numpy(), bce, rtol=1e-12)
    np.testing.assert_allclose(reconstruction_loss(logits, target, "mse").numpy(), mse, rtol=1e-12)


def test_evaluation_does_not_depend_on_the_batch_size():
    torch.manual_seed(0)
    model = ConvAutoencoder("nearest", channels=(4, 8, 4))
    x = torch.rand(30, 1, 28, 28)
    a = evaluate_reconstruction(model, x, "bce", batch_size=7)
    b = evaluate_reconstruction(model, x, "bce", batch_size=30)
    for key in ("loss", "mse", "bce"):
        # float32 convolutions blocked for another batch shape: the logits within
        # tolerances.network(6, 72) relative; BCE and MSE are Lipschitz <= 1 in them.
        assert a[key] == pytest.approx(b[key], rel=network(6, 8 * 9))
    assert a["loss"] == pytest.approx(a["bce"] * 784, rel=1e-12)
    assert model.training  # the mode is restored


def test_non_finite_loss_stops_before_the_checkpoint(tmp_path):
    class Data:
        train_x = torch.full((64, 1, 28, 28), float("nan"))
        test_x = torch.rand(8, 1, 28, 28)

    model = ConvAutoencoder("transpose", channels=(2, 2, 2))
    settings = TrainSettings(
        steps=8, batch_size=32, optimizer="adam", lr=1e-3, log_every=4, checkpoint_every=2,
        eval_every=100, progress=False,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="training loss is nan at step 1"):
        train_autoencoder(model, Data, settings, RunDir(tmp_path), "ae")
    assert list_checkpoints(tmp_path / "checkpoints", "ae") == []


def test_resume_of_a_variant_without_checkpoint_rewrites_its_metrics(tmp_path):
    """Killed before its first checkpoint (here: its checkpoints deleted), a variant starts over
    and its metrics, step-0 evaluation included, are written once, as by an uninterrupted run."""

    class Data:
        train_x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        test_x = train_x[:8]

    def train(run_dir, **kwargs):
        torch.manual_seed(0)
        model = ConvAutoencoder("unpool", channels=(2, 2, 2))
        settings = TrainSettings(
            steps=6, batch_size=16, optimizer="adam", lr=1e-3, log_every=2, checkpoint_every=4,
            eval_every=2, progress=False, **kwargs,
        )  # fmt: skip
        return train_autoencoder(model, Data, settings, RunDir(run_dir), "ae", resume=True)

    train(tmp_path / "a")
    assert train(tmp_path / "b", stop_after=3)["step"] == 3
    for _, path in list_checkpoints(tmp_path / "b" / "checkpoints", "ae"):
        path.unlink()
        path.with_suffix(".safetensors").unlink()
    assert train(tmp_path / "b")["complete"]
    assert RunDir(tmp_path / "b").read_metrics() == RunDir(tmp_path / "a").read_metrics()


# --- the experiment -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("runs") / "full"
    return run_experiment(
        "conv-ae", [*SMALL, f"data_dir={data_root}"], quick=True, device="cpu", out=out
    )


def test_quick_run_writes_grids_curves_and_report(quick_run):
    run_dir, summary = quick_run
    for name in ("config.json", "metrics.jsonl", "summary.json", "report.html"):
        assert (run_dir / name).is_file(), name
    for plot in ("reconstructions.png", "test_reconstruction_error.png", "train_loss.png"):
        assert (run_dir / "plots" / plot).read_bytes()[:8] == PNG, plot
    assert summary["status"] == "complete" and tuple(summary["variants"]) == VARIANTS
    records = RunDir(run_dir).read_metrics()
    for variant, values in summary["variants"].items():
        assert values["steps"] == 10
        first = next(r for r in records if r["variant"] == variant and r["split"] == "test")
        assert values["test_mse_per_pixel"] < first["mse"]  # it learns
        assert values["test_bce_per_pixel"] < first["bce"]
    assert [r["step"] for r in records if r["variant"] == "unpool" and r["split"] == "test"] == [
        0, 4, 8, 10,
    ]  # fmt: skip
    html = (run_dir / "report.html").read_text()
    assert "conv-ae" in html and html.count("data:image/png;base64,") == 3
    # evaluate reloads the checkpoints: the same numbers as the end of training
    results = evaluate_run(run_dir, device="cpu")
    for variant in VARIANTS:
        assert results[variant]["step"] == 10
        assert results[variant]["mse"] == summary["variants"][variant]["test_mse_per_pixel"]
    trained = load_trained_models(run_dir, device="cpu")
    assert trained["unpool"].info["kind"] == "autoencoder"
    assert trained["unpool"].info["output_shape"] == [1, 28, 28]


def _weights(run_dir):
    out = {}
    for variant in VARIANTS:
        step, path = list_checkpoints(run_dir / "checkpoints", variant)[-1]
        out[variant] = (step, load_file(path.with_suffix(".safetensors")))
    return out


def test_stopped_and_resumed_run_is_bit_identical(quick_run, tmp_path, data_root):
    """Stop at step 7 (between checkpoints), drop that checkpoint as if killed after step 4's,
    resume: the weights, optimizer states and metrics equal the uninterrupted run's."""
    full_dir, _ = quick_run
    out = tmp_path / "stopped"
    run_experiment(
        "conv-ae", [*SMALL, f"data_dir={data_root}", "stop_after=7"], quick=True, device="cpu",
        out=out,
    )  # fmt: skip
    assert RunDir(out).read_summary()["status"] == "stopped"
    first_session = RunDir(out).read_summary()["wall_time_s"]
    step, path = list_checkpoints(out / "checkpoints", "transpose")[-1]
    assert step == 7
    path.unlink()
    path.with_suffix(".safetensors").unlink()
    record = json.loads((out / "config.json").read_text())
    record["config"]["stop_after"] = None
    (out / "config.json").write_text(json.dumps(record))
    resumed = resume_experiment(out, device="cpu")
    assert resumed["status"] == "complete"
    assert resumed["wall_time_s"] > first_session > 0  # the sessions' wall times add up
    expected, got = _weights(full_dir), _weights(out)
    for variant in VARIANTS:
        assert expected[variant][0] == got[variant][0] == 10
        for key, tensor in expected[variant][1].items():
            if key.startswith(("model.", "optimizer.")):
                assert torch.equal(tensor, got[variant][1][key]), (variant, key)
    assert RunDir(out).read_metrics() == RunDir(full_dir).read_metrics()


def test_cli_sample_writes_a_png(quick_run, tmp_path, capsys):
    run_dir, _ = quick_run
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                str(run_dir),
                "--n",
                "5",
                "--seed",
                "1",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert out.read_bytes()[:8] == PNG and str(out) in capsys.readouterr().out
    assert (
        main(["sample", str(run_dir), "--label", "3", "--variant", "nearest", "--device", "cpu"])
        == 0
    )
    assert (run_dir / "plots" / "sample_reconstructions_seed0_label3.png").read_bytes()[:8] == PNG
    assert main(["sample", str(run_dir), "--variant", "bilinear", "--device", "cpu"]) == 2
    assert "this run has transpose, nearest, unpool" in capsys.readouterr().err
