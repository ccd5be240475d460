"""``classicnets.nn.BatchNorm`` and its helpers against references we did not write.

References: ``torch.nn.BatchNorm1d/2d`` (same conventions by default), float64 NumPy (Keras 3's
documented moving-average rule, precise-BN averages), and the unfolded model for ``fold_bn``.

Tolerances: against torch.nn in float32, 1e-6 (both call the same ATen kernel, so they agree up to
float32 rounding of the same operations, usually exactly); float64 against NumPy, 1e-10; folded vs
unfolded in float64, 1e-10 (a folded weight reassociates a few products of order-1 values).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from classicnets.nn import (
    BatchNorm,
    BNFreeze,
    fold_bn,
    freeze_bn,
    is_batchnorm,
    iter_bn_buffers,
    recalibrate_bn,
)
from tolerances import gamma

# float32 comparisons against torch.nn and between layouts. Training-mode outputs depend on the
# batch statistics, sums over n <= 60 values per feature in these tests, whose relative error is
# at most gamma_n * (1 + kappa), kappa = max mean|x| / sigma <= 42 for the batches ``_batch``
# makes (steps 0-22, measured in float64 on the fixed data); a normalized value is at most
# sqrt(n - 1) in magnitude (Samuelson's inequality), and gamma <= 1.5. Two summation orders
# (ours may run another kernel, e.g. channels-last) double it. The gradients run the same sums
# backwards and get the same relative bound. Effects of the order of eps (1e-5) are the business
# of the float64 tests against NumPy (F64_TOL), not of these.
_N, _KAPPA, _GAMMA_MAX = 60, 42.0, 1.5
_REL = 2 * gamma(_N) * (1 + _KAPPA) * (1 + (_N - 1) ** 0.5)
F32_TOL = {"rtol": _REL, "atol": _REL * _GAMMA_MAX}
# float64 against NumPy's float64 formulas: n <= 60 terms of order 10 give gamma_n * 600 < 1e-11.
F64_TOL = {"rtol": 0.0, "atol": 1e-10}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _batch(shape, step: int, dtype=torch.float32, feature_axis: int = 1) -> torch.Tensor:
    """A batch whose per-feature mean and spread differ from step to step and feature to feature."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(shape, generator=g, dtype=dtype)
    c = shape[feature_axis]
    view = [1] * len(shape)
    view[feature_axis] = c
    loc = torch.linspace(-2.0, 3.0, c, dtype=dtype).view(view) + 0.5 * step
    spread = torch.linspace(0.5, 2.5, c, dtype=dtype).view(view)
    return loc + spread * x


def _set_affine(*layers, seed: int = 0) -> None:
    """Give every layer the same non-trivial gamma and beta."""
    g = torch.Generator().manual_seed(seed)
    c = layers[0].num_features
    gamma = 0.5 + torch.rand(c, generator=g, dtype=torch.float64)
    beta = torch.randn(c, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(gamma)
            layer.bias.copy_(beta)


def _assert_buffers_close(ours, theirs, **tol) -> None:
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- against torch.nn

TORCH_CASES = [
    ("NC", nn.BatchNorm1d, (16, 4)),
    ("NCL", nn.BatchNorm1d, (6, 4, 5)),
    ("NCHW", nn.BatchNorm2d, (4, 4, 3, 5)),
]


@pytest.mark.parametrize("momentum", [0.1, 0.01, None], ids=["m0.1", "m0.01", "cumulative"])
@pytest.mark.parametrize(
    ("name", "torch_cls", "shape"), TORCH_CASES, ids=[c[0] for c in TORCH_CASES]
)
def test_matches_torch_over_training_steps_then_eval(name, torch_cls, shape, momentum):
    c = shape[1]
    ours = BatchNorm(c, momentum=momentum)
    theirs = torch_cls(c, momentum=momentum)
    _set_affine(ours, theirs)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(7))  # a fixed loss weighting

    for step in range(5):
        x = _batch(shape, step)
        x_ours = x.clone().requires_grad_()
        x_theirs = x.clone().requires_grad_()
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        torch.testing.assert_close(y_ours, y_theirs, **F32_TOL)
        _assert_buffers_close(ours, theirs, **F32_TOL)

        (w * y_ours).sum().backward()
        (w * y_theirs).sum().backward()
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, **F32_TOL)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **F32_TOL)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **F32_TOL)
        ours.zero_grad()
        theirs.zero_grad()
    assert int(ours.num_batches_tracked) == 5

    ours.eval()
    theirs.eval()
    for step in range(5, 7):
        x = _batch(shape, step)
        torch.testing.assert_close(ours(x), theirs(x), **F32_TOL)
    _assert_buffers_close(ours, theirs, **F32_TOL)
    assert int(ours.num_batches_tracked) == 5


def test_running_stats_match_numpy_float64():
    # PyTorch's rule: running = (1 - momentum) * running + momentum * batch, unbiased variance.
    shape, momentum = (5, 3, 4), 0.1
    bn = BatchNorm(3, momentum=momentum, dtype=torch.float64)
    running_mean, running_var = np.zeros(3), np.ones(3)
    for step in range(4):
        x = _batch(shape, step, torch.float64)
        y = bn(x)
        x64 = x.numpy()
        mean = x64.mean(axis=(0, 2))
        biased = x64.var(axis=(0, 2))
        ref_y = (x64 - mean[None, :, None]) / np.sqrt(biased[None, :, None] + 1e-5)
        np.testing.assert_allclose(y.detach().numpy(), ref_y, **F64_TOL)
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var = (1 - momentum) * running_var + momentum * x64.var(axis=(0, 2), ddof=1)
        np.testing.assert_allclose(bn.running_mean.numpy(), running_mean, **F64_TOL)
        np.testing.assert_allclose(bn.running_var.numpy(), running_var, **F64_TOL)


def test_channels_last_axis_equals_batchnorm2d_after_permute():
    c = 3
    ours = BatchNorm(c, axis=-1)
    theirs = nn.BatchNorm2d(c)
    _set_affine(ours, theirs)
    for step in range(4):
        x_nhwc = _batch((4, 3, 5, c), step, feature_axis=3).requires_grad_()
        x_nchw = x_nhwc.detach().permute(0, 3, 1, 2).clone().requires_grad_()
        y_nhwc = ours(x_nhwc)
        y_nchw = theirs(x_nchw)
        assert y_nhwc.shape == x_nhwc.shape
        torch.testing.assert_close(y_nhwc, y_nchw.permute(0, 2, 3, 1), **F32_TOL)
        _assert_buffers_close(ours, theirs, **F32_TOL)
        y_nhwc.square().sum().backward()
        y_nchw.square().sum().backward()
        torch.testing.assert_close(x_nhwc.grad, x_nchw.grad.permute(0, 2, 3, 1), **F32_TOL)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **F32_TOL)
    ours.eval()
    theirs.eval()
    x = _batch((2, 3, 5, c), 9, feature_axis=3)
    torch.testing.assert_close(
        ours(x), theirs(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), **F32_TOL
    )


def test_decay_is_one_minus_momentum():
    by_decay = BatchNorm(4, decay=0.99)
    by_momentum = BatchNorm(4, momentum=0.01)
    assert by_decay.momentum == pytest.approx(0.01, abs=1e-15)
    assert by_momentum.decay == pytest.approx(0.99, abs=1e-15)
    for step in range(5):
        x = _batch((8, 4, 3), step)
        # 1 - 0.99 is 0.010000000000000009, not 0.01: equal up to float32 rounding.
        torch.testing.assert_close(by_decay(x), by_momentum(x), **F32_TOL)
        _assert_buffers_close(by_decay, by_momentum, **F32_TOL)
    by_decay.eval()
    by_momentum.eval()
    x = _batch((8, 4, 3), 6)
    torch.testing.assert_close(by_decay(x), by_momentum(x), **F32_TOL)


def test_momentum_and_decay_together_is_an_error():
    with pytest.raises(ValueError, match="not both"):
        BatchNorm(4, momentum=0.1, decay=0.9)
    with pytest.raises(ValueError, match="not both"):
        BatchNorm(4, momentum=None, decay=0.9)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_features": 0}, {"axis": 0}, {"eps": 0.0}, {"eps": -1e-5}, {"momentum": 0.0}]
    + [{"momentum": 1.5}, {"decay": 1.0}, {"decay": -0.1}],
)
def test_bad_constructor_arguments(kwargs):
    kwargs = {"num_features": 4, **kwargs}
    with pytest.raises(ValueError):
        BatchNorm(**kwargs)


def test_tensorflow_defaults():
    bn = BatchNorm.tensorflow(5)
    assert bn.eps == pytest.approx(1e-3)
    assert bn.momentum == pytest.approx(0.01, abs=1e-15)
    assert bn.decay == pytest.approx(0.99, abs=1e-15)
    assert bn.axis == -1
    assert bn.unbiased_running_var
    assert not BatchNorm.tensorflow(5, unbiased_running_var=False).unbiased_running_var
    assert BatchNorm.tensorflow(5, momentum=0.2).momentum == pytest.approx(0.2)


@pytest.mark.parametrize("unbiased", [False, True], ids=["keras3-biased", "fused-unbiased"])
def test_tensorflow_running_statistics_follow_keras_rule(unbiased):
    # Keras 3 BatchNormalization: moving = moving * momentum + batch * (1 - momentum) with Keras
    # momentum 0.99 and the biased batch variance; TF's fused kernel uses the unbiased one.
    c, shape, keras_momentum, eps = 3, (4, 3, 2, 3), 0.99, 1e-3
    bn = BatchNorm.tensorflow(c, unbiased_running_var=unbiased, dtype=torch.float64)
    _set_affine(bn)
    gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    moving_mean, moving_var = np.zeros(c), np.ones(c)
    for step in range(6):
        x = _batch(shape, step, torch.float64, feature_axis=3)
        y = bn(x).detach().numpy()
        x64 = x.numpy()
        mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))  # biased
        np.testing.assert_allclose(y, gamma * (x64 - mean) / np.sqrt(var + eps) + beta, **F64_TOL)
        batch_var = x64.var(axis=(0, 1, 2), ddof=1) if unbiased else var
        moving_mean = moving_mean * keras_momentum + mean * (1 - keras_momentum)
        moving_var = moving_var * keras_momentum + batch_var * (1 - keras_momentum)
        np.testing.assert_allclose(bn.running_mean.numpy(), moving_mean, **F64_TOL)
        np.testing.assert_allclose(bn.running_var.numpy(), moving_var, **F64_TOL)
    bn.eval()
    x = _batch((2, 3, 2, 3), 9, torch.float64, feature_axis=3)
    x64 = x.numpy()
    ref = gamma * (x64 - moving_mean) / np.sqrt(moving_var + eps) + beta
    np.testing.assert_allclose(bn(x).detach().numpy(), ref, **F64_TOL)


def test_no_running_stats_uses_batch_stats_in_eval_like_torch():
    ours = BatchNorm(4, track_running_stats=False)
    theirs = nn.BatchNorm1d(4, track_running_stats=False)
    assert ours.running_mean is None and ours.num_batches_tracked is None
    _set_affine(ours, theirs)
    for mode in (True, False):
        ours.train(mode)
        theirs.train(mode)
        x = _batch((8, 4), 3)
        torch.testing.assert_close(ours(x), theirs(x), **F32_TOL)


# --------------------------------------------------------------------------- state_dict


def _trained(layer: nn.Module, shape, steps: int = 3, seed: int = 0, dtype=torch.float32):
    _set_affine(layer, seed=seed)
    layer.train()
    for step in range(steps):
        layer(_batch(shape, step + 10 * seed, dtype))
    return layer


@pytest.mark.parametrize(
    ("torch_cls", "shape"),
    [(nn.BatchNorm1d, (8, 4)), (nn.BatchNorm2d, (4, 4, 3, 3))],
    ids=["1d", "2d"],
)
def test_state_dict_same_keys_and_values_as_torch(torch_cls, shape):
    ours = _trained(BatchNorm(4), shape)
    theirs = _trained(torch_cls(4), shape)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for k in sd_ours:
        assert sd_ours[k].dtype == sd_theirs[k].dtype, k
        torch.testing.assert_close(sd_ours[k], sd_theirs[k], **F32_TOL)


@pytest.mark.parametrize(
    ("torch_cls", "shape"),
    [(nn.BatchNorm1d, (8, 4)), (nn.BatchNorm2d, (4, 4, 3, 3))],
    ids=["1d", "2d"],
)
def test_state_dict_loads_both_ways(torch_cls, shape):
    x = _batch(shape, 42)
    # torch -> ours
    theirs = _trained(torch_cls(4), shape, seed=1).eval()
    ours = BatchNorm(4)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    _assert_state_equal(ours.state_dict(), theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), **F32_TOL)
    # ours -> torch
    ours = _trained(BatchNorm(4), shape, seed=2).eval()
    theirs = torch_cls(4)
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    _assert_state_equal(ours.state_dict(), theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), **F32_TOL)


def test_channels_last_state_dict_loads_into_batchnorm2d():
    ours = _trained(BatchNorm(4, axis=-1), (3, 2, 2, 4)).eval()
    theirs = nn.BatchNorm2d(4)
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    x = _batch((2, 3, 3, 4), 5, feature_axis=3)
    torch.testing.assert_close(
        ours(x), theirs(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), **F32_TOL
    )


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1, 1), (1, 4, 1)], ids=["NC", "NCHW", "NCL"])
def test_one_value_per_feature_in_training_is_an_error(shape):
    bn = _trained(BatchNorm(4), (8, 4))
    before = _snapshot(bn)
    x = torch.randn(shape)
    with pytest.raises(ValueError) as info:
        bn(x)
    message = str(info.value)
    assert "BatchNorm(" in message
    assert str(tuple(shape)) in message
    _assert_state_equal(bn.state_dict(), before)  # the failed call changed nothing

    # In inference the running statistics are used and one example is fine, as in torch.nn.
    bn.eval()
    theirs = nn.BatchNorm1d(4) if len(shape) < 4 else nn.BatchNorm2d(4)
    theirs.load_state_dict(bn.state_dict())
    theirs.eval()
    torch.testing.assert_close(bn(x), theirs(x), **F32_TOL)


def test_one_value_per_feature_channels_last():
    bn = BatchNorm(4, axis=-1)
    with pytest.raises(ValueError, match=r"BatchNorm\(4, axis=-1\).*\(1, 1, 1, 4\)"):
        bn(torch.randn(1, 1, 1, 4))


@pytest.mark.parametrize(
    ("bn", "shape"),
    [(BatchNorm(4), (8, 5)), (BatchNorm(4), (8, 3, 2, 2)), (BatchNorm(4, axis=-1), (8, 2, 2, 3))],
    ids=["NC", "NCHW", "NHWC"],
)
def test_wrong_number_of_features_is_an_error(bn, shape):
    for mode in (True, False):
        bn.train(mode)
        with pytest.raises(ValueError) as info:
            bn(torch.randn(shape))
        assert str(tuple(shape)) in str(info.value)
        assert "BatchNorm(" in str(info.value)


def test_input_without_feature_axis_is_an_error():
    with pytest.raises(ValueError, match=r"\(4,\)"):
        BatchNorm(4)(torch.randn(4))
    with pytest.raises(ValueError, match="out of range"):
        BatchNorm(4, axis=3)(torch.randn(2, 4))


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize(
    "make",
    [
        lambda: BatchNorm(4),
        lambda: BatchNorm(4, momentum=None),
        lambda: BatchNorm(4, unbiased_running_var=False),
        lambda: BatchNorm.tensorflow(4, axis=1),
    ],
    ids=["default", "cumulative", "biased", "tensorflow"],
)
def test_inference_never_changes_buffers(make):
    bn = _trained(make(), (8, 4, 3)).eval()
    before = [b.clone() for b in bn.buffers()]
    x0 = _batch((8, 4, 3), 20)
    y0 = bn(x0).detach()

    with torch.no_grad():
        for step in range(10):
            bn(_batch((8, 4, 3), 30 + step))
    for step in range(10):  # grad enabled, with a backward pass
        x = _batch((8, 4, 3), 40 + step).requires_grad_()
        bn(x).sum().backward()
    bn.requires_grad_(False)  # frozen parameters
    for step in range(10):
        bn(_batch((8, 4, 3), 50 + step).requires_grad_()).sum().backward()

    after = list(bn.buffers())
    assert len(after) == 3
    for b0, b1 in zip(before, after, strict=True):
        assert torch.equal(b0, b1)
    assert torch.equal(bn(x0), y0)  # and inference is deterministic


# --------------------------------------------------------------------------- freeze_bn


def _mlp(bn_factory) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), bn_factory(8), nn.ReLU(), nn.Linear(8, 3))


def _sgd_steps(model: nn.Module, steps: int = 10, seed: int = 0) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = 1.0 + 2.0 * torch.randn(16, 6, generator=g)
        target = torch.randn(16, 3, generator=g)
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("bn_factory", [BatchNorm, nn.BatchNorm1d], ids=["ours", "torch"])
def test_freeze_bn_keeps_buffers_while_training(bn_factory):
    model = _mlp(bn_factory)
    _sgd_steps(model, steps=3, seed=1)  # non-trivial running statistics first
    bn = model[1]
    buffers = [b.clone() for b in bn.buffers()]
    linear_weights = [model[0].weight.clone(), model[3].weight.clone()]
    gamma = bn.weight.clone()

    handle = freeze_bn(model)
    assert isinstance(handle, BNFreeze)
    assert handle.names == ["1"]
    model.train()
    assert model.training and model[0].training
    assert not bn.training

    # A frozen layer normalizes with its running statistics, like eval mode.
    x = torch.randn(5, 8)
    reference = copy.deepcopy(bn)
    nn.Module.train(reference, False)
    torch.testing.assert_close(bn(x), reference(x), rtol=0, atol=0)

    _sgd_steps(model, steps=10, seed=2)
    assert not bn.training
    for b0, b1 in zip(buffers, bn.buffers(), strict=True):
        assert torch.equal(b0, b1)
    assert not torch.equal(model[0].weight, linear_weights[0])
    assert not torch.equal(model[3].weight, linear_weights[1])
    assert not torch.equal(bn.weight, gamma)  # affine parameters still learn by default

    handle.unfreeze()
    handle.unfreeze()  # idempotent
    model.train()
    assert bn.training
    count = int(bn.num_batches_tracked)
    model(torch.randn(16, 6))
    assert int(bn.num_batches_tracked) == count + 1
    assert not torch.equal(bn.running_mean, buffers[0])
    model.eval()
    assert not bn.training


@pytest.mark.parametrize("bn_factory", [BatchNorm, nn.BatchNorm1d], ids=["ours", "torch"])
def test_freeze_affine_stops_bn_gradients(bn_factory):
    model = _mlp(bn_factory)
    bn = model[1]
    gamma, beta = bn.weight.clone(), bn.bias.clone()
    with freeze_bn(model, freeze_affine=True):
        model.train()
        assert not bn.weight.requires_grad and not bn.bias.requires_grad
        assert model[0].weight.requires_grad
        _sgd_steps(model, steps=3)
        assert bn.weight.grad is None and bn.bias.grad is None
        assert torch.equal(bn.weight, gamma) and torch.equal(bn.bias, beta)
        assert model[0].weight.grad is not None
    # Leaving the block unfreezes: gradients and running-statistics updates come back.
    assert bn.weight.requires_grad and bn.bias.requires_grad
    model.train()
    _sgd_steps(model, steps=1)
    assert bn.weight.grad is not None
    assert int(bn.num_batches_tracked) == 1


def test_freeze_bn_without_bn_is_an_error():
    with pytest.raises(ValueError, match="no batch-norm"):
        freeze_bn(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({"axis": 1}, (4, 3, 2)),
        ({"axis": -1}, (3, 2, 2, 3)),
        ({"axis": 1, "unbiased_running_var": False}, (5, 3)),
        ({"axis": -1, "unbiased_running_var": False, "momentum": None}, (2, 3, 3)),
    ],
    ids=["axis1", "axis-1", "biased", "biased-axis-1-cumulative"],
)
def test_gradcheck_training_mode(kwargs, shape):
    torch.manual_seed(0)
    bn = BatchNorm(3, eps=1e-3, dtype=torch.float64, **kwargs).train()
    x = (1.0 + 2.0 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    weight = (0.5 + torch.rand(3, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, bias):
        return torch.func.functional_call(bn, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(fn, (x, weight, bias))


def test_gradcheck_eval_mode():
    bn = _trained(BatchNorm(3, dtype=torch.float64), (6, 3), dtype=torch.float64).eval()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bn, (x,))


# --------------------------------------------------------------------------- recalibrate_bn


def _recalibration_model(bn_factory) -> nn.Sequential:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(5, 4), nn.Dropout(0.5), bn_factory(4), nn.ReLU(), nn.Linear(4, 2)
    ).double()
    _set_affine(model[2], seed=4)
    return model


@pytest.mark.parametrize(
    ("bn_factory", "ddof"),
    [
        (BatchNorm, 1),
        (lambda c: BatchNorm(c, unbiased_running_var=False), 0),
        (lambda c: BatchNorm.tensorflow(c), 1),
        (nn.BatchNorm1d, 1),
    ],
    ids=["unbiased", "biased", "tensorflow", "torch"],
)
def test_recalibrate_bn_is_exact_mean_of_batch_statistics(bn_factory, ddof):
    model = _recalibration_model(bn_factory)
    model.train()
    for step in range(3):  # arbitrary running statistics beforehand; they must not matter
        model(_batch((8, 5), step, torch.float64))
    # Dropout stays in training mode here, so recalibration must switch it off itself; the ReLU
    # is put in eval mode so that the flags to restore are mixed.
    model[3].eval()
    assert model[1].training
    flags = [m.training for m in model.modules()]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    bn = model[2]
    momentum = bn.momentum

    g = torch.Generator().manual_seed(11)
    sizes = [7, 3, 12, 5]  # unequal: the plain mean of per-batch statistics, not pooled ones
    batches = [1.5 + 2.0 * torch.randn(n, 5, generator=g, dtype=torch.float64) for n in sizes]
    used = recalibrate_bn(model, [(x, torch.zeros(len(x))) for x in batches])
    assert used == len(batches)

    # NumPy float64: the BN input is the fixed Linear layer's output (dropout off).
    w = params["0.weight"].numpy()
    b = params["0.bias"].numpy()
    hidden = [x.numpy() @ w.T + b for x in batches]
    ref_mean = np.mean([h.mean(axis=0) for h in hidden], axis=0)
    ref_var = np.mean([h.var(axis=0, ddof=ddof) for h in hidden], axis=0)
    np.testing.assert_allclose(bn.running_mean.numpy(), ref_mean, **F64_TOL)
    np.testing.assert_allclose(bn.running_var.numpy(), ref_var, **F64_TOL)
    assert int(bn.num_batches_tracked) == len(batches)

    assert [m.training for m in model.modules()] == flags
    assert bn.momentum == momentum
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k


def test_recalibrate_bn_max_batches_and_plain_tensors():
    model = _recalibration_model(BatchNorm).eval()
    batches = [_batch((6, 5), step, torch.float64) for step in range(5)]
    assert recalibrate_bn(model, iter(batches), max_batches=2) == 2
    w, b = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    hidden = [x.numpy() @ w.T + b for x in batches[:2]]
    ref = np.mean([h.mean(axis=0) for h in hidden], axis=0)
    np.testing.assert_allclose(model[2].running_mean.numpy(), ref, **F64_TOL)
    assert not any(m.training for m in model.modules())


def test_recalibrate_bn_errors():
    model = _recalibration_model(BatchNorm)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="empty"):
        recalibrate_bn(model, [])
    assert model.training
    with pytest.raises(ValueError, match="no batch-norm"):
        recalibrate_bn(nn.Sequential(nn.Linear(3, 3)), [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="no batch-norm"):
        recalibrate_bn(nn.Sequential(BatchNorm(3, track_running_stats=False)), [torch.randn(2, 3)])
    with pytest.raises(TypeError):
        recalibrate_bn(model, ["not a tensor"])
    # A failed call leaves flags, momentum and parameters as they were.
    assert [m.training for m in model.modules()] == [True] * len(list(model.modules()))
    assert model[2].momentum == pytest.approx(0.1)
    after = _snapshot(model)
    for k, _ in model.named_parameters():
        assert torch.equal(after[k], before[k]), k


@pytest.mark.parametrize("failure", ["empty", "bad-batch"])
def test_failed_recalibration_keeps_running_statistics(failure):
    model = _recalibration_model(BatchNorm)
    for step in range(3):
        model(_batch((8, 5), step, torch.float64))
    model.eval()
    before = _snapshot(model)
    batches = [_batch((8, 5), 9, torch.float64)]
    if failure == "empty":
        batches = []
    else:
        batches.append(torch.randn(8, 7, dtype=torch.float64))  # wrong width for the Linear
    with pytest.raises((ValueError, RuntimeError)):
        recalibrate_bn(model, batches)
    _assert_state_equal(model.state_dict(), before)


def test_recalibrate_bn_works_on_frozen_layers_and_keeps_them_frozen():
    model = _recalibration_model(BatchNorm)
    for step in range(3):
        model(_batch((8, 5), step, torch.float64))
    handle = freeze_bn(model)
    bn = model[2]
    batches = [_batch((8, 5), 20 + k, torch.float64) for k in range(3)]
    assert recalibrate_bn(model, batches) == 3
    assert int(bn.num_batches_tracked) == 3  # recalibrated from exactly these batches
    model.train()
    assert bn.training is False  # still frozen afterwards
    before = _snapshot(model)
    model(_batch((8, 5), 30, torch.float64))
    _assert_state_equal(model.state_dict(), before)
    handle.unfreeze()


# --------------------------------------------------------------------------- fold_bn


class _CustomForward(nn.Module):
    """Not an nn.Sequential: fold_bn has to find conv -> bn from the traced graph."""

    def __init__(self, bn_factory) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
        self.norm = bn_factory(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))  # (N, 4, H, W)
        return self.head(h.mean(dim=(2, 3)))  # (N, 2)


class _Residual(nn.Module):
    """The conv output is used twice, so its BN must not be folded; the other BN may be."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.conv(x)
        return self.norm(h) + h


FOLD_CASES = {
    "linear-ours": (lambda: nn.Sequential(nn.Linear(5, 6), BatchNorm(6), nn.ReLU()), (8, 5)),
    "linear-ours-last": (lambda: nn.Sequential(nn.Linear(5, 6), BatchNorm(6, axis=-1)), (8, 5)),
    "linear-torch": (lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (8, 5)),
    "linear-nobias": (lambda: nn.Sequential(nn.Linear(5, 6, bias=False), BatchNorm(6)), (8, 5)),
    "conv1d-ours": (lambda: nn.Sequential(nn.Conv1d(4, 6, 3), BatchNorm(6)), (4, 4, 9)),
    "conv1d-groups-torch": (
        lambda: nn.Sequential(nn.Conv1d(4, 6, 3, groups=2), nn.BatchNorm1d(6)),
        (4, 4, 9),
    ),
    "conv2d-torch": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)), (3, 3, 6, 6)),
    "conv2d-groups-ours": (
        lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, bias=False), BatchNorm(6)),
        (3, 4, 6, 6),
    ),
    "convT2d-ours": (
        lambda: nn.Sequential(nn.ConvTranspose2d(3, 6, 3, stride=2), BatchNorm(6)),
        (3, 3, 4, 4),
    ),
    "convT2d-groups-torch": (
        lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)),
        (3, 4, 4, 4),
    ),
    "convT2d-groups-ours": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 1), nn.ConvTranspose2d(4, 6, 2, groups=2, bias=False), BatchNorm(6)
        ),
        (3, 2, 4, 4),
    ),
    "custom-forward-torch": (lambda: _CustomForward(nn.BatchNorm2d), (3, 3, 5, 5)),
    "custom-forward-ours": (lambda: _CustomForward(BatchNorm), (3, 3, 5, 5)),
    "nested": (
        lambda: nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
            nn.Sequential(nn.Conv2d(4, 4, 1), BatchNorm(4)),
        ),
        (2, 3, 6, 6),
    ),
}


def _prepare_for_folding(model: nn.Module, input_shape) -> nn.Module:
    model = model.double()
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if is_batchnorm(m):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    model.train()
    for step in range(3):  # non-trivial running statistics
        x = 0.5 * step + (1.0 + step) * torch.randn(input_shape, generator=g, dtype=torch.float64)
        model(x)
    return model.eval()


@pytest.mark.parametrize(
    "case",
    list(FOLD_CASES),
)
def test_fold_bn_equals_unfolded(case):
    make, input_shape = FOLD_CASES[case]
    model = _prepare_for_folding(make(), input_shape)
    before = _snapshot(model)
    modules_before = [type(m) for m in model.modules()]
    bn_paths = [n for n, m in model.named_modules() if is_batchnorm(m)]
    assert len(list(iter_bn_buffers(model))) == 3 * len(bn_paths)
    for m in model.modules():  # the running statistics are not the initial ones
        if is_batchnorm(m):
            assert int(m.num_batches_tracked) == 3
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))

    folded = fold_bn(model)
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), **F64_TOL)
    assert not folded.training
    for path in bn_paths:
        assert isinstance(folded.get_submodule(path), nn.Identity), path
    assert not any(is_batchnorm(m) for m in folded.modules())

    # The original is untouched.
    assert [type(m) for m in model.modules()] == modules_before
    _assert_state_equal(model.state_dict(), before)


def test_fold_bn_leaves_shared_outputs_alone():
    model = _prepare_for_folding(_Residual(), (2, 4, 3, 3))
    folded = fold_bn(model)
    assert isinstance(folded.norm, nn.BatchNorm2d)
    assert torch.equal(folded.conv.weight, model.conv.weight)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), **F64_TOL)


def test_fold_bn_leaves_unfoldable_bn():
    # BN after a ReLU has no affine producer: it stays, in inference mode.
    model = _prepare_for_folding(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), BatchNorm(4)), (6, 3))
    folded = fold_bn(model)
    assert isinstance(folded[2], BatchNorm) and not folded[2].training
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), **F64_TOL)


def test_fold_bn_in_training_mode_is_an_error():
    model = nn.Sequential(nn.Linear(3, 4), BatchNorm(4))
    with pytest.raises(ValueError, match="eval"):
        fold_bn(model)
    model.eval()
    model[0].train()  # any module in training mode
    with pytest.raises(ValueError, match="eval"):
        fold_bn(model)
