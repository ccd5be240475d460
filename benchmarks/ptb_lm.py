"""Training tokens per second of the ``rnn-vs-lstm`` LSTM loop against a tutorial-style loop.

Baseline (pytorch/examples ``word_language_model/main.py``, the usual way): the batchified
training stream stays on the CPU and each window is sliced and moved to the device
(``.to(device)``); the hidden state is re-created every window by ``repackage_hidden`` (new
detached tensors); ``model.zero_grad()``; ``CrossEntropyLoss``; ``clip_grad_norm_``; a manual SGD
update ``p.data.add_(p.grad, alpha=-lr)`` per parameter; ``total_loss += loss.item()`` every step.
Ours: ``classicnets.train.language_model.train_language_model``: the stream lives on the device,
windows are views, the hidden state is detached in place of a copy, SGD is one fused
(``foreach``) update, and losses are read back once per logging interval.

Both train the same model (``RNNLanguageModel``, the LSTM of Zaremba et al.'s small or medium
configuration, same seed), on the same windows, with the same loss scale (summed over time,
averaged over the batch), clipping and learning rate, in the same process, alternating over
several short rounds; the fastest round of each counts (on a shared machine the others measure
the neighbours' load; the median ratio is printed too).

    python benchmarks/ptb_lm.py [--device auto|cpu|cuda] [--configs small,medium] [--rounds 5]
                                [--quick]

Prints tokens per second of each loop and the ratio ours / baseline for each configuration.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from classicnets.data.ptb import batchify, load_ptb, num_windows
from classicnets.experiments.common import resolve_device
from classicnets.experiments.rnn_vs_lstm import RNNvsLSTMConfig, build_model, lm_settings
from classicnets.train.language_model import train_language_model

STEPS = {"small": 50, "medium": 10, "large": 5}  # windows per round
QUICK_STEPS = {"small": 20, "medium": 4, "large": 2}


def repackage_hidden(h):
    """pytorch/examples: wrap hidden states in new tensors, to detach them from their history."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def baseline_loop(model, cpu_data, steps, settings, device) -> float:
    """The tutorial loop over the first ``steps`` windows; returns the seconds it took."""
    criterion = nn.CrossEntropyLoss()
    vocab = model.vocab_size
    n = settings.num_steps
    model.train()
    hidden = model.init_hidden(settings.batch_size)
    total_loss = 0.0
    start = time.perf_counter()
    for i in range(0, steps * n, n):
        seq_len = min(n, cpu_data.shape[1] - 1 - i)
        data = cpu_data[:, i : i + seq_len].to(device)  # [B, n]
        targets = cpu_data[:, i + 1 : i + 1 + seq_len].to(device)  # [B, n]
        hidden = repackage_hidden(hidden)
        model.zero_grad()
        output, hidden = model(data, hidden)  # [B, n, V]
        # mean over tokens times the window length = summed over time, averaged over the batch
        loss = criterion(output.view(-1, vocab), targets.reshape(-1)) * seq_len
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad_norm)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-settings.lr)
        total_loss += loss.item()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def our_loop(model, train_ids, steps, settings, device) -> float:
    settings.stop_after = steps
    start = time.perf_counter()
    result = train_language_model(model, train_ids, settings, run=None, variant="bench")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return min(time.perf_counter() - start, result["train_time_s"])


def bench(name, corpus, device, steps, rounds):
    config = RNNvsLSTMConfig(config=name, progress=False)
    settings = lm_settings(config, "lstm")
    settings.epochs, settings.log_every, settings.checkpoint_every = 1, 100, 0
    cpu_data = batchify(corpus.train, settings.batch_size)
    steps = min(steps, num_windows(cpu_data.shape[1], settings.num_steps))
    device_ids = corpus.train.to(device)

    def fresh():
        torch.manual_seed(0)
        return build_model(config, "lstm", len(corpus.vocabulary)).to(device)

    baseline_loop(fresh(), cpu_data, max(1, steps // 10), settings, device)  # warm-up
    our_loop(fresh(), device_ids, max(1, steps // 10), settings, device)
    base_times, our_times = [], []
    for _ in range(rounds):
        base_times.append(baseline_loop(fresh(), cpu_data, steps, settings, device))
        our_times.append(our_loop(fresh(), device_ids, steps, settings, device))
    tokens = steps * settings.batch_size * settings.num_steps
    base, ours = tokens / min(base_times), tokens / min(our_times)
    median_ratio = statistics.median(base_times) / statistics.median(our_times)
    p = config.resolved()
    print(
        f"\n{name}: LSTM {p['num_layers']}x{p['hidden_size']}, batch {p['batch_size']}, "
        f"{p['num_steps']}-step windows, dropout {p['dropout']}, {steps} windows x {rounds} rounds"
    )
    print(f"  {'loop':<44}{'tokens/s':>10}")
    print(f"  {'baseline (tutorial: .to(device), repackage)':<44}{base:>10.0f}")
    print(f"  {'classicnets train_language_model':<44}{ours:>10.0f}")
    print(
        f"  ratio ours / baseline: {ours / base:.2f}x (best rounds; medians: {median_ratio:.2f}x)"
    )
    return ours / base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--configs", default="small,medium")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="a few windows, 1 round")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.quick:
        args.rounds = 1
    corpus = load_ptb(args.data_dir)
    print(f"machine: {platform.machine()} {platform.processor() or ''}".strip())
    print(f"cpus: {torch.get_num_threads()} threads | torch {torch.__version__} | device {device}")
    if device.startswith("cuda"):
        print(f"gpu: {torch.cuda.get_device_name()}")
    for name in args.configs.split(","):
        steps = (QUICK_STEPS if args.quick else STEPS)[name]
        bench(name, corpus, device, steps, args.rounds)


if __name__ == "__main__":
    main()
