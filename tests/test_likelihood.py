"""The importance-weighted log-likelihood (``metrics.likelihood``) against closed forms.

The reference is a linear-Gaussian model, z ~ N(0, I), x | z ~ N(W z + b, s^2 I), whose marginal
is N(b, W W^T + s^2 I) in closed form. W has orthogonal columns, so the exact posterior is a
Gaussian with diagonal covariance, which the estimator's diagonal proposal can represent:
diag(1 / (1 + |w_j|^2 / s^2)) and mean S W^T (x - b) / s^2.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from classicnets.metrics.likelihood import (
    bernoulli_vae_nll,
    gaussian_log_density,
    importance_weighted_log_likelihood,
)
from classicnets.models.vae import VAE

W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)  # columns orthogonal
B = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
S = 0.5


def _exact_log_px(x):
    cov = W @ W.T + S**2 * torch.eye(3, dtype=torch.float64)
    return torch.distributions.MultivariateNormal(B, covariance_matrix=cov).log_prob(x)


def _posterior(x):
    var = 1.0 / (1.0 + (W * W).sum(0) / S**2)  # (L,)
    mu = ((x - B) @ W) / S**2 * var  # (N, L)
    return mu, var.sqrt().expand_as(mu)


def _log_likelihood(x, z):
    return gaussian_log_density(x, z @ W.T + B, torch.full_like(x, S))


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return z @ W.T + B + S * torch.randn(n, 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 7])
def test_the_exact_posterior_gives_log_px_for_any_k(k):
    # Every weight p(x|z) p(z) / q(z|x) equals p(x): the estimate is exact up to float64
    # rounding of a few dozen operations on numbers of size ~10 (1e-12 is 10^4 ulps of room).
    x = _data(50)
    got = importance_weighted_log_likelihood(_posterior, _log_likelihood, x, k,
                                             torch.Generator().manual_seed(1), chunk=3)  # fmt: skip
    assert torch.allclose(got, _exact_log_px(x), rtol=0, atol=1e-12)


def _mismatched(x):
    mu, scale = _posterior(x)
    return mu + 0.3, scale * 1.4


def test_with_a_mismatched_proposal_the_estimate_rises_with_k_towards_log_px():
    x = _data(200)
    exact = _exact_log_px(x)
    g = torch.Generator().manual_seed(2)
    means = {}
    for k in (1, 10, 2000):
        est = importance_weighted_log_likelihood(_mismatched, _log_likelihood, x, k, g, 500)
        errors = est - exact
        means[k] = errors.mean().item()
        # Monte Carlo error of the mean over 200 examples: six standard errors of the errors'
        # own spread (the estimator's bias, -Var/2k of the normalized weights, is far smaller
        # from k = 10 on and only pushes the mean below 0, as Jensen's inequality says).
        bound = 6 * errors.std().item() / math.sqrt(len(x))
        assert means[k] < bound, k
    assert means[1] < means[10] < means[2000]
    assert abs(means[2000]) < 6 * (est - exact).std().item() / math.sqrt(len(x)) + 1e-3


def _vae(conditional: bool):
    torch.manual_seed(0)
    return VAE(hidden_sizes=(32,), latent_size=4, num_classes=10 if conditional else 0)


def _images(n=16):
    g = torch.Generator().manual_seed(3)
    return (torch.rand(n, 1, 28, 28, generator=g) > 0.5).float(), torch.arange(n) % 10


@pytest.mark.parametrize("conditional", [False, True])
def test_one_sample_is_a_one_sample_elbo(conditional):
    model = _vae(conditional).eval()
    x, y = _images()
    labels = y if conditional else None
    got = bernoulli_vae_nll(model, x, labels, k=1, seed=5, batch_size=16)
    # The same draw by hand: log p(x|z) + log p(z) - log q(z|x), z = mu + scale * eps.
    eps = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(5))[0]
    with torch.no_grad():
        mu, scale = model.encode(x.reshape(16, -1), labels)
        z = mu + scale * eps
        log_px_z = -F.binary_cross_entropy_with_logits(
            model.decode(z, labels), x.reshape(16, -1), reduction="none"
        ).sum(1)
        log_pz = gaussian_log_density(z, torch.zeros_like(z), torch.ones_like(z))
        elbo = log_px_z + log_pz - gaussian_log_density(z, mu, scale)
    # Both paths run the same float32 encoder, decoder and cross-entropy on the same shapes;
    # they differ only in the prior's formula and in adding the three terms (here in float32,
    # there in float64): a handful of roundings of values of at most ~600 nats, each at most
    # 600 * 2^-24 ~ 4e-5 nats. 1e-3 is 25 of them.
    assert got["nll"] == pytest.approx(-elbo.double().mean().item(), abs=1e-3)
    assert got["k"] == 1


def test_more_samples_lower_the_nll_and_batching_is_only_a_seed_matter():
    model = _vae(False)
    x, _ = _images(32)
    nll = [bernoulli_vae_nll(model, x, None, k=k, seed=0, batch_size=8)["nll"] for k in (1, 64)]
    assert nll[1] < nll[0]  # a tighter bound on average: the 32-image mean gap is many nats
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="k=0"):
        bernoulli_vae_nll(model, x, None, k=0)
