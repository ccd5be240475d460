"""Sizes of convolutions, and a transposed convolution built for the size it must produce.

``conv_output_size``, ``conv_transpose_output_size`` and ``same_padding`` give output lengths and
TensorFlow's ``SAME`` padding along one axis (``docs/layers.md`` has the formulas and their
derivation); ``ConvTranspose2dExact`` solves for ``padding`` and ``output_padding`` and refuses an
unreachable size at construction, saying which sizes are reachable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PADDING_RULES",
    "ConvTranspose2dExact",
    "as_pair",
    "conv_output_size",
    "conv_transpose_output_size",
    "conv_transpose_padding",
    "same_padding",
]


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


def as_pair(value: Any, name: str) -> tuple[int, int]:
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
        kernel = as_pair(kernel_size, "kernel_size")
        strides = as_pair(stride, "stride")
        dilations = as_pair(dilation, "dilation")
        sizes_in = as_pair(in_size, "in_size")
        sizes_out = as_pair(out_size, "out_size")
        rules = (padding, padding) if isinstance(padding, str) else as_pair(padding, "padding")
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
