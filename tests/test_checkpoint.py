"""Checkpoints: atomic safetensors + JSON, verification, pruning, optimizer round trip."""

from __future__ import annotations

import json

import pytest
import torch

from classicnets.train.checkpoint import (
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    pack_optimizer,
    save_checkpoint,
    unpack_optimizer,
)


def _save(tmp_path, step, value=1.0, keep_last=None):
    tensors = {"w": torch.full((3,), value), "n": torch.tensor(step)}
    return save_checkpoint(
        tmp_path, checkpoint_name("m", step), tensors, {"step": step}, keep_last=keep_last
    )


def test_round_trip_and_no_temporary_files(tmp_path):
    path = _save(tmp_path, 5, 2.5)
    tensors, state = load_checkpoint(path)
    assert torch.equal(tensors["w"], torch.full((3,), 2.5)) and state == {"step": 5}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m-step00000005.json",
        "m-step00000005.safetensors",
    ]


def test_truncated_tensors_file_names_the_file_and_previous_still_loads(tmp_path):
    _save(tmp_path, 1, 1.0)
    newest = _save(tmp_path, 2, 2.0)
    blob = newest.with_suffix(".safetensors")
    blob.write_bytes(blob.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"m-step00000002\.safetensors.*truncated"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        tensors, state, path = latest_checkpoint(tmp_path, "m")
    assert state["step"] == 1 and torch.equal(tensors["w"], torch.ones(3))


def test_tampered_tensors_file_fails_sha256(tmp_path):
    path = _save(tmp_path, 3)
    blob = path.with_suffix(".safetensors")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_truncated_record_and_missing_files(tmp_path):
    path = _save(tmp_path, 3)
    path.write_text(path.read_text()[:20])
    with pytest.raises(CheckpointError, match="m-step00000003.json is unreadable"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.json")
    other = _save(tmp_path, 4)
    other.with_suffix(".safetensors").unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_checkpoint(other)


def test_unknown_format_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    record = json.loads(path.read_text())
    record["format"] = 99
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(path)


def test_keep_last_prunes_oldest(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path, "m")] == [30, 40]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_optimizer_state_round_trip():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    tensors, state = pack_optimizer(opt, "opt")
    json.dumps(state)  # the non-tensor part must be JSON
    fresh = torch.optim.Adam(model.parameters(), lr=0.5)
    unpack_optimizer(fresh, tensors, state, "opt")
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][i][k]))
