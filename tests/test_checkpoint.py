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
    state_digest,
    unpack_optimizer,
)
from classicnets.train.state import TrainState


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


# --------------------------------------------------------------------------- records not trusted


def _edit(path, change):
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


RECORD_TAMPERING = {
    # an edited step without the checksum updated: the digest catches it
    "edited step": lambda r: r["state"].update(step=7),
    # the step and its checksum both edited: the file name still says otherwise
    "step and digest edited": lambda r: (
        r["state"].update(step=7),
        r.update(state_sha256=state_digest(r["state"])),
    ),
    "string step": lambda r: (
        r["state"].update(step="5"),
        r.update(state_sha256=state_digest(r["state"])),
    ),
    "tensors file outside the folder": lambda r: r.update(tensors_file="../../etc/passwd"),
    "tensors size a string": lambda r: r.update(tensors_size="big"),
    "state not an object": lambda r: (r.update(state=[1]), r.update(state_sha256=None)),
    "no state digest": lambda r: r.pop("state_sha256"),
}


@pytest.mark.parametrize("case", list(RECORD_TAMPERING))
def test_tampered_record_is_refused_and_previous_checkpoint_used(tmp_path, case):
    _save(tmp_path, 1, 1.0)
    newest = _save(tmp_path, 5, 5.0)
    _edit(newest, RECORD_TAMPERING[case])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(newest)
    assert str(newest) in str(info.value) and "\n" not in str(info.value)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        tensors, state, path = latest_checkpoint(tmp_path, "m")
    assert state["step"] == 1 and torch.equal(tensors["w"], torch.ones(3))


def test_format_1_record_without_digest_still_loads(tmp_path):
    path = _save(tmp_path, 3)
    _edit(path, lambda r: (r.update(format=1), r.pop("state_sha256")))
    assert load_checkpoint(path)[1] == {"step": 3}
    _edit(path, lambda r: r["state"].update(step=4))  # format 1: the name still cross-checks
    with pytest.raises(CheckpointError, match="file name says step 3"):
        load_checkpoint(path)


def _train_state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 2)).sum().backward()
    optimizer.step()
    return TrainState({"model": model}, {"sgd": optimizer})


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.pop("optimizers"),
        lambda s: s.update(complete="yes"),
        lambda s: s["optimizers"].pop("sgd"),  # well-typed, but not this run's optimizer
    ],
    ids=["missing key", "ill-typed field", "another run's optimizers"],
)
def test_trainer_state_that_does_not_fit_falls_back_and_never_half_restores(tmp_path, change):
    saved = _train_state(0)
    saved.step = 2
    saved.save(tmp_path, "m")
    saved.step = 4
    newest = saved.save(tmp_path, "m")

    def tamper(record):
        change(record["state"])
        record["state_sha256"] = state_digest(record["state"])

    _edit(newest, tamper)
    state = _train_state(1)
    with pytest.warns(UserWarning, match="m-step00000004.json"):
        assert state.resume(tmp_path, "m") == tmp_path / "m-step00000002.json"
    assert state.step == 2

    # Only the bad one: the state stays exactly as built, nothing half restored.
    (tmp_path / "m-step00000002.json").unlink()
    state, built = _train_state(1), _train_state(1)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert state.resume(tmp_path, "m") is None
    assert state.step == 0
    for a, b in zip(state.modules["model"].parameters(), built.modules["model"].parameters()):
        assert torch.equal(a, b)
    momentum = state.optimizers["sgd"].state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(
        momentum, built.optimizers["sgd"].state_dict()["state"][0]["momentum_buffer"]
    )


def test_state_digest_survives_the_json_round_trip(tmp_path):
    # Integer keys sort as numbers before writing and as strings after reading; tuples become
    # lists: the digest must be the same on both sides.
    state = {"step": 3, "counts": {2: "a", 10: "b"}, "shape": (1, 2)}
    path = save_checkpoint(tmp_path, checkpoint_name("m", 3), {"w": torch.zeros(1)}, state)
    assert load_checkpoint(path)[1] == {"step": 3, "counts": {"2": "a", "10": "b"}, "shape": [1, 2]}
