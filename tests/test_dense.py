"""``classicnets.nn.dense.Dense`` against references we did not write.

References: float64 NumPy/SciPy for the forward pass and the activations, ``torch.nn.Linear`` for
the ``state_dict`` layout and the default initialization (bit for bit under the same seed),
``scipy.stats.truncnorm`` for TensorFlow's truncated-normal constant, and the published variance
formulas (Glorot & Bengio 2010, He et al. 2015) for the initializers.

Tolerances: the forward pass in float64, 1e-12 (one matrix product of order-1 values and one
elementwise function); against ``nn.Linear``, exact (both call ``F.linear``).

Statistical bounds. For ``n`` i.i.d. draws with variance ``s2`` and kurtosis ``k = E[w^4] / s2^2``
the sample variance has standard error ``s2 * sqrt((k - 1) / n)`` (to first order in 1/n; exactly
that for the mean of squares around the known mean 0). The kurtosis is 9/5 for a uniform, 3 for a
normal, 2.366 for a normal truncated at +-2 sigma (``scipy.stats.truncnorm(-2, 2)``). A
800 x 1250 layer gives n = 10^6, so the relative standard error is 0.089 % (uniform) to 0.14 %
(normal), and the bound used, five standard errors (0.45 % to 0.71 %), fails a correct
initializer with probability below 1e-6 (normal approximation) while catching any wrong formula:
the nearest wrong candidates (fan_in vs fan_out, the uncorrected truncated normal at 0.77 of the
variance, torch's 1/(3 fan_in) vs Glorot's) are off by 20 % or more. In and out differ (800 vs
1250) so that a swapped fan_in/fan_out shows.
"""

from __future__ import annotations

import doctest
import functools
import math

import numpy as np
import pytest
import torch
from scipy.special import erf
from scipy.stats import truncnorm
from torch import nn

from classicnets.nn.dense import (
    ACTIVATIONS,
    INITIALIZERS,
    TRUNCATED_NORMAL_STD,
    Dense,
    constant_initializer,
    normal_initializer,
    truncated_normal_initializer,
    uniform_initializer,
)

FAN_IN, FAN_OUT = 800, 1250  # n = 10^6 weights
N_SIGMA = 5.0
F64_TOL = {"rtol": 0.0, "atol": 1e-12}

KURTOSIS_UNIFORM = 9.0 / 5.0
KURTOSIS_NORMAL = 3.0
KURTOSIS_TRUNCATED = float(truncnorm(-2, 2).stats(moments="k")) + 3.0  # excess -> plain


def _reference_activation(name: str, z: np.ndarray) -> np.ndarray:
    """Float64 NumPy/SciPy definitions, written from the formulas."""
    if name == "linear":
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if name == "tanh":
        return np.tanh(z)
    if name == "gelu":
        return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))  # Hendrycks & Gimpel 2016, exact form
    if name == "softplus":
        return np.log1p(np.exp(z))
    raise AssertionError(name)


def _dense(in_features=5, out_features=3, **kwargs) -> Dense:
    kwargs.setdefault("activation", None)
    kwargs.setdefault("weight_init", "glorot_uniform")
    kwargs.setdefault("bias_init", "zeros")
    return Dense(in_features, out_features, **kwargs)


# --- forward -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "activation", [None, "linear", "relu", "sigmoid", "tanh", "gelu", "softplus"]
)
def test_forward_is_affine_then_activation(activation):
    torch.manual_seed(0)
    layer = _dense(7, 4, activation=activation, bias_init=normal_initializer(1.0))
    layer.double()
    x = torch.randn(2, 3, 7, dtype=torch.float64)  # extra leading axes, as nn.Linear allows
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    expected = _reference_activation(activation or "linear", x.numpy() @ w.T + b)
    torch.testing.assert_close(layer(x), torch.from_numpy(expected), **F64_TOL)


def test_callable_activation_and_module_activation():
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    as_function = _dense(activation=torch.nn.functional.elu)
    as_module = _dense(activation=nn.ELU())
    as_module.load_state_dict(as_function.state_dict())  # a parameter-free module adds no keys
    expected = torch.nn.functional.elu(x @ as_function.weight.T + as_function.bias)
    torch.testing.assert_close(as_function(x), expected)
    torch.testing.assert_close(as_module(x), expected)
    assert "activation=elu" in repr(as_function)
    assert isinstance(as_module.activation, nn.ELU) and "activation" in dict(
        as_module.named_children()
    )


def test_gradients_reach_weight_and_bias():
    layer = _dense(activation="tanh", bias_init=normal_initializer(0.1))
    layer(torch.randn(6, 5)).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.bias.grad is not None and layer.bias.grad.abs().sum() > 0


# --- nn.Linear compatibility ---------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_loads_into_nn_linear_and_back(bias):
    torch.manual_seed(1)
    dense = _dense(6, 4, weight_init="he_normal", bias_init=normal_initializer(0.5), bias=bias)
    linear = nn.Linear(6, 4, bias=bias)
    assert list(dense.state_dict()) == list(linear.state_dict())
    linear.load_state_dict(dense.state_dict())  # strict: same keys, same shapes
    x = torch.randn(8, 6)
    assert torch.equal(dense(x), linear(x))

    other = nn.Linear(6, 4, bias=bias)
    dense.load_state_dict(other.state_dict())
    assert torch.equal(dense(x), other(x))


@pytest.mark.parametrize("shape", [(5, 3), (784, 100), (1, 1), (3, 1)])
def test_torch_linear_preset_is_bitwise_nn_linear(shape):
    torch.manual_seed(123)
    reference = nn.Linear(*shape)
    torch.manual_seed(123)
    ours = Dense.torch_linear(*shape)
    assert torch.equal(ours.weight, reference.weight)
    assert torch.equal(ours.bias, reference.bias)


def test_dtype_and_device():
    layer = Dense.tf_layers_dense(3, 2, dtype=torch.float64, device="cpu")
    assert layer.weight.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert layer.weight.device.type == "cpu"


# --- presets -------------------------------------------------------------------------------------


def test_tf_layers_dense_preset():
    torch.manual_seed(0)
    layer = Dense.tf_layers_dense(5, 3)
    assert layer.activation_name == "linear"
    assert (layer.weight_init_name, layer.bias_init_name) == ("glorot_uniform", "zeros")
    assert torch.equal(layer.bias, torch.zeros(3))
    x = torch.randn(10, 5)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)  # no activation: negatives stay
    assert (layer(x) < 0).any()


def test_tf_fully_connected_preset():
    torch.manual_seed(0)
    layer = Dense.tf_fully_connected(5, 3)
    assert layer.activation_name == "relu"
    assert (layer.weight_init_name, layer.bias_init_name) == ("xavier_uniform", "zeros")
    assert torch.equal(layer.bias, torch.zeros(3))
    x = torch.randn(10, 5)
    torch.testing.assert_close(layer(x), torch.clamp(x @ layer.weight.T, min=0.0))
    assert Dense.tf_fully_connected(5, 3, activation=None).activation_name == "linear"


def test_torch_linear_preset():
    torch.manual_seed(0)
    layer = Dense.torch_linear(FAN_IN, FAN_OUT)
    assert layer.activation_name == "linear"
    assert (layer.weight_init_name, layer.bias_init_name) == ("torch_default", "torch_default")
    bound = 1.0 / math.sqrt(FAN_IN)
    bias = layer.bias.detach()
    assert bias.abs().max() <= bound
    # The bound is the weight's fan_in (800), not the fan_out (1250): all 1250 draws inside
    # 0.9 * bound would have probability 0.9^1250 ~ 1e-57, and 1/sqrt(1250) < 0.9 / sqrt(800).
    assert bias.abs().max() > 0.9 * bound
    x = torch.randn(3, FAN_IN)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


# --- initializers --------------------------------------------------------------------------------


def test_truncated_normal_constant_is_the_std_of_a_truncated_standard_normal():
    assert TRUNCATED_NORMAL_STD == pytest.approx(truncnorm(-2, 2).std(), rel=1e-12)


# name, expected variance, kurtosis, largest possible |w| (None: unbounded)
_AVG = 2.0 / (FAN_IN + FAN_OUT)
_HE = 2.0 / FAN_IN
VARIANCE_CASES = [
    ("glorot_uniform", _AVG, KURTOSIS_UNIFORM, math.sqrt(6.0 / (FAN_IN + FAN_OUT))),
    ("xavier_uniform", _AVG, KURTOSIS_UNIFORM, math.sqrt(6.0 / (FAN_IN + FAN_OUT))),
    ("glorot_normal", _AVG, KURTOSIS_TRUNCATED, 2.0 * math.sqrt(_AVG) / TRUNCATED_NORMAL_STD),
    ("he_normal", _HE, KURTOSIS_TRUNCATED, 2.0 * math.sqrt(_HE) / TRUNCATED_NORMAL_STD),
    ("he_uniform", _HE, KURTOSIS_UNIFORM, math.sqrt(6.0 / FAN_IN)),
    ("kaiming_normal", _HE, KURTOSIS_NORMAL, None),
    ("torch_default", 1.0 / (3.0 * FAN_IN), KURTOSIS_UNIFORM, 1.0 / math.sqrt(FAN_IN)),
]


@pytest.mark.parametrize(
    ("name", "variance", "kurtosis", "bound"), VARIANCE_CASES, ids=[c[0] for c in VARIANCE_CASES]
)
def test_weight_variance_matches_formula(name, variance, kurtosis, bound):
    torch.manual_seed(2024)
    weight = _dense(FAN_IN, FAN_OUT, weight_init=name).weight.detach().double()
    n = weight.numel()
    relative_error = weight.var().item() / variance - 1.0
    assert abs(relative_error) < N_SIGMA * math.sqrt((kurtosis - 1.0) / n), relative_error
    assert abs(weight.mean().item()) < N_SIGMA * math.sqrt(variance / n)
    largest = weight.abs().max().item()
    if bound is not None:
        assert largest <= bound * (1 + 1e-6)  # float32 rounding of the bound
    else:
        # Untruncated: P(no |w| > 4 sigma in 10^6 draws) = (1 - 6.3e-5)^(10^6) ~ e^-63.
        assert largest > 4.0 * math.sqrt(variance)


def test_truncated_normals_are_truncated_where_tensorflow_truncates():
    torch.manual_seed(7)
    weight = _dense(FAN_IN, FAN_OUT, weight_init="glorot_normal").weight.detach().double()
    std_before = math.sqrt(_AVG) / TRUNCATED_NORMAL_STD
    # Mass beyond 1.9 sigma of the untruncated normal, inside the cut: 1.3 % of the truncated
    # law, so some of the 10^6 draws land there; beyond 2 sigma none may.
    assert (weight.abs() > 1.9 * std_before).any()
    assert (weight.abs() <= 2.0 * std_before * (1 + 1e-6)).all()


@pytest.mark.parametrize("name", ["zeros", "ones"])
def test_constant_named_initializers(name):
    layer = _dense(weight_init=name, bias_init=name)
    value = 0.0 if name == "zeros" else 1.0
    assert torch.equal(layer.weight, torch.full((3, 5), value))
    assert torch.equal(layer.bias, torch.full((3,), value))


def test_initializer_factories():
    torch.manual_seed(3)
    big = functools.partial(_dense, FAN_IN, FAN_OUT)
    w = big(weight_init=normal_initializer(0.02, mean=0.5)).weight.detach().double()
    n = w.numel()
    assert abs(w.var().item() / 0.02**2 - 1) < N_SIGMA * math.sqrt((KURTOSIS_NORMAL - 1) / n)
    assert abs(w.mean().item() - 0.5) < N_SIGMA * 0.02 / math.sqrt(n)

    # TensorFlow's truncated_normal_initializer: std before truncation, cut at +-2 std.
    w = big(weight_init=truncated_normal_initializer(0.1)).weight.detach().double()
    assert w.abs().max() <= 0.2 * (1 + 1e-6)
    variance = (0.1 * TRUNCATED_NORMAL_STD) ** 2
    assert abs(w.var().item() / variance - 1) < N_SIGMA * math.sqrt((KURTOSIS_TRUNCATED - 1) / n)

    w = big(weight_init=uniform_initializer(-0.3, 0.1)).weight.detach()
    assert w.min() >= -0.3 and w.max() <= 0.1 and w.min() < -0.29 and w.max() > 0.09

    layer = _dense(bias_init=constant_initializer(0.25))
    assert torch.equal(layer.bias, torch.full((3,), 0.25))
    assert "bias_init=constant(0.25)" in repr(layer)
    assert "weight_init=normal(std=0.02, mean=0.5)" in repr(
        _dense(weight_init=normal_initializer(0.02, mean=0.5))
    )
    with pytest.raises(ValueError, match="std"):
        normal_initializer(-1.0)
    with pytest.raises(ValueError, match="low <= high"):
        uniform_initializer(1.0, 0.0)


def test_torch_nn_init_callables_and_returned_tensors():
    torch.manual_seed(0)
    layer = _dense(4, 6, weight_init=nn.init.orthogonal_)  # fills in place, returns the tensor
    w = layer.weight.detach().double()
    torch.testing.assert_close(w.T @ w, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-5)
    assert "weight_init=orthogonal_" in repr(layer)

    layer = _dense(weight_init=lambda t: torch.full_like(t, 2.0))  # returns new values
    assert torch.equal(layer.weight, torch.full((3, 5), 2.0))
    with pytest.raises(ValueError, match=r"returned shape \(2,\), expected \(3, 5\)"):
        _dense(weight_init=lambda t: torch.zeros(2))


def test_reset_parameters_redraws_with_the_same_initializers():
    torch.manual_seed(0)
    layer = Dense.torch_linear(20, 10)
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(layer.weight, before)
    assert layer.weight.abs().max() <= 1 / math.sqrt(20)


def test_zero_sized_layer():
    layer = Dense.tf_layers_dense(0, 3)  # fans sum to 3; weight has no entries to fill
    assert layer(torch.randn(2, 0)).shape == (2, 3)
    assert Dense.torch_linear(0, 2).bias.abs().max() == 0  # nn.Linear's bound for fan_in 0


# --- bias=False, repr, errors --------------------------------------------------------------------


def test_no_bias():
    layer = Dense(5, 3, activation="relu", weight_init="he_normal", bias_init=None, bias=False)
    assert layer.bias is None and list(layer.state_dict()) == ["weight"]
    x = torch.randn(4, 5)
    torch.testing.assert_close(layer(x), torch.relu(x @ layer.weight.T))
    assert "bias=False" in repr(layer) and "bias_init=none" in repr(layer)


def test_extra_repr_shows_activation_and_initializers():
    text = repr(Dense.tf_fully_connected(4, 2))
    assert text == (
        "Dense(in_features=4, out_features=2, bias=True, activation=relu, "
        "weight_init=xavier_uniform, bias_init=zeros)"
    )


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match="unknown activation 'swish'") as info:
        _dense(activation="swish")
    for name in ACTIVATIONS:
        assert name in str(info.value)


@pytest.mark.parametrize("argument", ["weight_init", "bias_init"])
def test_unknown_initializer_lists_valid_names(argument):
    with pytest.raises(ValueError, match=f"unknown {argument} 'lecun_normal'") as info:
        _dense(**{argument: "lecun_normal"})
    for name in INITIALIZERS:
        assert name in str(info.value)


def test_other_errors():
    with pytest.raises(TypeError, match="weight_init must be a name or a callable"):
        _dense(weight_init=0.01)
    with pytest.raises(TypeError, match="activation must be"):
        _dense(activation=3)
    with pytest.raises(ValueError, match="bias_init is required"):
        _dense(bias_init=None)
    with pytest.raises(ValueError, match="in_features must be a non-negative int"):
        _dense(-1, 3)
    with pytest.raises(ValueError, match="out_features"):
        _dense(5, 2.0)
    with pytest.raises(TypeError):  # activation and initializers are required, keyword-only
        Dense(5, 3)


@pytest.mark.parametrize("module", ["dense", "conv_shapes", "upsample"])
def test_docstring_examples(module):
    import importlib

    result = doctest.testmod(
        importlib.import_module(f"classicnets.nn.{module}"), optionflags=doctest.ELLIPSIS
    )
    assert result.attempted > 0 and result.failed == 0
