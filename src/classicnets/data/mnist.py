"""MNIST and Fashion-MNIST from their official IDX files, as NumPy arrays.

The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/) is a big-endian header and a
flat array::

    bytes 0-1   0x0000
    byte  2     type code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte  3     number of dimensions d
    4 * d       the dimensions, each a big-endian uint32
    the rest    prod(dims) values, big-endian, C order

MNIST's images are ``[N, 28, 28]`` uint8 (magic 2051 = 0x00000803) and its labels ``[N]`` uint8
(magic 2049 = 0x00000801); Fashion-MNIST uses the same files and names. ``read_idx`` checks the
header and that the payload has exactly the length the header announces, so a truncated or
padded file is an error, never a silently short array. No torch here: wrap the arrays with
``torch.from_numpy`` where you need tensors.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from classicnets.data.sources import DataError, fetch

__all__ = ["CLASS_NAMES", "SPLITS", "load_mnist", "read_idx", "write_idx"]

CLASS_NAMES: dict[str, list[str]] = {
    "mnist": [str(d) for d in range(10)],
    # Xiao, Rasul & Vollgraf 2017, Table 1 (label order of the official files).
    "fashion-mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}

SPLITS: dict[str, str] = {"train": "train", "test": "t10k"}  # split -> file-name prefix

# IDX type code -> big-endian NumPy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 22  # 4 MiB per read: bounds the decompressor's temporary buffers
_FIX = "Delete the file so that it is downloaded again, or replace it with the official file."


class _Reader:
    """Reads exact byte counts from a (possibly gzip) stream, turning decompression errors into
    ``DataError`` that say how far the read got."""

    def __init__(self, stream: BinaryIO, path: Path, is_gzip: bool) -> None:
        self.stream, self.path, self.is_gzip = stream, path, is_gzip

    def _corrupt(self, err: BaseException, where: str) -> DataError:
        kind = "corrupt or truncated gzip stream" if self.is_gzip else "read error"
        return DataError(f"{self.path}: {kind} ({type(err).__name__}: {err}) {where}. {_FIX}")

    def fill(self, buf: memoryview, what: str) -> int:
        """Fill ``buf`` as far as the stream allows; return the number of bytes read."""
        n = 0
        try:
            while n < len(buf):
                k = self.stream.readinto(buf[n : n + _CHUNK])
                if not k:
                    break
                n += k
        except (OSError, EOFError, zlib.error) as err:
            raise self._corrupt(
                err, f"after {n} of the expected {len(buf)} bytes of {what}"
            ) from err
        return n

    def header(self, nbytes: int, what: str) -> bytes:
        buf = bytearray(nbytes)
        got = self.fill(memoryview(buf), what)
        if got != nbytes:
            raise DataError(
                f"{self.path}: file too short for an IDX header: expected {nbytes} bytes of "
                f"{what}, got {got}. {_FIX}"
            )
        return bytes(buf)

    def count_rest(self, what: str) -> int:
        """Read to the end of the stream; return how many bytes were left."""
        extra = 0
        try:
            while chunk := self.stream.read(_CHUNK):
                extra += len(chunk)
        except (OSError, EOFError, zlib.error) as err:
            raise self._corrupt(err, f"while reading past the end of {what}") from err
        return extra


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzip-compressed (``.gz`` suffix or gzip magic bytes) or raw.

    Args:
        path: the file.

    Returns:
        An array of the header's shape, in native byte order (uint8 for MNIST's files),
        writeable.

    Raises:
        DataError: bad magic number, non-positive dimension, a payload shorter or longer than the
            header announces, or a corrupt/truncated gzip stream. The message names the file and
            the expected and actual values.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        is_gzip = path.suffix == ".gz" or raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
        with stream:
            reader = _Reader(stream, path, is_gzip)
            zero, type_code, ndim = struct.unpack(">HBB", reader.header(4, "the magic number"))
            magic = (zero << 16) | (type_code << 8) | ndim
            if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
                codes = ", ".join(f"0x{c:02X} {d.name}" for c, d in _IDX_DTYPES.items())
                raise DataError(
                    f"{path}: not an IDX file: magic number 0x{magic:08X}; expected 0x0000, then "
                    f"a type code ({codes}), then the number of dimensions (>= 1), e.g. "
                    f"0x00000803 for MNIST images, 0x00000801 for labels. {_FIX}"
                )
            dims = struct.unpack(f">{ndim}I", reader.header(4 * ndim, f"{ndim} dimensions"))
            if any(d == 0 for d in dims):
                raise DataError(
                    f"{path}: IDX header has a zero dimension {dims}; every dimension must be "
                    f"positive. {_FIX}"
                )
            dtype = _IDX_DTYPES[type_code]
            expected = math.prod(dims) * dtype.itemsize
            what = f"data for shape {dims} ({dtype.name}) after the {4 + 4 * ndim}-byte header"
            try:
                flat = np.empty(expected, dtype=np.uint8)
            except (MemoryError, ValueError) as err:
                raise DataError(
                    f"{path}: IDX header announces shape {dims} = {expected} bytes of data, "
                    f"which cannot be allocated ({err}); the header is probably corrupt. {_FIX}"
                ) from err
            got = reader.fill(memoryview(flat), what)
            extra = reader.count_rest(what) if got == expected else 0
    if got != expected or extra:
        problem = "truncated" if got < expected else "too long"
        raise DataError(
            f"{path}: {problem} IDX data: expected {expected} bytes of {what}, got "
            f"{got + extra} bytes. {_FIX}"
        )
    array = flat.view(dtype).reshape(dims)
    if dtype.byteorder == ">":  # multi-byte types: convert to native order (also copies)
        array = array.astype(dtype.newbyteorder("="))
    return array


def _idx_type_code(dtype: np.dtype) -> int:
    for code, idx_dtype in _IDX_DTYPES.items():
        if idx_dtype.kind == dtype.kind and idx_dtype.itemsize == dtype.itemsize:
            return code
    valid = ", ".join(d.name for d in _IDX_DTYPES.values())
    raise ValueError(f"IDX cannot store dtype {dtype}; supported: {valid}")


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzip-compressed if ``path`` ends with ``.gz``.

    The inverse of ``read_idx``: ``read_idx(p)`` after ``write_idx(p, a)`` equals ``a`` (same
    shape, dtype and values). The gzip header carries no name or time stamp, so equal arrays give
    equal files.

    Args:
        path: the file to write (replaced if it exists).
        array: uint8 (MNIST), or int8, int16, int32, float32, float64; 1 to 255 dimensions, each
            positive and below 2**32.

    Raises:
        ValueError: an unsupported dtype or shape.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _idx_type_code(array.dtype)
    if not 1 <= array.ndim <= 255 or any(not 0 < d < 2**32 for d in array.shape):
        raise ValueError(
            f"IDX needs 1 to 255 dimensions, each in 1..2**32-1; got shape {array.shape}"
        )
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    payload = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    with open(path, "wb") as f:
        if path.suffix == ".gz":
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
                gz.write(header)
                gz.write(payload)
        else:
            f.write(header)
            f.write(payload)


def load_mnist(
    split: str = "train",
    dataset: str = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of MNIST or Fashion-MNIST, verified against the official checksums.

    >>> images, labels = load_mnist("test")  # doctest: +SKIP
    >>> images.shape, images.dtype, labels.shape, labels.dtype  # doctest: +SKIP
    ((10000, 28, 28), dtype('uint8'), (10000,), dtype('int64'))

    Args:
        split: ``"train"`` (60000 examples) or ``"test"`` (10000).
        dataset: ``"mnist"`` or ``"fashion-mnist"`` (class names in ``CLASS_NAMES``).
        data_dir: the data root (see ``classicnets.data.resolve_root``): the files are read from
            ``<root>/<dataset>/``.
        download: download missing files (into the data root) with sha256 verification.

    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28]`` with 0 = background, and int64 ``[N]`` in
        0..9.

    Raises:
        ValueError: an unknown split or dataset.
        DataError: a missing, corrupt or inconsistent file.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(map(repr, SPLITS))}")
    if dataset not in CLASS_NAMES:
        valid = ", ".join(map(repr, CLASS_NAMES))
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {valid}")
    prefix = SPLITS[split]
    image_name, label_name = f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"
    folder = fetch(dataset, data_dir, download, files=(image_name, label_name))
    image_path, label_path = folder / image_name, folder / label_name
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(
            f"{image_path}: expected uint8 images of shape [N, 28, 28], got {images.dtype} "
            f"{list(images.shape)}. {_FIX}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{label_path}: expected uint8 labels of shape [N], got {labels.dtype} "
            f"{list(labels.shape)}. {_FIX}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} "
            f"labels; expected equal counts. {_FIX}"
        )
    num_classes = len(CLASS_NAMES[dataset])
    if labels.max() >= num_classes:
        raise DataError(
            f"{label_path}: labels must be in 0..{num_classes - 1}, found {int(labels.max())}. "
            f"{_FIX}"
        )
    return images, labels.astype(np.int64)
