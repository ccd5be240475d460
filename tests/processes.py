"""Waiting on a real ``classicnets`` process until its run folder shows what a test waits for."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def wait_until(
    proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 240
) -> None:
    """Poll ``ready()`` until it holds; fail (killing ``proc`` if it is too slow) when ``proc``
    ends first or ``timeout`` seconds pass. ``what`` names the moment awaited, for the message."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run is too slow to reach {what}")
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting for its reaper has ended; Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def wait_for_exit(pids: list[int], what: str, timeout: float = 120) -> None:
    """Fail unless every process of ``pids`` ends within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"{what} outlived the run"
        time.sleep(0.05)


def stop_with_sigterm(proc: subprocess.Popen, resume: Path) -> str:
    """Send ``proc`` SIGTERM; check that it stops with exit code 128 + SIGTERM and names
    ``classicnets resume RESUME``, the command that continues it. Its stderr."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"continue with: classicnets resume {resume}\n" in err
    return err
