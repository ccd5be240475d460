"""(Conditional) VAEs: the negative ELBO, with exact resume (``fit`` drives the step).

``fit`` drives the step (``VAETask``) as it drives every paradigm's: everything a step depends on
(weights, Adam state, the global RNG that draws dropout masks and the reparameterization noise,
the data position, the values of the current log interval) is in the checkpoint, so a run resumed
from step k continues bit for bit like an uninterrupted one on CPU in deterministic mode; losses
are checked for NaN/inf before every checkpoint; ``torchrun`` splits the global batch.

Logged records (``metrics.jsonl``): every ``log_every`` steps ``split="train"`` with the batch
means of ``loss``, ``recon`` and ``kl`` over the interval (and ``grad_norm``, the mean norm
before clipping, when clipping); every ``eval_every`` steps
``split="test"`` with ``loss``, ``recon``, ``kl`` over the whole test split and, for the
cross-entropy objective, ``neg_elbo`` in nats (see ``evaluate_vae``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from classicnets.data.batching import iterate_in_order
from classicnets.models.vae import VAE, kl_divergence, reconstruction_loss, vae_loss
from classicnets.train.fit import fit
from classicnets.train.run import RunDir
from classicnets.train.settings import ClassificationData, EvalHook, SettingsTask, TrainSettings

__all__ = ["VAETask", "binarize", "evaluate_vae", "evaluation_noise", "train_vae"]

_TERMS = ("loss", "recon", "kl")


def binarize(x: Tensor, seed: int) -> Tensor:
    """Binary images drawn with each pixel's intensity as its probability of being 1 (Burda et
    al. 2016's binarized MNIST), from a generator seeded with ``seed`` on ``x``'s device."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.bernoulli(x, generator=generator)


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


class VAETask(SettingsTask):
    """One step on the (annealed) negative ELBO of a shuffled batch; the interval's means of the
    objective's terms."""

    values = _TERMS

    def __init__(
        self,
        model: VAE,
        data: ClassificationData,
        settings: TrainSettings,
        reconstruction: str,
        eval_seed: int,
        eval_hooks: list[EvalHook] | None,
        kl_warmup_steps: int,
        binarize_seed: int | None = None,
    ) -> None:
        device = data.train_x.device
        super().__init__(model, len(data.train_x), settings, device, eval_hooks,
                         result_keys=(*_TERMS, "neg_elbo"))  # fmt: skip
        self.data = data
        self.reconstruction = reconstruction
        self.eval_seed = eval_seed
        self.kl_warmup_steps = kl_warmup_steps
        self.binarize_seed = binarize_seed

    def train_step(self, step: int) -> dict[str, Tensor]:
        index = self.next_batch(step)
        xb = self.data.train_x[index]
        if self.binarize_seed is not None:  # a fresh binary image each time one is drawn
            xb = binarize(xb, self.binarize_seed + step)
        yb = self.data.train_y[index] if self.model.conditional else None
        noise = None  # one process: the model draws it from the global generator
        if self.context.enabled:  # the global batch's draws, this process's rows of them
            noise = torch.randn(self.global_batch, self.model.latent_size, device=self.device)
            noise = noise[self.local]
        with self.precision.autocast():
            output = self.train_model(xb, yb, noise=noise)
        terms = vae_loss(output, xb, self.reconstruction)
        objective = terms["loss"]
        if step < self.kl_warmup_steps:  # KL annealing: a pure function of the step
            objective = terms["recon"] + (step + 1) / self.kl_warmup_steps * terms["kl"]
        norm = self.optimize(objective)
        self.precision.update()
        out = {k: terms[k].detach() for k in _TERMS}
        if norm is not None:
            out["grad_norm"] = norm
        return out

    def train_records(self, window: dict[str, Tensor], step: int) -> list[dict[str, Any]]:
        n = len(window["loss"])
        means = (torch.stack([window[k] for k in _TERMS]).double().sum(dim=1) / n).tolist()
        record = self.mean_record(window, means[0])
        record.update(zip(_TERMS, means))
        return [record]

    def test_metrics(self) -> dict[str, float]:
        data = self.data
        y = data.test_y if self.model.conditional else None
        return evaluate_vae(self.model, data.test_x, y, self.reconstruction, self.eval_seed,
                            self.settings.eval_batch_size)  # fmt: skip

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{record['loss']:.2f}", "kl": f"{record['kl']:.2f}"}


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
    binarize_seed: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``data.train_x`` (and labels, if conditional), evaluating on the test
    split.

    Args:
        model: the (conditional) VAE, on the data's device, initialized from the seed.
        data: whole splits; images float ``[N, 1, 28, 28]`` in [0, 1], labels ``[N]``.
        settings: steps, optimizer, schedule, precision, intervals (``TrainSettings``).
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
        binarize_seed: train on binarized images (``binarize``), each batch drawn afresh with
            the seed ``binarize_seed + step`` (a pure function of the step: resume stays
            exact); None: the grey levels.

    Returns:
        ``{"step", "complete", "train_time_s", "test_loss", "test_recon", "test_kl"}`` and
        ``"test_neg_elbo"`` for ``"bce"``.

    Raises:
        NonFiniteLossError: a training loss is NaN or infinite (the newest checkpoint, written
            before that step, stays intact).
        StopRequested: on SIGINT/SIGTERM, after writing a checkpoint.
    """
    task = VAETask(model, data, settings, reconstruction, eval_seed, eval_hooks, kl_warmup_steps,
                   binarize_seed)  # fmt: skip
    return fit(task, run, variant, resume)
