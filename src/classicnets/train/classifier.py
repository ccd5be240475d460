"""Training loop for classifiers, with exact resume.

One explicit loop: ``model.train()`` before each optimization step and ``model.eval()`` inside
``evaluate``, at the call sites, so batch normalization uses batch statistics exactly when it
should. Data lives in whole-split tensors (``ClassificationData``) and batches are index slices.

Everything a step depends on is either saved in the checkpoint (weights and BN buffers, optimizer
state, RNG states, data position) or a pure function of the step (the learning rate), so a run
resumed from step k continues bit for bit like an uninterrupted run on CPU in deterministic mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classicnets.data.batching import ShuffledBatches, iterate_in_order
from classicnets.nn.batchnorm import convert_sync_batchnorm
from classicnets.train.distributed import get_context, sync_bn_buffers, wrap_ddp
from classicnets.train.faults import SignalGuard, StopRequested
from classicnets.train.loop import (
    FiniteCheck,
    TrainClock,
    checkpoint_due,
    end_step,
    resume_variant,
)
from classicnets.train.params import param_groups
from classicnets.train.precision import (
    Precision,
    inputs_channels_last,
    maybe_channels_last,
    maybe_compile,
)
from classicnets.train.run import RunDir
from classicnets.train.settings import (
    ClassificationData,
    TrainSettings,
    make_optimizer,
    make_schedule_from_settings,
)
from classicnets.train.state import TrainState

__all__ = ["evaluate", "train_classifier"]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 2000) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in inference mode.

    The model's previous train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for sl in iterate_in_order(len(x), batch_size):
        logits = model(x[sl])
        total_loss += F.cross_entropy(logits, y[sl], reduction="sum").double()
        correct += (logits.argmax(dim=1) == y[sl]).sum()
    model.train(was_training)
    n = len(x)
    return {"loss": total_loss.item() / n, "accuracy": correct.item() / n}


EvalHook = Callable[[nn.Module], dict[str, Any]]


def train_classifier(
    model: nn.Module,
    data: ClassificationData,
    settings: TrainSettings,
    run: RunDir | None = None,
    variant: str = "model",
    eval_hooks: list[EvalHook] | None = None,
    resume: bool = False,
    augment: Callable[[Tensor, int], Tensor] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``data.train_*`` with cross-entropy, evaluating on ``data.test_*``.

    Args:
        model: the classifier, already on the data's device and initialized from the seed.
        data: whole splits, on the device to train on.
        settings: steps, optimizer, schedule, precision, logging and checkpoint intervals.
        run: the run folder to log to and checkpoint into (None: no files).
        variant: the name of this model within the run (prefix of its checkpoints and the
            ``variant`` field of its metrics).
        eval_hooks: functions ``hook(model) -> dict`` called at every evaluation (model in eval
            mode); their results are logged with the test metrics.
        resume: continue from the newest valid checkpoint of ``variant`` if there is one.
        augment: ``augment(batch, step) -> batch`` applied to each training batch; it must draw
            its randomness from ``step`` (not a global generator) so that resume stays exact.

    Returns:
        ``{"step", "complete", "test_accuracy", "test_loss", "train_time_s"}``.

    Raises:
        NonFiniteLossError: when a training loss is NaN or infinite (the run stops; the newest
            checkpoint, written before that step, stays intact).
        StopRequested: on SIGINT/SIGTERM, after writing a checkpoint.
    """
    ctx = get_context()
    device = data.train_x.device
    hooks = eval_hooks or []
    if settings.sync_bn and ctx.enabled:
        model = convert_sync_batchnorm(model)
    maybe_channels_last(model, settings.channels_last)
    precision = Precision(settings.precision, str(device))
    optimizer = make_optimizer(param_groups(model, weight_decay=settings.weight_decay), settings)
    schedule = make_schedule_from_settings(settings)
    batches = ShuffledBatches(len(data.train_x), settings.batch_size, settings.seed, device=device)
    state = TrainState({"model": model}, {"model": optimizer}, {"lr": schedule}, precision, batches)
    log_every = max(1, settings.log_every)
    state.extra_tensors = {
        "loss_buffer": torch.zeros(log_every, device=device),
        "grad_norm_buffer": torch.zeros(log_every, device=device),
    }
    state.extra = {"correct": 0, "seen": 0, "train_time_s": 0.0, "last_train_loss": None}
    if resume and run is not None:
        resume_variant(state, run, variant, device, truncate=ctx.is_main)
        if state.complete:
            result = {"step": state.step, "complete": True}
            result["train_time_s"] = state.extra["train_time_s"]
            result.update(_final_eval(model, data, settings, hooks))
            return result

    train_model = maybe_compile(wrap_ddp(model, ctx), settings.compile)
    loss_buffer = state.extra_tensors["loss_buffer"]
    norm_buffer = state.extra_tensors["grad_norm_buffer"]
    correct = torch.tensor(state.extra["correct"], dtype=torch.long, device=device)
    clock = TrainClock(state.extra["train_time_s"])
    all_reduce = torch.distributed.all_reduce if ctx.enabled else None
    check_finite = FiniteCheck(
        variant,
        state.step,
        device,
        log_every,
        loss_buffer.__getitem__,
        all_reduce=all_reduce,
        extra=state.extra,
    )

    def checkpoint() -> str | None:
        check_finite(state.step)
        sync_bn_buffers(model, ctx)
        if run is None or not ctx.is_main:
            return None
        state.extra.update(correct=int(correct), train_time_s=clock.elapsed())
        return str(state.save(run.checkpoints, variant, keep_last=settings.keep_checkpoints))

    def log_eval(step: int) -> dict[str, Any]:
        sync_bn_buffers(model, ctx)
        record = {"variant": variant, "step": step, "split": "test"}
        record.update(_final_eval(model, data, settings, hooks, prefix=""))
        if run is not None:
            run.log(record)
        return record

    last_eval = {}
    if state.step == 0:  # step 0: the first point of each curve
        with clock.paused():  # training time excludes every evaluation, step 0's too
            last_eval = log_eval(0)
    progress = _progress_bar(settings, state.step, variant) if ctx.is_main else None
    stop_at = end_step(settings.steps, state.step, settings.stop_after)
    local = ctx.local_slice(settings.batch_size) if ctx.enabled else slice(None)
    try:
        with SignalGuard() as guard:
            while state.step < stop_at:
                step = state.step
                index = next(batches)
                if ctx.enabled:
                    index = index[local]  # this process's slice of the global batch
                schedule.apply(optimizer, step, batches.epoch)
                # index_select is the same gather as data.train_x[index] at a quarter of the
                # per-call cost of advanced indexing (it matters at small batches).
                xb = data.train_x.index_select(0, index)
                if augment is not None:
                    xb = augment(xb, step)
                xb = inputs_channels_last(xb, settings.channels_last)
                yb = data.train_y.index_select(0, index)
                if not train_model.training:  # evaluation switched to eval(): back to train
                    train_model.train()
                with precision.autocast():
                    logits = train_model(xb)
                loss = F.cross_entropy(logits.float(), yb)
                optimizer.zero_grad(set_to_none=True)
                precision.backward(loss)
                if settings.clip_grad_norm:
                    precision.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(
                        model.parameters(), settings.clip_grad_norm
                    )
                    norm_buffer[step % log_every] = norm.detach()
                precision.step(optimizer)
                precision.update()
                loss_buffer[step % log_every] = loss.detach()
                correct += (logits.detach().argmax(dim=1) == yb).sum()
                state.extra["seen"] += len(yb)
                state.step = step = step + 1
                if step % log_every == 0 or step == settings.steps:
                    check_finite(step)
                    n = (step - 1) % log_every + 1
                    stats = torch.stack(
                        [loss_buffer[:n].sum(), correct.double(), norm_buffer[:n].sum()]
                    ).double()
                    seen = torch.tensor(float(state.extra["seen"]), device=device)
                    if ctx.enabled:
                        torch.distributed.all_reduce(stats)
                        torch.distributed.all_reduce(seen)
                    ranks = ctx.world_size
                    mean_loss = stats[0].item() / (n * ranks)
                    accuracy = stats[1].item() / max(1.0, seen.item())
                    record = {
                        "variant": variant,
                        "step": step,
                        "split": "train",
                        "loss": mean_loss,
                        "accuracy": accuracy,
                        "lr": optimizer.param_groups[0]["lr"],
                    }
                    if settings.clip_grad_norm:
                        record["grad_norm"] = stats[2].item() / (n * ranks)
                    if run is not None:
                        run.log(record)
                    state.extra["last_train_loss"] = mean_loss
                    correct.zero_()
                    state.extra["seen"] = 0
                    if progress is not None:
                        progress.set_postfix(
                            loss=f"{mean_loss:.4f}",
                            acc=f"{accuracy:.3f}",
                            test_acc=f"{last_eval.get('accuracy', float('nan')):.4f}",
                        )
                        progress.update(n)
                if step % settings.eval_every == 0 or step == settings.steps:
                    with clock.paused():
                        last_eval = log_eval(step)
                    if hasattr(schedule, "observe") and state.extra["last_train_loss"] is not None:
                        schedule.observe(state.extra["last_train_loss"])  # plateau: training loss
                state.complete = step == settings.steps
                if checkpoint_due(step, settings.steps, settings.checkpoint_every):
                    checkpoint()
                if guard.received and not ctx.enabled:
                    raise StopRequested(guard.received, step, checkpoint())
            if state.step < settings.steps:  # stopped early on request (stop_after)
                checkpoint()
    finally:
        if progress is not None:
            progress.close()
    result = {"step": state.step, "complete": state.complete, "train_time_s": clock.elapsed()}
    if last_eval:
        result["test_accuracy"] = last_eval["accuracy"]
        result["test_loss"] = last_eval["loss"]
    return result


def _final_eval(
    model: nn.Module,
    data: ClassificationData,
    settings: TrainSettings,
    hooks: list[EvalHook],
    prefix: str = "test_",
) -> dict[str, Any]:
    metrics = evaluate(model, data.test_x, data.test_y, settings.eval_batch_size)
    out = {f"{prefix}{k}": v for k, v in metrics.items()}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for hook in hooks:
            out.update(hook(model))
    model.train(was_training)
    return out


def _progress_bar(settings: TrainSettings, start: int, variant: str):
    if not settings.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=settings.steps,
        initial=start,
        desc=variant,
        unit="step",
        dynamic_ncols=True,
        leave=True,
    )
