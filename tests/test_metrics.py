"""``classicnets.metrics`` (classification) against scikit-learn.

References: ``sklearn.metrics.confusion_matrix`` (exact, integer counts),
``precision_recall_fscore_support`` and ``accuracy_score`` with ``labels=range(K)`` and
``zero_division=0`` (1e-12: both divide the same integer counts in float64, one rounding each, but
sklearn reaches F1 through a different sequence of operations). PNG files are checked against the
8-byte PNG signature and decoded by matplotlib's reader.

Random inputs leave some classes out on purpose (never true, never predicted, or both), so the
zero-division rules are exercised on every seed.
"""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import sklearn.metrics as skm
import torch

from classicnets.metrics import classification
from classicnets.metrics.classification import (
    accuracy,
    confusion_matrix,
    format_confusion_matrix,
    per_class_metrics,
    plot_confusion_matrices,
    plot_confusion_matrix,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FASHION_MNIST = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
TOL = {"rtol": 0.0, "atol": 1e-12}
CASES = [(seed, k) for seed in range(4) for k in (1, 2, 5, 12)]


def _random_labels(seed: int, num_classes: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Targets and predictions over ``num_classes`` classes where some classes are missing.

    The last class never occurs at all; the one before is only predicted (never true); class 0
    is only true (never predicted) when there are at least three classes.
    """
    rng = np.random.default_rng(seed)
    used = max(1, num_classes - 1)  # class K-1 is left out entirely
    targets = rng.integers(0, used, n)
    correct = rng.random(n) < 0.6
    predictions = np.where(correct, targets, rng.integers(0, used, n))
    if num_classes >= 3:
        targets[targets == num_classes - 2] = 0  # K-2: predicted, never true
        predictions[predictions == 0] = 1  # 0: true, never predicted
    return targets, predictions


# sklearn warns about a single label even when labels=range(K) is given; K = 1 is meant.
@pytest.mark.filterwarnings("ignore:A single label was found")
@pytest.mark.parametrize(("seed", "num_classes"), CASES)
def test_confusion_matrix_equals_sklearn(seed, num_classes):
    targets, predictions = _random_labels(seed, num_classes)
    ours = confusion_matrix(targets, predictions, num_classes=num_classes)
    theirs = skm.confusion_matrix(targets, predictions, labels=range(num_classes))
    assert ours.dtype == np.int64 and ours.shape == (num_classes, num_classes)
    np.testing.assert_array_equal(ours, theirs)
    assert ours.sum() == len(targets)


@pytest.mark.parametrize(("seed", "num_classes"), CASES)
def test_per_class_metrics_equal_sklearn(seed, num_classes):
    targets, predictions = _random_labels(seed, num_classes)
    labels = list(range(num_classes))
    metrics = per_class_metrics(confusion_matrix(targets, predictions, num_classes))

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        targets, predictions, labels=labels, zero_division=0
    )
    np.testing.assert_allclose(metrics["precision"], precision, **TOL)
    np.testing.assert_allclose(metrics["recall"], recall, **TOL)
    np.testing.assert_allclose(metrics["f1"], f1, **TOL)
    np.testing.assert_array_equal(metrics["support"], support)
    assert metrics["support"].dtype == np.int64

    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            targets, predictions, labels=labels, average=average, zero_division=0
        )
        np.testing.assert_allclose(
            [metrics[f"{average}_{name}"] for name in ("precision", "recall", "f1")],
            [p, r, f],
            **TOL,
        )
    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(targets, predictions), abs=1e-12)
    assert accuracy(targets, predictions) == pytest.approx(
        skm.accuracy_score(targets, predictions), abs=1e-12
    )
    for key in ("accuracy", "macro_f1", "weighted_f1"):
        assert type(metrics[key]) is float  # JSON-ready


def test_missing_classes_get_zero_not_nan():
    # 4 classes: 2 never predicted (precision 0/0), 3 never true nor predicted (everything 0/0).
    matrix = confusion_matrix([0, 1, 2, 2], [0, 2, 2, 2], num_classes=4)
    metrics = per_class_metrics(matrix)
    np.testing.assert_array_equal(metrics["precision"], [1.0, 0.0, 2 / 3, 0.0])
    np.testing.assert_array_equal(metrics["recall"], [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(metrics["f1"], [1.0, 0.0, 0.8, 0.0], **TOL)
    np.testing.assert_array_equal(metrics["support"], [1, 1, 2, 0])
    assert metrics["macro_f1"] == pytest.approx(0.45, abs=1e-12)


def test_empty_matrix_metrics_are_zero():
    metrics = per_class_metrics(np.zeros((3, 3), dtype=np.int64))
    assert metrics["accuracy"] == 0.0 and metrics["weighted_f1"] == 0.0
    assert metrics["macro_precision"] == 0.0
    np.testing.assert_array_equal(metrics["f1"], np.zeros(3))


def test_num_classes_default_and_empty_inputs():
    np.testing.assert_array_equal(
        confusion_matrix([0, 2], [1, 2]), [[0, 1, 0], [0, 0, 0], [0, 0, 1]]
    )
    assert confusion_matrix([], []).shape == (0, 0)
    np.testing.assert_array_equal(confusion_matrix([], [], num_classes=2), np.zeros((2, 2)))


def test_torch_tensor_and_list_inputs():
    targets, predictions = _random_labels(0, 10)
    expected = confusion_matrix(targets, predictions, 10)
    tensors = torch.from_numpy(targets), torch.from_numpy(predictions)
    np.testing.assert_array_equal(confusion_matrix(*tensors, num_classes=10), expected)
    logits = torch.randn(len(predictions), 10, requires_grad=True)  # argmax of a graph tensor
    labels = logits.argmax(1)
    np.testing.assert_array_equal(
        confusion_matrix(tensors[0], labels, 10),
        skm.confusion_matrix(targets, labels.numpy(), labels=range(10)),
    )
    assert accuracy(*tensors) == pytest.approx(np.mean(targets == predictions))
    np.testing.assert_array_equal(
        confusion_matrix(list(targets), predictions.astype(np.int32).tolist(), 10), expected
    )
    np.testing.assert_array_equal(  # whole-number floats (e.g. read back from JSON)
        confusion_matrix(targets.astype(float), predictions.astype(np.float32), 10), expected
    )
    metrics = per_class_metrics(torch.from_numpy(expected))
    np.testing.assert_allclose(metrics["f1"], per_class_metrics(expected)["f1"], **TOL)


def test_importing_metrics_imports_neither_torch_nor_matplotlib():
    code = (
        "import sys, classicnets.metrics\n"
        "print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    )
    src = str(Path(classification.__file__).resolve().parents[2])  # the classicnets under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == ["False", "False"]


# --- errors --------------------------------------------------------------------------------------


def test_label_errors_name_the_value():
    with pytest.raises(
        ValueError, match=r"predictions contains the class index 12, outside \[0, 10\)"
    ):
        confusion_matrix([0, 1], [3, 12], num_classes=10)
    with pytest.raises(ValueError, match="targets contains the class index 10"):
        confusion_matrix([10, 1], [3, 1], num_classes=10)
    with pytest.raises(ValueError, match="targets contains the negative class index -1"):
        confusion_matrix([-1, 1], [0, 1])
    with pytest.raises(ValueError, match="predictions contains the negative class index -3"):
        confusion_matrix([0, 1], [-3, 1], num_classes=4)


def test_shape_and_type_errors():
    with pytest.raises(ValueError, match="differ in length: 3 != 2"):
        confusion_matrix([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match=r"shape \(4, 3\).*argmax"):
        confusion_matrix(np.zeros(4, dtype=int), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="whole numbers, found 0.5"):
        confusion_matrix([0, 1], [0.5, 1.0])
    with pytest.raises(ValueError, match="integer class indices"):
        confusion_matrix(["a", "b"], [0, 1])
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        confusion_matrix([0], [0], num_classes=0)
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])
    with pytest.raises(ValueError, match="square"):
        per_class_metrics(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        per_class_metrics(np.array([[1, -1], [0, 1]]))
    with pytest.raises(ValueError, match="2 class names for a 3-class"):
        format_confusion_matrix(np.eye(3, dtype=int), ["a", "b"])


# --- text and plots ------------------------------------------------------------------------------


def test_format_confusion_matrix():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 10, 2000)
    matrix = confusion_matrix(targets, np.where(rng.random(2000) < 0.7, targets, 3), 10)
    text = format_confusion_matrix(matrix, FASHION_MNIST)
    lines = text.splitlines()
    assert len(lines) == 11 and lines[0].startswith("true \\ predicted")
    for name in FASHION_MNIST:
        assert name in lines[0]  # a column per class ...
    for name, line, row in zip(FASHION_MNIST, lines[1:], matrix):
        assert line.startswith(name)  # ... and a row per true class, counts in order
        assert [int(v) for v in line[len(name) :].split()] == row.tolist()
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert format_confusion_matrix(np.eye(2, dtype=int)).splitlines()[0].split()[-2:] == ["0", "1"]
    normalized = format_confusion_matrix(np.array([[0.75, 0.25], [0.0, 1.0]]), ["a", "b"])
    assert "0.750" in normalized and "0.250" in normalized


@pytest.fixture(scope="module")
def fashion_matrix() -> np.ndarray:
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 9, 1000)  # "Ankle boot" never occurs: a row of zeros
    predictions = np.where(rng.random(1000) < 0.8, targets, rng.integers(0, 10, 1000))
    return confusion_matrix(targets, predictions, 10)


@pytest.mark.parametrize("normalize", [False, True])
def test_plot_confusion_matrix_writes_png(tmp_path, fashion_matrix, normalize):
    path = tmp_path / "plots" / "confusion.png"
    returned = plot_confusion_matrix(
        path, fashion_matrix, FASHION_MNIST, title="Fashion-MNIST", normalize=normalize
    )
    assert returned == path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(path).ndim == 3
    assert [p.name for p in path.parent.iterdir()] == ["confusion.png"]  # no temporary left


def test_plot_confusion_matrices_writes_png(tmp_path, fashion_matrix):
    path = plot_confusion_matrices(tmp_path / "both.png", fashion_matrix, FASHION_MNIST, "test")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > 1.5 * height  # two panels side by side


def test_plot_without_names_and_many_classes(tmp_path):
    matrix = confusion_matrix(np.arange(40) % 31, np.arange(40) % 31, num_classes=31)
    path = plot_confusion_matrix(tmp_path / "many.png", matrix)  # colour only beyond 30 classes
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_docstring_examples():
    result = doctest.testmod(classification)
    assert result.attempted > 0 and result.failed == 0


def test_evaluate_classifier_against_scikit_learn_and_one_batch_cross_entropy():
    from classicnets.metrics.evaluation import evaluate_classifier
    from tolerances import U64, gamma

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4).double().train()
    x, y = torch.randn(250, 6, dtype=torch.float64), torch.randint(0, 4, (250,))
    result = evaluate_classifier(model, x, y, ["a", "b", "c", "d"], batch_size=64)  # 4 batches
    assert model.training  # its mode restored
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy()
        nll = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    assert np.array_equal(result["confusion_matrix"], skm.confusion_matrix(y, predicted))
    # Integer counts divided once in float64 (1e-15 on [0, 1]); F1 at the module's 1e-12 (sklearn
    # reaches it through another sequence of operations).
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted), abs=1e-15)
    assert result["macro_f1"] == pytest.approx(
        skm.f1_score(y, predicted, average="macro", zero_division=0), abs=1e-12
    )
    # The same 250 float64 terms summed in batches and then across them, or in one sum.
    mean = nll.mean().item()
    assert result["loss"] == pytest.approx(mean, abs=2 * gamma(250, U64) * mean)
    assert result["class_names"] == ["a", "b", "c", "d"]
    assert result["per_class"]["support"] == np.bincount(y, minlength=4).tolist()
