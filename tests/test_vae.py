"""VAE / CVAE: losses against independent references, batch-size-free ELBO, the quick experiment,
exact resume, grids reproducible from their seed, and ``classicnets sample``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from classicnets.cli import main
from classicnets.experiments import evaluate_run, resume_experiment, run_experiment
from classicnets.experiments.common import load_trained_models
from classicnets.experiments.vae import latent_draw, sample_grid
from classicnets.models.vae import VAE, kl_divergence, negative_elbo, reconstruction_loss
from classicnets.train.checkpoint import list_checkpoints
from classicnets.train.run import RunDir
from classicnets.train.vae import evaluate_vae, evaluation_noise
from tolerances import network

PNG = b"\x89PNG\r\n\x1a\n"
VARIANTS = ("vae-bce", "vae-mse", "cvae-bce", "cvae-mse")


# --------------------------------------------------------------------------- losses


def test_analytic_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    scale = torch.rand(4, 3, generator=g, dtype=torch.float64) * 1.5 + 0.2
    k = 100_000
    eps = torch.randn(k, 4, 3, generator=g, dtype=torch.float64)
    z = mu + scale * eps
    log_q = (-0.5 * eps**2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_p = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    samples = log_q - log_p  # (k, 4): single-sample estimates of KL(q || p)
    estimate = samples.mean(0)
    std_error = samples.std(0) / math.sqrt(k)  # 0.003 to 0.008 nats here
    analytic = kl_divergence(mu, scale)  # 3.71, 2.09, 1.15, 0.89 nats
    # Within 4 standard errors (the measured deviations are 0.15 to 1.4 SE; a fixed seed, so
    # the test is deterministic, and 4 SE would fail by chance once in ~16,000 seeds per entry).
    assert torch.all((estimate - analytic).abs() < 4 * std_error), (estimate, analytic)


def test_kl_is_never_negative_and_zero_at_the_prior():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(10_000, 32, generator=g) * torch.rand(10_000, 1, generator=g)
    mu[:5000] = 0.0  # only the scale term: where cancellation would bite
    log_scale = torch.randn(10_000, 32, generator=g) * torch.logspace(-8, 1, 10_000)[:, None]
    kl = kl_divergence(mu, torch.exp(log_scale))  # scales from 1 +- 1e-8 to e^+-30, float32
    assert (kl >= 0).all() and torch.isfinite(kl).all()
    assert torch.equal(kl_divergence(torch.zeros(3, 5), torch.ones(3, 5)), torch.zeros(3))


def test_bce_and_mse_from_logits_equal_float64_numpy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 784, generator=g) * 4
    target = torch.rand(6, 1, 28, 28, generator=g)
    target[:, :, :5] = 0.0  # exact zeros and ones, as in MNIST
    target[:, :, -5:] = 1.0
    l64, x64 = logits.double().numpy(), target.reshape(6, -1).double().numpy()
    p = 1 / (1 + np.exp(-l64))
    bce = -(x64 * np.log(p) + (1 - x64) * np.log1p(-p)).sum(1)
    mse = ((p - x64) ** 2).sum(1)
    # float32 per-pixel terms summed over 784 pixels: ~1e-6 relative
    np.testing.assert_allclose(reconstruction_loss(logits, target, "bce").numpy(), bce, rtol=1e-5)
    np.testing.assert_allclose(reconstruction_loss(logits, target, "mse").numpy(), mse, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown reconstruction 'l1'"):
        reconstruction_loss(logits, target, "l1")


def test_negative_elbo_does_not_depend_on_the_evaluation_batch_size():
    torch.manual_seed(0)
    model = VAE(num_classes=10).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2500, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (2500,), generator=g)
    results = [evaluate_vae(model, x, y, "bce", seed=7, batch_size=b) for b in (2500, 1000, 333)]
    # Per-example terms are the same numbers whatever the batching (the noise of example i is
    # row i of one seeded draw); only float32 matmul blocking may differ: ~1e-7 relative.
    for r in results[1:]:
        assert r["neg_elbo"] == pytest.approx(results[0]["neg_elbo"], rel=1e-6)
        assert r["kl"] == pytest.approx(results[0]["kl"], rel=1e-6)
    assert results[0]["neg_elbo"] == results[0]["loss"]
    # the same figure from the per-example function with the same noise
    noise = evaluation_noise(2500, model.latent_size, 7)
    with torch.no_grad():
        direct = negative_elbo(model, x, y, noise).double().mean().item()
    assert direct == pytest.approx(results[0]["neg_elbo"], rel=1e-6)
    other_seed = evaluate_vae(model, x, y, "bce", seed=8)
    assert other_seed["neg_elbo"] != results[0]["neg_elbo"]
    assert "neg_elbo" not in evaluate_vae(model, x, y, "mse", seed=7)


def test_eval_mode_uses_the_posterior_mean():
    torch.manual_seed(0)
    model = VAE(dropout=0.5)
    x = torch.rand(4, 784)
    model.eval()
    out = model(x)
    mu, _ = model.encode(x)
    assert torch.equal(out.logits, model.decode(mu))
    model.train()
    assert not torch.equal(model(x).logits, out.logits)


# --------------------------------------------------------------------------- the experiment


@pytest.fixture(scope="module")
def overrides(tmp_path_factory, data_root):
    cache = tmp_path_factory.getbasetemp() / "scoring_classifier"  # shared with the metrics tests
    return [f"data_dir={data_root}", "progress=false", f"scorer_cache={cache}"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, overrides):
    out = tmp_path_factory.mktemp("vae") / "run"
    return run_experiment("vae", overrides, quick=True, device="cpu", out=out)


def test_quick_run_writes_grids_scores_and_report(quick_run):
    run_dir, summary = quick_run
    assert summary["status"] == "complete" and set(summary["variants"]) == set(VARIANTS)
    for variant in VARIANTS:
        for kind in ("reconstructions", "samples"):
            assert (run_dir / "plots" / f"{kind}_{variant}.png").read_bytes()[:8] == PNG
        row = summary["variants"][variant]
        assert row["steps"] == 2048 // 64 and row["frechet_distance"] > 0
        assert (row["neg_elbo_nats"] is None) == variant.endswith("mse")
        assert (row["iw_nll_nats"] is None) == variant.endswith("mse")
        if variant.endswith("bce"):  # 20 importance samples: a tighter bound than the ELBO
            assert row["iw_nll_nats"] < row["neg_elbo_nats"]
        assert ("label_accuracy" in row) == variant.startswith("cvae")
    record = json.loads((run_dir / "plots" / "samples_cvae-bce.json").read_text())
    assert record["seed"] == 0 and record["labels"] == list(range(10))
    assert summary["frechet_test_to_train"] < 0.05 * summary["frechet_noise_to_train"]
    html = (run_dir / "report.html").read_text()
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert html.count("data:image/png;base64,") == len(plots) == 8 + 2 + 2
    assert "label_accuracy" in html and "neg_elbo_nats" in html


def test_grid_cells_are_reproducible_from_the_seed(quick_run):
    run_dir, _ = quick_run
    models = load_trained_models(run_dir, device="cpu")
    cvae, vae = models["cvae-bce"].model, models["vae-bce"].model
    images, record = sample_grid(cvae, seed=5, columns=4)
    z = latent_draw(5, 2, cvae.latent_size)[None]
    cell = cvae.generate(z, torch.tensor([7]))
    # The same numbers up to float32 rounding (a batch of 40 against a batch of 1 in the
    # matmuls): the decoder's 3 layers of fan-in at most 128 (tolerances.network), through a
    # sigmoid (Lipschitz 1/4) into pixels of scale 1.
    tol = network(3, 128)
    torch.testing.assert_close(images[7, 2], cell[0, 0], rtol=0, atol=tol)
    assert record["index"] == "column"
    images, _ = sample_grid(vae, seed=5, columns=4, rows=3)
    cell = vae.generate(latent_draw(5, 1 * 4 + 3, vae.latent_size)[None])
    torch.testing.assert_close(images[1, 3], cell[0, 0], rtol=0, atol=tol)
    info = models["cvae-bce"].info
    assert info["kind"] == "autoencoder" and info["generator_input_shape"] == [32]
    assert info["conditional"] and not models["vae-mse"].info["conditional"]


def test_evaluate_reproduces_the_summary(quick_run):
    run_dir, summary = quick_run
    results = evaluate_run(run_dir, device="cpu")
    for variant in VARIANTS:
        row = summary["variants"][variant]
        assert results[variant]["test_loss"] == pytest.approx(row["test_loss"], rel=1e-12)
        assert results[variant]["frechet_distance"] == pytest.approx(row["frechet_distance"])
    cvae = summary["variants"]["cvae-bce"]
    assert results["cvae-bce"]["label_accuracy"] == cvae["label_accuracy"]


def test_cli_eval_prints_the_generative_metrics(quick_run, capsys):
    run_dir, summary = quick_run
    assert main(["eval", str(run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"test_neg_elbo {summary['variants']['vae-bce']['neg_elbo_nats']:.4g}" in out
    assert "label_accuracy" in out


def _final_weights(run_dir):
    out = {}
    for variant in VARIANTS:
        step, path = list_checkpoints(run_dir / "checkpoints", variant)[-1]
        out[variant] = (step, load_file(str(path.with_suffix(".safetensors"))))
    return out


def test_stopped_and_resumed_run_is_bit_identical(quick_run, overrides, tmp_path):
    """Stop the first variant at step 20 (not a multiple of the log/eval/checkpoint intervals,
    8 and 16), resume, compare weights, optimizer state, metrics and scores."""
    full_dir, full_summary = quick_run
    out = tmp_path / "stopped"
    run_experiment("vae", [*overrides, "stop_after=20"], quick=True, device="cpu", out=out)
    assert RunDir(out).read_summary()["status"] == "stopped"
    config_path = out / "config.json"
    record = json.loads(config_path.read_text())
    record["config"]["stop_after"] = None  # the resumed run must not stop again
    config_path.write_text(json.dumps(record))
    summary = resume_experiment(out, device="cpu")
    assert summary["status"] == "complete"
    expected, got = _final_weights(full_dir), _final_weights(out)
    for variant in VARIANTS:
        assert expected[variant][0] == got[variant][0] == 32
        for key, tensor in expected[variant][1].items():
            if key.startswith(("model.", "optimizer.")):
                assert torch.equal(tensor, got[variant][1][key]), (variant, key)
    assert RunDir(out).read_metrics() == RunDir(full_dir).read_metrics()
    for variant in VARIANTS:
        for key in ("neg_elbo_nats", "frechet_distance", "label_accuracy"):
            assert summary["variants"][variant].get(key) == full_summary["variants"][variant].get(
                key
            )


def test_cli_sample_writes_a_png_of_the_asked_digit(quick_run, capsys, tmp_path):
    run_dir, _ = quick_run
    assert main(["sample", str(run_dir), "--label", "3", "--n", "5", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    path = run_dir / "plots" / "sample_cvae-bce_seed0_label3.png"
    assert str(path) in printed and path.read_bytes()[:8] == PNG
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["labels"] == [3] and record["columns"] == 5 and record["variant"] == "cvae-bce"
    out = tmp_path / "vae.png"
    args = ["sample", str(run_dir), "--variant", "vae-mse", "--n", "12", "--out", str(out)]
    assert main([*args, "--seed", "4", "--device", "cpu"]) == 0
    assert (
        out.read_bytes()[:8] == PNG
        and json.loads(out.with_suffix(".json").read_text())["seed"] == 4
    )
    assert main(["sample", str(run_dir), "--variant", "vae-bce", "--label", "3"]) == 2
    assert "--label needs a cvae variant" in capsys.readouterr().err


def test_run_killed_before_its_first_checkpoint_resumes_from_scratch(
    quick_run, overrides, tmp_path
):
    """No checkpoint left (a kill before the first one): the resumed run starts the variant
    over and writes its records, step 0 included, once: the metrics equal the full run's."""
    full_dir, _ = quick_run
    out = tmp_path / "killed"
    run_experiment("vae", [*overrides, "stop_after=20"], quick=True, device="cpu", out=out)
    for path in (out / "checkpoints").iterdir():
        path.unlink()
    assert any(r["step"] == 0 for r in RunDir(out).read_metrics())
    config_path = out / "config.json"
    record = json.loads(config_path.read_text())
    record["config"]["stop_after"] = None
    config_path.write_text(json.dumps(record))
    assert resume_experiment(out, device="cpu")["status"] == "complete"
    assert RunDir(out).read_metrics() == RunDir(full_dir).read_metrics()


def test_sample_prior_decodes_its_own_seeded_draws():
    torch.manual_seed(0)
    cvae = VAE(num_classes=10).eval()
    state = torch.get_rng_state()
    y = torch.tensor([3, 1, 4])
    images = cvae.sample_prior(3, seed=9, y=y)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    z = torch.randn(3, cvae.latent_size, generator=torch.Generator().manual_seed(9))
    assert torch.equal(images, cvae.generate(z, y))  # the same operations on the same values


def test_binarized_mnist_trains_and_tests_on_binary_images(overrides, tmp_path):
    from classicnets.experiments.vae import VAEConfig, vae_data
    from classicnets.train.vae import binarize

    grey = torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    once = binarize(grey, 3)
    assert torch.equal(once, binarize(grey, 3)) and not torch.equal(once, binarize(grey, 4))
    assert set(once.unique().tolist()) <= {0.0, 1.0}
    # Each pixel is 1 with its intensity as probability: over 392,000 draws the mean is within
    # 6 standard deviations (sqrt(1/4 / n) at most) of the mean intensity.
    assert abs(once.mean().item() - grey.mean().item()) < 6 * (0.25 / once.numel()) ** 0.5
    config = VAEConfig.quick()
    config.data_dir, config.binarize = overrides[0].split("=", 1)[1], True
    test_x = vae_data(config, "cpu").test_x
    assert set(test_x.unique().tolist()) == {0.0, 1.0}
    sets = [*overrides, "binarize=true", "variants=vae-bce", "iw_samples=10"]
    _, summary = run_experiment("vae", sets, quick=True, device="cpu", out=tmp_path / "run")
    row = summary["variants"]["vae-bce"]
    assert row["iw_nll_nats"] < row["neg_elbo_nats"]
    assert any("binarized MNIST" in note and "k = 10" in note for note in summary["notes"])
