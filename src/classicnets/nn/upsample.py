"""Upsampling by output size: nearest neighbour, bilinear, or average unpooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classicnets.choices import check_choice
from classicnets.nn.conv_shapes import as_pair

__all__ = ["UPSAMPLE_MODES", "Upsample"]


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
        check_choice("mode", mode, UPSAMPLE_MODES)
        if (scale_factor is None) == (size is None):
            raise ValueError("Upsample: give exactly one of scale_factor and size")
        self.mode = mode
        self.size = None if size is None else as_pair(size, "size")
        self.scale_factor: tuple | None = None
        if scale_factor is not None:
            factors = (
                tuple(scale_factor)
                if isinstance(scale_factor, (tuple, list))
                else (scale_factor, scale_factor)
            )
            if mode == "unpool":
                factors = as_pair(factors, "scale_factor (mode 'unpool')")
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
