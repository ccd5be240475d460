"""``classicnets.nn.functional`` against a float64 NumPy reference we did not write.

Tolerances: float64 inputs agree with NumPy float64 to 1e-10 (a handful of roundings on values of
order 1-10); float32 inputs are compared with the float64 reference computed from the *same*
float32 values, to 1e-5 (float32 has ~7 significant digits; a reduction over <= 500 values of
order 1 loses at most a few ulps).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from classicnets.nn.functional import batch_normalization, moments, normalize_axes
from tolerances import U64, gamma

# The references are float64 computations on the same inputs, so the bound is that of our own
# rounding. The statistics are sums over at most n = 120 values with |x| <= 6 (the fixed samples
# of ``_sample`` reach 5.3); the mean is within gamma_n * 6 of the exact one and the variance, a
# mean of squared deviations up to (2 * 6)^2, within gamma_(n+2) * 144. Normalized outputs with
# scale <= 2 and a variance >= 0.5 inherit at most that, divided by sigma, times the scale.
TOL = {
    torch.float64: gamma(122, U64) * 144 * 10,  # the same bound in float64 (< 1e-10)
    torch.float32: gamma(122) * 144,
}

# (shape, axes): an MLP activation, PyTorch's NCHW, TensorFlow's NHWC, a 1-d CNN, negative axes.
CASES = [
    ((16, 5), [0]),
    ((4, 3, 5, 6), [0, 2, 3]),
    ((4, 5, 6, 3), [0, 1, 2]),
    ((6, 3, 7), [0, 2]),
    ((4, 5, 6, 3), [0, -3, -2]),
    ((6, 3, 7), 0),  # a single int
]
CASE_IDS = ["NC-0", "NCHW-023", "NHWC-012", "NCL-02", "NHWC-neg", "NCL-int"]


def _np_axes(axes, ndim: int) -> tuple[int, ...]:
    axes = [axes] if isinstance(axes, int) else list(axes)
    return tuple(sorted(a % ndim for a in axes))


def _sample(shape, dtype, seed: int = 0) -> torch.Tensor:
    # Non-zero mean and non-unit spread, so a missing centring or scaling would show.
    rng = np.random.default_rng(seed)
    return torch.from_numpy(0.7 + 1.8 * rng.standard_normal(shape)).to(dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


# --------------------------------------------------------------------------- moments


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("keepdims", [False, True], ids=["flat", "keepdims"])
@pytest.mark.parametrize(("shape", "axes"), CASES, ids=CASE_IDS)
def test_moments_matches_numpy(shape, axes, keepdims, dtype):
    x = _sample(shape, dtype)
    mean, var = moments(x, axes, keepdims=keepdims)

    x64 = _np(x)
    np_axes = _np_axes(axes, x.ndim)
    ref_mean = x64.mean(axis=np_axes, keepdims=keepdims)
    ref_var = x64.var(axis=np_axes, ddof=0, keepdims=keepdims)  # biased, as tf.nn.moments

    assert mean.dtype == dtype and var.dtype == dtype
    assert tuple(mean.shape) == ref_mean.shape and tuple(var.shape) == ref_var.shape
    np.testing.assert_allclose(_np(mean), ref_mean, rtol=0, atol=TOL[dtype])
    np.testing.assert_allclose(_np(var), ref_var, rtol=0, atol=TOL[dtype])


def test_moments_is_biased_not_unbiased():
    # mean((x - mean)^2) divides by the count: for [1, 3] that is 1, not 2.
    mean, var = moments(torch.tensor([[1.0], [3.0]], dtype=torch.float64), axes=[0])
    assert mean.tolist() == [2.0]
    assert var.tolist() == [1.0]


# --------------------------------------------------------------------------- batch_normalization


def _np_batch_normalization(x, mean, var, offset, scale, eps):
    y = (x - mean) / np.sqrt(var + eps)  # Ioffe & Szegedy 2015, Alg. 1: eps inside the root
    if scale is not None:
        y = y * scale
    if offset is not None:
        y = y + offset
    return y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_offset", [True, False], ids=["offset", "no-offset"])
@pytest.mark.parametrize("with_scale", [True, False], ids=["scale", "no-scale"])
@pytest.mark.parametrize(("shape", "axes"), CASES, ids=CASE_IDS)
def test_batch_normalization_matches_numpy(shape, axes, with_scale, with_offset, dtype):
    x = _sample(shape, dtype, seed=1)
    np_axes = _np_axes(axes, x.ndim)
    stat_shape = tuple(1 if d in np_axes else n for d, n in enumerate(shape))
    rng = np.random.default_rng(2)
    scale = torch.from_numpy(rng.uniform(0.5, 2.0, stat_shape)).to(dtype) if with_scale else None
    offset = torch.from_numpy(rng.normal(0.0, 1.0, stat_shape)).to(dtype) if with_offset else None
    eps = 1e-3

    # Training-style: the batch's own moments; inference-style: given (running) statistics.
    batch_mean, batch_var = moments(x, axes, keepdims=True)
    given_mean = torch.from_numpy(rng.normal(0.0, 1.0, stat_shape)).to(dtype)
    given_var = torch.from_numpy(rng.uniform(0.5, 3.0, stat_shape)).to(dtype)

    x64 = _np(x)
    g64 = None if scale is None else _np(scale)
    b64 = None if offset is None else _np(offset)
    for mean, var, ref_mean, ref_var in [
        (
            batch_mean,
            batch_var,
            x64.mean(axis=np_axes, keepdims=True),
            x64.var(axis=np_axes, keepdims=True),
        ),
        (given_mean, given_var, _np(given_mean), _np(given_var)),
    ]:
        y = batch_normalization(x, mean, var, offset, scale, eps)
        ref = _np_batch_normalization(x64, ref_mean, ref_var, b64, g64, eps)
        assert y.dtype == dtype and y.shape == x.shape
        np.testing.assert_allclose(_np(y), ref, rtol=0, atol=TOL[dtype])


def test_batch_normalization_with_flat_statistics_on_channels_last():
    # Statistics of shape [C] broadcast against [N, H, W, C] without keepdims.
    x = _sample((3, 4, 5, 6), torch.float64, seed=3)
    mean, var = moments(x, [0, 1, 2])
    assert mean.shape == (6,)
    y = batch_normalization(x, mean, var, None, None, 1e-5)
    x64 = _np(x)
    ref = (x64 - x64.mean(axis=(0, 1, 2))) / np.sqrt(x64.var(axis=(0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=1e-10)


def test_batch_normalization_matches_torch_training_kernel():
    # moments + batch_normalization is what F.batch_norm does in training (a second reference).
    x = _sample((5, 3, 4, 4), torch.float64, seed=4)
    gamma = torch.tensor([0.5, 1.5, -2.0], dtype=torch.float64)
    beta = torch.tensor([0.1, -0.3, 2.0], dtype=torch.float64)
    mean, var = moments(x, [0, 2, 3], keepdims=True)
    ours = batch_normalization(x, mean, var, beta.view(1, 3, 1, 1), gamma.view(1, 3, 1, 1), 1e-5)
    theirs = F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_worked_example_eps_inside_the_square_root():
    x, mean, var = -0.077417567, -0.089603029, 0.000436493
    offset, scale, eps = -0.016652612, 1.0055743, 1e-3
    f64 = torch.float64
    y = batch_normalization(
        torch.tensor(x, dtype=f64),
        torch.tensor(mean, dtype=f64),
        torch.tensor(var, dtype=f64),
        torch.tensor(offset, dtype=f64),
        torch.tensor(scale, dtype=f64),
        eps,
    ).item()
    # The number worked out by hand: scale * (x - mean) / sqrt(var + eps) + offset.
    assert y == pytest.approx(0.306646, abs=1e-5)
    assert y == pytest.approx(scale * (x - mean) / math.sqrt(var + eps) + offset, abs=1e-12)

    # The common mistake puts eps outside the root: (x - mean) / (sqrt(var) + eps). With a
    # variance this small (4e-4, comparable to eps) it gives about 0.543, far from 0.3066.
    wrong = scale * (x - mean) / (math.sqrt(var) + eps) + offset
    assert wrong == pytest.approx(0.543, abs=1e-3)
    assert abs(wrong - y) > 0.2, "eps outside the square root must not agree with the right value"


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("keepdims", [False, True], ids=["flat", "keepdims"])
@pytest.mark.parametrize(
    ("shape", "axes"),
    [((5, 3), [0]), ((3, 2, 3, 2), [0, 2, 3]), ((3, 2, 2, 3), [0, 1, 2])],
    ids=["NC", "NCHW", "NHWC"],
)
def test_moments_gradcheck(shape, axes, keepdims):
    x = _sample(shape, torch.float64, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: moments(t, axes, keepdims=keepdims), (x,))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batch_normalization_gradcheck_given_statistics(affine):
    # Gradients wrt every input: x, mean, variance (kept positive), offset and scale.
    torch.manual_seed(0)
    f64 = torch.float64
    x = torch.randn(4, 3, 2, dtype=f64, requires_grad=True)
    mean = torch.randn(1, 3, 1, dtype=f64, requires_grad=True)
    var = (torch.rand(1, 3, 1, dtype=f64) + 0.5).requires_grad_()
    offset = torch.randn(1, 3, 1, dtype=f64, requires_grad=True) if affine else None
    scale = torch.randn(1, 3, 1, dtype=f64, requires_grad=True) if affine else None
    inputs = (x, mean, var) + ((offset, scale) if affine else ())

    def fn(x, mean, var, offset=None, scale=None):
        return batch_normalization(x, mean, var, offset, scale, 1e-3)

    assert torch.autograd.gradcheck(fn, inputs)


def test_batch_normalization_gradcheck_with_batch_moments():
    # The training-mode composition: the gradient also flows through the batch's moments.
    torch.manual_seed(1)
    f64 = torch.float64
    x = torch.randn(4, 3, 2, 2, dtype=f64, requires_grad=True)
    offset = torch.randn(1, 3, 1, 1, dtype=f64, requires_grad=True)
    scale = torch.randn(1, 3, 1, 1, dtype=f64, requires_grad=True)

    def fn(x, offset, scale):
        mean, var = moments(x, [0, 2, 3], keepdims=True)
        return batch_normalization(x, mean, var, offset, scale, 1e-5)

    assert torch.autograd.gradcheck(fn, (x, offset, scale))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "axes",
    [[2], [-3], [0, 0], [0, -2], [], 5],
    ids=["big", "negative", "dup", "dup-neg", "empty", "int"],
)
def test_moments_rejects_bad_axes(axes):
    with pytest.raises(ValueError):
        moments(torch.zeros(3, 4), axes)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_moments_rejects_non_float_input(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        moments(torch.zeros(3, 4, dtype=dtype), [0])


def test_batch_normalization_rejects_negative_eps():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="variance_epsilon"):
        batch_normalization(x, x.mean(0), x.var(0), None, None, -1e-3)


def test_batch_normalization_allows_zero_eps():
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    y = batch_normalization(
        x, torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0), None, None, 0.0
    )
    assert y.flatten().tolist() == [-1.0, 1.0]


def test_normalize_axes():
    assert normalize_axes([-1, 0], 4) == (0, 3)
    assert normalize_axes(2, 3) == (2,)
    assert normalize_axes((3, 1, 2), 4) == (1, 2, 3)
    with pytest.raises(ValueError, match="out of range"):
        normalize_axes([4], 4)
    with pytest.raises(ValueError, match="twice"):
        normalize_axes([1, -3], 4)
    with pytest.raises(ValueError, match="at least one"):
        normalize_axes([], 4)
