"""Mini-batches sliced from whole-split tensors, with a data order that can be resumed exactly.

The tutorial way (``DataLoader`` over a ``TensorDataset``) indexes one sample at a time and
collates them in Python, which costs more than the model for a small MLP. Here a split lives in
one tensor (on the GPU when training there) and each batch is one indexing operation.

The order is a pure function of ``(seed, epoch)``: epoch ``e`` uses the permutation drawn from a
generator seeded with ``seed + e``. A resumed run therefore only needs ``(epoch, position)`` to
continue with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["ShuffledBatches", "iterate_in_order"]


class ShuffledBatches:
    """Endless shuffled index batches over ``num_examples`` examples, resumable.

    Args:
        num_examples: size of the split.
        batch_size: examples per batch.
        seed: base seed of the data order.
        drop_last: drop the incomplete batch at the end of each epoch (keeps every step's batch
            the same size, which BN's statistics and exact comparisons want).
        device: where the index tensors are made (the device of the data).

    >>> b = ShuffledBatches(10, batch_size=4, seed=0)
    >>> [len(next(b)) for _ in range(3)], b.state_dict()
    ([4, 4, 4], {'epoch': 1, 'position': 4})
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int,
        drop_last: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_examples < batch_size and drop_last:
            raise ValueError(
                f"batch_size {batch_size} is larger than the split ({num_examples} examples)"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.epoch = 0
        self.position = 0
        self._perm: Tensor | None = None

    def _permutation(self) -> Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(self.num_examples, generator=g).to(self.device)
        return self._perm

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        end = self.position + self.batch_size
        if end > self.num_examples and (self.drop_last or self.position >= self.num_examples):
            self.epoch += 1
            self.position = 0
            self._perm = None
            end = self.batch_size
        index = self._permutation()[self.position : min(end, self.num_examples)]
        self.position = end
        return index

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._perm = None


def iterate_in_order(num_examples: int, batch_size: int) -> Iterator[slice]:
    """In-order slices covering ``range(num_examples)``; the last one may be short."""
    for start in range(0, num_examples, batch_size):
        yield slice(start, min(start + batch_size, num_examples))
