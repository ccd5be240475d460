"""The shared training machinery: schedules in the loop, clipping, precision and compilation
switches, several optimizers in one checkpoint, non-finite losses, signals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from classicnets.models import MLP
from classicnets.train.checkpoint import list_checkpoints, load_checkpoint
from classicnets.train.classifier import train_classifier
from classicnets.train.faults import SignalGuard, StopRequested
from classicnets.train.loop import NonFiniteLossError
from classicnets.train.params import param_groups, select_parameters
from classicnets.train.precision import Precision
from classicnets.train.run import RunDir
from classicnets.train.settings import ClassificationData, TrainSettings, make_optimizer
from classicnets.train.state import TrainState


def _data(n=480, seed=0) -> ClassificationData:
    """A learnable toy problem: the class is the argmax of 10 fixed projections of the image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n + 160, 1, 8, 8, generator=g)
    w = torch.randn(64, 10, generator=g)
    y = (x.reshape(len(x), -1) @ w).argmax(dim=1)
    return ClassificationData(x[:n], y[:n], x[n:], y[n:])


def _model(norm="batchnorm") -> MLP:
    torch.manual_seed(0)
    return MLP(in_features=64, hidden_sizes=(32, 16), activation="relu", norm=norm)


def _settings(**kw) -> TrainSettings:
    base = dict(
        steps=40, batch_size=16, lr=0.1, eval_every=20, log_every=5, checkpoint_every=10,
        progress=False,
    )  # fmt: skip
    base.update(kw)
    return TrainSettings(**base)


def _records(run: RunDir, split="train"):
    return [r for r in run.read_metrics() if r["split"] == split]


def test_logged_learning_rates_follow_the_schedule(tmp_path):
    run = RunDir(tmp_path)
    settings = _settings(schedule="step", lr_step_every=10, lr_gamma=0.5)
    train_classifier(_model(), _data(), settings, run)
    # The lr logged at step s is the rate of the step just taken (0-based step s - 1).
    for r in _records(run):
        assert r["lr"] == pytest.approx(0.1 * 0.5 ** ((r["step"] - 1) // 10), rel=1e-12)


def test_cosine_and_exp_after_epoch_in_the_loop(tmp_path):
    run = RunDir(tmp_path / "cos")
    train_classifier(_model(), _data(), _settings(schedule="cosine", warmup_steps=5), run)
    lrs = {r["step"]: r["lr"] for r in _records(run)}
    assert lrs[5] == pytest.approx(0.1 * 5 / 5)  # step index 4: last warm-up step
    k = 39  # last step index: cos(pi * 34 / 35)
    assert lrs[40] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * (k - 5) / 35)))
    run = RunDir(tmp_path / "exp")
    # 480 examples / 16 = 30 steps per epoch: epoch 0 at full rate, then halved (Zaremba).
    settings = _settings(schedule="exp-after-epoch", lr_decay=0.5, epochs_at_full_lr=1)
    train_classifier(_model(), _data(), settings, run)
    lrs = {r["step"]: r["lr"] for r in _records(run)}
    assert lrs[30] == pytest.approx(0.1) and lrs[35] == pytest.approx(0.05)


def test_clipping_logs_the_norm_and_bounds_the_update(tmp_path):
    run = RunDir(tmp_path)
    train_classifier(_model(), _data(), _settings(clip_grad_norm=1e-3, lr=1.0), run)
    norms = [r["grad_norm"] for r in _records(run)]
    assert all(n > 1e-3 for n in norms)  # pre-clip norms are logged, and exceed the bound here


@pytest.mark.parametrize(
    "momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 5e-4), (0.9, True, 0.0)]
)
def test_loop_sgd_is_bit_identical_to_the_single_tensor_sgd(momentum, nesterov, weight_decay):
    """The loop's multi-tensor SGD (``make_optimizer``) and torch's per-parameter loop give the
    same weights bit for bit over 30 steps, so figures recorded before the switch still hold."""
    data = _data()
    settings = _settings(
        steps=30, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, lr=0.05
    )
    results = []
    for foreach in (True, False):
        model = _model()
        optimizer = make_optimizer(param_groups(model, weight_decay=weight_decay), settings)
        assert optimizer.defaults["foreach"] is True
        if not foreach:
            for group in optimizer.param_groups:
                group["foreach"] = False
        g = torch.Generator().manual_seed(1)
        for _ in range(settings.steps):
            index = torch.randint(0, len(data.train_x), (16,), generator=g)
            loss = nn.functional.cross_entropy(model(data.train_x[index]), data.train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        results.append(model.state_dict())
    fast, slow = results
    assert fast.keys() == slow.keys()
    for name in fast:
        assert torch.equal(fast[name], slow[name]), name
    assert not torch.equal(fast["head.weight"], _model().state_dict()["head.weight"])


def test_weight_decay_spares_batchnorm_and_bias():
    """One SGD step from the same start with and without decay: weights differ, BN parameters
    and biases are bit-identical (they are in the no-decay group)."""
    models = []
    for weight_decay in (0.0, 0.5):
        model = _model()
        settings = _settings(steps=1, eval_every=1, log_every=1, weight_decay=weight_decay)
        train_classifier(model, _data(), settings)
        models.append(dict(model.named_parameters()))
    plain, decayed = models
    for name in plain:
        no_decay = name.endswith("bias") or ".norm." in name
        assert torch.equal(plain[name], decayed[name]) == no_decay, name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu_and_saves_the_scaler(tmp_path, precision):
    run = RunDir(tmp_path)
    result = train_classifier(_model(), _data(), _settings(precision=precision), run)
    assert math.isfinite(result["test_loss"]) and result["test_accuracy"] > 0.2
    _, state = load_checkpoint(list_checkpoints(run.checkpoints, "model")[-1][1])
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0  # GradScaler state is part of the checkpoint
    else:
        assert state["scaler"] == {}
    p = Precision(precision, "cpu")
    with p.autocast():
        out = nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def test_channels_last_conv_model_equals_default_layout():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)  # C > 1: the layouts differ
            self.head = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))

    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = Conv()
        r = train_classifier(model, _data(), _settings(steps=10, channels_last=channels_last))
        nhwc = model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
        results.append((r["test_loss"], nhwc))
    assert results[1][1] and not results[0][1]
    # Same math in another memory order: equal to float32 rounding.
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-4)


@pytest.mark.slow
def test_torch_compile_trains_like_eager_on_cpu():
    torch.manual_seed(0)
    eager = train_classifier(_model("none"), _data(), _settings(steps=10))
    torch.manual_seed(0)
    compiled = train_classifier(_model("none"), _data(), _settings(steps=10, compile=True))
    # Inductor fuses differently: equal to float32 rounding, not bit for bit.
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-4)


def test_two_optimizers_state_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"generator": nn.Linear(3, 5), "discriminator": nn.Sequential(nn.Linear(5, 1))}
    )
    g_params = [p for _, p in select_parameters(model, "generator")]
    d_params = [p for _, p in select_parameters(model, "discriminator")]
    g_opt, d_opt = torch.optim.Adam(g_params, lr=1e-2), torch.optim.SGD(d_params, 0.1, 0.9)

    def step():
        z = torch.randn(8, 3)
        d_opt.zero_grad()
        model["discriminator"](model["generator"](z).detach()).mean().backward()
        d_opt.step()
        g_opt.zero_grad()
        (-model["discriminator"](model["generator"](z)).mean()).backward()
        g_opt.step()

    for _ in range(3):
        step()
    state = TrainState({"gan": model}, {"generator": g_opt, "discriminator": d_opt})
    state.step = 3
    path = state.save(tmp_path, "gan")
    torch.manual_seed(123)
    step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    # A fresh model and optimizers restored from the checkpoint take the same 4th step.
    torch.manual_seed(7)
    model2 = nn.ModuleDict(
        {"generator": nn.Linear(3, 5), "discriminator": nn.Sequential(nn.Linear(5, 1))}
    )
    g2 = torch.optim.Adam(model2["generator"].parameters(), lr=0.5)
    d2 = torch.optim.SGD(model2["discriminator"].parameters(), 0.7, 0.1)
    restored = TrainState({"gan": model2}, {"generator": g2, "discriminator": d2})
    restored.restore(*load_checkpoint(path))
    assert restored.step == 3 and g2.param_groups[0]["lr"] == 1e-2
    model, g_opt, d_opt = model2, g2, d2
    torch.manual_seed(123)
    step()
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k


class _NaNAt(nn.Module):
    """Wraps a model and returns NaN logits at one training call (a diverging step)."""

    def __init__(self, model, at_call):
        super().__init__()
        self.model, self.at_call, self.calls = model, at_call, 0

    def forward(self, x):
        out = self.model(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at_call:
                return out * float("nan")
        return out


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    model = _NaNAt(_model(), at_call=13)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 13"):
        train_classifier(model, _data(), _settings(log_every=20), run)
    steps = [s for s, _ in list_checkpoints(run.checkpoints, "model")]
    assert steps == [10]  # checkpoint_every=10: the one before the NaN, and nothing after
    tensors, state = load_checkpoint(list_checkpoints(run.checkpoints, "model")[-1][1])
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model."))


def test_signal_guard_turns_sigterm_into_a_flag():
    import os
    import signal

    with SignalGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.received == "SIGTERM"
    exc = StopRequested("SIGTERM", 7, "/x/checkpoints/a.json")
    assert exc.exit_code == 143 and "at step 7" in str(exc)


def test_checkpoint_state_is_json(tmp_path):
    run = RunDir(tmp_path)
    train_classifier(_model(), _data(), _settings(schedule="plateau"), run)
    record = json.loads(list_checkpoints(run.checkpoints, "model")[-1][1].read_text())
    assert record["state"]["schedules"]["lr"]["name"] == "plateau"
