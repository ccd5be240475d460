"""``vae``: VAE and conditional VAE on MNIST, cross-entropy against squared-error reconstruction.

The source blog's models (``models.vae``: 784-128-64, latent 32, dropout, softplus scale), each
trained with Adam on the same batches from the same initialization seed:

    vae-bce    VAE, Bernoulli cross-entropy reconstruction (the negative ELBO in nats)
    vae-mse    VAE, squared-error reconstruction
    cvae-bce   conditional VAE (one-hot digit into encoder and decoder), cross-entropy
    cvae-mse   conditional VAE, squared error

The report has, per variant: the test negative ELBO in nats (cross-entropy variants: one seeded
sample of z per test image, analytic KL, independent of the evaluation batch size, see
``train.vae.evaluate_vae``), the test objective for the squared-error variants, a reconstruction
grid, a prior-sample grid (one row per digit for the CVAEs), the Frechet distance between
samples and test images in a scoring classifier's feature space and, for the CVAEs, the fraction
of samples the classifier recognises as the digit asked for, with its confusion matrix
(``metrics.generative``).

Every grid cell is reproducible from the seed saved beside the PNG (``grid.json``): the latent
of cell/column ``i`` is ``latent_draw(seed, i, latent_size)``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from classicnets.experiments.common import (
    Experiment,
    ExperimentError,
    Job,
    SampleRequest,
    TrainingOptions,
    image_data_of,
    load_checkpointed,
    mnist_input,
    sampled_models,
    summarize,
    train_settings,
)
from classicnets.experiments.scorer import scorer_of
from classicnets.metrics.generative import plot_label_confusion, reference_distances
from classicnets.metrics.likelihood import bernoulli_vae_nll
from classicnets.models.mlp import ACTIVATIONS
from classicnets.models.vae import VAE
from classicnets.report.curves import Curve
from classicnets.report.grid import reconstruction_grid
from classicnets.train.run import RunDir
from classicnets.train.vae import binarize, evaluate_vae, train_vae

__all__ = [
    "EXPERIMENT",
    "VAEConfig",
    "build_model",
    "latent_draw",
    "run",
    "sample",
    "save_image_grid",
]

VARIANTS = ("vae-bce", "vae-mse", "cvae-bce", "cvae-mse")
DIGITS = tuple(range(10))


@dataclass
class VAEConfig(TrainingOptions):
    """Configuration of ``vae``; shared training switches from ``TrainingOptions``."""

    variants: tuple[str, ...] = VARIANTS  # any of vae-bce, vae-mse, cvae-bce, cvae-mse
    hidden_sizes: tuple[int, ...] = (128, 64)  # encoder widths; the decoder mirrors them
    latent_size: int = 32
    dropout: float = 0.0  # after each encoder hidden layer (the blog's dropout; see the notes)
    decoder_dropout: float = 0.0  # after each decoder hidden layer
    activation: str = "relu"
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 3e-3
    schedule: str = "cosine"  # to 0 at the last step
    # KL annealing: the KL weight rises linearly to 1 over this many epochs (0: none). It buys
    # the VAE ~5 nats of ELBO; in a CVAE it lets z learn the digit before the label does, and
    # prior samples then come out as the wrong digit (docs/vae.md), so CVAEs get none.
    kl_warmup_epochs: float = 10.0  # vae-* variants
    cvae_kl_warmup_epochs: float = 0.0  # cvae-* variants
    eval_every: int = 468  # about one epoch of 128
    log_every: int = 100
    checkpoint_every: int = 2000
    eval_seed: int = 0  # seed of the single-sample ELBO's noise (train.vae.evaluation_noise)
    eval_batch_size: int = 1000  # no effect on the result
    sample_seed: int = 0  # seed of the grids and of the scored samples
    grid_columns: int = 10
    score_samples_per_digit: int = 1000  # CVAE: per digit; VAE: 10x this many prior samples
    classifier_run: str | None = None  # a resnet-vs-mlp run whose resnet scores the samples
    scorer_cache: str | None = None  # cache of the trained scorer; None: RUN_DIR/scoring_classifier
    quick_scorer: bool = False  # train the scorer with the quick recipe (tests)
    test_limit: int | None = None  # evaluate and score on the first N test images only
    # Binarized MNIST (Burda et al. 2016): training images drawn afresh as binary images at each
    # step, the test set drawn once with binarize_seed; the likelihood is then a density.
    binarize: bool = False
    binarize_seed: int = 0
    iw_samples: int = 5000  # importance samples per test image for the NLL (0: not estimated)

    @classmethod
    def quick(cls) -> VAEConfig:
        """Seconds on a 2-core CPU: 32 steps per variant on 2,048 images, a quick scorer."""
        return cls(
            epochs=1,
            batch_size=64,
            kl_warmup_epochs=0.5,
            cvae_kl_warmup_epochs=0.25,
            train_limit=2048,
            test_limit=2000,
            eval_every=16,
            log_every=8,
            checkpoint_every=16,
            grid_columns=6,
            score_samples_per_digit=50,
            quick_scorer=True,
            iw_samples=20,
        )

    VARIANTS: ClassVar[tuple[str, ...]] = VARIANTS  # what config.check_choices admits
    FIELD_CHOICES: ClassVar[dict[str, tuple]] = {"activation": tuple(ACTIVATIONS)}

    def validate(self) -> None:
        if not self.hidden_sizes:
            raise ValueError("hidden_sizes needs at least one hidden layer")


def vae_data(config: VAEConfig, device: str):
    """The experiment's splits (``image_data_of``), the test images binarized once with
    ``binarize_seed`` when ``binarize``; the training images are binarized per step."""
    data = image_data_of(config, device)
    if config.binarize:
        data = dataclasses.replace(data, test_x=binarize(data.test_x, config.binarize_seed))
    return data


def iw_nll(config: VAEConfig, model: VAE, variant: str, data) -> dict[str, Any]:
    """The test NLL in nats with ``iw_samples`` importance samples per image
    (``metrics.likelihood.bernoulli_vae_nll``), for a cross-entropy variant; else nothing."""
    if not config.iw_samples or reconstruction_of(variant) != "bce":
        return {}
    labels = data.test_y if model.conditional else None
    found = bernoulli_vae_nll(model, data.test_x, labels, config.iw_samples, config.eval_seed)
    return {"test_iw_nll": found["nll"]}


def is_conditional(variant: str) -> bool:
    return variant.startswith("cvae")


def reconstruction_of(variant: str) -> str:
    return variant.rsplit("-", 1)[1]


def build_model(config: VAEConfig, variant: str) -> VAE:
    return VAE(
        hidden_sizes=config.hidden_sizes,
        latent_size=config.latent_size,
        num_classes=10 if is_conditional(variant) else 0,
        dropout=config.dropout,
        decoder_dropout=config.decoder_dropout,
        activation=config.activation,
    )


def _steps(config: VAEConfig, train_size: int) -> int:
    return config.epochs * (train_size // config.batch_size)


def _warmup_epochs(config: VAEConfig, variant: str) -> float:
    return config.cvae_kl_warmup_epochs if is_conditional(variant) else config.kl_warmup_epochs


# --------------------------------------------------------------------------- run


def run(config: VAEConfig, job: Job) -> dict:
    """Train the variants, score them, write grids and plots; return the summary."""
    run_dir, device, resume = job.run_dir, job.device, job.resume
    data = vae_data(config, device)
    steps = _steps(config, len(data.train_x))
    steps_per_epoch = len(data.train_x) // config.batch_size
    settings = train_settings(config, steps=steps, momentum=0.0, nesterov=False)
    models: dict[str, VAE] = {}

    def train(variant: str) -> dict:
        model = build_model(config, variant).to(device)
        warmup = round(_warmup_epochs(config, variant) * steps_per_epoch)
        binarize_seed = config.binarize_seed + 1 if config.binarize else None  # not the test's
        result = train_vae(model, data, settings, run_dir, variant, reconstruction_of(variant),
                           config.eval_seed, resume=resume, kl_warmup_steps=warmup,
                           binarize_seed=binarize_seed)  # fmt: skip
        if result["complete"]:
            models[variant] = model.eval()
            result.update(iw_nll(config, model, variant, data))  # in the variant's worker
        return {**result, "parameters": sum(p.numel() for p in model.parameters())}

    results = job.train_variants(config.variants, config.seed, train)
    if not models and job.trained_elsewhere(config.variants):  # from their final checkpoints
        done = [v for v, r in results.items() if r["complete"]]
        models = {v: t.model for v, t in load_models(config, run_dir, device).items() if v in done}
    complete = len(models) == len(config.variants)
    references: dict[str, float] = {}
    scorer_info: dict[str, Any] = {}
    if complete:
        scorer = scorer_of(config, run_dir, device, "scoring_classifier")
        test_features = scorer.features(data.test_x)
        references = reference_distances(scorer, test_features, data.train_x, config.sample_seed)
        for variant, model in models.items():
            results[variant].update(score_variant(config, model, variant, scorer, test_features))
            write_grids(config, run_dir, variant, model, data.test_x, data.test_y)
        scorer_info = {"source": scorer.source, "test_accuracy": scorer.test_accuracy}
    summary = _summary(config, results, references, scorer_info, device, steps)
    write_plots(run_dir, results)
    return summary


def score_variant(config: VAEConfig, model: VAE, variant: str, scorer, test_features) -> dict:
    """``metrics.generative.sample_scores`` of ``score_samples_per_digit`` prior samples of each
    digit (for a VAE, as many unconditioned ones), against the test images' features."""
    from classicnets.metrics.generative import sample_scores

    n = config.score_samples_per_digit * len(DIGITS)
    labels = torch.arange(len(DIGITS)).repeat_interleave(config.score_samples_per_digit)
    labels = labels if model.conditional else None
    samples = model.sample_prior(n, config.sample_seed + 1, labels)
    return sample_scores(scorer, samples, test_features, labels, len(DIGITS))


# --------------------------------------------------------------------------- grids


def latent_draw(seed: int, index: int, latent_size: int) -> Tensor:
    """The latent of grid cell (or column) ``index`` for ``seed``: float32 ``[latent_size]``
    from ``torch.Generator().manual_seed(seed * 1_000_003 + index)`` (CPU)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(latent_size, generator=g)


_DRAW_RULE = (
    "z = temperature * torch.randn(latent_size, generator=torch.Generator()"
    ".manual_seed(seed * 1000003 + index)); image = sigmoid(decode(z[, label]))"
)


@torch.no_grad()
def sample_grid(
    model: VAE, seed: int, columns: int, labels=None, rows: int = 1, temperature: float = 1.0
) -> tuple[Tensor, dict]:
    """Mean images of prior samples as ``[R, C, 28, 28]`` and a JSON-ready record of how.

    A conditional model gets one row per entry of ``labels`` (default: the ten digits), and
    column ``c`` uses ``latent_draw(seed, c)`` in every row (the same style, another digit). An
    unconditional model gets ``rows`` x ``columns`` cells, cell ``(r, c)`` using index
    ``r * columns + c``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if model.conditional:
        labels = list(DIGITS if labels is None else labels)
        z = torch.stack([latent_draw(seed, c, model.latent_size) for c in range(columns)])
        z = (temperature * z).repeat(len(labels), 1).to(device)  # (R * C, latent)
        y = torch.tensor(labels).repeat_interleave(columns).to(device)  # (R * C,)
        images = model.generate(z, y).reshape(len(labels), columns, 28, 28)
        index = "column"
    else:
        z = torch.stack([latent_draw(seed, i, model.latent_size) for i in range(rows * columns)])
        images = model.generate((temperature * z).to(device)).reshape(rows, columns, 28, 28)
        index = "row * columns + column"
    model.train(was_training)
    record = {
        "seed": seed,
        "rows": len(labels) if model.conditional else rows,
        "columns": columns,
        "labels": labels if model.conditional else None,
        "temperature": temperature,
        "index": index,
        "rule": _DRAW_RULE,
    }
    return images.cpu(), record


def save_image_grid(
    path: str | Path,
    images,
    row_labels=None,
    title: str = "",
    record: dict | None = None,
) -> Path:
    """Write ``images`` (``[R, C, H, W]`` in [0, 1]) as one grid (``report.grid.write_grid``);
    the JSON beside it holds ``record`` (the seed and rule of the cells), the row labels and the
    title."""
    from classicnets.report.grid import write_grid

    rows = None if row_labels is None else [str(v) for v in row_labels]
    info = {**(record or {}), "rows": rows, "title": title}
    return write_grid(path, torch.as_tensor(np.asarray(images, dtype=np.float32)), info)[0]


def write_grids(config: VAEConfig, run_dir: RunDir, variant: str, model: VAE, test_x, test_y):
    """``reconstructions_{variant}.png`` (pairs of rows: test images, their reconstructions at
    the posterior mean) and ``samples_{variant}.png`` (prior samples; a CVAE: one row per
    digit)."""
    if not run_dir.writer:
        return
    cols = config.grid_columns
    x, y = test_x[: 2 * cols], test_y[: 2 * cols]
    model.eval()
    with torch.no_grad():
        recon = torch.sigmoid(model(x, y if model.conditional else None).logits)
    reconstruction_grid(
        run_dir.plots / f"reconstructions_{variant}.png",
        x,
        {"recon": recon.reshape(x.shape)},
        title=f"{variant}: test images and reconstructions",
        columns=cols,
        original="input",
    )
    images, record = sample_grid(model, config.sample_seed, cols, rows=len(DIGITS))
    save_image_grid(
        run_dir.plots / f"samples_{variant}.png",
        images,
        row_labels=DIGITS if model.conditional else None,
        title=f"{variant}: prior samples, seed {config.sample_seed}"
        + (" (one row per digit)" if model.conditional else ""),
        record={"variant": variant, **record},
    )


# --------------------------------------------------------------------------- summary, plots


def _summary(config, results, references, scorer, device, steps) -> dict[str, Any]:
    notes = [
        f"{config.epochs} epochs ({steps} steps of {config.batch_size}) per variant, "
        f"{config.optimizer.upper()} lr {config.lr}, {config.schedule} schedule, KL weight "
        f"warmed up linearly over {config.kl_warmup_epochs} epochs (VAE) and "
        f"{config.cvae_kl_warmup_epochs} (CVAE); encoder "
        f"784-{'-'.join(map(str, config.hidden_sizes))}, latent {config.latent_size}, dropout "
        f"{config.dropout} (decoder {config.decoder_dropout}); device {device}.",
        "neg_elbo_nats: test negative ELBO (cross-entropy variants), one seeded sample of z per "
        f"test image (eval_seed {config.eval_seed}), analytic KL; test_loss is each variant's "
        "objective (for -mse: squared error summed over pixels + KL).",
    ]
    if scorer:
        accuracy = scorer["test_accuracy"]
        notes.append(
            f"Scoring classifier: {scorer['source']}"
            + (f" (test accuracy {100 * accuracy:.2f}%)" if accuracy is not None else "")
            + f"; {config.score_samples_per_digit} prior samples per digit "
            f"(seed {config.sample_seed + 1}). Frechet distances in its feature space: "
            f"test to training images {references['frechet_test_to_train']:.2f}, uniform noise "
            f"to training images {references['frechet_noise_to_train']:.2f}."
        )
        for variant in config.variants:
            per_digit = results[variant].get("label_accuracy_per_digit")
            if per_digit is not None:
                accs = ", ".join(f"{d}: {100 * a:.0f}%" for d, a in zip(DIGITS, per_digit))
                notes.append(f"{variant} label accuracy per digit: {accs}.")
    same = ("test_loss", "test_recon", "test_kl", "frechet_distance", "label_accuracy")
    if config.iw_samples:
        notes.append(
            f"iw_nll_nats: -log p(x) estimated with k = {config.iw_samples} importance samples "
            "per test image (Burda et al. 2016), cross-entropy variants"
            + (f"; binarized MNIST (test set drawn with seed {config.binarize_seed})."
               if config.binarize else "; on grey levels, where the Bernoulli likelihood is no "
               "density: not comparable with published binarized-MNIST figures.")
        )  # fmt: skip
    fields = {"neg_elbo_nats": "test_neg_elbo", "iw_nll_nats": "test_iw_nll",
              **{k: k for k in same}, "steps": "step",
              "parameters": "parameters", "train_time_s": "train_time_s"}  # fmt: skip
    title = "vae: VAE and conditional VAE on MNIST, cross-entropy vs squared error"
    summary = summarize(title, config.variants, results, fields, notes)
    for variant, row in summary["variants"].items():
        if not is_conditional(variant):
            del row["label_accuracy"]
    return {**summary, **references}


PLOTS = (
    Curve("test_neg_elbo.png", "test", "neg_elbo", "negative ELBO (nats)",
          "test negative ELBO, cross-entropy variants", from_step=1),
    Curve("test_loss.png", "test", "loss", "objective", "test objective (reconstruction + KL)",
          logy=True, from_step=1),
)  # fmt: skip


def write_plots(run_dir: RunDir, results: dict) -> None:
    """The confusion matrices of the CVAEs' samples (the curves are ``PLOTS``, drawn by
    ``run_lifecycle``)."""
    if not run_dir.writer:
        return
    for variant, r in results.items():
        if "label_confusion_matrix" in r:
            plot_label_confusion(run_dir.plots / f"label_confusion_{variant}.png", r, variant)


# --------------------------------------------------------------------------- after training


def load_models(config: VAEConfig, run_dir: RunDir, device: str = "cpu") -> dict:
    """Each variant's newest checkpoint as a ``TrainedModel`` (eval mode)."""

    def info(variant: str, model) -> dict[str, Any]:
        out = {
            "kind": "autoencoder",
            **mnist_input(),
            "outputs": {
                "logits": [784],
                "mu": [config.latent_size],
                "scale": [config.latent_size],
            },
            "reconstruction": reconstruction_of(variant),
            "conditional": is_conditional(variant),
            "generator_input_shape": [config.latent_size],
            "generator": "sigmoid(decode(z[, label])) -> mean image [N, 784]",
        }
        if is_conditional(variant):
            out["label_input"] = "int64 [N] digit 0-9 (second argument; default 0)"
            out["class_names"] = [str(d) for d in DIGITS]
        return out

    build = functools.partial(build_model, config)
    return load_checkpointed(build, run_dir, config.variants, device, info)


def evaluate_trained(config: VAEConfig, run_dir: RunDir, device: str = "cpu") -> dict:
    """Test objective and negative ELBO, Frechet distance and (CVAE) label accuracy of each
    variant's newest checkpoint."""
    models = load_models(config, run_dir, device)
    if not models:
        return {}
    data = vae_data(config, device)
    scorer = scorer_of(config, run_dir, device, "scoring_classifier")
    test_features = scorer.features(data.test_x)
    out = {}
    for variant, trained in models.items():
        metrics = evaluate_vae(
            trained.model,
            data.test_x,
            data.test_y,
            reconstruction_of(variant),
            config.eval_seed,
            config.eval_batch_size,
        )
        scores = score_variant(config, trained.model, variant, scorer, test_features)
        out[variant] = {
            **{f"test_{k}": v for k, v in metrics.items()},
            **scores,
            "step": trained.step,
            "checkpoint": trained.checkpoint,
        }
    return out


def sample(config: VAEConfig, run_dir: RunDir, device: str, request: SampleRequest) -> str:
    """Write a grid of prior samples; return a message naming the PNG.

    The variant is ``request.variant``, else the first conditional variant of the run when a
    ``label`` is asked for or the run has one, else the first variant. A conditional model
    draws one row of ``request.n`` samples of ``request.label``, or one row per digit when no
    label is given; an unconditional one ``request.n`` samples in rows of up to 10. Column (or
    cell) ``i`` uses ``latent_draw(request.seed, i)`` times ``request.temperature``; the seed and
    rule are saved in a JSON file beside the PNG.
    """
    variant = request.variant
    if variant is None:  # the first conditional variant, else the first
        variant = next((v for v in config.variants if is_conditional(v)), config.variants[0])
    if request.label is not None and not is_conditional(variant):
        raise ExperimentError(f"variant {variant!r} is unconditional: --label needs a cvae variant")
    request = dataclasses.replace(request, variant=variant)
    trained = sampled_models(load_models(config, run_dir, device), request, run_dir)[variant]
    model = trained.model
    if model.conditional:
        labels = DIGITS if request.label is None else [request.label]
        images, record = sample_grid(
            model, request.seed, request.n, labels, temperature=request.temperature
        )
        row_labels = labels
    else:
        columns = min(request.n, 10)
        rows = -(-request.n // columns)
        images, record = sample_grid(
            model, request.seed, columns, rows=rows, temperature=request.temperature
        )
        flat = images.reshape(rows * columns, 28, 28)
        flat[request.n :] = 0.0  # cells past n stay blank
        images, row_labels = flat.reshape(rows, columns, 28, 28), None
        record["n"] = request.n
    label = "" if request.label is None else f"_label{request.label}"
    default = run_dir.plots / f"sample_{variant}_seed{request.seed}{label}.png"
    path = Path(request.out) if request.out else default
    record.update(variant=variant, step=trained.step, checkpoint=trained.checkpoint)
    path = save_image_grid(
        path,
        images,
        row_labels=row_labels,
        title=f"{variant} (step {trained.step}), seed {request.seed}",
        record=record,
    )
    shape = f"{images.shape[0]}x{images.shape[1]}"
    return f"wrote {path} ({variant}, step {trained.step}, seed {request.seed}, {shape} grid)"


DESCRIPTION = (
    "VAE and conditional VAE on MNIST (784-128-64, latent 32), cross-entropy vs squared error"
)
EXPERIMENT = Experiment(
    "vae", DESCRIPTION, VAEConfig, run, evaluate_trained, load_models, sample, PLOTS
)
