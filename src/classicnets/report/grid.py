"""Image grids: one pixel-exact writer for every experiment, and a generator's fixed-noise grids.

- ``write_grid`` tiles ``(rows, columns, H, W)`` images into a PNG (each cell enlarged by
  nearest neighbour, grey padding) and writes beside it a JSON record of the layout and of what
  the cells are; ``read_grid_cell`` cuts one cell out of a saved PNG again. The autoencoder's
  and the VAE's reconstructions (``reconstruction_grid``), the VAE's samples and the GAN's grids
  are all written so.
- **Fixed-noise grids** of a generator (``GridSpec``, ``generate_grid``, ``save_grid``,
  ``regenerate_cell``): one row per digit for a conditional GAN. Every cell's noise comes from
  its own seed, and the ``cell -> (noise seed, label)`` mapping is saved in the JSON beside each
  PNG, so any cell of any grid can be generated again, alone, bit for bit.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from classicnets.files import atomic_write_bytes, atomic_write_text

__all__ = [
    "GridSpec",
    "cell_noise",
    "generate_cell",
    "generate_grid",
    "grid_image",
    "progress_figure",
    "read_grid",
    "read_grid_cell",
    "reconstruction_grid",
    "regenerate_cell",
    "save_grid",
    "write_grid",
]

NOISE_RECIPE = (
    "z = torch.randn(latent_size, generator=torch.Generator('cpu').manual_seed(noise_seed)); "
    "image = generator(z[None], tensor([label]) or None)[0], one cell per call (batch of 1)"
)


@dataclass
class GridSpec:
    """Which noise seed and label each cell of a sample grid gets.

    - conditional, ``label`` None: one row per class (row r is digit r); cell (r, c) has noise
      seed ``seed + c``, so each column keeps one noise vector across the digits (style fixed,
      class varies);
    - conditional, ``label`` K: one row of digit K; cell (0, c) has noise seed ``seed + c`` (the
      same image as cell (K, c) of the full grid with the same seed);
    - unconditional: cell (r, c) has noise seed ``seed + r * columns + c``; only the first
      ``count`` cells are drawn (default all).

    Args:
        columns: cells per row.
        seed: base noise seed.
        latent_size: size of z.
        num_classes: 0 for an unconditional generator.
        label: the one class to draw (conditional only), or None.
        rows: rows of an unconditional grid (conditional grids: num_classes, or 1 with a label).
        count: unconditional: how many cells to draw (default rows * columns).
    """

    columns: int
    seed: int
    latent_size: int
    num_classes: int = 0
    label: int | None = None
    rows: int = 1
    count: int | None = None

    def __post_init__(self) -> None:
        if self.columns < 1:
            raise ValueError(f"a grid needs at least one column, got {self.columns}")
        if self.num_classes:
            if self.label is not None and not 0 <= self.label < self.num_classes:
                raise ValueError(f"label {self.label} is not a class (0..{self.num_classes - 1})")
            self.rows = 1 if self.label is not None else self.num_classes
        elif self.label is not None:
            raise ValueError("an unconditional generator cannot be asked for a label")

    @classmethod
    def for_samples(
        cls, n: int, seed: int, latent_size: int, num_classes: int = 0, label: int | None = None
    ) -> GridSpec:
        """The grid ``classicnets sample`` draws: conditional, n columns (per digit, or of
        ``label``); unconditional, n cells in rows of at most 10."""
        if num_classes:
            return cls(n, seed, latent_size, num_classes, label)
        columns = min(n, 10)
        return cls(columns, seed, latent_size, 0, None, math.ceil(n / columns), n)

    def cells(self) -> list[dict[str, Any]]:
        """``[{"row", "column", "noise_seed", "label"}]`` in row-major order."""
        out = []
        for r in range(self.rows):
            for c in range(self.columns):
                if self.num_classes:
                    label = self.label if self.label is not None else r
                    out.append({"row": r, "column": c, "noise_seed": self.seed + c, "label": label})
                else:
                    index = r * self.columns + c
                    if self.count is not None and index >= self.count:
                        return out
                    noise_seed = self.seed + index
                    out.append({"row": r, "column": c, "noise_seed": noise_seed, "label": None})
        return out


def cell_noise(noise_seed: int, latent_size: int) -> Tensor:
    """The latent vector of one cell: ``(latent_size,)`` standard normal from its own seed."""
    return torch.randn(latent_size, generator=torch.Generator("cpu").manual_seed(noise_seed))


@torch.no_grad()
def generate_cell(
    generator: nn.Module, noise_seed: int, label: int | None, latent_size: int, device="cpu"
) -> Tensor:
    """One cell's image ``(C, H, W)`` on CPU, from its noise seed and label.

    The generator runs on a batch of one: a batched matrix product may sum in another order than
    a single row's, so drawing each cell alone is what makes a cell regenerated alone identical
    to the same cell drawn in a grid.
    """
    was_training = generator.training
    generator.eval()
    z = cell_noise(noise_seed, latent_size)[None].to(device)  # (1, latent)
    y = None if label is None else torch.tensor([label], device=device)
    image = generator(z, y)[0].float().cpu()  # (C, H, W)
    generator.train(was_training)
    return image


def generate_grid(generator: nn.Module, spec: GridSpec, device="cpu") -> Tensor:
    """The grid's images ``(rows, columns, C, H, W)`` on CPU; cells not drawn are zeros."""
    images: Tensor | None = None
    for cell in spec.cells():
        image = generate_cell(
            generator, cell["noise_seed"], cell["label"], spec.latent_size, device
        )
        if images is None:
            images = torch.zeros(spec.rows, spec.columns, *image.shape)
        images[cell["row"], cell["column"]] = image
    assert images is not None  # a spec has at least one cell
    return images


def _to_uint8(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def grid_image(images: Tensor, scale: int = 2, padding: int = 2, pad_value: int = 128) -> Tensor:
    """Tile ``(rows, columns, 1, H, W)`` images in [0, 1] into one uint8 picture.

    Each cell is enlarged ``scale`` times (nearest neighbour) and surrounded by ``padding``
    pixels of grey ``pad_value``; cell (r, c)'s top-left corner is at
    ``(padding + r * (H * scale + padding), padding + c * (W * scale + padding))``.
    """
    rows, columns, _, height, width = images.shape
    cells = _to_uint8(images[:, :, 0])  # (rows, columns, H, W)
    cells = cells.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    ch, cw = height * scale, width * scale
    out = torch.full(
        (padding + rows * (ch + padding), padding + columns * (cw + padding)),
        pad_value,
        dtype=torch.uint8,
    )
    for r in range(rows):
        for c in range(columns):
            top, left = padding + r * (ch + padding), padding + c * (cw + padding)
            out[top : top + ch, left : left + cw] = cells[r, c]
    return out


def _png_bytes(picture: Tensor) -> bytes:
    from matplotlib import image as mpimg

    rgb = picture.numpy()[:, :, None].repeat(3, axis=2)  # (H, W, 3) uint8: written as is
    buffer = io.BytesIO()
    mpimg.imsave(buffer, rgb, format="png")
    return buffer.getvalue()


def write_grid(
    path: str | Path,
    images: Tensor,
    record: dict[str, Any] | None = None,
    scale: int = 2,
    padding: int = 2,
) -> tuple[Path, Path]:
    """Write ``images`` as one pixel-exact PNG grid and, beside it (same name, ``.json``), its
    layout and ``record``.

    Args:
        path: the PNG to write; its folder is created. Both files are written atomically.
        images: ``(rows, columns, H, W)`` or ``(rows, columns, 1, H, W)`` intensities in [0, 1],
            tiled by ``grid_image`` (cell (r, c) at a position ``read_grid_cell`` computes from
            the JSON).
        record: what the cells are (seeds, labels, the names of the rows, a title), JSON-ready.
        scale, padding: as in ``grid_image``.

    Returns:
        ``(png_path, json_path)``.
    """
    images = torch.as_tensor(images)
    if images.ndim == 4:
        images = images[:, :, None]  # (rows, columns, 1, H, W)
    path = Path(path)
    png = atomic_write_bytes(path, _png_bytes(grid_image(images, scale, padding)))
    layout = {"image_shape": list(images.shape[2:]), "scale": scale, "padding": padding}
    meta = atomic_write_text(path.with_suffix(".json"), json.dumps({**(record or {}), **layout},
                             indent=1))  # fmt: skip
    return png, meta


def reconstruction_grid(
    path: str | Path,
    originals: Tensor,
    reconstructions: dict[str, Tensor],
    title: str = "",
    columns: int = 16,
    original: str = "original",
) -> Path:
    """One grid (``write_grid``): a row of ``originals`` (its row label ``original``) and under
    it a row per entry of ``reconstructions``; the row labels and the title are in the JSON.

    Args:
        path: the PNG to write (atomically; its folder is created).
        originals: ``[n, 1, H, W]`` intensities in [0, 1].
        reconstructions: row label -> ``[n, 1, H, W]`` intensities.
        title: what the grid shows.
        columns: images per row; more images wrap into further blocks of rows (the cells past
            the last image stay black).
    """
    n, _, h, w = originals.shape
    columns = max(1, min(columns, n))
    named = {original: originals, **reconstructions}
    rows: list[str] = []
    blocks = []
    for start in range(0, n, columns):
        for name, images in named.items():
            row = torch.zeros(columns, h, w)
            chunk = images[start : start + columns, 0].float().cpu()
            row[: len(chunk)] = chunk
            rows.append(name)
            blocks.append(row)
    return write_grid(path, torch.stack(blocks), {"rows": rows, "title": title})[0]


def progress_figure(
    folder: str | Path, prefix: str, out: str | Path, title: str, snapshots: int = 5
) -> Path | None:
    """The grids ``folder/{prefix}_stepNNNNNNNN.png`` of up to ``snapshots`` steps spread over
    training, side by side in one figure at ``out`` (None, and nothing written, with fewer
    than two grids)."""
    from matplotlib import image as mpimg
    from matplotlib.figure import Figure

    from classicnets.report.plots import save_figure

    grids = sorted(Path(folder).glob(f"{prefix}_step*.png"))
    if len(grids) < 2:
        return None
    picks = sorted({round(i * (len(grids) - 1) / (snapshots - 1)) for i in range(snapshots)})
    fig = Figure(figsize=(3.2 * len(picks), 3.6), layout="constrained")
    for ax, i in zip(fig.subplots(1, len(picks), squeeze=False)[0], picks):
        ax.imshow(mpimg.imread(grids[i]))
        ax.set_title(f"step {int(grids[i].stem.rpartition('step')[2])}")
        ax.axis("off")
    fig.suptitle(title)
    return save_figure(fig, out)


def save_grid(
    path: str | Path,
    images: Tensor,
    spec: GridSpec,
    info: dict[str, Any] | None = None,
    scale: int = 2,
    padding: int = 2,
) -> tuple[Path, Path]:
    """Write a generator's grid (``write_grid``) with, in its JSON, how to regenerate each
    cell: the spec (base seed, latent size, classes), ``cells``: ``[{"row", "column",
    "noise_seed", "label"}]``, the noise recipe, and ``info`` (e.g. the training step).

    Returns:
        ``(png_path, json_path)``.
    """
    record = {**(info or {}), "spec": asdict(spec), "noise": NOISE_RECIPE, "cells": spec.cells()}
    return write_grid(path, images, record, scale, padding)


def read_grid(json_path: str | Path) -> dict[str, Any]:
    """The JSON record written beside a grid by ``save_grid``."""
    return json.loads(Path(json_path).read_text(encoding="utf-8"))


def read_grid_cell(png_path: str | Path, row: int, column: int) -> np.ndarray:
    """Cell (row, column) of a saved grid as uint8 ``(H * scale, W * scale)``."""
    from matplotlib import image as mpimg

    png_path = Path(png_path)
    record = read_grid(png_path.with_suffix(".json"))
    _, height, width = record["image_shape"]
    scale, padding = record["scale"], record["padding"]
    picture = np.rint(mpimg.imread(png_path)[:, :, 0] * 255).astype(np.uint8)
    ch, cw = height * scale, width * scale
    top, left = padding + row * (ch + padding), padding + column * (cw + padding)
    return picture[top : top + ch, left : left + cw]


def regenerate_cell(
    generator: nn.Module, record: dict[str, Any] | str | Path, row: int, column: int, device="cpu"
) -> Tensor:
    """Generate cell (row, column) of a saved grid again, alone: ``(C, H, W)`` in [0, 1].

    With the weights the grid was drawn with (the checkpoint of the step in its JSON), the result
    is bit-identical to the cell as drawn; ``read_grid_cell`` gives the cell as saved (uint8,
    scaled).

    Args:
        generator: the generator (``GAN.generator``).
        record: the grid's JSON record or the path of its ``.json`` (or ``.png``) file.
        row, column: the cell.
        device: where to run the generator.
    """
    if not isinstance(record, dict):
        record = read_grid(Path(record).with_suffix(".json"))
    spec = record["spec"]
    if getattr(generator, "latent_size", spec["latent_size"]) != spec["latent_size"]:
        raise ValueError(
            f"the grid was drawn with latent size {spec['latent_size']}, the generator takes "
            f"{generator.latent_size}"
        )
    for cell in record["cells"]:
        if cell["row"] == row and cell["column"] == column:
            return generate_cell(
                generator, cell["noise_seed"], cell["label"], spec["latent_size"], device
            )
    raise ValueError(f"the grid has no cell ({row}, {column})")
