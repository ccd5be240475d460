"""Layers whose defaults are arguments, not surprises.

``Dense`` is a fully connected layer (``y = activation(x @ W.T + b)``) that takes its activation
and both initializers as required arguments, because the three APIs that the classic code is
written against disagree on all three and say nothing about it:

======================================  ==========  ==========================  ============
API                                     activation  weight init                 bias init
======================================  ==========  ==========================  ============
``tf.layers.dense``                     none        Glorot uniform              zeros
``tf.contrib.layers.fully_connected``   ReLU        Xavier (= Glorot) uniform   zeros
``torch.nn.Linear``                     none        U(+-1/sqrt(fan_in))         U(+-1/sqrt(fan_in))
======================================  ==========  ==========================  ============

``Dense.tf_layers_dense``, ``Dense.tf_fully_connected`` and ``Dense.torch_linear`` give each set
of defaults by name. The parameters are ``weight`` (``[out_features, in_features]``) and ``bias``
(``[out_features]``), exactly as in ``torch.nn.Linear``, so a ``Dense`` ``state_dict`` loads into
an ``nn.Linear`` of the same size and back. See ``docs/layers.md``.

Named initializers (``fan_in = in_features``, ``fan_out = out_features``; the variance is that of
every entry):

- ``"glorot_uniform"``, ``"xavier_uniform"``: U(-a, a), ``a = sqrt(6 / (fan_in + fan_out))``,
  variance ``2 / (fan_in + fan_out)`` (Glorot & Bengio 2010, eq. 16).
  ``tf.contrib.layers.xavier_initializer()`` is this one: it defaults to ``uniform=True``.
- ``"glorot_normal"``: today's TensorFlow / Keras ``glorot_normal``: a normal truncated at two
  of its standard deviations, with standard deviation
  ``sqrt(2 / (fan_in + fan_out)) / 0.87962566103423978`` before truncation. The constant is the
  standard deviation of a standard normal truncated to [-2, 2], so after truncation the variance
  is exactly ``2 / (fan_in + fan_out)``. (The correction came in 2018, tensorflow/tensorflow#18706
  and keras-team/keras#8048; TensorFlow and Keras releases before it truncated without it, which
  gives about 0.77 of that variance.)
- ``"he_normal"``: TensorFlow's ``he_normal``: the same truncated normal with target variance
  ``2 / fan_in`` (He et al. 2015).
- ``"kaiming_normal"``: PyTorch's ``kaiming_normal_(nonlinearity="relu")``: an *untruncated*
  normal, variance ``2 / fan_in``.
- ``"he_uniform"``: U(-a, a), ``a = sqrt(6 / fan_in)``, variance ``2 / fan_in`` (TensorFlow's
  ``he_uniform`` and PyTorch's ``kaiming_uniform_(nonlinearity="relu")`` alike).
- ``"torch_default"``: what ``nn.Linear.reset_parameters`` does, bit for bit: weights by
  ``kaiming_uniform_(a=sqrt(5))``, which is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance
  ``1 / (3 fan_in)``; biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the *weight's* fan_in.
- ``"zeros"``, ``"ones"``.

Anything else is a callable that fills the tensor it is given in place, like the functions of
``torch.nn.init`` (``nn.init.orthogonal_``, ``functools.partial(nn.init.normal_, std=0.01)``), or
returns a tensor of the same shape to copy in; ``normal_initializer(std)``,
``truncated_normal_initializer(std)``, ``uniform_initializer(low, high)`` and
``constant_initializer(value)`` make the common ones with a readable name in ``repr``.

Sizes of convolutions (see ``docs/layers.md`` for the formulas and their derivation):
``conv_output_size``, ``conv_transpose_output_size`` and ``same_padding`` give output lengths and
TensorFlow's ``SAME`` padding along one axis; ``ConvTranspose2dExact`` is a transposed convolution
built for the output size it must produce (it solves for ``padding`` and ``output_padding``, and
refuses an unreachable size at construction, saying which sizes are reachable);
``Upsample`` upsamples by ``"nearest"``, ``"bilinear"`` or ``"unpool"`` (average unpooling).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "INITIALIZERS",
    "PADDING_RULES",
    "UPSAMPLE_MODES",
    "ConvTranspose2dExact",
    "Dense",
    "Upsample",
    "constant_initializer",
    "conv_output_size",
    "conv_transpose_output_size",
    "conv_transpose_padding",
    "normal_initializer",
    "same_padding",
    "truncated_normal_initializer",
    "uniform_initializer",
]

# The standard deviation of a standard normal truncated to [-2, 2]; TensorFlow's VarianceScaling
# divides by it so that a truncated normal keeps the variance it is asked for.
TRUNCATED_NORMAL_STD = 0.87962566103423978

Activation = str | Callable[[Tensor], Tensor] | None
Initializer = str | Callable[[Tensor], Any]


def _identity(x: Tensor) -> Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "linear": _identity,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": F.gelu,  # the exact (erf) form, as tf.nn.gelu(approximate=False) and nn.GELU()
    "softplus": F.softplus,
}


# --- initializers -------------------------------------------------------------------------------
# A named initializer fills ``tensor`` in place given the fans of the layer it belongs to: a bias
# has no fans of its own (``"torch_default"`` bounds it by the weight's fan_in).


def _uniform(tensor: Tensor, bound: float) -> None:
    tensor.uniform_(-bound, bound)


def _tf_truncated_normal(tensor: Tensor, variance: float) -> None:
    # TensorFlow's VarianceScaling(distribution="truncated_normal"): cut at +-2 of the stddev of
    # the normal before truncation, which is scaled up so that the variance after is `variance`.
    std = math.sqrt(variance) / TRUNCATED_NORMAL_STD
    nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def _glorot_uniform(tensor: Tensor, fan_in: int, fan_out: int) -> None:
    _uniform(tensor, math.sqrt(6.0 / (fan_in + fan_out)))  # Glorot & Bengio 2010, eq. 16


def _glorot_normal(tensor: Tensor, fan_in: int, fan_out: int) -> None:
    _tf_truncated_normal(tensor, 2.0 / (fan_in + fan_out))


def _he_normal(tensor: Tensor, fan_in: int, fan_out: int) -> None:
    _tf_truncated_normal(tensor, 2.0 / fan_in)  # He et al. 2015, eq. 10


def _he_uniform(tensor: Tensor, fan_in: int, fan_out: int) -> None:
    _uniform(tensor, math.sqrt(6.0 / fan_in))


def _kaiming_normal(tensor: Tensor, fan_in: int, fan_out: int) -> None:
    tensor.normal_(0.0, math.sqrt(2.0 / fan_in))


def _torch_default(tensor: Tensor, fan_in: int, fan_out: int) -> None:
    if tensor.dim() == 2:
        # Exactly nn.Linear.reset_parameters, so that under the same seed the values are the
        # same bits: kaiming_uniform_ with a=sqrt(5) is U(+-1/sqrt(fan_in)) up to rounding.
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    else:
        _uniform(tensor, 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


def _zeros(tensor: Tensor, fan_in: int, fan_out: int) -> None:
    tensor.zero_()


def _ones(tensor: Tensor, fan_in: int, fan_out: int) -> None:
    tensor.fill_(1.0)


INITIALIZERS: dict[str, Callable[[Tensor, int, int], None]] = {
    "glorot_uniform": _glorot_uniform,
    "xavier_uniform": _glorot_uniform,
    "glorot_normal": _glorot_normal,
    "he_normal": _he_normal,
    "he_uniform": _he_uniform,
    "kaiming_normal": _kaiming_normal,
    "torch_default": _torch_default,
    "zeros": _zeros,
    "ones": _ones,
}


def _named(fn: Callable[[Tensor], Tensor], name: str) -> Callable[[Tensor], Tensor]:
    fn.__name__ = fn.__qualname__ = name  # what Dense.extra_repr shows
    return fn


def normal_initializer(std: float, mean: float = 0.0) -> Callable[[Tensor], Tensor]:
    """An initializer drawing from N(mean, std^2) (``tf.random_normal_initializer``).

    Args:
        std: standard deviation.
        mean: mean.

    >>> Dense(4, 3, activation=None, weight_init=normal_initializer(0.01), bias_init="zeros")
    Dense(in_features=4, out_features=3, bias=True, activation=linear, weight_init=normal(std=0.01), bias_init=zeros)
    """  # noqa: E501
    if not std >= 0:
        raise ValueError(f"normal_initializer: std must be >= 0, got {std}")
    suffix = f", mean={mean}" if mean else ""
    return _named(lambda t: t.normal_(mean, std), f"normal(std={std}{suffix})")


def truncated_normal_initializer(std: float, mean: float = 0.0) -> Callable[[Tensor], Tensor]:
    """An initializer drawing from N(mean, std^2) redrawn outside ``mean +- 2 std``.

    As ``tf.truncated_normal_initializer``: ``std`` is that of the normal *before* truncation,
    so the values have a standard deviation of about ``0.88 std``.

    Args:
        std: standard deviation of the normal before truncation.
        mean: mean.
    """
    if not std >= 0:
        raise ValueError(f"truncated_normal_initializer: std must be >= 0, got {std}")
    suffix = f", mean={mean}" if mean else ""
    return _named(
        lambda t: nn.init.trunc_normal_(t, mean, std, mean - 2 * std, mean + 2 * std),
        f"truncated_normal(std={std}{suffix})",
    )


def uniform_initializer(low: float, high: float) -> Callable[[Tensor], Tensor]:
    """An initializer drawing from U(low, high) (``tf.random_uniform_initializer``).

    Args:
        low: lower bound.
        high: upper bound (>= low).
    """
    if not high >= low:
        raise ValueError(f"uniform_initializer: need low <= high, got {low} > {high}")
    return _named(lambda t: t.uniform_(low, high), f"uniform({low}, {high})")


def constant_initializer(value: float) -> Callable[[Tensor], Tensor]:
    """An initializer filling every entry with ``value`` (``tf.constant_initializer``).

    Args:
        value: the value.
    """
    return _named(lambda t: t.fill_(value), f"constant({value})")


def _callable_name(fn: Callable[..., Any]) -> str:
    if isinstance(fn, nn.Module):
        return repr(fn)
    return getattr(fn, "__name__", None) or repr(fn)


def _resolve_initializer(init: Initializer, what: str) -> tuple[str, Callable[..., Any], bool]:
    """(name for repr, function, whether it is a named one taking fans)."""
    if isinstance(init, str):
        if init not in INITIALIZERS:
            raise ValueError(
                f"unknown {what} {init!r}; valid names: {', '.join(sorted(INITIALIZERS))} "
                "(or pass a callable that fills a tensor in place)"
            )
        return init, INITIALIZERS[init], True
    if callable(init):
        return _callable_name(init), init, False
    raise TypeError(f"{what} must be a name or a callable, got {type(init).__name__}")


def _resolve_activation(activation: Activation) -> tuple[str, Callable[[Tensor], Tensor]]:
    if activation is None:
        return "linear", _identity
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; valid names: "
                f"{', '.join(sorted(ACTIVATIONS))} or None (or pass a callable)"
            )
        return activation, ACTIVATIONS[activation]
    if callable(activation):
        return _callable_name(activation), activation
    raise TypeError(f"activation must be None, a name or a callable, got {type(activation)}")


# --- the layer ----------------------------------------------------------------------------------


class Dense(nn.Module):
    """Fully connected layer, ``y = activation(x @ weight.T + bias)``, with explicit defaults.

    Args:
        in_features: size of each input sample (the last axis of ``x``).
        out_features: size of each output sample.
        activation: ``None`` or ``"linear"`` (identity), ``"relu"``, ``"sigmoid"``, ``"tanh"``,
            ``"gelu"`` (exact erf form), ``"softplus"``, or a callable ``Tensor -> Tensor``. An
            ``nn.Module`` becomes a submodule (one with parameters adds them to the
            ``state_dict``, which then no longer loads into ``nn.Linear``).
        weight_init: a name from ``INITIALIZERS`` (see the module docstring) or a callable that
            fills the ``[out_features, in_features]`` tensor in place (``torch.nn.init`` style) or
            returns the values.
        bias_init: the same for the ``[out_features]`` bias; ``None`` only with ``bias=False``.
            Named initializers use the layer's fans (``"torch_default"``: U(+-1/sqrt(fan_in))).
        bias: whether to learn an additive bias.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Use ``Dense.tf_layers_dense``, ``Dense.tf_fully_connected`` or ``Dense.torch_linear`` for the
    defaults of those APIs. Parameters are created and initialized in the order of
    ``nn.Linear`` (weight, then bias), so ``torch.manual_seed(s); Dense.torch_linear(i, o)``
    and ``torch.manual_seed(s); nn.Linear(i, o)`` hold the same values.

    >>> layer = Dense(784, 100, activation="sigmoid", weight_init="glorot_uniform",
    ...               bias_init="zeros")
    >>> layer(torch.zeros(2, 784)).shape
    torch.Size([2, 100])
    >>> layer
    Dense(in_features=784, out_features=100, bias=True, activation=sigmoid, weight_init=glorot_uniform, bias_init=zeros)
    """  # noqa: E501

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        activation: Activation,
        weight_init: Initializer,
        bias_init: Initializer | None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Dense: {name} must be a non-negative int, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.activation_name, activation_fn = _resolve_activation(activation)
        # Assigned as an attribute: an nn.Module registers itself as a submodule, a function is
        # stored as is.
        self.activation = activation_fn
        self.weight_init_name, self._weight_init, self._weight_init_named = _resolve_initializer(
            weight_init, "weight_init"
        )
        if bias and bias_init is None:
            raise ValueError(
                "Dense: bias_init is required when bias=True (None only with bias=False)"
            )
        if bias:
            self.bias_init_name, self._bias_init, self._bias_init_named = _resolve_initializer(
                bias_init, "bias_init"
            )
        else:
            self.bias_init_name, self._bias_init, self._bias_init_named = "none", None, False

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # -- presets ---------------------------------------------------------------------------------

    @classmethod
    def tf_layers_dense(
        cls,
        in_features: int,
        out_features: int,
        activation: Activation = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Dense:
        """``tf.layers.dense`` (and ``tf.keras.layers.Dense``) defaults.

        No activation, Glorot-uniform weights (``tf.get_variable``'s default initializer when
        ``kernel_initializer=None``), zero bias.

        Args:
            in_features: size of each input sample.
            out_features: ``units``.
            activation: as in ``Dense``; ``tf.layers.dense`` defaults to none.
            bias: ``use_bias``.
            device: device of the parameters.
            dtype: dtype of the parameters.
        """
        return cls(
            in_features,
            out_features,
            activation=activation,
            weight_init="glorot_uniform",
            bias_init="zeros",
            bias=bias,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def tf_fully_connected(
        cls,
        in_features: int,
        out_features: int,
        activation: Activation = "relu",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Dense:
        """``tf.contrib.layers.fully_connected`` defaults.

        ReLU activation (``activation_fn=tf.nn.relu``), Xavier-uniform weights
        (``xavier_initializer()``, whose ``uniform=True`` default makes it Glorot uniform), zero
        bias.

        Args:
            in_features: size of each input sample.
            out_features: ``num_outputs``.
            activation: as in ``Dense``; ``fully_connected`` defaults to ReLU.
            bias: whether to have a bias (``biases_initializer=None`` in TensorFlow).
            device: device of the parameters.
            dtype: dtype of the parameters.
        """
        return cls(
            in_features,
            out_features,
            activation=activation,
            weight_init="xavier_uniform",
            bias_init="zeros",
            bias=bias,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def torch_linear(
        cls,
        in_features: int,
        out_features: int,
        activation: Activation = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Dense:
        """``torch.nn.Linear`` defaults: no activation, ``"torch_default"`` weights and bias.

        Args:
            in_features: size of each input sample.
            out_features: size of each output sample.
            activation: as in ``Dense``; ``nn.Linear`` has none.
            bias: whether to learn an additive bias.
            device: device of the parameters.
            dtype: dtype of the parameters.
        """
        return cls(
            in_features,
            out_features,
            activation=activation,
            weight_init="torch_default",
            bias_init="torch_default",
            bias=bias,
            device=device,
            dtype=dtype,
        )

    # -- nn.Module -------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """(Re)initialize ``weight`` and ``bias`` with the layer's initializers."""
        with torch.no_grad():
            self._apply_init(self.weight, self._weight_init, self._weight_init_named)
            if self.bias is not None:
                self._apply_init(self.bias, self._bias_init, self._bias_init_named)

    def _apply_init(self, tensor: Tensor, init: Callable[..., Any], named: bool) -> None:
        if tensor.numel() == 0:
            return  # nothing to fill (and the fans may be zero)
        if named:
            init(tensor, self.in_features, self.out_features)
            return
        result = init(tensor)
        if isinstance(result, Tensor) and result is not tensor:
            if result.shape != tensor.shape:
                raise ValueError(
                    f"initializer {_callable_name(init)} returned shape {tuple(result.shape)}, "
                    f"expected {tuple(tensor.shape)}"
                )
            tensor.copy_(result)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` of shape ``[..., in_features]`` to ``[..., out_features]``."""
        return self.activation(F.linear(x, self.weight, self.bias))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation={self.activation_name}, "
            f"weight_init={self.weight_init_name}, bias_init={self.bias_init_name}"
        )


# --- sizes of convolutions ----------------------------------------------------------------------
# One axis at a time: k kernel size, s stride, d dilation, p padding on each side, op output
# padding; K = d (k - 1) + 1 is the extent of the dilated kernel.

PADDING_RULES = ("auto", "same", "valid")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_axis(in_size: int, kernel_size: int, stride: int, dilation: int) -> None:
    _check_int("in_size", in_size, 1)
    _check_int("kernel_size", kernel_size, 1)
    _check_int("stride", stride, 1)
    _check_int("dilation", dilation, 1)


def _check_rule(padding: Any, rules: tuple[str, ...]) -> None:
    if isinstance(padding, str):
        if padding not in rules:
            raise ValueError(f"padding must be an int >= 0 or one of {rules}, got {padding!r}")
    else:
        _check_int("padding", padding, 0)


def conv_output_size(
    in_size: int, kernel_size: int, stride: int = 1, padding: int | str = 0, dilation: int = 1
) -> int:
    """Output length of a convolution along one axis.

    Args:
        in_size: input length.
        kernel_size: kernel length ``k``.
        stride: stride ``s``.
        padding: zeros added on *each* side (PyTorch's ``padding``), or TensorFlow's ``"same"`` or
            ``"valid"``.
        dilation: dilation ``d``.

    Returns:
        ``floor((in + 2 p - d (k - 1) - 1) / s) + 1`` for an int (PyTorch's ``Conv2d``),
        ``ceil(in / s)`` for ``"same"``, ``ceil((in - d (k - 1)) / s)`` for ``"valid"`` (the same
        as the int formula with ``p = 0``).

    Raises:
        ValueError: a bad argument, or a kernel longer than the padded input.

    >>> [conv_output_size(n, 3, stride=2, padding=1) for n in (28, 14, 7)]
    [14, 7, 4]
    >>> conv_output_size(7, 3, stride=2, padding="same"), conv_output_size(7, 3, 2, "valid")
    (4, 3)
    """
    _check_axis(in_size, kernel_size, stride, dilation)
    _check_rule(padding, ("same", "valid"))
    if padding == "same":
        return -(-in_size // stride)
    padding = 0 if padding == "valid" else padding
    extent = dilation * (kernel_size - 1) + 1
    if in_size + 2 * padding < extent:
        raise ValueError(
            f"kernel extent {extent} (kernel {kernel_size}, dilation {dilation}) is longer than "
            f"the padded input {in_size} + 2 * {padding}"
        )
    return (in_size + 2 * padding - extent) // stride + 1


def same_padding(in_size: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple:
    """TensorFlow's ``SAME`` padding of one axis, as ``(before, after)``.

    The total is ``max((ceil(in / s) - 1) s + d (k - 1) + 1 - in, 0)``: just enough for
    ``ceil(in / s)`` outputs. ``before = total // 2``; an odd pixel goes *after* (bottom, right),
    as in TensorFlow and in PyTorch's ``Conv2d(padding="same")`` (which allows stride 1 only).
    Padding the input by it and convolving with padding 0 gives ``ceil(in / s)`` outputs.

    Args:
        in_size: input length.
        kernel_size: kernel length.
        stride: stride.
        dilation: dilation.

    >>> same_padding(28, 3, stride=2), same_padding(7, 4)
    ((0, 1), (1, 2))
    """
    _check_axis(in_size, kernel_size, stride, dilation)
    out = -(-in_size // stride)
    total = max((out - 1) * stride + dilation * (kernel_size - 1) + 1 - in_size, 0)
    return total // 2, total - total // 2


def conv_transpose_output_size(
    in_size: int,
    kernel_size: int,
    stride: int = 1,
    padding: int | str = 0,
    dilation: int = 1,
    output_padding: int = 0,
) -> int:
    """Output length of a transposed convolution along one axis.

    Args:
        in_size: input length.
        kernel_size: kernel length ``k``.
        stride: stride ``s``.
        padding: PyTorch's ``padding`` (removed from each side of the full output), or
            ``"same"`` / ``"valid"`` for the default output size of Keras' ``Conv2DTranspose``.
        dilation: dilation ``d``.
        output_padding: rows added at the end, ``0 <= op < max(s, d)`` (int padding only).

    Returns:
        ``(in - 1) s - 2 p + d (k - 1) + op + 1`` for an int (PyTorch's ``ConvTranspose2d``);
        ``in * s`` for ``"same"``; ``in * s + max(d (k - 1) + 1 - s, 0)`` for ``"valid"``.

    >>> conv_transpose_output_size(4, 3, stride=2, padding=1), conv_transpose_output_size(5, 3, 2)
    (7, 11)
    >>> conv_transpose_output_size(5, 3, 2, "same"), conv_transpose_output_size(5, 3, 2, "valid")
    (10, 11)
    """
    _check_axis(in_size, kernel_size, stride, dilation)
    _check_rule(padding, ("same", "valid"))
    extent = dilation * (kernel_size - 1) + 1
    if isinstance(padding, str):
        if output_padding != 0:
            raise ValueError("output_padding goes with an int padding, not 'same' or 'valid'")
        if padding == "same":
            return in_size * stride
        return in_size * stride + max(extent - stride, 0)
    if isinstance(output_padding, bool) or not isinstance(output_padding, int):
        raise ValueError(f"output_padding must be an int, got {output_padding!r}")
    if not 0 <= output_padding < max(stride, dilation):
        raise ValueError(
            f"output_padding must be in [0, max(stride, dilation)) = [0, {max(stride, dilation)})"
            f", got {output_padding}"
        )
    out = (in_size - 1) * stride - 2 * padding + extent + output_padding
    if out < 1:
        raise ValueError(f"padding {padding} leaves no output (length {out})")
    return out


def _transpose_solutions(
    in_size: int, kernel_size: int, stride: int, dilation: int, padding: int | str
) -> dict[int, tuple[int, int]]:
    """Every output length the rule ``padding`` allows -> its ``(padding, output_padding)``,
    the smallest padding first."""
    full = (in_size - 1) * stride + dilation * (kernel_size - 1) + 1  # p = 0, op = 0
    op_limit = max(stride, dilation)  # PyTorch: 0 <= output_padding < max(stride, dilation)
    paddings = [padding] if isinstance(padding, int) else range((full + op_limit) // 2 + 1)
    solutions: dict[int, tuple[int, int]] = {}
    for p in paddings:
        for op in range(op_limit):
            out = full - 2 * p + op
            if out < 1 or out in solutions:
                continue
            if padding == "valid" and not (p == 0 and full <= out < full + stride):
                continue  # TF VALID: ceil((out - d (k - 1)) / s) == in, and no padding
            if padding == "same" and (
                -(-out // stride) != in_size or p != (max(full - out, 0) + 1) // 2
            ):
                continue  # TF SAME: ceil(out / s) == in; p = ceil(total SAME padding / 2)
            solutions[out] = (p, op)
    return solutions


def _span(values: list[int]) -> str:
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}..{values[-1]}"


def _describe_sizes(solutions: dict[int, tuple[int, int]]) -> str:
    """``1..12 (padding 0..5, output_padding 0..1)``, or ``none``."""
    if not solutions:
        return "none"
    sizes = sorted(solutions)
    runs: list[list[int]] = [[sizes[0]]]
    for n in sizes[1:]:
        if n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    if len(runs) > 6 and all(len(r) == 1 for r in runs):
        text = f"{sizes[0]}, {sizes[1]}, ..., {sizes[-1]}"
    else:
        text = ", ".join(_span(r) for r in runs)
    pads = sorted({p for p, _ in solutions.values()})
    ops = sorted({op for _, op in solutions.values()})
    return f"{text} (padding {_span(pads)}, output_padding {_span(ops)})"


def _solve_transpose(
    in_size: int,
    out_size: int,
    kernel_size: int,
    stride: int,
    dilation: int,
    padding: int | str,
    what: str,
) -> tuple[int, int]:
    _check_axis(in_size, kernel_size, stride, dilation)
    _check_rule(padding, PADDING_RULES)
    _check_int("out_size", out_size, 1)
    solutions = _transpose_solutions(in_size, kernel_size, stride, dilation, padding)
    if out_size in solutions:
        return solutions[out_size]
    message = (
        f"cannot produce {what} {out_size} from {in_size} with kernel {kernel_size}, stride "
        f"{stride}, dilation {dilation}, padding {padding!r}; reachable sizes: "
        f"{_describe_sizes(solutions)}"
    )
    if max(stride, dilation) == 1:
        message += "; with stride 1 and dilation 1 there is no output_padding, so each step of "
        message += "padding removes 2"
    if padding != "auto":
        auto = _transpose_solutions(in_size, kernel_size, stride, dilation, "auto")
        message += f"; with padding 'auto': {_describe_sizes(auto)}"
    raise ValueError(message)


def conv_transpose_padding(
    in_size: int,
    out_size: int,
    kernel_size: int,
    stride: int = 1,
    dilation: int = 1,
    padding: int | str = "auto",
) -> tuple[int, int]:
    """``(padding, output_padding)`` for a transposed convolution from ``in_size`` to ``out_size``.

    PyTorch's transposed convolution gives ``out = (in - 1) s - 2 p + d (k - 1) + op + 1`` with
    ``p >= 0`` and ``0 <= op < max(s, d)``. The rule ``padding`` says which ``p`` may be used:

    - ``"auto"``: the smallest that works (``op`` is then 0 or 1, unless ``out`` exceeds the
      unpadded output ``(in - 1) s + d (k - 1) + 1``);
    - an int: exactly that one (only ``op`` is solved for);
    - ``"valid"``: ``p = 0``, and ``out`` must be a length that TensorFlow's ``VALID``
      convolution maps back to ``in``: ``ceil((out - d (k - 1)) / s) == in``;
    - ``"same"``: ``out`` must be a length that TensorFlow's ``SAME`` convolution maps back to
      ``in`` (``ceil(out / s) == in``), and ``p = ceil(P / 2)`` for that convolution's total
      padding ``P`` (``same_padding``). When ``P`` is odd TensorFlow removes ``floor(P / 2)``
      at the start and ``ceil(P / 2)`` at the end; ``ConvTranspose2d`` can only remove the same
      ``p`` at both ends and add ``op`` at the end, so the sizes agree but the picture sits one
      pixel away from TensorFlow's for the same weights.

    Args:
        in_size: input length.
        out_size: the output length wanted.
        kernel_size: kernel length.
        stride: stride.
        dilation: dilation.
        padding: ``"auto"``, an int, ``"same"`` or ``"valid"``.

    Raises:
        ValueError: ``out_size`` is not reachable; the message lists the sizes that are.

    >>> conv_transpose_padding(4, 7, 3, stride=2), conv_transpose_padding(7, 14, 3, stride=2)
    ((1, 0), (1, 1))
    >>> conv_transpose_padding(5, 9, 3, stride=2, padding="valid")
    Traceback (most recent call last):
    ...
    ValueError: cannot produce size 9 from 5 with kernel 3, stride 2, dilation 1, padding 'valid'; reachable sizes: 11..12 (padding 0, output_padding 0..1); with padding 'auto': 1..12 (padding 0..5, output_padding 0..1)
    """  # noqa: E501
    return _solve_transpose(in_size, out_size, kernel_size, stride, dilation, padding, "size")


def _pair(value: Any, name: str) -> tuple[int, int]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return items  # type: ignore[return-value]


class ConvTranspose2dExact(nn.ConvTranspose2d):
    """A transposed convolution built for the output size it must produce.

    ``nn.ConvTranspose2d`` maps a length ``in`` to ``(in - 1) s - 2 p + d (k - 1) + op + 1``, so
    inverting a strided convolution means choosing ``padding`` and ``output_padding`` by hand: a
    3x3 stride-2 convolution with padding 1 maps both 7 and 8 to 4, and its transpose must be
    told which one to give back. Guess wrong and a decoder returns 10x10 where 9x9 was wanted
    (then someone crops a pixel). This layer takes ``in_size`` and ``out_size``, solves for
    ``padding`` and ``output_padding`` per axis (``conv_transpose_padding``), refuses an
    unreachable ``out_size`` at construction with a message listing the reachable sizes, and
    refuses inputs of any other size in ``forward``.

    It *is* an ``nn.ConvTranspose2d`` whose ``padding`` and ``output_padding`` are the solved
    values: same weight layout (``[in_channels, out_channels / groups, kH, kW]``), and its
    ``state_dict`` loads into ``nn.ConvTranspose2d`` built with those values, and back.
    ``classicnets.nn.fold_bn`` folds a BN that follows it in an ``nn.Sequential``.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: int or ``(kH, kW)``.
        in_size: spatial size of the input, int or ``(H, W)``.
        out_size: spatial size the output must have, int or ``(H, W)``.
        stride: int or pair.
        padding: ``"auto"`` (the smallest padding that reaches ``out_size``), an int or pair
            (fixed; only ``output_padding`` is solved), or ``"same"`` / ``"valid"``:
            TensorFlow's rules, under which ``out_size`` must be a size that a ``SAME``
            (``VALID``) convolution with this kernel, stride and dilation maps back to
            ``in_size`` (see ``conv_transpose_padding`` for the one-pixel shift of ``"same"``).
        dilation: int or pair.
        groups: blocked connections from input to output channels.
        bias: whether to learn an additive bias.
        device: device of the parameters.
        dtype: dtype of the parameters.

    >>> up = ConvTranspose2dExact(32, 16, 3, in_size=7, out_size=14, stride=2)
    >>> up.padding, up.output_padding
    ((1, 1), (1, 1))
    >>> up(torch.zeros(2, 32, 7, 7)).shape
    torch.Size([2, 16, 14, 14])
    >>> ConvTranspose2dExact(8, 8, 3, in_size=5, out_size=9, stride=2, padding=0)
    Traceback (most recent call last):
    ...
    ValueError: ConvTranspose2dExact: cannot produce height 9 from 5 with kernel 3, stride 2, dilation 1, padding 0; reachable sizes: 11..12 (padding 0, output_padding 0..1); with padding 'auto': 1..12 (padding 0..5, output_padding 0..1)
    """  # noqa: E501

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        in_size: int | tuple[int, int],
        out_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = "auto",
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kernel = _pair(kernel_size, "kernel_size")
        strides = _pair(stride, "stride")
        dilations = _pair(dilation, "dilation")
        sizes_in = _pair(in_size, "in_size")
        sizes_out = _pair(out_size, "out_size")
        rules = (padding, padding) if isinstance(padding, str) else _pair(padding, "padding")
        solved = []
        for axis, name in enumerate(("height", "width")):
            try:
                solved.append(
                    _solve_transpose(
                        sizes_in[axis],
                        sizes_out[axis],
                        kernel[axis],
                        strides[axis],
                        dilations[axis],
                        rules[axis],
                        name,
                    )
                )
            except ValueError as exc:
                raise ValueError(f"ConvTranspose2dExact: {exc}") from None
        super().__init__(
            in_channels,
            out_channels,
            kernel,
            stride=strides,
            padding=(solved[0][0], solved[1][0]),
            output_padding=(solved[0][1], solved[1][1]),
            groups=groups,
            bias=bias,
            dilation=dilations,
            device=device,
            dtype=dtype,
        )
        self.in_size = sizes_in
        self.out_size = sizes_out
        self.padding_rule = padding if isinstance(padding, str) else rules

    def forward(self, input: Tensor) -> Tensor:
        """Map ``[N, C_in, *in_size]`` (or ``[C_in, *in_size]``) to ``[N, C_out, *out_size]``."""
        if tuple(input.shape[-2:]) != self.in_size:
            raise ValueError(
                f"ConvTranspose2dExact: built for inputs of size {self.in_size} (to give "
                f"{self.out_size}), got {tuple(input.shape[-2:])}"
            )
        return super().forward(input)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_size={self.in_size}, out_size={self.out_size}"


# --- upsampling ---------------------------------------------------------------------------------

UPSAMPLE_MODES = ("nearest", "bilinear", "unpool")


def _average_unpool(x: Tensor, size: tuple[int, int]) -> Tensor:
    """The adjoint of ``F.avg_pool2d(kernel f, stride f, ceil_mode=True)`` from ``size`` to
    ``x``'s size, per axis ``f = ceil(out / in)``: each value spread evenly over its window."""
    divisors = []
    for axis, n_out in zip((x.ndim - 2, x.ndim - 1), size):  # non-negative: ONNX-friendly
        n_in = x.shape[axis]
        factor = -(-n_out // n_in)
        if (n_in - 1) * factor >= n_out:
            raise ValueError(
                f"Upsample(mode='unpool'): cannot unpool {n_in} to {n_out}: no factor f has "
                f"ceil({n_out} / f) == {n_in} (the windows of an average pooling of stride f)"
            )
        # Copy each value into its f-long block (the blog's ones-kernel transposed convolution);
        # a last, shorter window (ceil_mode) ends at n_out.
        moved = x.movedim(axis, -1)  # (..., n_in)
        blocks = moved.unsqueeze(-1).expand(*moved.shape, factor).reshape(*moved.shape[:-1], -1)
        x = blocks[..., :n_out].movedim(-1, axis)  # n_out along axis
        window = torch.clamp(n_out - torch.arange(n_in, device=x.device) * factor, max=factor)
        divisors.append(window.repeat_interleave(factor)[:n_out])
    # ... and divide by the window's area, as the pooling divides by the pixels it covers (one
    # division by an exact integer, so an integer factor gives exactly ones-kernel / f**2).
    return x / (divisors[0][:, None] * divisors[1][None, :]).to(x.dtype)


class Upsample(nn.Module):
    """Upsample ``[N, C, H, W]`` images by a factor or to a size, three ways.

    - ``"nearest"``: each output pixel copies the input pixel at ``floor(dst * in / out)``
      (``F.interpolate(mode="nearest")``). For an integer factor ``f`` this is exactly the
      blog's ``conv2d_transpose`` over an ``f x f`` kernel of ones with stride ``f``, one channel
      at a time: each value copied into an ``f x f`` block.
    - ``"bilinear"``: ``F.interpolate(mode="bilinear", align_corners=False)`` (pixel centres at
      half-integers).
    - ``"unpool"``: average unpooling, the adjoint (transpose) of average pooling with kernel =
      stride = ``f``: each value spread evenly over its ``f x f`` block, i.e. copied and divided
      by ``f**2``. So it is ``"nearest"`` divided by ``f**2``, the ones-kernel transposed
      convolution over a kernel of ``1 / f**2``: it keeps the sum of the image where
      ``"nearest"`` keeps its values, and ``<avg_pool(a), b> == <a, unpool(b)>``. To a ``size``
      that is not a multiple of the input it is the adjoint of
      ``F.avg_pool2d(kernel f, stride f, ceil_mode=True)`` from ``size`` back to the input, with
      ``f = ceil(out / in)`` (4 -> 7: ``f = 2``, the last row is a window of one row and is
      divided by 1); it needs ``ceil(out / f) == in``.

    Args:
        scale_factor: a positive number or ``(h, w)`` pair (``"unpool"``: ints); or
        size: the output size, int or ``(H, W)`` (exactly one of the two).
        mode: ``"nearest"``, ``"bilinear"`` or ``"unpool"``.

    >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
    >>> Upsample(2, mode="nearest")(x)[0, 0]
    tensor([[0., 0., 1., 1.],
            [0., 0., 1., 1.],
            [2., 2., 3., 3.],
            [2., 2., 3., 3.]])
    >>> Upsample(2, mode="unpool")(x)[0, 0, 0]
    tensor([0.0000, 0.0000, 0.2500, 0.2500])
    >>> Upsample(size=7, mode="unpool")(torch.ones(1, 1, 4, 4))[0, 0, -2:, -2:]
    tensor([[0.2500, 0.5000],
            [0.5000, 1.0000]])
    """

    def __init__(
        self,
        scale_factor: float | tuple[float, float] | None = None,
        mode: str = "nearest",
        *,
        size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(UPSAMPLE_MODES)}")
        if (scale_factor is None) == (size is None):
            raise ValueError("Upsample: give exactly one of scale_factor and size")
        self.mode = mode
        self.size = None if size is None else _pair(size, "size")
        self.scale_factor: tuple | None = None
        if scale_factor is not None:
            factors = (
                tuple(scale_factor)
                if isinstance(scale_factor, (tuple, list))
                else (scale_factor, scale_factor)
            )
            if mode == "unpool":
                factors = _pair(factors, "scale_factor (mode 'unpool')")
            if len(factors) != 2 or not all(
                isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors
            ):
                raise ValueError(f"scale_factor must be positive, got {scale_factor!r}")
            self.scale_factor = factors

    def forward(self, x: Tensor) -> Tensor:
        """Upsample ``x`` of shape ``[N, C, H, W]``."""
        if self.mode == "unpool":
            size = self.size
            if size is None:
                size = tuple(n * f for n, f in zip(x.shape[-2:], self.scale_factor))
            return _average_unpool(x, size)
        align = False if self.mode == "bilinear" else None
        if self.size is not None:
            return F.interpolate(x, size=self.size, mode=self.mode, align_corners=align)
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=align)

    def extra_repr(self) -> str:
        how = f"size={self.size}" if self.size is not None else f"scale_factor={self.scale_factor}"
        return f"{how}, mode={self.mode!r}"
