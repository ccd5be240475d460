"""Datasets as whole-split tensors, for training: ``ClassificationData`` and MNIST in it.

``classicnets.data`` itself never imports torch; this module does, and is imported on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from classicnets.data.mnist import load_mnist

__all__ = ["ClassificationData", "load_image_data"]


@dataclass
class ClassificationData:
    """Whole splits as tensors: inputs float ``[N, ...]``, labels int64 ``[N]``."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def to(self, device: torch.device | str) -> ClassificationData:
        return ClassificationData(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.train_x, self.train_y, self.test_x, self.test_y


def load_image_data(
    dataset: str,
    data_dir: str | None,
    device: str,
    train_limit: int | None = None,
    download: bool = True,
    test_limit: int | None = None,
) -> ClassificationData:
    """MNIST / Fashion-MNIST (``dataset``: "mnist" or "fashion-mnist") as ``ClassificationData``:
    float32 in [0, 1], shape ``[N, 1, 28, 28]``, whole splits on ``device``. ``train_limit`` and
    ``test_limit`` keep the first examples of the training and test splits (quick runs)."""
    splits = []
    for split in ("train", "test"):
        images, labels = load_mnist(split, dataset=dataset, data_dir=data_dir, download=download)
        limit = train_limit if split == "train" else test_limit
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        x = torch.from_numpy(images).to(device=device, dtype=torch.float32).div_(255.0)
        splits += [x.unsqueeze(1), torch.from_numpy(labels).to(device)]  # (N, 1, 28, 28), (N,)
    return ClassificationData(*splits)
