"""classicnets.files: atomic writes, the run-folder lock across processes, stale temporaries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from classicnets.files import (
    LOCK_NAME,
    FolderLockedError,
    atomic_write_bytes,
    atomic_write_text,
    hold_folder,
    holder_pid,
    remove_stale_temporaries,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")


def _holder(folder: Path) -> subprocess.Popen:
    """A separate process that takes the folder's lock, says so, and sleeps."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from classicnets.files import hold_folder
        with hold_folder({str(folder)!r}):
            print("held", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_second_process_is_refused_with_the_holders_pid(tmp_path):
    proc = _holder(tmp_path)
    try:
        assert holder_pid(tmp_path) == proc.pid
        with pytest.raises(FolderLockedError) as info:
            with hold_folder(tmp_path):
                pass
        message = str(info.value)
        assert str(tmp_path) in message and f"PID {proc.pid}" in message
    finally:
        proc.kill()
        proc.wait()


def test_sigkill_leaves_no_stale_lock(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; the kernel dropped the lock
    assert holder_pid(tmp_path) is None
    with hold_folder(tmp_path) as lock:
        assert lock.held and holder_pid(tmp_path) == os.getpid()
    assert holder_pid(tmp_path) is None


def test_lock_is_reentrant_within_a_process(tmp_path):
    with hold_folder(tmp_path) as outer:
        with hold_folder(tmp_path / ".." / tmp_path.name) as inner:  # same folder, other spelling
            assert inner is outer
        assert outer.held  # the inner block did not release the outer one
    assert not outer.held


def test_next_writer_removes_stale_temporaries_only(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".metrics.jsonl.1a2b3c4d.tmp", tmp_path / "checkpoints" / ".x.json.9.tmp"]
    for p in stale:
        p.write_text("torn")
    kept = [tmp_path / "notes.tmp", tmp_path / "metrics.jsonl"]  # not our temporary names
    for p in kept:
        p.write_text("user")
    with hold_folder(tmp_path):
        pass
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "user" for p in kept)
    assert remove_stale_temporaries(tmp_path) == []
