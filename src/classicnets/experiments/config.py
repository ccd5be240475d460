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
import types
import typing
from typing import Any

__all__ = ["ConfigError", "apply_overrides", "config_from_dict", "config_to_dict", "parse_value"]


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
            f"{key}={text!r}: expected {' or '.join(_describe(o) for o in options)}"
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
    new = dataclasses.replace(config, **changes)
    validate = getattr(new, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return new


def config_to_dict(config) -> dict[str, Any]:
    """The config as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _coerce(value, tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, options[0]) if len(options) == 1 else value
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        return tuple(_coerce(v, args[0]) if args else v for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_from_dict(config_cls, values: dict[str, Any]):
    """Rebuild a config saved by ``config_to_dict``; unknown keys are an error."""
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(
            f"saved config has keys unknown to {config_cls.__name__}: {', '.join(sorted(unknown))}"
        )
    return config_cls(**{k: _coerce(v, hints[k]) for k, v in values.items()})
