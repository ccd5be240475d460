"""What every training loop is configured with: the settings, the data container, the optimizer
and schedule they make, and the deterministic switch. One module, imported by every loop (the
classifier, autoencoder and VAE loops and the experiments), so that none is another's base.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from classicnets.train.schedules import make_schedule

__all__ = [
    "ClassificationData",
    "TrainSettings",
    "make_optimizer",
    "make_schedule_from_settings",
    "set_deterministic",
]


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
        batch_size: examples per step (the global batch under DDP, split across processes).
        optimizer: "sgd" or "adam".
        lr: base learning rate.
        momentum: SGD momentum (0 for plain SGD).
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 penalty through the optimizer; never applied to BN parameters and
            biases (``train.params.param_groups``).
        schedule: "constant", "step" (times ``lr_gamma`` every ``lr_step_every`` steps),
            "cosine" (to 0 at the last step after ``warmup_steps`` of linear warm-up),
            "exp-after-epoch" (times ``lr_decay`` per epoch after ``epochs_at_full_lr``) or
            "plateau" (times ``lr_gamma`` when the training loss has not improved for
            ``plateau_patience`` evaluations).
        lr_step_every, lr_gamma, warmup_steps, lr_decay, epochs_at_full_lr, plateau_patience:
            schedule parameters.
        clip_grad_norm: clip gradients to this global norm (None: no clipping); the norm before
            clipping is logged as ``grad_norm``.
        precision: "fp32", "bf16" (autocast) or "fp16" (autocast with a gradient scaler).
        compile: train through ``torch.compile``.
        channels_last: NHWC memory format (convolutional models).
        sync_bn: synchronized batch normalization under DDP.
        eval_every: evaluate on the test split every this many steps (and at the end).
        log_every: write the mean training loss and accuracy every this many steps.
        checkpoint_every: checkpoint every this many steps (and at the end); 0 for end only.
        keep_checkpoints: how many checkpoints of each model to keep.
        seed: seed of the data order (the caller seeds the initialization).
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
    lr_decay: float = 0.5
    epochs_at_full_lr: int = 4
    plateau_patience: int = 5
    clip_grad_norm: float | None = None
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    sync_bn: bool = False
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
    """SGD (with optional momentum / Nesterov) or Adam, from ``settings``.

    SGD uses the multi-tensor ("foreach") implementation on every device, not only on CUDA
    where torch picks it by default: one call per update instead of a Python loop over the
    parameters. It performs the same elementwise operations in the same order, so the weights
    are bit-identical to the single-tensor loop (``tests/test_training.py`` checks it).
    """
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=settings.nesterov,
            weight_decay=settings.weight_decay,
            foreach=True,
        )
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; choose 'sgd' or 'adam'")


def make_schedule_from_settings(settings: TrainSettings):
    """The learning-rate schedule named by ``settings.schedule`` (``train.schedules``)."""
    kwargs = {
        "constant": {},
        "step": {"step_size": settings.lr_step_every, "gamma": settings.lr_gamma},
        "cosine": {"total_steps": settings.steps, "warmup_steps": settings.warmup_steps},
        "exp-after-epoch": {
            "decay": settings.lr_decay,
            "epochs_at_full_lr": settings.epochs_at_full_lr,
        },
        "plateau": {"factor": settings.lr_gamma, "patience": settings.plateau_patience},
    }
    if settings.schedule not in kwargs:
        raise ValueError(
            f"unknown schedule {settings.schedule!r}; choose one of {', '.join(kwargs)}"
        )
    return make_schedule(settings.schedule, **kwargs[settings.schedule])
