"""Parameter selection, optimizer groups and freezing (``classicnets.train.params``).

References: parameter names written out by hand from the models' definitions, and torch's own
optimizers (SGD's weight decay ``p -= lr * wd * p`` on a zero gradient, exact in float64 up to
one rounding: tolerance 1e-15 relative) to check that the groups do what they say.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from classicnets.nn import BatchNorm
from classicnets.train.params import (
    ParameterSelectionError,
    freeze,
    no_decay_names,
    param_groups,
    select_parameters,
    unfreeze,
)


class SmallNet(nn.Module):
    """Linear + classicnets BatchNorm + torch BatchNorm1d + LayerNorm, with known names."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn1 = BatchNorm(8)
        self.fc2 = nn.Linear(8, 8, bias=False)
        self.bn2 = nn.BatchNorm1d(8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.ln(self.bn2(self.fc2(x))))
        return self.head(x)


ALL_NAMES = [
    "fc1.weight",
    "fc1.bias",
    "bn1.weight",
    "bn1.bias",
    "fc2.weight",
    "bn2.weight",
    "bn2.bias",
    "ln.weight",
    "ln.bias",
    "head.weight",
    "head.bias",
]
DECAYED = ["fc1.weight", "fc2.weight", "head.weight"]
NOT_DECAYED = [n for n in ALL_NAMES if n not in DECAYED]


def _names(pairs) -> list[str]:
    return [n for n, _ in pairs]


def _gan() -> nn.ModuleDict:
    torch.manual_seed(0)
    generator = nn.Sequential(
        nn.Linear(3, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)
    )
    discriminator = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    return nn.ModuleDict({"generator": generator, "discriminator": discriminator})


def _snapshot(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


# --------------------------------------------------------------------------- selection


def test_names_are_as_written():
    assert _names(SmallNet().named_parameters()) == ALL_NAMES


@pytest.mark.parametrize(
    "patterns, expected",
    [
        ("*.bias", ["fc1.bias", "bn1.bias", "bn2.bias", "ln.bias", "head.bias"]),
        ("bn*", ["bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"]),
        ("fc?.weight", ["fc1.weight", "fc2.weight"]),
        (["head.*", "fc1.*"], ["fc1.weight", "fc1.bias", "head.weight", "head.bias"]),
        # overlapping patterns: each parameter once, in named_parameters order
        (
            ["*.weight", "fc1.*"],
            ["fc1.weight", "fc1.bias", "bn1.weight", "fc2.weight", "bn2.weight", "ln.weight"]
            + ["head.weight"],
        ),
        ("*", ALL_NAMES),
    ],
)
def test_glob_patterns(patterns, expected):
    assert _names(select_parameters(SmallNet(), patterns)) == expected


def test_module_name_patterns():
    inner = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model = nn.Sequential(nn.Linear(3, 3), inner, *[nn.Linear(3, 3) for _ in range(9)])
    expected_inner = ["1.0.weight", "1.0.bias", "1.1.weight", "1.1.bias"]
    # "1" names a module: everything under "1.", but not "10.weight" (a name, not a prefix)
    assert _names(select_parameters(model, "1")) == expected_inner
    assert _names(select_parameters(model, "1.1")) == ["1.1.weight", "1.1.bias"]
    # a module-path glob selects everything under each module it matches
    assert _names(select_parameters(model, "1.?")) == expected_inner
    assert _names(select_parameters(model, "1?")) == ["10.weight", "10.bias"]


def test_returns_the_parameter_objects():
    model = SmallNet()
    ((name, param),) = select_parameters(model, "head.weight")
    assert name == "head.weight" and param is model.head.weight


def test_exclusion():
    model = SmallNet()
    assert _names(select_parameters(model, "*", exclude="*.bias")) == [
        "fc1.weight",
        "bn1.weight",
        "fc2.weight",
        "bn2.weight",
        "ln.weight",
        "head.weight",
    ]
    assert _names(select_parameters(model, ["fc1", "head"], exclude=["head"])) == [
        "fc1.weight",
        "fc1.bias",
    ]


def test_pattern_matching_nothing_is_an_error_naming_it_and_listing_modules():
    with pytest.raises(ParameterSelectionError) as info:
        select_parameters(SmallNet(), ["head", "genrator"])
    message = str(info.value)
    assert "'genrator'" in message
    for module in ("fc1", "bn1", "fc2", "bn2", "ln", "head"):
        assert module in message
    assert isinstance(info.value, ValueError)


def test_error_lists_at_most_ten_modules():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(25)])
    with pytest.raises(ParameterSelectionError, match=r"0, 1, 2, .*, 9, \.\.\. \(15 more\)"):
        select_parameters(model, "encoder")


def test_exclude_matching_nothing_is_an_error():
    with pytest.raises(ParameterSelectionError, match="'*.bais'"):
        select_parameters(SmallNet(), "*", exclude="*.bais")


def test_empty_selection_is_an_error():
    with pytest.raises(ParameterSelectionError, match="select no parameter"):
        select_parameters(SmallNet(), "head", exclude="head.*")
    with pytest.raises(ParameterSelectionError):
        select_parameters(SmallNet(), [])


# --------------------------------------------------------------------------- weight decay


def test_no_decay_names():
    assert no_decay_names(SmallNet()) == set(NOT_DECAYED)


def test_no_decay_includes_rnn_biases_and_group_norm():
    model = nn.ModuleDict({"rnn": nn.LSTM(3, 4), "gn": nn.GroupNorm(2, 4)})
    assert no_decay_names(model) == {"rnn.bias_ih_l0", "rnn.bias_hh_l0", "gn.weight", "gn.bias"}


def test_default_groups_split_off_norm_and_bias():
    model = SmallNet()
    groups = param_groups(model, weight_decay=1e-4, lr=0.1)
    by_name = {n: p for n, p in model.named_parameters()}
    assert [g["name"] for g in groups] == ["default", "default/no_decay"]
    assert groups[0]["params"] == [by_name[n] for n in DECAYED]
    assert groups[1]["params"] == [by_name[n] for n in NOT_DECAYED]
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (1e-4, 0.0)
    assert groups[0]["lr"] == groups[1]["lr"] == 0.1


def test_decay_norm_and_bias_keeps_one_group():
    groups = param_groups(SmallNet(), weight_decay=1e-4, decay_norm_and_bias=True)
    assert [g["name"] for g in groups] == ["default"]
    assert len(groups[0]["params"]) == len(ALL_NAMES)
    assert "lr" not in groups[0]  # lr=None leaves the optimizer's argument in charge


def test_zero_weight_decay_is_not_split():
    assert [g["name"] for g in param_groups(SmallNet())] == ["default"]


def test_specs_with_options_and_default_rest():
    model = SmallNet()
    groups = param_groups(
        model,
        [
            {"params": "head", "lr": 0.01, "name": "head"},
            {"params": ["bn*"], "momentum": 0.5},
            {"params": "fc*", "exclude": "fc1.bias", "weight_decay": 0.0, "name": "fc"},
        ],
        weight_decay=1e-3,
        lr=0.1,
    )
    summary = [
        (g["name"], [n for n, p in model.named_parameters() if any(p is q for q in g["params"])])
        for g in groups
    ]
    assert summary == [
        ("head", ["head.weight"]),
        ("head/no_decay", ["head.bias"]),
        # every parameter of this spec is a BN parameter: only the no_decay half exists
        ("group1/no_decay", ["bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"]),
        ("fc", ["fc1.weight", "fc2.weight"]),  # weight_decay 0: not split
        ("default/no_decay", ["fc1.bias", "ln.weight", "ln.bias"]),
    ]
    options = {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in groups}
    assert options["head"] == {"name": "head", "lr": 0.01, "weight_decay": 1e-3}
    assert options["head/no_decay"] == {"name": "head/no_decay", "lr": 0.01, "weight_decay": 0.0}
    assert options["group1/no_decay"]["momentum"] == 0.5
    assert options["fc"]["weight_decay"] == 0.0 and options["fc"]["lr"] == 0.1


def test_overlapping_specs_are_an_error_naming_the_parameter():
    with pytest.raises(ParameterSelectionError, match="'fc1.weight'.*'a'.*'b'"):
        param_groups(
            SmallNet(), [{"params": "fc1", "name": "a"}, {"params": "*.weight", "name": "b"}]
        )


def test_spec_errors():
    with pytest.raises(ParameterSelectionError, match="'nothing'"):
        param_groups(SmallNet(), [{"params": "nothing"}])
    with pytest.raises(ValueError, match="no 'params'"):
        param_groups(SmallNet(), [{"lr": 0.1}])
    with pytest.raises(ValueError, match="same names|share the names"):
        param_groups(SmallNet(), [{"params": "fc1", "name": "x"}, {"params": "fc2", "name": "x"}])


@pytest.mark.parametrize("make_optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_optimizers_accept_the_groups_and_step(make_optimizer):
    torch.manual_seed(0)
    model = SmallNet()
    groups = param_groups(
        model, [{"params": "head", "lr": 1e-3, "name": "head"}], weight_decay=1e-4
    )
    optimizer = make_optimizer(groups, lr=0.05)
    assert [g["name"] for g in optimizer.param_groups] == [
        "head",
        "head/no_decay",
        "default",
        "default/no_decay",
    ]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3, 0.05, 0.05]
    # Inference mode: with batch statistics, BN would cancel fc1.bias's gradient (to rounding),
    # and a parameter that does not move would prove nothing.
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ALL_NAMES
    assert optimizer.state_dict()["param_groups"][0]["name"] == "head"  # kept in checkpoints


def test_sgd_decays_exactly_the_decayed_group():
    # With a zero gradient, SGD's step is p <- p - lr * wd * p: only decayed parameters move.
    torch.manual_seed(0)
    model = SmallNet().double()
    lr, wd = 0.5, 0.1
    optimizer = torch.optim.SGD(param_groups(model, weight_decay=wd), lr=lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    params = dict(model.named_parameters())
    for n in DECAYED:
        torch.testing.assert_close(params[n], before[n] * (1 - lr * wd), rtol=1e-15, atol=0.0)
    for n in NOT_DECAYED:
        assert torch.equal(params[n], before[n]), n


# --------------------------------------------------------------------------- two optimizers


def test_two_optimizers_touch_only_their_own_parameters():
    model = _gan()
    g_params = select_parameters(model, "generator")
    d_params = select_parameters(model, "discriminator")
    assert {n for n, _ in g_params} | {n for n, _ in d_params} == set(
        dict(model.named_parameters())
    )
    assert not {n for n, _ in g_params} & {n for n, _ in d_params}
    opt_g = torch.optim.Adam([p for _, p in g_params], lr=1e-2)
    opt_d = torch.optim.SGD([p for _, p in d_params], lr=1e-1)
    z = torch.randn(16, 3)

    def backward_through_both() -> None:
        model.zero_grad(set_to_none=True)
        model["discriminator"](model["generator"](z)).mean().backward()
        # every parameter has a gradient, so a wrong selection would move the wrong ones
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    # (1) a generator step: the discriminator is untouched
    backward_through_both()
    g_before, d_before = _snapshot(model, "generator."), _snapshot(model, "discriminator.")
    opt_g.step()
    for n, p in model.named_parameters():
        if n in d_before:
            assert torch.equal(p, d_before[n]), n
        else:
            assert not torch.equal(p, g_before[n]), n

    # (2) a discriminator step: the generator is untouched
    backward_through_both()
    g_before, d_before = _snapshot(model, "generator."), _snapshot(model, "discriminator.")
    opt_d.step()
    for n, p in model.named_parameters():
        if n in g_before:
            assert torch.equal(p, g_before[n]), n
        else:
            assert not torch.equal(p, d_before[n]), n


# --------------------------------------------------------------------------- freezing


def test_freeze_and_unfreeze():
    model = SmallNet()
    assert freeze(model, ["fc1", "bn*"]) == [
        "fc1.weight",
        "fc1.bias",
        "bn1.weight",
        "bn1.bias",
        "bn2.weight",
        "bn2.bias",
    ]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"fc1.weight", "fc1.bias", "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    model(torch.randn(8, 4)).sum().backward()
    assert all((p.grad is None) == (n in frozen) for n, p in model.named_parameters())

    assert unfreeze(model, "bn2") == ["bn2.weight", "bn2.bias"]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"fc1.weight", "fc1.bias", "bn1.weight", "bn1.bias"}
    unfreeze(model, "*")
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_errors_like_selection():
    model = SmallNet()
    with pytest.raises(ParameterSelectionError, match="'fc3'"):
        freeze(model, "fc3")
    with pytest.raises(ParameterSelectionError, match="'fc3'"):
        unfreeze(model, ["fc1", "fc3"])
    assert all(p.requires_grad for p in model.parameters())  # nothing half-done
