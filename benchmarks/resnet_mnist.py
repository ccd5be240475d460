"""Training images per second of the ``resnet-vs-mlp`` loop against a tutorial-style loop.

Baseline (the usual tutorial): ``DataLoader`` over a ``TensorDataset`` of the MNIST training
split, shuffled, each batch moved to the device, default (NCHW) memory format, ``loss.item()``
every step. Ours: ``train_classifier`` with the experiment's settings (whole split on the device,
index batches, channels-last). Same model (the experiment's ``resnet-medium`` by default), same
batch size, same optimizer (SGD with Nesterov momentum), in the same process, alternating over
rounds.

    python benchmarks/resnet_mnist.py [--device auto|cpu|cuda] [--steps 60] [--rounds 2]
                                      [--model resnet-medium] [--quick] [--time-to 0.995]

``--time-to ACC`` (for a GPU) also trains the full experiment recipe and reports the wall time
until the test accuracy first reaches ACC.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from classicnets.data.tensors import load_image_data
from classicnets.experiments.common import resolve_device, train_settings
from classicnets.experiments.resnet_vs_mlp import ResNetVsMLPConfig, build_model
from classicnets.train.classifier import train_classifier


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def baseline_loop(model, x_cpu, y_cpu, steps, batch_size, lr, device) -> float:
    loader = DataLoader(TensorDataset(x_cpu, y_cpu), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    done, running = 0, 0.0
    start = time.perf_counter()
    while done < steps:
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            model.train()
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running += loss.item()
            done += 1
            if done == steps:
                break
    _sync(device)
    return time.perf_counter() - start


def our_loop(model, data, config, steps, device) -> float:
    settings = train_settings(
        config, steps=steps, lr=config.lr_resnet, eval_every=10**9, checkpoint_every=0,
        progress=False, schedule="constant",
    )  # fmt: skip
    result = train_classifier(model, data, settings)
    _sync(device)
    return result["train_time_s"]


def time_to_accuracy(config, data, device, target) -> float | None:
    """Seconds from the start of training until the test accuracy first reaches ``target``
    (evaluation time included), with the full experiment recipe; None if never reached."""
    import tempfile

    from classicnets.data.augment import random_shift
    from classicnets.train.run import RunDir

    torch.manual_seed(config.seed)
    model = build_model(config, "resnet").to(device)
    steps = config.epochs * (len(data.train_x) // config.batch_size)
    settings = train_settings(config, steps=steps, lr=config.lr_resnet, progress=False)
    start = time.perf_counter()

    def stamp(_model) -> dict:  # an eval hook: its fields join each test record
        _sync(device)
        return {"elapsed_s": time.perf_counter() - start}

    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp)
        train_classifier(
            model, data, settings, run, "resnet", eval_hooks=[stamp],
            augment=lambda x, s: random_shift(x, s, config.max_shift, config.seed),
        )  # fmt: skip
        tests = [r for r in run.read_metrics() if r["split"] == "test"]
    return next((r["elapsed_s"] for r in tests if r["accuracy"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=ResNetVsMLPConfig.resnet_model)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="10 steps, 1 round")
    parser.add_argument("--time-to", type=float, default=None, metavar="ACC")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 10, 1
    device = resolve_device(args.device)
    config = ResNetVsMLPConfig(resnet_model=args.model, batch_size=args.batch_size)
    data = load_image_data("mnist", args.data_dir, device)
    x_cpu, y_cpu = data.train_x.cpu(), data.train_y.cpu()
    print(f"machine: {platform.machine()} {platform.processor() or ''}".strip())
    print(f"threads {torch.get_num_threads()} | torch {torch.__version__} | device {device}")
    if device.startswith("cuda"):
        print(f"gpu: {torch.cuda.get_device_name()}")
    print(f"model {args.model}, batch {args.batch_size}, {args.steps} steps per round")

    def fresh():
        torch.manual_seed(0)
        return build_model(config, "resnet").to(device)

    baseline_loop(fresh(), x_cpu, y_cpu, 3, args.batch_size, config.lr_resnet, device)
    our_loop(fresh(), data, config, 3, device)
    base, ours = [], []
    for _ in range(args.rounds):
        t = baseline_loop(fresh(), x_cpu, y_cpu, args.steps, args.batch_size, config.lr_resnet,
                          device)  # fmt: skip
        base.append(args.steps * args.batch_size / t)
        ours.append(args.steps * args.batch_size / our_loop(fresh(), data, config, args.steps,
                                                            device))  # fmt: skip
    b, o = statistics.median(base), statistics.median(ours)
    print(f"{'loop':<40}{'images/s':>10}")
    print(f"{'baseline (DataLoader, NCHW)':<40}{b:>10.0f}")
    print(f"{'classicnets train_classifier (NHWC)':<40}{o:>10.0f}")
    print(f"ratio ours / baseline: {o / b:.2f}x")
    if args.time_to is not None:
        seconds = time_to_accuracy(config, data, device, args.time_to)
        if seconds is None:
            print(f"test accuracy {args.time_to:.2%} not reached in {config.epochs} epochs")
        else:
            print(f"time to {args.time_to:.2%} test accuracy: {seconds:.0f} s")


if __name__ == "__main__":
    main()
