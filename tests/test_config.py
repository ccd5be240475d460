"""``--set key=value`` parsing against config dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from classicnets.experiments.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    parse_value,
)


@dataclass
class Demo:
    steps: int = 10
    lr: float = 0.1
    name: str = "a"
    flag: bool = False
    widths: tuple[int, ...] = (100, 100)
    limit: int | None = None

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
        ("limit=many", "expected int or none"),
        ("steps=0", "steps must be >= 1"),
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
