"""Scores for generative models on MNIST: Frechet distance and label accuracy by a classifier.

A generative model is scored through a trained MNIST classifier (the "scorer"):

- ``frechet_distance``: the Frechet distance between Gaussians fitted to the scorer's
  penultimate-layer features of generated and of real images (Heusel et al. 2017, the FID with
  an MNIST classifier standing in for Inception-v3). Lower is better; real test images against
  real training images give a floor, uniform noise a ceiling.
- ``label_accuracy``: for conditional models, the fraction of samples the scorer recognises as
  the digit that was asked for.

``sample_scores`` gives both for one set of samples (with the confusion matrix "asked for x
recognised as"), ``reference_distances`` the two distances that bracket them.

The scorer is handed in trained (``experiments.scorer.scoring_classifier`` makes one: the
``resnet`` of a ``resnet-vs-mlp`` run, or a ``SmallCNN`` trained and cached); this module only
measures with it, and imports nothing that trains or reads runs.

``frechet_distance`` is NumPy only (float64, symmetric eigendecompositions, no scipy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ScoringClassifier",
    "SmallCNN",
    "frechet_distance",
    "label_accuracy",
    "plot_label_confusion",
    "reference_distances",
    "sample_scores",
]


# --------------------------------------------------------------------------- Frechet distance


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition; the
    (tiny, rounding-born) negative eigenvalues are clipped to zero."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    root = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return (eigenvectors * root) @ eigenvectors.T


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017).

    ``d = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2})``, with the sample
    means and covariances (``ddof=1``, as ``np.cov``) in float64. ``Tr((S_a S_b)^{1/2})`` is
    computed as the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    ``S_a^{1/2} S_b S_a^{1/2}`` (similar to ``S_a S_b``), so no complex ``sqrtm`` and no scipy
    are needed; rounding-born negative eigenvalues are clipped to zero and so is the result.

    Args:
        features_a, features_b: arrays (or tensors) of shape ``[N, D]`` and ``[M, D]``, N, M >= 2.

    Returns:
        The distance, a Python float >= 0.

    >>> a = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    >>> round(frechet_distance(a, a + 1.0), 12)  # a shift by (1, 1): ||mu_a - mu_b||^2 = 2
    2.0
    """
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))  # (D, D)
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = 0.5 * (middle + middle.T)  # symmetric up to rounding; make it exactly so
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()
    distance = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def _as_features(features, name: str) -> np.ndarray:
    if isinstance(features, Tensor):
        features = features.detach().cpu().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"{name} must have shape [N, D] with N >= 2, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


# --------------------------------------------------------------------------- the scorer


class SmallCNN(nn.Module):
    """The scorer trained when no classifier run is given: two 5x5 conv + max-pool stages and a
    128-unit hidden layer whose activations are the features::

        x [N, 1, 28, 28] -> conv 8 -> relu -> pool   [N, 8, 14, 14]
          -> conv 16 -> relu -> pool                   [N, 16, 7, 7]
          -> flatten -> linear 128 -> relu             [N, 128]  (features: the head's input)
          -> head: linear 10                           [N, 10]
    """

    def __init__(self, channels: tuple[int, int] = (8, 16), hidden_size: int = 128) -> None:
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, hidden_size),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden_size, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.reshape(-1, 1, 28, 28)))  # (N, 10)


@dataclass
class ScoringClassifier:
    """A trained MNIST classifier used to score generated images.

    Attributes:
        model: the classifier; it must have a ``head`` (the last linear layer), whose input is
            taken as the feature vector.
        device: where it runs.
        source: where it came from (a checkpoint or cache path), for reports.
        test_accuracy: its accuracy on the MNIST test split, when known.
        batch_size: images per forward pass in ``features`` and ``predict`` (no effect on the
            result beyond float rounding).
    """

    model: nn.Module
    device: str
    source: str = ""
    test_accuracy: float | None = None
    batch_size: int = 1000

    def _batches(self, images):
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        x = images.to(device=self.device, dtype=torch.float32).reshape(-1, 1, 28, 28)
        for start in range(0, len(x), self.batch_size):
            yield x[start : start + self.batch_size]

    @torch.no_grad()
    def _run(self, images, want_features: bool) -> np.ndarray:
        captured: list[Tensor] = []
        handle = None
        if want_features:
            handle = self.model.head.register_forward_pre_hook(
                lambda _m, inputs: captured.append(inputs[0].flatten(1).double().cpu())
            )
        was_training = self.model.training
        self.model.eval()
        predictions = []
        try:
            for xb in self._batches(images):
                predictions.append(self.model(xb).argmax(dim=1).cpu())
        finally:
            self.model.train(was_training)
            if handle is not None:
                handle.remove()
        if want_features:
            return torch.cat(captured).numpy() if captured else np.zeros((0, 0))
        return torch.cat(predictions).numpy() if predictions else np.zeros(0, dtype=np.int64)

    def features(self, images) -> np.ndarray:
        """Penultimate-layer features (the head's input), float64 ``[N, D]``.

        Args:
            images: float ``[N, 1, 28, 28]`` (or ``[N, 784]``) in [0, 1], tensor or array.
        """
        return self._run(images, want_features=True)

    def predict(self, images) -> np.ndarray:
        """Predicted labels, int64 ``[N]``, of float images in [0, 1]."""
        return self._run(images, want_features=False)


def label_accuracy(scorer: ScoringClassifier, images, labels) -> float:
    """The fraction of ``images`` that ``scorer`` recognises as the digit in ``labels``.

    Args:
        scorer: the scoring classifier.
        images: float ``[N, 1, 28, 28]`` in [0, 1].
        labels: the digits asked for, ``[N]``.
    """
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels).reshape(-1)
    predicted = scorer.predict(images)
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} images but {len(labels)} labels")
    return float(np.mean(predicted == labels)) if len(labels) else float("nan")


def reference_distances(
    scorer: ScoringClassifier, test_features, train_images, noise_seed: int
) -> dict[str, float]:
    """The Frechet distances that bracket a generator's, each over as many images as
    ``test_features`` has rows (n): test against training images (real against real: what a
    perfect generator gets, up to sampling noise) and uniform noise against training images
    (what a useless one gets).

    Args:
        scorer: the scoring classifier.
        test_features: its features of n test images, ``[n, D]``.
        train_images: training images; the first n are used.
        noise_seed: seed of the n uniform-noise images (their own CPU generator).
    """
    n = len(test_features)
    train_features = scorer.features(train_images[:n])
    noise = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(noise_seed))
    return {
        "frechet_test_to_train": frechet_distance(test_features, train_features),
        "frechet_noise_to_train": frechet_distance(scorer.features(noise), train_features),
    }


def sample_scores(
    scorer: ScoringClassifier, samples, test_features, labels=None, num_classes: int = 10
) -> dict:
    """Scores of generated ``samples`` (float ``[N, 1, 28, 28]`` in [0, 1]).

    Returns ``frechet_distance`` (samples to ``test_features``) and, when ``labels`` (the
    digits asked for, ``[N]``) are given, ``label_accuracy``, ``label_accuracy_per_digit`` and
    ``label_confusion_matrix`` (int64 ``[K, K]``; rows: digit asked for, columns: recognised).
    """
    from classicnets.metrics.classification import confusion_matrix

    out: dict = {"frechet_distance": frechet_distance(scorer.features(samples), test_features)}
    if labels is not None:
        labels = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else labels
        matrix = confusion_matrix(labels, scorer.predict(samples), num_classes=num_classes)
        out["label_accuracy"] = float(np.trace(matrix) / matrix.sum())
        out["label_accuracy_per_digit"] = (np.diag(matrix) / matrix.sum(axis=1)).tolist()
        out["label_confusion_matrix"] = matrix
    return out


def plot_label_confusion(path, scores: dict, name: str):
    """Draw ``scores["label_confusion_matrix"]`` (``sample_scores`` of a conditional model's
    samples) to the image ``path``: the digit asked for (rows) against the digit the scorer
    recognised (columns), titled with ``name`` and the label accuracy. Returns the path."""
    from classicnets.metrics.classification import plot_confusion_matrices

    matrix = scores["label_confusion_matrix"]
    return plot_confusion_matrices(
        path,
        matrix,
        [str(k) for k in range(len(matrix))],
        title=f"{name} samples: digit asked for (rows) x recognised (columns), "
        f"{100 * scores['label_accuracy']:.1f}% as asked",
    )
