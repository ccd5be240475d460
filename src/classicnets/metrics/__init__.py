"""Metrics: classification (accuracy, confusion matrix, per-class precision/recall/F1, plots).

NumPy only at import time: neither torch nor matplotlib is imported by ``import
classicnets.metrics`` (the plot functions import matplotlib when called).
"""

from classicnets.metrics.classification import (
    accuracy,
    confusion_matrix,
    format_confusion_matrix,
    per_class_metrics,
    plot_confusion_matrices,
    plot_confusion_matrix,
)

__all__ = [
    "accuracy",
    "confusion_matrix",
    "format_confusion_matrix",
    "per_class_metrics",
    "plot_confusion_matrices",
    "plot_confusion_matrix",
]
