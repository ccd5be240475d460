"""Plot specs: the curves an experiment draws from its ``metrics.jsonl``, declared, not coded.

An experiment lists its ``Curve``s (a file, the records' split and metric, the labels) and
``plot_curves`` draws them. Importing this module does not import matplotlib.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Curve", "plot_curves"]


@dataclass(frozen=True)
class Curve:
    """A plot spec: one metric of ``metrics.jsonl`` (and any ``also``) against the training
    step, one line per variant, on one set of axes in the file ``file`` of the plots folder.
    Curves that name the same file are its panels, left to right (``plot_curves`` draws them).

    Attributes:
        file: the image's file name.
        split, key: the records (``split``) and the metric (``key``) drawn.
        ylabel, title: the y axis's label and the panel's title.
        logy, ylim: logarithmic y axis; ``(bottom, top)`` of the y axis.
        from_step: leave out the records of earlier steps (1: the untrained model's at step 0).
        label: added to the variant's name in the legend ("gan" and "D loss": "gan D loss").
        also: more ``(key, label)`` pairs of the same records drawn on the same axes.
        x: the records' field on the x axis: "step", or "epoch" for per-epoch records.
    """

    file: str
    split: str
    key: str
    ylabel: str
    title: str
    logy: bool = False
    ylim: tuple[float, float] | None = None
    from_step: int = 0
    label: str = ""
    also: tuple[tuple[str, str], ...] = ()
    x: str = "step"


def plot_curves(
    folder: str | os.PathLike[str],
    records: Sequence[Mapping[str, Any]],
    curves: Sequence[Curve],
    rename: Mapping[str, str] | None = None,
) -> list[Path]:
    """Draw the ``Curve``s into ``folder``, a file per ``Curve.file`` with a panel per curve
    that has points in ``records`` (``metrics.jsonl``'s; values that are not finite numbers are
    left out); ``rename`` maps variant names to the legend's. Returns the paths written."""
    files: dict[str, list] = {}
    for curve in curves:
        series: dict[str, tuple[list, list]] = {}
        for key, label in ((curve.key, curve.label), *curve.also):
            for r in records:
                value = r.get(key)
                if r.get("split") != curve.split or value is None or r["step"] < curve.from_step:
                    continue
                if not math.isfinite(value := float(value)):  # "inf" strings included
                    continue
                name = f"{(rename or {}).get(r['variant'], r['variant'])} {label}".strip()
                xs, ys = series.setdefault(name, ([], []))
                xs.append(r[curve.x])
                ys.append(value)
        panels = files.setdefault(curve.file, [])
        if series:
            xlabel = "training step" if curve.x == "step" else curve.x
            panels.append((series, xlabel, curve.ylabel, curve.title, curve.ylim, curve.logy))
    from classicnets.report.plots import Panel, line_plot, multi_panel_plot  # matplotlib: lazily

    written = []
    for file, panels in files.items():
        path = Path(folder) / file
        if len(panels) == 1:
            written.append(line_plot(path, *panels[0]))
        elif panels:
            fields = ("series", "xlabel", "ylabel", "title", "ylim", "logy")
            written.append(multi_panel_plot(path, [Panel(**dict(zip(fields, p))) for p in panels]))
    return written
