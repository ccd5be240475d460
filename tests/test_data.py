"""Tests for classicnets.data: the IDX reader/writer, MNIST loading, checksums and downloads.

References we did not write: the official files (their published sha256, sizes and class
counts, shared/data/README.md), the IDX header read by hand with ``gzip`` + ``struct``, and
labels known from the MNIST distribution. Downloads go through ``file://`` mirrors only; no test
touches the network.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import classicnets
from classicnets.data import (
    CLASS_NAMES,
    DATASETS,
    DataError,
    DataFile,
    DatasetSpec,
    fetch,
    load_mnist,
    read_idx,
    resolve_root,
    sources,
    write_idx,
)
from classicnets.data import mnist as mnist_module

# shared/data/README.md
MNIST_CLASS_COUNTS = {
    "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}
MNIST_FIRST_LABELS = {
    "train": [5, 0, 4, 1, 9, 2, 1, 3, 1, 4],
    "test": [7, 2, 1, 0, 4, 1, 4, 9, 5, 9],
}
COUNTS = {"train": 60000, "test": 10000}
LABELS = "t10k-labels-idx1-ubyte.gz"  # the smallest real file (4542 bytes)


def _flip(path: Path, offset: int) -> None:
    """Invert the byte at ``offset`` (negative counts from the end), keeping the size."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)  # copyfile: a writeable copy with a fresh mtime
    return dst


# --- the real files -------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_real(data_root: Path, split: str) -> None:
    images, labels = load_mnist(split, data_dir=data_root, download=False)
    n = COUNTS[split]
    assert images.dtype == np.uint8 and images.shape == (n, 28, 28)
    assert labels.dtype == np.int64 and labels.shape == (n,)
    assert np.bincount(labels, minlength=10).tolist() == MNIST_CLASS_COUNTS[split]
    assert labels[:10].tolist() == MNIST_FIRST_LABELS[split]
    assert images.min() == 0 and images.max() == 255
    assert images.flags.writeable  # torch.from_numpy warns on read-only arrays


@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_mnist_real(fashion_root: Path, split: str) -> None:
    images, labels = load_mnist(split, "fashion-mnist", data_dir=fashion_root, download=False)
    n = COUNTS[split]
    assert images.dtype == np.uint8 and images.shape == (n, 28, 28)
    assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
    assert len(CLASS_NAMES["fashion-mnist"]) == 10 and CLASS_NAMES["mnist"][7] == "7"


def test_read_idx_matches_hand_parsed_header(data_root: Path) -> None:
    path = data_root / "mnist" / LABELS
    raw = gzip.decompress(path.read_bytes())
    magic, count = struct.unpack(">II", raw[:8])
    assert magic == 2049 and count == 10000
    labels = read_idx(path)
    np.testing.assert_array_equal(labels, np.frombuffer(raw, np.uint8, offset=8))


def test_real_files_match_specs(data_root: Path) -> None:
    """The sizes and sha256 in DATASETS are those of the files in the data root."""
    sums = data_root / "SHA256SUMS"
    if sums.is_file():  # the shared data folder lists its own checksums
        listed = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line)
        for spec in DATASETS.values():
            for f in spec.files:
                assert listed[f"{spec.subdir}/{f.name}"] == f.sha256
    for spec in DATASETS.values():
        if (data_root / spec.subdir).is_dir():
            assert fetch(spec.name, data_root, download=False) == data_root / spec.subdir
            for f in spec.files:
                assert (data_root / spec.subdir / f.name).stat().st_size == f.size


# --- damaged files ----------------------------------------------------------------------------


def test_truncated_gzip_stream(data_root: Path, tmp_path: Path) -> None:
    path = _copy(data_root / "mnist" / LABELS, tmp_path / LABELS)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(DataError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg and "truncated gzip" in msg
    assert "of the expected 10000 bytes" in msg


def test_short_payload_in_valid_gzip(data_root: Path, tmp_path: Path) -> None:
    raw = gzip.decompress((data_root / "mnist" / LABELS).read_bytes())
    path = tmp_path / "short-labels.gz"
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg and "truncated" in msg
    assert "expected 10000 bytes" in msg and "got 9900 bytes" in msg


def test_payload_too_long(tmp_path: Path) -> None:
    path = tmp_path / "long.idx"
    write_idx(path, np.arange(12, dtype=np.uint8).reshape(3, 4))
    path.write_bytes(path.read_bytes() + b"\x00\x01\x02")
    with pytest.raises(DataError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg and "too long" in msg
    assert "expected 12 bytes" in msg and "got 15 bytes" in msg


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "header.idx"
    path.write_bytes(struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">I", 5))  # 1 of 3 dims
    with pytest.raises(DataError, match="expected 12 bytes of 3 dimensions, got 4"):
        read_idx(path)


def test_corrupt_gzip(data_root: Path, tmp_path: Path) -> None:
    path = _copy(data_root / "mnist" / LABELS, tmp_path / LABELS)
    for offset in (1000, 2000, 3000):  # inside the deflate stream
        _flip(path, offset)
    with pytest.raises(DataError) as info:
        read_idx(path)
    msg = str(info.value)
    # zlib fails on the decompressor's first (buffered) read, so the header is what was expected
    assert str(path) in msg and "corrupt or truncated gzip stream" in msg and "expected" in msg


def test_corrupt_gzip_crc(data_root: Path, tmp_path: Path) -> None:
    """A wrong CRC in the gzip trailer: the data decodes fully but fails the check."""
    path = _copy(data_root / "mnist" / LABELS, tmp_path / LABELS)
    _flip(path, -8)  # first byte of the CRC-32
    with pytest.raises(DataError, match="corrupt or truncated gzip stream"):
        read_idx(path)


def test_not_gzip_despite_suffix(tmp_path: Path) -> None:
    path = tmp_path / "fake.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match="fake.gz"):
        read_idx(path)


@pytest.mark.parametrize(
    "header",
    [
        struct.pack(">HBB", 0x1234, 0x08, 1),  # non-zero leading bytes
        struct.pack(">HBB", 0, 0x07, 1),  # unknown type code
        struct.pack(">HBB", 0, 0x08, 0),  # no dimensions
    ],
)
def test_wrong_magic(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(header + struct.pack(">I", 4) + bytes(4))
    with pytest.raises(DataError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg and "magic number" in msg and "0x00000803" in msg


def test_zero_dimension(tmp_path: Path) -> None:
    path = tmp_path / "zero.idx"
    path.write_bytes(struct.pack(">HBBII", 0, 0x08, 2, 3, 0))
    with pytest.raises(DataError, match="positive"):
        read_idx(path)


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".idx", ".idx.gz"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: str) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((7, 5, 3)) * 100).astype(dtype)
    path = tmp_path / f"a{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    if dtype == "uint8":  # the header is exactly MNIST's layout
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if suffix.endswith(".gz") else raw
        assert raw[:16] == struct.pack(">IIII", 0x0803, 7, 5, 3)
        assert len(raw) == 16 + array.size


def test_gzip_detected_by_magic(tmp_path: Path) -> None:
    array = np.arange(60, dtype=np.uint8).reshape(60)
    write_idx(tmp_path / "x.gz", array)
    (tmp_path / "x.gz").rename(tmp_path / "x.bin")
    np.testing.assert_array_equal(read_idx(tmp_path / "x.bin"), array)


def test_write_idx_deterministic_and_rejects(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    with pytest.raises(ValueError, match="dtype"):
        write_idx(tmp_path / "c.idx", np.zeros(3, dtype=np.uint64))
    with pytest.raises(ValueError, match="shape"):
        write_idx(tmp_path / "d.idx", np.zeros((2, 0), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        write_idx(tmp_path / "e.idx", np.uint8(3))


# --- load_mnist consistency checks (synthetic files, fetch bypassed) --------------------------


@pytest.fixture
def fake_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder that ``load_mnist`` reads without checksums (``fetch`` is stubbed)."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    monkeypatch.setattr(mnist_module, "fetch", lambda *args, **kwargs: folder)
    return folder


def test_load_mnist_checks(fake_mnist: Path) -> None:
    images = np.zeros((4, 28, 28), np.uint8)
    write_idx(fake_mnist / "t10k-images-idx3-ubyte.gz", images)
    write_idx(fake_mnist / "t10k-labels-idx1-ubyte.gz", np.array([0, 9, 3, 1], np.uint8))
    x, y = load_mnist("test")
    assert x.shape == (4, 28, 28) and y.tolist() == [0, 9, 3, 1] and y.dtype == np.int64

    write_idx(fake_mnist / "t10k-labels-idx1-ubyte.gz", np.array([0, 10, 3, 1], np.uint8))
    with pytest.raises(DataError, match=r"labels must be in 0\.\.9, found 10"):
        load_mnist("test")
    write_idx(fake_mnist / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 3], np.uint8))
    with pytest.raises(DataError, match="4 images but .* 3 labels"):
        load_mnist("test")
    write_idx(fake_mnist / "t10k-images-idx3-ubyte.gz", np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(DataError, match=r"\[N, 28, 28\], got uint8 \[3, 32, 32\]"):
        load_mnist("test")


def test_load_mnist_bad_names() -> None:
    with pytest.raises(ValueError, match="'train', 'test'"):
        load_mnist("valid")
    with pytest.raises(ValueError, match="'mnist', 'fashion-mnist'"):
        load_mnist("train", dataset="cifar10")
    with pytest.raises(ValueError, match="'mnist', 'fashion-mnist', 'ptb'"):
        fetch("cifar10")
    with pytest.raises(ValueError, match="has no file"):
        fetch("mnist", files=["nope.gz"])


# --- fetch: checksums, resolution, downloads ------------------------------------------------


@pytest.fixture
def mnist_copy(data_root: Path, tmp_path: Path) -> Path:
    """A data root whose ``mnist/`` holds copies of the label files and links to the images."""
    root = tmp_path / "root"
    folder = root / "mnist"
    folder.mkdir(parents=True)
    for f in DATASETS["mnist"].files:
        if "labels" in f.name:
            _copy(data_root / "mnist" / f.name, folder / f.name)
        else:
            (folder / f.name).symlink_to(data_root / "mnist" / f.name)
    return root


def test_fetch_verifies_checksum(mnist_copy: Path) -> None:
    assert fetch("mnist", mnist_copy, download=False) == mnist_copy / "mnist"
    path = mnist_copy / "mnist" / LABELS
    _flip(path, 2000)  # same size, different content
    expected = DATASETS["mnist"].file(LABELS).sha256
    with pytest.raises(DataError) as info:
        fetch("mnist", mnist_copy, download=True)  # present but corrupt: never re-downloaded
    msg = str(info.value)
    assert str(path) in msg and "sha256" in msg and expected in msg
    assert "delete" in msg and "CLASSICNETS_DATA" in msg
    with pytest.raises(DataError, match="sha256"):
        load_mnist("test", data_dir=mnist_copy)


def test_fetch_verifies_size(mnist_copy: Path) -> None:
    path = mnist_copy / "mnist" / LABELS
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError) as info:
        fetch("mnist", mnist_copy, download=False, files=[LABELS])
    msg = str(info.value)
    assert str(path) in msg and "expected 4542 bytes, found 4541 bytes" in msg


def test_fetch_caches_verified_files(mnist_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real_hash = sources.sha256_file
    monkeypatch.setattr(sources, "sha256_file", lambda p: calls.append(Path(p)) or real_hash(p))
    path = mnist_copy / "mnist" / LABELS
    fetch("mnist", mnist_copy, download=False, files=[LABELS])
    fetch("mnist", mnist_copy, download=False, files=[LABELS])
    assert len(calls) == 2  # modified just now: too fresh to trust its mtime (racily clean)
    hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(hour_ago, hour_ago))
    fetch("mnist", mnist_copy, download=False, files=[LABELS])
    fetch("mnist", mnist_copy, download=False, files=[LABELS])
    assert len(calls) == 3  # the last call trusted the (path, size, mtime) it had verified
    _flip(path, 100)  # same size, new mtime
    with pytest.raises(DataError, match="sha256"):
        fetch("mnist", mnist_copy, download=False, files=[LABELS])
    _flip(path, 100)  # the original bytes again, but with an mtime an hour older than before
    os.utime(path, ns=(hour_ago - 1, hour_ago - 1))
    fetch("mnist", mnist_copy, download=False, files=[LABELS])
    assert len(calls) == 5


def test_download_false_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        fetch("mnist", tmp_path, download=False)
    msg = str(info.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in msg
    assert "missing" in msg and "CLASSICNETS_DATA" in msg
    with pytest.raises(DataError, match="missing"):
        load_mnist("test", data_dir=tmp_path, download=False)


def test_resolve_root_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CLASSICNETS_DATA", raising=False)
    assert resolve_root() == tmp_path / "home" / ".cache" / "classicnets"
    monkeypatch.setenv("CLASSICNETS_DATA", str(tmp_path / "env"))
    assert resolve_root() == tmp_path / "env"
    assert resolve_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_root("~/data") == tmp_path / "home" / "data"
    with pytest.raises(DataError, match=str(tmp_path / "env" / "mnist")):
        fetch("mnist", download=False)  # the env var is used when no argument is given


def _toy_spec(payload: bytes, mirrors: list[str]) -> DatasetSpec:
    digest = hashlib.sha256(payload).hexdigest()
    return DatasetSpec("toy", "toy", (DataFile("toy.bin", digest, len(payload)),), tuple(mirrors))


def _mirror(folder: Path, content: bytes | None) -> str:
    """A ``file://`` base URL serving ``toy.bin`` = ``content`` (None: serves nothing)."""
    folder.mkdir(parents=True)
    if content is not None:
        (folder / "toy.bin").write_bytes(content)
    return folder.as_uri() + "/"


PAYLOAD = bytes(range(256)) * 40  # 10240 bytes


def test_download_bad_then_good_mirror(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = _mirror(tmp_path / "empty", None)
    corrupt = _mirror(tmp_path / "corrupt", PAYLOAD[:-1] + b"\x00")
    good = _mirror(tmp_path / "good", PAYLOAD)
    spec = _toy_spec(PAYLOAD, [bad, corrupt, good])
    folder = fetch(spec, tmp_path / "root")
    assert folder == tmp_path / "root" / "toy"
    assert os.listdir(folder) == ["toy.bin"]  # no temporary file left behind
    assert (folder / "toy.bin").read_bytes() == PAYLOAD
    assert f"downloading {good}toy.bin" in capsys.readouterr().err
    fetch(spec, tmp_path / "root")  # now present and verified: no download
    assert "downloading" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("served", "reason"),
    [
        (PAYLOAD[:-1] + b"\x00", "sha256 mismatch"),
        (PAYLOAD[:-1], "Content-Length 10239, expected 10240 bytes"),
        (PAYLOAD + b"\x00", "Content-Length 10241, expected 10240 bytes"),
    ],
)
def test_download_corrupt_mirror(tmp_path: Path, served: bytes, reason: str) -> None:
    bad = _mirror(tmp_path / "empty", None)
    corrupt = _mirror(tmp_path / "corrupt", served)
    spec = _toy_spec(PAYLOAD, [bad, corrupt])
    with pytest.raises(DataError) as info:
        fetch(spec, tmp_path / "root")
    msg = str(info.value)
    assert f"{bad}toy.bin" in msg and f"{corrupt}toy.bin" in msg and reason in msg
    assert spec.files[0].sha256 in msg
    assert str(tmp_path / "root" / "toy") in msg and "CLASSICNETS_DATA" in msg
    assert os.listdir(tmp_path / "root" / "toy") == []  # nothing at (or beside) the destination


class _Response(io.BytesIO):
    """An HTTP response without a Content-Length header (a chunked transfer)."""

    headers: dict[str, str] = {}


@pytest.mark.parametrize(
    ("served", "reason"),
    [
        (PAYLOAD[:-1], "size mismatch: expected 10240 bytes, got 10239"),
        (PAYLOAD * 2, "size mismatch: more than the expected 10240 bytes"),
    ],
)
def test_download_wrong_size_without_content_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: bytes, reason: str
) -> None:
    requests = []

    def fake_urlopen(request, timeout):
        requests.append((request, timeout))
        return _Response(served)

    monkeypatch.setattr(sources.urllib.request, "urlopen", fake_urlopen)
    spec = _toy_spec(PAYLOAD, ["https://example.invalid/data/"])
    with pytest.raises(DataError, match=reason):
        fetch(spec, tmp_path / "root")
    assert os.listdir(tmp_path / "root" / "toy") == []
    request, timeout = requests[0]
    assert request.full_url == "https://example.invalid/data/toy.bin" and timeout > 0
    assert request.get_header("User-agent").startswith("classicnets/")


def test_download_real_file_via_file_mirror(data_root: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    _copy(data_root / "mnist" / LABELS, mirror / LABELS)
    spec = dataclasses.replace(DATASETS["mnist"], mirrors=(mirror.as_uri() + "/",))
    folder = fetch(spec, tmp_path / "root", files=[LABELS])
    assert os.listdir(folder) == [LABELS]
    assert read_idx(folder / LABELS)[:10].tolist() == MNIST_FIRST_LABELS["test"]


def test_import_does_not_import_torch() -> None:
    src = str(Path(classicnets.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = "import sys, classicnets.data; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
