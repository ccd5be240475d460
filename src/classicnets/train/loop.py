"""The parts of ``train.fit``'s frame that stand alone:

- ``resume_variant``: load the newest valid checkpoint of one model of a run and drop from
  ``metrics.jsonl`` what that model logged after it, so the resumed run writes it again,
  identically (everything of the model, its step-0 record included, when it never reached a
  checkpoint).
- ``TrainClock``: training time that leaves out evaluations (``with clock.paused(): ...``), saved
  in checkpoints so a resumed run goes on counting.
- ``FiniteCheck``: the losses are kept on the device between log intervals; before each record
  and each checkpoint, the check reads back the ones logged since the last check and raises on the
  first that is NaN or infinite, naming the step. A checkpoint therefore never holds a diverged
  model, and the newest one stays the last good state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from classicnets.train.run import RunDir
from classicnets.train.state import TrainState

__all__ = [
    "EXPLOSION",
    "FiniteCheck",
    "NonFiniteLossError",
    "TrainClock",
    "resume_variant",
    "truncate_after",
]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite, or exploded (``FiniteCheck``); the message
    names the step and the value, ``step`` is that step and ``values`` the watched values of
    it (by name; NaN where another process found the bad value)."""

    def __init__(self, message: str, step: int = 0, values: dict[str, float] | None = None):
        super().__init__(message)
        self.step = step
        self.values = dict(values or {})


# A loss this many times its first value has diverged, even while finite.
EXPLOSION = 1e6


def resume_variant(
    state: TrainState,
    run: RunDir,
    variant: str,
    device: torch.device | str,
    truncate: bool = True,
) -> int | None:
    """Restore ``state`` from the newest valid checkpoint of ``variant`` in ``run``, if any.

    Args:
        state: the loop's state, built as for a fresh run; filled in place.
        run: the run folder.
        variant: the model's name within the run.
        device: where the loop keeps its extra tensors (loss buffers, hidden state).
        truncate: also drop the records of ``variant`` logged after the checkpoint (pass False
            where only the main process of a distributed run writes, or to read them first and
            call ``truncate_after`` later).

    Returns:
        The step resumed from, or None when ``variant`` has no valid checkpoint (the run then
        starts over, and with ``truncate`` every record of ``variant`` is dropped).
    """
    found = state.resume(run.checkpoints, variant)
    if found is not None:
        state.extra_tensors = {k: v.to(device) for k, v in state.extra_tensors.items()}
    step = state.step if found is not None else None
    if truncate:
        truncate_after(run, variant, step)
    return step


def truncate_after(run: RunDir, variant: str, step: int | None) -> None:
    """Drop the records of ``variant`` after ``step`` (all of them when ``step`` is None)."""
    keep_upto = -1 if step is None else step
    run.truncate_metrics(
        lambda r: r.get("variant") != variant or int(r.get("step", 0)) <= keep_upto
    )


class TrainClock:
    """Seconds spent training, excluding what runs inside ``paused()`` (evaluations).

    >>> clock = TrainClock()
    >>> with clock.paused():
    ...     pass  # an evaluation: not counted
    >>> clock.elapsed() >= 0.0
    True
    """

    def __init__(self, elapsed: float = 0.0) -> None:
        self._elapsed = float(elapsed)
        self._tick = time.perf_counter()

    def elapsed(self) -> float:
        """Training seconds so far, the running span included."""
        return self._elapsed + time.perf_counter() - self._tick

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop counting for the duration of the ``with`` block."""
        self._elapsed = self.elapsed()
        try:
            yield
        finally:
            self._tick = time.perf_counter()


class FiniteCheck:
    """Checks the values a loop logged since the last check for NaN and infinity.

    Args:
        variant: the model's name, for the error message.
        start: the first step not yet checked (the resumed step, or 0).
        device: where the ring buffer lives.
        log_every: the length of the loop's ring buffer (the value of step ``s`` is at
            ``s % log_every``).
        rows: ``rows(idx) -> Tensor`` with the watched values of the steps ``idx``
            (``idx`` is ``[k]``; the result ``[k]`` for one value per step or ``[k, m]``).
        names: what each column of ``rows`` is, for the error message.
        all_reduce: under DDP, a function that sums a tensor over the processes, so that every
            process stops at the same check; None in one process.
        losses: the columns that are losses. A loss that grows past ``EXPLOSION`` times the
            magnitude of its first value has diverged although it is still finite (a learning
            rate of 1e30 gives losses of 1e31), and is reported like a NaN.
        extra: the loop's ``TrainState.extra``, where the first values are kept, so that a
            resumed run measures against the same ones; None keeps them here.
    """

    def __init__(
        self,
        variant: str,
        start: int,
        device: torch.device | str,
        log_every: int,
        rows: Callable[[Tensor], Tensor],
        names: Sequence[str] = ("training loss",),
        all_reduce: Callable[[Tensor], None] | None = None,
        losses: Sequence[int] = (0,),
        extra: dict | None = None,
    ) -> None:
        self.losses = tuple(losses)
        self.extra = {} if extra is None else extra
        self.variant = variant
        self.names = tuple(names)
        self.checked_upto = start
        self.device = torch.device(device)
        self.log_every = log_every
        self.rows = rows
        self.all_reduce = all_reduce

    def first_bad(self, step: int) -> tuple[int, int, Tensor] | None:
        """Check the steps since the last check, up to ``step``.

        Returns:
            None when every value is finite (the steps count as checked); otherwise
            ``(bad_step, column, values)``: the 1-based step of the first bad value (counting
            steps as the loop does after its increment), the column of that value, and the
            ``[k, m]`` values read. Under DDP a bad value found on another process is reported
            with column -1 and the first unchecked step.
        """
        first = self.checked_upto
        if step <= first:
            return None
        idx = torch.arange(first, step, device=self.device) % self.log_every
        values = self.rows(idx)
        values = values if values.ndim == 2 else values[:, None]  # (k, m)
        bad_mask = ~torch.isfinite(values)  # (k, m)
        limits = self._limits(values)
        if limits is not None:
            bad_mask[:, list(self.losses)] |= values[:, list(self.losses)].abs() > limits
        bad = bad_mask.nonzero()  # (b, 2)
        count = len(bad)
        if self.all_reduce is not None:
            flag = torch.tensor([float(count)], device=values.device)
            self.all_reduce(flag)
            count = int(flag.item())
        if count == 0:
            self.checked_upto = step
            return None
        if len(bad) == 0:  # found on another process
            return first + 1, -1, values
        return first + int(bad[0, 0]) + 1, int(bad[0, 1]), values

    def _limits(self, values: Tensor) -> Tensor | None:
        """``EXPLOSION`` times the magnitude of each loss's first value (``[len(losses)]``),
        taking the first values from ``values`` when they are not known yet."""
        if "initial_losses" not in self.extra:
            first = values[0, list(self.losses)].detach().double().cpu()
            if not bool(torch.isfinite(first).all()):
                return None  # reported as non-finite; nothing to measure against
            self.extra["initial_losses"] = first.tolist()
        cached = getattr(self, "_limit_cache", None)
        if cached is not None and cached.device == values.device and cached.dtype == values.dtype:
            return cached  # made once: no host-to-device copy at every check
        initial = torch.tensor(self.extra["initial_losses"], dtype=torch.float64)
        # A loss that starts at 0 (a perfect fit) is measured against 1 instead.
        scale = torch.where(initial.abs() > 0, initial.abs(), torch.ones_like(initial))
        self._limit_cache = (EXPLOSION * scale).to(device=values.device, dtype=values.dtype)
        return self._limit_cache

    def __call__(self, step: int) -> None:
        """Raise ``NonFiniteLossError`` if a value since the last check is not finite, or is a
        loss more than ``EXPLOSION`` times its first value."""
        found = self.first_bad(step)
        if found is None:
            return
        bad_step, column, values = found
        first = self.checked_upto
        if column < 0:
            name, value = self.names[0], float("nan")
            row = dict.fromkeys(self.names, float("nan"))
        else:
            name, value = self.names[column], values[bad_step - first - 1, column].item()
            row = dict(zip(self.names, values[bad_step - first - 1].tolist()))
        if math.isfinite(value):
            initial = self.extra["initial_losses"][self.losses.index(column)]
            message = (
                f"{self.variant}: {name} is {value:.4g} at step {bad_step}, over {EXPLOSION:.0e} "
                f"times its first value {initial:.4g}: diverged; stopped. The newest checkpoint "
                f"(written before that step) is kept intact."
            )
        else:
            message = (
                f"{self.variant}: {name} is {value} at step {bad_step}; stopped. The newest "
                f"checkpoint (written before that step) is kept intact."
            )
        raise NonFiniteLossError(message, bad_step, row)
