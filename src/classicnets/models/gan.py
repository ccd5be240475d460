"""GAN and conditional GAN for 28x28 images, fully connected (the source blog's architecture).

    generator      [z, onehot(y)]  (N, 32 + 10) -> 150 -> 300 -> 784 sigmoid -> (N, 1, 28, 28)
    discriminator  [x, onehot(y)]  (N, 784 + 10) -> 300 -> 150 -> 1 logit      -> (N,)

The unconditional GAN drops the one-hot parts (32 -> ... and 784 -> ...). Conditioning by
concatenating a one-hot label to the inputs of both networks is Mirza & Osindero 2014, Sec. 3.2.

Activations, and why:

- Generator hidden layers: ReLU (the blog's choice; Goodfellow et al. 2014's generator used
  rectifiers) or leaky ReLU (``generator_activation``). Output: sigmoid, so pixels are
  intensities in [0, 1] like the data.
- Discriminator hidden layers: leaky ReLU with slope 0.2 (Radford et al. 2015, Sec. 3: "within
  the discriminator we found the leaky rectified activation to work well"): a plain ReLU gives no
  gradient through units that are off, and the generator learns only through the discriminator's
  input gradient. Dropout after each hidden layer of the discriminator only (Goodfellow et al.
  2014, Sec. 5: "dropout was applied in training the discriminator net"); it keeps D from
  memorizing the training images and winning outright.
- The discriminator returns a logit, never a probability: the losses use ``log sigmoid`` on the
  logit, which is finite where ``log(sigmoid(.))`` of a saturated probability is not.

``GAN`` holds both networks as submodules, so every parameter name starts with ``generator.`` or
``discriminator.``, and each optimizer can select its own network's parameters by name
(``train.params.select_parameters(model, "generator")``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classicnets.models.registry import register_presets

__all__ = ["GAN", "Discriminator", "Generator"]


def _one_hot(y: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    if y.ndim != 1:
        raise ValueError(
            f"labels must be a 1-d tensor of class indices, got shape {tuple(y.shape)}"
        )
    return F.one_hot(y.long(), num_classes).to(dtype)  # (N, K)


def _cycled_labels(like: Tensor, num_classes: int) -> Tensor:
    """The labels 0, 1, ..., K-1, 0, 1, ... for each row of ``like``.

    ``like.shape[0]`` rather than ``len(like)``, here and in the reshapes below: tracing records
    the former as the input's batch size and the latter as a constant, so a traced (ONNX) graph
    keeps its dynamic batch axis.
    """
    return torch.arange(like.shape[0], device=like.device) % num_classes


class Generator(nn.Module):
    """``G(z[, y])``: latent vectors (and class labels) to images in [0, 1].

    Args:
        latent_size: size of z.
        num_classes: number of classes of a conditional generator; 0 for an unconditional one.
        hidden_sizes: widths of the hidden layers.
        image_shape: shape of one output image.
        activation: of the hidden layers, "relu" or "leaky_relu".
        negative_slope: the leaky ReLU's slope for negative inputs.

    The layers are ``hidden.{i}`` (Linear then activation) and ``output`` (Linear, then sigmoid).
    """

    def __init__(
        self,
        latent_size: int = 32,
        num_classes: int = 0,
        hidden_sizes: Sequence[int] = (150, 300),
        image_shape: Sequence[int] = (1, 28, 28),
        activation: str = "relu",
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        self.latent_size = latent_size
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        if activation not in ("relu", "leaky_relu"):
            raise ValueError(f"activation must be relu or leaky_relu, got {activation!r}")

        def act() -> nn.Module:
            return nn.ReLU() if activation == "relu" else nn.LeakyReLU(negative_slope)

        widths = [latent_size + num_classes, *hidden_sizes]
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), act()) for a, b in zip(widths[:-1], widths[1:])
        )
        self.output = nn.Linear(widths[-1], int(torch.tensor(self.image_shape).prod()))

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Images ``(N, *image_shape)`` from ``z`` ``(N, latent_size)`` and, if conditional,
        labels ``y`` ``(N,)`` (None: the classes 0, 1, ..., K-1 in turn)."""
        h = z
        if self.conditional:
            if y is None:
                y = _cycled_labels(z, self.num_classes)
            h = torch.cat([z, _one_hot(y, self.num_classes, z.dtype)], dim=1)  # (N, latent + K)
        for layer in self.hidden:
            h = layer(h)  # (N, hidden)
        pixels = torch.sigmoid(self.output(h))  # (N, C*H*W)
        return pixels.reshape(z.shape[0], *self.image_shape)  # (N, C, H, W)

    @torch.no_grad()
    def sample(self, n: int, seed: int, batch_size: int = 1000) -> tuple[Tensor, Tensor | None]:
        """``n`` images ``(n, *image_shape)`` from ``z ~ N(0, I)`` drawn with ``seed`` (its own
        CPU generator: torch's global random stream is untouched), in eval mode (the mode is
        restored), and for a conditional generator their labels ``0, 1, ..., K-1, 0, ...``."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_size, generator=torch.Generator("cpu").manual_seed(seed))
        z = z.to(device)  # (n, latent)
        labels = torch.arange(n, device=device) % self.num_classes if self.conditional else None
        was_training = self.training
        self.eval()
        parts = [self(z[i : i + batch_size], None if labels is None else labels[i : i + batch_size])
                 for i in range(0, n, batch_size)]  # fmt: skip
        self.train(was_training)
        return torch.cat(parts), labels


class Discriminator(nn.Module):
    """``D(x[, y])``: the logit that ``x`` is a real image (of class ``y``).

    Args:
        image_shape: shape of one input image (flattened inside).
        num_classes: number of classes of a conditional discriminator; 0 for an unconditional one.
        hidden_sizes: widths of the hidden layers (leaky ReLU, then dropout).
        dropout: dropout probability after each hidden layer (training mode only).
        negative_slope: slope of the leaky ReLU for negative inputs.
    """

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 0,
        hidden_sizes: Sequence[int] = (300, 150),
        dropout: float = 0.3,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        in_features = int(torch.tensor(self.image_shape).prod())
        widths = [in_features + num_classes, *hidden_sizes]
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.LeakyReLU(negative_slope), nn.Dropout(dropout))
            for a, b in zip(widths[:-1], widths[1:])
        )
        self.output = nn.Linear(widths[-1], 1)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Logits ``(N,)`` for images ``x`` ``(N, ...)`` and, if conditional, labels ``y``."""
        h = x.reshape(x.shape[0], -1)  # (N, C*H*W)
        if self.conditional:
            if y is None:
                y = _cycled_labels(x, self.num_classes)
            h = torch.cat([h, _one_hot(y, self.num_classes, h.dtype)], dim=1)  # (N, C*H*W + K)
        for layer in self.hidden:
            h = layer(h)  # (N, hidden)
        return self.output(h).squeeze(1)  # (N,)


class GAN(nn.Module):
    """A generator and a discriminator trained against each other (Goodfellow et al. 2014).

    Args:
        latent_size: size of the generator's input noise z.
        num_classes: 0 for a GAN; the number of classes (10) for a conditional GAN.
        generator_hidden: hidden widths of the generator.
        discriminator_hidden: hidden widths of the discriminator.
        dropout: the discriminator's dropout probability.
        negative_slope: the leaky-ReLU slope (discriminator, and generator if it uses them).
        image_shape: shape of one image.
        generator_activation: "relu" or "leaky_relu" in the generator's hidden layers.

    ``forward(z, y=None)`` is ``D(G(z, y), y)``: the discriminator's logits ``(N,)`` for
    generated images. Training uses the submodules directly (``train.gan``); the composed
    forward exists so that one call with one argument, as the shared registry tests make,
    reaches every parameter of both networks (the gradient of anything computed from it flows
    through D into G). A conditional GAN called without labels uses the classes 0, 1, ..., K-1
    in turn, so that call is deterministic too.

    >>> model = GAN(num_classes=10)
    >>> model(torch.zeros(3, 32)).shape, model.generator(torch.zeros(3, 32)).shape
    (torch.Size([3]), torch.Size([3, 1, 28, 28]))
    """

    def __init__(
        self,
        latent_size: int = 32,
        num_classes: int = 0,
        generator_hidden: Sequence[int] = (150, 300),
        discriminator_hidden: Sequence[int] = (300, 150),
        dropout: float = 0.3,
        negative_slope: float = 0.2,
        image_shape: Sequence[int] = (1, 28, 28),
        generator_activation: str = "relu",
    ) -> None:
        super().__init__()
        self.latent_size = latent_size
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.generator = Generator(
            latent_size, num_classes, generator_hidden, image_shape, generator_activation,
            negative_slope,
        )  # fmt: skip
        self.discriminator = Discriminator(
            image_shape, num_classes, discriminator_hidden, dropout, negative_slope
        )

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.conditional and y is None:
            y = _cycled_labels(z, self.num_classes)
        return self.discriminator(self.generator(z, y), y)  # (N,) logits of D(G(z))


register_presets(
    GAN,
    {
        "gan": (
            "GAN, fully connected: G 32 -> 150 -> 300 -> 784 sigmoid, D 784 -> 300 -> 150 -> 1",
            {"num_classes": 0},
        ),
        "cgan": (
            "conditional GAN: one-hot label joined to G's noise (32+10) and D's image (784+10)",
            {"num_classes": 10},
        ),
    },
    example_input_shape=(4, 32),
)
