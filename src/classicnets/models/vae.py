"""Variational autoencoders for MNIST: the VAE and the conditional VAE of the source blog.

Kingma & Welling 2013 ("Auto-Encoding Variational Bayes") for the VAE; Sohn et al. 2015 for the
conditional one, which feeds the one-hot label to both the encoder and the decoder::

    encoder  [x, onehot(y)] [N, 784 (+10)] -> linear 128 -> relu -> dropout
               -> linear 64 -> relu -> dropout                         [N, 64]
               -> mu: linear 32                                        [N, 32]
               -> scale: softplus(linear 32) + scale_epsilon           [N, 32]
    sample   z = mu + scale * eps, eps ~ N(0, I)   (training)          [N, 32]
             z = mu                                 (eval mode)
    decoder  [z, onehot(y)] [N, 32 (+10)] -> linear 64 -> relu -> dropout
               -> linear 128 -> relu -> dropout -> linear 784           [N, 784] logits

The scale is ``softplus(raw) + scale_epsilon``: softplus keeps it positive with a gradient
everywhere (unlike ``exp``, it grows linearly, so a large raw value cannot overflow), and the
small epsilon (1e-6) keeps ``log(scale)`` in the KL finite when softplus underflows to zero.

In eval mode the code is the posterior mean (no sampling), so a trained model reconstructs
deterministically; evaluation of the ELBO passes its own seeded noise (``noise=``) instead.

The losses are small pure functions: ``kl_divergence`` (analytic, against N(0, I), Kingma &
Welling 2013, App. B), ``reconstruction_loss`` (Bernoulli cross-entropy from logits, or squared
error of the mean image), both per example (summed over latents or pixels); ``vae_loss`` averages
them over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classicnets.choices import check_choice
from classicnets.models.mlp import make_activation
from classicnets.models.registry import register_presets

__all__ = [
    "RECONSTRUCTIONS",
    "VAE",
    "VAEOutput",
    "kl_divergence",
    "negative_elbo",
    "reconstruction_loss",
    "vae_loss",
]

RECONSTRUCTIONS = ("bce", "mse")


class VAEOutput(NamedTuple):
    """What ``VAE.forward`` returns (a tuple: ``out[0]`` is the reconstruction's logits)."""

    logits: Tensor  # (N, 784) Bernoulli logits of each pixel; sigmoid gives the mean image
    mu: Tensor  # (N, latent) mean of q(z | x)
    scale: Tensor  # (N, latent) standard deviation of q(z | x)


# --------------------------------------------------------------------------- losses


def kl_divergence(mu: Tensor, scale: Tensor) -> Tensor:
    """KL(N(mu, diag(scale^2)) || N(0, I)) per example, summed over the latents.

    ``0.5 * sum(mu^2 + scale^2 - 1 - log scale^2)`` (Kingma & Welling 2013, App. B). The
    ``scale^2 - 1 - log scale^2`` part is computed as ``expm1(t) - t`` with ``t = log scale^2``:
    ``expm1(t) >= t`` holds after rounding too, so the result is never negative, whereas
    ``scale^2 - 1 - 2 log scale`` can come out at -1e-7 for ``scale`` near 1.

    Args:
        mu, scale: ``[..., latent]``; ``scale > 0``.

    Returns:
        ``[...]``, in nats.
    """
    log_var = 2.0 * torch.log(scale)
    return 0.5 * (mu.square() + torch.expm1(log_var) - log_var).sum(dim=-1)


def reconstruction_loss(logits: Tensor, target: Tensor, kind: str = "bce") -> Tensor:
    """Reconstruction error per example, summed over pixels.

    Args:
        logits: ``[N, D]`` decoder outputs (pixel logits), or ``[N, ...]`` (an autoencoder's
            ``[N, C, H, W]``), flattened to ``[N, D]``.
        target: ``[N, ...]`` images in [0, 1] (flattened to ``[N, D]``).
        kind: ``"bce"``: Bernoulli cross-entropy ``-x log p - (1 - x) log(1 - p)`` with
            ``p = sigmoid(logits)``, computed stably from the logits (nats; for grey-level
            targets this is the cross-entropy the literature reports as the MNIST "negative
            ELBO"); ``"mse"``: squared error ``(sigmoid(logits) - x)^2`` of the mean image.

    Returns:
        ``[N]``.
    """
    logits, target = logits.flatten(1), target.reshape(target.shape[0], -1)  # (N, D) each
    if check_choice("reconstruction", kind, RECONSTRUCTIONS) == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    else:  # "mse"
        per_pixel = (torch.sigmoid(logits) - target).square()
    return per_pixel.sum(dim=1)


def vae_loss(output: VAEOutput, target: Tensor, reconstruction: str = "bce") -> dict[str, Tensor]:
    """The training objective: ``{"loss", "recon", "kl"}``, each averaged over the batch.

    ``loss = recon + kl``: per example the reconstruction error summed over pixels plus the
    KL summed over latents (for ``"bce"`` this is the negative ELBO in nats).
    """
    recon = reconstruction_loss(output.logits.float(), target, reconstruction).mean()
    kl = kl_divergence(output.mu.float(), output.scale.float()).mean()
    return {"loss": recon + kl, "recon": recon, "kl": kl}


def negative_elbo(model: VAE, x: Tensor, y: Tensor | None, noise: Tensor) -> Tensor:
    """Single-sample negative ELBO per example in nats, Bernoulli decoder, analytic KL:
    ``-log p(x | z) + KL(q(z | x) || p(z))`` with ``z = mu + scale * noise``.

    Args:
        model: the VAE (put it in eval mode first: dropout would change the bound).
        x: images ``[N, 1, 28, 28]`` in [0, 1].
        y: labels ``[N]`` for a conditional model, else None.
        noise: ``[N, latent]`` standard normal draws (seeded by the caller).
    """
    out = model(x, y, noise=noise)
    return reconstruction_loss(out.logits, x, "bce") + kl_divergence(out.mu, out.scale)


# --------------------------------------------------------------------------- the model


def _mlp(sizes: Sequence[int], activation: str, dropout: float) -> nn.Sequential:
    """Linear -> activation -> dropout for each consecutive pair of ``sizes``."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), make_activation(activation), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """VAE (``num_classes=0``) or conditional VAE (``num_classes=10``) with MLP encoder/decoder.

    Args:
        input_size: pixels per image (784); inputs ``[N, ...]`` are flattened.
        hidden_sizes: encoder widths; the decoder mirrors them (128, 64 -> 64, 128).
        latent_size: size of z.
        num_classes: 0 for the plain VAE; K for a conditional one (one-hot labels are
            concatenated to the encoder's input and to z).
        dropout: dropout rate after each hidden layer of encoder and decoder.
        activation: hidden activation name (``models.mlp.ACTIVATIONS``).
        scale_epsilon: added to ``softplus`` so the scale never reaches 0.
        default_label: the label a conditional model uses when ``forward`` gets none (the
            registered-model checks call ``model(x)`` with one argument); experiments always
            pass labels.
    """

    def __init__(
        self,
        input_size: int = 784,
        hidden_sizes: Sequence[int] = (128, 64),
        latent_size: int = 32,
        num_classes: int = 0,
        dropout: float = 0.1,
        decoder_dropout: float = 0.0,
        activation: str = "relu",
        scale_epsilon: float = 1e-6,
        default_label: int = 0,
    ) -> None:
        super().__init__()
        if not hidden_sizes:
            raise ValueError("hidden_sizes needs at least one hidden layer")
        for name, rate in (("dropout", dropout), ("decoder_dropout", decoder_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        if num_classes and not 0 <= default_label < num_classes:
            raise ValueError(f"default_label {default_label} is not in [0, {num_classes})")
        self.input_size = input_size
        self.latent_size = latent_size
        self.num_classes = num_classes
        self.scale_epsilon = scale_epsilon
        self.default_label = default_label
        hidden = list(hidden_sizes)
        self.encoder = _mlp([input_size + num_classes, *hidden], activation, dropout)
        self.to_mu = nn.Linear(hidden[-1], latent_size)
        self.to_scale = nn.Linear(hidden[-1], latent_size)
        self.decoder = _mlp([latent_size + num_classes, *hidden[::-1]], activation, decoder_dropout)
        self.to_logits = nn.Linear(hidden[0], input_size)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def _with_label(self, h: Tensor, y: Tensor | None) -> Tensor:
        """``h`` with the one-hot label appended (conditional models), else ``h``."""
        if not self.conditional:
            return h
        if y is None:
            y = torch.full((h.shape[0],), self.default_label, dtype=torch.long, device=h.device)
        onehot = F.one_hot(y.long(), self.num_classes).to(h.dtype)  # (N, K)
        return torch.cat([h, onehot], dim=1)  # (N, D + K)

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(mu, scale)`` of q(z | x[, y]), each ``[N, latent]``."""
        h = self.encoder(self._with_label(x.reshape(x.shape[0], -1), y))  # (N, hidden[-1])
        scale = F.softplus(self.to_scale(h)) + self.scale_epsilon
        return self.to_mu(h), scale

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Pixel logits ``[N, input_size]`` of p(x | z[, y])."""
        return self.to_logits(self.decoder(self._with_label(z, y)))

    def forward(self, x: Tensor, y: Tensor | None = None, noise: Tensor | None = None) -> VAEOutput:
        """Encode, reparameterize, decode.

        Args:
            x: images ``[N, ...]`` (flattened to ``[N, input_size]``), in [0, 1].
            y: labels ``[N]`` (conditional models; None: ``default_label``).
            noise: ``[N, latent]`` draws for ``z = mu + scale * noise``; None draws them from
                the global generator in training mode and uses ``z = mu`` in eval mode.
        """
        mu, scale = self.encode(x, y)
        if noise is None:
            noise = torch.randn_like(mu) if self.training else torch.zeros_like(mu)
        z = mu + scale * noise  # (N, latent): the reparameterization trick
        return VAEOutput(self.decode(z, y), mu, scale)

    @torch.no_grad()
    def generate(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Mean images ``sigmoid(decode(z, y))`` as ``[N, 1, 28, 28]`` (for 784-pixel models)."""
        return torch.sigmoid(self.decode(z, y)).reshape(z.shape[0], 1, 28, 28)

    def sample_prior(self, n: int, seed: int, y: Tensor | None = None) -> Tensor:
        """``generate`` of ``n`` draws ``z ~ N(0, I)`` made with ``seed`` (their own CPU
        generator), for labels ``y`` ``[n]`` (conditional models) or None."""
        z = torch.randn(n, self.latent_size, generator=torch.Generator().manual_seed(seed))
        device = self.to_logits.weight.device
        return self.generate(z.to(device), None if y is None else y.to(device))


register_presets(
    VAE,
    {
        "vae": (
            "VAE for MNIST: 784-128-64, latent 32, dropout, softplus scale; returns (logits, mu, "
            "scale)",
            {},
        ),
        "cvae": (
            "conditional VAE for MNIST: one-hot digit into encoder and decoder (y defaults to 0)",
            {"num_classes": 10},
        ),
    },
    example_input_shape=(4, 1, 28, 28),
)
