"""Training loop for (conditional) VAEs, with exact resume.

It has the properties of ``train.classifier.train_classifier``: everything a step depends on
(weights, Adam state, the global RNG that draws dropout masks and the reparameterization noise,
the data position, the loss buffers of the current log interval) is in the checkpoint, so a run
resumed from step k continues bit for bit like an uninterrupted one on CPU in deterministic mode;
on resume the metrics logged after the checkpoint are dropped and written again; losses are
checked for NaN/inf before every checkpoint (a bad one is never saved); SIGINT/SIGTERM write a
checkpoint and raise ``StopRequested``.

Logged records (``metrics.jsonl``): every ``log_every`` steps ``split="train"`` with the batch
means of ``loss``, ``recon`` and ``kl`` over the interval; every ``eval_every`` steps
``split="test"`` with ``loss``, ``recon``, ``kl`` over the whole test split and, for the
cross-entropy objective, ``neg_elbo`` in nats (see ``evaluate_vae``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from classicnets.data.batching import ShuffledBatches, iterate_in_order
from classicnets.models.vae import VAE, kl_divergence, reconstruction_loss, vae_loss
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
from classicnets.train.precision import Precision, maybe_compile
from classicnets.train.run import RunDir
from classicnets.train.settings import (
    ClassificationData,
    TrainSettings,
    make_optimizer,
    make_schedule_from_settings,
)
from classicnets.train.state import TrainState

__all__ = ["evaluate_vae", "evaluation_noise", "train_vae"]

EvalHook = Callable[[nn.Module], dict[str, Any]]
_TERMS = ("loss", "recon", "kl")


def evaluation_noise(num_examples: int, latent_size: int, seed: int) -> Tensor:
    """The reparameterization noise of evaluation: row i is the draw for example i, the same
    whatever the batch size (one CPU generator seeded with ``seed``, float32 ``[N, latent]``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_examples, latent_size, generator=g)


@torch.no_grad()
def evaluate_vae(
    model: VAE,
    x: Tensor,
    y: Tensor | None = None,
    reconstruction: str = "bce",
    seed: int = 0,
    batch_size: int = 1000,
) -> dict[str, float]:
    """The objective on ``(x, y)`` in eval mode (no dropout), one seeded sample per image.

    Each example gets one draw ``z = mu + scale * eps`` with ``eps`` from
    ``evaluation_noise(len(x), latent, seed)``, so the result depends on the seed but not on
    ``batch_size`` (per-example sums are accumulated in float64). The KL is analytic.

    Returns:
        ``{"loss", "recon", "kl"}`` (means over the examples of the objective's terms, with
        ``reconstruction``'s error) and, for ``"bce"``, ``"neg_elbo"``: the single-sample
        negative ELBO in nats (equal to ``loss``), an unbiased estimate of the true negative
        ELBO.
    """
    was_training = model.training
    model.eval()
    noise = evaluation_noise(len(x), model.latent_size, seed)
    totals = torch.zeros(2, dtype=torch.float64)
    for sl in iterate_in_order(len(x), batch_size):
        yb = y[sl] if (model.conditional and y is not None) else None
        out = model(x[sl], yb, noise=noise[sl].to(x.device))
        recon = reconstruction_loss(out.logits, x[sl], reconstruction)
        kl = kl_divergence(out.mu, out.scale)
        totals += torch.stack([recon.double().sum(), kl.double().sum()]).cpu()
    model.train(was_training)
    recon, kl = (totals / len(x)).tolist()
    metrics = {"loss": recon + kl, "recon": recon, "kl": kl}
    if reconstruction == "bce":
        metrics["neg_elbo"] = recon + kl
    return metrics


def train_vae(
    model: VAE,
    data: ClassificationData,
    settings: TrainSettings,
    run: RunDir | None = None,
    variant: str = "vae",
    reconstruction: str = "bce",
    eval_seed: int = 0,
    eval_hooks: list[EvalHook] | None = None,
    resume: bool = False,
    kl_warmup_steps: int = 0,
) -> dict[str, Any]:
    """Train ``model`` on ``data.train_x`` (and labels, if conditional), evaluating on the test
    split.

    Args:
        model: the (conditional) VAE, on the data's device, initialized from the seed.
        data: whole splits; images float ``[N, 1, 28, 28]`` in [0, 1], labels ``[N]``.
        settings: steps, optimizer, schedule, precision, intervals (``TrainSettings``; the
            ``sync_bn`` and ``channels_last`` switches do not apply to this MLP).
        run: the run folder to log to and checkpoint into (None: no files).
        variant: the model's name within the run (checkpoint prefix, ``variant`` of metrics).
        reconstruction: ``"bce"`` or ``"mse"`` (``models.vae.reconstruction_loss``).
        eval_seed: seed of the evaluation noise (``evaluate_vae``).
        eval_hooks: ``hook(model) -> dict`` called at each evaluation (eval mode), logged.
        resume: continue from the newest valid checkpoint of ``variant`` if there is one.
        kl_warmup_steps: the KL term's weight in the gradient rises linearly from
            ``1 / kl_warmup_steps`` to 1 over this many steps (KL annealing, Bowman et al. 2016;
            Sonderby et al. 2016), a pure function of the step; 0: weight 1 throughout. The
            logged ``loss`` is always ``recon + kl``.

    Returns:
        ``{"step", "complete", "train_time_s", "test_loss", "test_recon", "test_kl"}`` and
        ``"test_neg_elbo"`` for ``"bce"``.

    Raises:
        NonFiniteLossError: a training loss is NaN or infinite (the newest checkpoint, written
            before that step, stays intact).
        StopRequested: on SIGINT/SIGTERM, after writing a checkpoint.
    """
    if get_context().enabled:
        raise RuntimeError("the VAE loop runs in one process; torchrun/DDP is not supported")
    device = data.train_x.device
    hooks = eval_hooks or []
    precision = Precision(settings.precision, str(device))
    optimizer = make_optimizer(param_groups(model, weight_decay=settings.weight_decay), settings)
    schedule = make_schedule_from_settings(settings)
    batches = ShuffledBatches(len(data.train_x), settings.batch_size, settings.seed, device=device)
    state = TrainState({"model": model}, {"model": optimizer}, {"lr": schedule}, precision, batches)
    log_every = max(1, settings.log_every)
    # Row t % log_every holds the loss, recon and kl of step t (resumed mid-interval intact).
    state.extra_tensors = {"loss_buffer": torch.zeros(3, log_every, device=device)}
    state.extra = {"train_time_s": 0.0, "last_train_loss": None}

    def final_eval(prefix: str) -> dict[str, Any]:
        y = data.test_y if model.conditional else None
        metrics = evaluate_vae(
            model, data.test_x, y, reconstruction, eval_seed, settings.eval_batch_size
        )
        out = {f"{prefix}{k}": v for k, v in metrics.items()}
        model.eval()
        with torch.no_grad():
            for hook in hooks:
                out.update(hook(model))
        model.train()
        return out

    if resume and run is not None:
        resume_variant(state, run, variant, device)
        if state.complete:
            return {
                "step": state.step,
                "complete": True,
                "train_time_s": state.extra["train_time_s"],
                **final_eval("test_"),
            }

    train_model = maybe_compile(model, settings.compile)
    buffer = state.extra_tensors["loss_buffer"]
    clock = TrainClock(state.extra["train_time_s"])
    check_finite = FiniteCheck(
        variant, state.step, device, log_every, lambda idx: buffer[0, idx], extra=state.extra
    )

    def checkpoint() -> str | None:
        return save_checkpoint(state, run, variant, settings.keep_checkpoints, clock, check_finite)

    def log_eval(step: int) -> dict[str, Any]:
        record = {"variant": variant, "step": step, "split": "test", **final_eval("")}
        if run is not None:
            run.log(record)
        return record

    last_eval = {}
    if state.step == 0:  # step 0: the first point of each curve
        with clock.paused():
            last_eval = log_eval(0)
    progress = _progress_bar(settings, state.step, variant)
    stop_at = end_step(settings.steps, state.step, settings.stop_after)
    try:
        with SignalGuard() as guard:
            while state.step < stop_at:
                step = state.step
                index = next(batches)
                schedule.apply(optimizer, step, batches.epoch)
                xb = data.train_x[index]
                yb = data.train_y[index] if model.conditional else None
                train_model.train()
                with precision.autocast():
                    output = train_model(xb, yb)
                terms = vae_loss(output, xb, reconstruction)
                objective = terms["loss"]
                if step < kl_warmup_steps:
                    objective = terms["recon"] + (step + 1) / kl_warmup_steps * terms["kl"]
                optimizer.zero_grad(set_to_none=True)
                precision.backward(objective)
                if settings.clip_grad_norm:
                    precision.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad_norm)
                precision.step(optimizer)
                precision.update()
                buffer[:, step % log_every] = torch.stack([terms[k].detach() for k in _TERMS])
                state.step = step = step + 1
                if step % log_every == 0 or step == settings.steps:
                    check_finite(step)
                    n = (step - 1) % log_every + 1
                    means = (buffer[:, :n].double().sum(dim=1) / n).tolist()
                    record = {"variant": variant, "step": step, "split": "train"}
                    record.update(zip(_TERMS, means))
                    record["lr"] = optimizer.param_groups[0]["lr"]
                    if run is not None:
                        run.log(record)
                    state.extra["last_train_loss"] = means[0]
                    if progress is not None:
                        progress.set_postfix(loss=f"{means[0]:.2f}", kl=f"{means[2]:.2f}")
                        progress.update(n)
                if step % settings.eval_every == 0 or step == settings.steps:
                    with clock.paused():
                        last_eval = log_eval(step)
                    if hasattr(schedule, "observe") and state.extra["last_train_loss"] is not None:
                        schedule.observe(state.extra["last_train_loss"])
                finish_step(
                    state, step, settings.steps, settings.checkpoint_every, checkpoint, guard
                )
            if state.step < settings.steps:  # stopped early on request (stop_after)
                checkpoint()
    finally:
        if progress is not None:
            progress.close()
    result = {"step": state.step, "complete": state.complete, "train_time_s": clock.elapsed()}
    result.update({f"test_{k}": v for k, v in last_eval.items() if k in (*_TERMS, "neg_elbo")})
    return result


def _progress_bar(settings: TrainSettings, start: int, variant: str):
    if not settings.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=settings.steps, initial=start, desc=variant, unit="step", dynamic_ncols=True)
