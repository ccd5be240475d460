"""Plots and the HTML report of a run folder.

- ``classicnets.report.plots``: ``line_plot``, ``band_plot``, ``multi_panel_plot`` (with
  ``Panel``), ``save_figure`` (matplotlib, written atomically, no display needed).
- ``classicnets.report.curves``: ``Curve`` plot specs and ``plot_curves``, which draws them.
- ``classicnets.report.grid``: ``write_grid``, the image grids of every experiment.
- ``classicnets.report.html``: ``write_report``, ``write_combined_report``, ``read_run``,
  ``format_metric``, ``ReportError`` (standard library only).
- ``classicnets.report.compare``: ``compare_runs`` and ``write_comparison``, runs of one
  experiment side by side (a sweep's report, ``classicnets report --compare``).
- ``classicnets.report.runs``: ``list_runs``, the table of ``classicnets runs``.
- ``classicnets.report.tensorboard``: ``TensorBoardLog``, a run's TensorBoard event files.

The plotting names are imported lazily, so ``from classicnets.report import write_report`` does
not import matplotlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from classicnets.report.curves import Curve, plot_curves
from classicnets.report.html import (
    ReportError,
    RunRecord,
    format_duration,
    format_metric,
    read_run,
    write_combined_report,
    write_report,
)

if TYPE_CHECKING:
    from classicnets.report.plots import (
        Panel,
        band_plot,
        line_plot,
        multi_panel_plot,
        save_figure,
    )

_PLOT_NAMES = frozenset({"Panel", "band_plot", "line_plot", "multi_panel_plot", "save_figure"})

__all__ = [
    "Curve",
    "Panel",
    "ReportError",
    "RunRecord",
    "band_plot",
    "format_duration",
    "format_metric",
    "line_plot",
    "multi_panel_plot",
    "plot_curves",
    "read_run",
    "save_figure",
    "write_combined_report",
    "write_report",
]


def __getattr__(name: str) -> Any:  # PEP 562: import matplotlib only when a plot is asked for
    if name in _PLOT_NAMES:
        from classicnets.report import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
