"""Training loop for GANs and conditional GANs, with exact resume and fixed-noise grids.

Each iteration has the two labelled steps of pytorch/examples' dcgan:

    (1) update D: minimize -[log D(x) + log(1 - D(G(z)))]         (Goodfellow et al. 2014, Eq. 1)
    (2) update G: minimize -log D(G(z))     the non-saturating loss (Goodfellow et al. 2014, Sec. 3)

Each network has its own Adam optimizer over its own parameters, chosen by name
(``select_parameters(model, "discriminator")`` / ``"generator"``), so step (1) cannot move G and
step (2) cannot move D. Both optimizers, the weights, the RNG states and the data position are in
every checkpoint (``TrainState``), so a resumed run continues bit for bit on CPU.

Also here:

- **Fixed-noise grids** (``GridSpec``, ``generate_grid``, ``save_grid``, ``regenerate_cell``): one
  row per digit for a conditional GAN. Every cell's noise comes from its own seed, and the
  ``cell -> (noise seed, label)`` mapping is saved in a JSON file beside each PNG, so any cell of
  any grid can be generated again, alone, bit for bit.
- **Warnings** (``GANMonitor``) when the discriminator wins outright or the samples collapse; the
  criteria are stated precisely in ``GANMonitor``'s docstring.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classicnets.data.batching import ShuffledBatches
from classicnets.files import atomic_write_bytes, atomic_write_text
from classicnets.train.distributed import get_context
from classicnets.train.faults import SignalGuard
from classicnets.train.loop import (
    FiniteCheck,
    TrainClock,
    end_step,
    finish_step,
    resume_variant,
    save_checkpoint,
)
from classicnets.train.params import select_parameters
from classicnets.train.precision import Precision
from classicnets.train.run import RunDir
from classicnets.train.state import TrainState

__all__ = [
    "GANMonitor",
    "GANSettings",
    "GANTrainingWarning",
    "GridSpec",
    "STEP_KEYS",
    "cell_noise",
    "discriminator_loss",
    "discriminator_step",
    "discriminator_wins",
    "diversity",
    "gan_train_step",
    "generate_cell",
    "generate_grid",
    "generator_loss",
    "generator_step",
    "grid_image",
    "loss_floor",
    "make_gan_optimizers",
    "mean_pairwise_distance",
    "read_grid",
    "read_grid_cell",
    "regenerate_cell",
    "save_grid",
    "train_gan",
]

STEP_KEYS = ("d_loss", "g_loss", "d_real", "d_fake")  # what one training step returns


class GANTrainingWarning(UserWarning):
    """The discriminator wins outright or the generator's samples collapse."""


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


def loss_floor(real_label: float) -> float:
    """The smallest possible ``discriminator_loss``: the binary entropy of ``real_label`` (nats)."""
    t = real_label
    return 0.0 if t in (0.0, 1.0) else -(t * math.log(t) + (1 - t) * math.log(1 - t))


def generator_loss(fake_logits: Tensor) -> Tensor:
    """The non-saturating generator loss ``-mean log D(G(z))`` from logits.

    Goodfellow et al. 2014, Sec. 3: early in training D rejects samples with high confidence and
    ``log(1 - D(G(z)))`` saturates (its gradient vanishes); maximizing ``log D(G(z))`` instead has
    the same fixed point and strong gradients early on.

    Args:
        fake_logits: D's logits for generated images, ``(N,)``.
    """
    return F.softplus(-fake_logits).mean()


def _backward_and_step(loss: Tensor, optimizer: torch.optim.Optimizer, precision) -> None:
    optimizer.zero_grad(set_to_none=True)
    if precision is None:
        loss.backward()
        optimizer.step()
    else:
        precision.backward(loss)
        precision.step(optimizer)


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
    _backward_and_step(loss, optimizer, precision)
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
        _backward_and_step(loss, optimizer, precision)
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
        discriminator_optimizer: over D's parameters only.
        generator_optimizer: over G's parameters only.
        real: real images ``(N, 1, 28, 28)``.
        z: latent noise ``(N, latent_size)``.
        labels: the real images' labels ``(N,)``, used for the generated batch too (conditional
            GAN), else None.
        precision: autocast and gradient scaling (None: plain float32).
        real_label: D's target for real images (``discriminator_loss``).

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
# Warnings: the discriminator wins outright, the samples collapse
# --------------------------------------------------------------------------------------------


def discriminator_wins(
    d_fake: float,
    d_loss: float,
    fake_below: float = 0.01,
    loss_below: float = 0.1,
    floor: float = 0.0,
) -> bool:
    """Whether one logging interval looks like an outright win of D.

    True when the interval's mean D(G(z)) is below ``fake_below`` (D calls almost every sample
    fake) and its mean D loss is within ``loss_below`` nats of its minimum ``floor`` (0, or
    ``loss_floor(real_label)`` with label smoothing): D is also as sure of the real images as it
    can be (without smoothing, with D(G(z)) < 0.01 the fake term is about 0.01, so the real
    term ``-log D(x)`` is under about 0.09: D(x) above about 0.91 on average). G then gets almost
    no useful signal.
    """
    return d_fake < fake_below and d_loss < floor + loss_below


def mean_pairwise_distance(images: Tensor) -> float:
    """Mean Euclidean distance between all pairs of the flattened images (float64)."""
    flat = images.detach().reshape(len(images), -1).double()  # (N, D)
    if len(flat) < 2:
        raise ValueError("mean_pairwise_distance needs at least two images")
    return torch.pdist(flat).mean().item()


def diversity(images: Tensor, labels: Tensor | None = None) -> float:
    """Mean pairwise distance of ``images``; with ``labels``, the mean over classes of the
    within-class mean pairwise distance (classes with fewer than two images are skipped).

    Within-class distances are what matter for a conditional generator: one that draws a single
    image per digit has ten distinct outputs, so its all-pairs distance looks healthy.
    """
    if labels is None:
        return mean_pairwise_distance(images)
    per_class = [
        mean_pairwise_distance(images[labels == k])
        for k in torch.unique(labels).tolist()
        if int((labels == k).sum()) >= 2
    ]
    if not per_class:
        raise ValueError("diversity: no class has two images")
    return float(np.mean(per_class))


@dataclass
class GANMonitor:
    """Watches the logged intervals and warns, once per kind, about two failures.

    Definitions (an "interval" is one logging interval of ``log_every`` steps; its values are
    means over its steps):

    - **discriminator wins outright**: ``discriminator_wins(d_fake, d_loss, ..., loss_floor)``
      holds (mean D(G(z)) < ``win_fake_below`` and mean D loss < ``loss_floor`` +
      ``win_loss_below``) for ``win_window`` consecutive intervals ending at or after step
      ``start_step``.
    - **samples collapse**: the diversity ratio, ``diversity(G(fixed batch)) / diversity(fixed
      batch of real images)`` (within-class for a conditional GAN, see ``diversity``), is below
      ``collapse_fraction`` for ``collapse_window`` consecutive intervals ending at or after step
      ``start_step``. Real MNIST digits of one class are about 9 apart (L2 over 784 pixels in
      [0, 1]); identical samples are 0 apart; a healthy generator stays near the real value.

    ``start_step`` skips the first steps, where an untrained generator's near-constant grey
    images would count as collapsed. Intervals that fail a test reset its streak. Each kind is
    reported once per run (``fired``), as a ``GANTrainingWarning``, a record of
    ``metrics.jsonl`` and a note of the report.
    """

    win_fake_below: float = 0.01
    win_loss_below: float = 0.1
    win_window: int = 3
    collapse_fraction: float = 0.25
    collapse_window: int = 3
    start_step: int = 500
    loss_floor: float = 0.0
    win_streak: int = 0
    collapse_streak: int = 0
    fired: dict[str, int] = field(default_factory=dict)  # kind -> step it fired at

    def observe(
        self, step: int, d_fake: float, d_loss: float, diversity_ratio: float | None
    ) -> list[tuple[str, str]]:
        """Feed one interval's means; return the ``(kind, message)`` warnings that fire now."""
        if step < self.start_step:
            return []
        out = []
        wins = discriminator_wins(
            d_fake, d_loss, self.win_fake_below, self.win_loss_below, self.loss_floor
        )
        self.win_streak = self.win_streak + 1 if wins else 0
        if self.win_streak >= self.win_window and "discriminator_wins" not in self.fired:
            self.fired["discriminator_wins"] = step
            out.append(
                (
                    "discriminator_wins",
                    f"the discriminator wins outright: mean D(G(z)) < {self.win_fake_below} and "
                    f"D loss within {self.win_loss_below} of its minimum {self.loss_floor:.3g} "
                    f"for {self.win_streak} logging intervals "
                    f"(now D(G(z)) = {d_fake:.2g}, D loss = {d_loss:.3g}); the generator gets "
                    f"little gradient",
                )
            )
        collapsed = diversity_ratio is not None and diversity_ratio < self.collapse_fraction
        self.collapse_streak = self.collapse_streak + 1 if collapsed else 0
        if self.collapse_streak >= self.collapse_window and "samples_collapse" not in self.fired:
            self.fired["samples_collapse"] = step
            out.append(
                (
                    "samples_collapse",
                    f"the samples collapse: their diversity is {diversity_ratio:.2f} of real "
                    f"images' (< {self.collapse_fraction}) for {self.collapse_streak} logging "
                    f"intervals (mode collapse)",
                )
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, dict(value) if key == "fired" else value)


# --------------------------------------------------------------------------------------------
# Fixed-noise grids
# --------------------------------------------------------------------------------------------

NOISE_RECIPE = (
    "z = torch.randn(latent_size, generator=torch.Generator('cpu').manual_seed(noise_seed)); "
    "image = generator(z[None], tensor([label]) or None)[0], one cell per call (batch of 1)"
)


@dataclass
class GridSpec:
    """Which noise seed and label each cell of a sample grid gets.

    - conditional, ``label`` None: one row per class (row r is digit r); cell (r, c) has noise
      seed ``seed + c``, so each column keeps one noise vector across the digits (style fixed,
      class varies);
    - conditional, ``label`` K: one row of digit K; cell (0, c) has noise seed ``seed + c`` (the
      same image as cell (K, c) of the full grid with the same seed);
    - unconditional: cell (r, c) has noise seed ``seed + r * columns + c``; only the first
      ``count`` cells are drawn (default all).

    Args:
        columns: cells per row.
        seed: base noise seed.
        latent_size: size of z.
        num_classes: 0 for an unconditional generator.
        label: the one class to draw (conditional only), or None.
        rows: rows of an unconditional grid (conditional grids: num_classes, or 1 with a label).
        count: unconditional: how many cells to draw (default rows * columns).
    """

    columns: int
    seed: int
    latent_size: int
    num_classes: int = 0
    label: int | None = None
    rows: int = 1
    count: int | None = None

    def __post_init__(self) -> None:
        if self.columns < 1:
            raise ValueError(f"a grid needs at least one column, got {self.columns}")
        if self.num_classes:
            if self.label is not None and not 0 <= self.label < self.num_classes:
                raise ValueError(f"label {self.label} is not a class (0..{self.num_classes - 1})")
            self.rows = 1 if self.label is not None else self.num_classes
        elif self.label is not None:
            raise ValueError("an unconditional generator cannot be asked for a label")

    @classmethod
    def for_samples(
        cls, n: int, seed: int, latent_size: int, num_classes: int = 0, label: int | None = None
    ) -> GridSpec:
        """The grid ``classicnets sample`` draws: conditional, n columns (per digit, or of
        ``label``); unconditional, n cells in rows of at most 10."""
        if num_classes:
            return cls(n, seed, latent_size, num_classes, label)
        columns = min(n, 10)
        return cls(columns, seed, latent_size, 0, None, math.ceil(n / columns), n)

    def cells(self) -> list[dict[str, Any]]:
        """``[{"row", "column", "noise_seed", "label"}]`` in row-major order."""
        out = []
        for r in range(self.rows):
            for c in range(self.columns):
                if self.num_classes:
                    label = self.label if self.label is not None else r
                    out.append({"row": r, "column": c, "noise_seed": self.seed + c, "label": label})
                else:
                    index = r * self.columns + c
                    if self.count is not None and index >= self.count:
                        return out
                    noise_seed = self.seed + index
                    out.append({"row": r, "column": c, "noise_seed": noise_seed, "label": None})
        return out


def cell_noise(noise_seed: int, latent_size: int) -> Tensor:
    """The latent vector of one cell: ``(latent_size,)`` standard normal from its own seed."""
    return torch.randn(latent_size, generator=torch.Generator("cpu").manual_seed(noise_seed))


@torch.no_grad()
def generate_cell(
    generator: nn.Module, noise_seed: int, label: int | None, latent_size: int, device="cpu"
) -> Tensor:
    """One cell's image ``(C, H, W)`` on CPU, from its noise seed and label.

    The generator runs on a batch of one: a batched matrix product may sum in another order than
    a single row's, so drawing each cell alone is what makes a cell regenerated alone identical
    to the same cell drawn in a grid.
    """
    was_training = generator.training
    generator.eval()
    z = cell_noise(noise_seed, latent_size)[None].to(device)  # (1, latent)
    y = None if label is None else torch.tensor([label], device=device)
    image = generator(z, y)[0].float().cpu()  # (C, H, W)
    generator.train(was_training)
    return image


def generate_grid(generator: nn.Module, spec: GridSpec, device="cpu") -> Tensor:
    """The grid's images ``(rows, columns, C, H, W)`` on CPU; cells not drawn are zeros."""
    images: Tensor | None = None
    for cell in spec.cells():
        image = generate_cell(
            generator, cell["noise_seed"], cell["label"], spec.latent_size, device
        )
        if images is None:
            images = torch.zeros(spec.rows, spec.columns, *image.shape)
        images[cell["row"], cell["column"]] = image
    assert images is not None  # a spec has at least one cell
    return images


def _to_uint8(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def grid_image(images: Tensor, scale: int = 2, padding: int = 2, pad_value: int = 128) -> Tensor:
    """Tile ``(rows, columns, 1, H, W)`` images in [0, 1] into one uint8 picture.

    Each cell is enlarged ``scale`` times (nearest neighbour) and surrounded by ``padding``
    pixels of grey ``pad_value``; cell (r, c)'s top-left corner is at
    ``(padding + r * (H * scale + padding), padding + c * (W * scale + padding))``.
    """
    rows, columns, _, height, width = images.shape
    cells = _to_uint8(images[:, :, 0])  # (rows, columns, H, W)
    cells = cells.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    ch, cw = height * scale, width * scale
    out = torch.full(
        (padding + rows * (ch + padding), padding + columns * (cw + padding)),
        pad_value,
        dtype=torch.uint8,
    )
    for r in range(rows):
        for c in range(columns):
            top, left = padding + r * (ch + padding), padding + c * (cw + padding)
            out[top : top + ch, left : left + cw] = cells[r, c]
    return out


def _png_bytes(picture: Tensor) -> bytes:
    from matplotlib import image as mpimg

    rgb = picture.numpy()[:, :, None].repeat(3, axis=2)  # (H, W, 3) uint8: written as is
    buffer = io.BytesIO()
    mpimg.imsave(buffer, rgb, format="png")
    return buffer.getvalue()


def save_grid(
    path: str | Path,
    images: Tensor,
    spec: GridSpec,
    info: dict[str, Any] | None = None,
    scale: int = 2,
    padding: int = 2,
) -> tuple[Path, Path]:
    """Write the grid PNG and, beside it (same name, ``.json``), how to regenerate each cell.

    The JSON holds the spec (base seed, latent size, classes), the layout (cell size, scale,
    padding), ``cells``: ``[{"row", "column", "noise_seed", "label"}]``, the noise recipe, and
    ``info`` (e.g. the training step). Both files are written atomically.

    Returns:
        ``(png_path, json_path)``.
    """
    path = Path(path)
    png = atomic_write_bytes(path, _png_bytes(grid_image(images, scale, padding)))
    record = {
        **(info or {}),
        "spec": asdict(spec),
        "image_shape": list(images.shape[2:]),
        "scale": scale,
        "padding": padding,
        "noise": NOISE_RECIPE,
        "cells": spec.cells(),
    }
    meta = atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=1))
    return png, meta


def read_grid(json_path: str | Path) -> dict[str, Any]:
    """The JSON record written beside a grid by ``save_grid``."""
    return json.loads(Path(json_path).read_text(encoding="utf-8"))


def read_grid_cell(png_path: str | Path, row: int, column: int) -> np.ndarray:
    """Cell (row, column) of a saved grid as uint8 ``(H * scale, W * scale)``."""
    from matplotlib import image as mpimg

    png_path = Path(png_path)
    record = read_grid(png_path.with_suffix(".json"))
    _, height, width = record["image_shape"]
    scale, padding = record["scale"], record["padding"]
    picture = np.rint(mpimg.imread(png_path)[:, :, 0] * 255).astype(np.uint8)
    ch, cw = height * scale, width * scale
    top, left = padding + row * (ch + padding), padding + column * (cw + padding)
    return picture[top : top + ch, left : left + cw]


def regenerate_cell(
    generator: nn.Module, record: dict[str, Any] | str | Path, row: int, column: int, device="cpu"
) -> Tensor:
    """Generate cell (row, column) of a saved grid again, alone: ``(C, H, W)`` in [0, 1].

    With the weights the grid was drawn with (the checkpoint of the step in its JSON), the result
    is bit-identical to the cell as drawn; ``read_grid_cell`` gives the cell as saved (uint8,
    scaled).

    Args:
        generator: the generator (``GAN.generator``).
        record: the grid's JSON record or the path of its ``.json`` (or ``.png``) file.
        row, column: the cell.
        device: where to run the generator.
    """
    if not isinstance(record, dict):
        record = read_grid(Path(record).with_suffix(".json"))
    spec = record["spec"]
    if getattr(generator, "latent_size", spec["latent_size"]) != spec["latent_size"]:
        raise ValueError(
            f"the grid was drawn with latent size {spec['latent_size']}, the generator takes "
            f"{generator.latent_size}"
        )
    for cell in record["cells"]:
        if cell["row"] == row and cell["column"] == column:
            return generate_cell(
                generator, cell["noise_seed"], cell["label"], spec["latent_size"], device
            )
    raise ValueError(f"the grid has no cell ({row}, {column})")


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class GANSettings:
    """How a GAN is trained.

    Attributes:
        steps: iterations (each one D step and one G step).
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
        eval_every: call the eval hook every this many steps (and at the end); 0: at the end only.
        checkpoint_every: checkpoint every this many steps (and at the end); 0: end only.
        keep_checkpoints: checkpoints kept.
        seed: seed of the data order (the caller seeds initialization and the noise stream).
        monitor_per_class: generated and real images per class in the diversity batch
            (unconditional: ten times this many in all).
        win_fake_below, win_loss_below, win_window, collapse_fraction, collapse_window,
            monitor_after: the ``GANMonitor`` thresholds (``monitor_after`` is its
            ``start_step``).
        progress: show a tqdm progress bar.
        stop_after: stop (with a checkpoint) after this many steps of this call, as if killed.
    """

    steps: int
    batch_size: int = 64
    lr_discriminator: float = 2e-4
    lr_generator: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    real_label: float = 1.0
    precision: str = "fp32"
    log_every: int = 100
    grid_every: int = 1000
    grid_columns: int = 10
    grid_seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 2000
    keep_checkpoints: int = 2
    seed: int = 0
    monitor_per_class: int = 10
    win_fake_below: float = 0.01
    win_loss_below: float = 0.1
    win_window: int = 3
    collapse_fraction: float = 0.25
    collapse_window: int = 3
    monitor_after: int = 500
    progress: bool = True
    stop_after: int | None = None


EvalHook = Callable[[nn.Module, int], dict[str, Any]]  # (generator, step) -> metrics


def _diversity_batch(
    model: nn.Module, images: Tensor, labels: Tensor, settings: GANSettings
) -> tuple[Tensor, Tensor | None, float]:
    """Fixed noise (own generator: the training noise stream is untouched), its labels, and the
    diversity of the matching real images: the first ``monitor_per_class`` of each class, or
    the first ``10 * monitor_per_class`` images."""
    k = settings.monitor_per_class
    g = torch.Generator("cpu").manual_seed(settings.grid_seed + 1_000_003)
    if model.conditional:
        picks = [
            (labels == c).nonzero().flatten()[:k] for c in range(model.num_classes)
        ]  # first k of each class
        index = torch.cat(picks)
        reference = diversity(images[index], labels[index])
        y = torch.arange(model.num_classes, device=images.device).repeat_interleave(k)
    else:
        reference = diversity(images[: 10 * k])
        y = None
    n = len(y) if y is not None else 10 * k
    z = torch.randn(n, model.latent_size, generator=g).to(images.device)
    return z, y, reference


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
        NonFiniteLossError: a loss is NaN or infinite (the newest checkpoint, written before that
            step, stays intact).
        StopRequested: on SIGINT/SIGTERM, after writing a checkpoint.
    """
    if get_context().enabled:
        raise ValueError("train_gan runs in one process (torchrun with several is not supported)")
    device = images.device
    precision = Precision(settings.precision, str(device))
    opt_d, opt_g = make_gan_optimizers(
        model, settings.lr_discriminator, settings.lr_generator, (settings.beta1, settings.beta2)
    )
    batches = ShuffledBatches(len(images), settings.batch_size, settings.seed, device=device)
    state = TrainState(
        {"model": model}, {"discriminator": opt_d, "generator": opt_g}, {}, precision, batches
    )
    log_every = max(1, settings.log_every)
    state.extra_tensors = {"step_buffer": torch.zeros(log_every, len(STEP_KEYS), device=device)}
    monitor = GANMonitor(
        settings.win_fake_below,
        settings.win_loss_below,
        settings.win_window,
        settings.collapse_fraction,
        settings.collapse_window,
        settings.monitor_after,
        loss_floor(settings.real_label),
    )
    state.extra = {"train_time_s": 0.0, "last": {}, "last_eval": {}, "warnings": []}
    grid_dir = run.plots / "grids" if run is not None else None
    spec = GridSpec(settings.grid_columns, settings.grid_seed, model.latent_size, model.num_classes)
    if not model.conditional:
        spec = GridSpec(settings.grid_columns, settings.grid_seed, model.latent_size, rows=10)

    def result() -> dict[str, Any]:
        out = {"step": state.step, "complete": state.complete}
        out["train_time_s"] = state.extra["train_time_s"]
        out.update(state.extra["last"])
        out.update(state.extra["last_eval"])
        out["warnings"] = list(state.extra["warnings"])
        if grid_dir is not None:
            grids = sorted(grid_dir.glob(f"{variant}_step*.png"))
            out["grid"] = str(grids[-1]) if grids else None
        return out

    if resume and run is not None:
        if resume_variant(state, run, variant, device) is not None:
            monitor.load_state_dict(state.extra["monitor"])
        if state.complete:
            return result()

    step_buffer = state.extra_tensors["step_buffer"]
    z_fixed, y_fixed, real_diversity = _diversity_batch(model, images, labels, settings)
    clock = TrainClock(state.extra["train_time_s"])
    check_finite = FiniteCheck(
        variant,
        state.step,
        device,
        log_every,
        lambda idx: step_buffer[idx, :2],  # (k, 2): the two losses, of the four step values
        names=STEP_KEYS[:2],
        losses=(0, 1),
        extra=state.extra,
    )

    def checkpoint() -> str | None:
        state.extra["monitor"] = monitor.state_dict()
        return save_checkpoint(state, run, variant, settings.keep_checkpoints, clock, check_finite)

    def log(record: dict[str, Any]) -> None:
        if run is not None:
            run.log(record)

    def diversity_ratio() -> float:
        model.generator.eval()
        with torch.no_grad():
            samples = model.generator(z_fixed, y_fixed)  # (n, 1, 28, 28)
        model.generator.train()
        return diversity(samples, y_fixed) / real_diversity

    def save_step_grid(step: int) -> None:
        if grid_dir is None:
            return
        grid = generate_grid(model.generator, spec, device)
        info = {"variant": variant, "step": step}
        save_grid(grid_dir / f"{variant}_step{step:08d}.png", grid, spec, info)

    def run_eval(step: int) -> None:
        if eval_hook is None:
            return
        with clock.paused():
            model.generator.eval()
            with torch.no_grad():
                metrics = eval_hook(model.generator, step)
            model.generator.train()
            state.extra["last_eval"] = dict(metrics)
            log({"variant": variant, "step": step, "split": "eval", **metrics})

    if state.step == 0:  # the first point of each curve
        save_step_grid(0)
        if settings.eval_every:
            run_eval(0)
    progress = _progress_bar(settings, state.step, variant)
    stop_at = end_step(settings.steps, state.step, settings.stop_after)
    try:
        with SignalGuard() as guard:
            while state.step < stop_at:
                step = state.step
                index = next(batches)
                real = images[index]  # (B, 1, 28, 28)
                y = labels[index] if model.conditional else None
                z = torch.randn(len(index), model.latent_size, device=device)  # (B, latent)
                out = gan_train_step(
                    model, opt_d, opt_g, real, z, y, precision, settings.real_label
                )
                step_buffer[step % log_every] = torch.stack([out[k] for k in STEP_KEYS])
                state.step = step = step + 1
                if step % log_every == 0 or step == settings.steps:
                    check_finite(step)
                    n = (step - 1) % log_every + 1
                    means = step_buffer[:n].double().mean(dim=0).tolist()
                    last = {**dict(zip(STEP_KEYS, means)), "diversity_ratio": diversity_ratio()}
                    state.extra["last"] = last
                    log({"variant": variant, "step": step, "split": "train", **last})
                    for kind, message in monitor.observe(
                        step, last["d_fake"], last["d_loss"], last["diversity_ratio"]
                    ):
                        text = f"{variant}, step {step}: {message}"
                        state.extra["warnings"].append(text)
                        log(
                            {"variant": variant, "step": step, "split": "warning",
                             "warning": kind, "message": message}
                        )  # fmt: skip
                        warnings.warn(text, GANTrainingWarning, stacklevel=2)
                    if progress is not None:
                        progress.set_postfix(
                            d_loss=f"{last['d_loss']:.3f}",
                            g_loss=f"{last['g_loss']:.3f}",
                            d_real=f"{last['d_real']:.2f}",
                            d_fake=f"{last['d_fake']:.2f}",
                        )
                        progress.update(n)
                if step % settings.grid_every == 0 or step == settings.steps:
                    save_step_grid(step)
                if (settings.eval_every and step % settings.eval_every == 0) or (
                    step == settings.steps
                ):
                    run_eval(step)
                finish_step(
                    state, step, settings.steps, settings.checkpoint_every, checkpoint, guard
                )
            if state.step < settings.steps:  # stopped early on request (stop_after)
                checkpoint()
    finally:
        if progress is not None:
            progress.close()
    state.extra["train_time_s"] = clock.elapsed()
    return result()


def _progress_bar(settings: GANSettings, start: int, variant: str):
    if not settings.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=settings.steps, initial=start, desc=variant, unit="step", dynamic_ncols=True,
        file=sys.stderr,
    )  # fmt: skip
