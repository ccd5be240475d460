"""ONNX export of any registered model, checked with onnxruntime before the file is written.

``export_onnx(model, info, path)`` exports the model in eval mode (BN as ``BatchNormalization``
in inference mode, or folded into the preceding layer with ``fold_bn=True``), opset 17, with a
dynamic batch axis on every input and output, and language models with their hidden state as
inputs (``hidden.0``, ``hidden.1`` = ``h``, ``c`` for an LSTM) and outputs. The file is kept only
if onnxruntime reproduces PyTorch eager to ``tolerance`` of the output scale at batch sizes 1 and
4. ``info`` and the run's metadata go into the model's ``metadata_props`` (key ``classicnets``).

Exporter: the TorchScript-based one (``torch.onnx.export(..., dynamo=False)``) by default. The
``torch.export``-based one (``exporter="dynamo"``) gives the same numbers here but takes about 7x
longer per model on CPU (6.7 s against 0.9 s for a small ResNet), prints progress and warnings
on every call, and needs onnxscript; the TorchScript exporter is mature for ``nn.LSTM`` with
hidden-state inputs. Both are kept working; the tests run the dynamo path once.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from classicnets.export.exporter import (
    CHECK_BATCH_SIZES,
    TOLERANCE,
    ExportReport,
    check_parity,
    compare_outputs,
    example_inputs,
    flatten_outputs,
    input_names,
    is_sequence_model,
    prepare_model,
)
from classicnets.export.numpy_bundle import ExportError

__all__ = ["OPSET", "export_onnx", "onnx_available", "run_onnx"]

OPSET = 17


def onnx_available() -> bool:
    """Whether ``onnx`` and ``onnxruntime`` can be imported (the ``onnx`` extra)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _require_onnx() -> None:
    if not onnx_available():
        raise ExportError("ONNX export needs onnx and onnxruntime: pip install 'classicnets[onnx]'")


def _output_names(info: dict[str, Any], outputs) -> list[str]:
    flat = flatten_outputs(outputs)
    if info.get("output_names"):
        return list(info["output_names"])
    if info.get("kind") == "language_model" and isinstance(outputs, tuple) and len(outputs) == 2:
        hidden = outputs[1]
        if isinstance(hidden, (tuple, list)):
            return ["logits", *["h_n", "c_n"][: len(hidden)]]
        return ["logits", "h_n"]
    return ["output"] if len(flat) == 1 else [f"output.{i}" for i in range(len(flat))]


def _dynamic_axes(names: list[str], runs: list[tuple[str, list, list]]):
    """``{name: {axis: label}}`` for the axes whose size differs between two runs.

    ``runs``: ``(label, tensors of the first run, tensors of another run)``, e.g. ``"batch"``
    against a run at another batch size and ``"sequence"`` against a longer sequence.
    """
    axes: dict[str, dict[int, str]] = {}
    for label, first, other in runs:
        for name, a, b in zip(names, first, other):
            for i, (p, q) in enumerate(zip(a.shape, b.shape)):
                if p != q:
                    axes.setdefault(name, {}).setdefault(i, label)
    return axes


def _dynamic_shapes(inputs: tuple, dynamic: dict, names: list[str]):
    """``dynamic_shapes`` for the torch.export-based exporter, mirroring ``forward``'s args."""
    dims = {label: torch.export.Dim(label) for axes in dynamic.values() for label in axes.values()}
    flat_names = iter(names)

    def spec(value):
        if isinstance(value, (tuple, list)):
            return tuple(spec(v) for v in value)
        axes = dynamic.get(next(flat_names), {})
        return {i: dims[label] for i, label in axes.items()} or None

    return tuple(spec(x) for x in inputs)


def _export_bytes(model, inputs, in_names, out_names, dynamic, opset, exporter) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is the legacy path, and tracing warns about the
        # Python-side shape checks of BatchNorm; neither changes the graph.
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                model,
                inputs,
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=dynamic,
                do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
            )
            return buffer.getvalue()
        if exporter == "dynamo":
            # Strict (TorchDynamo) capture keeps len(z) symbolic; the non-strict one, which
            # torch.onnx.export uses by itself, specializes it to the example's batch size.
            # (Its registry logs a warning per torchvision op when torchvision is absent.)
            logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
            shapes = _dynamic_shapes(inputs, dynamic, in_names)
            try:
                program = torch.export.export(model, inputs, dynamic_shapes=shapes, strict=True)
            except Exception:
                program = torch.export.export(model, inputs, dynamic_shapes=shapes, strict=False)
            onnx_program = torch.onnx.export(
                program,
                inputs,
                dynamo=True,
                opset_version=max(opset, 18),
                input_names=in_names,
                output_names=out_names,
                verbose=False,
            )
            return onnx_program.model_proto.SerializeToString()
    raise ExportError(f"exporter must be torchscript or dynamo, got {exporter!r}")


def run_onnx(session, names: list[str], inputs: tuple) -> list[np.ndarray]:
    """Run an onnxruntime session on ``forward``-style inputs (tuples are flattened)."""
    flat = [np.asarray(t.detach().cpu().numpy()) for t in flatten_outputs(inputs)]
    wanted = {i.name for i in session.get_inputs()}
    feed = {n: x for n, x in zip(names, flat) if n in wanted}
    return session.run(None, feed)


def export_onnx(
    model: nn.Module,
    info: dict[str, Any],
    path: str | Path,
    fold_bn: bool = False,
    opset: int = OPSET,
    tolerance: float = TOLERANCE,
    batch_sizes: Sequence[int] = CHECK_BATCH_SIZES,
    metadata: dict[str, Any] | None = None,
    exporter: str = "auto",
) -> ExportReport:
    """Export ``model`` to ONNX at ``path``, checked with onnxruntime against PyTorch eager.

    Args:
        model: the trained model (put in eval mode here).
        info: ``TrainedModel.info`` (see ``exporter``).
        path: the ``.onnx`` file to write (atomically, and only if the check passes).
        fold_bn: fold each BN into the Linear/Conv before it first.
        opset: ONNX opset (17 by default; the dynamo exporter uses at least 18).
        tolerance: largest accepted ``max |onnxruntime - torch| / max |torch|``.
        batch_sizes: batch sizes of the check (the graph has a dynamic batch axis).
        metadata: run, variant, step, ... stored with ``info`` in ``metadata_props``.
        exporter: ``torchscript``, ``dynamo``, or ``auto`` (default): TorchScript, and the
            dynamo exporter if the TorchScript graph fails the check (it records Python ints
            such as ``len(z)`` as constants, so such a graph fails at another batch size).

    Raises:
        ExportError: onnx/onnxruntime are missing, export fails, or onnxruntime disagrees with
            PyTorch beyond ``tolerance``.
    """
    _require_onnx()
    from classicnets.files import atomic_write_bytes

    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ExportError(f"exporter must be auto, torchscript or dynamo, got {exporter!r}")
    model = prepare_model(model, fold_bn)
    inputs_a = example_inputs(model, info, 2, seed=2)
    others = [("batch", example_inputs(model, info, 3, seed=3))]
    if is_sequence_model(info):
        others.append(("sequence", example_inputs(model, info, 2, seed=4, extra_length=1)))
    with torch.no_grad():
        outputs_a = model(*inputs_a)
        runs = [(label, flatten_outputs(x) + flatten_outputs(model(*x))) for label, x in others]
    in_names = input_names(model, info, inputs_a)
    out_names = _output_names(info, outputs_a)
    first = flatten_outputs(inputs_a) + flatten_outputs(outputs_a)
    dynamic = _dynamic_axes(in_names + out_names, [(lab, first, t) for lab, t in runs])
    record = {"info": info, "model": metadata or {}, "bn_folded": bool(fold_bn)}

    failures = []
    for name in ("torchscript", "dynamo") if exporter == "auto" else (exporter,):
        try:
            data = _export_bytes(model, inputs_a, in_names, out_names, dynamic, opset, name)
            data = _with_metadata(data, record)
            error, scale = _check_with_onnxruntime(data, model, info, in_names, batch_sizes)
            check_parity(tolerance, error, scale, f"onnxruntime ({name} exporter)")
        except Exception as exc:  # export errors, onnxruntime errors, failed checks
            failures.append(f"{name} exporter: {str(exc).splitlines()[0][:300]}")
            continue
        path = atomic_write_bytes(path, data)
        details = {"opset": _opset(data), "exporter": name, "inputs": in_names,
                   "outputs": out_names, "dynamic_axes": dynamic, "failures": failures}  # fmt: skip
        return ExportReport(path, "onnx", None, fold_bn, error, scale, tuple(batch_sizes), details)
    raise ExportError(
        f"ONNX export of {type(model).__name__} failed; nothing was written: " + "; ".join(failures)
    )


def _with_metadata(data: bytes, record: dict[str, Any]) -> bytes:
    """Check the model with ``onnx.checker`` and store ``record`` in its ``metadata_props``."""
    import onnx

    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto)
    onnx.helper.set_model_props(proto, {"classicnets": json.dumps(record)})
    return proto.SerializeToString()


def _opset(data: bytes) -> int:
    import onnx

    proto = onnx.load_from_string(data)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _check_with_onnxruntime(data, model, info, in_names, batch_sizes) -> tuple[float, float]:
    """Max |onnxruntime - torch| and the output scale over ``batch_sizes`` of random inputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions, not log lines
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    error, scale = 0.0, 0.0
    for batch in batch_sizes:
        for extra in (0, 1) if is_sequence_model(info) else (0,):
            inputs = example_inputs(model, info, batch, seed=100 + batch, extra_length=extra)
            with torch.no_grad():
                reference = model(*inputs)
            e, s = compare_outputs(reference, run_onnx(session, in_names, inputs))
            error, scale = max(error, e), max(scale, s)
    return error, scale
