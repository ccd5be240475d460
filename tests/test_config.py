"""``--set key=value`` parsing against config dataclasses."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import pytest

from classicnets.experiments import list_experiments
from classicnets.experiments.config import (
    AT_LEAST_ONE,
    CHOICES,
    RANGES,
    ConfigError,
    Range,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    numeric_fields,
    parse_value,
    validate_config,
)


@dataclass
class Demo:
    steps: int = 10
    lr: float = 0.1
    name: str = "a"
    flag: bool = False
    widths: tuple[int, ...] = (100, 100)
    limit: int | None = None

    FIELD_RANGES: ClassVar[dict[str, Range]] = {"limit": AT_LEAST_ONE, "widths": AT_LEAST_ONE}

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def test_overrides_parse_each_type():
    c = apply_overrides(
        Demo(), ["steps=2_000", "lr=1e-3", "name=x=y", "flag=true", "widths=[64, 32]", "limit=5"]
    )
    assert c == Demo(2000, 1e-3, "x=y", True, (64, 32), 5)
    assert apply_overrides(c, ["limit=none", "widths=8"]).limit is None
    assert apply_overrides(c, ["widths=8"]).widths == (8,)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("nokey", "expects key=value"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("steps=1.5", "steps='1.5': expected an integer"),
        ("lr=fast", "expected a number"),
        ("flag=maybe", "expected a boolean"),
        ("widths=1,x", "expected an integer"),
        ("limit=many", "expected an integer or none"),
        ("steps=0", "steps=0: expected a finite number >= 1"),
    ],
)
def test_bad_overrides_are_config_errors(item, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(Demo(), [item])


def test_round_trip_through_json_dict():
    c = Demo(steps=3, widths=(5, 6), limit=2)
    d = config_to_dict(c)
    assert d["widths"] == [5, 6]
    assert config_from_dict(Demo, d) == c
    with pytest.raises(ConfigError, match="unknown to Demo: zzz"):
        config_from_dict(Demo, {**d, "zzz": 1})


def test_parse_value_float_accepts_int_text():
    assert parse_value("3", float) == 3.0


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("experiment", [e.name for e in list_experiments()])
def test_every_numeric_field_of_every_experiment_has_a_range(experiment):
    (config_cls,) = [e.config_cls for e in list_experiments() if e.name == experiment]
    ranges = {**RANGES, **getattr(config_cls, "FIELD_RANGES", {})}
    missing = [name for name in numeric_fields(config_cls) if name not in ranges]
    assert missing == []
    for config in (config_cls(), config_cls.quick()):  # the documented defaults are in range
        validate_config(config)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("lr_plain=-1", "lr_plain=-1.0: expected a finite number > 0"),
        ("lr_plain=nan", "lr_plain=nan: expected a finite number > 0"),
        ("lr_bn=inf", "lr_bn=inf: expected a finite number > 0"),
        ("momentum=1", "momentum=1.0: expected in [0, 1)"),
        ("momentum=-1", "momentum=-1.0: expected in [0, 1)"),
        ("bn_eps=-1", "bn_eps=-1.0: expected a finite number > 0"),
        ("bn_eps=0", "bn_eps=0.0: expected a finite number > 0"),
        ("bn_momentum=0", "bn_momentum=0.0: expected in (0, 1]"),
        ("train_limit=0", "train_limit=0: expected a finite number >= 1"),
        ("train_limit=59", "train_limit=59: expected at least one batch (batch_size=60) or none"),
        ("checkpoint_every=-1", "checkpoint_every=-1: expected a finite number >= 0"),
        ("hidden_sizes=100,0", "hidden_sizes=0: expected a finite number >= 1"),
        ("seed=-3", "seed=-3: expected in [0, 9.22337e+18]"),
        ("weight_decay=-0.1", "weight_decay=-0.1: expected a finite number >= 0"),
    ],
)
def test_out_of_range_values_name_key_value_and_range(item, message):
    from classicnets.experiments import get_experiment

    config = get_experiment("bn-mlp").config_cls.quick()
    with pytest.raises(ConfigError) as info:
        apply_overrides(config, [item])
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("experiment", "item", "message"),
    [
        ("bn-mlp", "dataset=cifar", "dataset must be mnist or fashion-mnist, got 'cifar'"),
        ("bn-mlp", "activation=swish", "activation must be one of sigmoid, relu, tanh"),
        ("bn-mlp", "schedule=warm", "schedule must be one of constant, step, cosine"),
        ("bn-mlp", "precision=fp8", "precision must be one of fp32, bf16, fp16, got 'fp8'"),
        ("bn-mlp", "variants=plain,plain", "variants must be distinct names among plain, bn"),
        ("bn-mlp", "variants=", "variants must be distinct names among plain, bn, got nothing"),
        ("conv-ae", "norm=layer", "norm must be batchnorm or none, got 'layer'"),
        ("conv-ae", "loss=l1", "loss must be bce or mse, got 'l1'"),
        ("resnet-vs-mlp", "mlp_norm=group", "mlp_norm must be batchnorm or none"),
        ("gan", "generator_activation=elu", "generator_activation must be relu or leaky_relu"),
        ("gan", "score_samples=19", "score_samples=19: expected a finite number >= 20"),
        ("rnn-vs-lstm", "config=huge", "config must be one of small, medium, large"),
        ("rnn-vs-lstm", "variants=gru", "variants must be distinct names among lstm"),
        ("rnn-vs-lstm", "train_limit=1", "train_limit=1: expected a finite number >= 2"),
    ],
)
def test_out_of_choice_values_name_key_value_and_choices(experiment, item, message):
    from classicnets.experiments import get_experiment

    config = get_experiment(experiment).config_cls.quick()
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(config, [item])


def test_choices_agree_with_what_the_code_accepts():
    from classicnets.train.autoencoder import RECONSTRUCTION_LOSSES
    from classicnets.train.precision import PRECISIONS
    from classicnets.train.settings import TrainSettings, make_schedule_from_settings

    assert CHOICES["precision"] == tuple(PRECISIONS)
    assert CHOICES["loss"] == tuple(RECONSTRUCTION_LOSSES)
    for name in CHOICES["schedule"]:  # make_schedule_from_settings raises on any other name
        make_schedule_from_settings(TrainSettings(steps=10, batch_size=1, schedule=name))
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule_from_settings(TrainSettings(steps=10, batch_size=1, schedule="warm"))


def test_range_describes_itself():
    assert Range(0, 1, high_open=True).describe() == "in [0, 1)"
    assert not Range(0, low_open=True).admits(float("nan"))
    assert Range(-1, 1).admits(-1) and not Range(-1, 1, low_open=True).admits(-1)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"steps": "10"}, 'steps="10": expected an integer'),
        ({"steps": True}, "steps=true: expected an integer"),
        ({"lr": "fast"}, 'lr="fast": expected a number'),
        ({"widths": 5}, "widths=5: expected a list of integers"),
        ({"flag": 1}, "flag=1: expected true or false"),
        ({"limit": 0}, "limit=0: expected a finite number >= 1"),
        ({"steps": 0}, "steps=0: expected a finite number >= 1"),
    ],
)
def test_saved_config_is_checked_like_set(values, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(Demo, values)
    assert str(info.value) == message


def test_train_settings_map_explicitly():
    from classicnets.experiments import get_experiment
    from classicnets.experiments.common import train_settings

    config = get_experiment("bn-mlp").config_cls.quick()
    settings = train_settings(config, lr=0.5, nesterov=False, eval_batch_size=100)
    assert (settings.lr, settings.steps, settings.log_every) == (
        0.5,
        config.steps,
        config.log_every,
    )
    with pytest.raises(TypeError, match="has no field nesterov, eval_batch_size"):
        train_settings(config, lr=0.5)  # a field no one supplies is an error, not a default
    with pytest.raises(TypeError, match="log_evry are not TrainSettings fields"):
        train_settings(config, lr=0.5, nesterov=False, eval_batch_size=100, log_evry=5)


def test_gan_settings_map_explicitly_too():
    from classicnets.experiments.common import settings_for
    from classicnets.experiments.gan import GANConfig, _settings
    from classicnets.train.gan import GANSettings

    config = GANConfig.quick()
    settings = _settings(config)
    assert (settings.steps, settings.real_label, settings.monitor_after) == (
        config.steps,
        config.real_label,
        config.monitor_after,
    )
    with pytest.raises(TypeError, match="GANConfig has no field monitor_per_class"):
        settings_for(GANSettings, config)  # the one field the config lacks must be given


def test_check_choice_names_the_option_and_its_choices():
    from classicnets.choices import check_choice

    assert check_choice("norm", "none", {"batchnorm": 1, "none": 2}) == "none"
    with pytest.raises(
        ValueError, match=r"^unknown split 'dev'; choose one of train, valid, test$"
    ):
        check_choice("split", "dev", ("train", "valid", "test"))
