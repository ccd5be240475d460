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
beforehand: the model's forward, backward and optimizer step with no data path at all.
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
    base_times, our_times, bare_times = [], [], []
    for _ in range(args.rounds):
        base_times.append(baseline_loop(fresh(), cpu_x, cpu_y, args.steps, config.lr_bn, device))
        our_times.append(our_loop(fresh(), data, args.steps, config.lr_bn, device))
        bare_times.append(bare_step_loop(fresh(), data, args.steps, config.lr_bn, device))
    base = args.steps / statistics.median(base_times)
    ours = args.steps / statistics.median(our_times)
    bare = args.steps / statistics.median(bare_times)
    print(f"{'loop':<40}{'steps/s':>10}{'ms/step':>10}")
    for name, rate in (
        ("baseline (DataLoader, TensorDataset)", base),
        ("classicnets train_classifier", ours),
        ("bare step (one batch, no data path)", bare),
    ):
        print(f"{name:<40}{rate:>10.0f}{1e3 / rate:>10.3f}")
    print(f"ratio ours / baseline: {ours / base:.2f}x")
    print(f"ceiling bare / baseline: {bare / base:.2f}x (no loop over this step can beat it)")
    theirs_ms, ours_ms = data_path_ms(cpu_x, cpu_y, data, min(args.steps, 900))
    print(f"data path alone, ms/batch: DataLoader {theirs_ms:.3f}, ours {ours_ms:.3f}")


if __name__ == "__main__":
    main()
