"""Classification metrics: confusion matrix, per-class precision/recall/F1, accuracy, and plots.

The core is NumPy only. Inputs may be NumPy arrays, sequences or torch tensors (on any device:
anything with ``.cpu()`` is moved there first), but torch is never imported here, so the
exported-model runtime can use these functions where torch is not installed. Matplotlib is
imported only by the two plot functions.

Conventions follow scikit-learn, which the tests compare against exactly:

- ``confusion_matrix(targets, predictions)[i, j]`` counts the examples of true class ``i``
  predicted as ``j`` (rows true, columns predicted), as ``sklearn.metrics.confusion_matrix`` with
  ``labels=range(num_classes)``.
- a ratio whose denominator is zero is 0.0, as sklearn's ``zero_division=0``: the precision of a
  class that is never predicted, the recall of a class that never occurs.

>>> m = confusion_matrix([0, 1, 2, 2], [0, 2, 2, 2], num_classes=4)
>>> m
array([[1, 0, 0, 0],
       [0, 0, 1, 0],
       [0, 0, 2, 0],
       [0, 0, 0, 0]])
>>> print(format_confusion_matrix(m, ["cat", "dog", "bird", "fish"]))
true \\ predicted  cat  dog  bird  fish
cat                 1    0     0     0
dog                 0    0     1     0
bird                0    0     2     0
fish                0    0     0     0
>>> float(per_class_metrics(m)["macro_f1"])
0.45
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "confusion_matrix",
    "format_confusion_matrix",
    "per_class_metrics",
    "plot_confusion_matrices",
    "plot_confusion_matrix",
]

_MAX_ANNOTATED_CLASSES = 30  # beyond this a cell is too small for its number: colour only
_CMAP = "Blues"


# --- inputs -------------------------------------------------------------------------------------


def _to_numpy(values: Any) -> np.ndarray:
    """A NumPy array from an array, a sequence or a tensor (detached and moved to the CPU)."""
    if hasattr(values, "detach"):
        values = values.detach()
    if hasattr(values, "cpu"):
        values = values.cpu()
    return np.asarray(values)


def _as_labels(values: Any, name: str) -> np.ndarray:
    """A 1-d int64 array of class indices; ``name`` is used in error messages."""
    array = _to_numpy(values)
    if array.ndim != 1:
        hint = (
            " (class scores? pass class indices, e.g. logits.argmax(1))" if array.ndim == 2 else ""
        )
        raise ValueError(
            f"{name}: expected a 1-d array of class indices, got shape {array.shape}{hint}"
        )
    if array.dtype.kind == "b":
        return array.astype(np.int64)
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind == "f" or array.size == 0:
        # Float labels are accepted when they are whole numbers (e.g. read back from JSON).
        if array.size and not (np.all(np.isfinite(array)) and np.all(array == np.round(array))):
            bad = array[~(np.isfinite(array) & (array == np.round(array)))][0]
            raise ValueError(f"{name}: class indices must be whole numbers, found {bad.item()!r}")
        return array.astype(np.int64)
    raise ValueError(f"{name}: expected integer class indices, got dtype {array.dtype}")


def _as_pair(targets: Any, predictions: Any) -> tuple[np.ndarray, np.ndarray]:
    targets = _as_labels(targets, "targets")
    predictions = _as_labels(predictions, "predictions")
    if len(targets) != len(predictions):
        raise ValueError(
            f"targets and predictions differ in length: {len(targets)} != {len(predictions)}"
        )
    return targets, predictions


def _as_matrix(matrix: Any) -> np.ndarray:
    array = _to_numpy(matrix)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {array.shape}")
    if array.dtype.kind not in "iufb":
        raise ValueError(f"expected a numeric confusion matrix, got dtype {array.dtype}")
    if array.size and (not np.all(np.isfinite(array)) or array.min() < 0):
        raise ValueError("a confusion matrix holds finite, non-negative counts")
    return array


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a {num_classes}-class confusion matrix")
    return names


# --- metrics ------------------------------------------------------------------------------------


def confusion_matrix(targets: Any, predictions: Any, num_classes: int | None = None) -> np.ndarray:
    """Counts of (true class, predicted class) pairs.

    Args:
        targets: true class indices, shape ``[N]`` (array, sequence or tensor).
        predictions: predicted class indices, shape ``[N]``.
        num_classes: number of classes K; classes that never occur still get their (zero) row
            and column. Default: one more than the largest index seen (0 when N = 0).

    Returns:
        ``int64`` array ``[K, K]``: ``matrix[i, j]`` is the number of examples of true class
        ``i`` predicted as ``j`` (scikit-learn's convention).

    Raises:
        ValueError: a negative index, an index >= ``num_classes`` (the message names the value),
            inputs of different lengths or not 1-d, non-integer labels, ``num_classes < 1``.
    """
    targets, predictions = _as_pair(targets, predictions)
    for name, labels in (("targets", targets), ("predictions", predictions)):
        if labels.size and labels.min() < 0:
            raise ValueError(f"{name} contains the negative class index {int(labels.min())}")
    if num_classes is None:
        num_classes = int(max(targets.max(initial=-1), predictions.max(initial=-1))) + 1
    else:
        if isinstance(num_classes, bool):
            raise ValueError(f"num_classes must be an int, got {num_classes!r}")
        num_classes = operator.index(num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        for name, labels in (("targets", targets), ("predictions", predictions)):
            if labels.size and labels.max() >= num_classes:
                raise ValueError(
                    f"{name} contains the class index {int(labels.max())}, outside "
                    f"[0, {num_classes}) for num_classes={num_classes}"
                )
    # One bincount over the flattened (true, predicted) pair index.
    flat = np.bincount(targets * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0.0 where the denominator is 0 (sklearn's zero_division=0)."""
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def per_class_metrics(matrix: Any) -> dict[str, Any]:
    """Precision, recall, F1 and support per class, with accuracy and averages.

    Args:
        matrix: a ``[K, K]`` confusion matrix, rows true, columns predicted (as returned by
            ``confusion_matrix``).

    Returns:
        A dict with

        - ``"precision"``, ``"recall"``, ``"f1"``: float64 arrays ``[K]``;
          precision ``tp / (tp + fp)``, recall ``tp / (tp + fn)``, F1
          ``2 tp / (2 tp + fp + fn)`` (the harmonic mean of the two, as sklearn computes it);
        - ``"support"``: int64 array ``[K]``, the number of true examples of each class;
        - ``"accuracy"``: ``trace / total``;
        - ``"macro_precision"``, ``"macro_recall"``, ``"macro_f1"``: unweighted means over all K
          classes, including those with no support (sklearn's ``average="macro"`` with
          ``labels=range(K)``);
        - ``"weighted_precision"``, ``"weighted_recall"``, ``"weighted_f1"``: means weighted by
          support (``average="weighted"``).

        Every ratio with a zero denominator is 0.0 (sklearn's ``zero_division=0``), including
        the accuracy and averages of an empty matrix. The scalars are Python floats, ready for
        ``metrics.jsonl``.
    """
    matrix = _as_matrix(matrix)
    counts = matrix.astype(np.float64)
    true_positive = np.diag(counts)
    predicted = counts.sum(axis=0)  # tp + fp, per predicted class (column)
    actual = counts.sum(axis=1)  # tp + fn, per true class (row): the support
    precision = _safe_divide(true_positive, predicted)
    recall = _safe_divide(true_positive, actual)
    f1 = _safe_divide(2.0 * true_positive, predicted + actual)  # 2tp / (2tp + fp + fn)
    total = float(actual.sum())
    num_classes = len(true_positive)

    def macro(values: np.ndarray) -> float:
        return float(values.mean()) if num_classes else 0.0

    def weighted(values: np.ndarray) -> float:
        return float(np.dot(values, actual) / total) if total else 0.0

    support = matrix.sum(axis=1)
    support = support.astype(np.int64) if matrix.dtype.kind in "iub" else support
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
        "accuracy": float(true_positive.sum() / total) if total else 0.0,
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
        "weighted_precision": weighted(precision),
        "weighted_recall": weighted(recall),
        "weighted_f1": weighted(f1),
    }


def accuracy(targets: Any, predictions: Any) -> float:
    """Fraction of examples whose prediction equals the target.

    Args:
        targets: true class indices, shape ``[N]``.
        predictions: predicted class indices, shape ``[N]``.

    Returns:
        The accuracy in [0, 1].

    Raises:
        ValueError: no examples (an empty test set is a bug to report, not an accuracy of 0),
            inputs of different lengths or not 1-d.
    """
    targets, predictions = _as_pair(targets, predictions)
    if len(targets) == 0:
        raise ValueError("accuracy of no examples is undefined")
    return float(np.mean(targets == predictions))


# --- text ---------------------------------------------------------------------------------------


def format_confusion_matrix(matrix: Any, class_names: Sequence[str] | None = None) -> str:
    """The matrix as an aligned text table for a terminal: true classes as rows.

    The header line is ``true \\ predicted`` followed by the class names; integer counts are
    printed as integers, anything else (e.g. a normalized matrix) with three decimals.

    Args:
        matrix: a ``[K, K]`` confusion matrix, rows true, columns predicted.
        class_names: K names; default the class indices.

    Returns:
        The table, lines joined by newlines, no trailing newline.
    """
    matrix = _as_matrix(matrix)
    names = _class_names(class_names, matrix.shape[0])
    whole = matrix.dtype.kind in "iub" or bool(np.all(matrix == np.round(matrix)))
    cells = [[f"{int(v)}" if whole else f"{v:.3f}" for v in row] for row in matrix]
    corner = "true \\ predicted"
    first_width = max([len(corner), *map(len, names)])
    widths = [max([len(name), *(len(row[j]) for row in cells)]) for j, name in enumerate(names)]
    lines = ["  ".join([corner.ljust(first_width), *(n.rjust(w) for n, w in zip(names, widths))])]
    for name, row in zip(names, cells):
        lines.append(
            "  ".join([name.ljust(first_width), *(c.rjust(w) for c, w in zip(row, widths))])
        )
    return "\n".join(lines)


# --- plots --------------------------------------------------------------------------------------


def _row_normalized_percent(matrix: np.ndarray) -> np.ndarray:
    """Each row as percentages of its sum (of the true class); rows that sum to 0 stay 0."""
    counts = matrix.astype(np.float64)
    return 100.0 * _safe_divide(counts, counts.sum(axis=1, keepdims=True))


def _draw_confusion(
    fig: Any, ax: Any, matrix: np.ndarray, names: list[str], normalize: bool, title: str
) -> None:
    num_classes = matrix.shape[0]
    if normalize:
        values = _row_normalized_percent(matrix)
        image = ax.imshow(values, cmap=_CMAP, vmin=0.0, vmax=100.0)
        bar_label = "% of true class"
        texts = [[f"{v:.1f}" for v in row] for row in values]
    else:
        values = matrix.astype(np.float64)
        image = ax.imshow(values, cmap=_CMAP, vmin=0.0, vmax=max(1.0, float(values.max(initial=0))))
        bar_label = "count"
        whole = matrix.dtype.kind in "iub" or bool(np.all(matrix == np.round(matrix)))
        texts = [[f"{int(v)}" if whole else f"{v:.3g}" for v in row] for row in matrix]
    fig.colorbar(image, ax=ax, label=bar_label, fraction=0.046, pad=0.04)

    if num_classes <= _MAX_ANNOTATED_CLASSES:
        # White text on dark cells, black on light ones, so every number can be read.
        low, high = image.get_clim()
        threshold = low + 0.5 * (high - low)
        fontsize = 9 if num_classes <= 10 else 7 if num_classes <= 20 else 5
        for i in range(num_classes):
            for j in range(num_classes):
                color = "white" if values[i, j] > threshold else "black"
                ax.text(j, i, texts[i][j], ha="center", va="center", color=color, fontsize=fontsize)

    ticks = np.arange(num_classes)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_yticklabels(names)
    if max((len(n) for n in names), default=0) > 2:
        # Long names ("T-shirt/top", "Ankle boot") would overlap horizontally.
        ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticklabels(names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)


def _panel_inches(num_classes: int) -> float:
    return float(np.clip(0.55 * num_classes + 2.5, 4.5, 12.0))


def plot_confusion_matrix(
    path: str | os.PathLike[str],
    matrix: Any,
    class_names: Sequence[str] | None = None,
    title: str = "",
    normalize: bool = False,
) -> Path:
    """A confusion-matrix heatmap with the number written in each cell, saved as an image.

    Rows are true classes (axis label "true"), columns predicted ("predicted"); the colour bar
    shows counts, or with ``normalize`` the percentage of each true class (each row sums to 100;
    a class with no examples has a row of zeros). Numbers are written for up to 30 classes.

    Args:
        path: destination file (PNG unless the suffix says otherwise; its folder is created if
            missing). Written atomically.
        matrix: a ``[K, K]`` confusion matrix, rows true, columns predicted.
        class_names: K names for both axes; default the class indices. Names longer than two
            characters are rotated on the x axis.
        title: title above the axes.
        normalize: show row-normalized percentages instead of counts.

    Returns:
        The destination path.
    """
    from matplotlib.figure import Figure

    from classicnets.report.plots import save_figure

    matrix = _as_matrix(matrix)
    names = _class_names(class_names, matrix.shape[0])
    side = _panel_inches(matrix.shape[0])
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    _draw_confusion(fig, ax, matrix, names, normalize, title)
    return save_figure(fig, path)


def plot_confusion_matrices(
    path: str | os.PathLike[str],
    matrix: Any,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Counts (left) and row-normalized percentages (right) of one confusion matrix, side by side.

    Args:
        path: destination file (PNG unless the suffix says otherwise; its folder is created if
            missing). Written atomically.
        matrix: a ``[K, K]`` confusion matrix, rows true, columns predicted.
        class_names: K names for both axes; default the class indices.
        title: title above both panels.

    Returns:
        The destination path.
    """
    from matplotlib.figure import Figure

    from classicnets.report.plots import save_figure

    matrix = _as_matrix(matrix)
    names = _class_names(class_names, matrix.shape[0])
    side = _panel_inches(matrix.shape[0])
    fig = Figure(figsize=(2 * (side + 1.2), side), layout="constrained")
    left, right = fig.subplots(1, 2)
    _draw_confusion(fig, left, matrix, names, normalize=False, title="counts")
    _draw_confusion(fig, right, matrix, names, normalize=True, title="% of each true class")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
