"""Learning-rate schedules and gradient clipping (``classicnets.train.schedules``).

References: numbers written out by hand from the closed forms and from the TensorFlow PTB
tutorial's Zaremba et al. 2014 configs; ``torch.optim.lr_scheduler.StepLR`` and
``ReduceLROnPlateau``; a float64 NumPy global norm.

Tolerances: closed forms in float64 against hand-computed values, 1e-15 relative (one or two
roundings); torch's plateau scheduler multiplies the same floats in the same order as ours when
the base rate is 1.0, so those factors must be exactly equal, and with other base rates they
differ by reassociation only (1e-15 relative); gradient norms of float32 gradients against
float64 NumPy, 1e-6 relative (float32 accumulation over ~100 values); after clipping, torch
scales by ``max_norm / (norm + 1e-6)``, so the norm is ``max_norm`` to 1e-6 relative.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from classicnets.train.schedules import (
    ConstantSchedule,
    CosineWithWarmup,
    ExponentialAfterEpoch,
    ReduceOnPlateau,
    StepSchedule,
    clip_grad_norm,
    make_schedule,
    schedule_from_state_dict,
)
from tolerances import gamma

EXACT = {"rel": 1e-15, "abs": 0.0}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-15, abs_tol=1e-300)


# --------------------------------------------------------------------------- closed forms


def test_constant():
    s = ConstantSchedule()
    assert [s.factor_at(k, epoch=e) for k, e in ((0, 0), (10**6, 99))] == [1.0, 1.0]
    assert s.lr_at(123, base_lr=0.3) == 0.3


def test_step_values():
    s = StepSchedule(step_size=30, gamma=0.5)
    steps = [0, 29, 30, 59, 60, 99]
    assert [s.factor_at(k) for k in steps] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]
    assert s.lr_at(60, base_lr=0.1) == pytest.approx(0.025, **EXACT)


# No optimizer.step() between scheduler steps (nothing to optimize): torch warns about the order.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_step_matches_torch_step_lr():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.3)
    ours = StepSchedule(step_size=7, gamma=0.3)
    for step in range(40):
        expected = optimizer.param_groups[0]["lr"]
        assert ours.lr_at(step, base_lr=0.1) == pytest.approx(expected, **EXACT), step
        reference.step()


@pytest.mark.parametrize(
    "decay, epochs_at_full_lr, expected",
    [
        # SmallConfig: lr 1.0, max_epoch 4, lr_decay 0.5, 13 epochs
        (0.5, 4, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 0.5, 5: 0.25, 6: 0.125, 12: 0.001953125}),
        # MediumConfig: max_epoch 6, lr_decay 0.8, 39 epochs
        (0.8, 6, {5: 1.0, 6: 0.8, 7: 0.64, 8: 0.512, 38: 0.8**33}),
        # LargeConfig: max_epoch 14, lr_decay 1 / 1.15, 55 epochs
        (1 / 1.15, 14, {13: 1.0, 14: 1 / 1.15, 15: 1 / 1.15**2, 54: 1.15**-41}),
    ],
)
def test_zaremba_ptb_schedules(decay, epochs_at_full_lr, expected):
    s = ExponentialAfterEpoch(decay=decay, epochs_at_full_lr=epochs_at_full_lr)
    for epoch, lr in expected.items():
        assert s.lr_at(step=0, epoch=epoch, base_lr=1.0) == pytest.approx(lr, **EXACT), epoch
        assert s.lr_at(step=10**5, epoch=epoch) == s.lr_at(step=0, epoch=epoch)  # epoch only


def test_cosine_with_warmup_values():
    s = CosineWithWarmup(total_steps=110, warmup_steps=10, min_factor=0.1)
    expected = {
        0: 0.1,  # 1 / warmup_steps
        4: 0.5,
        9: 1.0,  # end of warm-up
        10: 1.0,  # start of the cosine
        35: 0.1 + 0.9 * (1 + 0.7071067811865476) / 2,  # a quarter: cos(pi / 4)
        60: 0.55,  # midpoint: (1 + min) / 2
        85: 0.1 + 0.9 * (1 - 0.7071067811865476) / 2,
        110: 0.1,  # end: min_factor
        500: 0.1,  # after the end
    }
    for step, factor in expected.items():
        assert s.factor_at(step) == pytest.approx(factor, rel=1e-15), step


def test_cosine_without_warmup():
    s = CosineWithWarmup(total_steps=100)
    assert [s.factor_at(k) for k in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-16)


def test_validation():
    with pytest.raises(ValueError):
        CosineWithWarmup(total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError):
        StepSchedule(step_size=0)
    with pytest.raises(ValueError):
        ExponentialAfterEpoch(decay=0.0, epochs_at_full_lr=1)
    with pytest.raises(ValueError, match="factor"):
        ReduceOnPlateau(factor=1.0)
    with pytest.raises(ValueError, match="mode"):
        ReduceOnPlateau(mode="lowest")


# --------------------------------------------------------------------------- optimizers


def test_apply_respects_per_group_base_lrs():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.02}], lr=1.0)
    s = StepSchedule(step_size=10, gamma=0.5)
    assert s.apply(optimizer, step=0) == [0.1, 0.02]
    assert s.apply(optimizer, step=10) == [0.05, 0.01]
    assert s.apply(optimizer, step=10) == [0.05, 0.01]  # no compounding
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.01]
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.1, 0.02]

    # initial_lr travels with the optimizer's state_dict, so a resumed run keeps its base rates
    restored = torch.optim.SGD([{"params": [a], "lr": 9.0}, {"params": [b], "lr": 9.0}])
    restored.load_state_dict(optimizer.state_dict())
    assert s.apply(restored, step=25) == [0.025, 0.005]

    # a group added later takes its current lr as its base rate
    optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.4})
    assert s.apply(optimizer, step=20) == [0.025, 0.005, 0.1]


# --------------------------------------------------------------------------- plateau vs torch


def _metric_sequence(mode: str) -> list[float]:
    """A noisy loss that falls, then flattens (plateaus trigger reductions); one NaN inside."""
    rng = np.random.default_rng(0)
    t = np.arange(90)
    loss = np.maximum(0.6, 2.0 * np.exp(-t / 8.0)) + 0.004 * rng.standard_normal(len(t))
    values = (loss if mode == "min" else 1.0 - loss / 3.0).tolist()
    values[40] = float("nan")
    return values


PLATEAU_CONFIGS = [
    dict(mode="min", factor=0.5, patience=2, threshold=1e-4, cooldown=0),
    dict(mode="min", factor=0.1, patience=3, threshold=1e-2, cooldown=2, min_factor=1e-3),
    dict(mode="min", factor=0.7, patience=1, threshold=0.01, threshold_mode="abs", cooldown=1),
    dict(mode="max", factor=0.5, patience=2, threshold=1e-3, cooldown=1, min_factor=0.05),
    dict(mode="max", factor=0.3, patience=0, threshold=0.002, threshold_mode="abs"),
]


def _torch_plateau(optimizer, config: dict, base_lr: float):
    kwargs = dict(config)
    min_lr = kwargs.pop("min_factor", 0.0) * base_lr
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, min_lr=min_lr, **kwargs)


@pytest.mark.parametrize("config", PLATEAU_CONFIGS)
def test_plateau_matches_torch(config):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = _torch_plateau(optimizer, config, base_lr=1.0)
    ours = ReduceOnPlateau(**config)
    seen = set()
    for metric in _metric_sequence(config["mode"]):
        reference.step(metric)
        factor = ours.observe(metric)
        # base rate 1.0: the same multiplications in the same order, so exactly equal
        assert factor == optimizer.param_groups[0]["lr"]
        assert ours.num_bad == reference.num_bad_epochs
        assert ours.cooldown_counter == reference.cooldown_counter
        assert ours.best == reference.best or (
            math.isinf(ours.best) and ours.best == reference.best
        )
        seen.add(factor)
    assert len(seen) >= 3  # the sequence did exercise reductions


def test_plateau_applies_per_group_like_torch():
    config = PLATEAU_CONFIGS[1]
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    torch_opt = torch.optim.SGD([{"params": [params[0]], "lr": 0.3}, {"params": [params[1]]}], 0.05)
    our_opt = torch.optim.SGD([{"params": [params[0]], "lr": 0.3}, {"params": [params[1]]}], 0.05)
    kwargs = dict(config)
    min_factor = kwargs.pop("min_factor")
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        torch_opt, min_lr=[0.3 * min_factor, 0.05 * min_factor], **kwargs
    )
    ours = ReduceOnPlateau(**config)
    for step, metric in enumerate(_metric_sequence("min")):
        reference.step(metric)
        ours.observe(metric)
        lrs = ours.apply(our_opt, step)
        expected = [g["lr"] for g in torch_opt.param_groups]
        assert all(_close(a, b) for a, b in zip(lrs, expected)), (step, lrs, expected)
    assert lrs[0] < 0.3 * 0.01  # reduced at least twice


def test_plateau_state_round_trips_through_json_midway():
    metrics = _metric_sequence("min")
    config = PLATEAU_CONFIGS[1]
    uninterrupted = ReduceOnPlateau(**config)
    first = ReduceOnPlateau(**config)
    for m in metrics[:30]:
        uninterrupted.observe(m)
        first.observe(m)
    assert first.cooldown_counter > 0 or first.num_bad > 0  # a state worth saving
    text = json.dumps(first.state_dict(), allow_nan=False)
    resumed = schedule_from_state_dict(json.loads(text))
    assert resumed == first
    for m in metrics[30:]:
        assert resumed.observe(m) == uninterrupted.observe(m)
    assert resumed == uninterrupted


# --------------------------------------------------------------------------- state and registry

SCHEDULES = [
    ("constant", {}),
    ("step", {"step_size": 5, "gamma": 0.3}),
    ("exp-after-epoch", {"decay": 0.5, "epochs_at_full_lr": 4}),
    ("cosine", {"total_steps": 100, "warmup_steps": 10, "min_factor": 0.05}),
    ("plateau", {"factor": 0.5, "patience": 1, "mode": "max", "cooldown": 1}),
]


@pytest.mark.parametrize("name, kwargs", SCHEDULES)
def test_state_dict_round_trips_through_json(name, kwargs):
    schedule = make_schedule(name, **kwargs)
    if isinstance(schedule, ReduceOnPlateau):
        for metric in (0.5, 0.4, 0.4, 0.4):
            schedule.observe(metric)
        assert schedule.factor_at(0) == 0.5
    state = json.loads(json.dumps(schedule.state_dict(), allow_nan=False))
    assert state["name"] == name and state["config"] == {**schedule.config()}
    rebuilt = schedule_from_state_dict(state)
    assert type(rebuilt) is type(schedule) and rebuilt == schedule
    probes = [(0, 0), (7, 3), (60, 5), (100, 9)]
    assert [rebuilt.factor_at(k, e) for k, e in probes] == [
        schedule.factor_at(k, e) for k, e in probes
    ]


def test_load_state_dict_restores_configuration_and_checks_the_kind():
    source = StepSchedule(step_size=5, gamma=0.3)
    target = StepSchedule(step_size=100)
    target.load_state_dict(json.loads(json.dumps(source.state_dict())))
    assert target == source
    with pytest.raises(ValueError, match="'step'.*'cosine'"):
        CosineWithWarmup(total_steps=10).load_state_dict(source.state_dict())


def test_fresh_plateau_state_is_strict_json():
    state = ReduceOnPlateau().state_dict()
    assert state["state"]["best"] == "inf"  # no Infinity token in the JSON
    assert schedule_from_state_dict(json.loads(json.dumps(state, allow_nan=False))).best == math.inf


def test_make_schedule_errors():
    with pytest.raises(ValueError) as info:
        make_schedule("linear")
    for name in ("constant", "step", "exp-after-epoch", "cosine", "plateau"):
        assert name in str(info.value)
    with pytest.raises(TypeError, match="'step'"):
        make_schedule("step", step_size=3, decay=0.5)


# --------------------------------------------------------------------------- clipping


# The float32 global norm against float64 NumPy: a sum of the 5*7 + 7 + 7*3 + 3 = 66 squared
# gradients (positive terms, so the bound is relative: gamma_66), then a square root that halves
# the relative error and rounds once.
NORM_REL = gamma(66) / 2 + 2 * 2.0**-24


def _model_with_grads(scale: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    for p in model.parameters():
        p.grad = scale * torch.randn_like(p)
    return model


def _numpy_norm(params) -> float:
    """The global L2 norm of the gradients, in float64 NumPy."""
    return float(np.sqrt(sum(np.sum(p.grad.numpy().astype(np.float64) ** 2) for p in params)))


def test_clip_returns_the_global_norm_and_clips_to_max_norm():
    model = _model_with_grads(scale=3.0)
    expected = _numpy_norm(model.parameters())
    before = [p.grad.clone() for p in model.parameters()]
    max_norm = expected / 4
    norm = clip_grad_norm(model.parameters(), max_norm)
    assert isinstance(norm, float)
    assert norm == pytest.approx(expected, rel=NORM_REL)
    # Scaling each gradient rounds once more: the clipped norm within NORM_REL + u.
    assert _numpy_norm(model.parameters()) == pytest.approx(max_norm, rel=NORM_REL + 2.0**-24)
    # one common scale for every gradient: the direction is kept
    coefficient = max_norm / (norm + 1e-6)
    for p, g in zip(model.parameters(), before):
        # The coefficient's relative error (that of the norm) and one rounding of the product.
        torch.testing.assert_close(p.grad, g * coefficient, rtol=2 * NORM_REL, atol=0)


@pytest.mark.parametrize("max_norm", [None, 0, 0.0, "large"])
def test_clip_measures_without_changing_when_not_needed(max_norm):
    model = _model_with_grads(scale=0.1)
    expected = _numpy_norm(model.parameters())
    before = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm(model.parameters(), 10 * expected if max_norm == "large" else max_norm)
    assert norm == pytest.approx(expected, rel=NORM_REL)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))


def test_clip_inputs():
    model = _model_with_grads(scale=1.0)
    expected = _numpy_norm(model.parameters())
    model[0].bias.grad = None  # parameters without a gradient are skipped
    reduced = _numpy_norm([p for p in model.parameters() if p.grad is not None])
    assert reduced < expected
    # (name, parameter) pairs, as select_parameters returns them
    assert clip_grad_norm(list(model.named_parameters()), None) == pytest.approx(
        reduced, rel=NORM_REL
    )
    assert clip_grad_norm(model[2].weight, None) == pytest.approx(
        float(np.linalg.norm(model[2].weight.grad.numpy().astype(np.float64))), rel=NORM_REL
    )
    assert clip_grad_norm([nn.Parameter(torch.zeros(2))], 1.0) == 0.0
    with pytest.raises(ValueError):
        clip_grad_norm(model.parameters(), -1.0)
