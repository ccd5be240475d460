"""What the exporter's tracer and its op converters share: the values of a traced graph and the
registry of converters. No module here imports the tracer (``graph``) or the converters, so the
two import this one and not each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from classicnets.export.numpy_bundle import ExportError

__all__ = [
    "FUNCTIONS",
    "METHODS",
    "Const",
    "Converter",
    "ExportGraph",
    "Static",
    "Value",
    "dynamic_axes",
    "module_converter",
    "register_function",
    "register_method",
    "register_module",
    "unwrap_static",
    "varying_axes",
]


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Value:
    """A tensor computed at run time: its name in the bundle, its shape in every trace (batch
    2, batch 3 and, for sequence models, a longer sequence) and its dtype."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    @property
    def shape_a(self) -> tuple[int, ...]:
        """The shape in the first trace (batch size ``BATCH_A``)."""
        return self.shapes[0]

    @property
    def ndim(self) -> int:
        return len(self.shape_a)


@dataclass(frozen=True)
class Const:
    """A tensor that does not depend on the inputs (a parameter, a buffer, or made from them)."""

    tensor: torch.Tensor


@dataclass(frozen=True)
class Static:
    """A Python value (int, tuple, None, dtype, ...): ``a`` in the first trace, ``values`` in
    every trace."""

    values: tuple

    @property
    def a(self) -> Any:
        return self.values[0]

    @property
    def varies(self) -> bool:
        return any(v != self.values[0] for v in self.values[1:])


def varying_axes(shapes) -> list[int]:
    """Axes whose size differs between the traces: the batch axis (and the sequence axis)."""
    first = shapes[0]
    return [i for i in range(len(first)) if any(s[i] != first[i] for s in shapes[1:])]


def dynamic_axes(shapes, what: str) -> list[int]:
    """The shape of the first trace with -1 on the one axis whose size follows the inputs."""
    shape = list(shapes[0])
    varying = varying_axes(shapes)
    if len(varying) > 1:
        raise ExportError(
            f"{what}: more than one axis follows the input sizes ({[list(s) for s in shapes]} "
            f"over the traces); a reshape cannot express it"
        )
    for i in varying:
        shape[i] = -1
    return shape


@dataclass
class ExportGraph:
    """The converted model: manifest-ready layer dicts and the tensors they name.

    Attributes:
        inputs: one dict per graph input: ``name``, ``shape`` (None on the batch axis),
            ``dtype``.
        input_structure: the inputs as the model's ``forward`` takes them (nested lists of
            names, e.g. ``["tokens", ["hidden.0", "hidden.1"]]``).
        outputs: the outputs as ``forward`` returns them (a name or nested lists of names).
        layers: ``{"name", "op", "inputs", "outputs", "attrs", "tensors"}`` in execution order.
        tensors: key -> float32 (or int64) array.
    """

    inputs: list[dict[str, Any]]
    input_structure: list
    outputs: Any
    layers: list[dict[str, Any]]
    tensors: dict[str, np.ndarray]


# --------------------------------------------------------------------------- converter registry

Converter = Callable[..., Any]
MODULES: dict[type, Converter] = {}
FUNCTIONS: dict[Any, Converter] = {}
METHODS: dict[str, Converter] = {}


def register_module(*types: type) -> Callable[[Converter], Converter]:
    """Register ``fn(cx, node, module, *args, **kwargs)`` for modules of ``types`` (and
    subclasses, unless a subclass has its own converter)."""

    def wrap(fn: Converter) -> Converter:
        for t in types:
            MODULES[t] = fn
        return fn

    return wrap


def register_function(*targets: Any) -> Callable[[Converter], Converter]:
    """Register ``fn(cx, node, *args, **kwargs)`` for functions such as ``torch.cat``."""

    def wrap(fn: Converter) -> Converter:
        for t in targets:
            FUNCTIONS[t] = fn
        return fn

    return wrap


def register_method(*names: str) -> Callable[[Converter], Converter]:
    """Register ``fn(cx, node, self, *args, **kwargs)`` for tensor methods such as ``view``."""

    def wrap(fn: Converter) -> Converter:
        for n in names:
            METHODS[n] = fn
        return fn

    return wrap


def module_converter(module: nn.Module) -> Converter | None:
    """The converter for ``module``'s type, looked up along its class hierarchy."""
    for cls in type(module).__mro__:
        if cls in MODULES:
            return MODULES[cls]
    return None


def unwrap_static(value):
    """Static -> its value (run A) for converters that only need e.g. an axis or a scalar."""
    if isinstance(value, Static):
        return value.a
    if isinstance(value, (tuple, list)) and not any(isinstance(v, Value) for v in value):
        return type(value)(unwrap_static(v) for v in value)
    return value
