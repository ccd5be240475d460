"""Everything a training run must save to resume exactly, in one object.

``TrainState`` holds the named modules, optimizers (one per model for a GAN) and schedules, the
precision switch's gradient scaler, the data order and the step. ``snapshot()`` splits it into
tensors (for safetensors) and a JSON-ready dict; ``restore()`` puts it back; ``save()`` and
``resume()`` go through ``checkpoint`` (atomic, verified, newest valid first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from classicnets.data.batching import ShuffledBatches
from classicnets.train.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    pack_optimizer,
    restore_rng_state,
    rng_state_tensors,
    save_checkpoint,
    unpack_optimizer,
)

__all__ = ["TrainState"]


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
        """Restore the newest valid checkpoint with ``prefix``; its path, or None if none."""
        found = latest_checkpoint(directory, prefix)
        if found is None:
            return None
        tensors, state, path = found
        self.restore(tensors, state)
        return path
