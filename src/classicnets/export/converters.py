"""Op converters: one per PyTorch module type, function or tensor method the exporter knows.

Each converter receives the ``Context``, the fx node and the converted arguments (``Value`` for
run-time tensors, ``Const`` for parameters and buffers, ``Static`` or plain Python values for
the rest) and returns the converted result: what ``cx.emit`` returns for a new layer, or its
input for a layer that is the identity in inference (Dropout, Identity, ``contiguous``, a cast
to the same dtype). Shapes come from the recorded traces (``cx.result``, ``cx.shapes``), never
from values that tracing baked into the graph.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from classicnets.export.ir import (
    Const,
    Static,
    Value,
    dynamic_axes,
    register_function,
    register_method,
    register_module,
    unwrap_static,
)
from classicnets.export.numpy_bundle import ExportError
from classicnets.nn.batchnorm import BatchNorm
from classicnets.nn.upsample import Upsample


def _identity(cx, node, *args, **kwargs):
    return args[1] if isinstance(args[0], nn.Module) else args[0]


register_module(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)(_identity)
register_function(F.dropout, F.dropout1d, F.dropout2d, torch.dropout)(_identity)
register_method("contiguous", "detach", "clone")(_identity)


# --- layers with weights


@register_module(nn.Linear)
def _linear_module(cx, node, m: nn.Linear, x):
    attrs = {"in_features": m.in_features, "out_features": m.out_features}
    return cx.emit(node, "linear", [x], attrs, {"weight": m.weight, "bias": m.bias})


@register_function(F.linear)
def _linear_function(cx, node, x, weight, bias=None):
    if not isinstance(weight, Const) or not (bias is None or isinstance(bias, Const)):
        raise ExportError(f"{node.name}: F.linear needs parameter weights")
    w = weight.tensor
    b = bias.tensor if isinstance(bias, Const) else None
    attrs = {"in_features": w.shape[1], "out_features": w.shape[0]}
    return cx.emit(node, "linear", [x], attrs, {"weight": w, "bias": b})


def _conv_attrs(cx, node, m, x) -> dict[str, Any]:
    if m.padding_mode != "zeros":
        raise ExportError(f"{node.target}: padding_mode {m.padding_mode!r} is not supported")
    padding = m.padding
    if isinstance(padding, str):  # "same" / "valid": symmetric numbers
        if padding == "valid":
            padding = (0, 0)
        else:
            total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
            if any(t % 2 for t in total):
                raise ExportError(f"{node.target}: asymmetric 'same' padding is not supported")
            padding = tuple(t // 2 for t in total)
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": list(padding),
        "dilation": list(m.dilation),
        "groups": m.groups,
    }


@register_module(nn.Conv2d)
def _conv2d(cx, node, m: nn.Conv2d, x):
    attrs = _conv_attrs(cx, node, m, x)
    return cx.emit(node, "conv2d", [x], attrs, {"weight": m.weight, "bias": m.bias})


@register_module(nn.ConvTranspose2d)
def _conv_transpose2d(cx, node, m: nn.ConvTranspose2d, x, *args, **kwargs):
    # The output size (and so output_padding) is read from the recorded output: a subclass that
    # takes an output_size argument, or computes it, is exported exactly.
    attrs = _conv_attrs(cx, node, m, x)
    (sh, sw), (ph, pw) = m.stride, attrs["padding"]
    (dh, dw), (kh, kw) = m.dilation, m.kernel_size
    h_in, w_in = x.shape_a[-2:]
    h_out, w_out = cx.result(node).shape[-2:]
    pad_h = h_out - ((h_in - 1) * sh - 2 * ph + dh * (kh - 1) + 1)
    pad_w = w_out - ((w_in - 1) * sw - 2 * pw + dw * (kw - 1) + 1)
    attrs["output_padding"] = [int(pad_h), int(pad_w)]
    return cx.emit(node, "conv_transpose2d", [x], attrs, {"weight": m.weight, "bias": m.bias})


@register_module(BatchNorm, nn.modules.batchnorm._BatchNorm)
def _batch_norm(cx, node, m: nn.Module, x):
    if not m.track_running_stats or m.running_mean is None:
        raise ExportError(
            f"{node.target}: a BN layer without running statistics normalizes with batch "
            f"statistics even in inference; it cannot be exported as a fixed layer"
        )
    axis = m.axis if isinstance(m, BatchNorm) else 1
    attrs = {"num_features": m.num_features, "axis": cx.axis(x, axis), "eps": float(m.eps)}
    tensors = {
        "running_mean": m.running_mean,
        "running_var": m.running_var,
        "weight": m.weight,
        "bias": m.bias,
    }
    return cx.emit(node, "batch_norm", [x], attrs, tensors)


@register_module(nn.Embedding)
def _embedding_module(cx, node, m: nn.Embedding, tokens):
    if m.max_norm is not None:
        raise ExportError(f"{node.target}: Embedding(max_norm=...) renormalizes rows; unsupported")
    attrs = {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim}
    return cx.emit(node, "embedding", [tokens], attrs, {"weight": m.weight})


@register_function(F.embedding)
def _embedding_function(cx, node, tokens, weight, *args, **kwargs):
    if not isinstance(weight, Const):
        raise ExportError(f"{node.name}: F.embedding needs a parameter weight")
    w = weight.tensor
    attrs = {"num_embeddings": w.shape[0], "embedding_dim": w.shape[1]}
    return cx.emit(node, "embedding", [tokens], attrs, {"weight": w})


@register_module(nn.RNN, nn.LSTM)
def _recurrent(cx, node, m: nn.RNNBase, x, hx=None):
    is_lstm = isinstance(m, nn.LSTM)
    if m.bidirectional or getattr(m, "proj_size", 0):
        raise ExportError(f"{node.target}: bidirectional or projected RNNs are not supported")
    if not isinstance(x, Value):
        raise ExportError(f"{node.target}: expected a tensor input (PackedSequence unsupported)")
    inputs = [x]
    if isinstance(hx, Static) and hx.a is None:
        hx = None
    if hx is not None:
        inputs += list(hx) if is_lstm else [hx]
    attrs = {
        "input_size": m.input_size,
        "hidden_size": m.hidden_size,
        "num_layers": m.num_layers,
        "batch_first": bool(m.batch_first),
    }
    if not is_lstm:
        attrs["nonlinearity"] = m.nonlinearity
    tensors = {}
    for k in range(m.num_layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            tensors[f"{name}_l{k}"] = getattr(m, f"{name}_l{k}", None)
    return cx.emit(node, "lstm" if is_lstm else "rnn", inputs, attrs, tensors)


# --- activations


def _unary(op: str, **fixed):
    def convert(cx, node, *args, **kwargs):
        x = args[1] if isinstance(args[0], nn.Module) else args[0]
        return cx.emit(node, op, [cx.value(node, x)], dict(fixed))

    return convert


register_module(nn.ReLU)(_unary("relu"))
register_function(F.relu, torch.relu)(_unary("relu"))
register_module(nn.Sigmoid)(_unary("sigmoid"))
register_function(torch.sigmoid, F.sigmoid)(_unary("sigmoid"))
register_module(nn.Tanh)(_unary("tanh"))
register_function(torch.tanh, F.tanh)(_unary("tanh"))
register_method("relu")(_unary("relu"))
register_method("sigmoid")(_unary("sigmoid"))
register_method("tanh")(_unary("tanh"))
for _op, _fn in (("exp", torch.exp), ("log", torch.log), ("sqrt", torch.sqrt), ("abs", torch.abs)):
    register_function(_fn)(_unary(_op))
    register_method(_op)(_unary(_op))
register_function(operator.neg, torch.neg)(_unary("neg"))
register_method("neg")(_unary("neg"))


@register_module(nn.LeakyReLU)
def _leaky_relu_module(cx, node, m, x):
    return cx.emit(node, "leaky_relu", [x], {"negative_slope": float(m.negative_slope)})


@register_function(F.leaky_relu)
def _leaky_relu_function(cx, node, x, negative_slope=0.01, inplace=False):
    return cx.emit(
        node, "leaky_relu", [x], {"negative_slope": float(unwrap_static(negative_slope))}
    )


@register_module(nn.ELU)
def _elu_module(cx, node, m, x):
    return cx.emit(node, "elu", [x], {"alpha": float(m.alpha)})


@register_function(F.elu)
def _elu_function(cx, node, x, alpha=1.0, inplace=False):
    return cx.emit(node, "elu", [x], {"alpha": float(unwrap_static(alpha))})


@register_function(F.pad)
def _pad_function(cx, node, x, pad, mode="constant", value=None):
    """Constant padding of the last axes: ``pad`` is (last_before, last_after, ...) as in
    ``F.pad``; the bundle stores it as one ``[before, after]`` pair per axis from the last."""
    mode = unwrap_static(mode)
    if mode != "constant":
        raise ExportError(f"{node.name}: F.pad mode {mode!r} has no NumPy op (constant only)")
    pads = [int(p) for p in unwrap_static(pad)]
    fill = unwrap_static(value)
    return cx.emit(
        node, "pad", [x], {"pads": [pads[i : i + 2] for i in range(0, len(pads), 2)],
                           "value": 0.0 if fill is None else float(fill)},
    )  # fmt: skip


@register_module(nn.GELU)
def _gelu_module(cx, node, m, x):
    return cx.emit(node, "gelu", [x], {"approximate": m.approximate})


@register_function(F.gelu)
def _gelu_function(cx, node, x, approximate="none"):
    return cx.emit(node, "gelu", [x], {"approximate": unwrap_static(approximate)})


@register_module(nn.Softplus)
def _softplus_module(cx, node, m, x):
    attrs = {"beta": float(m.beta), "threshold": float(m.threshold)}
    return cx.emit(node, "softplus", [x], attrs)


@register_function(F.softplus)
def _softplus_function(cx, node, x, beta=1.0, threshold=20.0):
    attrs = {"beta": float(unwrap_static(beta)), "threshold": float(unwrap_static(threshold))}
    return cx.emit(node, "softplus", [x], attrs)


def _softmax_like(op: str):
    def convert(cx, node, *args, dim=None, **kwargs):
        if isinstance(args[0], nn.Module):
            module, x = args[0], args[1]
            dim = module.dim
        else:
            x = args[0]
            if dim is None and len(args) > 1:
                dim = args[1]
        dim = unwrap_static(dim)
        if dim is None:
            raise ExportError(f"{node.name}: {op} needs an explicit dim")
        return cx.emit(node, op, [x], {"axis": cx.axis(x, dim)})

    return convert


register_module(nn.Softmax)(_softmax_like("softmax"))
register_function(F.softmax, torch.softmax)(_softmax_like("softmax"))
register_method("softmax")(_softmax_like("softmax"))
register_module(nn.LogSoftmax)(_softmax_like("log_softmax"))
register_function(F.log_softmax, torch.log_softmax)(_softmax_like("log_softmax"))
register_method("log_softmax")(_softmax_like("log_softmax"))


# --- pooling and resampling


def _pair(v) -> list[int]:
    v = unwrap_static(v)
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


@register_module(nn.MaxPool2d)
def _max_pool_module(cx, node, m, x):
    return _max_pool(cx, node, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


@register_function(F.max_pool2d)
def _max_pool(cx, node, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
              return_indices=False):  # fmt: skip
    if unwrap_static(return_indices):
        raise ExportError(f"{node.name}: max_pool2d(return_indices=True) is not supported")
    stride = unwrap_static(stride)
    attrs = {
        "kernel_size": _pair(kernel_size),
        "stride": _pair(stride) if stride not in (None, [], ()) else _pair(kernel_size),
        "padding": _pair(padding),
        "dilation": _pair(dilation),
        "ceil_mode": bool(unwrap_static(ceil_mode)),
    }
    return cx.emit(node, "max_pool2d", [x], attrs)


@register_module(nn.AvgPool2d)
def _avg_pool_module(cx, node, m, x):
    if m.divisor_override is not None:
        raise ExportError(f"{node.target}: AvgPool2d(divisor_override=...) is not supported")
    return _avg_pool(cx, node, x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                     m.count_include_pad)  # fmt: skip


@register_function(F.avg_pool2d)
def _avg_pool(cx, node, x, kernel_size, stride=None, padding=0, ceil_mode=False,
              count_include_pad=True, divisor_override=None):  # fmt: skip
    if unwrap_static(divisor_override) is not None:
        raise ExportError(f"{node.name}: avg_pool2d(divisor_override=...) is not supported")
    stride = unwrap_static(stride)
    attrs = {
        "kernel_size": _pair(kernel_size),
        "stride": _pair(stride) if stride not in (None, [], ()) else _pair(kernel_size),
        "padding": _pair(padding),
        "ceil_mode": bool(unwrap_static(ceil_mode)),
        "count_include_pad": bool(unwrap_static(count_include_pad)),
    }
    return cx.emit(node, "avg_pool2d", [x], attrs)


@register_module(nn.AdaptiveAvgPool2d)
def _adaptive_avg_pool_module(cx, node, m, x):
    return _adaptive_avg_pool(cx, node, x, m.output_size)


@register_function(F.adaptive_avg_pool2d)
def _adaptive_avg_pool(cx, node, x, output_size):
    h, w = x.shape_a[-2:]
    h_out, w_out = cx.result(node).shape[-2:]
    if (h_out, w_out) == (1, 1):
        return cx.emit(node, "mean", [x], {"axes": [x.ndim - 2, x.ndim - 1], "keepdims": True})
    if h % h_out or w % w_out:
        raise ExportError(f"{node.name}: adaptive pooling {h}x{w} -> {h_out}x{w_out} unsupported")
    kernel = [h // h_out, w // w_out]
    attrs = {"kernel_size": kernel, "stride": kernel, "padding": [0, 0], "ceil_mode": False,
             "count_include_pad": True}  # fmt: skip
    return cx.emit(node, "avg_pool2d", [x], attrs)


def _resample(cx, node, x, mode: str, align_corners, scale_factor):
    h, w = x.shape_a[-2:]
    size = [int(s) for s in cx.result(node).shape[-2:]]
    if mode == "nearest":
        # PyTorch maps output index i to floor(i / scale); with a given scale_factor that is the
        # same as floor(i * H / H_out) (what the runtime uses) when the factor is exact.
        factors = unwrap_static(scale_factor)
        if factors is not None:
            factors = [factors] * 2 if isinstance(factors, (int, float)) else list(factors)
            if any(abs(o - i * f) > 1e-9 for o, i, f in zip(size, (h, w), factors)):
                raise ExportError(f"{node.name}: nearest resize with a non-exact scale factor")
        return cx.emit(node, "upsample_nearest2d", [x], {"size": size})
    if mode == "bilinear":
        if unwrap_static(scale_factor) is not None and not unwrap_static(align_corners):
            factors = unwrap_static(scale_factor)
            factors = [factors] * 2 if isinstance(factors, (int, float)) else list(factors)
            if any(abs(o - i * f) > 1e-9 for o, i, f in zip(size, (h, w), factors)):
                raise ExportError(f"{node.name}: bilinear resize with a non-exact scale factor")
        attrs = {"size": size, "align_corners": bool(unwrap_static(align_corners))}
        return cx.emit(node, "upsample_bilinear2d", [x], attrs)
    raise ExportError(f"{node.name}: interpolation mode {mode!r} is not supported")


@register_module(nn.Upsample)
def _upsample_module(cx, node, m, x):
    return _resample(cx, node, x, m.mode, m.align_corners, m.scale_factor)


@register_function(F.interpolate)
def _interpolate(cx, node, x, size=None, scale_factor=None, mode="nearest", align_corners=None,
                 recompute_scale_factor=None, antialias=False):  # fmt: skip
    if unwrap_static(antialias):
        raise ExportError(f"{node.name}: interpolate(antialias=True) is not supported")
    return _resample(cx, node, x, unwrap_static(mode), align_corners, scale_factor)


# --- shapes


def _reshape(cx, node, *args, **kwargs):
    x = args[1] if isinstance(args[0], nn.Module) else args[0]
    x = cx.value(node, x)
    shapes = cx.shapes(node)
    if shapes == x.shapes:
        return x  # no change of shape (e.g. flatten of a [N, F] tensor)
    shape = dynamic_axes(shapes, node.name)
    return cx.emit(node, "reshape", [x], {"shape": shape})


register_module(nn.Flatten, nn.Unflatten)(_reshape)
register_function(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)(_reshape)
register_method("view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as")(
    _reshape
)


def _transpose(cx, node, x, *dims, **kwargs):
    rank = x.ndim
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dims = [unwrap_static(d) for d in dims] + [unwrap_static(v) for v in kwargs.values()]
    if name in ("permute",):
        perm = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        perm = [d % rank for d in perm]
    elif name == "t":
        perm = [1, 0] if rank == 2 else list(range(rank))
    else:  # transpose / swapaxes (a, b)
        a, b = dims[0] % rank, dims[1] % rank
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
    if perm == list(range(rank)):
        return x
    return cx.emit(node, "transpose", [x], {"perm": perm})


register_method("permute", "transpose", "swapaxes", "t")(_transpose)
register_function(torch.permute, torch.transpose, torch.swapaxes, torch.t)(_transpose)


def _reduce(op: str):
    def convert(cx, node, x, dim=None, keepdim=False, *, dtype=None, axis=None):
        dim = unwrap_static(dim if dim is not None else axis)
        if dim is None:
            axes = None
        else:
            axes = [d % x.ndim for d in ([dim] if isinstance(dim, int) else dim)]
        attrs = {"axes": axes, "keepdims": bool(unwrap_static(keepdim))}
        return cx.emit(node, op, [x], attrs)

    return convert


register_method("mean")(_reduce("mean"))
register_function(torch.mean)(_reduce("mean"))
register_method("sum")(_reduce("sum"))
register_function(torch.sum)(_reduce("sum"))


@register_function(torch.cat, torch.concat)
def _cat(cx, node, tensors, dim=0, *, axis=None):
    values = [cx.value(node, t) for t in tensors]
    dim = unwrap_static(axis if axis is not None else dim)
    return cx.emit(node, "concat", values, {"axis": dim % values[0].ndim})


@register_function(operator.getitem)
def _getitem(cx, node, value, index):
    index = unwrap_static(index)
    if isinstance(value, (tuple, list)):
        return value[index]  # an element of a module's tuple output, e.g. LSTM's (out, (h, c))
    if isinstance(value, Static):
        return Static(tuple(v[index] for v in value.values))
    x = cx.value(node, value)
    items = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis or i is None or not isinstance(i, (int, slice)) for i in items):
        raise ExportError(f"{node.name}: only int and slice indexing is supported, got {index!r}")
    out, squeeze, previous = x, False, x
    for axis, item in enumerate(items):
        if item == slice(None):
            continue
        if isinstance(item, int):
            size = previous.shape_a[axis]
            start = item % size
            item, squeeze = slice(start, start + 1, 1), True
        attrs = {"axis": axis, "start": item.start, "stop": item.stop, "step": item.step}
        out = cx.emit(node, "slice", [out], attrs, name=f"{node.name}.slice{axis}")
        # the recorded shape of the node is the final one; fix up the intermediate's shape
        # (from the previous intermediate: a slice on a second axis keeps the first's)
        out = Value(out.name, _sliced_shapes(previous, axis, item), x.dtype)
        previous = out
    if squeeze:
        return _reshape(cx, node, out)
    return out


def _sliced_shapes(x: Value, axis: int, item: slice) -> tuple:
    def one(shape):
        shape = list(shape)
        shape[axis] = len(range(*item.indices(shape[axis])))
        return tuple(shape)

    return tuple(one(s) for s in x.shapes)


def _split(cx, node, x, split_size_or_sections, dim=0):
    """chunk / split: a tuple of slices along ``dim``."""
    results = cx.result(node)
    dim = unwrap_static(dim) % x.ndim
    outs, start = [], 0
    for i, piece in enumerate(results):
        stop = start + piece.shape[dim]
        attrs = {"axis": dim, "start": start, "stop": stop, "step": 1}
        name = cx.unique_name(f"{node.name}:{i}")
        cx.layers.append(
            {"name": name, "op": "slice", "inputs": [x.name], "outputs": [name],
             "attrs": attrs, "tensors": {}}
        )  # fmt: skip
        shapes = tuple(tuple(r[node][i].shape) for r in cx.results)
        outs.append(Value(name, shapes, x.dtype))
        start = stop
    return tuple(outs)


@register_method("chunk")
def _chunk_method(cx, node, x, chunks, dim=0):
    return _split(cx, node, x, chunks, dim)


register_function(torch.chunk)(_chunk_method)
register_method("split")(_split)
register_function(torch.split)(_split)


@register_function(F.one_hot)
def _one_hot(cx, node, x, num_classes=-1):
    num_classes = int(cx.result(node).shape[-1])
    return cx.emit(node, "one_hot", [x], {"num_classes": num_classes})


_CAST_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.int64: "int64",
               torch.bool: "bool"}  # fmt: skip


def _cast(cx, node, x, *args, **kwargs):
    x = cx.value(node, x)
    dtype = cx.result(node).dtype
    if dtype == x.dtype:
        return x
    if dtype not in _CAST_NAMES:
        raise ExportError(f"{node.name}: cast to {dtype} is not supported")
    return cx.emit(node, "cast", [x], {"dtype": _CAST_NAMES[dtype]})


register_method("float", "long", "to", "type", "type_as", "double", "int", "bool")(_cast)


# --- elementwise arithmetic


def _binary(op: str):
    def convert(cx, node, a, b, *, alpha=None, out=None, rounding_mode=None):
        if unwrap_static(alpha) not in (None, 1):
            raise ExportError(f"{node.name}: {op}(alpha=...) is not supported")
        if unwrap_static(rounding_mode) is not None:
            raise ExportError(f"{node.name}: div(rounding_mode=...) is not supported")
        scalar_a = not isinstance(a, (Value, Const))
        scalar_b = not isinstance(b, (Value, Const))
        if scalar_a or scalar_b:
            scalar = cx.static(a if scalar_a else b, f"{node.name}: scalar operand")
            tensor = b if scalar_a else a
            attrs = {"scalar": scalar, "scalar_first": scalar_a}
            return cx.emit(node, op, [cx.value(node, tensor)], attrs)
        return cx.emit(node, op, [cx.value(node, a), cx.value(node, b)])

    return convert


for _op, _fns, _methods in (
    ("add", (operator.add, operator.iadd, torch.add), ("add", "add_", "__add__")),
    ("sub", (operator.sub, operator.isub, torch.sub), ("sub", "sub_", "__sub__")),
    ("mul", (operator.mul, operator.imul, torch.mul), ("mul", "mul_", "__mul__")),
    ("div", (operator.truediv, operator.itruediv, torch.div), ("div", "div_", "__truediv__")),
    ("pow", (operator.pow, torch.pow), ("pow",)),
):
    register_function(*_fns)(_binary(_op))
    register_method(*_methods)(_binary(_op))


@register_function(torch.clamp, torch.clip)
def _clamp(cx, node, x, min=None, max=None):
    lo, hi = unwrap_static(min), unwrap_static(max)
    attrs = {"min": lo, "max": hi}  # None: unbounded on that side
    return cx.emit(node, "clamp", [x], attrs)


register_method("clamp", "clip")(_clamp)


@register_function(torch.zeros_like, torch.ones_like, torch.full_like)
def _full_like(cx, node, x, *args, **kwargs):
    fill = {torch.zeros_like: 0.0, torch.ones_like: 1.0}.get(node.target)
    if fill is None:
        fill = unwrap_static(args[0] if args else kwargs["fill_value"])
    dtype = cx.result(node).dtype
    if dtype not in _CAST_NAMES:
        raise ExportError(f"{node.name}: {dtype} tensors are not supported")
    attrs = {"value": fill, "dtype": _CAST_NAMES[dtype]}
    return cx.emit(node, "full_like", [cx.value(node, x)], attrs)


@register_module(Upsample)
def _classicnets_upsample(cx, node, m: Upsample, x):
    """``classicnets.nn.Upsample``: nearest, bilinear, or average unpooling to the exact size."""
    if m.mode == "unpool":
        size = [int(s) for s in cx.result(node).shape[-2:]]
        return cx.emit(node, "average_unpool2d", [x], {"size": size})
    align = False if m.mode == "bilinear" else None
    return _resample(cx, node, x, m.mode, align, None if m.size is not None else m.scale_factor)
