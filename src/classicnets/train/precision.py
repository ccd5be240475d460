"""Precision and compilation switches, each off by default.

- ``precision="bf16"``: autocast to bfloat16 (CPU and recent GPUs); no loss scaling is needed,
  bfloat16 has float32's exponent range.
- ``precision="fp16"``: autocast to float16 with a gradient scaler (the loss is multiplied before
  backward so small gradients do not flush to zero; steps with inf/NaN gradients are skipped and
  the scale lowered). The scaler's state is part of the checkpoint.
- ``compile=True``: ``torch.compile`` of the model used for training (the original module keeps
  the weights and is what is saved).
- ``channels_last=True``: NHWC memory layout for convolutional models and their 4-d inputs.

Parameters and optimizer state stay in float32 under autocast (mixed precision).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

__all__ = ["PRECISIONS", "Precision", "maybe_channels_last", "maybe_compile"]

PRECISIONS = ("fp32", "bf16", "fp16")


class Precision:
    """Autocast and gradient scaling for one training run.

    Args:
        mode: "fp32" (default, no autocast), "bf16" or "fp16".
        device: the training device ("cpu", "cuda", "cuda:1", ...).
    """

    def __init__(self, mode: str = "fp32", device: str = "cpu") -> None:
        if mode not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {mode!r}")
        self.mode = mode
        self.device_type = torch.device(device).type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    def autocast(self):
        """A context for the forward pass and loss."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients to their true scale (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        """Call once per iteration after every optimizer's ``step``."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def maybe_compile(model: nn.Module, enabled: bool, backend: str = "inductor") -> nn.Module:
    """``torch.compile(model)`` when enabled (the returned module shares the weights)."""
    if not enabled:
        return model
    return torch.compile(model, backend=backend)


def maybe_channels_last(model: nn.Module, enabled: bool) -> nn.Module:
    """Convert ``model`` to channels-last memory format when enabled (convolutional models)."""
    if enabled:
        model.to(memory_format=torch.channels_last)
    return model


def inputs_channels_last(x: Tensor, enabled: bool) -> Tensor:
    if enabled and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
