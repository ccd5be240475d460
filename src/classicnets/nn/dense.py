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
    "Dense",
    "constant_initializer",
    "normal_initializer",
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
