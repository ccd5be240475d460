"""A latent-variable model's log-likelihood by importance sampling (Burda et al. 2016).

The ELBO is a bound; what a VAE is judged by in the literature (Burda, Grosse & Salakhutdinov,
"Importance Weighted Autoencoders", ICLR 2016, Table 1: test NLL in nats with k = 5,000) is the
importance-weighted estimate of ``log p(x)`` with the encoder as the proposal:

    log p(x) ~= log (1/k) sum_i p(x | z_i) p(z_i) / q(z_i | x),   z_i ~ q(z | x),

``log_mean_exp`` of the log weights. With k = 1 it is a one-sample ELBO; its expectation never
decreases with k and tends to ``log p(x)``; with ``q`` the exact posterior every weight equals
``p(x)`` and the estimate is exact for any k (``tests/test_likelihood.py`` checks all three
against a linear-Gaussian model, whose ``log p(x)`` is known in closed form).

The weights are accumulated in float64 with a running log-sum-exp over chunks of samples, so
memory grows with ``chunk``, not with ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "bernoulli_vae_nll",
    "gaussian_log_density",
    "importance_weighted_log_likelihood",
    "log_mean_exp",
]

LOG_2PI = math.log(2.0 * math.pi)


def log_mean_exp(log_w: Tensor, dim: int = 0) -> Tensor:
    """``log(mean(exp(log_w)))`` along ``dim``, without overflow or underflow."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def gaussian_log_density(z: Tensor, mu: Tensor, scale: Tensor) -> Tensor:
    """``log N(z; mu, diag(scale^2))`` summed over the last axis (broadcasting)."""
    return (-0.5 * ((z - mu) / scale).square() - torch.log(scale) - 0.5 * LOG_2PI).sum(dim=-1)


@torch.no_grad()
def importance_weighted_log_likelihood(
    encode: Callable[[Tensor], tuple[Tensor, Tensor]],
    log_likelihood: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    k: int,
    generator: torch.Generator,
    chunk: int = 100,
) -> Tensor:
    """The estimate of ``log p(x)`` for each of the examples ``x``, in nats (float64 ``[N]``).

    Args:
        encode: ``encode(x) -> (mu, scale)`` of the Gaussian proposal q(z | x), ``[N, L]`` each.
        log_likelihood: ``log_likelihood(x, z) -> [M]``: log p(x | z) for ``M`` pairs, ``x``
            repeated along the first axis to match ``z`` ``[M, L]``.
        x: ``[N, ...]`` examples.
        k: importance samples per example (k = 1: a one-sample ELBO).
        generator: where the draws ``z = mu + scale * eps`` come from (CPU); the estimate is a
            function of its seed, ``k``, ``chunk`` and the batch of ``x``.
        chunk: samples per example drawn at a time.
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"k={k}, chunk={chunk}: expected at least 1 sample")
    mu, scale = encode(x)  # (N, L) each
    n, latent = mu.shape
    total = torch.full((n,), -math.inf, dtype=torch.float64, device=mu.device)
    for start in range(0, k, chunk):
        m = min(chunk, k - start)
        eps = torch.randn(m, n, latent, generator=generator, dtype=mu.dtype).to(mu.device)
        z = mu + scale * eps  # (m, N, L)
        log_q = gaussian_log_density(z, mu, scale)  # (m, N)
        log_prior = (-0.5 * z.square() - 0.5 * LOG_2PI).sum(dim=-1)  # N(0, I): (m, N)
        repeated = x.unsqueeze(0).expand(m, *x.shape).reshape(m * n, *x.shape[1:])
        log_px = log_likelihood(repeated, z.reshape(m * n, latent)).reshape(m, n)
        log_w = log_px.double() + log_prior.double() - log_q.double()  # (m, N)
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
    return total - math.log(k)


@torch.no_grad()
def bernoulli_vae_nll(
    model,
    x: Tensor,
    y: Tensor | None,
    k: int,
    seed: int = 0,
    batch_size: int = 100,
    chunk: int = 100,
) -> dict[str, float]:
    """The test NLL of a VAE with a Bernoulli decoder: ``-mean log p(x)`` in nats, estimated
    with ``k`` importance samples per example (``importance_weighted_log_likelihood``).

    ``model`` has ``encode(x, y) -> (mu, scale)`` and ``decode(z, y) -> pixel logits`` (a
    ``models.vae.VAE``; conditional models get their labels ``y``, else None); it is put in eval
    mode (no dropout) and back. ``x`` ``[N, ...]`` in [0, 1]: a density only for binary images
    (for grey levels the Bernoulli "likelihood" is no density and the number is not comparable
    with the literature's). The draws come from one CPU generator seeded with ``seed``, batch
    after batch of ``batch_size`` examples.

    Returns:
        ``{"nll", "k"}``: the mean over the examples of ``-log p(x)``, and ``k``.
    """
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].flatten(1)  # (n, pixels)
        yb = None if y is None else y[start : start + batch_size]

        def encode(images, yb=yb):
            return model.encode(images, yb)

        def log_likelihood(images, z, yb=yb):
            labels = None if yb is None else yb.repeat(len(z) // len(yb))
            logits = model.decode(z, labels).float()
            per_pixel = F.binary_cross_entropy_with_logits(logits, images, reduction="none")
            return -per_pixel.sum(dim=1)

        log_px = importance_weighted_log_likelihood(encode, log_likelihood, xb, k, generator,
                                                    chunk)  # fmt: skip
        total -= log_px.sum().item()
    model.train(was_training)
    return {"nll": total / len(x), "k": k}
