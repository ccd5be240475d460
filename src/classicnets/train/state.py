"""Everything a training run must save to resume exactly, in one object.

``TrainState`` holds the named modules, optimizers (one per model for a GAN) and schedules, the
precision switch's gradient scaler, the data order and the step. ``snapshot()`` splits it into
tensors (for safetensors) and a JSON-ready dict; ``restore()`` puts it back; ``save()`` and
``resume()`` go through ``checkpoint`` (atomic, verified, newest valid first).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from classicnets.data.batching import ShuffledBatches
from classicnets.train.checkpoint import (
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    pack_optimizer,
    restore_rng_state,
    rng_state_tensors,
    save_checkpoint,
    unpack_optimizer,
)

__all__ = ["TrainState", "load_model_weights"]


# Top-level fields of a trainer state and the types ``restore`` reads them as.
_STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "complete": (bool,),
    "optimizers": (dict,),
    "schedules": (dict,),
    "scaler": (dict,),
    "data_order": (dict, type(None)),
    "extra": (dict,),
}


def _check_fields(state: dict[str, Any]) -> None:
    for key, kinds in _STATE_FIELDS.items():
        value = state.get(key)
        if not isinstance(value, kinds) or (kinds == (int,) and isinstance(value, bool)):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise CheckpointError(f"state.{key} is {value!r}, expected {names}")
    if state["step"] < 0:
        raise CheckpointError(f"state.step is {state['step']}, expected >= 0")


class TrainState:
    """The resumable state of one training run (or one variant of an experiment).

    Args:
        modules: name -> module whose ``state_dict`` is saved (tensor keys ``{name}.{key}``).
        optimizers: name -> optimizer (tensor keys ``optimizer.{name}.state...``).
        schedules: name -> schedule with ``state_dict``/``load_state_dict`` (JSON state).
        precision: the ``Precision`` switch (its gradient scaler state), or None.
        batches: the data order, or None.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
        schedules: dict[str, Any] | None = None,
        precision=None,
        batches: ShuffledBatches | None = None,
    ) -> None:
        self.modules = modules
        self.optimizers = optimizers or {}
        self.schedules = schedules or {}
        self.precision = precision
        self.batches = batches
        self.step = 0
        self.complete = False
        self.extra: dict[str, Any] = {}  # JSON-ready counters of the loop
        self.extra_tensors: dict[str, Tensor] = {}  # tensors of the loop (e.g. a loss buffer)

    def snapshot(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {}
        for name, module in self.modules.items():
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        optimizer_states = {}
        for name, optimizer in self.optimizers.items():
            opt_tensors, optimizer_states[name] = pack_optimizer(optimizer, f"optimizer.{name}")
            tensors.update(opt_tensors)
        tensors.update(rng_state_tensors())
        tensors.update({f"extra.{k}": v for k, v in self.extra_tensors.items()})
        state = {
            "step": self.step,
            "complete": self.complete,
            "optimizers": optimizer_states,
            "schedules": {k: s.state_dict() for k, s in self.schedules.items()},
            "scaler": self.precision.state_dict() if self.precision is not None else {},
            "data_order": self.batches.state_dict() if self.batches is not None else None,
            "extra": self.extra,
        }
        return tensors, state

    def restore(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Put a snapshot back. A snapshot that does not fit (other modules, optimizers or
        schedules than this state's) raises ``CheckpointError`` and may leave this state half
        restored: ``resume`` undoes that."""
        _check_fields(state)
        try:
            self._restore(tensors, state)
        except CheckpointError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"it does not fit this run ({type(exc).__name__}: {exc})"
            ) from None

    def _restore(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        for name, module in self.modules.items():
            head = f"{name}."
            weights = {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}
            module.load_state_dict(weights, strict=True)
        for name, optimizer in self.optimizers.items():
            unpack_optimizer(optimizer, tensors, state["optimizers"][name], f"optimizer.{name}")
        for name, schedule in self.schedules.items():
            schedule.load_state_dict(state["schedules"][name])
        if self.precision is not None:
            self.precision.load_state_dict(state.get("scaler") or {})
        if self.batches is not None and state.get("data_order") is not None:
            self.batches.load_state_dict(state["data_order"])
        restore_rng_state(tensors)
        self.extra_tensors = {
            k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")
        }
        self.step = int(state["step"])
        self.complete = bool(state.get("complete"))
        self.extra = dict(state.get("extra") or {})

    def save(self, directory: str | Path, prefix: str, keep_last: int | None = None) -> Path:
        tensors, state = self.snapshot()
        return save_checkpoint(
            directory, checkpoint_name(prefix, self.step), tensors, state, keep_last=keep_last
        )

    def resume(self, directory: str | Path, prefix: str) -> Path | None:
        """Restore the newest valid checkpoint with ``prefix``; its path, or None if none.

        A checkpoint that fails verification (``load_checkpoint``) or does not fit this state
        is skipped with a warning naming it, and the one before it is tried; when none fits,
        the state is left exactly as it was built.
        """
        fresh = None
        for _, json_path in reversed(list_checkpoints(directory, prefix)):
            try:
                tensors, state = load_checkpoint(json_path)
                if fresh is None:  # a deep copy: module.state_dict() returns the live tensors
                    fresh = _deep_copy(self.snapshot())
                self.restore(tensors, state)
            except CheckpointError as exc:
                message = str(exc)
                if str(json_path) not in message:
                    message = f"checkpoint {json_path}: {message}"
                warnings.warn(f"skipping damaged checkpoint: {message}", stacklevel=2)
                if fresh is not None:
                    self.restore(*_deep_copy(fresh))
                continue
            return json_path
        return None


def _deep_copy(snapshot: tuple[dict[str, Tensor], dict[str, Any]]):
    tensors, state = snapshot
    return {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(state))


def load_model_weights(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load the ``model.*`` entries of a checkpoint into ``model`` (strict)."""
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
