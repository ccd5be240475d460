"""Training loop for classifiers, with exact resume.

One explicit loop: ``model.train()`` before each optimization step and ``model.eval()`` inside
``evaluate``, at the call sites, so batch normalization uses batch statistics exactly when it
should. Data lives in whole-split tensors (``ClassificationData``) and batches are index slices.

Everything a step depends on is either saved in the checkpoint (weights and BN buffers, optimizer
state, RNG states, data position) or a pure function of the step (the learning rate), so a run
resumed from step k continues bit for bit like an uninterrupted run on CPU in deterministic mode.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classicnets.data.batching import ShuffledBatches, iterate_in_order
from classicnets.train.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    pack_optimizer,
    restore_rng_state,
    rng_state_tensors,
    save_checkpoint,
    unpack_optimizer,
)
from classicnets.train.run import RunDir

__all__ = [
    "ClassificationData",
    "NonFiniteLossError",
    "TrainSettings",
    "evaluate",
    "learning_rate_at",
    "make_optimizer",
    "set_deterministic",
    "train_classifier",
]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the value."""


@dataclass
class ClassificationData:
    """Whole splits as tensors: inputs float ``[N, ...]``, labels int64 ``[N]``."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def to(self, device: torch.device | str) -> ClassificationData:
        return ClassificationData(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.train_x, self.train_y, self.test_x, self.test_y


@dataclass
class TrainSettings:
    """How one model is trained. Field meanings follow the experiment configs.

    Attributes:
        steps: optimization steps.
        batch_size: examples per step.
        optimizer: "sgd" or "adam".
        lr: base learning rate.
        momentum: SGD momentum (0 for plain SGD).
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 penalty through the optimizer.
        schedule: "constant", "step" (times ``lr_gamma`` every ``lr_step_every`` steps) or
            "cosine" (to 0 at the last step, after ``warmup_steps`` of linear warm-up).
        lr_step_every, lr_gamma, warmup_steps: schedule parameters.
        eval_every: evaluate on the test split every this many steps (and at the end).
        log_every: write the mean training loss and accuracy every this many steps.
        checkpoint_every: checkpoint every this many steps (and at the end); 0 for end only.
        keep_checkpoints: how many checkpoints of each model to keep.
        seed: seed of the weights' initialization (set by the caller) and of the data order.
        eval_batch_size: batch size of evaluation (no effect on the result).
        progress: show a tqdm progress bar.
        stop_after: stop (with a checkpoint) after this many steps of the run, as if killed;
            for tests and demonstrations of resume. None runs to the end.
    """

    steps: int
    batch_size: int
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    lr_step_every: int = 10_000
    lr_gamma: float = 0.1
    warmup_steps: int = 0
    eval_every: int = 1000
    log_every: int = 100
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    seed: int = 0
    eval_batch_size: int = 2000
    progress: bool = True
    stop_after: int | None = None


def set_deterministic(enabled: bool) -> None:
    """Ask PyTorch for deterministic kernels (bit-identical reruns on CPU; on CUDA where
    deterministic kernels exist, with cuBLAS's workspace configured as it requires)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.deterministic = enabled
        torch.backends.cudnn.benchmark = not enabled


def make_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer:
    """SGD (with optional momentum / Nesterov) or Adam, from ``settings``."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=settings.nesterov,
            weight_decay=settings.weight_decay,
        )
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; choose 'sgd' or 'adam'")


def learning_rate_at(step: int, settings: TrainSettings) -> float:
    """The learning rate of optimization step ``step`` (0-based), in closed form.

    >>> s = TrainSettings(steps=100, batch_size=1, lr=1.0, schedule="step", lr_step_every=30,
    ...                   lr_gamma=0.5)
    >>> [learning_rate_at(k, s) for k in (0, 29, 30, 99)]
    [1.0, 1.0, 0.5, 0.125]
    """
    base = settings.lr
    if settings.schedule == "constant":
        return base
    if settings.schedule == "step":
        return base * settings.lr_gamma ** (step // settings.lr_step_every)
    if settings.schedule == "cosine":
        if step < settings.warmup_steps:
            return base * (step + 1) / settings.warmup_steps
        span = max(1, settings.steps - settings.warmup_steps)
        progress = min(1.0, (step - settings.warmup_steps) / span)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(
        f"unknown schedule {settings.schedule!r}; choose 'constant', 'step' or 'cosine'"
    )


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


def _snapshot(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: ShuffledBatches,
    step: int,
    settings: TrainSettings,
    complete: bool,
    interval: dict[str, Any],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_state = pack_optimizer(optimizer, "optimizer")
    tensors.update(opt_tensors)
    tensors.update(rng_state_tensors())
    # The partly filled logging interval, so that the first log line after a resume is the same.
    tensors["train.loss_buffer"] = interval["loss_buffer"]
    state = {
        "step": step,
        "complete": complete,
        "optimizer": opt_state,
        "data_order": batches.state_dict(),
        "interval": {"correct": int(interval["correct"]), "seen": interval["seen"]},
        "train_time_s": interval["train_time_s"],
        "settings": settings.__dict__,
    }
    return tensors, state


def load_model_weights(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load the ``model.*`` entries of a checkpoint into ``model`` (strict)."""
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)


def train_classifier(
    model: nn.Module,
    data: ClassificationData,
    settings: TrainSettings,
    run: RunDir | None = None,
    variant: str = "model",
    eval_hooks: list[EvalHook] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``model`` on ``data.train_*`` with cross-entropy, evaluating on ``data.test_*``.

    Args:
        model: the classifier, already on the data's device and initialized from the seed.
        data: whole splits, on the device to train on.
        settings: steps, optimizer, schedule, logging and checkpoint intervals.
        run: the run folder to log to and checkpoint into (None: no files).
        variant: the name of this model within the run (prefix of its checkpoints and the
            ``variant`` field of its metrics).
        eval_hooks: functions ``hook(model) -> dict`` called at every evaluation (model in eval
            mode); their results are logged with the test metrics.
        resume: continue from the newest valid checkpoint of ``variant`` if there is one.

    Returns:
        ``{"step", "complete", "test_accuracy", "test_loss", "train_time_s"}``.

    Raises:
        NonFiniteLossError: when a training loss is NaN or infinite (the run stops; the last
            checkpoint, written before that step, stays intact).
    """
    device = data.train_x.device
    optimizer = make_optimizer(model.parameters(), settings)
    batches = ShuffledBatches(len(data.train_x), settings.batch_size, settings.seed, device=device)
    hooks = eval_hooks or []
    log_every = max(1, settings.log_every)
    interval = {
        "loss_buffer": torch.zeros(log_every, device=device),
        "correct": torch.zeros((), dtype=torch.long, device=device),
        "seen": 0,
        "train_time_s": 0.0,
    }
    start_step = 0
    if resume and run is not None:
        found = latest_checkpoint(run.checkpoints, variant)
        if found is not None:
            tensors, state, _ = found
            load_model_weights(model, tensors)
            unpack_optimizer(optimizer, tensors, state["optimizer"], "optimizer")
            batches.load_state_dict(state["data_order"])
            restore_rng_state(tensors)
            start_step = int(state["step"])
            interval["loss_buffer"] = tensors["train.loss_buffer"].to(device)
            interval["correct"].fill_(state["interval"]["correct"])
            interval["seen"] = int(state["interval"]["seen"])
            interval["train_time_s"] = float(state["train_time_s"])
            # The resumed run writes again, identically, whatever was logged after the checkpoint.
            run.truncate_metrics(
                lambda r: r.get("variant") != variant or int(r.get("step", 0)) <= start_step
            )
            if state.get("complete"):
                result = {
                    "step": start_step,
                    "complete": True,
                    "train_time_s": float(state["train_time_s"]),
                }
                result.update(_final_eval(model, data, settings, hooks))
                return result

    def checkpoint(step: int, complete: bool) -> None:
        if run is None:
            return
        interval["train_time_s"] = train_time + (time.perf_counter() - tick)
        tensors, state = _snapshot(model, optimizer, batches, step, settings, complete, interval)
        save_checkpoint(
            run.checkpoints,
            checkpoint_name(variant, step),
            tensors,
            state,
            keep_last=settings.keep_checkpoints,
        )

    def log_eval(step: int) -> dict[str, Any]:
        record = {"variant": variant, "step": step, "split": "test"}
        record.update(_final_eval(model, data, settings, hooks, prefix=""))
        if run is not None:
            run.log(record)
        return record

    if start_step == 0:
        # Step 0 is the untrained model: the first point of every curve.
        last_eval = log_eval(0)
    else:
        last_eval = {}
    progress = _progress_bar(settings, start_step, variant)
    loss_buffer = interval["loss_buffer"]
    correct = interval["correct"]
    train_time = interval["train_time_s"]
    tick = time.perf_counter()
    end_step = settings.steps
    if settings.stop_after is not None:
        end_step = min(end_step, start_step + settings.stop_after)
    step = start_step
    try:
        while step < end_step:
            lr = learning_rate_at(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = next(batches)
            xb, yb = data.train_x[index], data.train_y[index]
            model.train()
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_buffer[step % log_every] = loss.detach()
            correct += (logits.detach().argmax(dim=1) == yb).sum()
            interval["seen"] += len(yb)
            step += 1
            if step % log_every == 0 or step == settings.steps:
                n = (step - 1) % log_every + 1
                losses = loss_buffer[:n]
                finite = torch.isfinite(losses)
                if not bool(finite.all()):
                    bad = int((~finite).nonzero()[0])
                    bad_step = step - n + bad + 1
                    raise NonFiniteLossError(
                        f"{variant}: training loss is {losses[bad].item()} at step {bad_step} "
                        f"(learning rate {lr:g}); stopped. The last checkpoint before it is kept."
                    )
                mean_loss = losses.mean().item()
                accuracy = correct.item() / max(1, interval["seen"])
                if run is not None:
                    run.log(
                        {
                            "variant": variant,
                            "step": step,
                            "split": "train",
                            "loss": mean_loss,
                            "accuracy": accuracy,
                            "lr": lr,
                        }
                    )
                correct.zero_()
                interval["seen"] = 0
                if progress is not None:
                    progress.set_postfix(
                        loss=f"{mean_loss:.4f}",
                        acc=f"{accuracy:.3f}",
                        test_acc=f"{last_eval.get('accuracy', float('nan')):.4f}",
                    )
                    progress.update(n)
            if step % settings.eval_every == 0 or step == settings.steps:
                train_time += time.perf_counter() - tick
                last_eval = log_eval(step)
                tick = time.perf_counter()
            complete = step == settings.steps
            if complete or (settings.checkpoint_every and step % settings.checkpoint_every == 0):
                checkpoint(step, complete)
        if step < settings.steps:  # stopped early on request (stop_after): keep a checkpoint
            checkpoint(step, False)
    finally:
        if progress is not None:
            progress.close()
    train_time += time.perf_counter() - tick
    result = {"step": step, "complete": step == settings.steps, "train_time_s": train_time}
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
