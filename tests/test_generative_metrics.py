"""metrics.generative: Frechet distance against scipy and closed forms; the scoring classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from classicnets.data.tensors import load_image_data
from classicnets.experiments.common import ExperimentError
from classicnets.experiments.scorer import scoring_classifier
from classicnets.metrics.generative import (
    frechet_distance,
    label_accuracy,
    reference_distances,
    sample_scores,
)


def _gaussian(rng, n, d, shift=0.0):
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = _gaussian(rng, 300, 12), _gaussian(rng, 250, 12, shift=0.3)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # The usual FID formula (pytorch-fid): a general matrix square root of the product.
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root)
    # float64 throughout; sqrtm of the non-symmetric product is the less exact of the two.
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_zero_for_identical_sets_and_symmetric():
    rng = np.random.default_rng(1)
    a, b = _gaussian(rng, 400, 16), _gaussian(rng, 350, 16, shift=1.0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-10)
    assert frechet_distance(torch.from_numpy(a), a) == pytest.approx(0.0, abs=1e-10)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)
    assert frechet_distance(a, b) > 0


def _exact_moments(rng, n, mean, variances):
    """Samples whose sample mean and covariance (ddof=1) are exactly ``mean`` and
    ``diag(variances)`` (up to rounding): whitened normal draws, rescaled and shifted."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z * np.sqrt(variances) + mean


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    a, b = _exact_moments(rng, 500, mu_a, var_a), _exact_moments(rng, 700, mu_b, var_b)
    # Commuting (diagonal) covariances: Tr(S_a + S_b - 2 (S_a S_b)^1/2) = sum (sd_a - sd_b)^2.
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)  # 5.25 + 6.0858...


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        frechet_distance(np.zeros(5), np.zeros((5, 1)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((3, 2), np.nan), np.zeros((3, 2)))


@pytest.fixture(scope="module")
def scorer_and_data(tmp_path_factory, data_root):
    # One quick scorer per test session: test_vae.py uses the same cache folder.
    cache = tmp_path_factory.getbasetemp() / "scoring_classifier"
    scorer = scoring_classifier(str(data_root), "cpu", cache_dir=cache, quick=True)
    data = load_image_data("mnist", str(data_root), "cpu")
    return scorer, data, cache


def test_test_images_are_far_closer_to_training_images_than_noise(scorer_and_data):
    scorer, data, _ = scorer_and_data
    n = 3000
    train = scorer.features(data.train_x[:n])
    test = scorer.features(data.test_x[:n])
    noise = scorer.features(torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    real, fake = frechet_distance(test, train), frechet_distance(noise, train)
    # Measured (3,000 images each): quick scorer, test to train 5.3, noise to train 442; full
    # scorer 13.2 and 648. The bound leaves an order of magnitude of room.
    assert real < 0.05 * fake, (real, fake)
    assert train.shape == (n, 128)


def test_label_accuracy_on_real_test_images(scorer_and_data):
    scorer, data, _ = scorer_and_data
    accuracy = label_accuracy(scorer, data.test_x[:2000], data.test_y[:2000])
    # The quick scorer (200 Adam steps of 64 on 6,000 images) measures 93.55% on the first
    # 2,000 test images; the full one (1,400 steps of 128 on all 60,000) 98.87% on all 10,000.
    assert accuracy > 0.9
    assert accuracy == pytest.approx(scorer.test_accuracy, abs=1e-12)  # the loop's own figure


def test_features_are_the_input_of_the_head(scorer_and_data):
    scorer, data, _ = scorer_and_data
    x = data.test_x[:50]
    features = torch.from_numpy(scorer.features(x)).float()
    with torch.no_grad():
        logits = scorer.model.head(features)
    assert np.array_equal(logits.argmax(1).numpy(), scorer.predict(x))


def test_scorer_is_cached_and_reloaded(scorer_and_data, data_root):
    scorer, data, cache = scorer_and_data
    info = json.loads((cache / "cnn-quick.json").read_text())
    assert info["quick"] is True and info["test_accuracy"] == scorer.test_accuracy
    again = scoring_classifier(str(data_root), "cpu", cache_dir=cache, quick=True)
    assert again.source == str(cache / "cnn-quick.safetensors")
    for key, value in scorer.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key


def test_classifier_run_must_be_resnet_vs_mlp(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "bn-mlp", "config": {}}))
    with pytest.raises(ExperimentError, match="resnet-vs-mlp run"):
        scoring_classifier(None, "cpu", classifier_run=str(tmp_path))


def test_sample_scores_agree_with_scikit_learn(scorer_and_data):
    from sklearn.metrics import accuracy_score, confusion_matrix, recall_score

    scorer, data, _ = scorer_and_data
    images, asked = data.test_x[:300], (data.test_y[:300] + (torch.arange(300) % 7 == 0)) % 10
    test_features = scorer.features(data.test_x[300:900])
    scores = sample_scores(scorer, images, test_features, asked)
    predicted = scorer.predict(images)
    assert scores["frechet_distance"] == frechet_distance(scorer.features(images), test_features)
    # Both divide the same integer counts in float64, one rounding each: equal but for the last
    # bit at most, so 1e-15 on values in [0, 1].
    assert scores["label_accuracy"] == pytest.approx(accuracy_score(asked, predicted), abs=1e-15)
    assert np.array_equal(scores["label_confusion_matrix"], confusion_matrix(asked, predicted))
    recall = recall_score(asked, predicted, average=None)  # per digit asked for
    np.testing.assert_allclose(scores["label_accuracy_per_digit"], recall, rtol=0, atol=1e-15)
    assert set(sample_scores(scorer, images, test_features)) == {"frechet_distance"}


def test_reference_distances_bracket_over_as_many_images(scorer_and_data):
    scorer, data, _ = scorer_and_data
    test_features = scorer.features(data.test_x[:500])
    refs = reference_distances(scorer, test_features, data.train_x, noise_seed=3)
    train = scorer.features(data.train_x[:500])
    noise = torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    assert refs == {
        "frechet_test_to_train": frechet_distance(test_features, train),
        "frechet_noise_to_train": frechet_distance(scorer.features(noise), train),
    }
    assert refs["frechet_test_to_train"] < refs["frechet_noise_to_train"]


def test_plot_label_confusion_writes_the_matrix_of_the_scores(tmp_path):
    from classicnets.metrics.generative import plot_label_confusion

    scores = {"label_confusion_matrix": np.diag([5] * 10), "label_accuracy": 1.0}
    path = plot_label_confusion(tmp_path / "c.png", scores, "cgan")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
