"""Export trained models: a NumPy bundle anyone can read and port, and ONNX.

    from classicnets.experiments.export import export_run   # a run folder's models
    from classicnets.export import export_numpy, load_bundle, run_bundle

    export_run("runs/bn-mlp-...", "numpy", fold_bn=True)    # RUN_DIR/export/<variant>-folded/
    export_run("runs/bn-mlp-...", "onnx")                   # RUN_DIR/export/<variant>.onnx
    export_numpy(model, info, "out/bundle")                 # any model, described by info
    bundle = load_bundle("runs/bn-mlp-.../export/bn")
    logits = run_bundle(bundle, images)                     # NumPy only

Modules:
    numpy_bundle   the bundle format: ``write_bundle``, ``load_bundle``, ``ExportError`` (NumPy)
    numpy_runtime  one function per layer and ``run_bundle`` (NumPy only, never imports torch)
    predict        ``classicnets predict``: images and text through a bundle (NumPy only)
    graph          torch.fx tracing and the registry of op converters (torch)
    exporter       ``export_numpy`` and the checks against PyTorch (torch), on models: run
                   folders are ``classicnets.experiments.export.export_run``'s business
    onnx_export    ``export_onnx``, checked with onnxruntime (torch, onnx)

Importing this package does not import torch: the torch-side names below are loaded on first
use, so ``load_bundle``/``run_bundle`` and ``classicnets predict`` work without torch installed.
"""

from __future__ import annotations

import importlib

from classicnets.export.numpy_bundle import Bundle, ExportError, load_bundle, write_bundle
from classicnets.export.numpy_runtime import run_bundle

__all__ = [
    "Bundle",
    "ExportError",
    "ExportReport",
    "export_numpy",
    "export_onnx",
    "load_bundle",
    "run_bundle",
    "trace_layers",
    "write_bundle",
]

_LAZY = {
    "ExportReport": "classicnets.export.exporter",
    "export_numpy": "classicnets.export.exporter",
    "export_onnx": "classicnets.export.onnx_export",
    "trace_layers": "classicnets.export.graph",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'classicnets.export' has no attribute {name!r}")
