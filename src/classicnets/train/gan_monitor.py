"""Warnings while a GAN trains: the discriminator wins outright, or the samples collapse.

``GANMonitor`` watches the logged intervals of ``train.gan`` and warns once per kind; the
criteria are stated precisely in its docstring. ``DiversityProbe`` measures the collapse.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from classicnets.metrics.diversity import diversity

__all__ = [
    "DiversityProbe",
    "GANMonitor",
    "GANTrainingWarning",
    "discriminator_wins",
    "loss_floor",
]


class GANTrainingWarning(UserWarning):
    """The discriminator wins outright or the generator's samples collapse."""


def loss_floor(real_label: float) -> float:
    """The smallest possible ``discriminator_loss``: the binary entropy of ``real_label`` (nats)."""
    t = real_label
    return 0.0 if t in (0.0, 1.0) else -(t * math.log(t) + (1 - t) * math.log(1 - t))


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
        if self.win_streak >= self.win_window:
            self._fire(out, "discriminator_wins", step, (
                f"the discriminator wins outright: mean D(G(z)) < {self.win_fake_below} and "
                f"D loss within {self.win_loss_below} of its minimum {self.loss_floor:.3g} "
                f"for {self.win_streak} logging intervals "
                f"(now D(G(z)) = {d_fake:.2g}, D loss = {d_loss:.3g}); the generator gets "
                f"little gradient"
            ))  # fmt: skip
        collapsed = diversity_ratio is not None and diversity_ratio < self.collapse_fraction
        self.collapse_streak = self.collapse_streak + 1 if collapsed else 0
        if self.collapse_streak >= self.collapse_window:
            self._fire(out, "samples_collapse", step, (
                f"the samples collapse: their diversity is {diversity_ratio:.2f} of real "
                f"images' (< {self.collapse_fraction}) for {self.collapse_streak} logging "
                f"intervals (mode collapse)"
            ))  # fmt: skip
        return out

    def _fire(self, out: list, kind: str, step: int, message: str) -> None:
        if kind not in self.fired:  # once per run
            self.fired[kind] = step
            out.append((kind, message))

    @classmethod
    def of(cls, settings: Any) -> GANMonitor:
        """The monitor of ``train.gan.GANSettings``' thresholds (fields of the same names, but
        ``monitor_after`` for ``start_step``; the floor is that of ``real_label``)."""
        names = ("win_fake_below", "win_loss_below", "win_window", "collapse_fraction",
                 "collapse_window")  # fmt: skip
        floor = loss_floor(settings.real_label)
        named = {name: getattr(settings, name) for name in names}
        return cls(**named, start_step=settings.monitor_after, loss_floor=floor)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, dict(value) if key == "fired" else value)


class DiversityProbe:
    """The diversity ratio that ``GANMonitor`` watches: the diversity of the generator's images
    of a fixed batch of noise over that of matching real images.

    The batch: for a conditional GAN ``per_class`` noise vectors per class with their labels,
    against the first ``per_class`` real images of each class (``diversity`` within classes);
    unconditional, ``10 * per_class`` noise vectors against the first ``10 * per_class`` images.
    The noise comes from its own generator seeded with ``seed``: the training noise stream is
    untouched.
    """

    def __init__(
        self, model: nn.Module, images: Tensor, labels: Tensor, per_class: int, seed: int
    ) -> None:
        k = per_class
        g = torch.Generator("cpu").manual_seed(seed)
        if model.conditional:
            picks = [(labels == c).nonzero().flatten()[:k] for c in range(model.num_classes)]
            index = torch.cat(picks)  # the first k of each class
            self.reference = diversity(images[index], labels[index])
            self.y = torch.arange(model.num_classes, device=images.device).repeat_interleave(k)
        else:
            self.reference = diversity(images[: 10 * k])
            self.y = None
        n = len(self.y) if self.y is not None else 10 * k
        self.z = torch.randn(n, model.latent_size, generator=g).to(images.device)

    def ratio(self, generator: nn.Module) -> float:
        """The diversity of ``generator``'s images of the batch over the real images' (the
        generator's train/eval mode is restored)."""
        was_training = generator.training
        generator.eval()
        with torch.no_grad():
            samples = generator(self.z, self.y)  # (n, 1, 28, 28)
        generator.train(was_training)
        return diversity(samples, self.y) / self.reference
