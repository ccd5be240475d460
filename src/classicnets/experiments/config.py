"""Experiment configs: typed dataclasses, ``--set key=value`` overrides checked against them.

>>> from dataclasses import dataclass
>>> @dataclass
... class C:
...     steps: int = 10
...     widths: tuple[int, ...] = (100, 100)
...     note: str | None = None
>>> apply_overrides(C(), ["steps=20", "widths=64,32", "note=none"])
C(steps=20, widths=(64, 32), note=None)
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any

__all__ = [
    "CHOICES",
    "RANGES",
    "ConfigError",
    "Range",
    "apply_overrides",
    "check_choices",
    "check_ranges",
    "config_from_dict",
    "config_to_dict",
    "parse_value",
    "validate_config",
]


class ConfigError(ValueError):
    """An unknown config key, or a value of the wrong type."""


_NONE_WORDS = {"none", "null"}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _describe(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_value(text: str, tp, key: str = "value") -> Any:
    """Parse ``text`` as type ``tp`` (int, float, bool, str, ``X | None``, ``tuple[X, ...]``,
    ``list[X]``, ``Literal[...]``). Raises ``ConfigError`` naming ``key`` and the expected type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if type(None) in args and text.strip().lower() in _NONE_WORDS:
            return None
        errors = []
        for option in options:
            try:
                return parse_value(text, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            f"{key}={text!r}: expected {' or '.join(_describe_type(o) for o in options)}"
            + (" or none" if type(None) in args else "")
        )
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ConfigError(f"{key}={text!r}: expected one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        item_type = args[0] if args else str
        raw = text.strip()
        if raw.startswith("["):
            try:
                items = [str(v) for v in json.loads(raw)]
            except json.JSONDecodeError:
                raise ConfigError(f"{key}={text!r}: not a valid list") from None
        else:
            items = [t for t in (part.strip() for part in raw.split(",")) if t]
        values = [parse_value(item, item_type, key) for item in items]
        return tuple(values) if origin is tuple else values
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
    if tp is int:
        try:
            return int(text.strip().replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    if tp is str:
        return text
    raise ConfigError(f"{key}: values of type {_describe(tp)} cannot be set from the command line")


# --------------------------------------------------------------------------- ranges


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field may take: finite, within ``[low, high]`` (``low_open`` /
    ``high_open`` exclude the end). Applies to each item of a tuple field; None (for ``X | None``
    fields) is always allowed."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.high == math.inf:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE = Range(0, low_open=True)  # learning rates, eps, norms, scales
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)  # sizes, counts, intervals, steps
FRACTION = Range(0, 1, high_open=True)  # momentum, Adam's betas, dropout: [0, 1)
FACTOR = Range(0, 1, low_open=True)  # decay factors, BN momentum, label smoothing: (0, 1]
SEED = Range(0, 2**63 - 1)

# Every numeric field of every experiment config, by name: a name means the same thing in every
# recipe. tests/test_config.py checks that no numeric field is missing from this table.
RANGES: dict[str, Range] = {
    # optimization
    **dict.fromkeys(
        ["lr", "lr_plain", "lr_bn", "lr_mlp", "lr_resnet", "lr_rnn_tanh", "lr_rnn_relu"], POSITIVE
    ),
    **dict.fromkeys(["lr_generator", "lr_discriminator"], POSITIVE),
    "momentum": FRACTION,
    "beta1": FRACTION,
    "beta2": FRACTION,
    "weight_decay": NON_NEGATIVE,
    "clip_grad_norm": POSITIVE,
    "max_grad_norm": POSITIVE,
    # schedules
    "lr_gamma": FACTOR,
    "lr_decay": FACTOR,
    "lr_step_every": AT_LEAST_ONE,
    "warmup_steps": NON_NEGATIVE,
    "epochs_at_full_lr": NON_NEGATIVE,
    "plateau_patience": AT_LEAST_ONE,
    "kl_warmup_epochs": NON_NEGATIVE,
    "cvae_kl_warmup_epochs": NON_NEGATIVE,
    # batch normalization and layers
    "bn_eps": POSITIVE,
    "bn_momentum": FACTOR,
    "init_std": POSITIVE,
    "init_scale": POSITIVE,
    "dropout": FRACTION,
    "decoder_dropout": FRACTION,
    "negative_slope": NON_NEGATIVE,
    **dict.fromkeys(
        [
            "hidden_sizes",
            "mlp_hidden_sizes",
            "channels",
            "generator_hidden",
            "discriminator_hidden",
            "quick_widths",
            "hidden_size",
            "latent_size",
            "kernel_size",
            "num_layers",
        ],
        AT_LEAST_ONE,
    ),
    # budgets and cadence
    **dict.fromkeys(
        ["steps", "epochs", "batch_size", "eval_batch_size", "num_steps", "eval_num_steps"],
        AT_LEAST_ONE,
    ),
    **dict.fromkeys(["eval_every", "log_every", "grid_every", "stop_after"], AT_LEAST_ONE),
    "checkpoint_every": NON_NEGATIVE,  # 0: only at the end
    "keep_checkpoints": AT_LEAST_ONE,
    "jobs": NON_NEGATIVE,  # 0: automatic
    "iw_samples": NON_NEGATIVE,  # 0: no importance-weighted estimate
    **dict.fromkeys(["train_limit", "test_limit", "eval_limit"], AT_LEAST_ONE),
    "monitor_after": NON_NEGATIVE,
    "watch_unit": NON_NEGATIVE,
    "max_shift": NON_NEGATIVE,
    # evaluation, grids and scores
    **dict.fromkeys(
        [
            "eval_samples",
            "grid_columns",
            "grid_images",
            "score_samples",
            "score_samples_per_digit",
            "collapse_window",
            "win_window",
        ],
        AT_LEAST_ONE,
    ),
    "collapse_fraction": FACTOR,
    "real_label": FACTOR,
    "win_fake_below": Range(0, 1, low_open=True, high_open=True),
    "win_loss_below": POSITIVE,
    **dict.fromkeys(
        ["seed", "eval_seed", "grid_seed", "sample_seed", "score_seed", "binarize_seed"], SEED
    ),
}


def _numeric(tp) -> bool:
    """Whether ``tp`` is int or float, possibly in ``X | None`` or ``tuple[X, ...]``."""
    if tp in (int, float):
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType, tuple, list):
        return any(_numeric(a) for a in typing.get_args(tp) if a is not type(None) and a != ...)
    return False


def numeric_fields(config_cls) -> list[str]:
    """The names of the numeric fields of ``config_cls`` (those ``RANGES`` must cover)."""
    hints = typing.get_type_hints(config_cls)
    return [f.name for f in dataclasses.fields(config_cls) if _numeric(hints[f.name])]


def check_ranges(config) -> None:
    """Raise ``ConfigError`` naming the key, the value and the allowed range for the first
    numeric field of ``config`` outside ``RANGES`` (NaN and infinities never pass), or a data
    limit smaller than one batch. A config class may widen or narrow a name's range for its own
    meaning of it in a ``FIELD_RANGES`` class attribute."""
    ranges = {**RANGES, **getattr(type(config), "FIELD_RANGES", {})}
    for name in numeric_fields(type(config)):
        value = getattr(config, name)
        if name not in ranges:
            raise ConfigError(f"{type(config).__name__}.{name} has no declared range")
        allowed = ranges[name]
        for item in value if isinstance(value, (tuple, list)) else [value]:
            if item is not None and not allowed.admits(item):
                raise ConfigError(f"{name}={item!r}: expected {allowed.describe()}")
    batch = getattr(config, "batch_size", None)
    for name in ("train_limit", "test_limit"):
        limit = getattr(config, name, None)
        if limit is not None and isinstance(batch, int) and limit < batch:
            raise ConfigError(
                f"{name}={limit}: expected at least one batch (batch_size={batch}) or none"
            )


# --------------------------------------------------------------------------- choices

# Every text field of the configs with a closed set of values, by name, as RANGES for numbers. A
# config class adds its own in a ``FIELD_CHOICES`` class attribute (its activations, presets).
CHOICES: dict[str, tuple[str, ...]] = {
    "schedule": ("constant", "step", "cosine", "exp-after-epoch", "plateau"),
    "precision": ("fp32", "bf16", "fp16"),  # train.precision.PRECISIONS
    "optimizer": ("sgd", "adam"),
    "dataset": ("mnist", "fashion-mnist"),
    **dict.fromkeys(["norm", "resnet_norm", "mlp_norm"], ("batchnorm", "none")),
    "loss": ("bce", "mse"),  # train.autoencoder.RECONSTRUCTION_LOSSES
    "generator_activation": ("relu", "leaky_relu"),
}


def _one_of(choices) -> str:
    choices = [str(c) for c in choices]
    return " or ".join(choices) if len(choices) == 2 else f"one of {', '.join(choices)}"


def check_choices(config) -> None:
    """Raise ``ConfigError`` for the first text field of ``config`` outside ``CHOICES`` (and
    its class's ``FIELD_CHOICES``), and for ``variants`` that are not distinct names among its
    class's ``VARIANTS``."""
    choices = {**CHOICES, **getattr(type(config), "FIELD_CHOICES", {})}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in choices and value not in choices[field.name]:
            raise ConfigError(f"{field.name} must be {_one_of(choices[field.name])}, got {value!r}")
    known = getattr(type(config), "VARIANTS", None)
    variants = getattr(config, "variants", None)
    if known is not None and variants is not None:
        if not variants or len(set(variants)) != len(variants) or set(variants) - set(known):
            raise ConfigError(
                f"variants must be distinct names among {', '.join(known)}, got "
                f"{','.join(variants) or 'nothing'}"
            )


def validate_config(config):
    """Check ``config``'s ranges and choices, then its own ``validate()`` (cross-field rules);
    return it. Every error is a ``ConfigError`` with a one-line message naming the key."""
    check_ranges(config)
    check_choices(config)
    validate = getattr(config, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return config


def _field_types(config) -> dict[str, Any]:
    return typing.get_type_hints(type(config))


def apply_overrides(config, overrides: list[str]):
    """A copy of dataclass ``config`` with ``key=value`` overrides applied and type-checked.

    Raises:
        ConfigError: for a malformed override, an unknown key (the message lists the valid keys)
            or a value that does not parse as the field's type.
    """
    hints = _field_types(config)
    names = [f.name for f in dataclasses.fields(config)]
    changes = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key not in names:
            raise ConfigError(
                f"unknown config key {key!r} for {type(config).__name__}; valid keys: "
                f"{', '.join(names)}"
            )
        changes[key] = parse_value(text, hints[key], key)
    return validate_config(dataclasses.replace(config, **changes))


def config_to_dict(config) -> dict[str, Any]:
    """The config as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _describe_type(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(
            "null" if a is type(None) else _describe_type(a) for a in typing.get_args(tp)
        )
    if origin in (tuple, list):
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        return f"a list of {plural.get(item) or _describe_type(item)}"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, _describe(tp)
    )


def _from_json(value, tp, key: str):
    """``value`` (parsed JSON) as type ``tp``, or ``ConfigError`` naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for option in (a for a in typing.get_args(tp) if a is not type(None)):
            try:
                return _from_json(value, option, key)
            except ConfigError:
                continue
    elif origin in (tuple, list):
        if isinstance(value, list):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            items = [_from_json(v, item, key) for v in value]
            return tuple(items) if origin is tuple else items
    elif origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key}={json.dumps(value)[:60]}: expected {_describe_type(tp)}")


def config_from_dict(config_cls, values: dict[str, Any]):
    """Rebuild a config saved by ``config_to_dict``, checking every value's type and range as
    ``--set`` does; unknown keys are an error."""
    if not isinstance(values, dict):
        raise ConfigError(f"the saved config is not a JSON object but {type(values).__name__}")
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(
            f"saved config has keys unknown to {config_cls.__name__}: {', '.join(sorted(unknown))}"
        )
    typed = {k: _from_json(v, hints[k], k) for k, v in values.items()}
    return validate_config(config_cls(**typed))
