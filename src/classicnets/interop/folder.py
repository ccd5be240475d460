"""Model folders: an imported model as safetensors + JSON, the form the other commands read.

    DIR/
      model.json          format, the source file and its sha256, the Keras config, the layout,
                          what the model takes and returns (``info``), the weights file's sha256
      model.safetensors   the Keras weights, layer by layer (``keras.<layer>.<index>``), in
                          Keras's own layouts, so the folder rebuilds exactly what was imported

``classicnets import-keras FILE --out DIR`` writes one; ``export``, ``bn-check`` and
``recalibrate`` accept it where they accept a run folder. Nothing is pickled, and the weights are
verified against their checksum before use.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from classicnets.files import atomic_write_bytes, atomic_write_text, hold_folder
from classicnets.interop.keras import (
    KerasImportError,
    KerasModel,
    build_keras_model,
    layer_list,
    read_keras,
    weight_keys,
)

__all__ = [
    "MODEL_FOLDER_FORMAT",
    "import_keras",
    "is_model_folder",
    "load_model_folder",
    "save_bn_statistics",
]

MODEL_FOLDER_FORMAT = "classicnets-model"
MANIFEST = "model.json"
WEIGHTS = "model.safetensors"


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _info(model: KerasModel, config: dict) -> dict[str, Any]:
    """What the model takes and returns, for exports and ``predict``."""
    layers = config["config"]["layers"]
    inputs = [lay for lay in layers if lay["class_name"] == "InputLayer"]
    shape = list(
        (inputs[0]["config"].get("batch_shape") or inputs[0]["config"]["batch_input_shape"])[1:]
    )
    dtype = str(inputs[0]["config"].get("dtype", "float32"))
    if isinstance(inputs[0]["config"].get("dtype"), dict):
        dtype = "float32"
    if model.channels_first and len(shape) == 3:
        shape = [shape[2], shape[0], shape[1]]  # (H, W, C) -> (C, H, W)
    last = layers[-1]["config"]
    activation = last.get("activation")
    with torch.no_grad():
        example = torch.zeros([2, *shape], dtype=torch.int64 if "int" in dtype else torch.float32)
        out = model(example)
    kind = "classifier" if out.ndim == 2 and len(model.input_names) == 1 else "model"
    info = {
        "kind": kind,
        "input_shape": shape,
        "input_dtype": "int64" if "int" in dtype else "float32",
        "preprocessing": "as the Keras model was trained"
        + (" (channels first)" if model.channels_first else " (channels last)"),
        "output_shape": list(out.shape[1:]),
        "source": "keras",
    }
    if kind == "classifier":
        info["class_names"] = [str(i) for i in range(out.shape[1])]
        info["outputs"] = "probabilities" if activation == "softmax" else "logits"
    return info


def import_keras(path: str | Path, out: str | Path, channels_first: bool = False) -> Path:
    """Read a Keras model file, check that it imports, and write it as a model folder.

    The folder must be new or empty; it is locked while written, the weights first, the
    manifest last (a folder whose manifest exists is complete).
    """
    path, out = Path(path), Path(out)
    source = read_keras(path)
    model = build_keras_model(
        source.config, source.weights, source.format, channels_first, str(path)
    )
    if out.exists() and (not out.is_dir() or any(p.name != "run.lock" for p in out.iterdir())):
        raise KerasImportError(
            f"--out {out} exists and is not an empty folder; nothing was written"
        )
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"keras.{layer}.{i}": torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        for layer, arrays in source.weights.items()
        for i, array in enumerate(arrays)
    }
    with hold_folder(out):
        blob = st_save(tensors)
        atomic_write_bytes(out / WEIGHTS, blob)
        manifest = {
            "format": MODEL_FOLDER_FORMAT,
            "format_version": 1,
            "source": {
                "file": str(path.resolve()),
                "format": source.format,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            },
            "channels_first": channels_first,
            "keras_format": source.format,
            "keras_config": source.config,
            "info": _info(model, source.config),
            "weights": {
                "file": WEIGHTS,
                "sha256": hashlib.sha256(blob).hexdigest(),
                "size": len(blob),
            },
        }
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return out


def _read_manifest(folder: Path) -> dict[str, Any]:
    where = folder / MANIFEST
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise KerasImportError(f"{where}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MODEL_FOLDER_FORMAT:
        raise KerasImportError(f"{where}: not a {MODEL_FOLDER_FORMAT} manifest")
    for key, kind in (
        ("keras_config", dict),
        ("info", dict),
        ("weights", dict),
        ("channels_first", bool),
    ):
        if not isinstance(manifest.get(key), kind):
            raise KerasImportError(f"{where}: {key!r} is missing or not {kind.__name__}")
    if manifest["weights"].get("file") != WEIGHTS:
        raise KerasImportError(f"{where}: weights.file must be {WEIGHTS!r}")
    return manifest


def load_model_folder(path: str | Path) -> tuple[KerasModel, dict[str, Any]]:
    """The model of a model folder (eval mode) and its manifest; the weights are checked against
    the manifest's sha256 first."""
    folder = Path(path)
    manifest = _read_manifest(folder)
    weights_path = folder / WEIGHTS
    try:
        blob = weights_path.read_bytes()
    except OSError as exc:
        raise KerasImportError(f"{weights_path}: unreadable ({exc})") from None
    if hashlib.sha256(blob).hexdigest() != manifest["weights"].get("sha256"):
        raise KerasImportError(f"{weights_path}: sha256 does not match {MANIFEST} (modified?)")
    tensors = st_load(blob)
    weights: dict[str, list[np.ndarray]] = {}
    for key in sorted(tensors, key=lambda k: (k.rsplit(".", 1)[0], int(k.rsplit(".", 1)[1]))):
        layer = key[len("keras.") :].rsplit(".", 1)[0]
        weights.setdefault(layer, []).append(tensors[key].numpy())
    model = build_keras_model(
        manifest["keras_config"], weights, manifest.get("keras_format", "keras"),
        manifest["channels_first"], str(folder),
    )  # fmt: skip
    return model, manifest


def save_bn_statistics(path: str | Path, model: KerasModel) -> Path:
    """Write ``model``'s BN running statistics into the folder as its new weights, keeping the
    previous weights file as ``model.before-recalibration.safetensors``. Returns the folder."""
    folder = Path(path)
    manifest = _read_manifest(folder)
    tensors = st_load((folder / WEIGHTS).read_bytes())
    keys = _bn_keys(manifest, tensors)
    for layer_name, module in model.layers.items():
        if layer_name in keys:
            mean_key, var_key = keys[layer_name]
            tensors[mean_key] = module.bn.running_mean.detach().to(torch.float32).clone()
            tensors[var_key] = module.bn.running_var.detach().to(torch.float32).clone()
    with hold_folder(folder):
        backup = folder / "model.before-recalibration.safetensors"
        atomic_write_bytes(backup, (folder / WEIGHTS).read_bytes())
        blob = st_save(tensors)
        atomic_write_bytes(folder / WEIGHTS, blob)
        manifest["weights"].update(sha256=hashlib.sha256(blob).hexdigest(), size=len(blob))
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return folder


def _bn_keys(manifest: dict, tensors: dict) -> dict[str, tuple[str, str]]:
    """BN layer name -> keys of its moving mean and variance (its last two arrays)."""
    out = {}
    for layer in manifest["keras_config"]["config"]["layers"]:
        if layer["class_name"] != "BatchNormalization":
            continue
        name = layer["config"]["name"]
        key = _weights_key(manifest, name)
        indices = sorted(
            int(k.rsplit(".", 1)[1]) for k in tensors if k.rsplit(".", 1)[0] == f"keras.{key}"
        )
        if len(indices) >= 2:
            out[name] = (f"keras.{key}.{indices[-2]}", f"keras.{key}.{indices[-1]}")
    return out


def _weights_key(manifest: dict, layer_name: str) -> str:
    layers, _, _ = layer_list(manifest["keras_config"], "model.json")
    return weight_keys(layers, manifest.get("keras_format", "keras")).get(layer_name, layer_name)
