"""``classicnets bn-check`` and ``recalibrate`` on run folders and model folders.

The diagnosis itself is ``classicnets.nn.doctor.bn_report``; this module finds the models and the
data: a run folder's trained classifiers and autoencoders with the run's own training images
(unless ``inputs`` is given), or an imported model folder with the inputs given (required there:
the folder holds no data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from classicnets.experiments.common import (
    ExperimentError,
    image_data_of,
    load_trained_models,
    run_config,
)
from classicnets.files import atomic_write_bytes

__all__ = ["MAX_BATCHES", "bn_check", "read_inputs", "recalibrate", "reports_as_json"]

MAX_BATCHES = 200  # batches of the training data measured (12,000 MNIST images at batch 60)
INPUT_BATCH = 256


def read_inputs(path: str | Path, example_shape: list[int] | None = None) -> np.ndarray:
    """A ``.npy`` of model inputs, ``[N, *example_shape]``: numeric, finite, not empty."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ExperimentError(f"--inputs {path}: no such file") from None
    except (ValueError, OSError, EOFError) as exc:
        # np.load's own message about pickles advises loading unsafely: say what we do instead.
        why = "pickled or not a .npy file" if "pickle" in str(exc).lower() else str(exc)
        raise ExperimentError(
            f"--inputs {path}: not a numeric .npy array ({why}; read with allow_pickle=False)"
        ) from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu" or array.size == 0:
        raise ExperimentError(f"--inputs {path}: expected a non-empty numeric array")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ExperimentError(f"--inputs {path}: holds NaN or infinite values")
    if example_shape is not None and list(array.shape[1:]) != list(example_shape):
        raise ExperimentError(
            f"--inputs {path}: shape {list(array.shape)}, the model takes [N, "
            f"{', '.join(map(str, example_shape))}]"
        )
    return array


def _batches(array, batch_size: int, max_batches: int):
    import torch

    x = torch.as_tensor(array)
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)][:max_batches]


def _models_and_data(path: str | Path, inputs: str | Path | None):
    """``{variant: (TrainedModel, batches)}`` for the models with BN layers in ``path``."""
    from classicnets.interop.folder import is_model_folder
    from classicnets.nn import is_batchnorm

    models = load_trained_models(path, device="cpu")
    with_bn = {
        name: trained
        for name, trained in models.items()
        if any(is_batchnorm(m) for m in trained.model.modules())
        and trained.info.get("kind") in ("classifier", "autoencoder")
        and len(trained.info.get("inputs", [])) <= 1
    }
    if not with_bn:
        raise ExperimentError(f"{path}: no classifier or autoencoder with batch normalization")
    if is_model_folder(path) and inputs is None:
        raise ExperimentError(f"{path} is a model folder: give the data with --inputs FILE.npy")
    out = {}
    if inputs is not None:
        for name, trained in with_bn.items():
            array = read_inputs(inputs, trained.info.get("input_shape"))
            out[name] = (trained, _batches(array, INPUT_BATCH, MAX_BATCHES))
        return out
    config = run_config(path)
    data = image_data_of(config, "cpu")  # (the test split, unused here, loads too)
    batch_size = getattr(config, "batch_size", None) or 128
    batches = _batches(data.train_x, batch_size, MAX_BATCHES)
    return {name: (trained, batches) for name, trained in with_bn.items()}


def bn_check(path: str | Path, inputs: str | Path | None = None) -> dict[str, list]:
    """``{variant: [BNLayerReport, ...]}`` for every model with BN in a run or model folder."""
    from classicnets.nn.doctor import bn_report

    return {
        name: bn_report(trained.model, batches)
        for name, (trained, batches) in _models_and_data(path, inputs).items()
    }


def recalibrate(path: str | Path, inputs: str | Path | None = None) -> list[str]:
    """Precise BN on the data, written as the models' new weights, the old ones kept.

    A run folder's newest checkpoint of each variant is replaced by the same checkpoint with
    recalibrated running statistics (nothing else changes), after a copy of it is kept as
    ``NAME.before-recalibration.json`` / ``.safetensors`` (names that resume never reads). A
    model folder gets a new ``model.safetensors``, its old one kept beside it. Returns a line
    per model saying what was written.
    """
    from classicnets.interop.folder import is_model_folder, save_bn_statistics
    from classicnets.nn import recalibrate_bn
    from classicnets.train.checkpoint import load_checkpoint, save_checkpoint
    from classicnets.train.run import hold_run

    lines = []
    with hold_run(path):
        for name, (trained, batches) in _models_and_data(path, inputs).items():
            count = recalibrate_bn(trained.model, batches)
            if is_model_folder(path):
                save_bn_statistics(path, trained.model)
                lines.append(
                    f"{name}: {count} batches; new weights in {Path(path) / 'model.safetensors'}"
                )
                continue
            json_path = Path(trained.checkpoint)
            tensors, state = load_checkpoint(json_path)
            for suffix in (".json", ".safetensors"):
                source = json_path.with_suffix(suffix)
                backup = source.with_name(f"{json_path.stem}.before-recalibration{suffix}")
                atomic_write_bytes(backup, source.read_bytes())
            for key, value in trained.model.state_dict().items():
                if f"model.{key}" in tensors and ("running_" in key or "num_batches" in key):
                    tensors[f"model.{key}"] = value
            save_checkpoint(json_path.parent, json_path.stem, tensors, state)
            lines.append(f"{name}: {count} batches; recalibrated checkpoint {json_path}")
    return lines


def reports_as_json(reports: dict[str, list]) -> dict[str, Any]:
    """``--json``: ``{"models": {variant: {"layers": [...]}}}`` and, for one model, its
    ``"layers"`` at the top level too."""
    out: dict[str, Any] = {
        "models": {name: {"layers": [r.as_dict() for r in rs]} for name, rs in reports.items()}
    }
    if len(reports) == 1:
        out["layers"] = next(iter(out["models"].values()))["layers"]
    return out
