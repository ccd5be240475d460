"""Multilayer perceptron with an injected normalization layer.

One code path serves the MLP with and without batch normalization (the BN paper's Figure 1):

    x [N, 784] -> (Linear -> norm -> activation) x len(hidden_sizes) -> Linear -> logits [N, 10]

``norm`` is ``None`` (plain MLP) or a callable ``norm(num_features) -> nn.Module``, for example
``classicnets.nn.BatchNorm``. With a norm layer the hidden ``Linear`` has no bias: BN subtracts the
mean, so a bias before it is redundant; BN's own offset (beta) takes its role (Ioffe & Szegedy
2015, Sec. 3.2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from classicnets.choices import check_choice
from classicnets.models.registry import register_presets
from classicnets.nn import BatchNorm

__all__ = ["ACTIVATIONS", "MLP", "make_activation"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}

NORMS: dict[str, Callable[[int], nn.Module] | None] = {
    "none": None,
    "batchnorm": BatchNorm,
}


def make_activation(name: str) -> nn.Module:
    """An activation module by name (``sigmoid``, ``relu``, ``tanh``, ``gelu``, ``identity``)."""
    return ACTIVATIONS[check_choice("activation", name, ACTIVATIONS)]()


class MLPBlock(nn.Sequential):
    """Linear -> norm (optional) -> activation; named ``linear``, ``norm``, ``act``."""

    def __init__(self, in_features: int, out_features: int, norm, activation: str) -> None:
        layers = {"linear": nn.Linear(in_features, out_features, bias=norm is None)}
        if norm is not None:
            layers["norm"] = norm(out_features)
        layers["act"] = make_activation(activation)
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)


class MLP(nn.Module):
    """A fully connected classifier.

    Args:
        in_features: size of the flattened input (784 for MNIST).
        hidden_sizes: width of each hidden layer.
        num_classes: number of outputs (logits).
        activation: hidden activation name.
        norm: ``None``, ``"none"``, ``"batchnorm"`` or a callable ``norm(num_features)``.
        init_std: if given, hidden and output weights are drawn from N(0, init_std^2) and biases
            set to 0 (the BN paper's "small random Gaussian values"); otherwise PyTorch's default
            ``nn.Linear`` initialization.

    Inputs of any shape ``[N, ...]`` are flattened to ``[N, in_features]``.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden_sizes: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        activation: str = "sigmoid",
        norm: str | Callable[[int], nn.Module] | None = None,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(norm, str):
            norm = NORMS[check_choice("norm", norm, NORMS)]
        make_activation(activation)  # validate early
        self.in_features = in_features
        widths = [in_features, *hidden_sizes]
        self.blocks = nn.ModuleList(
            MLPBlock(a, b, norm, activation) for a, b in zip(widths[:-1], widths[1:])
        )
        self.head = nn.Linear(widths[-1], num_classes)
        if init_std is not None:
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, nn.Linear):
                        m.weight.normal_(0.0, init_std)
                        if m.bias is not None:
                            m.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(x.shape[0], -1)  # (N, in_features)
        for block in self.blocks:
            h = block(h)  # (N, hidden)
        return self.head(h)  # (N, num_classes)


register_presets(
    MLP,
    {
        "mlp": (
            "MLP classifier for 28x28 images: Linear -> activation per hidden layer",
            {"norm": None},
        ),
        "mlp-bn": (
            "MLP classifier with batch normalization before each hidden activation",
            {"norm": "batchnorm"},
        ),
    },
    example_input_shape=(4, 1, 28, 28),
    test_kwargs={"hidden_sizes": (32, 16)},
)
