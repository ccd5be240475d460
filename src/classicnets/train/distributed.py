"""Distributed data parallel through ``torchrun``, with batch-norm statistics kept identical.

    torchrun --nproc_per_node 2 -m classicnets run bn-mlp [--set sync_bn=true] ...

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (and the rendezvous address) in each
process's environment; ``init_from_env`` reads them, starts the process group (NCCL on CUDA, gloo
on CPU) and gives each process its device (``cuda:LOCAL_RANK``). The command line is the same as
for one process:

- the **global** batch (``batch_size``) is split across processes: every process draws the same
  shuffled index batch (same seed) and takes its own contiguous slice, and the gradients are
  averaged over the processes after every backward pass (``average_gradients``, called by
  ``train.fit.optimize``), so with equal slices every process steps with the gradient of the
  global batch's mean loss;
- with synchronized BN (``sync_bn=true``) the batch statistics are those of the global batch, so
  training equals one process over the global batch; without it each process normalizes with its
  own slice (standard DDP behaviour);
- BN running statistics are averaged across processes before every evaluation and checkpoint
  (``sync_bn_buffers``), so every rank evaluates and saves the same model;
- only rank 0 writes the run folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from classicnets.nn.batchnorm import is_batchnorm

__all__ = [
    "DistributedContext",
    "average_gradients",
    "broadcast_object",
    "get_context",
    "init_from_env",
    "set_context",
    "shutdown",
    "sync_bn_buffers",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_slice(self, global_batch: int) -> slice:
        """This rank's slice of a global batch of ``global_batch`` examples."""
        if global_batch % self.world_size:
            raise ValueError(
                f"batch_size {global_batch} is the global batch and must be divisible by the "
                f"number of processes ({self.world_size})"
            )
        per_rank = global_batch // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


_CONTEXT = DistributedContext()


def get_context() -> DistributedContext:
    """The context of this process (single-process default when not under torchrun)."""
    return _CONTEXT


def set_context(context: DistributedContext) -> None:
    global _CONTEXT
    _CONTEXT = context


def init_from_env(device: str) -> DistributedContext:
    """Start the process group if launched by torchrun (``WORLD_SIZE`` > 1), else do nothing.

    Args:
        device: the resolved device ("cpu" or "cuda"); under torchrun with CUDA each process
            takes ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        context = DistributedContext(device=device)
        set_context(context)
        return context
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    context = DistributedContext(rank, local_rank, world_size, device, backend)
    set_context(context)
    return context


def shutdown(finished: bool = False) -> None:
    """End the process group. ``finished``: every process got here without an error, so they
    first wait for each other (a barrier): a process that tears its group down while another
    still writes the run folder can abort in gloo's teardown ("terminate called without an
    active exception"). After an error there is no barrier: the others may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
    set_context(DistributedContext())


def broadcast_object(value, context: DistributedContext | None = None):
    """Rank 0's ``value`` on every rank (e.g. the run folder's name)."""
    context = context or get_context()
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def sync_bn_buffers(model: nn.Module, context: DistributedContext | None = None) -> None:
    """Average every BN layer's running mean and variance across processes, in place.

    Without synchronized BN each process's running statistics follow its own slices of the
    data; averaging them (the mean of per-process averages) makes every rank evaluate and save the
    same model. With synchronized BN they are already identical and this changes nothing beyond
    rounding. ``num_batches_tracked`` is equal on all ranks by construction.
    """
    context = context or get_context()
    if not context.enabled:
        return
    for module in model.modules():
        if is_batchnorm(module) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(context.world_size)


@torch.no_grad()
def average_gradients(params, context: DistributedContext | None = None) -> None:
    """Replace each gradient of ``params`` by its mean over the processes, in place.

    The all-reduce of ``DistributedDataParallel``, done once after the backward pass in one
    flat buffer (a single collective per optimizer step): every process then steps with the
    gradient of the global batch's mean loss. Parameters without a gradient (a frozen network,
    as D is during the GAN's generator step) are skipped; they are the same on every process.
    """
    context = context or get_context()
    if not context.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= context.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
