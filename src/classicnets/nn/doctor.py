"""The BN doctor: are a model's batch-norm running statistics those of the data?

The commonest BN complaint is "eval mode gives different (worse) results than train mode". Its
causes are running statistics that were never updated (TensorFlow 1's forgotten
``UPDATE_OPS``), that lag behind the weights (a momentum too slow for the steps trained), or
that come from other data. ``bn_report`` measures each BN layer against what precise BN
(``recalibrate_bn``) computes on the given data, so what it reports is exactly what
``recalibrate_bn`` would change:

- ``mean_rel_error``: ``max_c |running_mean_c - mean_c| / sqrt(var_c + eps)`` (in units of the
  data's spread);
- ``var_rel_error``: ``max_c |running_var_c - var_c| / (var_c + eps)``;
- ``train_eval_gap``: on the first batch, the RMS difference between the layer's normalized
  values in inference mode (running statistics) and in training mode (the batch's own), in units
  of the training-mode output's spread (1);
- ``flags``: ``never_updated`` (running mean exactly 0 and variance exactly 1: the initial
  values), ``stale`` (``mean_rel_error > STALE_MEAN`` or ``var_rel_error > STALE_VAR``),
  ``eps_dominated`` (a channel whose variance is below ``EPS_FACTOR`` times eps, where eps and
  not the data sets the scale).

The thresholds leave room for what an exponential average of a network still training does:
with PyTorch's momentum 0.1 the running mean averages about 19 recent batches while the weights
move, and on the 100 channels of a bn-mlp layer its largest error reaches about a quarter of
the spread (0.23 after the quick run's 300 steps at learning rate 2, 0.10 after the full 50,000).
Statistics of other data or never updated are off by more than the spread, or by factors in the
variance (docs/batchnorm.md has the figures of a real run).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from classicnets.nn.batchnorm import BatchNorm, is_batchnorm, recalibrate_bn

__all__ = ["EPS_FACTOR", "STALE_MEAN", "STALE_VAR", "BNLayerReport", "bn_report", "format_report"]

STALE_MEAN = 0.5  # half the data's standard deviation
STALE_VAR = 1.0  # a running variance off by the data's variance (a factor of two or more)
EPS_FACTOR = 10.0


@dataclass
class BNLayerReport:
    """One BN layer's diagnosis (see the module docstring for each figure)."""

    name: str
    num_features: int
    mean_rel_error: float
    var_rel_error: float
    train_eval_gap: float
    flags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_features": self.num_features,
            "mean_rel_error": self.mean_rel_error,
            "var_rel_error": self.var_rel_error,
            "train_eval_gap": self.train_eval_gap,
            "flags": list(self.flags),
        }


def _axis(module: nn.Module, ndim: int) -> int:
    return module.axis % ndim if isinstance(module, BatchNorm) else 1


def _per_channel(x: Tensor, axis: int) -> Tensor:
    return x.movedim(axis, -1).reshape(-1, x.shape[axis]).double()  # (n, C)


def bn_report(
    model: nn.Module, batches: Iterable, max_batches: int | None = None
) -> list[BNLayerReport]:
    """Diagnose every BN layer with running statistics of ``model`` on ``batches``.

    Args:
        model: the model, called as ``model(x)``; left exactly as it was.
        batches: input tensors (or tuples whose first item is the input), e.g. training data.
        max_batches: use at most this many batches.

    Returns:
        One ``BNLayerReport`` per BN layer, in module order.

    Raises:
        ValueError: the model has no BN layer with running statistics, or no batch was given.
    """
    batches = list(batches)[:max_batches] if max_batches is not None else list(batches)
    if not batches:
        raise ValueError("bn_report: no batches to measure against")
    layers = [(n, m) for n, m in model.named_modules() if is_batchnorm(m) and m.track_running_stats]
    if not layers:
        raise ValueError("bn_report: the model has no batch-norm layer with running statistics")

    # The data's statistics: exactly what recalibrate_bn computes, on a copy.
    reference = copy.deepcopy(model)
    recalibrate_bn(reference, batches)
    precise = {n: m for n, m in reference.named_modules() if is_batchnorm(m)}

    # Each layer's input on the first batch, in inference mode.
    captured: dict[str, Tensor] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda _m, inputs, name=n: captured.setdefault(name, inputs[0].detach())
        )
        for n, m in layers
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            first = batches[0][0] if isinstance(batches[0], (tuple, list)) else batches[0]
            model(first)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    reports = []
    for name, m in layers:
        eps = float(m.eps)
        mean, var = precise[name].running_mean.double(), precise[name].running_var.double()
        running_mean, running_var = m.running_mean.double(), m.running_var.double()
        mean_error = float(((running_mean - mean).abs() / torch.sqrt(var + eps)).max())
        var_error = float(((running_var - var).abs() / (var + eps)).max())
        x = _per_channel(captured[name], _axis(m, captured[name].ndim))  # (n, C)
        batch_mean, batch_var = x.mean(dim=0), x.var(dim=0, unbiased=False)
        eval_hat = (x - running_mean) / torch.sqrt(running_var + eps)
        train_hat = (x - batch_mean) / torch.sqrt(batch_var + eps)
        gap = float(torch.sqrt(((eval_hat - train_hat) ** 2).mean()))
        flags = []
        if bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()):
            flags.append("never_updated")
        if mean_error > STALE_MEAN or var_error > STALE_VAR:
            flags.append("stale")
        if bool((var < EPS_FACTOR * eps).any()):
            flags.append("eps_dominated")
        reports.append(
            BNLayerReport(name or "<model>", m.num_features, mean_error, var_error, gap, flags)
        )
    return reports


def format_report(reports: list[BNLayerReport], title: str = "") -> str:
    """The reports as an aligned table, with what ``classicnets recalibrate`` would change."""
    width = max(len(r.name) for r in reports)
    lines = [title] if title else []
    lines.append(f"  {'layer':<{width}}  mean err  var err  train/eval gap  flags")
    for r in reports:
        flags = ", ".join(r.flags) or "ok"
        lines.append(
            f"  {r.name:<{width}}  {r.mean_rel_error:8.3g}  {r.var_rel_error:7.3g}  "
            f"{r.train_eval_gap:14.3g}  {flags}"
        )
    flagged = [r.name for r in reports if r.flags]
    if flagged:
        lines.append(
            f"  recalibrate would replace the running statistics of {len(flagged)} flagged "
            f"layer(s) ({', '.join(flagged)}) by the data's: their errors would become 0"
        )
    else:
        lines.append("  running statistics match the data; recalibrate would change little")
    return "\n".join(lines)
