"""What the classifier, autoencoder and VAE are trained with: ``TrainSettings``, the optimizer
and schedule the settings make, the deterministic switch, and ``SettingsTask``, the base of the
three paradigms' tasks (``train.fit``). One module, so that no paradigm is another's base. The
data container, ``data.tensors.ClassificationData``, is re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from classicnets.choices import check_choice
from classicnets.data.batching import ShuffledBatches
from classicnets.data.tensors import ClassificationData
from classicnets.nn.batchnorm import convert_sync_batchnorm
from classicnets.train.fit import Cadence, Task, optimize
from classicnets.train.params import param_groups
from classicnets.train.precision import Precision, maybe_channels_last, maybe_compile
from classicnets.train.schedules import make_schedule

__all__ = [
    "ClassificationData",
    "EvalHook",
    "SettingsTask",
    "TrainSettings",
    "make_optimizer",
    "make_schedule_from_settings",
    "set_deterministic",
]

EvalHook = Callable[[nn.Module], dict[str, Any]]


@dataclass(kw_only=True)
class TrainSettings(Cadence):
    """How one model is trained: a ``fit.Cadence`` (``steps``, ``log_every``, ``eval_every``,
    ``checkpoint_every``, ``keep_checkpoints``, ``progress``, ``stop_after``) and the fields
    below. Field meanings follow the experiment configs; keyword arguments only.

    Attributes:
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
        mlp_step: train an ``MLP`` classifier with the written-out step of ``train.mlp_step``
            where it applies (the same numbers as autograd and SGD, faster); False: autograd.
        seed: seed of the data order (the caller seeds the initialization).
        eval_batch_size: batch size of evaluation (no effect on the result).
    """

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
    mlp_step: bool = True
    seed: int = 0
    eval_batch_size: int = 2000
    eval_every: int = 1000  # Cadence's, with the test split's evaluation every 1000 steps
    checkpoint_every: int = 5000


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
    name = check_choice("schedule", settings.schedule, kwargs)
    return make_schedule(name, **kwargs[name])


class SettingsTask(Task):
    """The base of the tasks configured by ``TrainSettings`` (classifier, autoencoder, VAE): one
    model, one optimizer and schedule from the settings, shuffled batches of the training split,
    an evaluation on the test split with ``eval_hooks`` logged beside it, and the plateau
    schedule fed with the training loss after each evaluation.

    Here, once for the three: synchronized BN under ``torchrun`` (``sync_bn``), channels-last,
    precision, ``torch.compile`` (the step runs ``self.train_model``; checkpoints hold
    ``self.model``).

    Args:
        model: the model, on ``device``, initialized from the seed.
        num_train: examples in the training split.
        settings: the training settings.
        device: where the model and data are.
        eval_hooks: ``hook(model) -> dict`` called at every evaluation, in eval mode.
        result_keys: the evaluation metrics that ``result`` returns, as ``test_<key>``.
    """

    def __init__(
        self,
        model: nn.Module,
        num_train: int,
        settings: TrainSettings,
        device: torch.device | str,
        eval_hooks: list[EvalHook] | None = None,
        result_keys: tuple[str, ...] = ("loss",),
    ) -> None:
        super().__init__(device)
        self.settings = settings
        if settings.sync_bn and self.context.enabled:
            model = convert_sync_batchnorm(model)
        maybe_channels_last(model, settings.channels_last)
        self.model = model
        self.hooks = list(eval_hooks or [])
        self.result_keys = result_keys
        self.precision = Precision(settings.precision, str(device))
        self.optimizer = make_optimizer(
            param_groups(model, weight_decay=settings.weight_decay), settings
        )
        self.schedule = make_schedule_from_settings(settings)
        self.batches = ShuffledBatches(num_train, settings.batch_size, settings.seed, device=device)
        self.global_batch = settings.batch_size
        self.modules = {"model": model}
        self.optimizers = {"model": self.optimizer}
        self.schedules = {"lr": self.schedule}
        self.extra = {"last_train_loss": None, "last_eval": {}}
        self.cadence = settings
        self.train_model = maybe_compile(model, settings.compile)
        if settings.clip_grad_norm:
            self.values = (*self.values, "grad_norm")

    def next_batch(self, step: int) -> Tensor:
        """The indices of this process's share of step ``step``'s batch, with the learning rate
        of the step set."""
        index = next(self.batches)
        if self.context.enabled:
            index = index[self.local]
        self.schedule.apply(self.optimizer, step, self.batches.epoch)
        if not self.train_model.training:  # an evaluation switched to eval(): back to train
            self.train_model.train()
        return index

    def optimize(self, loss: Tensor) -> Tensor | None:
        """``optimize`` with the settings' clipping of the model's parameters."""
        clip = self.settings.clip_grad_norm
        return optimize(loss, self.optimizer, self.precision, clip, self.model.parameters())

    def test_metrics(self) -> dict[str, float]:
        """The paradigm's evaluation on the test split (the model's mode restored after)."""
        raise NotImplementedError

    def evaluate(self, step: int) -> list[dict[str, Any]]:
        record: dict[str, Any] = {"split": "test", **self.test_metrics()}
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for hook in self.hooks:
                record.update(hook(self.model))
        self.model.train(was_training)
        extra = self.state.extra
        extra["last_eval"] = {k: record[k] for k in self.result_keys if k in record}
        if step > 0 and hasattr(self.schedule, "observe") and extra["last_train_loss"] is not None:
            self.schedule.observe(extra["last_train_loss"])  # plateau: the training loss
        return [record]

    def mean_record(self, window: dict[str, Tensor], loss: float) -> dict[str, Any]:
        """The training record's common part: ``loss``, the learning rate, and the mean
        gradient norm before clipping when clipping."""
        record: dict[str, Any] = {"split": "train", "loss": loss}
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        if "grad_norm" in window:
            record["grad_norm"] = window["grad_norm"].sum().item() / len(window["grad_norm"])
        self.state.extra["last_train_loss"] = loss
        return record

    def result(self) -> dict[str, Any]:
        out = super().result()
        out.update({f"test_{k}": v for k, v in self.state.extra["last_eval"].items()})
        return out
