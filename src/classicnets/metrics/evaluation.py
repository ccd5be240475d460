"""Metrics of a trained torch model over a test split (torch is imported here, unlike the rest
of ``classicnets.metrics``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classicnets.metrics.classification import confusion_matrix, per_class_metrics

__all__ = ["evaluate_classifier"]


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    class_names: Sequence[str],
    batch_size: int = 1000,
) -> dict[str, Any]:
    """Accuracy, mean cross-entropy, confusion matrix and per-class metrics of ``model`` (in eval
    mode; its mode is restored) on ``inputs`` with int64 ``targets`` ``[N]``, in batches of
    ``batch_size`` (no effect beyond float rounding of the loss).

    Returns a dict with ``accuracy``, ``loss`` (nats), ``confusion_matrix`` (int64 ``[K, K]``,
    rows = true class), ``class_names``, ``macro_f1`` and ``per_class`` (precision, recall, F1,
    support).
    """
    was_training = model.training
    model.eval()
    predictions, loss = [], 0.0
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start : start + batch_size])
        loss += F.cross_entropy(logits, targets[start : start + batch_size], reduction="sum").item()
        predictions.append(logits.argmax(dim=1).cpu())
    model.train(was_training)
    matrix = confusion_matrix(
        targets.cpu().numpy(), torch.cat(predictions).numpy(), num_classes=len(class_names)
    )
    metrics = per_class_metrics(matrix)
    return {
        "accuracy": metrics["accuracy"],
        "loss": loss / len(inputs),
        "confusion_matrix": matrix,
        "class_names": list(class_names),
        "macro_f1": metrics["macro_f1"],
        "per_class": {k: metrics[k].tolist() for k in ("precision", "recall", "f1", "support")},
    }
