"""Classifiers: cross-entropy on labels, with exact resume (``fit`` drives the step).

``model.train()`` before each optimization step and ``model.eval()`` inside ``evaluate``, at the
call sites, so batch normalization uses batch statistics exactly when it should. Data lives in
whole-split tensors (``ClassificationData``) and batches are index slices.

Everything a step depends on is either saved in the checkpoint (weights and BN buffers, optimizer
state, RNG states, data position) or a pure function of the step (the learning rate), so a run
resumed from step k continues bit for bit like an uninterrupted run on CPU in deterministic mode.

Records: every ``log_every`` steps ``split="train"`` with the interval's mean ``loss``, its
``accuracy`` (over the examples of the interval), ``lr`` and, when clipping, ``grad_norm``; every
``eval_every`` steps (and at 0) ``split="test"`` with ``loss``, ``accuracy`` and the hooks'
metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from classicnets.metrics.evaluation import classify
from classicnets.train.fit import fit
from classicnets.train.mlp_step import MLPStep
from classicnets.train.precision import inputs_channels_last
from classicnets.train.run import RunDir
from classicnets.train.settings import ClassificationData, EvalHook, SettingsTask, TrainSettings

__all__ = ["ClassifierTask", "evaluate", "train_classifier"]


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 2000) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in inference mode
    (``metrics.evaluation.classify``; the model's previous mode is restored)."""
    total, predicted = classify(model, x, y, batch_size)
    return {"loss": total.item() / len(x), "accuracy": (predicted == y).sum().item() / len(x)}


class ClassifierTask(SettingsTask):
    """One cross-entropy step on a shuffled batch; the interval's loss and accuracy."""

    values = ("loss", "correct")

    def __init__(
        self,
        model: nn.Module,
        data: ClassificationData,
        settings: TrainSettings,
        eval_hooks: list[EvalHook] | None = None,
        augment: Callable[[Tensor, int], Tensor] | None = None,
    ) -> None:
        device = data.train_x.device
        super().__init__(model, len(data.train_x), settings, device, eval_hooks,
                         result_keys=("accuracy", "loss"))  # fmt: skip
        self.data = data
        self.augment = augment
        # The written-out step where it covers the model and settings: the same numbers as
        # autograd and SGD below, in less time (train.mlp_step).
        self.mlp_step = None
        if settings.mlp_step and settings.precision == "fp32" and not settings.compile:
            if not (settings.clip_grad_norm or settings.channels_last or self.context.enabled):
                self.mlp_step = MLPStep.of(model, self.optimizer)

    def train_step(self, step: int) -> dict[str, Tensor]:
        index = self.next_batch(step)
        # index_select is the same gather as train_x[index] at a quarter of the per-call cost
        # of advanced indexing (it matters at small batches).
        xb = self.data.train_x.index_select(0, index)
        if self.augment is not None:
            xb = self.augment(xb, step)
        xb = inputs_channels_last(xb, self.settings.channels_last)
        yb = self.data.train_y.index_select(0, index)
        if self.mlp_step is not None and self.mlp_step.applies():
            loss, logits = self.mlp_step(xb, yb)
            return {"loss": loss, "correct": (logits.argmax(dim=1) == yb).sum()}
        with self.precision.autocast():
            logits = self.train_model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        norm = self.optimize(loss)
        self.precision.update()
        out = {"loss": loss.detach(), "correct": (logits.detach().argmax(dim=1) == yb).sum()}
        if norm is not None:
            out["grad_norm"] = norm
        return out

    def train_records(self, window: dict[str, Tensor], step: int) -> list[dict[str, Any]]:
        n = len(window["loss"])
        record = self.mean_record(window, window["loss"].sum().item() / n)
        seen = n * len(range(self.global_batch)[self.local])  # every batch is whole (drop_last)
        record["accuracy"] = window["correct"].double().sum().item() / max(1.0, seen)
        return [record]

    def test_metrics(self) -> dict[str, float]:
        data = self.data
        return evaluate(self.model, data.test_x, data.test_y, self.settings.eval_batch_size)

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        test = self.state.extra["last_eval"].get("accuracy", float("nan"))
        return {"loss": f"{record['loss']:.4f}", "acc": f"{record['accuracy']:.3f}",
                "test_acc": f"{test:.4f}"}  # fmt: skip


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
    task = ClassifierTask(model, data, settings, eval_hooks, augment)
    return fit(task, run, variant, resume)
