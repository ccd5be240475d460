"""Tests for classicnets.report: plots (PNG files) and the self-contained HTML report.

Independent references: PNG files are decoded by matplotlib's reader (Pillow-free ``imread``) and
checked against the 8-byte PNG signature; the HTML is parsed by the standard library's
``html.parser`` and the embedded images decoded with ``base64``.
"""

from __future__ import annotations

import base64
import doctest
import json
import os
import re
import stat
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from classicnets.report import html as report_html
from classicnets.report import plots
from classicnets.report.html import (
    ReportError,
    format_metric,
    read_run,
    write_combined_report,
    write_report,
)
from classicnets.report.plots import Panel, band_plot, line_plot, multi_panel_plot, save_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOID_TAGS = {"meta", "img", "br", "hr", "link", "input"}
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


class _TagChecker(HTMLParser):
    """Collects <img src> values and checks that non-void tags are properly nested."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.img_srcs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.img_srcs.append(dict(attrs).get("src") or "")
        if tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _TagChecker:
    checker = _TagChecker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors
    assert not checker.stack, f"unclosed tags: {checker.stack}"
    return checker


def _assert_png(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert len(data) > 0
    assert data.startswith(PNG_SIGNATURE)
    return matplotlib.image.imread(path)  # an independent decoder: the file is a whole PNG


def _no_temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def _make_run(
    root: Path, name: str = "bn-mlp-20250101-000000", secret: str = "<script>alert(1)</script>"
) -> Path:
    """A fake run folder: config, summary, metrics and two plots (line and band)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {
        "experiment": "bn-mlp",
        "config": {
            "steps": 50000,
            "batch_size": 60,
            "hidden_sizes": [100, 100, 100],
            "optimizer": {"name": "sgd", "lr": 0.5},
            "note": secret,
            "data_dir": None,
        },
        "created": "2025-01-01T00:00:00+00:00",
        "classicnets_version": "0.1.0",
        "torch_version": "2.13.0+cpu",
    }
    (run_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    summary = {
        "title": "BN on MNIST (Figure 1)",
        "wall_time_s": 83.2,
        "variants": {
            "bn": {"test_accuracy": 0.97234, "test_loss": 0.0912345, "steps": 50000},
            "plain": {"test_accuracy": 0.9512, "test_loss": 0.1712},
        },
        "notes": ["BN converges faster", "a & b < c"],
        "status": "complete",
    }
    (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    records = [
        {"variant": v, "step": s, "split": "test", "accuracy": 0.5 + s / 2000, "loss": 1.0 / s}
        for s in (100, 500)
        for v in ("bn", "plain")
    ]
    records.append({"variant": "bn", "step": 500, "split": "train", "loss": 0.25})
    lines = [json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    steps = np.arange(0, 1000, 100)
    line_plot(
        run_dir / "plots" / "accuracy.png",
        {"bn": (steps, 0.9 + steps / 1e4), "plain": (steps, 0.8 + steps / 1e4)},
        xlabel="step",
        ylabel="test accuracy",
        title="Test accuracy",
        ylim=(0.7, 1.0),
    )
    middle = np.sin(steps / 300.0)
    band_plot(
        run_dir / "plots" / "percentiles.png",
        steps,
        {"plain": (middle - 1, middle, middle + 1)},
        xlabel="step",
        ylabel="sigmoid input",
        title="15/50/85th percentiles",
    )
    return run_dir


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def test_line_plot_writes_png_into_new_folder(tmp_path: Path) -> None:
    out = tmp_path / "does" / "not" / "exist" / "curve.png"
    x = [0, 1, 2, 3]
    result = line_plot(out, {"a": (x, [1, 2, 3, 4]), "b": (x, [4, 3, 2, 1])}, "x", "y", "t")
    assert result == out
    image = _assert_png(out)
    # 6.4 x 4.2 inches at 110 dpi
    assert image.shape[:2] == (round(4.2 * plots.DPI), round(6.4 * plots.DPI))
    assert _no_temp_files(tmp_path) == []


def test_line_plot_logy_accepts_numpy_and_nonpositive_values(tmp_path: Path) -> None:
    out = line_plot(
        tmp_path / "log.png",
        {"perplexity": (np.arange(5), np.array([0.0, 100.0, 50.0, 20.0, 10.0]))},
        "epoch",
        "perplexity",
        "log scale",
        logy=True,
    )
    _assert_png(out)


def test_band_plot_writes_png(tmp_path: Path) -> None:
    x = np.linspace(0, 1, 50)
    out = band_plot(
        tmp_path / "plots" / "band.png",
        x,
        {"bn": (x - 0.1, x, x + 0.1), "plain": (2 * x - 0.5, 2 * x, 2 * x + 0.5)},
        "step",
        "value",
        "bands",
        ylim=(-1, 3),
    )
    _assert_png(out)


def test_multi_panel_plot_side_by_side(tmp_path: Path) -> None:
    steps = np.arange(10)
    panels = [
        Panel(title="(a)", series={"bn": (steps, steps**0.5), "plain": (steps, steps**0.3)}),
        {"title": "(b) without BN", "x": steps, "bands": {"plain": (steps - 1, steps, steps + 1)}},
        {"title": "(c) with BN", "x": steps, "bands": {"bn": (steps - 1, steps, steps + 1)}},
    ]
    out = multi_panel_plot(tmp_path / "figure1.png", panels, title="Figure 1", sharey=False)
    image = _assert_png(out)
    assert image.shape[:2] == (round(4.2 * plots.DPI), round(3 * 6.4 * plots.DPI))
    # a 2 x 2 grid with one cell left empty
    grid = multi_panel_plot(tmp_path / "grid.png", panels, ncols=2)
    assert _assert_png(grid).shape[:2] == (round(2 * 4.2 * plots.DPI), round(2 * 6.4 * plots.DPI))


def test_plot_errors_name_the_series(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'short'.*3 points.*2"):
        line_plot(tmp_path / "a.png", {"short": ([0, 1, 2], [0, 1])}, "x", "y", "t")
    with pytest.raises(ValueError, match="'bn'.*upper has 2 points, x has 3"):
        band_plot(tmp_path / "b.png", [0, 1, 2], {"bn": ([0, 1, 2], [0, 1, 2], [0, 1])}, "", "", "")
    with pytest.raises(ValueError, match=r"Panel\.x"):
        multi_panel_plot(tmp_path / "c.png", [{"bands": {"bn": ([0], [0], [0])}}])
    with pytest.raises(ValueError, match="unknown field"):
        multi_panel_plot(tmp_path / "d.png", [{"titel": "typo"}])
    with pytest.raises(ValueError, match="at least one panel"):
        multi_panel_plot(tmp_path / "e.png", [])
    assert not any(tmp_path.iterdir())  # nothing written, not even a temp file


def test_plots_leave_no_open_pyplot_figures(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    line_plot(tmp_path / "a.png", {"a": ([0, 1], [0, 1])}, "x", "y", "t")
    band_plot(tmp_path / "b.png", [0, 1], {"a": ([0, 0], [0, 1], [1, 1])}, "x", "y", "t")
    fig = plt.figure()  # a pyplot figure passed to save_figure is closed by it
    save_figure(fig, tmp_path / "c.png")
    assert plt.get_fignums() == before
    _assert_png(tmp_path / "c.png")


def test_save_figure_failure_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    target = tmp_path / "plot.notaformat"
    target.write_bytes(b"old")
    with pytest.raises(ValueError):
        save_figure(Figure(), target)  # unsupported format: matplotlib refuses it
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.notaformat"]


# ----------------------------------------------------------------------------------------------
# format_metric
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "key", "expected"),
    [
        (0.97234, "test_accuracy", "97.23%"),
        (1, "accuracy", "100.00%"),
        (0.123456, "loss", "0.1235"),
        (123456.7, "perplexity", "1.235e+05"),
        (50000, "step", "50,000"),
        (4.25, "wall_time_s", "4.2 s"),
        (83.2, "wall_time_s", "1 min 23 s"),
        (7500, "wall_time_s", "2 h 05 min"),
        (float("nan"), "loss", "nan"),
        (float("inf"), "test_accuracy", "inf"),
        (None, "loss", "–"),
        (True, "converged", "yes"),
        ("sgd", "optimizer", "sgd"),
        ([1, 2], "sizes", "[1, 2]"),
    ],
)
def test_format_metric(value: object, key: str, expected: str) -> None:
    assert format_metric(value, key) == expected


def test_format_metric_doctests() -> None:
    result = doctest.testmod(report_html, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def test_write_report_contents(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path)
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    assert out.is_file()
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    checker = _parse(page)

    assert "<title>BN on MNIST (Figure 1)</title>" in page
    assert "complete" in page
    assert "1 min 23 s" in page  # wall time
    # final metrics, formatted
    for text in ("97.23%", "95.12%", "0.09123", "0.1712", "50,000"):
        assert text in page, text
    # notes, escaped
    assert "BN converges faster" in page
    assert "a &amp; b &lt; c" in page
    # last logged metrics: latest step of each (variant, split)
    assert "Last logged metrics" in page
    assert "75.00%" in page  # accuracy at step 500: 0.5 + 500 / 2000
    # the config: nested values as JSON, versions
    assert "hidden_sizes" in page and "[100, 100, 100]" in page
    assert "{&quot;name&quot;: &quot;sgd&quot;, &quot;lr&quot;: 0.5}" in page
    assert "2.13.0+cpu" in page and "classicnets_version" in page

    # one embedded PNG per plot, with its file name as caption
    assert len(checker.img_srcs) == 2
    for src in checker.img_srcs:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :], validate=True).startswith(PNG_SIGNATURE)
    assert "<figcaption>accuracy.png</figcaption>" in page
    assert "<figcaption>percentiles.png</figcaption>" in page
    assert not re.search(r'src="(?!data:)', page)  # self-contained: no external references

    assert _no_temp_files(run_dir) == []


def test_report_escapes_everything(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path, secret='<script>alert("x")</script>')
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    _parse(page)


def test_report_title_argument_and_out_path(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path)
    out = write_report(run_dir, title="My <title>", out_path=tmp_path / "elsewhere" / "r.html")
    page = out.read_text(encoding="utf-8")
    assert "<title>My &lt;title&gt;</title>" in page
    assert not (run_dir / "report.html").exists()


def test_report_with_only_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"experiment": "vae", "config": {}}))
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "<title>vae</title>" in page
    assert "no summary.json" in page
    assert "<img" not in page
    _parse(page)


def test_running_run_with_half_written_metrics_line(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["status"] = "running"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"variant": "bn", "step": 6')  # a writer caught mid-line
    record = read_run(run_dir)
    assert record.skipped_lines == 1
    assert record.last_metrics[("bn", "test")]["step"] == 500
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "status-running" in page
    assert "1 unreadable line(s)" in page


def test_missing_config_is_report_error_naming_path(tmp_path: Path) -> None:
    run_dir = tmp_path / "empty-run"
    run_dir.mkdir()
    with pytest.raises(ReportError, match=re.escape(str(run_dir / "config.json"))):
        write_report(run_dir)
    assert issubclass(ReportError, ValueError)
    assert not (run_dir / "report.html").exists()

    with pytest.raises(ReportError, match=re.escape(str(tmp_path / "nowhere"))):
        write_report(tmp_path / "nowhere")

    (run_dir / "config.json").write_text("{not json")
    with pytest.raises(ReportError, match=re.escape(str(run_dir / "config.json"))):
        write_report(run_dir)

    (run_dir / "config.json").write_text("{}")
    (run_dir / "summary.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match=re.escape(str(run_dir / "summary.json"))):
        write_report(run_dir)


def test_combined_report_has_both_runs(tmp_path: Path) -> None:
    first = _make_run(tmp_path, "bn-mlp-1")
    second = _make_run(tmp_path, "bn-mlp-2")
    summary = json.loads((second / "summary.json").read_text())
    summary["title"] = "Second run"
    summary["status"] = "stopped"
    (second / "summary.json").write_text(json.dumps(summary))

    out = write_combined_report([first, second], tmp_path / "out" / "combined.html")
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    checker = _parse(page)
    assert 'id="run-1"' in page and 'id="run-2"' in page
    assert "BN on MNIST (Figure 1)" in page and "Second run" in page
    assert str(first) in page and str(second) in page
    assert "status-complete" in page and "status-stopped" in page
    assert len(checker.img_srcs) == 4
    assert _no_temp_files(tmp_path / "out") == []


def test_combined_report_errors_name_the_bad_folder(tmp_path: Path) -> None:
    good = _make_run(tmp_path, "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    out = tmp_path / "combined.html"
    with pytest.raises(ReportError, match=re.escape(str(bad))):
        write_combined_report([good, bad], out)
    assert not out.exists()
    with pytest.raises(ReportError, match="no run folders"):
        write_combined_report([], out)


def test_report_overwrite_is_atomic(tmp_path: Path) -> None:
    run_dir = _make_run(tmp_path)
    first = write_report(run_dir).read_text(encoding="utf-8")
    inode = os.stat(run_dir / "report.html").st_ino
    write_report(run_dir, title="again")
    # os.replace swaps in a new file rather than truncating the old one in place
    assert os.stat(run_dir / "report.html").st_ino != inode
    assert "again" in (run_dir / "report.html").read_text(encoding="utf-8")
    assert first != (run_dir / "report.html").read_text(encoding="utf-8")
    assert _no_temp_files(run_dir) == []


def test_written_files_get_ordinary_permissions(tmp_path: Path) -> None:
    """Atomic writes must not leave the 0600 mode of tempfile.mkstemp: compare with open()."""
    run_dir = _make_run(tmp_path)
    (tmp_path / "plain.txt").write_text("x")
    expected = stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    for path in (write_report(run_dir), run_dir / "plots" / "accuracy.png"):
        assert stat.S_IMODE(os.stat(path).st_mode) == expected, path


def test_html_side_imports_neither_torch_nor_matplotlib() -> None:
    code = (
        "import sys, classicnets.report as r; r.write_report; "
        "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad; r.line_plot; assert 'matplotlib' in sys.modules; "
        "assert 'torch' not in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_missing_fonts_do_not_fill_the_console():
    import logging

    import classicnets.report.plots  # noqa: F401

    # matplotlib warns once per missing TeX/STIX family before falling back to DejaVu Sans.
    assert logging.getLogger("matplotlib.font_manager").getEffectiveLevel() >= logging.ERROR
