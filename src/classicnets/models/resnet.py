"""Residual networks for 28x28 images, with basic or bottleneck blocks and an injected norm layer.

He et al. 2016, "Deep Residual Learning for Image Recognition". Each block computes
``relu(F(x) + shortcut(x))``:

    BasicBlock (expansion 1)              Bottleneck (expansion 4, Sec. 4.1, Fig. 5 right)
    x -> 3x3 conv(stride) -> norm -> relu  x -> 1x1 conv (reduce to planes) -> norm -> relu
      -> 3x3 conv -> norm                    -> 3x3 conv(stride) -> norm -> relu
      + shortcut(x) -> relu                  -> 1x1 conv (expand to 4 * planes) -> norm
                                             + shortcut(x) -> relu

The shortcut is the identity when the block keeps the shape, and a projection (1x1 conv with the
block's stride, then norm) when the stride or the channel count changes: option B of Sec. 3.3.
In the bottleneck the stride sits on the 3x3 conv, not the first 1x1 ("ResNet v1.5", as in
torchvision): a strided 1x1 conv would simply drop three quarters of its input.

The network is

    x [N, 1, 28, 28] -> stem: 3x3 conv -> norm -> relu      [N, stem_width, 28, 28]
      -> stage 0 (stride 1)                                  [N, widths[0] * expansion, 28, 28]
      -> stage 1 (stride 2 in its first block)               [N, widths[1] * expansion, 14, 14]
      -> stage 2 (stride 2 in its first block)               [N, widths[2] * expansion, 7, 7]
      -> global average pool -> linear head                  [N, num_classes]

The stem is the one He et al. use for 32x32 CIFAR-10 images (Sec. 4.2): a single 3x3 conv and no
max-pool. ImageNet's 7x7/2 conv + 3x3/2 max-pool would shrink 28x28 to 7x7 before the first stage.

``norm_layer`` is ``classicnets.nn.BatchNorm`` by default, ``None`` (or ``"none"``) for no
normalization, or any callable ``norm_layer(num_features) -> nn.Module``. A conv followed by a norm
has no bias (the norm's offset takes its role, Ioffe & Szegedy 2015, Sec. 3.2); without a norm the
convs have biases and ``nn.Identity`` stands where the norm would be, so module names do not change.
Every conv feeds its norm directly and nothing else, so ``classicnets.nn.fold_bn`` folds them all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from classicnets.choices import check_choice
from classicnets.models.registry import register_presets
from classicnets.nn import BatchNorm

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]

NormLayer = Callable[[int], nn.Module]

NORMS: dict[str, NormLayer | None] = {
    "none": None,
    "batchnorm": BatchNorm,
}


def resolve_norm(norm_layer: str | NormLayer | None) -> NormLayer | None:
    """A norm given as ``None``, a callable or a name in ``NORMS`` -> a callable or ``None``."""
    if isinstance(norm_layer, str):
        return NORMS[check_choice("norm_layer", norm_layer, NORMS)]
    if norm_layer is not None and not callable(norm_layer):
        raise TypeError(f"norm_layer must be None, a name or a callable, got {norm_layer!r}")
    return norm_layer


def _norm(norm_layer: NormLayer | None, channels: int) -> nn.Module:
    return nn.Identity() if norm_layer is None else norm_layer(channels)


def _conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, norm_layer
) -> nn.Conv2d:
    # "same" padding for odd kernels; no bias when a norm follows (its offset replaces the bias).
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        bias=norm_layer is None,
    )


def _shortcut(in_channels: int, out_channels: int, stride: int, norm_layer) -> nn.Module:
    """Identity when the shape is kept, else a projection: 1x1 conv (stride) -> norm (option B)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        OrderedDict(
            conv=_conv(in_channels, out_channels, 1, stride, norm_layer),
            norm=_norm(norm_layer, out_channels),
        )
    )


@torch.no_grad()
def _zero_init_last(conv: nn.Conv2d, norm: nn.Module) -> None:
    """Make the residual branch output zero at init, so the block starts as relu(shortcut(x)).

    Goyal et al. 2017 ("Accurate, Large Minibatch SGD", Sec. 5.1): the last norm's scale (gamma)
    starts at 0. Without an affine norm (or without a norm) the last conv is zeroed instead.
    """
    weight = getattr(norm, "weight", None)
    if isinstance(weight, Tensor):
        weight.zero_()
        return
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()


class _Block(nn.Module):
    """What both residual blocks share: a branch of convs ``conv1 ... convK`` (kernels
    ``KERNELS``; the one numbered ``STRIDED`` carries the stride), each followed by ``normI``
    and, but for the last, ``actI`` (ReLU); a ``shortcut``; and ``act_out`` after the sum.

    Args:
        in_channels: channels of the input.
        planes: channels of the inner convs; the block outputs ``planes * expansion``.
        stride: stride of conv ``STRIDED`` (and of the projection shortcut).
        norm_layer: ``norm_layer(num_features) -> nn.Module``, a name (``"batchnorm"``,
            ``"none"``) or ``None`` for no norm.
    """

    expansion: int
    KERNELS: tuple[int, ...]
    STRIDED: int

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        norm_layer: str | NormLayer | None = BatchNorm,
    ) -> None:
        super().__init__()
        norm_layer = resolve_norm(norm_layer)
        out_channels = planes * self.expansion
        last = len(self.KERNELS)
        for i, kernel in enumerate(self.KERNELS, start=1):
            cin, cout = in_channels if i == 1 else planes, out_channels if i == last else planes
            conv_stride = stride if i == self.STRIDED else 1
            self.add_module(f"conv{i}", _conv(cin, cout, kernel, conv_stride, norm_layer))
            self.add_module(f"norm{i}", _norm(norm_layer, cout))
            if i < last:
                self.add_module(f"act{i}", nn.ReLU())
        self.shortcut = _shortcut(in_channels, out_channels, stride, norm_layer)
        self.act_out = nn.ReLU()

    def zero_init_last(self) -> None:
        """Zero the residual branch's last scale: the block starts as ``relu(shortcut(x))``."""
        last = len(self.KERNELS)
        _zero_init_last(getattr(self, f"conv{last}"), getattr(self, f"norm{last}"))


class BasicBlock(_Block):
    """Two 3x3 convs with a shortcut (He et al. 2016, Fig. 2 and Fig. 5 left); the first conv
    carries the stride, and the block outputs ``planes`` channels (arguments: ``_Block``).

    ``x -> conv1 (3x3, stride) -> norm1 -> act1 -> conv2 (3x3) -> norm2``
    ``-> + shortcut(x) -> act_out``
    """

    expansion, KERNELS, STRIDED = 1, (3, 3), 1

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.norm1(self.conv1(x)))  # (N, planes, H / stride, W / stride)
        out = self.norm2(self.conv2(out))  # (N, planes, H / stride, W / stride)
        return self.act_out(out + self.shortcut(x))


class Bottleneck(_Block):
    """1x1 reduce, 3x3, 1x1 expand to ``4 * planes``, with a shortcut (He et al. 2016, Sec. 4.1;
    arguments: ``_Block``).

    ``x -> conv1 (1x1) -> norm1 -> act1 -> conv2 (3x3, stride) -> norm2 -> act2``
    ``-> conv3 (1x1) -> norm3 -> + shortcut(x) -> act_out``

    The 1x1 convs make the 3x3 conv work on ``planes`` channels while the block's input and output
    have ``4 * planes``: deeper networks for the cost of shallow ones (Sec. 4.1, "Deeper
    Bottleneck Architectures"). The stride is on the 3x3 conv (torchvision's "ResNet v1.5").
    """

    expansion, KERNELS, STRIDED = 4, (1, 3, 1), 2

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.norm1(self.conv1(x)))  # (N, planes, H, W)
        out = self.act2(self.norm2(self.conv2(out)))  # (N, planes, H / stride, W / stride)
        out = self.norm3(self.conv3(out))  # (N, 4 * planes, H / stride, W / stride)
        return self.act_out(out + self.shortcut(x))


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """A residual network for small images: 3x3 stem, stages of residual blocks, average pool, head.

    Stage ``i`` has ``layers[i]`` blocks of ``widths[i]`` planes and outputs
    ``widths[i] * block.expansion`` channels; every stage after the first halves the spatial size
    in its first block (28 -> 28 -> 14 -> 7 for three stages).

    Args:
        block: ``BasicBlock``, ``Bottleneck`` (or any block class with an ``expansion`` attribute
            and the same constructor), or a name: ``"basic"``, ``"bottleneck"``.
        layers: number of blocks in each stage.
        widths: planes of each stage (the bottleneck's inner width; a stage outputs
            ``widths[i] * block.expansion`` channels).
        in_channels: channels of the input images (1 for MNIST).
        num_classes: number of outputs (logits).
        stem_width: output channels of the stem conv; default ``widths[0]``.
        norm_layer: ``classicnets.nn.BatchNorm`` (default), ``None``/``"none"`` for no norm,
            ``"batchnorm"``, or any callable ``norm_layer(num_features) -> nn.Module``.
        zero_init_residual: start the last norm scale of every block at zero, so each block is
            ``relu(shortcut(x))`` at initialization (Goyal et al. 2017, Sec. 5.1).

    Inputs are ``[N, in_channels, H, W]``; outputs ``[N, num_classes]``. Conv weights are
    Kaiming-normal (fan_out, ReLU gain; He et al. 2015), conv biases zero, as in torchvision.
    """

    def __init__(
        self,
        block: str | type[nn.Module],
        layers: Sequence[int],
        widths: Sequence[int],
        in_channels: int = 1,
        num_classes: int = 10,
        stem_width: int | None = None,
        norm_layer: str | NormLayer | None = BatchNorm,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(block, str):
            block = BLOCKS[check_choice("block", block, BLOCKS)]
        layers, widths = tuple(layers), tuple(widths)
        if not layers or len(layers) != len(widths):
            raise ValueError(
                f"layers and widths need one entry per stage, got layers={layers}, widths={widths}"
            )
        if any(n < 1 for n in layers) or any(w < 1 for w in widths):
            raise ValueError(f"layers and widths must be positive, got {layers} and {widths}")
        norm_layer = resolve_norm(norm_layer)
        stem_width = widths[0] if stem_width is None else stem_width
        self.block = block
        self.layers = layers
        self.widths = widths

        self.stem = nn.Sequential(
            OrderedDict(
                conv=_conv(in_channels, stem_width, 3, 1, norm_layer),
                norm=_norm(norm_layer, stem_width),
                act=nn.ReLU(),
            )
        )
        stages = []
        channels = stem_width
        for i, (num_blocks, planes) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(channels, planes, stride, norm_layer))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = channels
        self.head = nn.Linear(channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if m is not self and hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (N, stem_width, H, W)
        x = self.stages(x)  # (N, num_features, H / 2**(S-1), W / 2**(S-1)) for S stages
        x = x.mean(dim=(2, 3))  # (N, num_features): global average pool
        return self.head(x)  # (N, num_classes)


# --------------------------------------------------------------------------- registered variants


def _preset(block: type[_Block], layers: tuple, widths: tuple, note: str) -> tuple[str, dict]:
    """A preset's description, made from its arguments so that the two cannot disagree."""
    kind = "bottleneck blocks" if block is Bottleneck else "basic blocks (two 3x3 convs)"
    text = f"ResNet of {kind} for 28x28 images, stages {layers} of planes {_dashed(widths)}"
    if block.expansion != 1:
        text += f" (outputs {_dashed(w * block.expansion for w in widths)})"
    return f"{text}; {note}", {"block": block, "layers": layers, "widths": widths}


def _dashed(values) -> str:
    return "-".join(map(str, values))


register_presets(
    ResNet,
    {
        "resnet-small": _preset(Bottleneck, (1, 1, 1), (16, 32, 64), "small and fast on CPU"),
        "resnet-medium": _preset(
            Bottleneck, (2, 2, 2), (16, 32, 64), "resnet-small with two blocks per stage"
        ),
        "resnet-bottleneck": _preset(Bottleneck, (2, 2, 2), (32, 64, 128), "the larger variant"),
        "resnet-basic": _preset(
            BasicBlock, (2, 2, 2), (32, 64, 128), "resnet-bottleneck's sizes with basic blocks"
        ),
    },
    example_input_shape=(4, 1, 28, 28),
    test_kwargs={"widths": (4, 8, 8)},
)
