"""The one training driver (``train.fit``) and the one writer of each artifact around it:
``fit`` on a task of its own, its ring-buffer windows, ``optimize``; the image grids of
``report.grid``; the plot specs of ``report.curves`` and the grid captions of the report."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from classicnets.report import curves as report_curves
from classicnets.report.curves import Curve, plot_curves
from classicnets.report.grid import grid_image, read_grid, read_grid_cell, write_grid
from classicnets.report.html import _caption
from classicnets.train.faults import StopRequested
from classicnets.train.fit import Cadence, Task, _window, fit, optimize
from classicnets.train.loop import NonFiniteLossError
from classicnets.train.run import RunDir

# ----------------------------------------------------------------------------------------------
# fit, on a task of its own
# ----------------------------------------------------------------------------------------------


class LineTask(Task):
    """Least squares of y = 3x on 64 fixed points by plain SGD, one point per step; it logs the
    interval's mean loss and, as its evaluation, the weight."""

    def __init__(self, steps: int, log_every: int, checkpoint_every: int = 0, **cadence) -> None:
        super().__init__("cpu")
        torch.manual_seed(0)
        self.model = nn.Linear(1, 1, bias=False)
        self.x = torch.linspace(-1, 1, 64)[:, None]
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.modules = {"model": self.model}
        self.optimizers = {"model": self.optimizer}
        self.cadence = Cadence(steps, log_every, eval_every=5, checkpoint_every=checkpoint_every,
                               progress=False, **cadence)  # fmt: skip
        self.poison: int | None = None  # a step whose loss is made NaN

    def train_step(self, step: int) -> dict[str, Tensor]:
        x = self.x[step % 64]
        loss = (self.model(x) - 3 * x).square().sum()
        if step == self.poison:
            loss = loss * float("nan")
        optimize(loss, self.optimizer)
        return {"loss": loss.detach()}

    def train_records(self, window: dict[str, Tensor], step: int) -> list[dict[str, Any]]:
        return [{"split": "train", "loss": window["loss"].double().mean().item(),
                 "n": len(window["loss"])}]  # fmt: skip

    def evaluate(self, step: int) -> list[dict[str, Any]]:
        return [{"split": "test", "weight": self.model.weight.item()}]


def _sgd_by_hand(steps: int) -> tuple[float, list[float]]:
    """The same training in float64 by hand: w -= lr * d/dw (w x - 3x)^2."""
    torch.manual_seed(0)
    w = float(nn.Linear(1, 1, bias=False).weight.detach())
    xs, losses = torch.linspace(-1, 1, 64).double().tolist(), []
    for step in range(steps):
        x = xs[step % 64]
        losses.append((w * x - 3 * x) ** 2)
        w -= 0.1 * 2 * (w * x - 3 * x) * x
    return w, losses


def test_fit_trains_logs_and_evaluates_on_its_cadence(tmp_path):
    run = RunDir(tmp_path / "run")
    result = fit(LineTask(steps=12, log_every=4), run, "line")
    assert result["step"] == 12 and result["complete"]
    records = run.read_metrics()
    assert [(r["step"], r["split"]) for r in records] == [
        (0, "test"), (4, "train"), (5, "test"), (8, "train"), (10, "test"), (12, "train"),
        (12, "test"),
    ]  # fmt: skip
    w, losses = _sgd_by_hand(12)
    # A dozen float32 steps against float64: each rounds about 8 operations on values below 10
    # (|w| < 3, |x| <= 1), and the errors add up. A loss (w x - 3 x)^2 moves by at most
    # 2 |w - 3| x^2 < 8 times the weight's error.
    tol_w = 12 * 8 * 2**-24 * 10
    assert records[-1]["weight"] == pytest.approx(w, abs=tol_w)
    for r, first in zip([r for r in records if r["split"] == "train"], (0, 4, 8)):
        assert r["n"] == 4
        assert r["loss"] == pytest.approx(np.mean(losses[first : first + 4]), abs=8 * tol_w)


def test_fit_resumes_a_stopped_run_exactly(tmp_path):
    whole, parts = RunDir(tmp_path / "whole"), RunDir(tmp_path / "parts")
    fit(LineTask(steps=12, log_every=4, checkpoint_every=3), whole, "line")
    # Stopped after 6 steps: in the middle of the second log interval (steps 4..7).
    stopped = fit(LineTask(steps=12, log_every=4, checkpoint_every=3, stop_after=6), parts, "line")
    assert stopped["step"] == 6 and not stopped["complete"]
    done = fit(LineTask(steps=12, log_every=4, checkpoint_every=3), parts, "line", resume=True)
    assert done["complete"]
    assert parts.read_metrics() == whole.read_metrics()  # bit for bit, the interval's mean too


def test_fit_stops_at_a_nan_before_writing_a_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    task = LineTask(steps=12, log_every=4, checkpoint_every=3)
    task.poison = 4  # step 5 (1-based)
    with pytest.raises(NonFiniteLossError, match="line: training loss is nan at step 5") as info:
        fit(task, run, "line")
    assert info.value.step == 5 and math.isnan(info.value.values["training loss"])
    saved = sorted(p.name for p in run.checkpoints.glob("*.json"))
    assert saved == ["line-step00000003.json"]  # step 6's checkpoint was never written


def test_fit_checkpoints_and_raises_on_a_signal(tmp_path, monkeypatch):
    import signal

    run = RunDir(tmp_path / "run")
    task = LineTask(steps=12, log_every=4)
    step = task.train_step

    def signalled(s):
        if s == 6:
            signal.raise_signal(signal.SIGTERM)
        return step(s)

    monkeypatch.setattr(task, "train_step", signalled)
    with pytest.raises(StopRequested) as info:
        fit(task, run, "line")
    assert info.value.step == 7 and info.value.checkpoint.endswith("line-step00000007.json")


def test_window_reads_an_interval_that_wraps_around_the_ring():
    ring = torch.tensor([10.0, 11.0, 12.0, 13.0])  # steps 8, 9, 10, 11 (step s at s % 4)
    window = _window({"loss": ring}, first=7, step=10, ring=4)["loss"]  # steps 7, 8, 9
    assert window.tolist() == [13.0, 10.0, 11.0]
    assert _window({"loss": ring}, first=8, step=11, ring=4)["loss"].tolist() == [10.0, 11.0, 12.0]


def test_optimize_returns_the_norm_before_clipping():
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 2.0]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = model(torch.ones(1, 3)).sum()  # gradient (1, 1, 1): norm sqrt(3)
    norm = optimize(loss, optimizer, clip=0.5)
    assert norm.item() == pytest.approx(math.sqrt(3), rel=2**-20)
    step = torch.tensor([[1.0, 2.0, 2.0]]) - model.weight.detach()  # 0.5 * (1, 1, 1) / sqrt(3)
    torch.testing.assert_close(step, torch.full((1, 3), 0.5 / math.sqrt(3)))


@pytest.mark.parametrize(
    ("cadence", "logs", "evals", "saves"),
    [
        (Cadence(10, log_every=4, eval_every=5, checkpoint_every=3), [4, 8, 10], [0, 5, 10],
         [3, 6, 9, 10]),
        (Cadence(10, log_every=0, eval_every=0, checkpoint_every=0), list(range(1, 11)), [0, 10],
         [10]),
    ],
)  # fmt: skip
def test_cadence(cadence, logs, evals, saves):
    steps = range(0, cadence.steps + 1)
    assert [s for s in steps if s and cadence.log_due(s)] == logs
    assert [s for s in steps if cadence.eval_due(s)] == evals
    assert [s for s in steps if s and cadence.checkpoint_due(s)] == saves


# ----------------------------------------------------------------------------------------------
# Grids, plot specs, captions
# ----------------------------------------------------------------------------------------------


def test_write_grid_tiles_cells_where_read_grid_cell_finds_them(tmp_path):
    images = torch.rand(3, 4, 5, 6)  # (rows, columns, H, W)
    png, meta = write_grid(tmp_path / "g.png", images, {"rows": ["a", "b", "c"], "title": "t"})
    record = read_grid(meta)
    assert record["rows"] == ["a", "b", "c"] and record["title"] == "t"
    assert record["image_shape"] == [1, 5, 6] and record["scale"] == 2
    for r, c in ((0, 0), (2, 3), (1, 2)):
        want = grid_image(images[r : r + 1, c : c + 1, None], scale=2, padding=0).numpy()
        assert np.array_equal(read_grid_cell(png, r, c), want)


def test_plot_curves_draws_each_spec_with_points(tmp_path, monkeypatch):
    drawn = {}

    def fake_line_plot(path, series, xlabel, ylabel, title, ylim=None, logy=False):
        drawn[path.name] = (series, ylabel, title, ylim, logy)
        return path

    from classicnets.report import plots

    monkeypatch.setattr(plots, "line_plot", fake_line_plot)
    records = [
        {"variant": "a", "step": 0, "split": "test", "loss": 3.0},
        {"variant": "a", "step": 5, "split": "test", "loss": 2.0},
        {"variant": "b", "step": 5, "split": "test", "loss": 2.5},
        {"variant": "a", "step": 5, "split": "train", "loss": 1.0},
    ]
    specs = [
        Curve("test.png", "test", "loss", "loss", "test loss", logy=True, from_step=1),
        Curve("none.png", "test", "accuracy", "accuracy", "never logged"),
    ]
    written = plot_curves(tmp_path, records, specs, rename={"a": "A"})
    assert [p.name for p in written] == ["test.png"]
    series, ylabel, title, ylim, logy = drawn["test.png"]
    assert series == {"A": ([5], [2.0]), "b": ([5], [2.5])}
    assert (ylabel, title, ylim, logy) == ("loss", "test loss", None, True)
    assert "matplotlib" not in report_curves.__dict__  # drawn through report.plots, lazily


def test_report_captions_name_a_grids_rows_and_title(tmp_path):
    record = {"rows": ["in", "out"], "title": "pairs"}
    png, _ = write_grid(tmp_path / "g.png", torch.zeros(2, 1, 4, 4), record)
    assert _caption(png) == "g.png — pairs — rows: in, out"
    other = tmp_path / "plot.png"
    other.write_bytes(png.read_bytes())
    assert _caption(other) == "plot.png"  # no JSON beside it
    (tmp_path / "plot.json").write_text("[1, 2")  # not JSON
    assert _caption(other) == "plot.png"
    (tmp_path / "plot.json").write_text(json.dumps({"rows": [{"x": 1}], "title": 3}))
    assert _caption(other) == "plot.png"  # not a grid's record


def test_reconstruction_grid_wraps_blocks_of_rows_and_leaves_the_rest_black(tmp_path):
    from classicnets.report.grid import reconstruction_grid

    originals = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    png = reconstruction_grid(tmp_path / "r.png", originals, {"a": 1 - originals}, columns=3)
    record = read_grid(png.with_suffix(".json"))
    assert record["rows"] == ["original", "a", "original", "a"] and record["title"] == ""

    def cell(image):  # one image as the PNG holds it: uint8, each pixel a 2x2 block
        return grid_image(image[None, None], scale=2, padding=0).numpy()

    assert np.array_equal(read_grid_cell(png, 0, 2), cell(originals[2]))
    assert np.array_equal(read_grid_cell(png, 2, 1), cell(originals[4]))  # the second block
    assert np.array_equal(read_grid_cell(png, 3, 1), cell(1 - originals[4]))
    assert not read_grid_cell(png, 3, 2).any()  # past the last image
