"""Exact sizes: ``ConvTranspose2dExact``, ``Upsample`` and the size formulas of ``docs/layers.md``.

References, none of them our code: PyTorch's own ``F.conv1d`` / ``F.conv_transpose1d`` run on
zeros (which output lengths exist, for which padding and output padding), TensorFlow's
definitions of ``SAME`` / ``VALID`` (``ceil(in / s)``, ``ceil((in - d (k - 1)) / s)``) evaluated
by padding and convolving in PyTorch, ``F.interpolate``, the blog's literal ones-kernel
``F.conv_transpose2d`` (one channel at a time, ``groups=C``), autograd through ``F.avg_pool2d``
(for adjoints), and float64 NumPy.

Property tests are exhaustive over a grid (deterministic, about a second): input length 1..6,
kernel 1..4, stride 1..3, dilation 1..3, every output length from 1 to past the largest
reachable one, with the padding rules "auto", 0..3, "same" and "valid".

Tolerances: sizes and index patterns are exact; the adjoint identities in float64, 1e-12
relative (sums of a few hundred products of order-1 values); the literal ones-kernel
convolution against ``Upsample`` exactly (each output is one input times 1, then one division).
"""

from __future__ import annotations

import functools
import itertools
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from classicnets.nn import BatchNorm, ConvTranspose2dExact, Upsample, fold_bn
from classicnets.nn.conv_shapes import (
    conv_output_size,
    conv_transpose_output_size,
    conv_transpose_padding,
    same_padding,
)
from tolerances import two_orders

INPUTS = range(1, 7)
KERNELS = range(1, 5)
STRIDES = range(1, 4)
DILATIONS = range(1, 4)
GRID = list(itertools.product(INPUTS, KERNELS, STRIDES, DILATIONS))
F64 = {"rtol": 1e-12, "atol": 1e-12}


# --- independent references ---------------------------------------------------------------------


def _length(fn, *args, **kwargs) -> int | None:
    """Output length of a PyTorch 1-D op on zeros, or None if PyTorch refuses."""
    try:
        return fn(*args, **kwargs).shape[-1]
    except RuntimeError:
        return None


@functools.cache
def torch_transpose_table(n: int, k: int, s: int, d: int) -> dict[int, frozenset]:
    """out -> {(padding, output_padding)} that PyTorch's transposed convolution accepts.

    Padding runs far past where outputs vanish and output padding one past PyTorch's limit, so
    the table is whatever PyTorch does, not what the formula says it does."""
    x, w = torch.zeros(1, 1, n), torch.zeros(1, 1, k)
    table: dict[int, set] = {}
    for p in range(0, n * s + d * k + 4):
        for op in range(0, max(s, d) + 1):
            out = _length(
                F.conv_transpose1d, x, w, stride=s, padding=p, output_padding=op, dilation=d
            )
            if out is not None and out >= 1:
                table.setdefault(out, set()).add((p, op))
    return {out: frozenset(v) for out, v in table.items()}


def torch_conv_length(n: int, k: int, s: int, d: int, padding: int = 0) -> int | None:
    return _length(
        F.conv1d, torch.zeros(1, 1, n), torch.zeros(1, 1, k), stride=s, padding=padding, dilation=d
    )


def tf_same_total_padding(n: int, k: int, s: int, d: int) -> int:
    # tensorflow/core/framework/kernel_shape_util.cc, GetWindowedOutputSizeVerbose (SAME)
    out = (n + s - 1) // s
    return max((out - 1) * s + (k - 1) * d + 1 - n, 0)


def tf_same_conv_length(n: int, k: int, s: int, d: int) -> int:
    """Length of TensorFlow's SAME convolution, run in PyTorch: pad P // 2 before and the rest
    after, then convolve without padding."""
    total = tf_same_total_padding(n, k, s, d)
    x = F.pad(torch.zeros(1, 1, n), (total // 2, total - total // 2))
    return F.conv1d(x, torch.zeros(1, 1, k), stride=s, dilation=d).shape[-1]


def reachable(n: int, k: int, s: int, d: int, rule) -> dict[int, int]:
    """out -> the padding the layer must choose, for each out the rule allows (brute force)."""
    table = torch_transpose_table(n, k, s, d)
    result = {}
    for out, pairs in table.items():
        paddings = sorted({p for p, op in pairs if op < max(s, d)})
        if rule == "auto":
            result[out] = paddings[0]  # the smallest that works
        elif isinstance(rule, int):
            if rule in paddings:
                result[out] = rule
        elif rule == "valid":
            # TF VALID: a VALID convolution (no padding) maps out back to n.
            if torch_conv_length(out, k, s, d) == n and 0 in paddings:
                result[out] = 0
        elif rule == "same":
            total = tf_same_total_padding(out, k, s, d)
            p = (total + 1) // 2
            if tf_same_conv_length(out, k, s, d) == n and p in paddings:
                result[out] = p
    return result


def parse_reachable(message: str) -> set[int]:
    """The sizes listed after 'reachable sizes: ' in an error message."""
    text = message.split("reachable sizes: ")[1].split(" (padding")[0].split(";")[0]
    if text == "none":
        return set()
    items = text.split(", ")
    if "..." in items:  # "a, b, ..., z": an arithmetic progression
        a, b, z = int(items[0]), int(items[1]), int(items[-1])
        return set(range(a, z + 1, b - a))
    sizes: set[int] = set()
    for item in items:
        lo, _, hi = item.partition("..")
        sizes.update(range(int(lo), int(hi or lo) + 1))
    return sizes


# --- ConvTranspose2dExact -----------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["auto", 0, 1, 2, 3, "same", "valid"])
def test_exact_size_when_reachable_refused_otherwise(rule):
    """Every (input, kernel, stride, dilation) of the grid, every output length from 1 to 3 past
    the largest PyTorch can make: the layer gives exactly that length when the rule can reach
    it, with the padding the brute force finds, and otherwise refuses at construction with a
    message listing exactly the reachable lengths."""
    checked = refused = 0
    for n, k, s, d in GRID:
        expected = reachable(n, k, s, d, rule)
        largest = max(torch_transpose_table(n, k, s, d))
        for out in range(1, largest + 4):
            kwargs = dict(in_size=n, out_size=out, stride=s, dilation=d, padding=rule)
            if out in expected:
                layer = ConvTranspose2dExact(1, 1, k, **kwargs)
                assert layer.padding == (expected[out],) * 2, (n, k, s, d, out)
                with torch.no_grad():
                    y = layer(torch.zeros(1, 1, n, n))
                assert y.shape == (1, 1, out, out), (n, k, s, d, out)
                checked += 1
            else:
                with pytest.raises(ValueError, match="reachable sizes: ") as info:
                    ConvTranspose2dExact(1, 1, k, **kwargs)
                assert parse_reachable(str(info.value)) == set(expected), (n, k, s, d, out)
                refused += 1
    assert checked > 100 and refused > 100


def test_rectangular_sizes_and_per_axis_rules():
    layer = ConvTranspose2dExact(3, 5, (3, 4), in_size=(4, 7), out_size=(7, 14), stride=(2, 2))
    assert layer(torch.zeros(2, 3, 4, 7)).shape == (2, 5, 7, 14)
    assert layer.padding == (1, 1) and layer.output_padding == (0, 0)
    # a fixed padding per axis
    layer = ConvTranspose2dExact(1, 1, 3, in_size=5, out_size=(11, 9), stride=2, padding=(0, 1))
    assert layer(torch.zeros(1, 1, 5, 5)).shape == (1, 1, 11, 9)
    with pytest.raises(ValueError, match="cannot produce width 10 from 5"):
        ConvTranspose2dExact(1, 1, 3, in_size=5, out_size=(9, 10), stride=2, padding=(1, 0))


def test_error_messages():
    # The 10x10-for-9x9 trap: a stride-2 SAME convolution maps 9 and 10 to 5; asked for 9, the
    # layer gives 9 with "same" and "auto", and "valid" explains why it cannot.
    assert ConvTranspose2dExact(1, 1, 3, in_size=5, out_size=9, stride=2, padding="same")(
        torch.zeros(1, 1, 5, 5)
    ).shape[-2:] == (9, 9)
    with pytest.raises(ValueError) as info:
        ConvTranspose2dExact(1, 1, 3, in_size=5, out_size=9, stride=2, padding="valid")
    message = str(info.value)
    assert "height 9 from 5" in message and "11..12 (padding 0, output_padding 0..1)" in message
    assert "with padding 'auto': 1..12" in message
    # stride 1, dilation 1: no output padding, so only every second size
    with pytest.raises(ValueError, match="1, 3, 5, 7") as info:
        ConvTranspose2dExact(1, 1, 3, in_size=5, out_size=6)
    assert "no output_padding" in str(info.value)
    with pytest.raises(ValueError, match="padding must be"):
        ConvTranspose2dExact(1, 1, 3, in_size=5, out_size=5, padding="full")
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        ConvTranspose2dExact(1, 1, 3, in_size=5, out_size=5, stride=0)
    with pytest.raises(ValueError, match="in_size must be an int or a pair"):
        ConvTranspose2dExact(1, 1, 3, in_size=(5, 5, 5), out_size=5)
    layer = ConvTranspose2dExact(1, 1, 3, in_size=7, out_size=14, stride=2)
    with pytest.raises(ValueError, match=r"built for inputs of size \(7, 7\).*got \(8, 8\)"):
        layer(torch.zeros(1, 1, 8, 8))
    assert "in_size=(7, 7), out_size=(14, 14)" in repr(layer)


@pytest.mark.parametrize(
    ("n", "out", "k", "s", "d", "rule"),
    [
        (4, 7, 3, 2, 1, "auto"),  # the decoder of conv-ae
        (7, 14, 3, 2, 1, "auto"),
        (14, 28, 3, 2, 1, "auto"),
        (4, 8, 4, 2, 1, "auto"),  # DCGAN's 4x4 stride-2 kernel
        (5, 9, 3, 2, 1, "same"),  # total SAME padding 2 (even): exactly TF's alignment
        (3, 7, 5, 3, 1, "same"),
        (5, 12, 3, 2, 1, "valid"),
        (4, 15, 3, 3, 2, "valid"),
    ],
)
def test_is_the_adjoint_of_the_convolution_it_inverts(n, out, k, s, d, rule):
    """<conv(a), b> == <a, conv_t(b)> (float64): the layer transposes the convolution that maps
    ``out`` back to ``n`` with the same weights: PyTorch's with the solved padding, and, for
    "same" with even total padding, TensorFlow's SAME convolution itself."""
    torch.manual_seed(0)
    layer = ConvTranspose2dExact(
        3, 2, k, in_size=n, out_size=out, stride=s, dilation=d, padding=rule
    )
    layer = layer.double()
    a = torch.randn(1, 2, out, out, dtype=torch.float64)
    b = torch.randn(1, 3, n, n, dtype=torch.float64)
    w = layer.weight.detach()  # [in, out, kH, kW] of the transpose = [out, in, ...] of the conv
    if rule == "same":
        total = tf_same_total_padding(out, k, s, d)
        assert total % 2 == 0
        before, after = total // 2, total - total // 2
        conv_a = F.conv2d(F.pad(a, (before, after, before, after)), w, stride=s, dilation=d)
    else:
        conv_a = F.conv2d(a, w, stride=s, padding=layer.padding, dilation=d)
    assert conv_a.shape[-2:] == (n, n)
    with torch.no_grad():
        transposed_b = layer(b) - layer.bias.view(1, -1, 1, 1)
    lhs, rhs = (conv_a * b).sum().item(), (a * transposed_b).sum().item()
    assert math.isclose(lhs, rhs, rel_tol=1e-12, abs_tol=1e-12)


def test_state_dict_is_conv_transpose2d_and_bn_folds():
    torch.manual_seed(0)
    layer = ConvTranspose2dExact(4, 3, 3, in_size=7, out_size=14, stride=2)
    plain = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 7, 7)
    assert torch.equal(plain(x), layer(x))
    layer.load_state_dict(nn.ConvTranspose2d(4, 3, 3, stride=2).state_dict())  # and back

    model = nn.Sequential(
        ConvTranspose2dExact(4, 3, 3, in_size=4, out_size=7, stride=2, bias=False), BatchNorm(3)
    )
    model.train()
    for _ in range(3):
        model(torch.randn(8, 4, 4, 4))  # running statistics away from (0, 1)
    model.eval()
    folded = fold_bn(model)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[0], ConvTranspose2dExact)
    with torch.no_grad():
        # Folded: sum_k (w_k s) x_k + b'; unfolded: (sum_k w_k x_k - mean) s + beta, with
        # s = gamma / sqrt(var + eps). Both sum the same 4 * 9 products (fewer reach an output) in
        # possibly different orders, and folding rounds each w_k s once more: within
        # two_orders(36 + 2, |s| * sum_k |w_k x_k| + |mean s| + |beta|), that sum being the
        # transposed convolution of |x| and |w|.
        bn = model[1]
        s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().max()
        conv = model[0]
        saved = conv.weight.detach().clone()
        conv.weight.copy_(saved.abs())
        magnitude = conv(x[:, :, :4, :4].abs()).max()
        conv.weight.copy_(saved)
        bound = s * magnitude + (bn.running_mean.abs().max() * s) + bn.bias.abs().max()
        tol = two_orders(38, float(bound))
        torch.testing.assert_close(
            folded(x[:, :, :4, :4]), model(x[:, :, :4, :4]), rtol=0, atol=tol
        )


# --- Upsample -----------------------------------------------------------------------------------


def ones_kernel_transpose(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The blog's upsampling, literally: conv2d_transpose over an f x f kernel of ones, stride f,
    each channel on its own."""
    channels = x.shape[1]
    kernel = torch.ones(channels, 1, factor, factor, dtype=x.dtype)
    return F.conv_transpose2d(x, kernel, stride=factor, groups=channels)


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_nearest_and_unpool_against_the_literal_ones_kernel(factor):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    literal = ones_kernel_transpose(x, factor)
    assert torch.equal(Upsample(factor, mode="nearest")(x), literal)  # copies
    assert torch.equal(Upsample(factor, mode="unpool")(x), literal / factor**2)  # averages
    assert torch.equal(
        Upsample(size=(5 * factor, 4 * factor), mode="unpool")(x), literal / factor**2
    )
    # float32 too (what the models use)
    x32 = x.float()
    assert torch.equal(
        Upsample(factor, mode="unpool")(x32), ones_kernel_transpose(x32, factor) / factor**2
    )


@pytest.mark.parametrize(("n", "out"), [(4, 7), (7, 14), (14, 28), (3, 7), (5, 9), (2, 2), (4, 12)])
def test_unpool_is_the_adjoint_of_average_pooling(n, out):
    """``unpool(b)`` is the gradient of ``<avg_pool2d(a), b>`` in ``a`` (autograd through
    PyTorch's pooling, ceil_mode for a last, shorter window), so <pool(a), b> == <a, unpool(b)>."""
    factor = math.ceil(out / n)
    torch.manual_seed(0)
    a = torch.randn(2, 3, out, out, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, n, n, dtype=torch.float64)
    pooled = F.avg_pool2d(a, factor, factor, ceil_mode=True)
    assert pooled.shape[-2:] == (n, n)
    (gradient,) = torch.autograd.grad((pooled * b).sum(), a)
    torch.testing.assert_close(Upsample(size=out, mode="unpool")(b), gradient, **F64)


def test_unpool_refuses_sizes_no_pooling_maps_back():
    with pytest.raises(ValueError, match="cannot unpool 4 to 5"):
        Upsample(size=5, mode="unpool")(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="mode 'unpool'"):
        Upsample(1.5, mode="unpool")
    with pytest.raises(ValueError, match="exactly one of scale_factor and size"):
        Upsample()
    with pytest.raises(ValueError, match="unknown mode 'bicubic'"):
        Upsample(2, mode="bicubic")


def _numpy_nearest(x: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    rows = np.floor(np.arange(out[0]) * x.shape[-2] / out[0]).astype(int)
    cols = np.floor(np.arange(out[1]) * x.shape[-1] / out[1]).astype(int)
    return x[..., rows, :][..., cols]


def _numpy_bilinear_1d(x: np.ndarray, out: int, axis: int) -> np.ndarray:
    """Half-pixel centres: source coordinate (dst + 0.5) * in / out - 0.5, clamped at 0."""
    n = x.shape[axis]
    src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    t = src - lo
    shape = [1] * x.ndim
    shape[axis] = out
    t = t.reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - t) + np.take(x, hi, axis=axis) * t


@pytest.mark.parametrize(("size", "out"), [(4, (7, 7)), (7, (14, 14)), (3, (7, 5)), (5, (10, 10))])
def test_nearest_and_bilinear_against_interpolate_and_numpy(size, out):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    nearest = Upsample(size=out, mode="nearest")(x)
    assert torch.equal(nearest, F.interpolate(x, size=out, mode="nearest"))
    np.testing.assert_array_equal(nearest.numpy(), _numpy_nearest(x.numpy(), out))
    bilinear = Upsample(size=out, mode="bilinear")(x)
    torch.testing.assert_close(
        bilinear, F.interpolate(x, size=out, mode="bilinear", align_corners=False), **F64
    )
    reference = _numpy_bilinear_1d(_numpy_bilinear_1d(x.numpy(), out[0], 2), out[1], 3)
    np.testing.assert_allclose(bilinear.numpy(), reference, rtol=1e-12, atol=1e-12)
    if out[0] % size == 0 and out[0] == out[1]:
        by_factor = Upsample(out[0] // size, mode="bilinear")(x)
        torch.testing.assert_close(by_factor, bilinear, **F64)


# --- the formulas of docs/layers.md -------------------------------------------------------------


def test_conv_output_size_formulas():
    for n, k, s, d in itertools.product(range(1, 10), KERNELS, STRIDES, DILATIONS):
        for p in range(3):
            expected = torch_conv_length(n, k, s, d, padding=p)
            if expected is None:
                with pytest.raises(ValueError, match="longer than the padded input"):
                    conv_output_size(n, k, s, p, d)
            else:
                assert conv_output_size(n, k, s, p, d) == expected, (n, k, s, p, d)
        # VALID: ceil((in - d (k - 1)) / s), which is PyTorch's with padding 0
        valid = torch_conv_length(n, k, s, d)
        if valid is not None:
            assert (
                conv_output_size(n, k, s, "valid", d) == valid == math.ceil((n - d * (k - 1)) / s)
            )
        # SAME: ceil(in / s), TensorFlow's padding, odd pixel after
        assert (
            conv_output_size(n, k, s, "same", d)
            == tf_same_conv_length(n, k, s, d)
            == math.ceil(n / s)
        )
        total = tf_same_total_padding(n, k, s, d)
        assert same_padding(n, k, s, d) == (total // 2, total - total // 2)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(("k", "d"), [(1, 1), (2, 1), (3, 1), (4, 1), (3, 2), (4, 3)])
def test_same_padding_matches_pytorch_same_at_stride_1(k, d):
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 11, dtype=torch.float64), torch.randn(4, 3, k, dtype=torch.float64)
    ours = F.conv1d(F.pad(x, same_padding(11, k, 1, d)), w, dilation=d)
    torch.testing.assert_close(ours, F.conv1d(x, w, padding="same", dilation=d), **F64)


def test_conv_transpose_output_size_formulas():
    for n, k, s, d in GRID:
        table = torch_transpose_table(n, k, s, d)
        for out, pairs in table.items():
            for p, op in pairs:
                if op < max(s, d):
                    assert conv_transpose_output_size(n, k, s, p, d, op) == out
        # SAME: in * s, the largest length a SAME convolution maps back to in
        same = conv_transpose_output_size(n, k, s, "same", d)
        assert (
            same
            == n * s
            == max(m for m in range(1, 3 * n * s) if tf_same_conv_length(m, k, s, d) == n)
        )
        # VALID: Keras' in * s + max(K - s, 0), a length a VALID convolution maps back to in; the
        # unpadded full output (in - 1) s + K when the dilated kernel K is at least the stride
        valid = conv_transpose_output_size(n, k, s, "valid", d)
        extent = d * (k - 1) + 1
        assert valid == n * s + max(extent - s, 0) and torch_conv_length(valid, k, s, d) == n
        if extent >= s:
            assert valid == (n - 1) * s + extent
    with pytest.raises(ValueError, match="output_padding must be in"):
        conv_transpose_output_size(5, 3, 2, 1, 1, output_padding=2)
    with pytest.raises(ValueError, match="output_padding goes with an int padding"):
        conv_transpose_output_size(5, 3, 2, "same", output_padding=1)


def test_conv_transpose_padding_solves_the_autoencoder_chain():
    # 28 -> 14 -> 7 -> 4 by 3x3 stride-2 convolutions with padding 1, and back by output size
    sizes = [28]
    for _ in range(3):
        sizes.append(conv_output_size(sizes[-1], 3, 2, 1))
    assert sizes == [28, 14, 7, 4]
    solved = [conv_transpose_padding(a, b, 3, 2) for a, b in zip(sizes[::-1], sizes[::-1][1:])]
    assert solved == [(1, 0), (1, 1), (1, 1)]
    # without the output size, PyTorch's ConvTranspose2d(3, stride 2, padding 1) gives 7, 13, 25
    assert [conv_transpose_output_size(n, 3, 2, 1) for n in (4, 7, 13)] == [7, 13, 25]


def test_docs_state_the_formulas():
    """docs/layers.md states the formulas the functions above implement."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "layers.md").read_text()
    for formula in [
        "floor((in + 2p - d(k-1) - 1) / s) + 1",
        "ceil(in / s)",
        "ceil((in - d(k-1)) / s)",
        "(in - 1) s - 2p + d(k-1) + op + 1",
        "in * s + max(d(k-1) + 1 - s, 0)",
    ]:
        assert formula in text, formula
    assert re.search(r"10x10.*9x9|9x9.*10x10", text, re.S)
