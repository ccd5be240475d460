"""The written-out MLP step (``train.mlp_step``) against autograd and ``torch.optim.SGD``.

Exact equality, not a tolerance: the step calls the very ATen kernels that autograd and SGD call,
on the same operands in the same memory layouts and in the same order, so no sum is re-associated
and every float32 result is the same on any machine that runs both (the comparison is always
between the two paths on one machine). Fifty steps let any difference in a gradient reach the
weights, the BN buffers and the loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from classicnets.models.mlp import MLP
from classicnets.nn import BatchNorm
from classicnets.train.classifier import ClassifierTask
from classicnets.train.mlp_step import MLPStep
from classicnets.train.settings import ClassificationData, TrainSettings

CASES = {
    "bn sigmoid (bn-mlp)": dict(norm="batchnorm"),
    "plain sigmoid, biases": dict(norm=None),
    "bn relu": dict(norm="batchnorm", activation="relu"),
    "plain tanh": dict(norm=None, activation="tanh"),
    "bn identity": dict(norm="batchnorm", activation="identity"),
    "bn cumulative average": dict(norm=lambda n: BatchNorm(n, momentum=None)),
    "bn axis=-1": dict(norm=lambda n: BatchNorm(n, axis=-1)),
}


def _pair(kwargs):
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(MLP(hidden_sizes=(32, 16), **kwargs))
    return models


def _batches(steps: int, n: int = 20):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("name", list(CASES))
def test_fifty_steps_equal_autograd_and_sgd_bit_for_bit(name):
    reference, model = _pair(CASES[name])
    sgd = torch.optim.SGD(reference.parameters(), lr=0.5, foreach=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, foreach=True)
    step = MLPStep.of(model, optimizer)
    assert step is not None
    for i, (x, y) in enumerate(_batches(50)):
        for group in (*sgd.param_groups, *optimizer.param_groups):
            group["lr"] = 0.5 / (1 + i)  # a schedule: the step reads the groups' rate each time
        logits = reference(x)
        loss = F.cross_entropy(logits, y)
        sgd.zero_grad(set_to_none=True)
        loss.backward()
        sgd.step()
        ours, our_logits = step(x, y)
        assert torch.equal(ours, loss.detach()) and torch.equal(our_logits, logits.detach()), i
    for (key, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key  # weights, BN running statistics, batch counts
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_what_it_does_not_cover_goes_through_autograd():
    model = MLP(hidden_sizes=(8,), norm="batchnorm")

    def sgd(**kw):
        return torch.optim.SGD(model.parameters(), lr=0.1, **kw)

    assert MLPStep.of(model, sgd()) is not None
    assert MLPStep.of(model, sgd(momentum=0.9)) is None
    assert MLPStep.of(model, sgd(weight_decay=1e-4)) is None
    assert MLPStep.of(model, torch.optim.Adam(model.parameters())) is None
    assert MLPStep.of(model, torch.optim.SGD(list(model.parameters())[:-1], lr=0.1)) is None
    assert MLPStep.of(MLP(hidden_sizes=(8,), activation="gelu"), sgd()) is None
    biased = MLP(hidden_sizes=(8,), norm=lambda n: BatchNorm(n, unbiased_running_var=False))
    assert MLPStep.of(biased, torch.optim.SGD(biased.parameters(), lr=0.1)) is None
    model.head.weight.requires_grad_(False)
    assert MLPStep.of(model, sgd()) is None


def test_a_hook_or_eval_mode_sends_the_step_back_to_autograd():
    model = MLP(hidden_sizes=(8,), norm="batchnorm")
    step = MLPStep.of(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert step.applies()
    handle = model.blocks[0].act.register_forward_pre_hook(lambda module, inputs: None)
    assert not step.applies()  # the written-out step would skip the hook
    handle.remove()
    model.eval()
    assert not step.applies()
    model.train()
    assert step.applies()


def _task(settings_kwargs):
    torch.manual_seed(0)
    data = ClassificationData(torch.rand(120, 1, 28, 28), torch.randint(0, 10, (120,)),
                              torch.rand(40, 1, 28, 28), torch.randint(0, 10, (40,)))  # fmt: skip
    settings = TrainSettings(steps=30, batch_size=20, lr=0.5, eval_every=10, log_every=5,
                             checkpoint_every=0, progress=False, **settings_kwargs)  # fmt: skip
    return ClassifierTask(MLP(hidden_sizes=(16,), norm="batchnorm"), data, settings)


def test_the_classifier_task_uses_it_and_mlp_step_false_turns_it_off():
    from classicnets.train.fit import fit

    on, off = _task({}), _task({"mlp_step": False})
    assert on.mlp_step is not None and off.mlp_step is None
    assert _task({"clip_grad_norm": 1.0}).mlp_step is None  # the norm is logged: autograd's
    results = [fit(task) for task in (on, off)]
    assert results[0] == {**results[1], "train_time_s": results[0]["train_time_s"]}
    for a, b in zip(on.model.state_dict().values(), off.model.state_dict().values()):
        assert torch.equal(a, b)
