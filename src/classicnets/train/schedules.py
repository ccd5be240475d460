"""Learning-rate schedules as small classes with closed forms, and gradient clipping.

A schedule gives a *factor*: the learning rate of each optimizer group is that group's base rate
times the factor, so groups with different base rates (a slower pretrained trunk, a faster head)
keep their ratio. ``Schedule.apply(optimizer, step, epoch)`` stores each group's base rate as
``initial_lr`` (the key ``torch.optim.lr_scheduler`` uses) the first time it sees the group and
sets ``lr = initial_lr * factor``; applying twice for the same step changes nothing.

Closed-form schedules are pure functions of ``(step, epoch)``: a resumed run needs no scheduler
state beyond the step. ``ReduceOnPlateau`` depends on the metrics it has seen; its state is in
``state_dict()``, a JSON-serializable dict, like every schedule's configuration.

::

    schedule = make_schedule("cosine", total_steps=10_000, warmup_steps=500)
    for step in range(10_000):
        schedule.apply(optimizer, step)
        ...
        loss.backward()
        clip_grad_norm(model.parameters(), max_norm=5.0)
        optimizer.step()
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from classicnets.choices import check_choice

__all__ = [
    "ConstantSchedule",
    "CosineWithWarmup",
    "ExponentialAfterEpoch",
    "ReduceOnPlateau",
    "Schedule",
    "StepSchedule",
    "clip_grad_norm",
    "make_schedule",
    "schedule_from_state_dict",
]


def _encode_float(x: float) -> float | str:
    # Strict JSON has no inf/nan; store them as the strings float() reads back.
    return x if math.isfinite(x) else str(x)


def _decode_float(x: float | str) -> float:
    return float(x)


@dataclass
class Schedule:
    """Base class: a learning-rate factor as a function of the step and the epoch.

    Subclasses are dataclasses whose constructor fields are their configuration; they implement
    ``factor_at(step, epoch)``. Stateful ones (``ReduceOnPlateau``) keep their state in
    ``init=False`` fields and override ``_state`` and ``_load_state``.
    """

    name: ClassVar[str] = "schedule"

    def factor_at(self, step: int, epoch: int = 0) -> float:
        """The multiplier of the base learning rate at ``step`` (0-based, optimization steps)
        in ``epoch`` (0-based)."""
        raise NotImplementedError

    def lr_at(self, step: int, epoch: int = 0, base_lr: float = 1.0) -> float:
        """The learning rate at ``step`` / ``epoch`` for a group whose base rate is ``base_lr``.

        Args:
            step: 0-based optimization step.
            epoch: 0-based epoch.
            base_lr: the group's learning rate before scheduling.
        """
        return base_lr * self.factor_at(step, epoch)

    def apply(self, optimizer: torch.optim.Optimizer, step: int, epoch: int = 0) -> list[float]:
        """Set every group's ``lr`` to its base rate times ``factor_at(step, epoch)``.

        The base rate is the group's ``initial_lr``; a group without one (first call, or a group
        added since) gets ``initial_lr = lr`` first. Call before the optimizer step it governs.

        Args:
            optimizer: any ``torch.optim`` optimizer.
            step: 0-based optimization step.
            epoch: 0-based epoch.

        Returns:
            The learning rates set, one per group.
        """
        f = self.factor_at(step, epoch)
        lrs = []
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", float(group["lr"]))
            lr = group["initial_lr"] * f
            if isinstance(group["lr"], Tensor):  # a tensor lr (capturable optimizers) stays one
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            lrs.append(lr)
        return lrs

    def config(self) -> dict[str, Any]:
        """The constructor arguments, as a dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """``{"name", "config", "state"}``, serializable by ``json.dumps(..., allow_nan=False)``."""
        return {"name": self.name, "config": self.config(), "state": self._state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore configuration and state from ``state_dict()`` output (or its JSON round trip).

        Raises:
            ValueError: if the state belongs to another kind of schedule or names parameters
                this one does not have.
        """
        if state_dict.get("name") != self.name:
            raise ValueError(
                f"state of schedule {state_dict.get('name')!r} cannot load into {self.name!r}"
            )
        config = state_dict.get("config", {})
        unknown = sorted(set(config) - set(self.config()))
        if unknown:
            raise ValueError(f"schedule {self.name!r} has no parameters {unknown}")
        for key, value in config.items():
            setattr(self, key, value)
        self.__post_init__()
        self._load_state(state_dict.get("state", {}))

    def __post_init__(self) -> None:
        pass


@dataclass
class ConstantSchedule(Schedule):
    """Factor 1: every group keeps its base learning rate."""

    name: ClassVar[str] = "constant"

    def factor_at(self, step: int, epoch: int = 0) -> float:
        return 1.0


@dataclass
class StepSchedule(Schedule):
    """Multiply by ``gamma`` every ``step_size`` optimization steps.

    ``factor = gamma ** (step // step_size)``: the per-step form of
    ``torch.optim.lr_scheduler.StepLR``.

    >>> s = StepSchedule(step_size=30, gamma=0.5)
    >>> [s.factor_at(k) for k in (0, 29, 30, 99)]
    [1.0, 1.0, 0.5, 0.125]

    Args:
        step_size: steps between decays (>= 1).
        gamma: the multiplier at each decay.
    """

    name: ClassVar[str] = "step"
    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if int(self.step_size) < 1:
            raise ValueError(f"step_size must be >= 1, got {self.step_size}")

    def factor_at(self, step: int, epoch: int = 0) -> float:
        return float(self.gamma ** (step // self.step_size))


@dataclass
class ExponentialAfterEpoch(Schedule):
    """Full rate for ``epochs_at_full_lr`` epochs, then times ``decay`` each epoch.

    Zaremba, Sutskever & Vinyals 2014 ("Recurrent Neural Network Regularization", Sec. 4.1), as
    the TensorFlow PTB tutorial (tensorflow/models ``tutorials/rnn/ptb/ptb_word_lm.py``) codes it
    for 0-based epoch ``i``: ``lr_decay = config.lr_decay ** max(i + 1 - config.max_epoch, 0.0)``,
    where ``max_epoch`` is the number of epochs at the initial rate. The tutorial's configs:
    small ``(decay=0.5, epochs_at_full_lr=4)`` over 13 epochs, medium ``(0.8, 6)`` over 39,
    large ``(1/1.15, 14)`` over 55, all from ``lr=1.0``.

    >>> s = ExponentialAfterEpoch(decay=0.5, epochs_at_full_lr=4)
    >>> [s.factor_at(0, epoch=e) for e in range(7)]
    [1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]

    Args:
        decay: the multiplier per epoch once decay has started (``lr_decay``).
        epochs_at_full_lr: epochs trained at the base rate (``max_epoch``; >= 0).
    """

    name: ClassVar[str] = "exp-after-epoch"
    decay: float
    epochs_at_full_lr: int

    def __post_init__(self) -> None:
        if self.decay <= 0:
            raise ValueError(f"decay must be > 0, got {self.decay}")
        if int(self.epochs_at_full_lr) < 0:
            raise ValueError(f"epochs_at_full_lr must be >= 0, got {self.epochs_at_full_lr}")

    def factor_at(self, step: int, epoch: int = 0) -> float:
        return float(self.decay ** max(epoch + 1 - self.epochs_at_full_lr, 0))


@dataclass
class CosineWithWarmup(Schedule):
    """Linear warm-up, then half a cosine down to ``min_factor`` (Loshchilov & Hutter 2017,
    SGDR, Eq. 5, one cycle; warm-up as in Goyal et al. 2017, Sec. 2.2).

    For ``w = warmup_steps`` and ``T = total_steps``::

        factor(k) = (k + 1) / w                                         k < w
        factor(k) = m + (1 - m) * (1 + cos(pi * (k - w) / (T - w))) / 2  w <= k <= T
        factor(k) = m                                                   k > T

    so step 0 runs at ``1 / w``, step ``w - 1`` and step ``w`` at 1, step ``(w + T) / 2`` at
    ``(1 + m) / 2`` and step ``T`` at ``m``. With ``w = 0`` there is no warm-up.

    Args:
        total_steps: the step at which the factor reaches ``min_factor``.
        warmup_steps: steps of linear warm-up (``0 <= warmup_steps < total_steps``).
        min_factor: the final factor.
    """

    name: ClassVar[str] = "cosine"
    total_steps: int
    warmup_steps: int = 0
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps < total_steps, got warmup_steps={self.warmup_steps}, "
                f"total_steps={self.total_steps}"
            )

    def factor_at(self, step: int, epoch: int = 0) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_factor + (1.0 - self.min_factor) * cosine


@dataclass
class ReduceOnPlateau(Schedule):
    """Multiply the factor by ``factor`` when the metric stops improving.

    The rule of ``torch.optim.lr_scheduler.ReduceLROnPlateau``, on a factor instead of the
    groups' rates: after each evaluation call ``observe(metric)``. A metric is an improvement
    when, for ``mode="min"``, it is below ``best * (1 - threshold)`` (``threshold_mode="rel"``)
    or ``best - threshold`` (``"abs"``); for ``"max"``, above ``best * (1 + threshold)`` or
    ``best + threshold``. After more than ``patience`` observations in a row without
    improvement the factor becomes ``max(current * factor, min_factor)`` (unless that changes it
    by ``eps`` or less), the count restarts, and the next ``cooldown`` observations count no bad
    epochs. torch's ``min_lr`` is ``base_lr * min_factor`` here, and torch's ``eps`` compares
    rates where ours compares factors (identical for a base rate of 1).

    Args:
        factor: the multiplier at each reduction (``0 < factor < 1``); named as in torch.
        patience: observations without improvement tolerated before a reduction.
        threshold: the margin an improvement must beat.
        mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
        cooldown: observations after a reduction during which bad ones are not counted.
        min_factor: the factor never goes below this.
        threshold_mode: ``"rel"`` or ``"abs"``.
        eps: reductions of the factor by ``eps`` or less are skipped.
    """

    name: ClassVar[str] = "plateau"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    mode: str = "min"
    cooldown: int = 0
    min_factor: float = 0.0
    threshold_mode: str = "rel"
    eps: float = 1e-8
    # State, not configuration (init=False): what the observed metrics have done so far.
    best: float = dataclasses.field(init=False, default=math.inf)
    num_bad: int = dataclasses.field(init=False, default=0)
    cooldown_counter: int = dataclasses.field(init=False, default=0)
    current: float = dataclasses.field(init=False, default=1.0)
    observations: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        if not 0.0 < self.factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got {self.factor}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {self.threshold_mode!r}")
        if self.patience < 0 or self.cooldown < 0:
            raise ValueError("patience and cooldown must be >= 0")
        if self.observations == 0:  # the worst value for the mode, as torch starts
            self.best = math.inf if self.mode == "min" else -math.inf

    def _is_better(self, metric: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return metric < self.best * (1.0 - self.threshold)
        if self.mode == "min":
            return metric < self.best - self.threshold
        if self.threshold_mode == "rel":
            return metric > self.best * (1.0 + self.threshold)
        return metric > self.best + self.threshold

    def observe(self, metric: float | Tensor) -> float:
        """Record one evaluation's metric; returns the factor to use from now on.

        Args:
            metric: the monitored value (a float or a 0-d tensor). NaN never improves.
        """
        value = float(metric)
        self.observations += 1
        # Same order of updates as torch's ReduceLROnPlateau.step.
        if self._is_better(value):
            self.best = value
            self.num_bad = 0
        else:
            self.num_bad += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad = 0  # bad epochs in cooldown are ignored
        if self.num_bad > self.patience:
            reduced = max(self.current * self.factor, self.min_factor)
            if self.current - reduced > self.eps:
                self.current = reduced
            self.cooldown_counter = self.cooldown
            self.num_bad = 0
        return self.current

    def factor_at(self, step: int = 0, epoch: int = 0) -> float:
        """The current factor (set by ``observe``; the step and epoch do not matter)."""
        return self.current

    def _state(self) -> dict[str, Any]:
        return {
            "best": _encode_float(self.best),
            "num_bad": self.num_bad,
            "cooldown_counter": self.cooldown_counter,
            "current": self.current,
            "observations": self.observations,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.best = _decode_float(state["best"])
        self.num_bad = int(state["num_bad"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.current = float(state["current"])
        self.observations = int(state["observations"])


_SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls
    for cls in (ConstantSchedule, StepSchedule, ExponentialAfterEpoch, CosineWithWarmup)
}
_SCHEDULES[ReduceOnPlateau.name] = ReduceOnPlateau


def make_schedule(name: str, **kwargs: Any) -> Schedule:
    """A schedule by name: ``"constant"``, ``"step"``, ``"exp-after-epoch"``, ``"cosine"`` or
    ``"plateau"``, with its constructor's keyword arguments.

    >>> make_schedule("step", step_size=10, gamma=0.5).factor_at(25)
    0.25

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
        TypeError: for arguments the schedule does not take.
    """
    check_choice("schedule", name, sorted(_SCHEDULES))
    try:
        return _SCHEDULES[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"schedule {name!r}: {err}") from err


def schedule_from_state_dict(state_dict: dict[str, Any]) -> Schedule:
    """Rebuild a schedule, state included, from its ``state_dict()`` (e.g. read from JSON)."""
    schedule = make_schedule(state_dict["name"], **state_dict.get("config", {}))
    schedule.load_state_dict(state_dict)
    return schedule


def clip_grad_norm(
    parameters: Tensor | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    max_norm: float | None,
) -> float:
    """Clip gradients by their global L2 norm; return the norm before clipping.

    The global norm is ``sqrt(sum over parameters of ||grad||^2)``; when it exceeds ``max_norm``
    every gradient is scaled by ``max_norm / (norm + 1e-6)`` (``torch.nn.utils.clip_grad_norm_``;
    Pascanu, Mikolov & Bengio 2013, Alg. 1). Parameters without a gradient are skipped. A
    non-finite norm is returned as is (the gradients then become non-finite too, so check it).

    Args:
        parameters: tensors, or ``(name, parameter)`` pairs as ``select_parameters`` returns.
        max_norm: the largest allowed norm; None or 0 measures without clipping.

    Returns:
        The global gradient norm before clipping, as a Python float (0.0 if no gradient).
    """
    if max_norm is not None and max_norm < 0:
        raise ValueError(f"max_norm must be >= 0 or None, got {max_norm}")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    tensors = [p[1] if isinstance(p, tuple) else p for p in parameters]
    with_grad = [p for p in tensors if p.grad is not None]
    if not with_grad:
        return 0.0
    if not max_norm:
        return float(torch.nn.utils.get_total_norm([p.grad for p in with_grad]))
    return float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm))
