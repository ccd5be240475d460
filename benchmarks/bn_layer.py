"""Speed of ``classicnets.nn.BatchNorm`` against ``torch.nn.BatchNorm1d/2d``.

What is measured: one training step of the layer alone, forward + backward
(``y = bn(x); y.backward(grad)``), in training mode (batch statistics, running statistics
updated), for

- ``BatchNorm(64)`` on ``[256, 64, 32, 32]`` (NCHW)   against ``torch.nn.BatchNorm2d(64)``;
- ``BatchNorm(1024)`` on ``[4096, 1024]``              against ``torch.nn.BatchNorm1d(1024)``;

and, as informative rows,

- ``BatchNorm(64, axis=-1)`` on ``[256, 32, 32, 64]`` (NHWC) against ``BatchNorm2d(64)`` on the
  same data as a channels_last ``[256, 64, 32, 32]`` tensor;
- ``BatchNorm(C, unbiased_running_var=False)`` (biased running variance, updated outside the
  fused kernel) against the same torch baselines.

Baseline and fairness: both layers run in the same process on the same device with the same
input, with torch's default thread count. After a warm-up, each round times ours and torch's
back to back, alternating which goes first, so drifts in clock speed or cache state hit both
alike; the figure is the median over rounds of the time per step. On CUDA the timed region is
bracketed by ``torch.cuda.synchronize()``. The ratio is ours / torch; the target is <= 1.1.
``--quick`` only checks that everything runs: its tiny shapes are dominated by per-call overhead
and timer noise, so its ratios say nothing about the target.

    PYTHONPATH=src python benchmarks/bn_layer.py                  # CPU, and CUDA if present
    PYTHONPATH=src python benchmarks/bn_layer.py --quick          # small shapes, a few seconds
    PYTHONPATH=src python benchmarks/bn_layer.py --device cuda --repeats 30
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from classicnets.nn import BatchNorm

TARGET_RATIO = 1.1


@dataclass
class Case:
    """One row of the table: our layer and torch's on the same data."""

    name: str
    shape: tuple[int, ...]  # shape of *our* input
    make_ours: Callable[[], nn.Module]
    make_torch: Callable[[], nn.Module]
    nhwc: bool = False  # ours takes [N, H, W, C]; torch takes the channels_last view of it
    informative: bool = False  # not held to the target ratio


@dataclass
class Result:
    case: str
    shape: tuple[int, ...]
    device: str
    ours_ms: float
    torch_ms: float
    informative: bool

    @property
    def ratio(self) -> float:
        return self.ours_ms / self.torch_ms


def make_cases(quick: bool) -> list[Case]:
    # Full shapes as in the brief; --quick shrinks every axis so the whole run takes seconds.
    n, c, hw = (32, 16, 16) if quick else (256, 64, 32)
    rows, features = (256, 128) if quick else (4096, 1024)
    return [
        Case(
            "BatchNorm vs BatchNorm2d (NCHW)",
            (n, c, hw, hw),
            lambda: BatchNorm(c),
            lambda: nn.BatchNorm2d(c),
        ),
        Case(
            "BatchNorm vs BatchNorm1d",
            (rows, features),
            lambda: BatchNorm(features),
            lambda: nn.BatchNorm1d(features),
        ),
        Case(
            "axis=-1 (NHWC) vs BatchNorm2d channels_last",
            (n, hw, hw, c),
            lambda: BatchNorm(c, axis=-1),
            lambda: nn.BatchNorm2d(c),
            nhwc=True,
            informative=True,
        ),
        Case(
            "unbiased_running_var=False vs BatchNorm2d",
            (n, c, hw, hw),
            lambda: BatchNorm(c, unbiased_running_var=False),
            lambda: nn.BatchNorm2d(c),
            informative=True,
        ),
        Case(
            "unbiased_running_var=False vs BatchNorm1d",
            (rows, features),
            lambda: BatchNorm(features, unbiased_running_var=False),
            lambda: nn.BatchNorm1d(features),
            informative=True,
        ),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One training step of the layer alone: forward, backward, gradients reset."""

    def step() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)

    return step


def _time_per_call(step: Callable[[], None], number: int, device: torch.device) -> float:
    """Seconds per call of ``step``, averaged over ``number`` back-to-back calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(number):
        step()
    _sync(device)
    return (time.perf_counter() - start) / number


def measure(case: Case, device: torch.device, repeats: int, min_time: float) -> Result:
    """Median time per forward + backward step of both layers, measured interleaved."""
    torch.manual_seed(0)
    x_ours = torch.randn(case.shape, device=device)
    grad_ours = torch.randn(case.shape, device=device)
    if case.nhwc:
        # The same memory seen as NCHW: a channels_last tensor, what BatchNorm2d is given there.
        x_torch, grad_torch = x_ours.permute(0, 3, 1, 2), grad_ours.permute(0, 3, 1, 2)
        assert x_torch.is_contiguous(memory_format=torch.channels_last)
    else:
        x_torch, grad_torch = x_ours, grad_ours
    x_ours = x_ours.detach().requires_grad_()
    x_torch = x_torch.detach().requires_grad_()

    steps = {
        "ours": _step_fn(case.make_ours().to(device).train(), x_ours, grad_ours),
        "torch": _step_fn(case.make_torch().to(device).train(), x_torch, grad_torch),
    }
    # Warm-up (allocator, kernel selection), then pick how many calls make one measurement
    # last about ``min_time`` seconds, so timer resolution and launch jitter do not dominate.
    for step in steps.values():
        for _ in range(3):
            step()
    one_call = max(_time_per_call(s, 1, device) for s in steps.values())
    number = max(1, math.ceil(min_time / max(one_call, 1e-9)))

    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for round_index in range(repeats):
        order = ("ours", "torch") if round_index % 2 == 0 else ("torch", "ours")
        for name in order:
            times[name].append(_time_per_call(steps[name], number, device))
    return Result(
        case=case.name,
        shape=case.shape,
        device=device.type,
        ours_ms=1e3 * statistics.median(times["ours"]),
        torch_ms=1e3 * statistics.median(times["torch"]),
        informative=case.informative,
    )


def cpu_name() -> str:
    """platform.processor() is often empty on Linux; fall back to /proc/cpuinfo."""
    name = platform.processor()
    if name and name != platform.machine():
        return name
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name or platform.machine()


def describe_machine(devices: list[torch.device]) -> str:
    lines = [
        f"platform: {platform.platform()}",
        f"cpu: {cpu_name()}, {os.cpu_count()} logical cores, "
        f"torch threads {torch.get_num_threads()}",
        f"torch: {torch.__version__}, python {platform.python_version()}",
    ]
    for device in devices:
        if device.type == "cuda":
            lines.append(f"cuda: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    if not any(d.type == "cuda" for d in devices):
        lines.append(
            "cuda: not measured (no GPU available)"
            if not torch.cuda.is_available()
            else "cuda: available, not requested"
        )
    return "\n".join(lines)


def format_table(results: list[Result]) -> str:
    header = ("case", "input", "device", "ours ms", "torch ms", "ours/torch", "target")
    rows = []
    for r in results:
        verdict = "(info)" if r.informative else ("ok" if r.ratio <= TARGET_RATIO else "SLOW")
        rows.append(
            (
                r.case,
                "x".join(map(str, r.shape)),
                r.device,
                f"{r.ours_ms:.3f}",
                f"{r.torch_ms:.3f}",
                f"{r.ratio:.2f}x",
                verdict,
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {3, 4, 5}  # numbers align right

    def fmt(row: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, rows)])


def resolve_devices(choice: str) -> list[torch.device]:
    if choice == "cpu":
        return [torch.device("cpu")]
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA device is available")
        return [torch.device("cuda")]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def run(device: str = "auto", repeats: int | None = None, quick: bool = False) -> list[Result]:
    """Measure every case on every requested device and return the rows of the table."""
    devices = resolve_devices(device)
    if repeats is None:
        repeats = 5 if quick else 15
    min_time = 0.005 if quick else 0.2
    return [measure(case, dev, repeats, min_time) for dev in devices for case in make_cases(quick)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: CPU, and CUDA as well when present (default)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per case (default 15, or 5 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small shapes and few repeats: runs in a few seconds"
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but no CUDA device is available")

    print(describe_machine(resolve_devices(args.device)))
    print(
        f"mode: {'quick' if args.quick else 'full'}, training mode, forward + backward, "
        f"median over rounds, target ours/torch <= {TARGET_RATIO}\n"
    )
    results = run(args.device, args.repeats, args.quick)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
