"""The BN doctor (classicnets.nn.doctor) and ``bn-check`` / ``recalibrate`` on run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from classicnets.cli import main
from classicnets.nn import BatchNorm, recalibrate_bn
from classicnets.nn.doctor import STALE_MEAN, bn_report, format_report

# The doctor's reference and recalibrate_bn are the same float64-free computation on the same
# batches, so after recalibration the errors are those of comparing a float32 value with itself
# through float64 arithmetic: exactly 0 up to the division, far below the acceptance's 1e-3.
AFTER_RECALIBRATION = 1e-3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), BatchNorm(8), nn.ReLU(), nn.Linear(8, 3), BatchNorm(3))


def _batches(shift: float, seed: int = 0, n: int = 20) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [shift + (1 + shift) * torch.randn(32, 5, generator=g) for _ in range(n)]


def _train_statistics(model: nn.Module, batches) -> None:
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()


def test_never_updated_statistics_are_flagged():
    model = _model().eval()  # running mean 0, variance 1: the UPDATE_OPS trap
    reports = bn_report(model, _batches(3.0))
    assert [r.name for r in reports] == ["1", "4"]
    assert all("never_updated" in r.flags and "stale" in r.flags for r in reports)
    assert reports[0].mean_rel_error > STALE_MEAN and reports[0].train_eval_gap > 0.5


def test_statistics_of_other_data_are_stale_and_recalibration_clears_them():
    model = _model()
    _train_statistics(model, _batches(0.0) * 5)  # momentum 0.1: converged on this data
    quiet = bn_report(model, _batches(0.0, seed=1))
    assert all(r.flags == [] for r in quiet), format_report(quiet)
    other = _batches(4.0, seed=2)
    stale = bn_report(model, other)
    # The first layer sees the new data itself; the second sees it through the first, which
    # (stale) no longer centres it: only the first must be flagged.
    assert "stale" in stale[0].flags, format_report(stale)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recalibrate_bn(model, other)
    after = bn_report(model, other)
    for r in after:
        assert r.flags == [] and r.mean_rel_error < AFTER_RECALIBRATION
        assert r.var_rel_error < AFTER_RECALIBRATION
    for key, value in model.state_dict().items():  # only the statistics changed
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, before[key]), key


def test_eps_dominated_and_report_leaves_the_model_alone():
    model = nn.Sequential(BatchNorm(4, eps=1e-2, momentum=None))  # the exact average
    x = [torch.randn(16, 4) * torch.tensor([1.0, 1.0, 1e-2, 1.0]) for _ in range(5)]
    _train_statistics(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    reports = bn_report(model, x)
    assert reports[0].flags == ["eps_dominated"]
    assert model.training  # its mode is restored
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(ValueError, match="no batch-norm layer"):
        bn_report(nn.Linear(3, 3), [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="no batches"):
        bn_report(model, [])


# --------------------------------------------------------------------------- run folders


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory, data_root) -> Path:
    out = tmp_path_factory.mktemp("doctor") / "run"
    sets = ["progress=false", "variants=bn", f"data_dir={data_root}"]
    assert main(["run", "bn-mlp", "--quick", "--device", "cpu", "--out", str(out),
                 *[a for s in sets for a in ("--set", s)]]) == 0  # fmt: skip
    return out


def _images(data_root: Path, dataset: str, path: Path) -> Path:
    from classicnets.data import load_mnist

    images, _ = load_mnist("train", dataset=dataset, data_dir=data_root)
    np.save(path, (images[:3000, None] / 255.0).astype(np.float32))  # (3000, 1, 28, 28)
    return path


def _check(args, capsys) -> dict:
    capsys.readouterr()
    assert main(["bn-check", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bn_check_is_quiet_on_a_trained_run_and_flags_other_data(
    bn_run, data_root, tmp_path, capsys
):
    report = _check([bn_run], capsys)  # the run's own training images
    assert [layer["flags"] for layer in report["layers"]] == [[], [], []]
    fashion = _images(data_root, "fashion-mnist", tmp_path / "fashion.npy")
    report = _check([bn_run, "--inputs", fashion], capsys)
    assert all("stale" in layer["flags"] for layer in report["layers"])

    work = tmp_path / "run"
    import shutil

    shutil.copytree(bn_run, work)
    newest = sorted((work / "checkpoints").glob("bn-step*.json"))[-1]
    before = newest.read_bytes()
    assert main(["recalibrate", str(work), "--inputs", str(fashion)]) == 0
    assert newest.with_name(f"{newest.stem}.before-recalibration.json").read_bytes() == before
    report = _check([work, "--inputs", fashion], capsys)
    for layer in report["layers"]:
        assert layer["flags"] == [] and layer["mean_rel_error"] < AFTER_RECALIBRATION
        assert layer["var_rel_error"] < AFTER_RECALIBRATION
    assert main(["resume", str(work)]) == 0  # the recalibrated checkpoint is a valid one


def test_bn_check_flags_never_updated_statistics_of_a_run(bn_run, tmp_path, capsys):
    """The newest checkpoint rewritten with BN buffers at their initial values (the UPDATE_OPS
    trap): every layer is flagged, and recalibrating on the training data clears them."""
    import shutil

    from classicnets.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

    work = tmp_path / "run"
    shutil.copytree(bn_run, work)
    _, newest = list_checkpoints(work / "checkpoints", "bn")[-1]
    tensors, state = load_checkpoint(newest)
    for key in list(tensors):
        if key.endswith("running_mean"):
            tensors[key] = torch.zeros_like(tensors[key])
        elif key.endswith("running_var"):
            tensors[key] = torch.ones_like(tensors[key])
    save_checkpoint(newest.parent, newest.stem, tensors, state)
    report = _check([work], capsys)
    assert all("never_updated" in layer["flags"] for layer in report["layers"])
    assert main(["recalibrate", str(work)]) == 0
    for layer in _check([work], capsys)["layers"]:
        assert layer["flags"] == [] and layer["mean_rel_error"] < AFTER_RECALIBRATION
