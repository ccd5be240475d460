"""Plot specs: the curves an experiment draws from its ``metrics.jsonl``, declared, not coded.

An experiment lists its ``Curve``s (a file, the records' split and metric, the labels) and
``plot_curves`` draws them. Importing this module does not import matplotlib.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Curve", "plot_curves"]


@dataclass(frozen=True)
class Curve:
    """A plot spec: one metric of ``metrics.jsonl`` against the training step, one line per
    variant, in the file ``file`` of the plots folder (``plot_curves`` draws it).

    Attributes:
        file: the image's file name.
        split, key: the records (``split``) and the metric (``key``) drawn.
        ylabel, title: the y axis's label and the title.
        logy, ylim: logarithmic y axis; ``(bottom, top)`` of the y axis.
        from_step: leave out the records of earlier steps (1: the untrained model's at step 0).
    """

    file: str
    split: str
    key: str
    ylabel: str
    title: str
    logy: bool = False
    ylim: tuple[float, float] | None = None
    from_step: int = 0


def plot_curves(
    folder: str | os.PathLike[str],
    records: Sequence[Mapping[str, Any]],
    curves: Sequence[Curve],
    rename: Mapping[str, str] | None = None,
) -> list[Path]:
    """Draw each ``Curve`` that has points in ``records`` (``metrics.jsonl``'s) into ``folder``;
    ``rename`` maps variant names to the legend's. Returns the paths written."""
    written = []
    for curve in curves:
        series: dict[str, tuple[list, list]] = {}
        for r in records:
            value = r.get(curve.key)
            if r.get("split") != curve.split or value is None or r["step"] < curve.from_step:
                continue
            xs, ys = series.setdefault((rename or {}).get(r["variant"], r["variant"]), ([], []))
            xs.append(r["step"])
            ys.append(value)
        if series:
            from classicnets.report.plots import line_plot  # matplotlib: only when drawing

            path = Path(folder) / curve.file
            written.append(line_plot(path, series, "training step", curve.ylabel, curve.title,
                                     curve.ylim, curve.logy))  # fmt: skip
    return written
