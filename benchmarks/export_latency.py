"""Inference latency of the exported models against PyTorch eager, on CPU.

For the MLP (``mlp-bn``: 784-100-100-100-10, sigmoid, BN; the bn-mlp experiment's model) and the
ResNet (``resnet-small``: bottleneck blocks, stages of planes 16-32-64) at batch sizes 1 and 256:

- torch eager: ``model.eval()`` under ``torch.inference_mode()`` (the baseline);
- the NumPy runtime on the bundle (BN as its own layer, and BN folded);
- onnxruntime on the ONNX export (BN folded into the convolutions by the exporter's constant
  folding either way).

Prints milliseconds per batch (median over repeats) and each one's ratio to torch eager
(> 1: slower). The target is the NumPy runtime within 2x of torch eager at batch 256.

    python benchmarks/export_latency.py [--repeats 20] [--threads N] [--models mlp-bn ...]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from classicnets.export import load_bundle, run_bundle
from classicnets.export.exporter import export_numpy
from classicnets.models import create_model
from classicnets.nn import is_batchnorm

INFO = {"kind": "classifier", "input_shape": [1, 28, 28], "input_dtype": "float32"}


def median_ms(fn, repeats: int, min_time: float = 0.2) -> float:
    """Median wall time of ``fn()`` in ms over at least ``repeats`` calls (after one warm-up)."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


@torch.no_grad()
def _trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """BN statistics away from their initial values, so no layer is trivially the identity."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if is_batchnorm(m):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def bench_model(name: str, batch_sizes, repeats: int, folder: Path, threads: int | None) -> list:
    torch.manual_seed(0)
    model = _trained_looking(create_model(name))
    bundles = {
        "numpy": load_bundle(export_numpy(model, INFO, folder / name).path),
        "numpy folded": load_bundle(export_numpy(model, INFO, folder / f"{name}-f", True).path),
    }
    session = None
    try:
        import onnxruntime as ort

        from classicnets.export.onnx_export import export_onnx

        path = export_onnx(model, INFO, folder / f"{name}.onnx").path
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except ImportError:
        warnings.warn("onnxruntime not installed: skipping it", stacklevel=1)
    rows = []
    for batch in batch_sizes:
        x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        x_np = x.numpy()

        def eager(x=x):
            with torch.inference_mode():
                return model(x)

        times = {"torch eager": median_ms(eager, repeats)}
        for label, bundle in bundles.items():
            times[label] = median_ms(lambda b=bundle, x=x_np: run_bundle(b, x), repeats)
        if session is not None:
            feed = {session.get_inputs()[0].name: x_np}
            times["onnxruntime"] = median_ms(lambda f=feed: session.run(None, f), repeats)
        rows.append({"model": name, "batch": batch, "times": times})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp-bn", "resnet-small"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch and onnxruntime intra-op threads (NumPy's BLAS: set OPENBLAS_NUM_THREADS / "
        "OMP_NUM_THREADS before starting)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, {platform.processor() or 'cpu'}, "
        f"torch threads {torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            row
            for name in args.models
            for row in bench_model(name, args.batch_sizes, args.repeats, Path(tmp), args.threads)
        ]
    labels = list(rows[0]["times"])
    header = f"{'model':<14}{'batch':>6}" + "".join(f"{label:>16}" for label in labels)
    print("\nms per batch (median)\n" + header)
    for row in rows:
        cells = "".join(f"{row['times'][label]:>16.3f}" for label in labels)
        print(f"{row['model']:<14}{row['batch']:>6}{cells}")
    print("\nratio to torch eager (> 1: slower)\n" + header)
    for row in rows:
        base = row["times"]["torch eager"]
        cells = "".join(f"{row['times'][label] / base:>16.2f}" for label in labels)
        print(f"{row['model']:<14}{row['batch']:>6}{cells}")
    worst = max(
        row["times"][label] / row["times"]["torch eager"]
        for row in rows
        if row["batch"] >= 256
        for label in labels
        if label.startswith("numpy")
    )
    verdict = "met" if worst <= 2.0 else "NOT met"
    print(f"\nNumPy runtime, batch >= 256: at most {worst:.2f}x torch eager (2x target {verdict})")


if __name__ == "__main__":
    main()
