"""Keras models as PyTorch modules, batch normalization intact, without TensorFlow.

    model = load_keras("model.keras")                    # Keras 3 archive, or a legacy .h5
    model = load_keras("model.h5", channels_first=True)  # the same network taking NCHW images

Both formats are read with ``zipfile``, ``json`` and ``h5py``: the architecture from the archive's
``config.json`` (or the HDF5 file's ``model_config`` attribute), the weights from
``model.weights.h5`` (or ``model_weights/``). Each Keras layer becomes a small module that
computes what the Keras layer computes, in PyTorch's conventions:

- Layouts. Keras images are channels-last, ``[N, H, W, C]``; inside the module every image
  tensor (rank 4) is ``[N, C, H, W]``, so convolutions run as ``nn.Conv2d``. The module takes and
  returns the Keras layout (``channels_first=True``: NCHW at both ends). Layers whose meaning
  depends on the layout (Flatten, Reshape, Dense on images, axes of BN, softmax, Concatenate) go
  through the channels-last order where Keras does, so a Flatten gives Keras's element order.
- Kernels. Dense ``[in, out]`` becomes Linear ``[out, in]``; Conv2D ``HWIO`` becomes ``OIHW``;
  Conv2DTranspose ``HWOI`` becomes ``IOHW``. ``padding="same"`` is TensorFlow's: the total pad
  ``max((ceil(n / s) - 1) s + (k - 1) d + 1 - n, 0)``, the smaller half first.
- Batch normalization becomes ``classicnets.nn.BatchNorm`` with Keras's epsilon, its momentum
  as ``decay`` (Keras's 0.99 is PyTorch's 0.01) and the biased variance in the moving-variance
  update (Keras 3's rule), so training the imported model further follows Keras. ``center=False``
  or ``scale=False`` leave beta = 0 or gamma = 1, frozen.
- Recurrent layers. Keras's LSTM gates are ordered i, f, c, o, PyTorch's i, f, g, o: the same
  order (c is PyTorch's g). Keras has one bias; it becomes ``bias_ih`` with ``bias_hh`` zero.

Anything that cannot be reproduced exactly (an unknown layer, an activation, option or data format
this module does not implement) is a ``KerasImportError`` naming the layer and its class: nothing
is silently approximated.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classicnets.nn.batchnorm import BatchNorm

__all__ = [
    "SUPPORTED_LAYERS",
    "KerasImportError",
    "KerasModel",
    "build_keras_model",
    "layer_list",
    "load_keras",
    "read_keras",
    "weight_keys",
]


class KerasImportError(ValueError):
    """A Keras file that cannot be read, or a layer or option that cannot be imported exactly."""


# --------------------------------------------------------------------------- reading the file


@dataclass
class KerasFile:
    """What a Keras file holds: the model's config and each layer's weights, in Keras's order.

    Attributes:
        path: the file.
        format: ``"keras"`` (Keras 3 archive) or ``"h5"`` (legacy HDF5).
        config: the model's ``{"class_name": ..., "config": ...}``.
        weights: layer name -> arrays, in the order the layer's ``get_weights()`` gives them.
    """

    path: Path
    format: str
    config: dict[str, Any]
    weights: dict[str, list[np.ndarray]]


def read_keras(path: str | Path) -> KerasFile:
    """Read a ``.keras`` archive or a legacy ``.h5`` model file (no TensorFlow needed).

    Raises:
        KerasImportError: the file is missing, not a Keras model, or damaged (the message names
            the file and what is wrong).
    """
    path = Path(path)
    if not path.is_file():
        raise KerasImportError(f"{path}: no such file")
    try:
        import h5py
    except ImportError:
        raise KerasImportError(
            "reading Keras files needs h5py: pip install 'classicnets[keras]'"
        ) from None
    if zipfile.is_zipfile(path):
        return _read_archive(path, h5py)
    if h5py.is_hdf5(path):
        return _read_legacy(path, h5py)
    raise KerasImportError(f"{path}: neither a .keras archive nor an HDF5 (.h5) model file")


def _json(text: bytes | str, where: str) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KerasImportError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict) or "class_name" not in value or "config" not in value:
        raise KerasImportError(f"{where}: not a Keras model config")
    return value


def _read_archive(path: Path, h5py) -> KerasFile:
    import io

    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "config.json" not in names or "model.weights.h5" not in names:
                raise KerasImportError(
                    f"{path}: a .keras archive holds config.json and model.weights.h5; this one "
                    f"holds {', '.join(sorted(names)) or 'nothing'}"
                )
            config = _json(archive.read("config.json"), f"{path}:config.json")
            blob = archive.read("model.weights.h5")
    except zipfile.BadZipFile as exc:
        raise KerasImportError(f"{path}: damaged archive ({exc})") from None
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    with h5py.File(io.BytesIO(blob), "r") as f:
        if "layers" in f:

            def visit(name: str, obj) -> None:
                if isinstance(obj, h5py.Dataset):
                    layer, _, rest = name.partition("/")
                    groups.setdefault(layer, []).append((rest, np.asarray(obj)))

            f["layers"].visititems(visit)
    # Variables are saved as .../vars/0, .../vars/1, ... (a recurrent layer under cell/vars/).
    weights = {}
    for layer, items in groups.items():
        items.sort(key=lambda item: [int(p) if p.isdigit() else p for p in item[0].split("/")])
        weights[layer] = [array for _, array in items]
    return KerasFile(path, "keras", config, weights)


def _read_legacy(path: Path, h5py) -> KerasFile:
    with h5py.File(path, "r") as f:
        raw = f.attrs.get("model_config")
        if raw is None:
            raise KerasImportError(
                f"{path}: an HDF5 file without 'model_config' (weights only?); save the whole "
                f"model with model.save()"
            )
        config = _json(raw.decode() if isinstance(raw, bytes) else raw, f"{path}:model_config")
        root = f["model_weights"] if "model_weights" in f else f
        weights = {}
        for layer in root.attrs.get("layer_names", []):
            layer = layer.decode() if isinstance(layer, bytes) else str(layer)
            group = root[layer]
            names = [
                n.decode() if isinstance(n, bytes) else str(n)
                for n in group.attrs.get("weight_names", [])
            ]
            weights[layer] = [np.asarray(group[n]) for n in names]
    return KerasFile(path, "h5", config, weights)


def _snake(name: str) -> str:
    """Keras's ``to_snake_case``: the names a .keras archive files layer weights under."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


# --------------------------------------------------------------------------- layer specs


@dataclass
class _Tensor:
    """What the builder knows of a Keras tensor: its rank (with the batch axis)."""

    rank: int


class _Layer(nn.Module):
    """A converted layer: ``forward`` takes and returns tensors in the internal layout (rank-4
    tensors NCHW, everything else as in Keras). ``rank`` is the rank of its (first) input, set
    by the builder."""

    rank: int = 2

    def out_rank(self, ranks: list[int]) -> int:
        return ranks[0]


def _internal_axis(axis: int, rank: int) -> int:
    """A Keras axis (channels-last layout) as an axis of the internal layout."""
    axis = axis % rank
    if rank != 4:
        return axis
    return {0: 0, 1: 2, 2: 3, 3: 1}[axis]


# Ranks are fixed when the model is built (``_Layer.rank``), never read from a tensor at run
# time, so that the module traces (torch.fx) for export like any other.


def _to_keras_layout(x: Tensor, rank: int) -> Tensor:
    return x.permute(0, 2, 3, 1) if rank == 4 else x  # (N, C, H, W) -> (N, H, W, C)


def _to_internal(x: Tensor, rank: int) -> Tensor:
    return x.permute(0, 3, 1, 2) if rank == 4 else x  # (N, H, W, C) -> (N, C, H, W)


_ACTIVATIONS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "linear": lambda x, rank: x,
    "relu": lambda x, rank: F.relu(x),
    "sigmoid": lambda x, rank: torch.sigmoid(x),
    "tanh": lambda x, rank: torch.tanh(x),
    "softmax": lambda x, rank: torch.softmax(x, dim=_internal_axis(-1, rank)),
    "elu": lambda x, rank: F.elu(x),
    "gelu": lambda x, rank: F.gelu(x),  # Keras's activation "gelu": approximate=False
    "leaky_relu": lambda x, rank: F.leaky_relu(x, 0.2),  # keras.activations.leaky_relu's slope
}


def _activation(name: Any, where: str) -> str:
    if isinstance(name, dict):  # a serialized activation object
        name = name.get("config", {}).get("name") or name.get("class_name")
    if name not in _ACTIVATIONS:
        raise KerasImportError(
            f"{where}: activation {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})"
        )
    return name


class _Activation(_Layer):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return _ACTIVATIONS[self.name](x, self.rank)


class _LeakyReLU(_Layer):
    def __init__(self, slope: float) -> None:
        super().__init__()
        self.slope = slope

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.slope)


class _Identity(_Layer):
    def forward(self, x: Tensor) -> Tensor:
        return x


class _Dropout(_Layer):
    def __init__(self, rate: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(x)


class _Dense(_Layer):
    """Keras Dense: over the last Keras axis (the channels of an image)."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray | None, activation: str) -> None:
        super().__init__()
        self.linear = nn.Linear(kernel.shape[0], kernel.shape[1], bias=bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(kernel.T.copy()))  # [in, out] -> [out, in]
            if bias is not None:
                self.linear.bias.copy_(torch.from_numpy(bias))
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        y = _to_internal(self.linear(_to_keras_layout(x, self.rank)), self.rank)
        return _ACTIVATIONS[self.activation](y, self.rank)


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "same" padding of one axis: (before, after), the smaller half first."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _Conv2D(_Layer):
    def __init__(self, kernel: np.ndarray, bias, config: dict, where: str) -> None:
        super().__init__()
        kh, kw, c_in, c_out = kernel.shape  # HWIO; c_in is per group
        groups = int(config.get("groups", 1))
        self.kernel_size = (kh, kw)
        self.strides = tuple(config.get("strides", (1, 1)))
        self.dilation = tuple(config.get("dilation_rate", (1, 1)))
        self.padding = config.get("padding", "valid")
        if self.padding not in ("valid", "same"):
            raise KerasImportError(f"{where}: padding {self.padding!r} is not supported")
        self.conv = nn.Conv2d(
            c_in * groups, c_out, (kh, kw), self.strides, 0, self.dilation, groups, bias is not None
        )
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))  # OIHW
            if bias is not None:
                self.conv.bias.copy_(torch.from_numpy(bias))
        self.activation = _activation(config.get("activation", "linear"), where)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == "same":
            top, bottom = _same_pads(
                x.shape[2], self.kernel_size[0], self.strides[0], self.dilation[0]
            )
            left, right = _same_pads(
                x.shape[3], self.kernel_size[1], self.strides[1], self.dilation[1]
            )
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return _ACTIVATIONS[self.activation](self.conv(x), 4)


class _Conv2DTranspose(_Layer):
    """Keras's output size: ``n s`` ("same") or ``n s + max(k - s, 0)`` ("valid"). TensorFlow
    crops the full transposed convolution, ``(n - 1) s + k``, by the "same" padding of the
    forward convolution it is the gradient of, ``k - s`` in all, the smaller half first."""

    def __init__(self, kernel: np.ndarray, bias, config: dict, where: str) -> None:
        super().__init__()
        kh, kw, c_out, c_in = kernel.shape  # HWOI
        if tuple(config.get("dilation_rate", (1, 1))) != (1, 1):
            raise KerasImportError(f"{where}: dilated transposed convolutions are not supported")
        if config.get("output_padding") is not None:
            raise KerasImportError(f"{where}: an explicit output_padding is not supported")
        self.padding = config.get("padding", "valid")
        if self.padding not in ("valid", "same"):
            raise KerasImportError(f"{where}: padding {self.padding!r} is not supported")
        self.kernel_size, self.strides = (kh, kw), tuple(config.get("strides", (1, 1)))
        self.conv = nn.ConvTranspose2d(c_in, c_out, (kh, kw), self.strides, bias=bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))  # IOHW
            if bias is not None:
                self.conv.bias.copy_(torch.from_numpy(bias))
        self.activation = _activation(config.get("activation", "linear"), where)

        # How much to cut from the full output (n - 1) s + k on each side, or to add at its end
        # when Keras's output is longer (k < s): independent of n.
        self.crops = []
        for k, s in zip(self.kernel_size, self.strides):
            total = k - s if self.padding == "same" else min(k - s, 0)
            self.crops.append(
                (max(total, 0) // 2, max(total, 0) - max(total, 0) // 2, max(-total, 0))
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)  # (N, C, (n - 1) s + k, ...)
        (top, bottom, grow_h), (left, right, grow_w) = self.crops
        if grow_h or grow_w:
            y = F.pad(y, (0, grow_w, 0, grow_h))
        y = y[:, :, top : (-bottom or None), left : (-right or None)]
        return _ACTIVATIONS[self.activation](y, 4)


class _BatchNorm(_Layer):
    def __init__(self, weights: list[np.ndarray], config: dict, rank: int, where: str) -> None:
        super().__init__()
        axis = config.get("axis", -1)
        if isinstance(axis, (list, tuple)):
            if len(axis) != 1:
                raise KerasImportError(f"{where}: normalization over several axes {axis}")
            axis = axis[0]
        scale, center = config.get("scale", True), config.get("center", True)
        arrays = list(weights)
        gamma = arrays.pop(0) if scale else None
        beta = arrays.pop(0) if center else None
        if len(arrays) != 2:
            raise KerasImportError(f"{where}: expected moving_mean and moving_variance")
        mean, var = arrays
        self.bn = BatchNorm(
            mean.shape[0],
            axis=_internal_axis(int(axis), rank),
            eps=float(config.get("epsilon", 1e-3)),
            decay=float(config.get("momentum", 0.99)),
            unbiased_running_var=False,  # Keras 3 updates the moving variance with the biased one
        )
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.from_numpy(mean))
            self.bn.running_var.copy_(torch.from_numpy(var))
            if gamma is not None:
                self.bn.weight.copy_(torch.from_numpy(gamma))
            if beta is not None:
                self.bn.bias.copy_(torch.from_numpy(beta))
        self.bn.weight.requires_grad_(gamma is not None)  # absent in Keras: fixed at 1 and 0
        self.bn.bias.requires_grad_(beta is not None)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)


class _Flatten(_Layer):
    def forward(self, x: Tensor) -> Tensor:
        return _to_keras_layout(x, self.rank).reshape(x.shape[0], -1)  # Keras's order: H, W, C

    def out_rank(self, ranks):
        return 2


class _Reshape(_Layer):
    def __init__(self, target: list[int]) -> None:
        super().__init__()
        self.target = [int(t) for t in target]

    def forward(self, x: Tensor) -> Tensor:
        y = _to_keras_layout(x, self.rank).reshape(x.shape[0], *self.target)
        return _to_internal(y, 1 + len(self.target))

    def out_rank(self, ranks):
        return 1 + len(self.target)


class _Pool2D(_Layer):
    def __init__(self, kind: str, config: dict, where: str) -> None:
        super().__init__()
        self.kind = kind
        self.pool = tuple(config.get("pool_size", (2, 2)))
        strides = config.get("strides")
        self.strides = tuple(strides) if strides is not None else self.pool
        self.padding = config.get("padding", "valid")
        if self.padding not in ("valid", "same"):
            raise KerasImportError(f"{where}: padding {self.padding!r} is not supported")

    def forward(self, x: Tensor) -> Tensor:
        pads = (0, 0, 0, 0)
        if self.padding == "same":
            top, bottom = _same_pads(x.shape[2], self.pool[0], self.strides[0], 1)
            left, right = _same_pads(x.shape[3], self.pool[1], self.strides[1], 1)
            pads = (left, right, top, bottom)
        if self.kind == "max":
            x = F.pad(x, pads, value=-math.inf) if any(pads) else x
            return F.max_pool2d(x, self.pool, self.strides)
        if not any(pads):
            return F.avg_pool2d(x, self.pool, self.strides)
        # TensorFlow averages over the window's values inside the image only.
        total = F.avg_pool2d(F.pad(x, pads), self.pool, self.strides, divisor_override=1)
        ones = F.pad(torch.ones_like(x[:1, :1]), pads)
        count = F.avg_pool2d(ones, self.pool, self.strides, divisor_override=1)
        return total / count


class _GlobalAveragePool(_Layer):
    def __init__(self, keepdims: bool) -> None:
        super().__init__()
        self.keepdims = keepdims

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3), keepdim=self.keepdims)

    def out_rank(self, ranks):
        return 4 if self.keepdims else 2


class _UpSampling2D(_Layer):
    def __init__(self, size) -> None:
        super().__init__()
        self.size = (
            (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size),) * 2
        )

    def forward(self, x: Tensor) -> Tensor:
        # Nearest neighbour at an integer factor: each pixel repeated size times (Keras's rule).
        return F.interpolate(x, scale_factor=self.size, mode="nearest")


class _ZeroPadding2D(_Layer):
    def __init__(self, padding) -> None:
        super().__init__()
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        (top, bottom), (left, right) = ((p, p) if isinstance(p, int) else tuple(p) for p in padding)
        self.pads = (int(left), int(right), int(top), int(bottom))

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pads)


class _Add(_Layer):
    def forward(self, *xs: Tensor) -> Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class _Concatenate(_Layer):
    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, dim=_internal_axis(self.axis, self.rank))


class _Embedding(_Layer):
    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.embedding = nn.Embedding(*table.shape)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.from_numpy(table))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.embedding(tokens.long())

    def out_rank(self, ranks):
        return ranks[0] + 1


class _Recurrent(_Layer):
    """SimpleRNN and LSTM: ``nn.RNN`` / ``nn.LSTM`` (batch first), Keras's one bias as
    ``bias_ih`` and a zero ``bias_hh``; the whole sequence or its last step."""

    def __init__(self, kind: str, weights: list[np.ndarray], config: dict, where: str) -> None:
        super().__init__()
        for option in ("go_backwards", "stateful", "return_state"):
            if config.get(option):
                raise KerasImportError(f"{where}: {option}=True is not supported")
        kernel, recurrent = weights[0], weights[1]
        bias = weights[2] if config.get("use_bias", True) else None
        units = recurrent.shape[0]
        if kind == "lstm":
            if (
                config.get("activation", "tanh") != "tanh"
                or config.get("recurrent_activation", "sigmoid") != "sigmoid"
            ):
                raise KerasImportError(
                    f"{where}: only activation='tanh' with recurrent_activation='sigmoid' "
                    f"matches nn.LSTM"
                )
            self.rnn = nn.LSTM(kernel.shape[0], units, batch_first=True, bias=bias is not None)
        else:
            activation = config.get("activation", "tanh")
            if activation not in ("tanh", "relu"):
                raise KerasImportError(f"{where}: activation {activation!r} (tanh or relu only)")
            self.rnn = nn.RNN(
                kernel.shape[0], units, nonlinearity=activation, batch_first=True,
                bias=bias is not None,
            )  # fmt: skip
        with torch.no_grad():
            # Keras's gate blocks i, f, c, o along the last axis are PyTorch's i, f, g, o.
            self.rnn.weight_ih_l0.copy_(torch.from_numpy(kernel.T.copy()))
            self.rnn.weight_hh_l0.copy_(torch.from_numpy(recurrent.T.copy()))
            if bias is not None:
                self.rnn.bias_ih_l0.copy_(torch.from_numpy(bias))
                self.rnn.bias_hh_l0.zero_()
        if bias is not None:
            self.rnn.bias_hh_l0.requires_grad_(False)  # Keras has one bias; keep the other at 0
        self.return_sequences = bool(config.get("return_sequences", False))

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)  # (N, T, units)
        return out if self.return_sequences else out[:, -1]

    def out_rank(self, ranks):
        return 3 if self.return_sequences else 2


# --------------------------------------------------------------------------- the converters


def _need(weights: list[np.ndarray], count: int, where: str) -> None:
    if len(weights) != count:
        raise KerasImportError(f"{where}: expected {count} weight arrays, found {len(weights)}")


def _dense(c, w, ranks, where):
    use_bias = c.get("use_bias", True)
    _need(w, 2 if use_bias else 1, where)
    return _Dense(w[0], w[1] if use_bias else None, _activation(c.get("activation"), where))


def _conv2d(c, w, ranks, where):
    _check_channels_last(c, where)
    use_bias = c.get("use_bias", True)
    _need(w, 2 if use_bias else 1, where)
    return _Conv2D(w[0], w[1] if use_bias else None, c, where)


def _conv2d_transpose(c, w, ranks, where):
    _check_channels_last(c, where)
    use_bias = c.get("use_bias", True)
    _need(w, 2 if use_bias else 1, where)
    return _Conv2DTranspose(w[0], w[1] if use_bias else None, c, where)


def _check_channels_last(c: dict, where: str) -> None:
    if c.get("data_format", "channels_last") != "channels_last":
        raise KerasImportError(
            f"{where}: data_format {c.get('data_format')!r} (channels_last only)"
        )


def _relu_layer(c, w, ranks, where):
    if c.get("max_value") is not None or float(c.get("threshold", 0.0)) != 0.0:
        raise KerasImportError(f"{where}: ReLU with max_value or threshold is not supported")
    slope = float(c.get("negative_slope", 0.0))
    return _LeakyReLU(slope) if slope else _Activation("relu")


def _leaky_relu_layer(c, w, ranks, where):
    # Keras 3 calls it negative_slope (default 0.3), Keras 2 alpha (default 0.3).
    return _LeakyReLU(float(c.get("negative_slope", c.get("alpha", 0.3))))


def _upsampling(c, w, ranks, where):
    _check_channels_last(c, where)
    if c.get("interpolation", "nearest") != "nearest":
        raise KerasImportError(f"{where}: interpolation {c.get('interpolation')!r} (nearest only)")
    return _UpSampling2D(c.get("size", (2, 2)))


def _embedding(c, w, ranks, where):
    if c.get("mask_zero"):
        raise KerasImportError(f"{where}: mask_zero=True (masking) is not supported")
    _need(w, 1, where)
    return _Embedding(w[0])


Converter = Callable[[dict, list[np.ndarray], list[int], str], _Layer]

CONVERTERS: dict[str, Converter] = {
    "Dense": _dense,
    "Conv2D": _conv2d,
    "Conv2DTranspose": _conv2d_transpose,
    "BatchNormalization": lambda c, w, ranks, where: _BatchNorm(w, c, ranks[0], where),
    "Activation": lambda c, w, ranks, where: _Activation(_activation(c.get("activation"), where)),
    "ReLU": _relu_layer,
    "LeakyReLU": _leaky_relu_layer,
    "Dropout": lambda c, w, ranks, where: _Dropout(float(c.get("rate", 0.0))),
    "Flatten": lambda c, w, ranks, where: _Flatten(),
    "Reshape": lambda c, w, ranks, where: _Reshape(c["target_shape"]),
    "MaxPooling2D": lambda c, w, ranks, where: _Pool2D("max", c, where),
    "AveragePooling2D": lambda c, w, ranks, where: _Pool2D("avg", c, where),
    "GlobalAveragePooling2D": lambda c, w, ranks, where: _GlobalAveragePool(
        bool(c.get("keepdims", False))
    ),
    "UpSampling2D": _upsampling,
    "ZeroPadding2D": lambda c, w, ranks, where: _ZeroPadding2D(c.get("padding", 1)),
    "Add": lambda c, w, ranks, where: _Add(),
    "Concatenate": lambda c, w, ranks, where: _Concatenate(int(c.get("axis", -1))),
    "Embedding": _embedding,
    "SimpleRNN": lambda c, w, ranks, where: _Recurrent("rnn", w, c, where),
    "LSTM": lambda c, w, ranks, where: _Recurrent("lstm", w, c, where),
}
SUPPORTED_LAYERS = ("InputLayer", *CONVERTERS)


# --------------------------------------------------------------------------- the model


class KerasModel(nn.Module):
    """A Keras model's graph of converted layers, run in Keras's order.

    Args:
        nodes: ``(layer name, module, input names)`` in an order where inputs come first.
        inputs: the names of the model's inputs; outputs: of its outputs.
        input_ranks, output_ranks: the rank of each input and output, batch axis included.
        channels_first: images in and out as NCHW (else NHWC, as in Keras).
    """

    def __init__(
        self, nodes, inputs, outputs, input_ranks, output_ranks, channels_first: bool, source: dict
    ):
        super().__init__()
        self.layers = nn.ModuleDict({name: module for name, module, _ in nodes})
        self.wiring = [(name, list(args)) for name, _, args in nodes]
        self.input_names, self.output_names = list(inputs), list(outputs)
        self.input_ranks = list(input_ranks)
        self.output_ranks = list(output_ranks)
        self.channels_first = channels_first
        self.source = source  # the Keras config, kept for model folders

    def forward(self, x: Tensor, extra_inputs: tuple = ()):
        """The model on ``x`` (a model with several inputs: ``model(x1, (x2, ...))``)."""
        inputs = (x, *extra_inputs)
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the model takes {len(self.input_names)} inputs, got {len(inputs)}")
        values: dict[str, Tensor] = {}
        for name, x, rank in zip(self.input_names, inputs, self.input_ranks):
            values[name] = x if self.channels_first else _to_internal(x, rank)
        for name, args in self.wiring:
            values[name] = self.layers[name](*[values[a] for a in args])
        outputs = [
            values[n] if self.channels_first else _to_keras_layout(values[n], rank)
            for n, rank in zip(self.output_names, self.output_ranks)
        ]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _inbound(layer: dict, where: str) -> list[str]:
    """The names of the layers a functional layer reads (Keras 3 and Keras 2 formats)."""
    nodes = layer.get("inbound_nodes") or []
    if len(nodes) > 1:
        raise KerasImportError(f"{where}: a layer called more than once (shared) is not supported")
    if not nodes:
        return []
    node = nodes[0]
    names: list[str] = []

    def collect(item) -> None:
        if isinstance(item, dict) and item.get("class_name") == "__keras_tensor__":
            history = item["config"]["keras_history"]
            if history[2] != 0 or history[1] != 0:
                raise KerasImportError(f"{where}: multi-output or shared layers are not supported")
            names.append(history[0])
        elif isinstance(item, (list, tuple)):
            if len(item) >= 3 and isinstance(item[0], str) and isinstance(item[1], int):
                names.append(item[0])  # Keras 2: [layer, node, tensor, kwargs]
            else:
                for sub in item:
                    collect(sub)

    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        collect(node.get("args", []))
    else:
        collect(node)
    return names


def _input_rank(layer: dict) -> int:
    c = layer["config"]
    shape = c.get("batch_shape") or c.get("batch_input_shape")
    if shape is None:
        raise KerasImportError(f"layer {c.get('name')!r} (InputLayer): no batch_shape")
    return len(shape)


def layer_list(
    config: dict, where: str
) -> tuple[list[tuple[dict, list[str]]], list[str], list[str]]:
    """``[(layer, inbound names)]``, input names, output names, for Sequential and Functional."""
    kind, body = config["class_name"], config["config"]
    layers = body.get("layers") if isinstance(body, dict) else None
    if not isinstance(layers, list):
        raise KerasImportError(f"{where}: the model config has no layer list")
    if kind == "Sequential":
        out, previous, inputs = [], None, []
        for layer in layers:
            if layer["class_name"] == "InputLayer":
                out.append((layer, []))
                inputs.append(layer["config"]["name"])
                previous = layer["config"]["name"]
                continue
            if previous is None:  # Keras 2: the first layer carries batch_input_shape
                shape = layer["config"].get("batch_input_shape")
                if shape is None:
                    raise KerasImportError(f"{where}: a Sequential model without an input shape")
                name = "input"
                out.append(
                    (
                        {
                            "class_name": "InputLayer",
                            "config": {"name": name, "batch_shape": shape},
                        },
                        [],
                    )
                )
                inputs.append(name)
                previous = name
            out.append((layer, [previous]))
            previous = layer["config"]["name"]
        return out, inputs, [previous]
    if kind in ("Functional", "Model"):
        out = [
            (layer, _inbound(layer, f"{where}: layer {layer.get('name')!r}")) for layer in layers
        ]

        def names(spec) -> list[str]:
            if spec and isinstance(spec[0], str):
                return [spec[0]]
            return [s[0] for s in spec]

        return out, names(body["input_layers"]), names(body["output_layers"])
    raise KerasImportError(
        f"{where}: models of class {kind!r} are not supported (Sequential, Functional)"
    )


def weight_keys(layers: list[tuple[dict, list[str]]], fmt: str) -> dict[str, str]:
    """Layer name -> key of its weights in the file: the name itself in .h5 files; in .keras
    archives, Keras's automatic name for the class, counted per class in model order."""
    if fmt == "h5":
        return {layer["config"]["name"]: layer["config"]["name"] for layer, _ in layers}
    counts: dict[str, int] = {}
    keys = {}
    for layer, _ in layers:
        if layer["class_name"] == "InputLayer":
            continue
        base = _snake(layer["class_name"])
        n = counts.get(base, 0)
        counts[base] = n + 1
        keys[layer["config"]["name"]] = base if n == 0 else f"{base}_{n}"
    return keys


def load_keras(path: str | Path, channels_first: bool = False) -> KerasModel:
    """A Keras model file as a ``torch.nn.Module`` in eval mode.

    Args:
        path: a Keras 3 ``.keras`` archive or a legacy ``.h5`` model (Keras 2 / TF 2 or Keras 3).
        channels_first: take and return images as ``[N, C, H, W]`` (default: Keras's
            ``[N, H, W, C]``).

    Returns:
        A ``KerasModel``: ``model(x)`` (several inputs: ``model(x1, (x2, ...))``) returns the
        output (a tuple for several).

    Raises:
        KerasImportError: an unreadable file, or a layer, activation or option that cannot be
            imported exactly, named with its class.
    """
    source = read_keras(path)
    return build_keras_model(
        source.config, source.weights, source.format, channels_first, str(path)
    )


def build_keras_model(
    config: dict, weights: dict[str, list[np.ndarray]], fmt: str, channels_first: bool, where: str
) -> KerasModel:
    """The module of a Keras config and its weights (``read_keras``'s parts)."""
    layers, inputs, outputs = layer_list(config, where)
    keys = weight_keys(layers, fmt)
    ranks: dict[str, int] = {}
    nodes = []
    input_ranks = []
    for layer, args in layers:
        kind = layer["class_name"]
        c = layer["config"]
        name = c["name"]
        label = f"{where}: layer {name!r} ({kind})"
        if kind == "InputLayer":
            ranks[name] = _input_rank(layer)
            continue
        if kind not in CONVERTERS:
            raise KerasImportError(
                f"{label} is not supported; supported layers: {', '.join(SUPPORTED_LAYERS)}"
            )
        missing = [a for a in args if a not in ranks]
        if missing or not args:
            raise KerasImportError(f"{label}: its inputs {missing or args} come from nowhere")
        arrays = [np.asarray(a, dtype=np.float32) for a in weights.get(keys.get(name, name), [])]
        in_ranks = [ranks[a] for a in args]
        module = CONVERTERS[kind](c, arrays, in_ranks, label)
        module.rank = in_ranks[0]
        ranks[name] = module.out_rank(in_ranks)
        nodes.append((name, module, args))
    for name in inputs:
        if name not in ranks:
            raise KerasImportError(f"{where}: input {name!r} is not an InputLayer")
    input_ranks = [ranks[n] for n in inputs]
    for name in outputs:
        if name not in ranks:
            raise KerasImportError(f"{where}: output {name!r} is not a layer of the model")
    output_ranks = [ranks[n] for n in outputs]
    model = KerasModel(nodes, inputs, outputs, input_ranks, output_ranks, channels_first, config)
    return model.eval()
