"""``resnet-vs-mlp``: a ResNet of bottleneck blocks against a plain MLP on MNIST.

Both models see the same data in the same order, with the same augmentation, batch size,
number of steps, optimizer and schedule; only the architecture (and its learning rate) differs.
The report has both test-accuracy curves on one plot and a confusion matrix for each model
(He et al. 2016 for the bottleneck block; the confusion matrix "gives a good summary of what
mistakes the network is making").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from classicnets.data import CLASS_NAMES
from classicnets.experiments.common import (
    Experiment,
    Job,
    TrainingOptions,
    image_data_of,
    summarize,
    train_settings,
)
from classicnets.metrics.evaluation import evaluate_classifier
from classicnets.models import MLP, create_model, model_entry
from classicnets.report.curves import Curve
from classicnets.train.classifier import train_classifier
from classicnets.train.run import RunDir

__all__ = ["EXPERIMENT", "ResNetVsMLPConfig", "build_model", "run"]

VARIANTS = ("resnet", "mlp")


@dataclass
class ResNetVsMLPConfig(TrainingOptions):
    """Configuration of ``resnet-vs-mlp``; shared training switches from ``TrainingOptions``."""

    dataset: str = "mnist"  # "mnist" or "fashion-mnist"
    # A registered ResNet: resnet-medium (bottleneck blocks, two per stage) reaches 99.5% on
    # MNIST in this budget; resnet-small (one per stage) stops at 99.4% (docs/benchmarks.md).
    resnet_model: str = "resnet-medium"
    resnet_norm: str = "batchnorm"  # "batchnorm" or "none"
    mlp_hidden_sizes: tuple[int, ...] = (1024, 1024)  # the plain DNN: ReLU, no normalization
    mlp_norm: str = "none"
    variants: tuple[str, ...] = VARIANTS
    epochs: int = 12  # the same budget for both models
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    lr_resnet: float = 0.1
    lr_mlp: float = 0.05
    weight_decay: float = 5e-4  # not on BN parameters and biases
    schedule: str = "cosine"
    warmup_steps: int = 200
    max_shift: int = 2  # random translation by up to this many pixels (0: no augmentation)
    channels_last: bool = True  # faster convolutions on CPU and GPU
    eval_every: int = 500
    log_every: int = 100
    checkpoint_every: int = 2000

    @classmethod
    def quick(cls) -> ResNetVsMLPConfig:
        """Seconds on a 2-core CPU: a tiny ResNet and MLP on 2,560 images for 40 steps."""
        return cls(
            epochs=2,
            batch_size=64,
            train_limit=1280,
            warmup_steps=5,
            eval_every=20,
            log_every=10,
            checkpoint_every=20,
            mlp_hidden_sizes=(128,),
            resnet_model="resnet-small",
            quick_widths=(4, 8, 8),
        )

    # Overrides the ResNet's stage widths (None: the registered model's own).
    quick_widths: tuple[int, ...] | None = None

    VARIANTS: ClassVar[tuple[str, ...]] = VARIANTS  # what config.check_choices admits

    def validate(self) -> None:
        try:
            entry = model_entry(self.resnet_model)
        except KeyError as exc:
            raise ValueError(str(exc).strip("'\"")) from None
        if not entry.name.startswith("resnet"):
            raise ValueError(f"resnet_model must name a ResNet, got {self.resnet_model!r}")


def build_model(config: ResNetVsMLPConfig, variant: str) -> torch.nn.Module:
    if variant == "resnet":
        kwargs: dict[str, Any] = {"norm_layer": config.resnet_norm}
        if config.quick_widths is not None:
            kwargs["widths"] = config.quick_widths
        return create_model(config.resnet_model, **kwargs)
    return MLP(
        in_features=28 * 28,
        hidden_sizes=config.mlp_hidden_sizes,
        activation="relu",
        norm=config.mlp_norm,
    )


def _steps(config: ResNetVsMLPConfig, train_size: int) -> int:
    return config.epochs * (train_size // config.batch_size)


def run(config: ResNetVsMLPConfig, job: Job) -> dict:
    """Train both models, write confusion matrices and plots; return the summary."""
    from classicnets.data.augment import random_shift

    data = image_data_of(config, job.device)
    steps = _steps(config, len(data.train_x))

    def augment(x, step):
        return random_shift(x, step, config.max_shift, config.seed)

    def train(variant: str) -> dict:
        model = build_model(config, variant).to(job.device)
        lr = config.lr_resnet if variant == "resnet" else config.lr_mlp
        settings = train_settings(config, steps=steps, lr=lr, eval_batch_size=2000)
        shift = augment if config.max_shift else None
        result = train_classifier(model, data, settings, job.run_dir, variant,
                                  resume=job.resume, augment=shift)  # fmt: skip
        result.update(lr=lr, parameters=sum(p.numel() for p in model.parameters()))
        if result["complete"]:
            evaluation = evaluate_classifier(
                model, data.test_x, data.test_y, CLASS_NAMES[config.dataset]
            )
            result["macro_f1"] = evaluation["macro_f1"]
            evaluation_plots(job.run_dir, variant, evaluation)
        return result

    results = job.train_variants(config.variants, config.seed, train)
    return _summary(config, results, job.device, steps)


def evaluation_plots(run_dir: RunDir, variant: str, evaluation: dict) -> None:
    from classicnets.metrics import plot_confusion_matrices

    if run_dir.writer:
        plot_confusion_matrices(
            run_dir.plots / f"confusion_{variant}.png",
            evaluation["confusion_matrix"],
            evaluation["class_names"],
            title=f"{variant}: test accuracy {100 * evaluation['accuracy']:.2f}%",
        )


def _summary(config, results, device, steps) -> dict[str, Any]:
    fields = {"test_accuracy": "test_accuracy", "test_loss": "test_loss", "macro_f1": "macro_f1",
              "steps": "step", "lr": "lr", "parameters": "parameters",
              "train_time_s": "train_time_s"}  # fmt: skip
    notes = [
        f"{config.epochs} epochs ({steps} steps of {config.batch_size}) for each model, "
        f"{config.optimizer.upper()} with momentum {config.momentum}, {config.schedule} "
        f"schedule, weight decay {config.weight_decay}, shifts up to {config.max_shift} px, "
        f"device {device}.",
    ]
    title = f"resnet-vs-mlp on {config.dataset}: {config.resnet_model} against a plain MLP"
    return summarize(title, config.variants, results, fields, notes)


PLOTS = (
    Curve("test_accuracy.png", "test", "accuracy", "test accuracy", "test accuracy",
          ylim=(0.8, 1.0)),
)  # fmt: skip


DESCRIPTION = "ResNet (bottleneck blocks) against a plain MLP on MNIST, confusion matrices"
EXPERIMENT = Experiment.of_classifiers(
    "resnet-vs-mlp", DESCRIPTION, ResNetVsMLPConfig, run, build_model, PLOTS
)
