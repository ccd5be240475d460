"""GANs and conditional GANs: the two labelled steps and their losses (``fit`` drives them).

Each iteration has the two labelled steps of pytorch/examples' dcgan:

    (1) update D: minimize -[log D(x) + log(1 - D(G(z)))]         (Goodfellow et al. 2014, Eq. 1)
    (2) update G: minimize -log D(G(z))     the non-saturating loss (Goodfellow et al. 2014, Sec. 3)

Each network has its own Adam optimizer over its own parameters, chosen by name
(``select_parameters(model, "discriminator")`` / ``"generator"``), so step (1) cannot move G and
step (2) cannot move D. Both optimizers, the weights, the RNG states and the data position are in
every checkpoint (``TrainState``), so a resumed run continues bit for bit on CPU. Under
``torchrun`` each process takes its slice of the global batch and of its noise, and both steps
average their gradients over the processes (``fit.optimize``).

Training warns when the discriminator wins outright or the samples collapse
(``train.gan_monitor``); the fixed-noise grids written during training are ``report.grid``'s.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classicnets.data.batching import ShuffledBatches
from classicnets.report.grid import GridSpec, generate_grid, save_grid
from classicnets.train.fit import Cadence, Task, fit, optimize
from classicnets.train.gan_monitor import (
    DiversityProbe,
    GANMonitor,
    GANTrainingWarning,
    loss_floor,
)
from classicnets.train.params import select_parameters
from classicnets.train.precision import Precision
from classicnets.train.run import RunDir

__all__ = [
    "GANSettings",
    "GANTask",
    "STEP_KEYS",
    "discriminator_loss",
    "discriminator_step",
    "gan_train_step",
    "generator_loss",
    "generator_step",
    "loss_floor",
    "make_gan_optimizers",
    "train_gan",
]

STEP_KEYS = ("d_loss", "g_loss", "d_real", "d_fake")  # what one training step returns


# --------------------------------------------------------------------------------------------
# Losses and the two labelled steps
# --------------------------------------------------------------------------------------------


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, real_label: float = 1.0) -> Tensor:
    """``-mean log D(x) - mean log(1 - D(G(z)))`` from logits (Goodfellow et al. 2014, Eq. 1).

    ``log sigmoid(l) = -softplus(-l)`` and ``log(1 - sigmoid(l)) = -softplus(l)``: finite for any
    logit, where the log of a saturated probability is not. The two terms are summed, as in
    pytorch/examples' dcgan (``errD = errD_real + errD_fake``).

    With ``real_label`` t < 1 (one-sided label smoothing, Salimans et al. 2016, Sec. 3.4) the real
    term is the cross-entropy against target t, ``-t log D(x) - (1 - t) log(1 - D(x))``: D is not
    rewarded for ever more confident "real" verdicts, which keeps it from overpowering G. Its
    minimum is then the binary entropy ``H(t)`` (``loss_floor``), not 0. Fakes keep target 0.

    Args:
        real_logits: D's logits for real images, ``(N,)``.
        fake_logits: D's logits for generated images, ``(M,)``.
        real_label: the target of real images (1.0: no smoothing).
    """
    real_term = F.softplus(-real_logits)
    if real_label != 1.0:
        real_term = real_label * real_term + (1.0 - real_label) * F.softplus(real_logits)
    return real_term.mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: Tensor) -> Tensor:
    """The non-saturating generator loss ``-mean log D(G(z))`` from logits.

    Goodfellow et al. 2014, Sec. 3: early in training D rejects samples with high confidence and
    ``log(1 - D(G(z)))`` saturates (its gradient vanishes); maximizing ``log D(G(z))`` instead has
    the same fixed point and strong gradients early on.

    Args:
        fake_logits: D's logits for generated images, ``(N,)``.
    """
    return F.softplus(-fake_logits).mean()


def discriminator_step(
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    real: Tensor,
    fake: Tensor,
    labels: Tensor | None = None,
    precision: Precision | None = None,
    real_label: float = 1.0,
) -> dict[str, Tensor]:
    """(1) update D: one optimizer step on ``discriminator_loss``.

    Args:
        discriminator: D, in training mode.
        optimizer: D's optimizer (over D's parameters only).
        real: a batch of real images.
        fake: generated images; detached here, so no gradient reaches G.
        labels: class labels of both batches (conditional GAN), else None.
        precision: autocast and gradient scaling (None: plain float32).
        real_label: the target of real images (one-sided label smoothing below 1).

    Returns:
        ``{"d_loss", "d_real", "d_fake"}``: the loss and the mean D(x) and D(G(z)), as detached
        0-d tensors (no device synchronization).
    """
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        real_logits = discriminator(real, labels).float()  # (N,)
        fake_logits = discriminator(fake.detach(), labels).float()  # (N,)
    loss = discriminator_loss(real_logits, fake_logits, real_label)
    optimize(loss, optimizer, precision)
    return {
        "d_loss": loss.detach(),
        "d_real": torch.sigmoid(real_logits.detach()).mean(),
        "d_fake": torch.sigmoid(fake_logits.detach()).mean(),
    }


def generator_step(
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    fake: Tensor,
    labels: Tensor | None = None,
    precision: Precision | None = None,
) -> dict[str, Tensor]:
    """(2) update G: one optimizer step on the non-saturating ``generator_loss``.

    D's parameters are excluded from autograd for this step (``requires_grad`` off, then
    restored), so the backward pass computes only G's gradients and D's ``.grad`` is untouched.

    Args:
        discriminator: D (its current, just-updated weights judge the samples).
        optimizer: G's optimizer (over G's parameters only).
        fake: generated images, still attached to G's graph.
        labels: class labels (conditional GAN), else None.
        precision: autocast and gradient scaling (None: plain float32).

    Returns:
        ``{"g_loss"}`` as a detached 0-d tensor.
    """
    flags = [p.requires_grad for p in discriminator.parameters()]
    discriminator.requires_grad_(False)
    try:
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            fake_logits = discriminator(fake, labels).float()  # (N,)
        loss = generator_loss(fake_logits)
        optimize(loss, optimizer, precision)
    finally:
        for p, flag in zip(discriminator.parameters(), flags):
            p.requires_grad_(flag)
    return {"g_loss": loss.detach()}


def gan_train_step(
    model: nn.Module,
    discriminator_optimizer: torch.optim.Optimizer,
    generator_optimizer: torch.optim.Optimizer,
    real: Tensor,
    z: Tensor,
    labels: Tensor | None = None,
    precision: Precision | None = None,
    real_label: float = 1.0,
) -> dict[str, Tensor]:
    """One GAN iteration: (1) update D, then (2) update G, on the same generated batch.

    Args:
        model: a ``models.gan.GAN`` (``model.generator``, ``model.discriminator``).
        discriminator_optimizer, generator_optimizer: over D's, G's parameters only.
        real, z: real images ``(N, 1, 28, 28)`` and latent noise ``(N, latent_size)``.
        labels: the real images' labels ``(N,)``, used for the generated batch too (conditional
            GAN), else None.
        precision, real_label: as for ``discriminator_step``.

    Returns:
        ``{"d_loss", "g_loss", "d_real", "d_fake"}`` as detached 0-d tensors: the two losses and
        the mean D(x) and D(G(z)) seen in step (1).
    """
    model.train()
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        fake = model.generator(z, labels)  # (N, 1, 28, 28), graph kept for step (2)
    fake = fake.float()
    # (1) update D: maximize log D(x) + log(1 - D(G(z)))
    out = discriminator_step(
        model.discriminator, discriminator_optimizer, real, fake, labels, precision, real_label
    )
    # (2) update G: maximize log D(G(z))
    out.update(generator_step(model.discriminator, generator_optimizer, fake, labels, precision))
    if precision is not None:
        precision.update()  # once per iteration, after both optimizers' steps
    return {k: out[k] for k in STEP_KEYS}


def make_gan_optimizers(
    model: nn.Module,
    lr_discriminator: float = 2e-4,
    lr_generator: float = 2e-4,
    betas: tuple[float, float] = (0.5, 0.999),
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for D and Adam for G, each over its own network's parameters selected by name.

    ``beta1 = 0.5`` rather than Adam's 0.9: Radford et al. 2015, Sec. 4, found the higher momentum
    made GAN training oscillate and unstable; 0.5 is what pytorch/examples' dcgan uses too.

    Returns:
        ``(discriminator_optimizer, generator_optimizer)``.
    """
    d_params = [p for _, p in select_parameters(model, "discriminator")]
    g_params = [p for _, p in select_parameters(model, "generator")]
    return (
        torch.optim.Adam(d_params, lr=lr_discriminator, betas=betas),
        torch.optim.Adam(g_params, lr=lr_generator, betas=betas),
    )


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class GANSettings(Cadence):
    """How a GAN is trained: a ``fit.Cadence`` (``steps``: iterations, each one D step and one
    G step; ``eval_every``: the eval hook's, 0 for the end only) and the fields below; keyword
    arguments only.

    Attributes:
        batch_size: real images per step (and as many generated ones).
        lr_discriminator, lr_generator: Adam learning rates.
        beta1, beta2: Adam's betas for both networks (0.5: Radford et al. 2015, Sec. 4).
        real_label: D's target for real images (one-sided label smoothing below 1).
        precision: "fp32", "bf16" or "fp16" (autocast; fp16 with a gradient scaler).
        log_every: log the interval means of ``STEP_KEYS`` and the diversity ratio, and run the
            monitor, every this many steps.
        grid_every: save the fixed-noise grid every this many steps (and at steps 0 and last).
        grid_columns: columns of the grid (per digit for a conditional GAN).
        grid_seed: base noise seed of the grid (``GridSpec``).
        seed: seed of the data order (the caller seeds initialization and the noise stream).
        monitor_per_class: generated and real images per class in the diversity batch
            (unconditional: ten times this many in all).
        win_fake_below, win_loss_below, win_window, collapse_fraction, collapse_window,
            monitor_after: the ``GANMonitor`` thresholds (``monitor_after``: ``start_step``).
    """

    batch_size: int = 64
    lr_discriminator: float = 2e-4
    lr_generator: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    real_label: float = 1.0
    precision: str = "fp32"
    grid_every: int = 1000
    grid_columns: int = 10
    grid_seed: int = 0
    checkpoint_every: int = 2000  # Cadence's, with its own default
    seed: int = 0
    monitor_per_class: int = 10
    win_fake_below: float = 0.01
    win_loss_below: float = 0.1
    win_window: int = 3
    collapse_fraction: float = 0.25
    collapse_window: int = 3
    monitor_after: int = 500


EvalHook = Callable[[nn.Module, int], dict[str, Any]]  # (generator, step) -> metrics


class GANTask(Task):
    """One iteration of the two labelled steps; the interval's means, the diversity ratio and
    the monitor's warnings; the fixed-noise grid and the eval hook as evaluations."""

    values = STEP_KEYS
    watch = {"d_loss": "d_loss", "g_loss": "g_loss"}
    losses = ("d_loss", "g_loss")

    def __init__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        settings: GANSettings,
        grid_dir: Path | None,
        variant: str,
        eval_hook: EvalHook | None,
    ) -> None:
        super().__init__(images.device)
        self.model, self.images, self.labels, self.settings = model, images, labels, settings
        self.grid_dir, self.variant, self.eval_hook = grid_dir, variant, eval_hook
        self.precision = Precision(settings.precision, str(self.device))
        rates, betas = (
            (settings.lr_discriminator, settings.lr_generator),
            (settings.beta1, settings.beta2),
        )
        self.opt_d, self.opt_g = make_gan_optimizers(model, *rates, betas)
        self.batches = ShuffledBatches(len(images), settings.batch_size, settings.seed,
                                       device=self.device)  # fmt: skip
        self.global_batch = settings.batch_size
        self.modules = {"model": model}
        self.optimizers = {"discriminator": self.opt_d, "generator": self.opt_g}
        self.extra = {"last": {}, "last_eval": {}, "warnings": []}
        self.cadence = settings
        self.monitor = GANMonitor.of(settings)
        # One row per digit (conditional), else ten rows.
        self.spec = GridSpec(settings.grid_columns, settings.grid_seed, model.latent_size,
                             model.num_classes, rows=10)  # fmt: skip
        self.probe = DiversityProbe(
            model, images, labels, settings.monitor_per_class, settings.grid_seed + 1_000_003
        )

    def train_step(self, step: int) -> dict[str, Tensor]:
        index = next(self.batches)
        # Every process draws the global batch's noise, then keeps its slice: the same numbers
        # as one process.
        z = torch.randn(len(index), self.model.latent_size, device=self.device)  # (B, latent)
        index, z = index[self.local], z[self.local]
        real = self.images[index]  # (B, 1, 28, 28)
        y = self.labels[index] if self.model.conditional else None
        label = self.settings.real_label
        return gan_train_step(self.model, self.opt_d, self.opt_g, real, z, y, self.precision, label)

    def train_records(self, window: dict[str, Tensor], step: int) -> list[dict[str, Any]]:
        values = torch.stack([window[k] for k in STEP_KEYS], dim=1)  # (n, 4)
        means = values.double().mean(dim=0).tolist()
        ratio = self.probe.ratio(self.model.generator)
        extra = self.state.extra
        extra["last"] = last = {**dict(zip(STEP_KEYS, means)), "diversity_ratio": ratio}
        records = [{"split": "train", **last}]
        for kind, message in self.monitor.observe(
            step, last["d_fake"], last["d_loss"], last["diversity_ratio"]
        ):
            text = f"{self.variant}, step {step}: {message}"
            extra["warnings"].append(text)
            records.append({"split": "warning", "warning": kind, "message": message})
            warnings.warn(text, GANTrainingWarning, stacklevel=2)
        return records

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        digits = {"d_loss": 3, "g_loss": 3, "d_real": 2, "d_fake": 2}
        return {k: f"{record[k]:.{d}f}" for k, d in digits.items()}

    def _grid_due(self, step: int) -> bool:
        return step in (0, self.settings.steps) or step % self.settings.grid_every == 0

    def _hook_due(self, step: int) -> bool:
        every = self.settings.eval_every
        return step == self.settings.steps or bool(every and step % every == 0)

    def eval_due(self, step: int) -> bool:
        return self._grid_due(step) or self._hook_due(step)

    def evaluate(self, step: int) -> list[dict[str, Any]]:
        generator = self.model.generator
        if self._grid_due(step) and self.grid_dir is not None:
            grid = generate_grid(generator, self.spec, self.device)
            info = {"variant": self.variant, "step": step}
            save_grid(self.grid_dir / f"{self.variant}_step{step:08d}.png", grid, self.spec, info)
        if self.eval_hook is None or not self._hook_due(step):
            return []
        generator.eval()
        with torch.no_grad():
            metrics = self.eval_hook(generator, step)
        generator.train()
        self.state.extra["last_eval"] = dict(metrics)
        return [{"split": "eval", **metrics}]

    def after_resume(self, resumed: bool) -> dict[str, Any] | None:
        if resumed:
            self.monitor.load_state_dict(self.state.extra["monitor"])
        return None

    def before_checkpoint(self) -> None:
        self.state.extra["monitor"] = self.monitor.state_dict()

    def result(self) -> dict[str, Any]:
        extra = self.state.extra
        out = {**super().result(), **extra["last"], **extra["last_eval"]}
        out["warnings"] = list(extra["warnings"])
        if self.grid_dir is not None:
            grids = sorted(self.grid_dir.glob(f"{self.variant}_step*.png"))
            out["grid"] = str(grids[-1]) if grids else None
        return out


def train_gan(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    settings: GANSettings,
    run: RunDir | None = None,
    variant: str = "gan",
    resume: bool = False,
    eval_hook: EvalHook | None = None,
) -> dict[str, Any]:
    """Train ``model`` (a ``models.gan.GAN``) on ``images``.

    Every ``log_every`` steps it logs ``{"variant", "step", "split": "train", "d_loss",
    "g_loss", "d_real", "d_fake", "diversity_ratio"}`` (interval means), every ``grid_every``
    steps it writes ``plots/grids/{variant}_step{step:08d}.png`` and its ``.json``, at
    ``eval_every`` the eval hook's metrics (``"split": "eval"``), and each warning of
    ``GANMonitor`` once (``"split": "warning"``).

    Args:
        model: the GAN, on the images' device, initialized from the seed.
        images: training images ``(N, 1, 28, 28)`` in [0, 1].
        labels: their classes ``(N,)`` (used by a conditional GAN and by the diversity batch).
        settings: steps, optimizers, intervals, monitor thresholds.
        run: the run folder (None: no files).
        variant: this model's name in the run (checkpoint prefix, ``variant`` of its records).
        resume: continue from the newest valid checkpoint of ``variant`` if there is one.
        eval_hook: ``hook(generator, step) -> dict`` (generator in eval mode); it must not draw
            from torch's global random generator, or resume would not be exact.

    Returns:
        ``{"step", "complete", "train_time_s", "warnings", "grid"}`` plus the last interval's
        ``STEP_KEYS`` and ``diversity_ratio`` and the last eval metrics.

    Raises:
        NonFiniteLossError, StopRequested: as ``fit``.
    """
    grid_dir = run.plots / "grids" if run is not None and run.writer else None
    task = GANTask(model, images, labels, settings, grid_dir, variant, eval_hook)
    return fit(task, run, variant, resume)
