"""TensorBoard event files (``report.tensorboard``), read back with TensorBoard's own reader and
compared with ``metrics.jsonl``: what ``tensorboard --logdir`` would show."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from classicnets.experiments import ExperimentError, resume_experiment, run_experiment
from classicnets.train.run import RunDir

ALL = {"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}  # keep every event
IDS = ("variant", "step", "split")


def _events(run_dir, variant) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard" / variant), size_guidance=ALL)
    events.Reload()
    return events


def _expected(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Per tag ``variant/split/key``, the (step, value) of every number in metrics.jsonl."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in RunDir(run_dir).read_metrics():
        for key, value in r.items():
            if key not in IDS and isinstance(value, int | float) and not isinstance(value, bool):
                tag = f"{r['variant']}/{r['split']}/{key}"
                out.setdefault(tag, []).append((r["step"], float(value)))
    return out


def _assert_scalars_are_the_records(run_dir, variants):
    expected = _expected(run_dir)
    seen = set()
    for variant in variants:
        events = _events(run_dir, variant)
        for tag in events.Tags()["scalars"]:
            got = [(e.step, e.value) for e in events.Scalars(tag)]
            want = expected[tag]
            assert [s for s, _ in got] == [s for s, _ in want], tag  # each step once, in order
            # TensorBoard keeps float32: a float64 record rounds by at most 2^-24 of itself.
            for (_, a), (_, b) in zip(got, want):
                assert a == pytest.approx(b, rel=2**-23), tag
            seen.add(tag)
    assert seen == set(expected)  # every number of every record, nothing more


@pytest.fixture
def sets(data_root):
    return ["progress=false", f"data_dir={data_root}", "tensorboard=true", "jobs=1"]


def test_every_record_is_a_scalar_and_bn_statistics_are_histograms(tmp_path, sets):
    run_dir, _ = run_experiment("bn-mlp", sets, quick=True, device="cpu", out=tmp_path / "r")
    _assert_scalars_are_the_records(run_dir, ("plain", "bn"))
    bn = _events(run_dir, "bn")
    histograms = bn.Tags()["histograms"]
    assert "bn/bn/model.blocks.0.norm/running_mean" in histograms
    assert "bn/bn/model.blocks.2.norm/running_var" in histograms
    evaluations = sorted({r["step"] for r in RunDir(run_dir).read_metrics()
                          if r["variant"] == "bn" and r["split"] == "test"})  # fmt: skip
    steps = [e.step for e in bn.Histograms("bn/bn/model.blocks.0.norm/running_mean")]
    assert steps == evaluations
    assert not _events(run_dir, "plain").Tags()["histograms"]  # no BN, no histogram
    assert "config/text_summary" in bn.Tags()["tensors"]


def test_resume_appends_without_duplicating_a_step(tmp_path, sets):
    from classicnets.train.checkpoint import list_checkpoints

    out = tmp_path / "r"
    run_experiment("bn-mlp", [*sets, "stop_after=250"], quick=True, device="cpu", out=out)
    # As if killed at step 250 before its checkpoint: the newest left is step 200, and the
    # records and events of steps 201-250 are logged again by the resumed session.
    step, newest = list_checkpoints(out / "checkpoints", "plain")[-1]
    assert step == 250
    newest.unlink()
    newest.with_suffix(".safetensors").unlink()
    for _ in range(3):  # stop_after counts again from each resume; bn starts after plain
        if resume_experiment(out)["status"] == "complete":
            break
    assert RunDir(out).read_summary()["status"] == "complete"
    _assert_scalars_are_the_records(out, ("plain", "bn"))


def test_image_grids_are_images_once(tmp_path, sets):
    run_dir, _ = run_experiment("conv-ae", sets, quick=True, device="cpu", out=tmp_path / "r")
    written = json.loads((run_dir / "tensorboard" / "images.json").read_text())
    assert written == ["reconstructions.png"]
    assert _events(run_dir, "reconstructions").Tags()["images"] == ["grid/reconstructions"]
    from classicnets.report.tensorboard import TensorBoardLog

    board = TensorBoardLog(run_dir)
    assert board.grids(run_dir / "plots") == []  # written once: not again
    (run_dir / "tensorboard" / "images.json").write_text('{"not": "a list"}')
    assert board.grids(run_dir / "plots") == ["reconstructions.png"]  # damaged: written again
    board.close()


def test_off_when_asked_and_an_error_without_the_package(tmp_path, sets, monkeypatch):
    off = [s for s in sets if not s.startswith("tensorboard")] + ["tensorboard=false"]
    run_dir, _ = run_experiment("bn-mlp", off, quick=True, device="cpu", out=tmp_path / "off")
    assert not (run_dir / "tensorboard").exists()
    import classicnets.report.tensorboard as board

    monkeypatch.setattr(board, "available", lambda: False)
    with pytest.raises(ExperimentError, match="tensorboard package is not installed"):
        run_experiment("bn-mlp", sets, quick=True, device="cpu", out=tmp_path / "none")
    assert not (tmp_path / "none").exists()  # refused before any file
