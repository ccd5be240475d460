"""TensorBoard event files of a run: ``tensorboard --logdir RUN/tensorboard`` (or ``runs/``).

``TensorBoardLog(run_dir)`` is attached to a ``RunDir`` (``run.observers``) by the experiment
layer, in every process that trains (the parent, and each worker of ``jobs``). It writes, through
``torch.utils.tensorboard``, one TensorBoard run per variant, ``RUN/tensorboard/VARIANT/``:

- every ``metrics.jsonl`` record as scalars tagged ``variant/split/key`` at the record's step;
- at each evaluation, every BN layer's running mean and variance as histograms
  (``variant/bn/LAYER/running_mean``);
- the resolved config as text, once;
- at the end of the run, the image grids of conv-ae, vae and gan (the PNGs of ``plots/`` with
  a JSON record beside them) as images, each once (``RUN/tensorboard/images.json`` lists those
  written).

Resume appends without duplicating steps: a variant's writer opens with ``purge_step`` at the
first step this session logs for it, so TensorBoard drops what an earlier session logged from
that step on (the records ``metrics.jsonl`` dropped too, since they are written again). Events
are flushed after every record, so a killed run loses none that its metrics kept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["TensorBoardLog", "available"]

_IDS = ("variant", "step", "split")


def available() -> bool:
    """Whether the ``tensorboard`` package (which ``torch.utils.tensorboard`` needs) imports."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardLog:
    """The observer of a ``RunDir`` that mirrors it into TensorBoard event files."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any] | None = None) -> None:
        self.root = Path(run_dir) / "tensorboard"
        self.config = config
        self._writers: dict[str, Any] = {}

    def _writer(self, variant: str, step: int | None):
        """The variant's writer, opened at the first ``step`` this session logs for it (None:
        for images after training, which purge nothing)."""
        writer = self._writers.get(variant)
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # Whatever an earlier session logged for this variant from this step on is being
            # logged again: TensorBoard purges it.
            writer = SummaryWriter(str(self.root / variant), purge_step=step, flush_secs=5)
            if step == 0 and self.config is not None:
                text = json.dumps(self.config, indent=2, default=str)
                writer.add_text("config", "```\n" + text + "\n```", 0)
            self._writers[variant] = writer
        return writer

    def record(self, record: dict[str, Any]) -> None:
        """One metrics record: its numbers as scalars ``variant/split/key``."""
        variant, step = str(record.get("variant", "run")), int(record.get("step", 0))
        split = str(record.get("split", "metrics"))
        writer = self._writer(variant, step)
        for key, value in record.items():
            if key in _IDS or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                writer.add_scalar(f"{variant}/{split}/{key}", float(value), step)
            elif isinstance(value, str) and value in ("nan", "inf", "-inf"):
                writer.add_scalar(f"{variant}/{split}/{key}", float(value), step)
        writer.flush()

    def evaluated(self, variant: str, step: int, modules: dict[str, Any]) -> None:
        """At an evaluation: the BN layers' running statistics as histograms."""
        from classicnets.nn.batchnorm import is_batchnorm

        writer = self._writer(variant, step)
        for prefix, module in modules.items():
            for name, layer in module.named_modules():
                if not is_batchnorm(layer) or layer.running_mean is None:
                    continue
                where = f"{variant}/bn/{prefix}.{name}" if name else f"{variant}/bn/{prefix}"
                writer.add_histogram(f"{where}/running_mean", layer.running_mean.detach(), step)
                writer.add_histogram(f"{where}/running_var", layer.running_var.detach(), step)
        writer.flush()

    def grids(self, plots: Path) -> list[str]:
        """Every image grid of ``plots/`` (a PNG with its JSON record) not yet written, as an
        image of its variant's run (``grid/NAME``, at the record's step, else 0)."""
        import numpy as np
        from PIL import Image

        done_path = self.root / "images.json"
        done = _names(done_path)
        written = []
        for png in sorted(plots.rglob("*.png")):
            meta = png.with_suffix(".json")
            name = str(png.relative_to(plots))
            if not meta.exists() or name in done:
                continue
            try:
                record = json.loads(meta.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            record = record if isinstance(record, dict) else {}
            variant = str(record.get("variant") or png.stem.split("_")[0])
            step = record.get("step")
            step = int(step) if isinstance(step, int | float) and math.isfinite(step) else 0
            image = np.asarray(Image.open(png).convert("RGB"))
            writer = self._writer(variant, None)
            writer.add_image(f"grid/{png.stem}", image, step, dataformats="HWC")
            writer.flush()
            written.append(name)
        if written:
            from classicnets.files import atomic_write_text

            atomic_write_text(done_path, json.dumps(sorted(done | set(written))))
        return written

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _names(path: Path) -> set[str]:
    """The grids ``images.json`` says were written; a missing or damaged file says none (they
    are written again, which TensorBoard shows as one more step of each image)."""
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return set()
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()
