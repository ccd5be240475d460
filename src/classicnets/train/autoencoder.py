"""Training loop for autoencoders (reconstruction of the input), with exact resume.

The same machinery as ``train.classifier`` (``TrainSettings``, optimizer, schedule, precision,
``TrainState`` checkpoints, ``SignalGuard``), with a reconstruction loss in place of the
cross-entropy on labels:

- ``"bce"``: Bernoulli cross-entropy of each pixel intensity ``x`` in [0, 1] under the
  reconstruction ``sigmoid(logit)``, ``-x log p - (1 - x) log(1 - p)``, computed from the logits
  (``F.binary_cross_entropy_with_logits``, stable for confident pixels);
- ``"mse"``: squared error ``(p - x)^2`` of the intensities.

The training loss is **summed over the pixels of an image and averaged over the batch** (nats per
image for ``"bce"``), the convention of the VAE papers (Kingma & Welling 2013), so its size does
not depend on the batch size and a reconstruction term reads in the same units as an ELBO.
Evaluation reports that ``loss`` and, per pixel (the mean over pixels and images), ``mse`` and
``bce``. Note that the cross-entropy of grey pixels is not 0 even for a perfect reconstruction: its
floor is the entropy of the targets.

Model protocol: ``model(x)`` returns intensities in (0, 1) and ``model(x, logits=True)`` their
logits, both of ``x``'s shape (``models.autoencoder.ConvAutoencoder``).

As in the classifier loop, everything a step depends on is in the checkpoint or a function of
the step, so a run resumed from step k continues bit for bit (CPU, deterministic mode); metrics
logged after the resumed checkpoint are dropped and written again; the losses since the last
check are tested for NaN and infinity before every checkpoint, so a checkpoint never holds
weights that a non-finite loss has touched; SIGINT / SIGTERM stop after the current step with a
checkpoint (``StopRequested``). One process only: under ``torchrun`` it refuses to start.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classicnets.data.batching import ShuffledBatches, iterate_in_order
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
from classicnets.train.params import param_groups
from classicnets.train.precision import (
    Precision,
    inputs_channels_last,
    maybe_channels_last,
    maybe_compile,
)
from classicnets.train.run import RunDir
from classicnets.train.settings import (
    TrainSettings,
    make_optimizer,
    make_schedule_from_settings,
)
from classicnets.train.state import TrainState

__all__ = [
    "RECONSTRUCTION_LOSSES",
    "evaluate_reconstruction",
    "reconstruction_loss",
    "train_autoencoder",
]

RECONSTRUCTION_LOSSES = ("bce", "mse")


def reconstruction_loss(logits: Tensor, target: Tensor, kind: str = "bce") -> Tensor:
    """Per-example reconstruction loss, summed over every axis but the first: shape ``[N]``.

    Args:
        logits: the model's logits, ``[N, ...]``.
        target: intensities in [0, 1], the shape of ``logits``.
        kind: ``"bce"`` (Bernoulli cross-entropy, nats) or ``"mse"`` (squared error of
            ``sigmoid(logits)``).
    """
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    elif kind == "mse":
        per_pixel = (torch.sigmoid(logits) - target).square()
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(RECONSTRUCTION_LOSSES)}")
    return per_pixel.flatten(1).sum(dim=1)


@torch.no_grad()
def evaluate_reconstruction(
    model: nn.Module, x: Tensor, loss: str = "bce", batch_size: int = 2000
) -> dict[str, float]:
    """Reconstruction errors of ``model`` on ``x``, in inference mode (the previous mode is
    restored): ``loss`` (the training loss: per image, averaged over images), and per pixel
    ``mse`` and ``bce`` (nats). Accumulated in float64."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=x.device)
    for sl in iterate_in_order(len(x), batch_size):
        logits = model(x[sl], logits=True).float()
        totals[0] += reconstruction_loss(logits, x[sl], "bce").double().sum()
        totals[1] += reconstruction_loss(logits, x[sl], "mse").double().sum()
    model.train(was_training)
    bce, mse = (totals / len(x)).tolist()  # per image
    pixels = x[0].numel()
    return {"loss": bce if loss == "bce" else mse, "mse": mse / pixels, "bce": bce / pixels}


def train_autoencoder(
    model: nn.Module,
    data: Any,
    settings: TrainSettings,
    run: RunDir | None = None,
    variant: str = "model",
    loss: str = "bce",
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``model`` to reconstruct ``data.train_x``, evaluating on ``data.test_x``.

    Args:
        model: the autoencoder (``model(x, logits=True)`` gives logits), on the data's device,
            initialized from the seed.
        data: anything with whole-split tensors ``train_x`` and ``test_x`` in [0, 1] (e.g.
            ``ClassificationData``; labels are not used).
        settings: steps, optimizer, schedule, precision, logging and checkpoint intervals
            (``sync_bn`` does not apply: one process).
        run: the run folder to log to and checkpoint into (None: no files).
        variant: the name of this model within the run (checkpoint prefix, ``variant`` field).
        loss: ``"bce"`` or ``"mse"`` (see the module docstring).
        resume: continue from the newest valid checkpoint of ``variant`` if there is one.

    Returns:
        ``{"step", "complete", "train_time_s", "test_loss", "test_mse", "test_bce"}``.

    Raises:
        NonFiniteLossError: a training loss is NaN or infinite (the newest checkpoint, written
            before that step, stays intact).
        StopRequested: on SIGINT / SIGTERM, after writing a checkpoint.
        ValueError: an unknown loss, or a distributed (torchrun) context.
    """
    if loss not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(RECONSTRUCTION_LOSSES)}")
    if get_context().enabled:
        raise ValueError("train_autoencoder runs in one process; start it without torchrun")
    device = data.train_x.device
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
    state.extra = {"train_time_s": 0.0, "last_train_loss": None}

    def evaluation(prefix: str) -> dict[str, float]:
        metrics = evaluate_reconstruction(model, data.test_x, loss, settings.eval_batch_size)
        return {f"{prefix}{k}": v for k, v in metrics.items()}

    if resume and run is not None:
        resume_variant(state, run, variant, device)
        if state.complete:
            return {
                "step": state.step,
                "complete": True,
                "train_time_s": state.extra["train_time_s"],
                **evaluation("test_"),
            }

    train_model = maybe_compile(model, settings.compile)
    loss_buffer = state.extra_tensors["loss_buffer"]
    norm_buffer = state.extra_tensors["grad_norm_buffer"]
    clock = TrainClock(state.extra["train_time_s"])
    check_finite = FiniteCheck(
        variant, state.step, device, log_every, loss_buffer.__getitem__, extra=state.extra
    )

    def checkpoint() -> str | None:
        return save_checkpoint(state, run, variant, settings.keep_checkpoints, clock, check_finite)

    def log_eval(step: int) -> dict[str, Any]:
        record = {"variant": variant, "step": step, "split": "test", **evaluation("")}
        if run is not None:
            run.log(record)
        return record

    last_eval = {}
    if state.step == 0:  # step 0: the first point of each curve
        with clock.paused():
            last_eval = log_eval(0)
    progress = _progress(settings, state.step, variant)
    stop_at = end_step(settings.steps, state.step, settings.stop_after)
    try:
        with SignalGuard() as guard:
            while state.step < stop_at:
                step = state.step
                index = next(batches)
                schedule.apply(optimizer, step, batches.epoch)
                xb = inputs_channels_last(data.train_x[index], settings.channels_last)
                train_model.train()
                with precision.autocast():
                    logits = train_model(xb, logits=True)
                batch_loss = reconstruction_loss(logits.float(), xb.float(), loss).mean()
                optimizer.zero_grad(set_to_none=True)
                precision.backward(batch_loss)
                if settings.clip_grad_norm:
                    precision.unscale_(optimizer)
                    norm = nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad_norm)
                    norm_buffer[step % log_every] = norm.detach()
                precision.step(optimizer)
                precision.update()
                loss_buffer[step % log_every] = batch_loss.detach()
                state.step = step = step + 1
                if step % log_every == 0 or step == settings.steps:
                    check_finite(step)
                    n = (step - 1) % log_every + 1
                    mean_loss = loss_buffer[:n].double().mean().item()
                    record = {
                        "variant": variant,
                        "step": step,
                        "split": "train",
                        "loss": mean_loss,
                        "lr": optimizer.param_groups[0]["lr"],
                    }
                    if settings.clip_grad_norm:
                        record["grad_norm"] = norm_buffer[:n].double().mean().item()
                    if run is not None:
                        run.log(record)
                    state.extra["last_train_loss"] = mean_loss
                    if progress is not None:
                        test_mse = last_eval.get("mse", float("nan"))
                        progress.set_postfix(loss=f"{mean_loss:.2f}", test_mse=f"{test_mse:.4f}")
                        progress.update(n)
                if step % settings.eval_every == 0 or step == settings.steps:
                    with clock.paused():
                        last_eval = log_eval(step)
                    if hasattr(schedule, "observe") and state.extra["last_train_loss"] is not None:
                        schedule.observe(state.extra["last_train_loss"])  # plateau: training loss
                finish_step(
                    state, step, settings.steps, settings.checkpoint_every, checkpoint, guard
                )
            if state.step < settings.steps:  # stopped early on request (stop_after)
                checkpoint()
    finally:
        if progress is not None:
            progress.close()
    result: dict[str, Any] = {
        "step": state.step,
        "complete": state.complete,
        "train_time_s": clock.elapsed(),
    }
    if last_eval:
        result.update({f"test_{k}": last_eval[k] for k in ("loss", "mse", "bce")})
    return result


def _progress(settings: TrainSettings, start: int, variant: str):
    if not settings.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=settings.steps, initial=start, desc=variant, unit="step", dynamic_ncols=True)
