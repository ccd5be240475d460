"""Pure batch-normalization functions with TensorFlow's semantics.

These are the two building blocks that ``tf.nn.moments`` and ``tf.nn.batch_normalization``
provide, written so that a result can be checked by hand:

    moments(x, axes)                        -> (mean, biased variance) over ``axes``
    batch_normalization(x, m, v, b, g, eps) =  g * (x - m) / sqrt(v + eps) + b

The epsilon goes *inside* the square root (Ioffe & Szegedy 2015, Alg. 1). Both functions are
differentiable with autograd and broadcast like any elementwise torch expression.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["batch_normalization", "moments", "normalize_axes"]


def normalize_axes(axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Turn ``axes`` (an int or a sequence, negatives allowed) into sorted non-negative axes.

    Args:
        axes: the axes to reduce over.
        ndim: the number of dimensions of the tensor they refer to.

    Raises:
        ValueError: if an axis is out of range or repeated, or no axis is given.

    >>> normalize_axes([-1, 0], 4)
    (0, 3)
    """
    if isinstance(axes, int):
        axes = (axes,)
    axes = tuple(int(a) for a in axes)
    if not axes:
        raise ValueError("axes must name at least one axis, got an empty sequence")
    resolved = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        resolved.append(a % ndim)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"axes {axes} name the same axis twice (tensor has {ndim} dimensions)")
    return tuple(sorted(resolved))


def moments(x: Tensor, axes: int | Sequence[int], keepdims: bool = False) -> tuple[Tensor, Tensor]:
    """Mean and *biased* variance of ``x`` over ``axes``, like ``tf.nn.moments``.

    For an MLP activation ``[N, C]`` use ``axes=[0]`` (per feature); for a CNN activation
    ``[N, C, H, W]`` use ``axes=[0, 2, 3]`` (per channel), or ``[0, 1, 2]`` for ``[N, H, W, C]``.

    Args:
        x: input tensor (floating point).
        axes: axes to reduce over.
        keepdims: keep the reduced axes with size 1, so the results broadcast against ``x``.

    Returns:
        ``(mean, variance)`` where ``variance = mean((x - mean)**2)`` (divides by the count, not
        count - 1).

    >>> m, v = moments(torch.tensor([[1.0], [3.0]]), axes=[0])
    >>> m.item(), v.item()
    (2.0, 1.0)
    """
    if not torch.is_floating_point(x):
        raise TypeError(f"moments expects a floating-point tensor, got dtype {x.dtype}")
    dims = normalize_axes(axes, x.ndim)
    variance, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=keepdims)
    return mean, variance


def batch_normalization(
    x: Tensor,
    mean: Tensor,
    variance: Tensor,
    offset: Tensor | None,
    scale: Tensor | None,
    variance_epsilon: float,
) -> Tensor:
    """``scale * (x - mean) / sqrt(variance + variance_epsilon) + offset``, with broadcasting.

    The same contract as ``tf.nn.batch_normalization``: ``mean``/``variance`` are given (batch
    statistics in training, moving averages in inference), ``offset`` (beta) and ``scale``
    (gamma) may be ``None``. The epsilon is added to the variance *under* the square root.

    Args:
        x: input tensor.
        mean, variance: statistics broadcastable against ``x``.
        offset: beta, broadcastable against ``x``, or None for 0.
        scale: gamma, broadcastable against ``x``, or None for 1.
        variance_epsilon: small positive float added to the variance.

    >>> x = torch.tensor(-0.077417567, dtype=torch.float64)
    >>> y = batch_normalization(x, torch.tensor(-0.089603029, dtype=torch.float64),
    ...     torch.tensor(0.000436493, dtype=torch.float64), torch.tensor(-0.016652612,
    ...     dtype=torch.float64), torch.tensor(1.0055743, dtype=torch.float64), 1e-3)
    >>> round(y.item(), 6)
    0.306646
    """
    if variance_epsilon < 0:
        raise ValueError(f"variance_epsilon must be >= 0, got {variance_epsilon}")
    y = (x - mean) / torch.sqrt(variance + variance_epsilon)
    if scale is not None:
        y = y * scale
    if offset is not None:
        y = y + offset
    return y
