"""The NumPy bundle: one ``weights.npz`` and one ``manifest.json`` in a folder. No torch here.

    BUNDLE/
      manifest.json   format version, the layer graph in order, layouts, conventions, input
                      shape and preprocessing, class names or vocabulary, sha256 of weights.npz
      weights.npz     every tensor, saved with ``np.savez`` (no pickled objects)

The manifest's ``layers`` list is the model as a straight-line program: each layer names its
``op`` (one of ``OPS``), the values it reads (``inputs``, names of graph inputs or of earlier
layers' outputs), the values it writes (``outputs``), its attributes (``attrs``) and its tensors
(``tensors``: role -> key in ``weights.npz``). Running the layers in order with the functions of
``numpy_runtime`` reproduces the model. ``docs/export.md`` documents every field.

``write_bundle`` writes both files atomically (weights first, the manifest last: a folder whose
manifest exists is complete). ``load_bundle`` reads with ``allow_pickle=False`` and validates
everything before anything runs: a missing, extra, pickled or misshapen tensor, a truncated
``.npz``, an unknown op or a value used before it is computed is an ``ExportError`` naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "CONVENTIONS",
    "MANIFEST_NAME",
    "OPS",
    "WEIGHTS_NAME",
    "Bundle",
    "ExportError",
    "flatten_structure",
    "load_bundle",
    "write_bundle",
]

BUNDLE_FORMAT = "classicnets-numpy-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.npz"

# Written into every manifest, so that a reader in another language knows the layouts without
# reading our code. The runtime (numpy_runtime.py) implements exactly these formulas.
CONVENTIONS = {
    "layout": "NCHW activations (batch first, channels second), float32",
    "linear": "weight [out_features, in_features]; y = x @ weight.T + bias over the last axis",
    "conv2d": "weight OIHW [out_channels, in_channels / groups, kH, kW]; cross-correlation",
    "conv_transpose2d": "weight IOHW [in_channels, out_channels / groups, kH, kW]",
    "batch_norm": "inference: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias "
    "along attrs.axis",
    "embedding": "weight [num_embeddings, embedding_dim]; y = weight[tokens]",
    "rnn": "PyTorch nn.RNN: h' = act(x @ W_ih.T + b_ih + h @ W_hh.T + b_hh); weight_ih_l{k} "
    "[hidden, in], weight_hh_l{k} [hidden, hidden]; hidden [num_layers, N, hidden]",
    "lstm": "PyTorch nn.LSTM, gate order i, f, g, o (input, forget, cell candidate, output) "
    "stacked along dim 0 of weight_ih_l{k} [4 * hidden, in] and weight_hh_l{k} "
    "[4 * hidden, hidden]; hidden (h, c), each [num_layers, N, hidden]",
    "lstm_gate_order": ["i", "f", "g", "o"],
    "dropout": "identity (inference)",
}


class ExportError(ValueError):
    """A model that cannot be exported, or a bundle that is missing, damaged or inconsistent."""


# --------------------------------------------------------------------------- op specifications
# For each op: the attributes it needs and, given them, the tensors it needs with their shapes.
# A role ending in "?" is optional; None in a shape means "any size".

Shape = tuple[int | None, ...]


def _no_tensors(a: dict) -> dict[str, Shape]:
    return {}


def _linear(a: dict) -> dict[str, Shape]:
    return {"weight": (a["out_features"], a["in_features"]), "bias?": (a["out_features"],)}


def _conv2d(a: dict) -> dict[str, Shape]:
    kh, kw = a["kernel_size"]
    c_in = a["in_channels"] // a["groups"]
    return {"weight": (a["out_channels"], c_in, kh, kw), "bias?": (a["out_channels"],)}


def _conv_transpose2d(a: dict) -> dict[str, Shape]:
    kh, kw = a["kernel_size"]
    c_out = a["out_channels"] // a["groups"]
    return {"weight": (a["in_channels"], c_out, kh, kw), "bias?": (a["out_channels"],)}


def _batch_norm(a: dict) -> dict[str, Shape]:
    c = (a["num_features"],)
    return {"running_mean": c, "running_var": c, "weight?": c, "bias?": c}


def _embedding(a: dict) -> dict[str, Shape]:
    return {"weight": (a["num_embeddings"], a["embedding_dim"])}


def _recurrent(gates: int) -> Callable[[dict], dict[str, Shape]]:
    def tensors(a: dict) -> dict[str, Shape]:
        hidden, out = a["hidden_size"], {}
        for k in range(a["num_layers"]):
            size_in = a["input_size"] if k == 0 else hidden
            out[f"weight_ih_l{k}"] = (gates * hidden, size_in)
            out[f"weight_hh_l{k}"] = (gates * hidden, hidden)
            out[f"bias_ih_l{k}?"] = (gates * hidden,)
            out[f"bias_hh_l{k}?"] = (gates * hidden,)
        return out

    return tensors


def _constant(a: dict) -> dict[str, Shape]:
    return {"value": tuple(a["shape"])}


@dataclass(frozen=True)
class OpSpec:
    """Inputs, outputs, attributes and tensors of one op (``num_inputs`` None: one or more)."""

    num_inputs: int | None
    attrs: tuple[str, ...] = ()
    tensors: Callable[[dict], dict[str, Shape]] = _no_tensors
    num_outputs: int = 1


_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
_RNN_ATTRS = ("input_size", "hidden_size", "num_layers", "batch_first")

OPS: dict[str, OpSpec] = {
    # layers with weights
    "linear": OpSpec(1, ("in_features", "out_features"), _linear),
    "conv2d": OpSpec(1, (*_CONV_ATTRS, "groups"), _conv2d),
    "conv_transpose2d": OpSpec(1, (*_CONV_ATTRS, "groups", "output_padding"), _conv_transpose2d),
    "batch_norm": OpSpec(1, ("num_features", "axis", "eps"), _batch_norm),
    "embedding": OpSpec(1, ("num_embeddings", "embedding_dim"), _embedding),
    "rnn": OpSpec(2, (*_RNN_ATTRS, "nonlinearity"), _recurrent(1), num_outputs=2),
    "lstm": OpSpec(3, _RNN_ATTRS, _recurrent(4), num_outputs=3),
    "constant": OpSpec(0, ("shape",), _constant),
    # activations
    "relu": OpSpec(1),
    "leaky_relu": OpSpec(1, ("negative_slope",)),
    "elu": OpSpec(1, ("alpha",)),
    "sigmoid": OpSpec(1),
    "tanh": OpSpec(1),
    "gelu": OpSpec(1, ("approximate",)),
    "softplus": OpSpec(1, ("beta", "threshold")),
    "softmax": OpSpec(1, ("axis",)),
    "log_softmax": OpSpec(1, ("axis",)),
    # pooling and resampling
    "max_pool2d": OpSpec(1, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "avg_pool2d": OpSpec(1, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    "upsample_nearest2d": OpSpec(1, ("size",)),
    "upsample_bilinear2d": OpSpec(1, ("size", "align_corners")),
    "average_unpool2d": OpSpec(1, ("size",)),
    # shapes
    "reshape": OpSpec(1, ("shape",)),
    "pad": OpSpec(1, ("pads", "value")),
    "transpose": OpSpec(1, ("perm",)),
    "slice": OpSpec(1, ("axis", "start", "stop", "step")),
    "concat": OpSpec(None, ("axis",)),
    "mean": OpSpec(1, ("axes", "keepdims")),
    "sum": OpSpec(1, ("axes", "keepdims")),
    "one_hot": OpSpec(1, ("num_classes",)),
    "cast": OpSpec(1, ("dtype",)),
    "full_like": OpSpec(1, ("value", "dtype")),
    # elementwise: two values, or one value and attrs.scalar (attrs.scalar_first: scalar op x)
    "add": OpSpec(None),
    "sub": OpSpec(None),
    "mul": OpSpec(None),
    "div": OpSpec(None),
    "pow": OpSpec(None),
    "neg": OpSpec(1),
    "exp": OpSpec(1),
    "log": OpSpec(1),
    "sqrt": OpSpec(1),
    "abs": OpSpec(1),
    "clamp": OpSpec(1, ("min", "max")),
}
_BINARY = ("add", "sub", "mul", "div", "pow")


# --------------------------------------------------------------------------- the bundle


@dataclass
class Bundle:
    """A loaded, validated NumPy bundle.

    Attributes:
        path: the bundle folder.
        manifest: the parsed ``manifest.json``.
        tensors: every array of ``weights.npz`` by key.
    """

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(repr=False)

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.manifest["layers"]

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "unknown")

    @property
    def inputs(self) -> list[dict[str, Any]]:
        """One entry per graph input: ``name``, ``shape`` (None for dynamic axes), ``dtype``."""
        return self.manifest["inputs"]

    def layer_tensors(self, layer: dict[str, Any]) -> dict[str, np.ndarray]:
        """The arrays of ``layer`` by role (``weight``, ``bias``, ...)."""
        return {role: self.tensors[key] for role, key in layer.get("tensors", {}).items()}


def flatten_structure(structure) -> list[str]:
    """The value names of a nested list structure, depth first: ``["a", ["b", "c"]]`` -> a, b, c."""
    if isinstance(structure, str):
        return [structure]
    return [name for item in structure for name in flatten_structure(item)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bundle(
    out_dir: str | os.PathLike, manifest: dict[str, Any], tensors: dict[str, np.ndarray]
) -> Path:
    """Write ``weights.npz`` then ``manifest.json`` into ``out_dir``, each atomically.

    Args:
        out_dir: the bundle folder (created if needed).
        manifest: everything but the format fields, which are added here.
        tensors: arrays by key; every key must be named by some layer.

    Returns:
        The bundle folder. The manifest is validated against the tensors before writing, so a
        bundle that would not load is never written.
    """
    from classicnets.files import atomic_write_bytes, atomic_write_text

    out_dir = Path(out_dir)
    buffer = io.BytesIO()
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        **manifest,
        "weights": {"file": WEIGHTS_NAME, "sha256": _sha256(data), "size": len(data)},
    }
    manifest.setdefault("conventions", CONVENTIONS)
    _validate(out_dir, manifest, arrays)
    atomic_write_bytes(out_dir / WEIGHTS_NAME, data)
    atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return out_dir


def _bundle_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent if path.name == MANIFEST_NAME else path


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Load and validate a bundle folder (or its ``manifest.json``).

    Raises:
        ExportError: a missing or unreadable file, a truncated or modified ``weights.npz``, a
            pickled object, a missing, extra or misshapen tensor, an unknown op, or a value used
            before it is computed; the message names the file, layer and tensor.
    """
    folder = _bundle_dir(path)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ExportError(f"{folder}: not a NumPy bundle ({MANIFEST_NAME} is missing)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise ExportError(f"{manifest_path}: not a {BUNDLE_FORMAT} manifest")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise ExportError(
            f"{manifest_path}: format_version {version!r}; this runtime reads version "
            f"{BUNDLE_FORMAT_VERSION}"
        )
    weights_path, weights = _weights_entry(folder, manifest_path, manifest)
    tensors = _read_npz(weights_path)
    _validate(folder, manifest, tensors)
    # Last, the checksum: a tensor changed in place (same shape) is caught here.
    digest = _sha256(weights_path.read_bytes())
    if weights.get("sha256") != digest:
        raise ExportError(
            f"{weights_path}: sha256 {digest[:16]}... does not match the manifest's "
            f"{str(weights.get('sha256'))[:16]}...: the weights were modified after export"
        )
    return Bundle(folder, manifest, tensors)


def _weights_entry(folder: Path, where: Path, manifest: dict) -> tuple[Path, dict]:
    """The manifest's ``weights`` entry, checked: a plain file name inside the bundle folder (no
    path leads out of it) and a sha256 string (verified after the arrays are validated, so that
    a damaged file is reported by what is wrong with it)."""
    weights = manifest.get("weights")
    if not isinstance(weights, dict):
        raise ExportError(f"{where}: 'weights' must be an object with file, sha256 and size")
    name = weights.get("file")
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise ExportError(
            f"{where}: weights.file must be a file name inside the bundle folder, got {name!r}"
        )
    path = folder / name
    if path.is_symlink() or (path.exists() and path.resolve().parent != folder.resolve()):
        raise ExportError(f"{where}: weights.file {name!r} leads out of the bundle folder")
    if not path.is_file():
        raise ExportError(f"{path}: weights file is missing")
    if not isinstance(weights.get("sha256"), str):
        raise ExportError(f"{where}: weights.sha256 must be a hex string")
    return path, weights


# What an archive may inflate to, at most: np.savez stores arrays uncompressed (ratio 1), and
# float weights compressed with np.savez_compressed rarely shrink below a quarter; a "zip bomb"
# inflates a thousandfold. Checked on the sizes the zip directory declares, before any reading
# (zipfile never returns more bytes than a member declares).
MAX_INFLATION = 32


def _check_inflation(path: Path, archive_size: int) -> None:
    if not zipfile.is_zipfile(path):
        return  # not an archive at all: np.load says what it is (a pickle, a bare .npy, junk)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ExportError(f"{path}: not a valid .npz, truncated or damaged ({exc})") from None
    declared = sum(m.file_size for m in members)
    budget = MAX_INFLATION * archive_size + (1 << 20)
    if declared > budget:
        raise ExportError(
            f"{path}: its arrays would inflate to {declared} bytes, more than {MAX_INFLATION} "
            f"times the {archive_size}-byte archive; refused before decompressing"
        )


def _unreadable(what: str, exc: ValueError, otherwise: str) -> ExportError:
    """The error for a ``ValueError`` of ``np.load(..., allow_pickle=False)``: a pickled object
    (refused, never loaded) or ``otherwise``."""
    if "pickle" in str(exc).lower():
        return ExportError(
            f"{what} holds a pickled object; refused (bundles hold numeric arrays only and are "
            f"loaded with allow_pickle=False)"
        )
    return ExportError(f"{what} {otherwise} ({exc})")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ExportError(f"{path}: weights file is missing")
    _check_inflation(path, path.stat().st_size)
    try:
        with np.load(path, allow_pickle=False) as npz:
            out = {}
            for key in list(npz.files):
                try:
                    out[key] = npz[key]
                except ValueError as exc:
                    raise _unreadable(f"{path}: tensor {key!r}", exc, "is unreadable") from None
    except ExportError:
        raise
    except ValueError as exc:  # np.load on a pickle file without allow_pickle
        raise _unreadable(f"{path}:", exc, "is not a valid .npz") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ExportError(f"{path}: not a valid .npz, truncated or damaged ({exc})") from None
    return out


def _fmt(shape) -> str:
    return "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"


def _validate(folder: Path, manifest: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Check the manifest against itself and the arrays; ``ExportError`` on the first fault."""
    where = folder / MANIFEST_NAME
    for key in ("inputs", "outputs", "layers"):
        if key not in manifest:
            raise ExportError(f"{where}: the manifest has no {key!r}")
    for key in ("inputs", "layers"):
        if not isinstance(manifest[key], list) or not manifest[key]:
            raise ExportError(f"{where}: {key!r} must be a non-empty list, got {manifest[key]!r}")
    defined: set[str] = set()
    for spec in manifest["inputs"]:
        if not isinstance(spec, dict) or not {"name", "shape", "dtype"} <= set(spec):
            raise ExportError(f"{where}: each input needs name, shape and dtype, got {spec!r}")
        shape = spec["shape"]
        if (
            not isinstance(spec["name"], str)
            or not isinstance(spec["dtype"], str)
            or not isinstance(shape, list)
            or not all(d is None or (type(d) is int and d >= 1) for d in shape)
        ):
            raise ExportError(
                f"{where}: input {spec['name']!r} needs a string name and dtype and a shape of "
                f"positive integers or null, got {spec!r}"
            )
        defined.add(spec["name"])
    try:
        flatten_structure(manifest["outputs"])
    except TypeError:
        raise ExportError(f"{where}: 'outputs' must be names or lists of names") from None
    used: set[str] = set()
    for index, layer in enumerate(manifest["layers"]):
        name = layer.get("name", f"#{index}") if isinstance(layer, dict) else f"#{index}"
        label = f"{where}: layer {name!r}"
        if not isinstance(layer, dict):
            raise ExportError(f"{label}: expected an object, got {type(layer).__name__}")
        op = layer.get("op")
        if op not in OPS:
            raise ExportError(
                f"{label}: unknown op {op!r}; this runtime knows {', '.join(sorted(OPS))}"
            )
        spec = OPS[op]
        label = f"{label} ({op})"
        inputs, outputs = layer.get("inputs", []), layer.get("outputs", [])
        attrs, named = layer.get("attrs", {}), layer.get("tensors", {})
        for field_name, value, kind in (
            ("inputs", inputs, list),
            ("outputs", outputs, list),
            ("attrs", attrs, dict),
            ("tensors", named, dict),
        ):
            if not isinstance(value, kind):
                raise ExportError(
                    f"{label}: {field_name} must be {'a list' if kind is list else 'an object'}, "
                    f"got {value!r}"
                )
        if not all(isinstance(v, str) for v in [*inputs, *outputs, *named.values()]):
            raise ExportError(f"{label}: value and tensor names must be strings")
        n_in = len(inputs)
        if op in _BINARY:
            ok = n_in == 2 or (n_in == 1 and "scalar" in attrs)
        elif spec.num_inputs is None:
            ok = n_in >= 1
        elif op in ("rnn", "lstm"):  # the initial hidden state is optional (zeros)
            ok = n_in in (1, spec.num_inputs)
        else:
            ok = n_in == spec.num_inputs
        if not ok:
            raise ExportError(f"{label}: wrong number of inputs ({n_in})")
        if len(outputs) != spec.num_outputs:
            raise ExportError(f"{label}: expected {spec.num_outputs} output(s), got {outputs}")
        for value in inputs:
            if value not in defined:
                raise ExportError(f"{label}: input {value!r} is not computed before this layer")
        missing_attrs = [a for a in spec.attrs if a not in attrs]
        if missing_attrs:
            raise ExportError(f"{label}: missing attribute(s) {', '.join(missing_attrs)}")
        _validate_tensors(label, spec, attrs, named, tensors, used)
        defined.update(outputs)
    for value in flatten_structure(manifest["outputs"]):
        if not isinstance(value, str) or value not in defined:
            raise ExportError(f"{where}: output {value!r} is never computed")
    extra = sorted(set(tensors) - used)
    if extra:
        raise ExportError(
            f"{where}: {WEIGHTS_NAME} holds tensor(s) no layer uses: {', '.join(extra[:5])}"
        )


def _validate_tensors(label, spec: OpSpec, attrs, named: dict, tensors, used: set) -> None:
    try:
        expected = spec.tensors(attrs)
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{label}: malformed attributes ({exc!r})") from None
    known = {role.rstrip("?") for role in expected}
    unexpected = sorted(set(named) - known)
    if unexpected:
        raise ExportError(f"{label}: unexpected tensor role(s) {', '.join(unexpected)}")
    for role, shape in expected.items():
        optional = role.endswith("?")
        role = role.rstrip("?")
        if role not in named:
            if optional:
                continue
            raise ExportError(f"{label}: no tensor for {role!r}")
        key = named[role]
        if key not in tensors:
            raise ExportError(f"{label}: tensor {key!r} ({role}) is missing from {WEIGHTS_NAME}")
        array = tensors[key]
        if array.dtype.kind not in "fiu":
            raise ExportError(f"{label}: tensor {key!r} has dtype {array.dtype}, not numeric")
        if len(array.shape) != len(shape) or any(
            s is not None and s != a for s, a in zip(shape, array.shape)
        ):
            raise ExportError(
                f"{label}: tensor {key!r} ({role}) has shape {_fmt(array.shape)} in "
                f"{WEIGHTS_NAME}, the layer expects {_fmt(shape)}"
            )
        used.add(key)
