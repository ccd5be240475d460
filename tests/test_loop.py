"""The pieces the training loops share (``classicnets.train.loop``)."""

from __future__ import annotations

import math

import pytest
import torch

from classicnets.train import loop
from classicnets.train.fit import Cadence
from classicnets.train.loop import (
    FiniteCheck,
    NonFiniteLossError,
    TrainClock,
)


def _ring(values, log_every):
    """A ring buffer as the loops keep it: the value of step s (0-based) at s % log_every."""
    buffer = torch.zeros(log_every, *torch.as_tensor(values[0]).shape)
    for step, value in enumerate(values):
        buffer[step % log_every] = torch.as_tensor(value)
    return buffer


def test_finite_check_names_the_first_bad_step_and_value():
    buffer = _ring([0.5, 0.4, float("inf"), float("nan")], log_every=4)
    check = FiniteCheck("bn", 0, "cpu", 4, buffer.__getitem__)
    with pytest.raises(NonFiniteLossError, match=r"^bn: training loss is inf at step 3; stopped"):
        check(4)
    assert check.checked_upto == 0  # nothing counts as checked after a failure


def test_finite_check_advances_only_over_finite_steps_and_wraps_around():
    log_every = 3
    values = [0.1, 0.2, 0.3, 0.4, 0.5, float("nan")]  # step 6 (1-based) is bad; slot 5 % 3 = 2
    buffer = _ring(values[:5], log_every)
    check = FiniteCheck("m", 0, "cpu", log_every, buffer.__getitem__)
    check(3)
    assert check.checked_upto == 3
    check(3)  # nothing new: no read, no change
    check(5)
    assert check.checked_upto == 5
    buffer[5 % log_every] = values[5]
    assert check.first_bad(6)[0] == 6
    with pytest.raises(NonFiniteLossError, match="at step 6"):
        check(6)


def test_finite_check_reports_the_column_of_several_values():
    names = ("d_loss", "g_loss")
    buffer = _ring([[0.7, 0.6], [0.7, -math.inf], [math.nan, 0.1]], log_every=8)
    check = FiniteCheck("gan", 0, "cpu", 8, lambda idx: buffer[idx], names=names)
    bad_step, column, values = check.first_bad(3)
    assert (bad_step, column) == (2, 1) and values.shape == (3, 2)
    with pytest.raises(NonFiniteLossError, match=r"^gan: g_loss is -inf at step 2;"):
        check(3)


def test_finite_check_stops_every_process_when_one_sees_a_bad_loss():
    """Under DDP the count of bad values is summed over processes: a process whose own losses
    are finite stops too, at the first unchecked step, with the value unknown (nan)."""
    buffer = _ring([0.5, 0.5], log_every=4)

    def one_bad_elsewhere(flag):
        flag += 1.0

    check = FiniteCheck("rank1", 0, "cpu", 4, buffer.__getitem__, all_reduce=one_bad_elsewhere)
    assert check.first_bad(2)[:2] == (1, -1)
    with pytest.raises(NonFiniteLossError, match="training loss is nan at step 1"):
        check(2)


def test_train_clock_leaves_out_paused_spans(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    clock = TrainClock(elapsed=5.0)  # resumed after 5 s of training
    now[0] += 2.0
    with clock.paused():
        now[0] += 30.0  # an evaluation
    now[0] += 1.0
    assert clock.elapsed() == 8.0
    with pytest.raises(RuntimeError), clock.paused():  # a failed evaluation still resumes it
        now[0] += 10.0
        raise RuntimeError
    now[0] += 1.0
    assert clock.elapsed() == 9.0


@pytest.mark.parametrize(
    ("steps", "start", "stop_after", "expected"),
    [(100, 0, None, 100), (100, 30, 20, 50), (100, 90, 20, 100), (100, 0, 0, 0)],
)
def test_end_step(steps, start, stop_after, expected):
    assert Cadence(steps, stop_after=stop_after).stop_step(start) == expected


def test_checkpoint_due():
    every_10, end_only = Cadence(25, checkpoint_every=10), Cadence(25, checkpoint_every=0)
    assert [s for s in range(1, 26) if every_10.checkpoint_due(s)] == [10, 20, 25]
    assert [s for s in range(1, 26) if end_only.checkpoint_due(s)] == [25]
