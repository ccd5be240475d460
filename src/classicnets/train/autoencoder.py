"""Autoencoders: reconstruction of the input, with exact resume (``fit`` drives the step).

The classifier's settings (``TrainSettings``: optimizer, schedule, precision, intervals), with a
reconstruction loss in place of the cross-entropy on labels:

- ``"bce"``: Bernoulli cross-entropy of each pixel intensity ``x`` in [0, 1] under the
  reconstruction ``sigmoid(logit)``, ``-x log p - (1 - x) log(1 - p)``, computed from the logits
  (``F.binary_cross_entropy_with_logits``, stable for confident pixels);
- ``"mse"``: squared error ``(p - x)^2`` of the intensities;

both ``models.vae.reconstruction_loss``, the VAE's own.

The training loss is **summed over the pixels of an image and averaged over the batch** (nats per
image for ``"bce"``), the convention of the VAE papers (Kingma & Welling 2013), so its size does
not depend on the batch size and a reconstruction term reads in the same units as an ELBO.
Evaluation reports that ``loss`` and, per pixel (the mean over pixels and images), ``mse`` and
``bce``. Note that the cross-entropy of grey pixels is not 0 even for a perfect reconstruction: its
floor is the entropy of the targets.

Model protocol: ``model(x)`` returns intensities in (0, 1) and ``model(x, logits=True)`` their
logits, both of ``x``'s shape (``models.autoencoder.ConvAutoencoder``).

``fit`` drives the step (``AutoencoderTask``) as it drives every paradigm's: exact resume, the
finite check before every checkpoint, SIGINT / SIGTERM, and ``torchrun`` (the global batch split
over the processes; ``sync_bn`` for the global batch's BN statistics).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from classicnets.choices import check_choice
from classicnets.data.batching import iterate_in_order
from classicnets.models.vae import RECONSTRUCTIONS, reconstruction_loss
from classicnets.train.fit import fit
from classicnets.train.precision import inputs_channels_last
from classicnets.train.run import RunDir
from classicnets.train.settings import SettingsTask, TrainSettings

__all__ = [
    "RECONSTRUCTION_LOSSES",
    "AutoencoderTask",
    "evaluate_reconstruction",
    "reconstruction_loss",
    "train_autoencoder",
]

RECONSTRUCTION_LOSSES = RECONSTRUCTIONS  # ("bce", "mse"): models.vae.reconstruction_loss


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


class AutoencoderTask(SettingsTask):
    """One reconstruction step on a shuffled batch; the interval's mean loss."""

    def __init__(self, model: nn.Module, data: Any, settings: TrainSettings, loss: str) -> None:
        check_choice("loss", loss, RECONSTRUCTION_LOSSES)
        device = data.train_x.device
        super().__init__(model, len(data.train_x), settings, device,
                         result_keys=("loss", "mse", "bce"))  # fmt: skip
        self.data = data
        self.loss = loss

    def train_step(self, step: int) -> dict[str, Tensor]:
        index = self.next_batch(step)
        xb = inputs_channels_last(self.data.train_x[index], self.settings.channels_last)
        with self.precision.autocast():
            logits = self.train_model(xb, logits=True)
        loss = reconstruction_loss(logits.float(), xb.float(), self.loss).mean()
        norm = self.optimize(loss)
        self.precision.update()
        return (
            {"loss": loss.detach()} if norm is None else {"loss": loss.detach(), "grad_norm": norm}
        )

    def train_records(self, window: dict[str, Tensor], step: int) -> list[dict[str, Any]]:
        return [self.mean_record(window, window["loss"].double().mean().item())]

    def test_metrics(self) -> dict[str, float]:
        x = self.data.test_x
        return evaluate_reconstruction(self.model, x, self.loss, self.settings.eval_batch_size)

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        test_mse = self.state.extra["last_eval"].get("mse", float("nan"))
        return {"loss": f"{record['loss']:.2f}", "test_mse": f"{test_mse:.4f}"}


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
        settings: steps, optimizer, schedule, precision, logging and checkpoint intervals.
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
        ValueError: an unknown loss.
    """
    return fit(AutoencoderTask(model, data, settings, loss), run, variant, resume)
