"""Datasets: MNIST and Fashion-MNIST (IDX files), Penn Treebank (text), checksummed.

Files are looked up under a data root (``--data-dir``, else ``$CLASSICNETS_DATA``, else
``~/.cache/classicnets``), verified against the official sha256, and downloaded only when
missing. Nothing here imports torch::

    from classicnets.data import load_mnist
    images, labels = load_mnist("train")  # uint8 [60000, 28, 28], int64 [60000]
"""

from classicnets.data.mnist import CLASS_NAMES, load_mnist, read_idx, write_idx
from classicnets.data.sources import (
    DATASETS,
    DataError,
    DataFile,
    DatasetSpec,
    fetch,
    resolve_root,
)

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "DataError",
    "DataFile",
    "DatasetSpec",
    "fetch",
    "load_mnist",
    "read_idx",
    "resolve_root",
    "write_idx",
]
