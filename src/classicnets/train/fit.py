"""``fit``: the one training driver. A paradigm gives a ``Task``; ``fit`` does the rest.

A paradigm's file (``train/classifier.py``, ``autoencoder.py``, ``vae.py``, ``gan.py``,
``language_model.py``) holds what differs between paradigms and nothing else:

- ``Task.train_step(step)``: one optimization step; it returns its values by name as detached
  0-d tensors (``{"loss": ..., "grad_norm": ...}``), the flax / keras-io convention;
- ``Task.train_records(window, step)``: the records of a log interval, from the values of its
  steps (``window[name]`` is ``[n]``);
- ``Task.evaluate(step)``: the evaluation records;
- ``Task.result()``: what the run returns.

``fit(task, run, variant, resume)`` owns the frame around them, once for every paradigm:

- **resume**: the newest valid checkpoint of ``variant`` is restored, and the records the
  variant logged after it are dropped from ``metrics.jsonl`` (a resumed run writes them again,
  identically);
- **ring buffers**, one per value the step returns, saved in every checkpoint: a run resumed in
  the middle of a log interval logs the same interval means;
- the **finite check** (``loop.FiniteCheck``) of the watched values before every record and every
  checkpoint: a checkpoint never holds a diverged model;
- the **cadence**: log, evaluation (step 0 too) and checkpoint intervals, ``stop_after``
  (a simulated kill, with a checkpoint), SIGINT / SIGTERM (a checkpoint, then
  ``StopRequested``), the progress bar, and training time that leaves out evaluations;
- **data parallelism** under ``torchrun`` (``train.distributed``): each task takes its rank's
  slice of the global batch (``Task.local``); ``optimize`` averages the gradients over the
  processes after every backward pass, the all-reduce that ``DistributedDataParallel`` does,
  made explicit so that it also covers a GAN's two networks and a language model's carried
  state; the interval values are averaged over the processes; BN running statistics are
  averaged before every evaluation and checkpoint (``sync_bn_buffers``), and so are the ring
  buffers before a checkpoint (rank 0 writes it, every process resumes from it); only rank 0
  writes.

Precision, ``torch.compile`` and channels-last belong to ``settings.SettingsTask``, the base of
the tasks configured by ``TrainSettings`` (classifier, autoencoder, VAE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from classicnets.data.batching import ShuffledBatches
from classicnets.train.distributed import average_gradients, get_context, sync_bn_buffers
from classicnets.train.faults import SignalGuard, StopRequested
from classicnets.train.loop import FiniteCheck, TrainClock, resume_variant, truncate_after
from classicnets.train.precision import Precision
from classicnets.train.run import RunDir
from classicnets.train.state import TrainState

__all__ = ["Cadence", "Task", "fit", "optimize"]


@dataclass
class Cadence:
    """When ``fit`` logs, evaluates and checkpoints, and where it stops. The settings of the
    loops (``TrainSettings``, ``GANSettings``) are cadences with more fields.

    Attributes:
        steps: the run's length in steps.
        log_every: a training record every this many steps (and at the last).
        eval_every: an evaluation every this many steps (and at step 0 and the last); 0: at the
            last only (and step 0).
        checkpoint_every: a checkpoint every this many steps (and at the last); 0: the last only.
        keep_checkpoints: checkpoints kept per model.
        progress: show a tqdm progress bar (rank 0).
        stop_after: stop after this many steps of this session, with a checkpoint, as if killed
            (tests and demonstrations of resume); None: run to the end.
    """

    steps: int
    log_every: int = 100
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    progress: bool = True
    stop_after: int | None = None

    @property
    def ring(self) -> int:
        """The length of the ring buffers (the longest log interval)."""
        return max(1, self.log_every)

    def stop_step(self, start: int) -> int:
        """Where a session that starts at ``start`` stops: the last step, or ``stop_after``
        steps on if that comes first."""
        return self.steps if self.stop_after is None else min(self.steps, start + self.stop_after)

    def log_due(self, step: int) -> bool:
        return step % self.ring == 0 or step == self.steps

    def eval_due(self, step: int) -> bool:
        return step in (0, self.steps) or bool(self.eval_every and step % self.eval_every == 0)

    def checkpoint_due(self, step: int) -> bool:
        every = self.checkpoint_every
        return step == self.steps or bool(every and step % every == 0)


def optimize(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    precision: Precision | None = None,
    clip: float | None = None,
    clip_params=None,
) -> Tensor | None:
    """One optimizer step on ``loss``: zero the gradients, back-propagate (scaled under fp16),
    average the gradients over the processes under ``torchrun``, clip them, step.

    Args:
        loss: the 0-d objective.
        optimizer: the optimizer of the parameters to update.
        precision: the gradient scaler (None: plain float32).
        clip: clip the global gradient norm of ``clip_params`` to this (None or 0: no clipping).
        clip_params: the parameters whose norm is clipped, in the order their norm is summed
            (by default the optimizer's).

    Returns:
        The gradient norm before clipping (a detached 0-d tensor), or None without clipping.
    """
    optimizer.zero_grad(set_to_none=True)
    if precision is None:
        loss.backward()
    else:
        precision.backward(loss)
    context = get_context()
    if context.enabled:
        average_gradients([p for group in optimizer.param_groups for p in group["params"]], context)
    norm = None
    if clip:
        if precision is not None:
            precision.unscale_(optimizer)
        if clip_params is None:
            clip_params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = nn.utils.clip_grad_norm_(clip_params, clip).detach()
    if precision is None:
        optimizer.step()
    else:
        precision.step(optimizer)
    return norm


class Task:
    """One paradigm's part of training, as ``fit`` drives it.

    A subclass sets, in its ``__init__``: ``cadence``; ``modules``, ``optimizers`` and
    ``schedules`` (name -> object, saved in checkpoints); ``precision`` and ``batches`` (or
    None); ``values``, the names ``train_step`` returns; ``watch``, the values checked for NaN and
    infinity (name -> what the error calls it) and ``losses``, those of them that also count as
    diverged past ``loop.EXPLOSION`` times their first value; ``extra`` and ``tensors``, the
    initial JSON-ready counters and tensors of its own that checkpoints carry. ``fit`` builds
    ``self.state`` (a ``TrainState``) from them: from then on the task reads its counters and
    tensors there, since resuming replaces them.
    """

    values: tuple[str, ...] = ("loss",)
    watch: dict[str, str] = {"loss": "training loss"}
    losses: tuple[str, ...] = ("loss",)
    buffer_dtype: torch.dtype = torch.float32

    def __init__(self, device: torch.device | str) -> None:
        self.context = get_context()
        self.device = torch.device(device)
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedules: dict[str, Any] = {}
        self.precision: Precision | None = None
        self.batches: ShuffledBatches | None = None
        self.extra: dict[str, Any] = {}
        self.tensors: dict[str, Tensor] = {}
        self.state: TrainState

    @property
    def local(self) -> slice:
        """This process's slice of a global batch (everything in one process)."""
        if not self.context.enabled:
            return slice(None)
        return self.context.local_slice(self.global_batch)

    global_batch: int = 1  # the batch that ``local`` splits (set by tasks that split one)

    # ---- what a paradigm defines ------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, Tensor]:
        """Step ``step`` (0-based): ``{name: detached 0-d tensor}`` for every name of
        ``values``."""
        raise NotImplementedError

    def train_records(self, window: dict[str, Tensor], step: int) -> list[dict[str, Any]]:
        """The records of the log interval that ends after ``step`` (1-based), the training
        record first; ``window[name]`` holds the interval's values, averaged over the processes
        under ``torchrun``."""
        raise NotImplementedError

    def evaluate(self, step: int) -> list[dict[str, Any]]:
        """The evaluation records after ``step`` (0: before training); called on every process,
        in eval mode's charge of the task."""
        return []

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """The progress bar's figures, from the training record."""
        return {"loss": f"{record['loss']:.4f}"}

    def result(self) -> dict[str, Any]:
        """What ``fit`` returns."""
        return {
            "step": self.state.step,
            "complete": self.state.complete,
            "train_time_s": self.state.extra["train_time_s"],
        }

    # ---- cadence and hooks, overridden where a paradigm differs --------------------------------

    def log_due(self, step: int) -> bool:
        return self.cadence.log_due(step)

    def eval_due(self, step: int) -> bool:
        return self.cadence.eval_due(step)

    def checkpoint_due(self, step: int) -> bool:
        return self.cadence.checkpoint_due(step)

    def after_resume(self, resumed: bool) -> dict[str, Any] | None:
        """Called after the checkpoint is restored (``resumed``) or found missing, before the
        records after it are dropped; a result returned here ends the run at once."""
        return None

    def before_checkpoint(self) -> None:
        """Put what the task keeps outside ``state`` into it (called on every process)."""


def fit(
    task: Task, run: RunDir | None = None, variant: str = "model", resume: bool = False
) -> dict[str, Any]:
    """Train ``task`` to its last step (or ``stop_after``), logging to and checkpointing into
    ``run`` under the name ``variant``; return ``task.result()``.

    Raises:
        NonFiniteLossError: a watched value is NaN or infinite, or a loss exploded (nothing is
            saved after the last good checkpoint).
        StopRequested: on SIGINT / SIGTERM in one process, after writing a checkpoint.
    """
    context, cadence = task.context, task.cadence
    ring = cadence.ring
    state = TrainState(task.modules, task.optimizers, task.schedules, task.precision, task.batches)
    state.extra = {"train_time_s": 0.0, "last_log_step": 0, **task.extra}
    buffers = {f"{name}_buffer": torch.zeros(ring, dtype=task.buffer_dtype, device=task.device)
               for name in task.values}  # fmt: skip
    state.extra_tensors = {**task.tensors, **buffers}
    task.state = state
    if resume and run is not None:
        found = resume_variant(state, run, variant, task.device, truncate=False)
        early = task.after_resume(found is not None)
        if early is not None:
            return early
        truncate_after(run, variant, found)
        if state.complete:
            return task.result()
    for key, empty in buffers.items():  # a checkpoint of an older version may lack one
        state.extra_tensors.setdefault(key, empty)
    buffers = {name: state.extra_tensors[f"{name}_buffer"] for name in task.values}
    state.extra.setdefault("last_log_step", state.step // ring * ring)

    clock = TrainClock(state.extra["train_time_s"])
    watched = [buffers[name] for name in task.watch]
    check_finite = FiniteCheck(
        variant,
        state.step,
        task.device,
        ring,
        lambda idx: torch.stack([b[idx] for b in watched], dim=1),  # (k, watched)
        names=tuple(task.watch.values()),
        all_reduce=torch.distributed.all_reduce if context.enabled else None,
        losses=tuple(list(task.watch).index(name) for name in task.losses),
        extra=state.extra,
    )

    def log(records: list[dict[str, Any]], step: int) -> None:
        if run is not None:
            for record in records:
                run.log({"variant": variant, "step": step, **record})

    def sync_buffers() -> None:
        for module in task.modules.values():
            sync_bn_buffers(module, context)

    def evaluate(step: int) -> None:
        with clock.paused():  # training time leaves out every evaluation
            sync_buffers()
            log(task.evaluate(step), step)
            for observer in run.observers if run is not None and run.writer else ():
                observer.evaluated(variant, step, task.modules)  # BN statistics, TensorBoard

    saved: list[Any] = [-1, None]  # [step, path] of the newest checkpoint

    def checkpoint() -> str | None:
        if saved[0] == state.step:
            return saved[1]
        check_finite(state.step)
        sync_buffers()
        if context.enabled:  # the interval's values so far, the same on every process
            for buffer in buffers.values():
                torch.distributed.all_reduce(buffer)
                buffer /= context.world_size  # exact again for values already averaged
        task.before_checkpoint()
        path = None
        if run is not None and context.is_main:
            state.extra["train_time_s"] = clock.elapsed()
            path = str(state.save(run.checkpoints, variant, keep_last=cadence.keep_checkpoints))
        saved[:] = [state.step, path]
        return path

    if state.step == 0 and task.eval_due(0):  # the first point of each curve
        evaluate(0)
    progress = _progress_bar(cadence, state.step, variant) if context.is_main else None
    stop_at = cadence.stop_step(state.step)
    try:
        with SignalGuard() as guard:
            while state.step < stop_at:
                step = state.step
                values = task.train_step(step)
                for name, buffer in buffers.items():
                    buffer[step % ring] = values[name]
                state.step = step = step + 1
                if task.log_due(step):
                    check_finite(step)
                    first = state.extra["last_log_step"]
                    records = task.train_records(_window(buffers, first, step, ring), step)
                    log(records, step)
                    state.extra["last_log_step"] = step
                    if progress is not None:
                        progress.set_postfix(task.postfix(records[0]))
                        progress.update(step - first)
                if task.eval_due(step):
                    evaluate(step)
                state.complete = step == cadence.steps
                if task.checkpoint_due(step):
                    checkpoint()
                # Under torchrun the launcher stops every process; one process alone may not.
                if guard.received and not context.enabled:
                    raise StopRequested(guard.received, step, checkpoint())
            if state.step < cadence.steps:  # stopped early on request (stop_after)
                checkpoint()
    finally:
        state.extra["train_time_s"] = clock.elapsed()
        if progress is not None:
            progress.close()
    return task.result()


def _window(buffers: dict[str, Tensor], first: int, step: int, ring: int) -> dict[str, Tensor]:
    """The values of steps ``first .. step - 1`` from the ring buffers, averaged over the
    processes under ``torchrun``."""
    start = first % ring
    if start + step - first <= ring:
        window = {name: b[start : start + step - first] for name, b in buffers.items()}
    else:  # the interval wraps around the ring
        index = torch.arange(first, step, device=next(iter(buffers.values())).device) % ring
        window = {name: b[index] for name, b in buffers.items()}
    context = get_context()
    if context.enabled:
        stacked = torch.stack(list(window.values()))  # (values, n)
        torch.distributed.all_reduce(stacked)
        stacked /= context.world_size
        window = dict(zip(window, stacked))
    return window


def _progress_bar(cadence: Cadence, start: int, variant: str):
    if not cadence.progress:
        return None
    from classicnets.train.jobs import progress_to_parent

    in_worker = progress_to_parent(cadence.steps, start)  # the parent draws every worker's bar
    if in_worker is not None:
        return in_worker
    from tqdm.auto import tqdm

    return tqdm(total=cadence.steps, initial=start, desc=variant, unit="step", dynamic_ncols=True)
