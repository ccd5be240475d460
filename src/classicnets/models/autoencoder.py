"""A convolutional autoencoder whose decoder inverts odd sizes exactly, by output size.

The encoder halves the image with 3x3 stride-2 convolutions (padding 1); the decoder takes the
same sizes back in reverse order, each step told the size it must produce:

    x [N, 1, 28, 28]
      -> down1: conv 3x3/2 -> norm -> relu        [N, c1, 14, 14]
      -> down2: conv 3x3/2 -> norm -> relu        [N, c2, 7, 7]
      -> down3: conv 3x3/2 -> norm -> relu        [N, c3, 4, 4]    (the code)
      -> up1:   upsample 4 -> 7 -> norm -> relu   [N, c2, 7, 7]
      -> up2:   upsample 7 -> 14 -> norm -> relu  [N, c1, 14, 14]
      -> up3:   upsample 14 -> 28                 [N, 1, 28, 28]   (logits; sigmoid outside)

A stride-2 convolution maps both 7 and 8 to 4 (and 13 and 14 to 7), so a transposed convolution
that is only given its stride cannot know which size to give back; a decoder built that way
returns 8 (or 13, or 25) where 7 (or 14, or 28) was wanted, and the usual fix is to crop. Here each
up step is built from ``(in_size, out_size)``:

- ``"transpose"``: ``ConvTranspose2dExact`` (kernel 3, stride 2), which solves for its padding and
  output padding (4 -> 7: padding 1, output padding 0; 7 -> 14 and 14 -> 28: 1 and 1);
- ``"nearest"``, ``"bilinear"``, ``"unpool"``: ``Upsample(size=out_size)`` followed by a 3x3 conv
  with padding 1 (size-preserving). Nothing is cropped: the upsampling makes the exact size.

``norm_layer`` is ``classicnets.nn.BatchNorm`` by default, ``None`` / ``"none"`` for none, or any
``norm_layer(num_features) -> nn.Module``; a conv followed by a norm has no bias. The last layer
has neither norm nor activation: ``forward(x)`` returns ``sigmoid(logits)``, pixel intensities in
(0, 1), and ``forward(x, logits=True)`` the logits (for a numerically stable cross-entropy).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from classicnets.choices import check_choice
from classicnets.models.registry import register_presets
from classicnets.models.resnet import NormLayer, resolve_norm
from classicnets.nn import BatchNorm, ConvTranspose2dExact, Upsample
from classicnets.nn.conv_shapes import conv_output_size

__all__ = ["UPSAMPLING", "ConvAutoencoder"]

UPSAMPLING = ("transpose", "nearest", "bilinear", "unpool")


def _norm(norm_layer: NormLayer | None, channels: int) -> nn.Module:
    return nn.Identity() if norm_layer is None else norm_layer(channels)


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder with an exact-size decoder (see the module docstring).

    Args:
        upsampling: ``"transpose"`` (``ConvTranspose2dExact``), ``"nearest"``, ``"bilinear"`` or
            ``"unpool"`` (``Upsample`` to the exact size, then a 3x3 conv).
        channels: channels after each stride-2 convolution of the encoder; the last is the
            code's (``(16, 32, 16)``: a 16 x 4 x 4 = 256-number code for a 784-pixel image).
        kernel_size: odd kernel size of every convolution.
        norm_layer: ``norm_layer(num_features) -> nn.Module``, ``"batchnorm"``, or ``None`` /
            ``"none"``.
        image_size: side of the square input.
        in_channels: channels of the input (and of the reconstruction).

    Attributes:
        sizes: the spatial sizes of the encoder, ``(28, 14, 7, 4)`` for MNIST; the decoder goes
            through them in reverse.

    >>> model = ConvAutoencoder("unpool", channels=(4, 8, 4))
    >>> model.sizes, model(torch.zeros(2, 1, 28, 28)).shape
    ((28, 14, 7, 4), torch.Size([2, 1, 28, 28]))
    """

    def __init__(
        self,
        upsampling: str = "transpose",
        channels: Sequence[int] = (16, 32, 16),
        kernel_size: int = 3,
        norm_layer: str | NormLayer | None = BatchNorm,
        image_size: int = 28,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        check_choice("upsampling", upsampling, UPSAMPLING)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (size-preserving convs), got {kernel_size}")
        if not channels:
            raise ValueError("channels needs at least one entry")
        norm_layer = resolve_norm(norm_layer)
        self.upsampling = upsampling
        pad = kernel_size // 2
        sizes = [image_size]
        for _ in channels:
            sizes.append(conv_output_size(sizes[-1], kernel_size, stride=2, padding=pad))
        self.sizes = tuple(sizes)

        widths = [in_channels, *channels]
        down = OrderedDict()
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            down[f"down{i + 1}"] = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(a, b, kernel_size, 2, pad, bias=norm_layer is None),
                    norm=_norm(norm_layer, b),
                    act=nn.ReLU(),
                )
            )
        self.encoder = nn.Sequential(down)

        up = OrderedDict()
        steps = list(zip(widths[::-1][:-1], widths[::-1][1:], sizes[::-1][:-1], sizes[::-1][1:]))
        for i, (a, b, size_in, size_out) in enumerate(steps):
            last = i == len(steps) - 1  # the logits: no norm, no activation, a bias
            norm = None if last else norm_layer
            block: OrderedDict[str, nn.Module] = OrderedDict()
            if upsampling == "transpose":
                block["conv"] = ConvTranspose2dExact(
                    a,
                    b,
                    kernel_size,
                    in_size=size_in,
                    out_size=size_out,
                    stride=2,
                    bias=norm is None,
                )
            else:
                block["upsample"] = Upsample(size=size_out, mode=upsampling)
                block["conv"] = nn.Conv2d(a, b, kernel_size, 1, pad, bias=norm is None)
            if not last:
                block["norm"] = _norm(norm, b)
                block["act"] = nn.ReLU()
            up[f"up{i + 1}"] = nn.Sequential(block)
        self.decoder = nn.Sequential(up)

    def encode(self, x: Tensor) -> Tensor:
        """``[N, C, 28, 28]`` -> the code ``[N, channels[-1], 4, 4]``."""
        return self.encoder(x)

    def decode(self, code: Tensor, logits: bool = False) -> Tensor:
        """The code -> the reconstruction ``[N, C, 28, 28]`` (logits if ``logits``)."""
        out = self.decoder(code)
        return out if logits else torch.sigmoid(out)

    def forward(self, x: Tensor, logits: bool = False) -> Tensor:
        """Reconstruct ``x``: pixel intensities in (0, 1), or their logits if ``logits``."""
        return self.decode(self.encode(x), logits=logits)


register_presets(
    ConvAutoencoder,
    {
        "conv-ae": (
            "convolutional autoencoder for 28x28 images, 28-14-7-4 and back by exact-size "
            "transposed convolutions (ConvTranspose2dExact)",
            {"upsampling": "transpose"},
        ),
        "conv-ae-nearest": (
            "convolutional autoencoder, decoder by nearest-neighbour upsampling to the exact size "
            "and a 3x3 conv",
            {"upsampling": "nearest"},
        ),
        "conv-ae-unpool": (
            "convolutional autoencoder, decoder by average unpooling to the exact size and a 3x3 "
            "conv",
            {"upsampling": "unpool"},
        ),
    },
    example_input_shape=(4, 1, 28, 28),
    test_kwargs={"channels": (4, 8, 4)},
)
