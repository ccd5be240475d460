"""The one check for options chosen by name: a norm, an activation, a schedule, a split."""

from __future__ import annotations

from collections.abc import Collection
from typing import TypeVar

__all__ = ["check_choice"]

T = TypeVar("T")


def check_choice(what: str, value: T, choices: Collection) -> T:
    """``value`` when it is one of ``choices`` (a sequence, or a mapping's keys), else a
    ``ValueError`` that names ``what`` and lists the choices.

    >>> check_choice("norm", "batchnorm", {"batchnorm": None, "none": None})
    'batchnorm'
    >>> check_choice("norm", "layer", ("batchnorm", "none"))
    Traceback (most recent call last):
    ...
    ValueError: unknown norm 'layer'; choose one of batchnorm, none
    """
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}")
    return value
