"""A small model registry: every model family registers its named variants here.

    @register_model("mlp")
    def mlp(**kwargs) -> nn.Module: ...

    model = create_model("mlp", hidden_sizes=(100, 100, 100))

The registry is what ``classicnets list`` prints and what the shared model tests iterate over,
so every registered model gets the same checks (shape, finiteness, gradients, determinism,
``state_dict`` round trip).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

__all__ = [
    "ModelEntry",
    "create_model",
    "list_models",
    "model_entry",
    "register_model",
    "register_presets",
]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model constructor and the input it expects.

    Attributes:
        name: registry name.
        factory: ``factory(**kwargs) -> nn.Module``.
        description: one line for ``classicnets list``.
        example_input_shape: shape of a small valid input batch (batch first), for tests.
        input_dtype: "float" for images/features, "long" for token ids.
        test_kwargs: small keyword arguments for fast tests.
    """

    name: str
    factory: Callable[..., nn.Module]
    description: str
    example_input_shape: tuple[int, ...]
    input_dtype: str = "float"
    test_kwargs: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    description: str,
    example_input_shape: tuple[int, ...],
    input_dtype: str = "float",
    test_kwargs: dict | None = None,
):
    """Decorator registering ``factory`` under ``name``; a duplicate name is an error."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(
            name, factory, description, tuple(example_input_shape), input_dtype, test_kwargs or {}
        )
        return factory

    return wrap


def register_presets(
    model_cls: Callable[..., nn.Module],
    presets: dict[str, tuple[str, dict]],
    example_input_shape: tuple[int, ...],
    input_dtype: str = "float",
    test_kwargs: dict | None = None,
) -> None:
    """Register the named presets of one family: ``presets[name] = (description, defaults)``;
    ``create_model(name, **kwargs)`` builds ``model_cls(**{**defaults, **kwargs})``."""
    for name, (description, defaults) in presets.items():
        factory = _preset(model_cls, defaults)
        factory.__name__ = name.replace("-", "_")
        tests = dict(test_kwargs or {})
        register_model(name, description, example_input_shape, input_dtype, tests)(factory)


def _preset(model_cls: Callable[..., nn.Module], defaults: dict) -> Callable[..., nn.Module]:
    def factory(**kwargs) -> nn.Module:
        return model_cls(**{**defaults, **kwargs})

    return factory


def list_models() -> list[ModelEntry]:
    """All registered models, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def model_entry(name: str) -> ModelEntry:
    """The entry for ``name``; an unknown name is a ``KeyError`` listing the known ones."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``."""
    return model_entry(name).factory(**kwargs)
