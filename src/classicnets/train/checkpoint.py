"""Checkpoints as safetensors + JSON, written atomically, verified on load. No pickle anywhere.

A checkpoint ``NAME`` is two files in one folder:

    NAME.safetensors   every tensor: model weights, optimizer buffers, RNG states
    NAME.json          everything else (step, data order, optimizer hyper-parameters, ...) and
                       the sha256 and size of NAME.safetensors

The tensors file is written first (to a temporary name, fsynced, then renamed), the JSON last:
the JSON is the commit record, so a checkpoint whose JSON exists is complete, and a process killed
at any moment leaves either the previous checkpoint or the new one, never half of one. A truncated
or tampered file fails the sha256 check with an error naming it; ``latest_checkpoint`` then falls
back to the previous checkpoint.

The JSON record is verified too, never trusted: it carries the sha256 of its own ``state`` (so an
edited step or counter fails like a damaged tensor file), its ``step`` must equal the step in its
file name, its tensors file must be the one beside it of the same name, and every field has the
type the loops read. A record that fails any of this is skipped with a warning, exactly like a
damaged tensors file, and the previous checkpoint is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from classicnets.files import atomic_write_bytes, atomic_write_text

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "checkpoint_name",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "pack_optimizer",
    "rng_state_tensors",
    "restore_rng_state",
    "save_checkpoint",
    "state_digest",
    "unpack_optimizer",
]

CHECKPOINT_FORMAT = 2  # 2: the record holds the sha256 of its state; 1 (still read): it does not
_READABLE_FORMATS = (1, 2)
_NAME_RE = re.compile(r"^(?P<prefix>.+)-step(?P<step>\d+)\.json$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, tampered with or of an unknown format."""


def checkpoint_name(prefix: str, step: int) -> str:
    """``{prefix}-step{step:08d}``: names sort in step order."""
    return f"{prefix}-step{step:08d}"


def save_checkpoint(
    directory: str | os.PathLike,
    name: str,
    tensors: dict[str, Tensor],
    state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint ``name`` into ``directory`` atomically; return the JSON's path.

    Args:
        directory: the checkpoints folder (created if needed).
        name: checkpoint name, usually ``checkpoint_name(prefix, step)``.
        tensors: flat ``{key: tensor}``; copied to CPU and made contiguous.
        state: JSON-serializable trainer state.
        keep_last: afterwards delete all but the newest ``keep_last`` checkpoints with the same
            prefix (None keeps all).
    """
    directory = Path(directory)
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    blob = st_save(flat, metadata={"format": str(CHECKPOINT_FORMAT)})
    tensors_file = f"{name}.safetensors"
    atomic_write_bytes(directory / tensors_file, blob)
    record = {
        "format": CHECKPOINT_FORMAT,
        "tensors_file": tensors_file,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "tensors_size": len(blob),
        "state_sha256": state_digest(state),
        "state": state,
    }
    json_path = atomic_write_text(directory / f"{name}.json", json.dumps(record, indent=1))
    if keep_last is not None:
        match = _NAME_RE.match(json_path.name)
        if match:
            _prune(directory, match["prefix"], keep_last)
    return json_path


def state_digest(state: dict[str, Any]) -> str:
    """The sha256 of ``state`` in canonical JSON (sorted keys, no spaces): what a record stores
    and what a reader recomputes from the state it parsed."""
    # Through JSON first, as a reader will see it: tuples become lists and integer keys strings,
    # so that the sorted text is the same on both sides.
    parsed = json.loads(json.dumps(state, allow_nan=True))
    text = json.dumps(parsed, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_record(json_path: Path, record: Any) -> None:
    """Raise ``CheckpointError`` naming ``json_path`` unless ``record`` is a well-formed record
    of a readable format whose state matches its checksum and its file name."""
    if not isinstance(record, dict):
        raise CheckpointError(f"checkpoint record {json_path} is not a JSON object")
    if record.get("format") not in _READABLE_FORMATS:
        raise CheckpointError(
            f"checkpoint record {json_path} has format {record.get('format')!r} "
            f"(expected {CHECKPOINT_FORMAT})"
        )
    expected_file = f"{json_path.stem}.safetensors"
    if record.get("tensors_file") != expected_file:
        raise CheckpointError(
            f"checkpoint record {json_path} names tensors file {record.get('tensors_file')!r}, "
            f"expected {expected_file!r} beside it"
        )
    for key, kind in (("tensors_sha256", str), ("tensors_size", int)):
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"checkpoint record {json_path}: {key} is {value!r}, expected {kind.__name__}"
            )
    state = record.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint record {json_path}: 'state' is not a JSON object")
    if record["format"] >= 2 and record.get("state_sha256") != state_digest(state):
        raise CheckpointError(
            f"checkpoint record {json_path}: its state does not match its state_sha256 "
            f"(edited or damaged)"
        )
    match = _NAME_RE.match(json_path.name)
    step = state.get("step")
    if match and "step" in state and (type(step) is not int or step != int(match["step"])):
        raise CheckpointError(
            f"checkpoint record {json_path}: state.step is {step!r}, but the file name says "
            f"step {int(match['step'])}"
        )


def _prune(directory: Path, prefix: str, keep_last: int) -> None:
    old = list_checkpoints(directory, prefix)[:-keep_last] if keep_last > 0 else []
    for _, json_path in old:
        json_path.unlink(missing_ok=True)  # the commit record first: never a JSON without tensors
        json_path.with_suffix(".safetensors").unlink(missing_ok=True)


def load_checkpoint(json_path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load and verify a checkpoint; return ``(tensors, state)``.

    Raises:
        CheckpointError: naming the file, if the JSON is unreadable, the tensors file is missing,
            its size or sha256 differs from the record, or it cannot be parsed.
    """
    json_path = Path(json_path)
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {json_path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"checkpoint record {json_path} is unreadable or truncated ({exc})"
        ) from None
    _check_record(json_path, record)
    tensors_path = json_path.parent / record["tensors_file"]
    try:
        blob = tensors_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint tensors file {tensors_path} (named by {json_path}) is missing"
        ) from None
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint tensors file {tensors_path} is unreadable ({exc})"
        ) from None
    if len(blob) != record["tensors_size"]:
        raise CheckpointError(
            f"checkpoint tensors file {tensors_path} is {len(blob)} bytes, expected "
            f"{record['tensors_size']} (truncated or replaced)"
        )
    digest = hashlib.sha256(blob).hexdigest()
    if digest != record["tensors_sha256"]:
        raise CheckpointError(
            f"checkpoint tensors file {tensors_path} has sha256 {digest}, expected "
            f"{record['tensors_sha256']} (corrupted or tampered with)"
        )
    try:
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint tensors file {tensors_path} is invalid: {exc}") from None
    return tensors, record["state"]


def list_checkpoints(directory: str | os.PathLike, prefix: str) -> list[tuple[int, Path]]:
    """``(step, json_path)`` of the checkpoints with ``prefix`` in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.glob(f"{prefix}-step*.json"):
        match = _NAME_RE.match(p.name)
        if match and match["prefix"] == prefix:
            found.append((int(match["step"]), p))
    return sorted(found)


def latest_checkpoint(
    directory: str | os.PathLike, prefix: str
) -> tuple[dict[str, Tensor], dict[str, Any], Path] | None:
    """The newest checkpoint with ``prefix`` that loads and verifies, or None if there is none.

    A newer checkpoint that fails verification is skipped with a warning naming it, so a damaged
    last file never costs more than the steps since the previous checkpoint.
    """
    for _, json_path in reversed(list_checkpoints(directory, prefix)):
        try:
            tensors, state = load_checkpoint(json_path)
        except CheckpointError as exc:
            warnings.warn(f"skipping damaged checkpoint: {exc}", stacklevel=2)
            continue
        return tensors, state, json_path
    return None


# --------------------------------------------------------------------------- optimizer state


def pack_optimizer(optimizer: torch.optim.Optimizer, key: str) -> tuple[dict[str, Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``{key}.state.{i}.{name}``) and JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in sd["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{key}.state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unpack_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], state: dict, key: str
) -> None:
    """Inverse of ``pack_optimizer``: load the saved state into ``optimizer``."""
    per_param: dict[int, dict[str, Any]] = {}
    head = f"{key}.state."
    for name, value in tensors.items():
        if name.startswith(head):
            index, _, field = name[len(head) :].partition(".")
            per_param.setdefault(int(index), {})[field] = value
    for index, values in state["scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})


# --------------------------------------------------------------------------- RNG state


def rng_state_tensors() -> dict[str, Tensor]:
    """The torch CPU (and current CUDA device) RNG states as uint8 tensors."""
    out = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.torch_cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng_state(tensors: dict[str, Tensor]) -> None:
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    if "rng.torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"])
