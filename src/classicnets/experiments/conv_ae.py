"""``conv-ae``: a convolutional autoencoder on MNIST, one variant per upsampling method.

The encoder goes 28 -> 14 -> 7 -> 4 by 3x3 stride-2 convolutions; the decoder comes back
4 -> 7 -> 14 -> 28, every step built from the size it must produce
(``models.autoencoder.ConvAutoencoder``), so nothing is cropped. The variants differ only in how
the decoder upsamples:

- ``transpose``: ``ConvTranspose2dExact``, a learned 3x3 stride-2 transposed convolution;
- ``nearest``: nearest-neighbour upsampling to the exact size, then a 3x3 convolution;
- ``unpool``: average unpooling (the adjoint of average pooling) to the exact size, then a 3x3
  convolution;
- ``bilinear`` (not run by default): bilinear upsampling, then a 3x3 convolution.

All variants start from the same seed and see the same batches in the same order. The report has
the test reconstruction error (per pixel: squared error and Bernoulli cross-entropy) of each, the
test curves, and a grid of test digits with each variant's reconstruction under it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from classicnets.experiments.common import (
    Experiment,
    Job,
    SampleRequest,
    TrainingOptions,
    image_data_of,
    load_checkpointed,
    mnist_input,
    sampled_models,
    summarize,
    train_settings,
)
from classicnets.models.autoencoder import UPSAMPLING, ConvAutoencoder
from classicnets.report.curves import Curve
from classicnets.report.grid import reconstruction_grid
from classicnets.train.autoencoder import (
    evaluate_reconstruction,
    train_autoencoder,
)
from classicnets.train.run import RunDir

__all__ = ["EXPERIMENT", "ConvAEConfig", "build_model", "run"]

VARIANTS = UPSAMPLING  # transpose, nearest, bilinear, unpool
NAMES = {
    "transpose": "transposed conv",
    "nearest": "nearest + conv",
    "bilinear": "bilinear + conv",
    "unpool": "unpool + conv",
}


@dataclass
class ConvAEConfig(TrainingOptions):
    """Configuration of ``conv-ae``; shared training switches from ``TrainingOptions``."""

    dataset: str = "mnist"  # "mnist" or "fashion-mnist"
    variants: tuple[str, ...] = ("transpose", "nearest", "unpool")  # any of VARIANTS
    channels: tuple[int, ...] = (16, 32, 16)  # after each stride-2 conv; code 16 x 4 x 4 = 256
    kernel_size: int = 3
    norm: str = "batchnorm"  # "batchnorm" or "none"
    loss: str = "bce"  # "bce" (Bernoulli cross-entropy) or "mse"; summed over pixels
    epochs: int = 3  # the same budget for every variant
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0  # SGD only
    eval_every: int = 500  # test reconstruction error every this many steps (and at the end)
    log_every: int = 50
    checkpoint_every: int = 500
    test_limit: int | None = None  # evaluate on the first N test images only (quick runs)
    grid_images: int = 10  # test images in the reconstruction grid

    @classmethod
    def quick(cls) -> ConvAEConfig:
        """Seconds on a 2-core CPU: narrow models, 20 steps each on 1,280 images."""
        return cls(
            channels=(4, 8, 4),
            epochs=1,
            batch_size=64,
            train_limit=1280,
            test_limit=500,
            eval_every=10,
            log_every=5,
            checkpoint_every=10,
            grid_images=8,
        )

    VARIANTS: ClassVar[tuple[str, ...]] = VARIANTS  # what config.check_choices admits

    def validate(self) -> None:
        if not self.channels:
            raise ValueError(f"channels must be positive, got {self.channels}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")


def build_model(config: ConvAEConfig, variant: str) -> ConvAutoencoder:
    return ConvAutoencoder(
        upsampling=variant,
        channels=config.channels,
        kernel_size=config.kernel_size,
        norm_layer=config.norm,
    )


def run(config: ConvAEConfig, job: Job) -> dict:
    """Train the variants, write the plots and the reconstruction grid; return the summary."""
    run_dir = job.run_dir
    data = image_data_of(config, job.device)
    steps = config.epochs * (len(data.train_x) // config.batch_size)
    settings = train_settings(config, steps=steps, nesterov=False, eval_batch_size=2000)
    models: dict[str, ConvAutoencoder] = {}

    def train(variant: str) -> dict:
        models[variant] = model = build_model(config, variant).to(job.device)
        result = train_autoencoder(
            model, data, settings, run_dir, variant, loss=config.loss, resume=job.resume
        )
        return {**result, "parameters": sum(p.numel() for p in model.parameters())}

    results = job.train_variants(config.variants, config.seed, train)
    summary = _summary(config, results, job.device, steps)
    if not run_dir.writer:  # rank > 0 of a torchrun job
        return summary
    if not models and job.trained_elsewhere(config.variants):  # from their final checkpoints
        models = {v: t.model for v, t in load_models(config, run_dir, job.device).items()}
    x = data.test_x[: config.grid_images]
    reconstruction_grid(
        run_dir.plots / "reconstructions.png",
        x,
        {NAMES.get(v, v): _reconstruct(m, x) for v, m in models.items()},
        title=f"test images (top) and their reconstructions ({config.dataset})",
    )
    return summary


def _summary(config, results, device, steps) -> dict[str, Any]:
    fields = {"test_mse_per_pixel": "test_mse", "test_bce_per_pixel": "test_bce",
              "test_loss": "test_loss", "steps": "step", "parameters": "parameters",
              "train_time_s": "train_time_s"}  # fmt: skip
    code = config.channels[-1] * 4 * 4
    notes = [
        f"Encoder 28-14-7-4 (channels {','.join(map(str, config.channels))}, code of {code} "
        f"numbers), decoder 4-7-14-28 by exact output size; norm {config.norm}; "
        f"{config.epochs} epoch(s) = {steps} steps of batch {config.batch_size}, "
        f"{config.optimizer} lr {config.lr}; device {device}.",
        f"Training loss: {config.loss}, summed over the 784 pixels and averaged over the batch "
        f"(test_loss, per image). test_mse_per_pixel and test_bce_per_pixel (nats) are means "
        f"over pixels and test images"
        + (f" (the first {config.test_limit})." if config.test_limit else "."),
    ]
    title = "conv-ae: convolutional autoencoder, decoder upsampling by output size"
    return summarize(title, config.variants, results, fields, notes)


@torch.no_grad()
def _reconstruct(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(x)
    model.train(was_training)
    return out


PLOTS = (
    Curve("test_reconstruction_error.png", "test", "mse", "squared error per pixel",
          "test reconstruction error", logy=True),
    Curve("train_loss.png", "train", "loss", "reconstruction loss per image", "training loss",
          logy=True),
)  # fmt: skip


def load_models(config: ConvAEConfig, run_dir: RunDir, device: str = "cpu") -> dict:
    """Each variant's newest checkpoint as a ``TrainedModel`` (eval mode)."""

    def info(variant: str, model) -> dict[str, Any]:
        return {
            "kind": "autoencoder",
            **mnist_input(),
            "output_shape": [1, 28, 28],
            "output": "reconstructed intensities in (0, 1) (sigmoid), shape [N, 1, 28, 28]",
            "upsampling": variant,
            "dataset": config.dataset,
        }

    build = functools.partial(build_model, config)
    return load_checkpointed(build, run_dir, config.variants, device, info)


def evaluate_trained(config: ConvAEConfig, run_dir: RunDir, device: str = "cpu") -> dict:
    """Test reconstruction errors of each variant's newest checkpoint."""
    data = image_data_of(config, device)
    return {
        variant: {
            **evaluate_reconstruction(trained.model, data.test_x, config.loss),
            "step": trained.step,
            "checkpoint": trained.checkpoint,
        }
        for variant, trained in load_models(config, run_dir, device).items()
    }


def sample(
    config: ConvAEConfig, run_dir: RunDir, device: str = "cpu", request: SampleRequest | None = None
) -> str:
    """Write a reconstruction grid of ``request.n`` test images (drawn with ``request.seed``,
    of digit ``request.label`` if given) to ``request.out`` or ``plots/``; return a message."""
    from classicnets.data import load_mnist

    request = request or SampleRequest()
    models = sampled_models(load_models(config, run_dir, device), request, run_dir)
    images, labels = load_mnist("test", config.dataset, config.data_dir, config.download)
    candidates = torch.arange(len(labels))
    if request.label is not None:
        candidates = candidates[torch.from_numpy(labels) == request.label]
    generator = torch.Generator().manual_seed(request.seed)
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[: request.n]]
    x = torch.from_numpy(images[chosen.numpy()]).to(device=device, dtype=torch.float32)
    x = x.div_(255.0).unsqueeze(1)  # (n, 1, 28, 28)
    label = "" if request.label is None else f"_label{request.label}"
    out = (
        Path(request.out)
        if request.out
        else run_dir.plots / (f"sample_reconstructions_seed{request.seed}{label}.png")
    )
    steps = ", ".join(f"{v} step {t.step}" for v, t in models.items())
    reconstruction_grid(
        out,
        x,
        {NAMES.get(v, v): _reconstruct(t.model, x) for v, t in models.items()},
        title=f"{len(x)} test images (seed {request.seed}) and reconstructions ({steps})",
    )
    return f"reconstruction grid of {len(x)} test images ({', '.join(models)}): {out}"


DESCRIPTION = (
    "convolutional autoencoder on MNIST, 28-14-7-4 and back by exact output size; "
    "transposed conv vs nearest vs average-unpooling upsampling"
)
EXPERIMENT = Experiment(
    "conv-ae", DESCRIPTION, ConvAEConfig, run, evaluate_trained, load_models, sample, PLOTS, NAMES
)
