"""``bn-mlp``: an MLP with and without batch normalization on MNIST (Ioffe & Szegedy 2015, Fig. 1).

The paper trains a network of 3 fully connected hidden layers of 100 sigmoid units on MNIST with
mini-batches of 60 for 50,000 steps, with and without BN, and shows (a) test accuracy against
training steps, and (b, c) how the distribution of the input to one sigmoid of the last hidden
layer evolves, as its 15th, 50th and 85th percentiles: without BN it drifts, with BN it is stable.

Both variants start from the same seed and see the same batches in the same order; only the
normalization (and the learning rate, documented below) differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from classicnets.experiments.common import (
    Experiment,
    Job,
    TrainingOptions,
    image_data_of,
    summarize,
    train_settings,
)
from classicnets.models.mlp import ACTIVATIONS, MLP
from classicnets.report.curves import Curve
from classicnets.train.classifier import train_classifier
from classicnets.train.run import RunDir

__all__ = ["BNMLPConfig", "EXPERIMENT", "build_model", "run"]

VARIANTS = ("plain", "bn")
PERCENTILES = (15, 50, 85)


@dataclass
class BNMLPConfig(TrainingOptions):
    """Configuration of ``bn-mlp``; defaults follow Ioffe & Szegedy 2015, Sec. 4.1.

    The training switches shared by all experiments (schedule, clipping, precision, compile,
    sync BN, ...) come from ``TrainingOptions``."""

    dataset: str = "mnist"  # "mnist" or "fashion-mnist"
    hidden_sizes: tuple[int, ...] = (100, 100, 100)  # 3 hidden layers of 100 units
    activation: str = "sigmoid"
    steps: int = 50_000  # optimization steps per variant
    batch_size: int = 60
    optimizer: str = "sgd"  # plain SGD, as in the paper
    momentum: float = 0.0
    # Learning rates: the best of {0.2, 0.5, 1.0, 2.0} for each variant on 5,000-step runs
    # (docs/bn-mlp.md has the sweep). BN allows the higher rate (Ioffe & Szegedy 2015, Sec. 3.3).
    lr_plain: float = 1.0
    lr_bn: float = 2.0
    # "Small random Gaussian values" (Sec. 4.1): N(0, 0.1^2) weights, zero biases.
    # None uses PyTorch's default nn.Linear initialization instead.
    init_std: float | None = 0.1
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    variants: tuple[str, ...] = VARIANTS  # any of "plain", "bn"
    watch_unit: int = 0  # which sigmoid of the last hidden layer panels (b, c) follow
    eval_every: int = 500  # test accuracy and percentiles every this many steps
    log_every: int = 100
    checkpoint_every: int = 5000

    @classmethod
    def quick(cls) -> BNMLPConfig:
        """A few hundred steps: seconds on a 2-core CPU, for tests and the demo."""
        return cls(steps=300, eval_every=100, log_every=50, checkpoint_every=100)

    VARIANTS: ClassVar[tuple[str, ...]] = VARIANTS  # what config.check_choices admits
    FIELD_CHOICES: ClassVar[dict[str, tuple]] = {"activation": tuple(ACTIVATIONS)}

    def validate(self) -> None:
        if not self.hidden_sizes:
            raise ValueError("hidden_sizes needs at least one hidden layer")
        if not 0 <= self.watch_unit < self.hidden_sizes[-1]:
            raise ValueError(
                f"watch_unit={self.watch_unit} is not a unit of the last hidden layer "
                f"(size {self.hidden_sizes[-1]})"
            )


def build_model(config: BNMLPConfig, variant: str) -> MLP:
    from functools import partial

    from classicnets.nn import BatchNorm

    norm = None
    if variant == "bn":
        norm = partial(BatchNorm, eps=config.bn_eps, momentum=config.bn_momentum)
    return MLP(
        in_features=28 * 28,
        hidden_sizes=config.hidden_sizes,
        num_classes=10,
        activation=config.activation,
        norm=norm,
        init_std=config.init_std,
    )


def _settings(config: BNMLPConfig, variant: str):
    lr = config.lr_bn if variant == "bn" else config.lr_plain
    # Plain SGD as in the paper (no Nesterov); the evaluation batch has no effect on results.
    return train_settings(config, lr=lr, nesterov=False, eval_batch_size=2000)


def sigmoid_input_hook(probe: torch.Tensor, unit: int):
    """An eval hook recording the 15th/50th/85th percentiles of the input to sigmoid ``unit`` of
    the last hidden layer over the ``probe`` inputs (the paper's panels b and c)."""
    q = torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64, device=probe.device)

    def hook(model: MLP) -> dict[str, float]:
        captured: dict[str, torch.Tensor] = {}
        act = model.blocks[-1].act

        def grab(_module, inputs):
            captured["z"] = inputs[0][:, unit]

        handle = act.register_forward_pre_hook(grab)
        try:
            model(probe)
        finally:
            handle.remove()
        values = torch.quantile(captured["z"].double(), q).tolist()
        return {f"sigmoid_input_p{p}": v for p, v in zip(PERCENTILES, values)}

    return hook


def run(config: BNMLPConfig, job: Job) -> dict:
    """Train the variants and write the plots; return the summary (``run_lifecycle`` writes it
    and the report)."""
    data = image_data_of(config, job.device)
    hooks = [sigmoid_input_hook(data.test_x, config.watch_unit)]

    def train(variant: str) -> dict:
        model, settings = build_model(config, variant).to(job.device), _settings(config, variant)
        result = train_classifier(
            model, data, settings, job.run_dir, variant, eval_hooks=hooks, resume=job.resume
        )
        return {**result, "lr": settings.lr}

    results = job.train_variants(config.variants, config.seed, train)
    summary = _summary(config, job.run_dir, results, job.device)
    write_plots(job.run_dir)
    return summary


def _summary(config, run_dir, results, device) -> dict[str, Any]:
    notes = [
        f"{len(config.hidden_sizes)} hidden layers of {','.join(map(str, config.hidden_sizes))} "
        f"{config.activation} units, batch {config.batch_size}, {config.optimizer.upper()}, "
        f"device {device}.",
    ]
    ahead = bn_ahead_fraction(run_dir)
    if ahead is not None:
        notes.append(
            f"BN variant ahead of the plain one at {ahead:.0%} of the test evaluations "
            f"(after step 0)."
        )
    fields = {"test_accuracy": "test_accuracy", "test_loss": "test_loss", "steps": "step",
              "lr": "lr", "train_time_s": "train_time_s"}  # fmt: skip
    title = "bn-mlp: MLP with and without batch normalization (Ioffe & Szegedy 2015, Fig. 1)"
    return summarize(title, config.variants, results, fields, notes)


def bn_ahead_fraction(run_dir: RunDir) -> float | None:
    """Fraction of common evaluation steps (> 0) at which BN's test accuracy beats plain's."""
    curves = run_dir.records("test")
    if "bn" not in curves or "plain" not in curves:
        return None
    plain = {r["step"]: r["accuracy"] for r in curves["plain"] if r["step"] > 0}
    bn = {r["step"]: r["accuracy"] for r in curves["bn"] if r["step"] > 0}
    common = sorted(set(plain) & set(bn))
    if not common:
        return None
    return sum(bn[s] > plain[s] for s in common) / len(common)


NAMES = {"plain": "without BN", "bn": "with BN"}
PLOTS = (
    Curve("test_accuracy.png", "test", "accuracy", "test accuracy", "(a) test accuracy",
          ylim=(0.85, 1.0)),
    Curve("train_loss.png", "train", "loss", "training cross-entropy", "training loss",
          logy=True),
)  # fmt: skip


def write_plots(run_dir: RunDir) -> list:
    """Panels (b, c): the sigmoid-input percentiles against steps (panel (a), test accuracy, and
    the training loss are ``PLOTS``, drawn by ``run_lifecycle``)."""
    from classicnets.report import Panel, multi_panel_plot

    curves = run_dir.records("test")
    if not curves or not run_dir.writer:
        return []
    panels = []
    for letter, v in zip("bc", [v for v in VARIANTS if v in curves]):
        rs = curves[v]
        panels.append(
            Panel(
                title=f"({letter}) {NAMES[v]}",
                xlabel="training step",
                ylabel="input to a last-layer sigmoid",
                x=[r["step"] for r in rs],
                bands={
                    "15th / 50th / 85th percentile": tuple(
                        [r[f"sigmoid_input_p{p}"] for r in rs] for p in PERCENTILES
                    )
                },
            )
        )
    return [multi_panel_plot(run_dir.plots / "sigmoid_input_percentiles.png", panels, sharey=True)]


DESCRIPTION = "MLP with vs without BatchNorm on MNIST (Ioffe & Szegedy 2015, Figure 1)"
EXPERIMENT = Experiment.of_classifiers(
    "bn-mlp", DESCRIPTION, BNMLPConfig, run, build_model, PLOTS, NAMES
)
