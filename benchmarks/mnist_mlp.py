"""Training steps per second of the ``bn-mlp`` loop against a tutorial-style loop.

Baseline (the usual tutorial): ``torch.utils.data.DataLoader`` over a ``TensorDataset`` of the
MNIST training split, batch 60, shuffled; each batch moved to the device; ``loss.item()`` every
step for the running loss. Ours: ``classicnets.train.classifier.train_classifier``, which keeps the
split as one tensor on the device, slices shuffled index batches and reads the loss back once per
logging interval. Same model (3x100 sigmoid MLP with BN, as ``bn-mlp``), same SGD optimizer, same
number of steps, in the same process, alternating the two loops over several rounds.

    python benchmarks/mnist_mlp.py [--device auto|cpu|cuda] [--steps 2000] [--rounds 3] [--quick]

Prints steps per second of each and the ratio ours / baseline (targets: >= 1.5x on CPU,
>= 10x on a GPU), and, as a ceiling, the rate of the bare training step on one batch gathered
beforehand: the model's forward, backward and optimizer step with no data path at all, through
autograd and ``torch.optim.SGD``. On CPU also the same step written out (``train.mlp_step``,
what ``train_classifier`` runs for this model, bit-identical to the bare step) and its ratio to
the bare step (target >= 1.3x at one thread), and as the floor of any step its matrix products
alone, on the same shapes. Run it with ``OMP_NUM_THREADS=1`` for the one-thread figures.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from classicnets.data.batching import ShuffledBatches
from classicnets.data.tensors import load_image_data
from classicnets.experiments.bn_mlp import BNMLPConfig, build_model
from classicnets.experiments.common import resolve_device
from classicnets.train.classifier import train_classifier
from classicnets.train.mlp_step import MLPStep
from classicnets.train.params import param_groups
from classicnets.train.settings import TrainSettings, make_optimizer


def baseline_loop(model, train_x_cpu, train_y_cpu, steps, lr, device) -> float:
    """The tutorial loop; returns seconds for ``steps`` optimization steps."""
    loader = DataLoader(TensorDataset(train_x_cpu, train_y_cpu), batch_size=60, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    running_loss = 0.0
    done = 0
    start = time.perf_counter()
    while done < steps:
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            model.train()
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            done += 1
            if done == steps:
                break
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def our_loop(model, data, steps, lr, device) -> float:
    settings = TrainSettings(
        steps=steps,
        batch_size=60,
        lr=lr,
        eval_every=10**9,  # no evaluation inside the timed span, except the one at the end
        log_every=100,
        checkpoint_every=0,
        progress=False,
    )
    start = time.perf_counter()
    # train_classifier evaluates at step 0 and at the end; time those out to compare steps only.
    result = train_classifier(model, data, settings, run=None, variant="bench")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    return min(total, result["train_time_s"])


def bare_step_loop(model, data, steps, lr, device) -> float:
    """The floor: the same forward, backward and optimizer step as ``train_classifier`` (the
    optimizer it builds), on one batch gathered beforehand; no data path, logging or checks.

    No loop over this model and optimizer can be faster, so ``baseline / bare`` bounds the
    ratio any loop can reach over the baseline on this machine.
    """
    settings = TrainSettings(steps=steps, batch_size=60, lr=lr)
    optimizer = make_optimizer(param_groups(model), settings)
    index = torch.randperm(len(data.train_x), device=device)[:60]
    xb, yb = data.train_x[index], data.train_y[index]
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def written_step_loop(model, data, steps, lr, device) -> float:
    """``bare_step_loop`` with the step of ``train.mlp_step`` (what ``train_classifier`` runs
    for this model): the same forward, backward and SGD update, written out. CPU only."""
    settings = TrainSettings(steps=steps, batch_size=60, lr=lr)
    optimizer = make_optimizer(param_groups(model), settings)
    step = MLPStep.of(model, optimizer)
    if step is None:
        raise SystemExit(f"train.mlp_step does not cover this model on {device}")
    index = torch.randperm(len(data.train_x), device=device)[:60]
    xb, yb = data.train_x[index], data.train_y[index]
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        step(xb, yb)
    return time.perf_counter() - start


def products_loop(model, steps: int) -> float:
    """The floor of any step: only its matrix products, on the same shapes (batch 60): the
    forward product of each layer, and in the backward pass each weight's gradient and each
    hidden layer's input gradient (none for the input images)."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = torch.rand(60, weights[0].shape[1], device=weights[0].device)
    start = time.perf_counter()
    for _ in range(steps):
        inputs = [x]
        for w in weights:
            inputs.append(torch.mm(inputs[-1], w.t()))
        g = inputs.pop()
        for i in range(len(weights) - 1, -1, -1):
            torch.mm(g.t(), inputs[i])
            if i:
                g = torch.mm(g, weights[i])
    if weights[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def data_path_ms(train_x_cpu, train_y_cpu, data, batches: int) -> tuple[float, float]:
    """Milliseconds per batch of each loop's data path alone (no model): the DataLoader's
    per-example indexing and collation, against our shuffled index batch and two gathers."""
    loader = iter(DataLoader(TensorDataset(train_x_cpu, train_y_cpu), batch_size=60, shuffle=True))
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    theirs = (time.perf_counter() - start) / batches
    order = ShuffledBatches(len(data.train_x), 60, seed=0, device=data.train_x.device)
    start = time.perf_counter()
    for _ in range(batches):
        index = next(order)
        data.train_x.index_select(0, index), data.train_y.index_select(0, index)
    if data.train_x.is_cuda:
        torch.cuda.synchronize()
    ours = (time.perf_counter() - start) / batches
    return 1e3 * theirs, 1e3 * ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="200 steps, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 200, 1
    device = resolve_device(args.device)
    config = BNMLPConfig()
    data = load_image_data("mnist", args.data_dir, device)
    cpu_x, cpu_y = data.train_x.cpu(), data.train_y.cpu()

    print(f"machine: {platform.machine()} {platform.processor() or ''}".strip())
    print(f"cpus: {torch.get_num_threads()} threads | torch {torch.__version__} | device {device}")
    if device.startswith("cuda"):
        print(f"gpu: {torch.cuda.get_device_name()}")
    print(f"model: bn-mlp 'bn' variant, batch 60, SGD lr {config.lr_bn}, {args.steps} steps/round")

    def fresh():
        torch.manual_seed(0)
        return build_model(config, "bn").to(device)

    # warm-up of both paths (allocator, kernels, DataLoader worker-less iteration)
    baseline_loop(fresh(), cpu_x, cpu_y, 50, config.lr_bn, device)
    our_loop(fresh(), data, 50, config.lr_bn, device)
    bare_step_loop(fresh(), data, 50, config.lr_bn, device)
    cpu = device == "cpu"
    if cpu:
        written_step_loop(fresh(), data, 50, config.lr_bn, device)
    products_loop(fresh(), 50)
    times: dict[str, list[float]] = {"base": [], "ours": [], "bare": [], "written": [], "mm": []}
    for _ in range(args.rounds):
        times["base"].append(baseline_loop(fresh(), cpu_x, cpu_y, args.steps, config.lr_bn, device))
        times["ours"].append(our_loop(fresh(), data, args.steps, config.lr_bn, device))
        times["bare"].append(bare_step_loop(fresh(), data, args.steps, config.lr_bn, device))
        if cpu:
            times["written"].append(written_step_loop(fresh(), data, args.steps, config.lr_bn,
                                                      device))  # fmt: skip
        times["mm"].append(products_loop(fresh(), args.steps))
    rate = {k: args.steps / statistics.median(v) for k, v in times.items() if v}
    print(f"{'loop':<48}{'steps/s':>10}{'ms/step':>10}")
    for key, name in (
        ("base", "baseline (DataLoader, TensorDataset)"),
        ("ours", "classicnets train_classifier"),
        ("bare", "bare step (autograd + SGD, one batch)"),
        ("written", "written-out step (train.mlp_step, one batch)"),
        ("mm", "matrix products alone (same shapes)"),
    ):
        if key in rate:
            print(f"{name:<48}{rate[key]:>10.0f}{1e3 / rate[key]:>10.3f}")
    print(f"ratio ours / baseline: {rate['ours'] / rate['base']:.2f}x")
    print(f"ceiling bare / baseline: {rate['bare'] / rate['base']:.2f}x (for autograd's step)")
    if "written" in rate:
        print(f"step: written-out / bare {rate['written'] / rate['bare']:.2f}x (target >= 1.3x); "
              f"products alone / bare {rate['mm'] / rate['bare']:.2f}x (the floor)")  # fmt: skip
    theirs_ms, ours_ms = data_path_ms(cpu_x, cpu_y, data, min(args.steps, 900))
    print(f"data path alone, ms/batch: DataLoader {theirs_ms:.3f}, ours {ours_ms:.3f}")


if __name__ == "__main__":
    main()
