"""Batch augmentation on whole tensors, reproducible from the step number.

``random_shift(x, step, max_shift, seed)`` translates each image of a batch by a random whole
number of pixels in each direction (zero fill), the classic MNIST augmentation. The shifts come
from a generator seeded with ``(seed, step)``, so a resumed run sees exactly the shifts an
uninterrupted one did, without saving generator state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_shift"]


def random_shift(x: Tensor, step: int, max_shift: int = 2, seed: int = 0) -> Tensor:
    """Shift each image of ``x`` ``[N, C, H, W]`` by up to ``max_shift`` pixels (zero fill).

    Args:
        x: batch of images.
        step: the training step (with ``seed``, it determines the shifts).
        max_shift: largest shift in pixels along each axis.
        seed: base seed.

    >>> x = torch.zeros(1, 1, 5, 5); x[0, 0, 2, 2] = 1.0
    >>> y = random_shift(x, step=3, max_shift=1)
    >>> int(y.sum()), y.shape
    (1, torch.Size([1, 1, 5, 5]))
    """
    if max_shift == 0:
        return x
    n, _, h, w = x.shape  # (N, C, H, W)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=g).to(x.device)
    padded = F.pad(x, (max_shift,) * 4)  # (N, C, H + 2m, W + 2m)
    rows = torch.arange(h, device=x.device) + max_shift  # (H,)
    cols = torch.arange(w, device=x.device) + max_shift  # (W,)
    r = (rows[None, :] - shifts[:, :1])[:, None, :, None]  # (N, 1, H, 1)
    c = (cols[None, :] - shifts[:, 1:])[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]  # (N, 1, 1, 1)
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]  # (1, C, 1, 1)
    return padded[batch, channel, r, c]  # (N, C, H, W)
