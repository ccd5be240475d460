"""GAN / CGAN: the two labelled steps and their optimizers, the non-saturating loss, reproducible
grid cells, the warnings, and the ``gan`` experiment end to end (quick run, exact resume,
``classicnets sample``)."""

from __future__ import annotations

import json
import os
import signal
import warnings
from html import escape as html_escape

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from classicnets.cli import main
from classicnets.experiments import resume_experiment, run_experiment
from classicnets.experiments.common import load_trained_models
from classicnets.metrics.diversity import diversity, mean_pairwise_distance
from classicnets.models.gan import GAN
from classicnets.report.grid import (
    GridSpec,
    generate_grid,
    grid_image,
    read_grid_cell,
    regenerate_cell,
    save_grid,
)
from classicnets.train.checkpoint import list_checkpoints, load_checkpoint
from classicnets.train.faults import StopRequested
from classicnets.train.gan import (
    GANSettings,
    discriminator_loss,
    discriminator_step,
    gan_train_step,
    generator_loss,
    generator_step,
    loss_floor,
    make_gan_optimizers,
    train_gan,
)
from classicnets.train.gan_monitor import GANMonitor, GANTrainingWarning, discriminator_wins
from classicnets.train.loop import NonFiniteLossError
from classicnets.train.run import RunDir
from tolerances import network

PNG = b"\x89PNG\r\n\x1a\n"


def _small_gan(num_classes=10, dropout=0.3, seed=0) -> GAN:
    torch.manual_seed(seed)
    return GAN(
        latent_size=8,
        num_classes=num_classes,
        generator_hidden=(16, 24),
        discriminator_hidden=(24, 16),
        dropout=dropout,
    )


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same(module, snapshot) -> bool:
    return all(torch.equal(p, snapshot[n]) for n, p in module.named_parameters())


def _all_changed(module, snapshot) -> bool:
    return all(not torch.equal(p, snapshot[n]) for n, p in module.named_parameters())


# --------------------------------------------------------------------------- steps and losses


def test_each_labelled_step_updates_only_its_own_network():
    model = _small_gan()
    opt_d, opt_g = make_gan_optimizers(model)
    d_ids = {id(p) for p in model.discriminator.parameters()}
    g_ids = {id(p) for p in model.generator.parameters()}
    assert {id(p) for g in opt_d.param_groups for p in g["params"]} == d_ids
    assert {id(p) for g in opt_g.param_groups for p in g["params"]} == g_ids

    g = torch.Generator().manual_seed(1)
    real = torch.rand(6, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (6,), generator=g)
    z = torch.randn(6, 8, generator=g)
    model.train()
    fake = model.generator(z, labels)

    g_before, d_before = _snapshot(model.generator), _snapshot(model.discriminator)
    # (1) update D
    out = discriminator_step(model.discriminator, opt_d, real, fake, labels)
    assert set(out) == {"d_loss", "d_real", "d_fake"}
    assert _same(model.generator, g_before) and _all_changed(model.discriminator, d_before)
    assert all(p.grad is None for p in model.generator.parameters())

    g_before, d_before = _snapshot(model.generator), _snapshot(model.discriminator)
    d_grads = {n: p.grad.clone() for n, p in model.discriminator.named_parameters()}
    # (2) update G
    generator_step(model.discriminator, opt_g, fake, labels)
    assert _same(model.discriminator, d_before) and _all_changed(model.generator, g_before)
    for n, p in model.discriminator.named_parameters():  # D's gradients untouched by step (2)
        assert torch.equal(p.grad, d_grads[n]) and p.requires_grad, n

    out = gan_train_step(model, opt_d, opt_g, real, z, labels)
    assert list(out) == ["d_loss", "g_loss", "d_real", "d_fake"]
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert 0 < out["d_real"].item() < 1 and 0 < out["d_fake"].item() < 1


def test_losses_match_float64_numpy_and_torch_bce():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(50, generator=g, dtype=torch.float64) * 4
    fake = torch.randn(40, generator=g, dtype=torch.float64) * 4
    r, f = real.numpy(), fake.numpy()

    def log_sigmoid(x):
        return np.log(1.0 / (1.0 + np.exp(-x)))

    # float64 on both sides, logits within |l| < 20: agreement to 1e-12.
    expected_g = -np.mean(log_sigmoid(f))  # the non-saturating -mean log D(G(z))
    assert abs(generator_loss(fake).item() - expected_g) < 1e-12
    expected_d = -np.mean(log_sigmoid(r)) - np.mean(np.log(1.0 - 1.0 / (1.0 + np.exp(-f))))
    assert abs(discriminator_loss(real, fake).item() - expected_d) < 1e-12
    smoothed = F.binary_cross_entropy_with_logits(real, torch.full_like(real, 0.9))
    smoothed = smoothed + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    assert abs(discriminator_loss(real, fake, 0.9).item() - smoothed.item()) < 1e-12
    assert loss_floor(1.0) == 0.0 and abs(loss_floor(0.9) - 0.325082973391448) < 1e-12


def test_generator_step_minimizes_the_non_saturating_loss():
    """The G loss of a step is -mean(log sigmoid(D(G(z)))), computed here independently from D's
    logits in float64 (dropout off, so D is deterministic; D does not change in step (2))."""
    model = _small_gan(dropout=0.0)
    _, opt_g = make_gan_optimizers(model)
    z = torch.randn(7, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(7) % 10
    model.train()
    fake = model.generator(z, labels)
    with torch.no_grad():
        logits = model.discriminator(fake, labels).double().numpy()
    expected = -np.mean(np.log(1.0 / (1.0 + np.exp(-logits))))
    g_loss = generator_step(model.discriminator, opt_g, fake, labels)["g_loss"].item()
    assert abs(g_loss - expected) < 1e-6  # float32 network, float64 reference


# --------------------------------------------------------------------------- grids


def test_a_grid_cell_regenerated_alone_is_identical(tmp_path):
    model = _small_gan()
    spec = GridSpec(columns=4, seed=5, latent_size=8, num_classes=10)
    grid = generate_grid(model.generator, spec)
    assert grid.shape == (10, 4, 1, 28, 28)
    png, meta = save_grid(tmp_path / "g.png", grid, spec, {"step": 3})
    assert png.read_bytes()[:8] == PNG
    record = json.loads(meta.read_text())
    cell = next(c for c in record["cells"] if (c["row"], c["column"]) == (7, 2))
    assert cell == {"row": 7, "column": 2, "noise_seed": 7, "label": 7} and record["step"] == 3

    again = regenerate_cell(model.generator, meta, 7, 2)
    assert torch.equal(again, grid[7, 2])
    saved = read_grid_cell(png, 7, 2)
    scaled = grid_image(grid[7:8, 2:3], scale=2, padding=0)  # the cell as written, uint8
    assert np.array_equal(saved, scaled.numpy())
    # One row of a digit draws the same cells as that digit's row of the full grid.
    row = generate_grid(model.generator, GridSpec(4, 5, 8, 10, label=7))
    assert torch.equal(row[0], grid[7])
    with pytest.raises(ValueError, match="no cell"):
        regenerate_cell(model.generator, meta, 10, 0)


def test_unconditional_sample_grid_layout():
    spec = GridSpec.for_samples(13, seed=2, latent_size=8)
    assert (spec.rows, spec.columns) == (2, 10)
    cells = spec.cells()
    assert len(cells) == 13
    assert cells[-1] == {"row": 1, "column": 2, "noise_seed": 14, "label": None}
    with pytest.raises(ValueError, match="unconditional"):
        GridSpec(4, 0, 8, num_classes=0, label=3)


# --------------------------------------------------------------------------- warnings


def test_mean_pairwise_distance_and_within_class_diversity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 4, 4, generator=g)
    flat = x.reshape(6, -1).double().numpy()
    pairs = [np.linalg.norm(flat[i] - flat[j]) for i in range(6) for j in range(i + 1, 6)]
    assert abs(mean_pairwise_distance(x) - np.mean(pairs)) < 1e-12
    # Ten distinct digits, each drawn identically: far apart overall, collapsed within classes.
    one_per_class = torch.rand(10, 1, 4, 4, generator=g).repeat_interleave(5, dim=0)
    labels = torch.arange(10).repeat_interleave(5)
    assert mean_pairwise_distance(one_per_class) > 1.0
    assert diversity(one_per_class, labels) == 0.0


def test_monitor_warns_once_on_outright_win_and_not_when_healthy():
    healthy = GANMonitor(start_step=200)
    for step in range(100, 3000, 100):
        assert healthy.observe(step, d_fake=0.3, d_loss=1.2, diversity_ratio=0.9) == []
    assert healthy.fired == {}

    monitor = GANMonitor(start_step=200)  # window 3, D(G(z)) < 0.01, D loss < 0.1
    winning = {"d_fake": 0.004, "d_loss": 0.03, "diversity_ratio": 0.9}
    assert monitor.observe(100, **winning) == []  # before start_step: not counted
    assert monitor.observe(200, **winning) == []
    assert monitor.observe(300, **winning) == []
    assert monitor.observe(400, d_fake=0.2, d_loss=0.03, diversity_ratio=0.9) == []  # breaks it
    assert monitor.observe(500, **winning) == [] and monitor.observe(600, **winning) == []
    fired = monitor.observe(700, **winning)
    assert [kind for kind, _ in fired] == ["discriminator_wins"] and "outright" in fired[0][1]
    assert monitor.observe(800, **winning) == []  # once per run
    assert monitor.fired == {"discriminator_wins": 700}

    assert discriminator_wins(0.005, 0.05) and not discriminator_wins(0.005, 0.2)
    assert not discriminator_wins(0.02, 0.0)
    # With one-sided label smoothing the loss cannot go below H(0.9) = 0.325 nats.
    assert discriminator_wins(0.005, 0.35, floor=loss_floor(0.9))
    assert not discriminator_wins(0.005, 0.35)


def test_monitor_warns_on_collapsed_samples_and_round_trips():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(20, 1, 28, 28, generator=g)
    collapsed = real[:1].repeat(20, 1, 1, 1) + 0.01 * torch.rand(20, 1, 28, 28, generator=g)
    ratio = diversity(collapsed) / diversity(real)
    assert ratio < 0.05 and diversity(real[10:]) / diversity(real[:10]) > 0.9

    monitor = GANMonitor(start_step=0, collapse_window=2)
    assert monitor.observe(100, 0.3, 1.2, ratio) == []
    fired = monitor.observe(200, 0.3, 1.2, ratio)
    assert [kind for kind, _ in fired] == ["samples_collapse"] and "collapse" in fired[0][1]
    clone = GANMonitor()
    clone.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert clone == monitor and clone.observe(300, 0.3, 1.2, ratio) == []


# --------------------------------------------------------------------------- the loop's faults


def _tiny_setup(tmp_path, **kw):
    torch.manual_seed(0)
    model = GAN(latent_size=4, num_classes=10, generator_hidden=(8,),
                discriminator_hidden=(8,), image_shape=(1, 4, 4))  # fmt: skip
    images = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(64) % 10
    base = dict(steps=12, batch_size=8, log_every=4, grid_every=100, checkpoint_every=4,
                progress=False, monitor_per_class=2)  # fmt: skip
    return model, images, labels, GANSettings(**{**base, **kw}), RunDir(tmp_path)


def test_non_finite_loss_stops_before_the_checkpoint(tmp_path):
    model, images, labels, settings, run = _tiny_setup(tmp_path)
    images[3:, 0, 0, 0] = float("nan")  # from the first batches on
    with pytest.raises(NonFiniteLossError, match=r"d_loss is nan at step 1;"):
        train_gan(model, images, labels, settings, run, "cgan")
    assert list_checkpoints(run.checkpoints, "cgan") == []


def test_sigterm_stops_with_a_checkpoint(tmp_path):
    model, images, labels, settings, run = _tiny_setup(tmp_path, eval_every=4)

    def hook(generator, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # SignalGuard turns it into a flag
        return {"calls": step}

    with pytest.raises(StopRequested, match="SIGTERM at step 4"):
        train_gan(model, images, labels, settings, run, "cgan", eval_hook=hook)
    assert [step for step, _ in list_checkpoints(run.checkpoints, "cgan")] == [4]


# --------------------------------------------------------------------------- the experiment

QUICK = ["progress=false"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These networks are tiny: intra-op threads only add synchronization, and on a shared
    2-core machine oversubscription made a step 40 times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def untrained_scorer():
    """The scoring API with an untrained CNN: the scores' plumbing without the minute it takes to
    train one (``experiments.scorer``'s tests cover the trained scorer; the full run in
    docs/gan.md used it)."""
    from classicnets.experiments import scorer as scorer_module
    from classicnets.metrics import generative

    def scorer(data_dir, device, classifier_run=None, cache_dir=None, download=True, quick=False):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = generative.SmallCNN().to(device).eval()
        return generative.ScoringClassifier(model, device, "untrained SmallCNN (test)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scorer_module, "scoring_classifier", scorer)
        yield


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, data_root, untrained_scorer):
    out = tmp_path_factory.mktemp("gan") / "run"
    overrides = [*QUICK, f"data_dir={data_root}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dir, summary = run_experiment("gan", overrides, quick=True, device="cpu", out=out)
    printed = [str(w.message) for w in caught if issubclass(w.category, GANTrainingWarning)]
    return run_dir, summary, printed


def test_quick_run_writes_grids_scores_and_report(quick_run):
    run_dir, summary, _ = quick_run
    assert summary["status"] == "complete" and set(summary["variants"]) == {"gan", "cgan"}
    grids = run_dir / "plots" / "grids"
    for variant in ("gan", "cgan"):
        for step in (0, 100, 200):
            png = grids / f"{variant}_step{step:08d}.png"
            assert png.read_bytes()[:8] == PNG, png
            assert json.loads(png.with_suffix(".json").read_text())["step"] == step
        assert (run_dir / "plots" / f"{variant}_grid.png").read_bytes()[:8] == PNG
    for name in ("training.png", "confusion_cgan.png", "cgan_progress.png"):
        assert (run_dir / "plots" / name).read_bytes()[:8] == PNG, name
    cgan = summary["variants"]["cgan"]
    assert 0.0 <= cgan["label_accuracy"] <= 1.0 and len(cgan["digit_accuracy"]) == 10
    assert summary["variants"]["gan"]["label_accuracy"] is None
    assert 0 < summary["frechet_test_to_train"] < summary["frechet_noise_to_train"]
    for v in summary["variants"].values():
        assert v["test_frechet_distance"] > 0 and 0 < v["d_real"] < 1 and 0 < v["d_fake"] < 1
    records = RunDir(run_dir).read_metrics()
    train = [r for r in records if r["split"] == "train" and r["variant"] == "cgan"]
    assert [r["step"] for r in train] == [50, 100, 150, 200]
    assert {"d_loss", "g_loss", "d_real", "d_fake", "diversity_ratio"} <= set(train[-1])
    html = (run_dir / "report.html").read_text()
    assert "label_accuracy" in html and "frechet_noise_to_train" in html
    assert html.count("data:image/png;base64,") == len(list((run_dir / "plots").glob("*.png")))


def test_warnings_are_printed_once_logged_and_reported(quick_run):
    """The quick run is too short to learn: its samples are collapsed at the monitored steps."""
    run_dir, summary, printed = quick_run
    assert printed and summary["warnings"] == [f"WARNING: {text}" for text in printed]
    logged = [r for r in RunDir(run_dir).read_metrics() if r["split"] == "warning"]
    assert [f"{r['variant']}, step {r['step']}: {r['message']}" for r in logged] == printed
    kinds = [(r["variant"], r["warning"]) for r in logged]
    assert len(kinds) == len(set(kinds))  # each kind once per variant
    html = (run_dir / "report.html").read_text()
    for text in printed:
        assert html_escape(f"WARNING: {text}") in html


def test_stopped_and_resumed_run_is_bit_identical(quick_run, tmp_path, data_root, untrained_scorer):
    """Stop the CGAN at step 130 (between logs, grids and checkpoints), resume, compare with the
    uninterrupted run: both networks' weights and both optimizers' states, and the metrics."""
    full_dir, _, _ = quick_run
    out = tmp_path / "stopped"
    overrides = [*QUICK, f"data_dir={data_root}", "variants=cgan"]
    warnings.simplefilter("ignore", GANTrainingWarning)  # (pytest restores the filters)
    run_experiment("gan", [*overrides, "stop_after=130"], quick=True, device="cpu", out=out)
    assert RunDir(out).read_summary()["status"] == "stopped"
    assert list_checkpoints(out / "checkpoints", "cgan")[-1][0] == 130
    record = json.loads((out / "config.json").read_text())
    record["config"]["stop_after"] = None
    (out / "config.json").write_text(json.dumps(record))
    assert resume_experiment(out, device="cpu")["status"] == "complete"

    (step_a, path_a), (step_b, path_b) = (
        list_checkpoints(d / "checkpoints", "cgan")[-1] for d in (full_dir, out)
    )
    assert step_a == step_b == 200
    expected, got = (load_file(p.with_suffix(".safetensors")) for p in (path_a, path_b))
    prefixes = ("model.generator.", "model.discriminator.", "optimizer.generator.",
                "optimizer.discriminator.")  # fmt: skip
    for prefix in prefixes:
        keys = [k for k in expected if k.startswith(prefix)]
        assert keys, prefix
        for key in keys:
            assert torch.equal(expected[key], got[key]), key
    state_a, state_b = (load_checkpoint(p)[1] for p in (path_a, path_b))
    assert state_a["optimizers"] == state_b["optimizers"]
    cgan_full = [r for r in RunDir(full_dir).read_metrics() if r["variant"] == "cgan"]
    assert RunDir(out).read_metrics() == cgan_full


def test_sample_command_writes_a_row_of_the_digit(quick_run, capsys):
    run_dir, _, _ = quick_run
    assert main(["sample", str(run_dir), "--label", "7", "--n", "5", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    png = run_dir / "plots" / "samples" / "cgan_digit7_n5_seed0.png"
    assert str(png) in printed and "seed 0" in printed
    assert png.read_bytes()[:8] == PNG
    cells = json.loads(png.with_suffix(".json").read_text())["cells"]
    assert [(c["label"], c["noise_seed"]) for c in cells] == [(7, s) for s in range(5)]
    generator = load_trained_models(run_dir, device="cpu")["cgan"]
    assert generator.info["kind"] == "generator" and generator.info["conditional"] is True
    again = regenerate_cell(generator.model, png.with_suffix(".json"), 0, 3)
    scaled = grid_image(again[None, None], scale=2, padding=0).numpy()
    assert np.array_equal(read_grid_cell(png, 0, 3), scaled)

    assert main(["sample", str(run_dir), "--label", "7", "--variant", "gan"]) == 2
    assert "unconditional" in capsys.readouterr().err


def test_eval_command_prints_the_scores(quick_run, capsys):
    run_dir, summary, _ = quick_run
    assert main(["eval", str(run_dir), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    cgan = summary["variants"]["cgan"]
    assert f"cgan: step 200, test_frechet_distance {cgan['test_frechet_distance']:.4g}" in printed
    assert f"label_accuracy {cgan['label_accuracy']:.4g}" in printed


def test_generator_sample_is_its_forward_on_seeded_noise_with_cycled_labels():
    torch.manual_seed(0)
    generator = GAN(num_classes=10, dropout=0.5).generator.train()
    state = torch.get_rng_state()
    images, labels = generator.sample(25, seed=7, batch_size=10)  # three batches
    assert torch.equal(torch.get_rng_state(), state) and generator.training
    z = torch.randn(25, generator.latent_size, generator=torch.Generator().manual_seed(7))
    assert torch.equal(labels, torch.arange(25) % 10)
    with torch.no_grad():
        want = generator.eval()(z, labels)
    # Batches of 10 against one batch of 25: the same float32 products, summed in possibly
    # another order by the matrix kernels (3 layers, fan-in at most 300); the outputs are
    # sigmoids in [0, 1], so the bound relative to the output scale serves as an absolute one.
    torch.testing.assert_close(images, want, rtol=0, atol=network(3, 300))
    unconditional = GAN().generator
    assert unconditional.sample(3, seed=1)[1] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--label", "10"], "--label must be a class 0-9, got 10"),
        (["--label", "-1"], "--label must be a class 0-9, got -1"),
        (["--variant", "dcgan"], "--variant 'dcgan': this run has gan, cgan trained"),
        (["--label", "3", "--variant", "gan"], "variant 'gan' is unconditional: no --label"),
        (["--prompt", "the"], "--prompt and --temperature are for language models"),
    ],
)
def test_bad_sample_requests_are_one_line_exit_2_and_write_nothing(quick_run, capsys, argv,
                                                                   message):  # fmt: skip
    run_dir, _, _ = quick_run
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert main(["sample", str(run_dir), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
