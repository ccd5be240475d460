"""Export trained models and run folders, each export checked against PyTorch before it is kept.

    export_numpy(model, info, out_dir, fold_bn=False)   -> ExportReport  (a NumPy bundle)
    export_onnx(model, info, path, fold_bn=False)       -> ExportReport  (see onnx_export.py)
    export_run(run_dir, "numpy" | "onnx", ...)          -> [ExportReport, ...] one per variant

``info`` is ``TrainedModel.info`` (``experiments.common``): ``kind``, ``input_shape`` (one
example, no batch axis), ``input_dtype``, ``preprocessing``, ``class_names`` or ``vocabulary``.
Models with several inputs describe them in ``info["inputs"]``: a list of ``{"name", "shape",
"dtype", "high"}`` (``high``: exclusive upper bound of an integer input, such as a class label).
Language models with an ``init_hidden(batch_size)`` method get their hidden state as an input.

Every export runs the exported model (NumPy runtime or onnxruntime) and PyTorch eager on the same
random inputs at batch sizes 1 and 4 and refuses to write a model whose maximum absolute error
exceeds ``tolerance`` times the output scale (the largest absolute output of PyTorch, or 1 if
that is smaller: see ``within_tolerance``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from classicnets.export.graph import trace_layers
from classicnets.export.numpy_bundle import CONVENTIONS, Bundle, ExportError, write_bundle
from classicnets.export.numpy_runtime import run_bundle

__all__ = [
    "CHECK_BATCH_SIZES",
    "TOLERANCE",
    "ExportReport",
    "check_parity",
    "compare_outputs",
    "example_inputs",
    "export_numpy",
    "flatten_outputs",
    "input_names",
    "input_specs",
    "is_sequence_model",
    "prepare_model",
    "within_tolerance",
]

TOLERANCE = 1e-5  # max |error| / max(output scale, 1) (float32 round-off is ~1e-7 of it)
CHECK_BATCH_SIZES = (1, 4)
_INFO_FIELDS = ("kind", "input_shape", "input_dtype", "preprocessing", "class_names", "vocabulary")


@dataclass
class ExportReport:
    """What an export wrote and how closely it reproduces PyTorch.

    Attributes:
        path: the bundle folder or ``.onnx`` file.
        format: ``numpy`` or ``onnx``.
        variant: the run's variant name (None for a bare model).
        fold_bn: whether BN was folded into the preceding layers.
        max_abs_error: largest ``|exported - torch|`` over the check batches and outputs.
        output_scale: largest ``|torch|`` over the same outputs.
        batch_sizes: the batch sizes checked.
    """

    path: Path
    format: str
    variant: str | None
    fold_bn: bool
    max_abs_error: float
    output_scale: float
    batch_sizes: tuple[int, ...]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def scaled_error(self) -> float:
        return self.max_abs_error / self.output_scale if self.output_scale > 0 else 0.0

    def summary(self) -> str:
        exporter = self.details.get("exporter")
        how = f", {exporter} exporter" if exporter else ""
        if self.details.get("failures"):
            how += " (the TorchScript graph failed the check)"
        return (
            f"{self.variant or 'model'} ({self.format}{', BN folded' if self.fold_bn else ''}): "
            f"{self.path}; max |error| vs torch {self.max_abs_error:.2e} "
            f"({self.scaled_error:.1e} of output scale {self.output_scale:.3g}), "
            f"batch sizes {', '.join(map(str, self.batch_sizes))}{how}"
        )


# --------------------------------------------------------------------------- inputs and outputs


def _num_classes(info: dict[str, Any]) -> int:
    return int(info.get("num_classes") or len(info.get("class_names") or []) or 10)


def input_specs(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The model's inputs, one example each (no batch axis): ``info["inputs"]`` if given, else
    ``input`` from ``input_shape``/``input_dtype``, plus ``labels`` (int64, one per example)
    for a conditional model (``info["conditional"]``)."""
    if info.get("inputs"):
        return [dict(spec) for spec in info["inputs"]]
    dtype = str(info.get("input_dtype", "float32"))
    spec = {"name": "input", "shape": list(info["input_shape"]), "dtype": dtype}
    if dtype in ("int64", "long"):
        spec["high"] = len(info.get("vocabulary") or info.get("class_names") or [0, 1])
    specs = [spec]
    if info.get("conditional"):
        specs.append({"name": "labels", "shape": [], "dtype": "int64", "high": _num_classes(info)})
    return specs


def is_sequence_model(info: dict[str, Any]) -> bool:
    """Language models: the last axis of their first input is the (variable) sequence."""
    return info.get("kind") == "language_model"


def example_inputs(
    model: nn.Module, info: dict[str, Any], batch_size: int, seed: int = 0, extra_length: int = 0
) -> tuple:
    """Random inputs for ``model.forward``: floats uniform in [0, 1), integers in [0, high).

    The batch axis is axis 0 of each input (``info["batch_axis"]`` moves it, e.g. 1 for
    sequence-first token batches). Language models get ``extra_length`` more tokens per
    sequence and, with ``init_hidden``, their zero hidden state as the last argument.
    """
    g = torch.Generator().manual_seed(seed)
    device = _device_of(model)
    out = []
    batch_axis = int(info.get("batch_axis", 0))
    for i, spec in enumerate(input_specs(info)):
        shape = list(spec["shape"])
        if i == 0 and is_sequence_model(info):
            shape[-1] += extra_length
        shape.insert(int(spec.get("batch_axis", batch_axis)), batch_size)
        if spec["dtype"] in ("int64", "long"):
            x = torch.randint(0, int(spec.get("high", 2)), shape, generator=g)
        else:
            x = torch.rand(shape, generator=g)
        out.append(x.to(device))
    if info.get("kind") == "language_model" and hasattr(model, "init_hidden"):
        out.append(model.init_hidden(batch_size))
    return tuple(out)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def input_names(model: nn.Module, info: dict[str, Any], inputs: tuple) -> list[str]:
    """Flat names of the inputs: those of ``input_specs(info)`` (``input``, ``labels``), then
    a language model's initial state, named as PyTorch's documentation names it (``h_0``, and
    ``c_0`` for an LSTM); other arguments take ``forward``'s parameter names, with ``_0``,
    ``_1`` for the parts of a tuple."""
    params = list(inspect.signature(model.forward).parameters)
    given = [spec["name"] for spec in input_specs(info)]
    names = []
    for i, value in enumerate(inputs):
        if i < len(given):
            base = given[i]
        elif is_sequence_model(info) and i == len(given):
            names += ["h_0", "c_0"][: len(value)] if isinstance(value, (tuple, list)) else ["h_0"]
            continue
        else:
            base = params[i] if i < len(params) else f"input{i}"
        if isinstance(value, (tuple, list)):
            names += [f"{base}_{j}" for j in range(len(value))]
        else:
            names.append(base)
    return names


def flatten_outputs(value) -> list:
    """Tensors/arrays of a nested output structure, depth first."""
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in flatten_outputs(item)]
    return [value]


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def compare_outputs(reference, candidate) -> tuple[float, float]:
    """``(max abs error, output scale)`` over the flattened outputs."""
    refs, cands = flatten_outputs(reference), flatten_outputs(candidate)
    if len(refs) != len(cands):
        raise ExportError(f"the export returns {len(cands)} outputs, torch {len(refs)}")
    error, scale = 0.0, 0.0
    for r, c in zip(refs, cands):
        r, c = _numpy(r).astype(np.float64), _numpy(c).astype(np.float64)
        if r.shape != c.shape:
            raise ExportError(f"output shape {list(c.shape)} differs from torch's {list(r.shape)}")
        if r.size:
            error = max(error, float(np.abs(r - c).max()))
            scale = max(scale, float(np.abs(r).max()))
    return error, scale


def _to_numpy_inputs(inputs: tuple) -> tuple:
    return tuple(
        tuple(_numpy(v) for v in x) if isinstance(x, (tuple, list)) else _numpy(x) for x in inputs
    )


def prepare_model(model: nn.Module, fold_bn: bool) -> nn.Module:
    """The model to export: eval mode on CPU, with BN folded into the layer before it if asked."""
    from classicnets.nn import fold_bn as fold

    model = model.eval()
    if _device_of(model).type != "cpu":
        import copy

        model = copy.deepcopy(model).cpu()
    return fold(model) if fold_bn else model


def within_tolerance(error: float, scale: float, tolerance: float = TOLERANCE) -> bool:
    """``error <= tolerance * max(scale, 1)``: relative to the output scale, never tighter than
    ``tolerance`` absolute. Float32 round-off follows the magnitudes *inside* the network (O(1)
    here), so an output near zero (an untrained discriminator's logits, ~0.006) cannot be
    matched to 1e-5 of itself; its absolute error is still ~1e-7."""
    return error <= tolerance * max(scale, 1.0)


def check_parity(tolerance, error, scale, what: str) -> None:
    """Raise ``ExportError`` (nothing written) unless ``error`` is within ``tolerance`` of
    ``scale``."""
    if not within_tolerance(error, scale, tolerance):
        raise ExportError(
            f"{what} differs from PyTorch: max |error| {error:.3g} is more than {tolerance:g} "
            f"of the output scale {scale:.3g}; nothing was written"
        )


# --------------------------------------------------------------------------- the NumPy bundle


def build_bundle(model: nn.Module, info: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """The manifest (without the format fields) and tensors of ``model`` (eval mode)."""

    def make(batch: int, extra_length: int = 0) -> tuple:
        return example_inputs(model, info, batch, seed=batch, extra_length=extra_length)

    graph = trace_layers(model, make, sequence=is_sequence_model(info))
    names = input_names(model, info, make(1))
    rename = {spec["name"]: new for spec, new in zip(graph.inputs, names)}
    layers = [
        {**layer, "inputs": [rename.get(v, v) for v in layer["inputs"]]} for layer in graph.layers
    ]
    inputs = [{**spec, "name": rename[spec["name"]]} for spec in graph.inputs]
    optional = {}
    if info.get("kind") == "language_model" and hasattr(model, "init_hidden"):
        first = inputs[0]
        batch_axis = first["shape"].index(None) if None in first["shape"] else 0
        for spec in inputs[1:]:  # the hidden state: zeros unless given
            optional[spec["name"]] = {"batch_from": first["name"], "batch_axis": batch_axis}
    manifest = {
        "model": {"class": type(model).__name__},
        **{k: info[k] for k in _INFO_FIELDS if k in info},
        "info": {k: v for k, v in info.items() if k not in _INFO_FIELDS and k != "inputs"},
        "inputs": inputs,
        "input_structure": _rename_structure(graph.input_structure, rename),
        "optional_inputs": optional,
        "outputs": _rename_structure(graph.outputs, rename),
        "conventions": CONVENTIONS,
        "layers": layers,
    }
    return manifest, graph.tensors


def _rename_structure(structure, rename: dict):
    if isinstance(structure, str):
        return rename.get(structure, structure)
    return [_rename_structure(s, rename) for s in structure]


def export_numpy(
    model: nn.Module,
    info: dict[str, Any],
    out_dir: str | Path,
    fold_bn: bool = False,
    tolerance: float = TOLERANCE,
    batch_sizes: Sequence[int] = CHECK_BATCH_SIZES,
    metadata: dict[str, Any] | None = None,
) -> ExportReport:
    """Write ``model`` as a NumPy bundle in ``out_dir`` after checking it against PyTorch.

    Args:
        model: the trained model (put in eval mode here).
        info: ``TrainedModel.info`` (see the module docstring).
        out_dir: the bundle folder.
        fold_bn: fold each BN into the Linear/Conv before it (``classicnets.nn.fold_bn``).
        tolerance: largest accepted ``max |numpy - torch| / max |torch|``.
        batch_sizes: batch sizes of the check.
        metadata: merged into the manifest's ``model`` record (run, variant, step, ...).

    Raises:
        ExportError: the model cannot be converted, or the NumPy runtime disagrees with PyTorch.
    """
    model = prepare_model(model, fold_bn)
    manifest, tensors = build_bundle(model, info)
    manifest["model"].update(metadata or {})
    manifest["bn_folded"] = bool(fold_bn)
    bundle = Bundle(Path(out_dir), manifest, tensors)
    error, scale = 0.0, 0.0
    for batch in batch_sizes:
        inputs = example_inputs(model, info, batch, seed=100 + batch)
        with torch.no_grad():
            reference = model(*inputs)
        e, s = compare_outputs(reference, run_bundle(bundle, _to_numpy_inputs(inputs)))
        error, scale = max(error, e), max(scale, s)
    check_parity(tolerance, error, scale, "the NumPy runtime")
    manifest["check"] = {
        "max_abs_error": error,
        "output_scale": scale,
        "batch_sizes": list(batch_sizes),
        "reference": f"torch {torch.__version__} eager, eval mode, float32, CPU",
    }
    path = write_bundle(out_dir, manifest, tensors)
    return ExportReport(path, "numpy", None, fold_bn, error, scale, tuple(batch_sizes))
