"""``gan``: a GAN and a conditional GAN on MNIST, scored by a trained MNIST classifier.

Both variants have the source blog's fully connected architecture (``models.gan``) and the same
training recipe (``train.gan``: non-saturating generator loss, one Adam per network over its own
parameters). Over training each writes a fixed-noise grid (one row per digit for the CGAN) whose
cells can be regenerated from the seeds saved beside it.

Scoring, by a trained MNIST classifier (the ``resnet`` of a ``resnet-vs-mlp`` run given as
``classifier_run``, else a small CNN trained inside the run: ``experiments.scorer``; the scores
themselves are ``metrics.generative``):

- ``label_accuracy`` (CGAN): the fraction of samples the classifier recognises as the digit
  that was asked for, with the confusion matrix "asked for x recognised as";
- ``test_frechet_distance``: between the classifier's features of samples and of test images, shown
  beside two references computed the same way with as many images: test images against training
  images (what a perfect generator would get, up to sampling noise) and uniform noise against
  training images (what a useless one gets).
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from classicnets.experiments.common import (
    Experiment,
    ExperimentError,
    Job,
    SampleRequest,
    TrainingOptions,
    image_data_of,
    load_checkpointed,
    sampled_models,
    settings_for,
    summarize,
)
from classicnets.experiments.config import NON_NEGATIVE, Range
from classicnets.metrics.generative import plot_label_confusion
from classicnets.models.gan import GAN
from classicnets.report.curves import Curve
from classicnets.report.grid import progress_figure
from classicnets.train.run import RunDir

__all__ = ["EXPERIMENT", "GANConfig", "build_model", "run", "sample"]

VARIANTS = ("gan", "cgan")
NUM_CLASSES = 10
_UNSUPPORTED = {  # TrainingOptions switches the GAN loop does not implement: must stay at default
    "weight_decay": 0.0,
    "schedule": "constant",
    "clip_grad_norm": None,
    "compile": False,
    "channels_last": False,
    "sync_bn": False,
}


@dataclass
class GANConfig(TrainingOptions):
    """Configuration of ``gan``. Of the shared ``TrainingOptions`` the GAN loop uses
    ``precision``, ``deterministic`` and ``keep_checkpoints``; the others must keep their
    defaults (no schedule, weight decay, clipping, compile, channels-last or sync BN)."""

    FIELD_RANGES: ClassVar[dict[str, Range]] = {
        "eval_every": NON_NEGATIVE,  # 0: at the end
        **dict.fromkeys(["score_samples", "eval_samples"], Range(2 * NUM_CLASSES)),  # 2 a class
    }

    variants: tuple[str, ...] = VARIANTS  # any of "gan", "cgan"
    latent_size: int = 32
    generator_hidden: tuple[int, ...] = (150, 300)
    discriminator_hidden: tuple[int, ...] = (300, 150)
    generator_activation: str = "relu"  # "relu" (the blog) or "leaky_relu" (slope 0.2)
    dropout: float = 0.3  # the discriminator's dropout
    negative_slope: float = 0.2  # leaky-ReLU slope (discriminator; generator if leaky_relu)
    # One-sided label smoothing of D's real target (Salimans et al. 2016, Sec. 3.4); 1.0: none.
    # Without it (and at lr 2e-4) D won outright within 3,000 steps in our runs (docs/gan.md).
    real_label: float = 0.9
    # Iterations per variant (one D step and one G step each), about 15 epochs: 10,000 left the
    # CGAN's label accuracy at 89% and still rising (docs/gan.md).
    steps: int = 14_000
    batch_size: int = 64
    # Adam's default rate rather than DCGAN's 2e-4: with these small fully connected networks
    # 2e-4 left the samples collapsed after 3,000 steps, 1e-3 gave digits (docs/gan.md).
    lr_discriminator: float = 1e-3
    lr_generator: float = 1e-3
    beta1: float = 0.5  # Radford et al. 2015, Sec. 4
    beta2: float = 0.999
    log_every: int = 100
    grid_every: int = 1000  # fixed-noise grid every this many steps
    grid_columns: int = 10  # samples per digit in the grid
    grid_seed: int = 0
    eval_every: int = 2000  # score eval_samples samples every this many steps (0: end only)
    eval_samples: int = 2000
    score_samples: int = 10_000  # samples scored at the end (CGAN: a tenth per digit)
    score_seed: int = 1  # noise seed of the scored samples
    classifier_run: str | None = None  # a resnet-vs-mlp run folder; None: train a CNN in the run
    scorer_cache: str | None = None  # where the in-run CNN is cached; None: RUN_DIR/scorer
    quick_scorer: bool = False  # train the CNN scorer briefly (tests)
    checkpoint_every: int = 2000
    # Warnings (train.gan_monitor.GANMonitor): D wins outright / samples collapse.
    win_fake_below: float = 0.01
    win_loss_below: float = 0.1
    win_window: int = 3
    collapse_fraction: float = 0.25
    collapse_window: int = 3
    monitor_after: int = 1000  # ignore the first steps (an untrained G is collapsed by nature)

    @classmethod
    def quick(cls) -> GANConfig:
        """Seconds on a 2-core CPU: 200 steps per variant on 2,000 images, a briefly trained
        scorer, 500 scored samples."""
        return cls(
            steps=200,
            train_limit=2000,
            log_every=50,
            grid_every=100,
            checkpoint_every=100,
            eval_every=0,
            eval_samples=500,
            score_samples=500,
            quick_scorer=True,
            monitor_after=100,
        )

    VARIANTS: ClassVar[tuple[str, ...]] = VARIANTS  # what config.check_choices admits

    def validate(self) -> None:
        for name, default in _UNSUPPORTED.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not supported by the gan experiment "
                    f"(leave it at {default!r})"
                )


def build_model(config: GANConfig, variant: str) -> GAN:
    """The GAN (``variant="gan"``) or conditional GAN (``"cgan"``) of ``config``."""
    return GAN(
        latent_size=config.latent_size,
        num_classes=NUM_CLASSES if variant == "cgan" else 0,
        generator_hidden=config.generator_hidden,
        discriminator_hidden=config.discriminator_hidden,
        dropout=config.dropout,
        negative_slope=config.negative_slope,
        generator_activation=config.generator_activation,
    )


def _settings(config: GANConfig):
    from classicnets.train.gan import GANSettings

    return settings_for(GANSettings, config, monitor_per_class=10)  # 100 images of each kind


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


class _Scoring:
    """The scorer and the real-image features every score of a run compares against."""

    def __init__(self, config: GANConfig, run_dir: RunDir, data, device: str) -> None:
        from classicnets.experiments.scorer import scorer_of
        from classicnets.metrics.generative import reference_distances

        self.scorer = scorer_of(config, run_dir, device, "scorer")
        self.config = config
        self.device = device
        n = min(config.score_samples, len(data.test_x), len(data.train_x))
        self.test_features = self.scorer.features(data.test_x[:n])
        self.references = reference_distances(
            self.scorer, self.test_features, data.train_x, config.score_seed + 1
        )

    def score(self, generator, n: int, seed: int) -> dict[str, Any]:
        """FD of ``n`` samples to the first ``n`` test images' features; label accuracy (overall
        and per digit) and the confusion matrix for a conditional generator."""
        from classicnets.metrics.generative import sample_scores

        images, labels = generator.sample(n, seed)
        scores = sample_scores(self.scorer, images, self.test_features[:n], labels, NUM_CLASSES)
        return {"test_frechet_distance": scores.pop("frechet_distance"), **scores}

    def eval_hook(self):
        """``train_gan``'s eval hook: scores ``eval_samples`` samples (logged as split eval)."""

        def hook(generator, step: int) -> dict[str, Any]:
            result = self.score(generator, self.config.eval_samples, self.config.score_seed)
            keep = ("test_frechet_distance", "label_accuracy")
            return {k: v for k, v in result.items() if k in keep}

        return hook


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


def run(config: GANConfig, job: Job) -> dict:
    """Train the variants, score them, write grids and plots; return the summary."""
    run_dir, device, resume = job.run_dir, job.device, job.resume
    from classicnets.train.gan import train_gan

    data = image_data_of(config, device)
    scoring: _Scoring | None = None

    def get_scoring() -> _Scoring:
        nonlocal scoring
        if scoring is None:
            scoring = _Scoring(config, run_dir, data, device)
        return scoring

    settings = _settings(config)

    def train(variant: str) -> dict:  # the same initialization and noise stream for both
        model = build_model(config, variant).to(device)
        hook = get_scoring().eval_hook() if config.eval_every else None
        result = train_gan(
            model, data.train_x, data.train_y, settings, run_dir, variant, resume, hook
        )
        if result["complete"]:
            scores = get_scoring().score(model.generator, config.score_samples, config.score_seed)
            result.update(scores)
            _final_grid(run_dir, variant, result.get("grid"))
            if "label_confusion_matrix" in scores and run_dir.writer:
                plot_label_confusion(run_dir.plots / f"confusion_{variant}.png", scores, variant)
        return result

    results = job.train_variants(config.variants, config.seed, train, prepare=get_scoring)
    summary = _summary(config, results, scoring, device)
    write_plots(run_dir, config)
    return summary


def _final_grid(run_dir: RunDir, variant: str, grid: str | None) -> None:
    """Copy the last grid (and its JSON) to ``plots/{variant}_grid.png``, for the report."""
    if grid is None or not run_dir.writer:
        return
    source = Path(grid)
    for suffix in (".png", ".json"):
        shutil.copyfile(source.with_suffix(suffix), run_dir.plots / f"{variant}_grid{suffix}")


def _summary(config, results, scoring, device) -> dict[str, Any]:
    notes = [
        f"{config.steps} steps of batch {config.batch_size} per variant, Adam "
        f"(lr D {config.lr_discriminator}, G {config.lr_generator}, betas ({config.beta1}, "
        f"{config.beta2})), non-saturating G loss, real label {config.real_label}, D dropout "
        f"{config.dropout}, latent {config.latent_size}, device {device}.",
    ]
    if scoring is not None:
        refs = scoring.references
        notes.append(
            f"Frechet distances in the scorer's feature space over {len(scoring.test_features)} "
            f"images each: samples to test images (test_frechet_distance), test to training "
            f"images {refs['frechet_test_to_train']:.3g}, uniform noise to training images "
            f"{refs['frechet_noise_to_train']:.3g}."
        )
    warnings = [f"WARNING: {w}" for r in results.values() for w in r.get("warnings", [])]
    names = ("label_accuracy", "test_frechet_distance", "d_real", "d_fake", "d_loss", "g_loss",
             "diversity_ratio")  # fmt: skip
    fields = {**{name: name for name in names}, "steps": "step", "train_time_s": "train_time_s"}
    title = "gan: GAN and conditional GAN on MNIST, scored by an MNIST classifier"
    summary = summarize(title, config.variants, results, fields, warnings + notes)
    for variant, row in summary["variants"].items():
        result = results[variant]
        row["warnings"] = len(result.get("warnings", []))
        if "label_accuracy_per_digit" in result:
            row["digit_accuracy"] = [round(a, 4) for a in result["label_accuracy_per_digit"]]
    if scoring is not None:
        summary.update(scoring.references, scorer=scoring.scorer.source,
                       scorer_test_accuracy=scoring.scorer.test_accuracy)  # fmt: skip
    summary["warnings"] = warnings
    return summary


PLOTS = (
    Curve("training.png", "train", "d_loss", "loss", "losses (nats)", label="D loss",
          also=(("g_loss", "G loss"),)),
    Curve("training.png", "train", "d_real", "mean probability of 'real'",
          "discriminator outputs", ylim=(0.0, 1.0), label="D(x)", also=(("d_fake", "D(G(z))"),)),
    Curve("training.png", "train", "diversity_ratio", "ratio", "sample diversity / real diversity"),
    Curve("scores.png", "eval", "test_frechet_distance", "FD (log scale)",
          "Frechet distance to test images", logy=True),
    Curve("scores.png", "eval", "label_accuracy", "accuracy", "label accuracy of samples",
          ylim=(0, 1)),
)  # fmt: skip


def write_plots(run_dir: RunDir, config: GANConfig) -> list[Path]:
    """Each variant's grids over training (the curves are ``PLOTS``, drawn by
    ``run_lifecycle``)."""
    if not run_dir.writer:
        return []
    grids = run_dir.plots / "grids"
    progress = (progress_figure(grids, variant, run_dir.plots / f"{variant}_progress.png",
                                f"{variant}: fixed-noise grid over training")
                for variant in config.variants)  # fmt: skip
    return [path for path in progress if path is not None]


# --------------------------------------------------------------------------------------------
# Trained models: evaluate, load_models, sample
# --------------------------------------------------------------------------------------------


def load_models(config: GANConfig, run_dir: RunDir, device: str = "cpu") -> dict:
    """Each variant's newest generator as a ``TrainedModel`` (kind ``"generator"``)."""

    def info(variant: str, model) -> dict[str, Any]:
        conditional = model.conditional
        return {
            "kind": "generator",
            "latent_size": config.latent_size,
            "conditional": conditional,
            "num_classes": NUM_CLASSES if conditional else 0,
            "input_shape": [config.latent_size],
            "input_dtype": "float32",
            "preprocessing": "z ~ N(0, I)"
            + ("; labels int64 [N], digits 0-9 (one-hot inside)" if conditional else ""),
            "output_shape": [1, 28, 28],
            "output": "pixel intensities in [0, 1] (x 255 for uint8 images)",
            "dataset": "mnist",
        }

    build = functools.partial(build_model, config)
    return load_checkpointed(
        build, run_dir, config.variants, device, info, served=lambda gan: gan.generator
    )


def evaluate_trained(config: GANConfig, run_dir: RunDir, device: str = "cpu") -> dict:
    """Scores of each variant's newest generator (``score_samples`` samples)."""
    from classicnets.train.settings import set_deterministic

    set_deterministic(config.deterministic)
    data = image_data_of(config, device)
    models = load_models(config, run_dir, device)
    if not models:
        return {}
    scoring = _Scoring(config, run_dir, data, device)
    out = {}
    for variant, trained in models.items():
        scores = scoring.score(trained.model, config.score_samples, config.score_seed)
        out[variant] = {
            **scores,
            **scoring.references,
            "step": trained.step,
            "checkpoint": trained.checkpoint,
        }
    return out


def _sample_path(request: SampleRequest, run_dir: RunDir, variant: str, several: bool) -> Path:
    what = f"digit{request.label}" if request.label is not None else "all"
    default = f"{variant}_{what}_n{request.n}_seed{request.seed}.png"
    if request.out is None:
        return run_dir.plots / "samples" / default
    out = Path(request.out)
    if out.suffix.lower() != ".png":  # a folder
        return out / default
    return out.with_name(f"{out.stem}_{variant}{out.suffix}") if several else out


def sample(config: GANConfig, run_dir: RunDir, device: str, request: SampleRequest) -> str:
    """Write a grid of samples per chosen variant; return the lines to print.

    A conditional generator draws one row per digit with ``request.n`` columns, or one row of
    ``request.label``; an unconditional one draws ``request.n`` samples in rows of 10. Cell
    (row, column) has noise seed ``request.seed + column`` (conditional) or ``request.seed +
    index`` (``report.grid.GridSpec``); the JSON beside the PNG lists every cell's seed and label.
    """
    from classicnets.report.grid import GridSpec, generate_grid, save_grid

    if request.prompt is not None or request.temperature != 1.0:
        raise ExperimentError("--prompt and --temperature are for language models")
    models = sampled_models(load_models(config, run_dir, device), request, run_dir)
    chosen = list(models)
    if request.label is not None:
        unconditional = [v for v in chosen if not models[v].info["conditional"]]
        if request.variant is not None and unconditional:
            raise ExperimentError(f"variant {request.variant!r} is unconditional: no --label")
        chosen = [v for v in chosen if v not in unconditional]
        if not chosen:
            raise ExperimentError("--label needs a conditional model (cgan); this run has none")
    lines = []
    for variant in chosen:
        trained = models[variant]
        spec = GridSpec.for_samples(
            request.n,
            request.seed,
            trained.info["latent_size"],
            trained.info["num_classes"],
            request.label,
        )
        path = _sample_path(request, run_dir, variant, several=len(chosen) > 1)
        images = generate_grid(trained.model, spec, device)
        info = {"variant": variant, "step": trained.step, "checkpoint": trained.checkpoint}
        png, meta = save_grid(path, images, spec, info)
        if trained.info["conditional"]:
            what = (
                f"1 row of digit {request.label}"
                if request.label is not None
                else "one row per digit 0-9"
            )
            what += f" x {request.n} columns"
        else:
            what = f"{request.n} samples"
        lines.append(
            f"{variant} (step {trained.step}): {what}, seed {request.seed} -> {png} "
            f"(each cell's noise seed and label in {meta.name})"
        )
    return "\n".join(lines)


DESCRIPTION = "GAN and conditional GAN on MNIST (FC, blog architecture), classifier-scored"
EXPERIMENT = Experiment(
    "gan", DESCRIPTION, GANConfig, run, evaluate_trained, load_models, sample, PLOTS
)
