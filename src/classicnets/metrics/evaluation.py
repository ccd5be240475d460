"""Metrics of a trained torch model over a test split (torch is imported here, unlike the rest
of ``classicnets.metrics``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classicnets.metrics.classification import confusion_matrix, per_class_metrics

__all__ = ["classify", "evaluate_classifier"]


@torch.no_grad()
def classify(
    model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 1000
) -> tuple[Tensor, Tensor]:
    """One pass of ``model`` (in eval mode; its mode is restored) over ``inputs`` in batches of
    ``batch_size``: the summed cross-entropy against int64 ``targets`` (a float64 0-d tensor,
    each batch's float32 sum added in float64) and the predicted classes ``[N]``, both on the
    inputs' device (no synchronization per batch)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=inputs.device)
    predictions = []
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start : start + batch_size])
        total += F.cross_entropy(
            logits, targets[start : start + batch_size], reduction="sum"
        ).double()
        predictions.append(logits.argmax(dim=1))
    model.train(was_training)
    return total, torch.cat(predictions)


def evaluate_classifier(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    class_names: Sequence[str],
    batch_size: int = 1000,
) -> dict[str, Any]:
    """Accuracy, mean cross-entropy, confusion matrix and per-class metrics of ``model`` on
    ``inputs`` with int64 ``targets`` ``[N]`` (``classify``'s one pass; the batch size has no
    effect beyond float rounding of the loss).

    Returns a dict with ``accuracy``, ``loss`` (nats), ``confusion_matrix`` (int64 ``[K, K]``,
    rows = true class), ``class_names``, ``macro_f1`` and ``per_class`` (precision, recall, F1,
    support).
    """
    total, predicted = classify(model, inputs, targets, batch_size)
    matrix = confusion_matrix(
        targets.cpu().numpy(), predicted.cpu().numpy(), num_classes=len(class_names)
    )
    metrics = per_class_metrics(matrix)
    return {
        "accuracy": metrics["accuracy"],
        "loss": total.item() / len(inputs),
        "confusion_matrix": matrix,
        "class_names": list(class_names),
        "macro_f1": metrics["macro_f1"],
        "per_class": {k: metrics[k].tolist() for k in ("precision", "recall", "f1", "support")},
    }
