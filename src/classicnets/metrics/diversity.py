"""How varied a set of images is: the mean pairwise distance, overall or within each class.

The measure behind the GAN monitor's collapse warning (``train.gan_monitor``): a generator whose
samples collapse to a few images has a small mean pairwise distance next to real images'.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["diversity", "mean_pairwise_distance"]


def mean_pairwise_distance(images: Tensor) -> float:
    """Mean Euclidean distance between all pairs of the flattened images (float64)."""
    flat = images.detach().reshape(len(images), -1).double()  # (N, D)
    if len(flat) < 2:
        raise ValueError("mean_pairwise_distance needs at least two images")
    return torch.pdist(flat).mean().item()


def diversity(images: Tensor, labels: Tensor | None = None) -> float:
    """Mean pairwise distance of ``images``; with ``labels``, the mean over classes of the
    within-class mean pairwise distance (classes with fewer than two images are skipped).

    Within-class distances are what matter for a conditional generator: one that draws a single
    image per digit has ten distinct outputs, so its all-pairs distance looks healthy.
    """
    if labels is None:
        return mean_pairwise_distance(images)
    per_class = [
        mean_pairwise_distance(images[labels == k])
        for k in torch.unique(labels).tolist()
        if int((labels == k).sum()) >= 2
    ]
    if not per_class:
        raise ValueError("diversity: no class has two images")
    return float(np.mean(per_class))
