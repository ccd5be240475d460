"""Plots for run folders: line curves, percentile bands, several panels side by side.

Every function writes one image file (PNG unless the path says ``.svg``/``.pdf``) and returns its
path. The figures are built with ``matplotlib.figure.Figure`` directly, never with ``pyplot``:
the Agg canvas renders them, so nothing here needs a display, nothing registers a figure in
pyplot's global list (there is nothing to leak or to close), and importing this module does not
change the backend of a notebook or script that also uses ``pyplot``. Files are written atomically
(a temporary file in the same folder, then ``os.replace``), so a report being built from
``plots/*.png`` while a run is still writing never sees half an image.

One name keeps one colour across all panels of a figure, so "bn" in panel (a) is the same colour
as "bn" in panel (c).

Example, the three panels of Ioffe & Szegedy 2015, Figure 1::

    multi_panel_plot(run_dir / "plots" / "figure1.png", [
        Panel(title="(a) test accuracy", xlabel="step", ylabel="accuracy",
              series={"plain": (steps, acc_plain), "bn": (steps, acc_bn)}),
        Panel(title="(b) without BN", xlabel="step", ylabel="sigmoid input",
              x=steps, bands={"plain": (p15_plain, p50_plain, p85_plain)}),
        Panel(title="(c) with BN", xlabel="step", ylabel="sigmoid input",
              x=steps, bands={"bn": (p15_bn, p50_bn, p85_bn)}),
    ])
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from classicnets.files import atomic_write_bytes

# A machine without TeX's or STIX's fonts gets a "findfont: Font family ... not found. Falling
# back to DejaVu Sans." warning for each missing family, a score of lines on every run's
# console; the fallback is what the figures use anyway.
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

__all__ = [
    "DPI",
    "Panel",
    "band_plot",
    "line_plot",
    "multi_panel_plot",
    "save_figure",
]

DPI = 110  # sharp enough for a report page, small enough to embed as base64
_PANEL_SIZE = (6.4, 4.2)  # inches per panel (width, height)
_MIDDLE_WIDTH = 1.8  # line widths of a band: the median line ...
_EDGE_WIDTH = 0.8  # ... and the thinner lower/upper lines in the same colour
_BAND_ALPHA = 0.10  # faint fill between lower and upper, so the band reads as one thing

SeriesData = tuple[Sequence[float], Sequence[float]]  # (x, y)
BandData = tuple[Sequence[float], Sequence[float], Sequence[float]]  # (lower, middle, upper)


@dataclass
class Panel:
    """One set of axes: named lines, named percentile bands, or both.

    Args:
        title: title above the axes.
        xlabel: label of the x axis.
        ylabel: label of the y axis.
        series: name -> ``(x, y)``; one line per name.
        x: the x values shared by every band of this panel (required when ``bands`` is given).
        bands: name -> ``(lower, middle, upper)``, each as long as ``x``: the middle line is drawn
            thick, lower and upper thin, in the same colour (e.g. 15th/50th/85th percentiles).
        ylim: ``(bottom, top)`` of the y axis; ``None`` lets matplotlib choose.
        logy: logarithmic y axis (non-positive values are not drawn).
    """

    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    series: Mapping[str, SeriesData] = field(default_factory=dict)
    x: Sequence[float] | None = None
    bands: Mapping[str, BandData] = field(default_factory=dict)
    ylim: tuple[float, float] | None = None
    logy: bool = False


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = DPI) -> Path:
    """Save ``fig`` atomically and release it.

    The image is written to a hidden temporary file in the destination folder (created if
    missing) and moved into place with ``os.replace``; on error the temporary file is removed and
    any existing file at ``path`` is left untouched. The format follows the suffix of ``path``
    (``.png`` when there is none). A figure made with ``pyplot`` is closed afterwards.

    Args:
        fig: the figure to save.
        path: destination file.
        dpi: resolution in dots per inch.

    Returns:
        The destination path.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=dpi)
        atomic_write_bytes(path, buffer.getvalue())
    finally:
        # Only a pyplot-made figure is registered anywhere; closing one that is not is a no-op.
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:
            pyplot.close(fig)
    return path


def line_plot(
    path: str | os.PathLike[str],
    series: Mapping[str, SeriesData],
    xlabel: str,
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
    logy: bool = False,
) -> Path:
    """One line per named series, with legend and grid, saved as an image.

    Args:
        path: destination file (its folder is created if missing).
        series: name -> ``(x, y)``, the two sequences of equal length.
        xlabel: label of the x axis.
        ylabel: label of the y axis.
        title: title of the plot.
        ylim: ``(bottom, top)`` of the y axis; ``None`` lets matplotlib choose.
        logy: logarithmic y axis.

    Returns:
        The destination path.
    """
    panel = Panel(title=title, xlabel=xlabel, ylabel=ylabel, series=series, ylim=ylim, logy=logy)
    return multi_panel_plot(path, [panel])


def band_plot(
    path: str | os.PathLike[str],
    x: Sequence[float],
    bands: Mapping[str, BandData],
    xlabel: str,
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
    logy: bool = False,
) -> Path:
    """Percentile curves: per name a thick middle line between thin lower and upper lines.

    Made for Ioffe & Szegedy 2015, Figure 1 (b)/(c): the 15th, 50th and 85th percentiles of one
    sigmoid input over training.

    Args:
        path: destination file (its folder is created if missing).
        x: the x values shared by all bands (e.g. training steps).
        bands: name -> ``(lower, middle, upper)``, each as long as ``x``.
        xlabel, ylabel, title, ylim, logy: as for ``line_plot``.

    Returns:
        The destination path.
    """
    panel = Panel(title=title, xlabel=xlabel, ylabel=ylabel, x=x, bands=bands, ylim=ylim, logy=logy)
    return multi_panel_plot(path, [panel])


def multi_panel_plot(
    path: str | os.PathLike[str],
    panels: Sequence[Panel | Mapping[str, Any]],
    title: str | None = None,
    ncols: int | None = None,
    sharey: bool = False,
    panel_size: tuple[float, float] = _PANEL_SIZE,
) -> Path:
    """Several panels side by side (or in a grid) in one figure.

    Args:
        path: destination file (its folder is created if missing).
        panels: the panels, left to right then top to bottom; each a ``Panel`` or a mapping of
            its fields, e.g. ``{"title": "(b)", "x": steps, "bands": {...}}``.
        title: title above all panels; ``None`` for none.
        ncols: panels per row; default all in one row.
        sharey: give all panels the same y axis.
        panel_size: ``(width, height)`` of one panel in inches.

    Returns:
        The destination path.

    Raises:
        ValueError: no panels, an unknown panel field, or series of mismatched lengths (the
            message names the panel and the series).
    """
    resolved = [_as_panel(p, i) for i, p in enumerate(panels)]
    if not resolved:
        raise ValueError("multi_panel_plot needs at least one panel")
    ncols = len(resolved) if ncols is None else max(1, min(ncols, len(resolved)))
    nrows = math.ceil(len(resolved) / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=sharey, squeeze=False).ravel()
    colors = _colors_by_name(resolved)
    for i, (ax, panel) in enumerate(zip(axes, resolved, strict=False)):
        _draw_panel(ax, panel, colors, where=f"panel {i} ({panel.title!r})")
    for ax in axes[len(resolved) :]:
        ax.set_visible(False)  # grid cells left over when len(panels) is not a multiple of ncols
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _as_panel(panel: Panel | Mapping[str, Any], index: int) -> Panel:
    if isinstance(panel, Panel):
        return panel
    known = {f.name for f in fields(Panel)}
    unknown = sorted(set(panel) - known)
    if unknown:
        raise ValueError(f"panel {index}: unknown field(s) {unknown}; known: {sorted(known)}")
    return Panel(**panel)


def _colors_by_name(panels: Sequence[Panel]) -> dict[str, str]:
    """Matplotlib's default cycle (C0, C1, ...) assigned by first appearance of each name."""
    colors: dict[str, str] = {}
    for panel in panels:
        for name in [*panel.series, *panel.bands]:
            colors.setdefault(name, f"C{len(colors) % 10}")
    return colors


def _as_array(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{what}: expected a 1-d sequence, got shape {array.shape}")
    return array


def _draw_panel(ax: Any, panel: Panel, colors: Mapping[str, str], where: str) -> None:
    for name, data in panel.series.items():
        if len(data) != 2:
            raise ValueError(f"{where}, series {name!r}: expected (x, y), got {len(data)} items")
        x = _as_array(data[0], f"{where}, series {name!r}, x")
        y = _as_array(data[1], f"{where}, series {name!r}, y")
        if len(x) != len(y):
            raise ValueError(f"{where}, series {name!r}: x has {len(x)} points, y has {len(y)}")
        ax.plot(x, y, label=name, color=colors[name], linewidth=_MIDDLE_WIDTH)

    if panel.bands:
        if panel.x is None:
            raise ValueError(f"{where}: bands need the shared x values (Panel.x)")
        x = _as_array(panel.x, f"{where}, x")
        for name, data in panel.bands.items():
            if len(data) != 3:
                raise ValueError(
                    f"{where}, band {name!r}: expected (lower, middle, upper), "
                    f"got {len(data)} items"
                )
            lower, middle, upper = (
                _as_array(v, f"{where}, band {name!r}, {part}")
                for v, part in zip(data, ("lower", "middle", "upper"), strict=True)
            )
            for part, values in (("lower", lower), ("middle", middle), ("upper", upper)):
                if len(values) != len(x):
                    raise ValueError(
                        f"{where}, band {name!r}: {part} has {len(values)} points, x has {len(x)}"
                    )
            color = colors[name]
            ax.fill_between(x, lower, upper, color=color, alpha=_BAND_ALPHA, linewidth=0)
            ax.plot(x, lower, color=color, linewidth=_EDGE_WIDTH)
            ax.plot(x, upper, color=color, linewidth=_EDGE_WIDTH)
            ax.plot(x, middle, color=color, linewidth=_MIDDLE_WIDTH, label=name)

    if panel.logy:
        ax.set_yscale("log")
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    ax.set_title(panel.title)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
