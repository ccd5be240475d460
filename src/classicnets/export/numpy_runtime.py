"""A NumPy-only runtime for exported bundles: one short function per layer, meant to be ported.

Nothing here imports torch (directly or through another module), so a bundle runs wherever NumPy
does. Each function is the formula of its PyTorch counterpart in inference mode, on float32
arrays in PyTorch's layouts (activations NCHW, Linear ``[out, in]``, Conv2d ``OIHW``,
ConvTranspose2d ``IOHW``, LSTM gates ``i, f, g, o``)::

    from classicnets.export.numpy_bundle import load_bundle
    from classicnets.export.numpy_runtime import run_bundle, softmax

    bundle = load_bundle("runs/bn-mlp-.../export/bn")
    logits = run_bundle(bundle, images)           # images: float32 [N, 1, 28, 28] in [0, 1]
    probabilities = softmax(logits, axis=-1)

``run_bundle`` runs the manifest's layers in order; ``docs/export.md`` walks through an MLP
with batch normalization by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from classicnets.export.numpy_bundle import Bundle, ExportError, flatten_structure

__all__ = [
    "avg_pool2d",
    "average_unpool2d",
    "batch_norm_inference",
    "conv2d",
    "conv_transpose2d",
    "elu",
    "embedding",
    "erf",
    "gelu",
    "leaky_relu",
    "linear",
    "log_softmax",
    "lstm",
    "lstm_cell",
    "max_pool2d",
    "pad",
    "relu",
    "rnn",
    "rnn_cell",
    "run_bundle",
    "sigmoid",
    "softmax",
    "softplus",
    "tanh",
    "upsample_bilinear2d",
    "upsample_nearest2d",
]

# --------------------------------------------------------------------------- dense layers


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``y = x @ weight.T + bias`` over the last axis; ``weight`` is ``[out, in]``."""
    y = x @ weight.T  # (..., out)
    return y if bias is None else y + bias


def batch_norm_inference(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    axis: int = 1,
) -> np.ndarray:
    """Batch normalization with running statistics (Ioffe & Szegedy 2015, Alg. 2, step 11).

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` with the per-feature
    vectors broadcast along ``axis`` (1 for ``[N, C]`` and ``[N, C, H, W]``, -1 for NHWC). Written
    as one scale and one shift per feature, the form a folded layer absorbs.
    """
    scale = 1.0 / np.sqrt(running_var + np.float32(eps))
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    shape = [1] * x.ndim
    shape[axis] = -1  # (1, C, 1, 1) for NCHW
    return x * scale.reshape(shape) + shift.reshape(shape)


# --------------------------------------------------------------------------- convolutions


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _windows(x: np.ndarray, kernel, stride, dilation) -> np.ndarray:
    """Every ``kH x kW`` window of ``x [N, C, H, W]``: a strided view ``[N, C, Ho, Wo, kH, kW]``."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    view = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    return view[:, :, ::sh, ::sw, ::dh, ::dw]  # (N, C, Ho, Wo, kH, kW)


def conv2d(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> np.ndarray:
    """2-d cross-correlation, PyTorch's ``Conv2d``, by im2col and one matrix product per group.

    ``x`` is ``[N, C_in, H, W]``, ``weight`` ``[C_out, C_in / groups, kH, kW]`` (OIHW);
    ``y[n, o, i, j] = bias[o] + sum_{c, p, q} weight[o, c, p, q] *
    x_padded[n, c, i * stride + p * dilation, j * stride + q * dilation]``.
    """
    (ph, pw), stride, dilation = _pair(padding), _pair(stride), _pair(dilation)
    n, c_in = x.shape[:2]
    c_out, c_group, kh, kw = weight.shape
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = _windows(x, (kh, kw), stride, dilation)  # (N, C_in, Ho, Wo, kH, kW)
    ho, wo = cols.shape[2:4]
    out_group = c_out // groups
    outputs = []
    for g in range(groups):
        patch = cols[:, g * c_group : (g + 1) * c_group]  # (N, C_in/g, Ho, Wo, kH, kW)
        # im2col: one row per output pixel, one column per (channel, kernel row, kernel column)
        patch = patch.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c_group * kh * kw)
        w = weight[g * out_group : (g + 1) * out_group].reshape(out_group, -1)  # (O/g, C/g*kH*kW)
        outputs.append(patch @ w.T)  # (N * Ho * Wo, O/g)
    y = np.concatenate(outputs, axis=1) if groups > 1 else outputs[0]
    y = y.reshape(n, ho, wo, c_out).transpose(0, 3, 1, 2)  # (N, C_out, Ho, Wo)
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


def conv_transpose2d(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride=1,
    padding=0,
    output_padding=0,
    dilation=1,
    groups: int = 1,
) -> np.ndarray:
    """PyTorch's ``ConvTranspose2d`` (the gradient of ``conv2d`` with respect to its input).

    ``x`` is ``[N, C_in, H, W]``, ``weight`` ``[C_in, C_out / groups, kH, kW]`` (IOHW). Every
    input pixel scatters ``x[n, c, i, j] * weight[c, o, p, q]`` to output position
    ``(i * stride + p * dilation - padding, j * stride + q * dilation - padding)``; the output
    is ``H_out = (H - 1) * stride - 2 * padding + dilation * (kH - 1) + output_padding + 1``.
    """
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    (oph, opw), (dh, dw) = _pair(output_padding), _pair(dilation)
    n, c_in, h, w = x.shape
    _, c_group_out, kh, kw = weight.shape
    c_out = c_group_out * groups
    in_group = c_in // groups
    full_h = (h - 1) * sh + dh * (kh - 1) + 1 + oph
    full_w = (w - 1) * sw + dw * (kw - 1) + 1 + opw
    full = np.zeros((n, c_out, full_h, full_w), dtype=np.result_type(x, weight))
    for g in range(groups):
        xg = x[:, g * in_group : (g + 1) * in_group]  # (N, C_in/g, H, W)
        wg = weight[g * in_group : (g + 1) * in_group]  # (C_in/g, C_out/g, kH, kW)
        # (N, C_out/g, kH, kW, H, W): the contribution of every input pixel for each tap
        taps = np.einsum("nchw,copq->nopqhw", xg, wg, optimize=True)
        target = full[:, g * c_group_out : (g + 1) * c_group_out]
        for p in range(kh):
            for q in range(kw):
                rows = slice(p * dh, p * dh + (h - 1) * sh + 1, sh)
                cols = slice(q * dw, q * dw + (w - 1) * sw + 1, sw)
                target[:, :, rows, cols] += taps[:, :, p, q]
    h_out = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
    w_out = (w - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
    y = full[:, :, ph : ph + h_out, pw : pw + w_out]  # (N, C_out, H_out, W_out)
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


# --------------------------------------------------------------------------- pooling, resampling


def _pool_pad(x: np.ndarray, kernel, stride, padding, ceil_mode: bool, fill: float):
    """Pad ``x`` for pooling; with ``ceil_mode`` add the extra rows/columns PyTorch allows."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    h, w = x.shape[2:]
    extra = []
    for size, k, s, p in ((h, kh, sh, ph), (w, kw, sw, pw)):
        out = (size + 2 * p - k) // s + 1
        if ceil_mode:
            out = -(-(size + 2 * p - k) // s) + 1
            if (out - 1) * s >= size + p:  # the last window must start inside the input
                out -= 1
        extra.append(max(0, (out - 1) * s + k - (size + 2 * p)))
    padded = np.pad(
        x, ((0, 0), (0, 0), (ph, ph + extra[0]), (pw, pw + extra[1])), constant_values=fill
    )
    return padded, extra


def max_pool2d(x: np.ndarray, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Maximum over ``kernel_size`` windows (padding counts as -inf), PyTorch's ``MaxPool2d``."""
    kernel = _pair(kernel_size)
    stride = kernel if stride is None else _pair(stride)
    padded, _ = _pool_pad(x, kernel, stride, _pair(padding), ceil_mode, -np.inf)
    return _windows(padded, kernel, stride, _pair(dilation)).max(axis=(4, 5))


def avg_pool2d(
    x: np.ndarray, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True
):
    """Mean over ``kernel_size`` windows, PyTorch's ``AvgPool2d``.

    With ``count_include_pad`` the zero padding counts in the divisor; windows that ``ceil_mode``
    lets run past the padded input never count the part past it.
    """
    kernel = _pair(kernel_size)
    stride = kernel if stride is None else _pair(stride)
    padding = _pair(padding)
    padded, extra = _pool_pad(x, kernel, stride, padding, ceil_mode, 0.0)
    sums = _windows(padded, kernel, stride, (1, 1)).sum(axis=(4, 5))
    # The divisor of every window: count the cells inside (padded input | real input).
    h, w = x.shape[2:]
    inside = np.zeros((1, 1, *padded.shape[2:]), dtype=x.dtype)
    if count_include_pad:
        inside[..., : h + 2 * padding[0], : w + 2 * padding[1]] = 1
    else:
        inside[..., padding[0] : padding[0] + h, padding[1] : padding[1] + w] = 1
    counts = _windows(inside, kernel, stride, (1, 1)).sum(axis=(4, 5))
    return sums / counts


def upsample_nearest2d(x: np.ndarray, size) -> np.ndarray:
    """Nearest-neighbour resize of ``[N, C, H, W]`` to ``size`` (PyTorch's ``mode="nearest"``).

    Output row ``i`` copies input row ``floor(i * H / H_out)``; for an integer factor this is
    ``np.repeat`` along both axes.
    """
    h, w = x.shape[2:]
    h_out, w_out = _pair(size)
    rows = np.floor(np.arange(h_out) * (h / h_out)).astype(np.int64).clip(0, h - 1)
    cols = np.floor(np.arange(w_out) * (w / w_out)).astype(np.int64).clip(0, w - 1)
    return x[:, :, rows][:, :, :, cols]


def _bilinear_weights(size_in: int, size_out: int, align_corners: bool):
    if align_corners:
        scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        src = np.arange(size_out) * scale
    else:
        src = ((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5).clip(min=0.0)
    lo = np.floor(src).astype(np.int64).clip(0, size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = (src - lo).astype(np.float32)
    return lo, hi, frac


def upsample_bilinear2d(x: np.ndarray, size, align_corners: bool = False) -> np.ndarray:
    """Bilinear resize of ``[N, C, H, W]`` to ``size`` (PyTorch's ``mode="bilinear"``)."""
    h_out, w_out = _pair(size)
    r0, r1, fr = _bilinear_weights(x.shape[2], h_out, align_corners)
    c0, c1, fc = _bilinear_weights(x.shape[3], w_out, align_corners)
    fr, fc = fr.reshape(1, 1, -1, 1), fc.reshape(1, 1, 1, -1)
    top = x[:, :, r0][:, :, :, c0] * (1 - fc) + x[:, :, r0][:, :, :, c1] * fc
    bottom = x[:, :, r1][:, :, :, c0] * (1 - fc) + x[:, :, r1][:, :, :, c1] * fc
    return top * (1 - fr) + bottom * fr


def average_unpool2d(x: np.ndarray, size) -> np.ndarray:
    """Average unpooling to ``size`` (``classicnets.nn.Upsample(mode="unpool")``).

    The adjoint of average pooling with kernel = stride = ``f = ceil(out / in)`` (``ceil_mode``):
    each input value is copied into its ``f x f`` block and divided by the block's area; a last,
    shorter block (e.g. 4 -> 7, ``f = 2``: the last row is a block of one row) divides by less.
    """
    h, w = x.shape[2:]
    h_out, w_out = _pair(size)
    f_h, f_w = -(-h_out // h), -(-w_out // w)
    rows, cols = np.arange(h_out) // f_h, np.arange(w_out) // f_w  # source of each output pixel
    area_h = np.minimum(f_h, h_out - np.arange(h) * f_h)[rows]  # (H_out,) rows in its block
    area_w = np.minimum(f_w, w_out - np.arange(w) * f_w)[cols]  # (W_out,)
    area = (area_h[:, None] * area_w[None, :]).astype(x.dtype)  # (H_out, W_out)
    return x[:, :, rows][:, :, :, cols] / area


# --------------------------------------------------------------------------- activations


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def leaky_relu(x: np.ndarray, negative_slope: float = 0.01) -> np.ndarray:
    return np.where(x >= 0, x, x * np.float32(negative_slope))


def elu(x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    return np.where(x > 0, x, np.float32(alpha) * np.expm1(np.minimum(x, 0)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))``, computed from ``e = exp(-|x|)`` (in (0, 1], never overflows):
    ``1 / (1 + e)`` for ``x >= 0`` and ``e / (1 + e)`` for ``x < 0``."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


def softplus(x: np.ndarray, beta: float = 1.0, threshold: float = 20.0) -> np.ndarray:
    """``log(1 + exp(beta * x)) / beta``, and ``x`` itself where ``beta * x > threshold``."""
    bx = x * np.float32(beta)
    return np.where(bx > threshold, x, np.logaddexp(np.float32(0), bx) / np.float32(beta))


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, vectorized (NumPy has none): W. J. Cody's rational approximation
    as in Numerical Recipes' ``erfc`` (relative error below 1.2e-7), computed in float64."""
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))  # fmt: skip
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0).astype(x.dtype)


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """``x * Phi(x)`` (exact, with ``erf``) or PyTorch's ``approximate="tanh"`` form."""
    if approximate == "tanh":
        inner = np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x**3)
        return np.float32(0.5) * x * (1 + np.tanh(inner))
    return np.float32(0.5) * x * (1 + erf(x / np.float32(np.sqrt(2.0))))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``exp(x) / sum(exp(x))`` along ``axis``, shifted by the maximum so nothing overflows."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


# --------------------------------------------------------------------------- sequences


def embedding(tokens: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Row ``tokens[...]`` of ``weight [num_embeddings, dim]``: shape ``tokens.shape + (dim,)``."""
    if tokens.size and (tokens.min() < 0 or tokens.max() >= weight.shape[0]):
        raise ValueError(f"token ids must be in [0, {weight.shape[0]}), got {tokens.max()}")
    return weight[tokens]


def rnn_cell(x, h, weight_ih, weight_hh, bias_ih=None, bias_hh=None, nonlinearity="tanh"):
    """One step of PyTorch's ``nn.RNN``: ``h' = act(x @ W_ih.T + b_ih + h @ W_hh.T + b_hh)``."""
    pre = linear(x, weight_ih, bias_ih) + linear(h, weight_hh, bias_hh)  # (N, hidden)
    return np.tanh(pre) if nonlinearity == "tanh" else relu(pre)


def lstm_cell(x, h, c, weight_ih, weight_hh, bias_ih=None, bias_hh=None):
    """One step of PyTorch's ``nn.LSTM`` (Hochreiter & Schmidhuber 1997, with a forget gate).

    The four gates are stacked along dim 0 of the weights in PyTorch's order **i, f, g, o**
    (input, forget, cell candidate, output), each ``hidden`` rows::

        i, f, g, o = split(x @ W_ih.T + b_ih + h @ W_hh.T + b_hh, 4)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(c')

    Returns ``(h', c')``, each ``[N, hidden]``.
    """
    gates = linear(x, weight_ih, bias_ih) + linear(h, weight_hh, bias_hh)  # (N, 4 * hidden)
    i, f, g, o = np.split(gates, 4, axis=-1)
    c_next = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h_next = sigmoid(o) * np.tanh(c_next)
    return h_next, c_next


def _layer_weights(tensors: dict, k: int):
    return [
        tensors.get(f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ]


def rnn(x, h0, tensors: dict, num_layers: int, nonlinearity="tanh", batch_first=False):
    """A stacked ``nn.RNN`` over a sequence ``x [T, N, in]`` (``[N, T, in]`` if batch_first).

    Returns ``(outputs [T, N, hidden], h [num_layers, N, hidden])``. Dropout between layers is
    the identity in inference.
    """
    seq = x.swapaxes(0, 1) if batch_first else x  # (T, N, in)
    h_last = []
    for k in range(num_layers):
        h = h0[k]
        steps = []
        for t in range(seq.shape[0]):
            h = rnn_cell(seq[t], h, *_layer_weights(tensors, k), nonlinearity=nonlinearity)
            steps.append(h)
        seq = np.stack(steps)  # (T, N, hidden): the next layer's input
        h_last.append(h)
    out = seq.swapaxes(0, 1) if batch_first else seq
    return out, np.stack(h_last)


def lstm(x, h0, c0, tensors: dict, num_layers: int, batch_first=False):
    """A stacked ``nn.LSTM`` over ``x [T, N, in]`` (``[N, T, in]`` if batch_first).

    Returns ``(outputs [T, N, hidden], h [num_layers, N, hidden], c [num_layers, N, hidden])``.
    """
    seq = x.swapaxes(0, 1) if batch_first else x  # (T, N, in)
    h_last, c_last = [], []
    for k in range(num_layers):
        h, c = h0[k], c0[k]
        steps = []
        for t in range(seq.shape[0]):
            h, c = lstm_cell(seq[t], h, c, *_layer_weights(tensors, k))
            steps.append(h)
        seq = np.stack(steps)  # (T, N, hidden)
        h_last.append(h)
        c_last.append(c)
    out = seq.swapaxes(0, 1) if batch_first else seq
    return out, np.stack(h_last), np.stack(c_last)


# --------------------------------------------------------------------------- running a bundle

_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "bool": np.bool_}


def _binary(fn: Callable) -> Callable:
    def run(layer, xs, t):
        a = layer["attrs"]
        if len(xs) == 2:
            return fn(xs[0], xs[1])
        s = np.float32(a["scalar"]) if isinstance(a["scalar"], float) else a["scalar"]
        return fn(s, xs[0]) if a.get("scalar_first") else fn(xs[0], s)

    return run


def _recurrent_hidden(layer, xs, count: int):
    a = layer["attrs"]
    batch = xs[0].shape[0 if a["batch_first"] else 1]
    zeros = np.zeros((a["num_layers"], batch, a["hidden_size"]), dtype=np.float32)
    return xs[1:] if len(xs) > 1 else [zeros] * count


def _run_rnn(layer, xs, t):
    a = layer["attrs"]
    (h0,) = _recurrent_hidden(layer, xs, 1)
    return rnn(xs[0], h0, t, a["num_layers"], a["nonlinearity"], a["batch_first"])


def _run_lstm(layer, xs, t):
    a = layer["attrs"]
    h0, c0 = _recurrent_hidden(layer, xs, 2)
    return lstm(xs[0], h0, c0, t, a["num_layers"], a["batch_first"])


def _axes(a) -> tuple[int, ...] | None:
    return None if a["axes"] is None else tuple(a["axes"])


def _slice(x, a):
    index = [slice(None)] * x.ndim
    index[a["axis"]] = slice(a["start"], a["stop"], a["step"])
    return x[tuple(index)]


def _at(layer: dict, *names: str) -> tuple:
    """The layer's attributes ``names``, in order (the arguments of its function)."""
    return tuple(layer["attrs"][name] for name in names)


# op -> run(layer, input arrays, tensors by role) -> array or tuple of arrays
_RUN: dict[str, Callable[[dict, list, dict], Any]] = {
    "linear": lambda L, xs, t: linear(xs[0], t["weight"], t.get("bias")),
    "conv2d": lambda L, xs, t: conv2d(
        xs[0], t["weight"], t.get("bias"), *_at(L, "stride", "padding", "dilation", "groups")
    ),
    "conv_transpose2d": lambda L, xs, t: conv_transpose2d(
        xs[0],
        t["weight"],
        t.get("bias"),
        *_at(L, "stride", "padding", "output_padding", "dilation", "groups"),
    ),  # fmt: skip
    "batch_norm": lambda L, xs, t: batch_norm_inference(
        xs[0],
        t["running_mean"],
        t["running_var"],
        t.get("weight"),
        t.get("bias"),
        *_at(L, "eps", "axis"),
    ),  # fmt: skip
    "embedding": lambda L, xs, t: embedding(xs[0], t["weight"]),
    "rnn": _run_rnn,
    "lstm": _run_lstm,
    "constant": lambda L, xs, t: t["value"],
    "relu": lambda L, xs, t: relu(xs[0]),
    "leaky_relu": lambda L, xs, t: leaky_relu(xs[0], L["attrs"]["negative_slope"]),
    "elu": lambda L, xs, t: elu(xs[0], L["attrs"]["alpha"]),
    "sigmoid": lambda L, xs, t: sigmoid(xs[0]),
    "tanh": lambda L, xs, t: tanh(xs[0]),
    "gelu": lambda L, xs, t: gelu(xs[0], L["attrs"]["approximate"]),
    "softplus": lambda L, xs, t: softplus(xs[0], L["attrs"]["beta"], L["attrs"]["threshold"]),
    "softmax": lambda L, xs, t: softmax(xs[0], L["attrs"]["axis"]),
    "log_softmax": lambda L, xs, t: log_softmax(xs[0], L["attrs"]["axis"]),
    "max_pool2d": lambda L, xs, t: max_pool2d(
        xs[0], *_at(L, "kernel_size", "stride", "padding", "dilation", "ceil_mode")
    ),
    "avg_pool2d": lambda L, xs, t: avg_pool2d(
        xs[0], *_at(L, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
    ),
    "upsample_nearest2d": lambda L, xs, t: upsample_nearest2d(xs[0], L["attrs"]["size"]),
    "average_unpool2d": lambda L, xs, t: average_unpool2d(xs[0], L["attrs"]["size"]),
    "upsample_bilinear2d": lambda L, xs, t: upsample_bilinear2d(
        xs[0], L["attrs"]["size"], L["attrs"]["align_corners"]
    ),
    "reshape": lambda L, xs, t: xs[0].reshape(L["attrs"]["shape"]),
    "transpose": lambda L, xs, t: xs[0].transpose(L["attrs"]["perm"]),
    "slice": lambda L, xs, t: _slice(xs[0], L["attrs"]),
    "concat": lambda L, xs, t: np.concatenate(xs, axis=L["attrs"]["axis"]),
    "mean": lambda L, xs, t: xs[0].mean(axis=_axes(L["attrs"]), keepdims=L["attrs"]["keepdims"]),
    "sum": lambda L, xs, t: xs[0].sum(axis=_axes(L["attrs"]), keepdims=L["attrs"]["keepdims"]),
    "one_hot": lambda L, xs, t: np.eye(L["attrs"]["num_classes"], dtype=np.int64)[xs[0]],
    "cast": lambda L, xs, t: xs[0].astype(_DTYPES[L["attrs"]["dtype"]]),
    "full_like": lambda L, xs, t: np.full(
        xs[0].shape, L["attrs"]["value"], dtype=_DTYPES[L["attrs"]["dtype"]]
    ),
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "div": _binary(np.divide),
    "pow": _binary(np.power),
    "neg": lambda L, xs, t: -xs[0],
    "exp": lambda L, xs, t: np.exp(xs[0]),
    "log": lambda L, xs, t: np.log(xs[0]),
    "sqrt": lambda L, xs, t: np.sqrt(xs[0]),
    "abs": lambda L, xs, t: np.abs(xs[0]),
    "clamp": lambda L, xs, t: np.clip(xs[0], L["attrs"]["min"], L["attrs"]["max"]),
    "pad": lambda L, xs, t: pad(xs[0], L["attrs"]["pads"], L["attrs"]["value"]),
}


def _as_input(spec: dict, value) -> np.ndarray:
    dtype = _DTYPES.get(spec["dtype"], np.float32)
    array = np.asarray(value)
    if array.dtype.kind == "f" and np.dtype(dtype).kind != "f":
        raise ExportError(f"input {spec['name']!r} expects {spec['dtype']}, got {array.dtype}")
    array = array.astype(dtype, copy=False)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ExportError(f"input {spec['name']!r} holds NaN or infinite values")
    shape = spec["shape"]
    if len(shape) != array.ndim or any(
        s is not None and s != a for s, a in zip(shape, array.shape)
    ):
        shown = ["N" if s is None else s for s in shape]
        raise ExportError(f"input {spec['name']!r} expects shape {shown}, got {list(array.shape)}")
    return array


def _restructure(structure, values: dict):
    if isinstance(structure, str):
        return values[structure]
    return tuple(_restructure(s, values) for s in structure)


def _flatten_values(value) -> list:
    if isinstance(value, tuple):
        return [v for item in value for v in _flatten_values(item)]
    return [value]


def pad(x: np.ndarray, pads: list[list[int]], value: float = 0.0) -> np.ndarray:
    """Constant padding: ``pads[k] = [before, after]`` of the k-th axis from the last (as
    ``torch.nn.functional.pad`` orders them); ``value`` fills (``-inf`` for max pooling)."""
    widths = [(0, 0)] * x.ndim
    for k, (before, after) in enumerate(pads):
        widths[x.ndim - 1 - k] = (int(before), int(after))
    return np.pad(x, widths, mode="constant", constant_values=np.asarray(value, x.dtype))


def run_bundle(bundle: Bundle, inputs, hidden=None):
    """Run a loaded bundle on NumPy inputs; returns what the PyTorch model's ``forward`` returns.

    Args:
        bundle: from ``numpy_bundle.load_bundle``.
        inputs: the first input (an image batch, a token batch), or a tuple of all inputs in the
            order of the model's ``forward`` (e.g. ``(noise, labels)``).
        hidden: language models: the hidden state (an array, or ``(h, c)`` for an LSTM); None
            starts from zeros.

    Returns:
        An array, or a tuple mirroring the model's outputs (``(logits, hidden)`` for language
        models).
    """
    specs = bundle.inputs
    given = _flatten_values(inputs)
    if hidden is not None:
        given += _flatten_values(hidden)
    optional = bundle.manifest.get("optional_inputs", {})  # name -> "zeros" (hidden states)
    values: dict[str, np.ndarray] = {}
    if len(given) > len(specs):
        raise ExportError(f"the bundle takes {len(specs)} input(s), got {len(given)}")
    for i, spec in enumerate(specs):
        if i < len(given):
            values[spec["name"]] = _as_input(spec, given[i])
        elif spec["name"] in optional:
            values[spec["name"]] = _zeros_like_spec(spec, values, optional[spec["name"]])
        else:
            raise ExportError(f"missing input {spec['name']!r} ({spec['shape']})")
    for layer in bundle.layers:
        xs = [values[name] for name in layer["inputs"]]
        try:
            result = _RUN[layer["op"]](layer, xs, bundle.layer_tensors(layer))
        except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError) as exc:
            # A manifest whose attributes do not fit its tensors or inputs (a reshape to the wrong
            # size, an axis out of range, a string where a number belongs): name the layer.
            shapes = ", ".join(str(list(x.shape)) for x in xs)
            raise ExportError(
                f"{bundle.path}: layer {layer.get('name', '?')!r} ({layer['op']}) failed on "
                f"inputs of shape {shapes}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from None
        outputs = layer["outputs"]
        results = result if len(outputs) > 1 else (result,)
        for name, value in zip(outputs, results):
            values[name] = value
    return _restructure(bundle.manifest["outputs"], values)


def _zeros_like_spec(spec: dict, values: dict, rule: dict) -> np.ndarray:
    """A zero initial state: ``rule`` says which axis of which input gives the batch size."""
    batch = values[rule["batch_from"]].shape[rule["batch_axis"]]
    shape = [batch if s is None else s for s in spec["shape"]]
    return np.zeros(shape, dtype=_DTYPES.get(spec["dtype"], np.float32))


def output_names(bundle: Bundle) -> list[str]:
    """The names of the bundle's outputs, flattened."""
    return flatten_structure(bundle.manifest["outputs"])
