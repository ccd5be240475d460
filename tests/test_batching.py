"""Shuffled index batches: coverage of each epoch, determinism, exact resume."""

from __future__ import annotations

import torch

from classicnets.data.batching import ShuffledBatches, iterate_in_order


def test_each_epoch_is_a_permutation_without_the_remainder():
    b = ShuffledBatches(103, batch_size=10, seed=3)
    epoch0 = torch.cat([next(b) for _ in range(10)])
    assert len(torch.unique(epoch0)) == 100  # 10 full batches, 3 dropped
    first_of_epoch1 = next(b)
    assert b.epoch == 1 and len(first_of_epoch1) == 10
    assert b.batches_per_epoch == 10


def test_order_depends_only_on_seed_and_epoch():
    a, b = ShuffledBatches(50, 7, seed=1), ShuffledBatches(50, 7, seed=1)
    assert all(torch.equal(next(a), next(b)) for _ in range(20))
    c = ShuffledBatches(50, 7, seed=2)
    assert not torch.equal(next(ShuffledBatches(50, 7, seed=1)), next(c))


def test_resume_from_state_continues_identically():
    a = ShuffledBatches(50, 7, seed=5)
    for _ in range(9):
        next(a)
    resumed = ShuffledBatches(50, 7, seed=5)
    resumed.load_state_dict(a.state_dict())
    assert all(torch.equal(next(a), next(resumed)) for _ in range(25))


def test_keep_last_partial_batch_when_asked():
    b = ShuffledBatches(10, 4, seed=0, drop_last=False)
    sizes = [len(next(b)) for _ in range(4)]
    assert sizes == [4, 4, 2, 4]


def test_in_order_slices_cover_everything():
    slices = list(iterate_in_order(10, 4))
    assert [(s.start, s.stop) for s in slices] == [(0, 4), (4, 8), (8, 10)]
