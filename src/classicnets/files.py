"""Files that are never half written, and run folders with one writer at a time. No torch here.

- ``atomic_write_bytes`` / ``atomic_write_text``: write to a temporary file in the same folder
  (``.NAME.XXXXXXXX.tmp``), fsync, then ``os.replace``: a reader sees the old file or the new one,
  never a torn one. A process killed between the write and the rename leaves only the temporary
  file, which the next writer of the folder removes (``remove_stale_temporaries``).
- ``RunLock``: an exclusive ``flock`` on ``run.lock`` in a run folder, held for as long as the
  process writes there. The kernel releases it when the process dies, SIGKILL included, so a
  killed run never leaves a stale lock; a second writer is refused at once with the holder's PID.
  The lock is re-entrant within one process (``run`` calls ``write_report``, which locks too).

Used by checkpoints, run folders, reports, plots and exports alike, so that a rule about writing
files is kept in one place.
"""

from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "LOCK_NAME",
    "SWEEP_NAME",
    "FolderLockedError",
    "RunLock",
    "atomic_write_bytes",
    "atomic_write_text",
    "hold_folder",
    "holder_pid",
    "read_json_object",
    "remove_stale_temporaries",
]

LOCK_NAME = "run.lock"
SWEEP_NAME = "sweep.json"  # what makes a folder a sweep's (experiments.sweep), not a run's
_TMP_GLOB = ".*.tmp"

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder is then not protected against a second writer
    fcntl = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The file gets the mode ``open()`` would give it (0666 less the umask). On any error the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_json_object(path: str | os.PathLike, error: type[Exception]) -> dict:
    """The JSON object in file ``path``; ``error`` with a one-line message naming the file when
    it is missing, unreadable, not JSON (or nested past the parser's depth) or not an object."""
    import json

    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{path}: cannot read: {exc}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.NAME.*.tmp``) that killed writes left under ``folder``.

    Call it only while holding the folder's lock: then no other process is writing one.
    Returns the files removed.
    """
    removed = []
    for tmp in Path(folder).rglob(_TMP_GLOB):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class FolderLockedError(RuntimeError):
    """Another process holds the folder's lock (the message names the folder and its PID)."""


# resolved folder -> [lock, depth]: the locks this process holds, for re-entrant use
_HELD: dict[Path, list] = {}


class RunLock:
    """The exclusive lock of one folder, held through an open ``run.lock`` file.

    Args:
        folder: an existing folder; ``run.lock`` is created in it if missing (never removed:
            removing it would let two processes lock two different files of the same name).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise ``FolderLockedError`` at once (never waits)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                who = f"PID {holder}" if holder else "another process"
                raise FolderLockedError(
                    f"{self.folder} is in use by another classicnets process ({who}); wait for "
                    f"it to finish or stop it, then try again"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def holder_pid(folder: str | os.PathLike) -> int | None:
    """The PID of the process holding ``folder``'s lock, or None when nobody holds it."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextmanager
def hold_folder(folder: str | os.PathLike):
    """Hold ``folder``'s lock for the ``with`` block (re-entrant within this process); stale
    temporary files of killed writes are removed once the lock is taken."""
    key = Path(folder).resolve()
    entry = _HELD.get(key)
    if entry is not None:
        entry[1] += 1
        try:
            yield entry[0]
        finally:
            entry[1] -= 1
        return
    lock = RunLock(folder).acquire()
    _HELD[key] = [lock, 1]
    try:
        remove_stale_temporaries(folder)
        yield lock
    finally:
        del _HELD[key]
        lock.release()
