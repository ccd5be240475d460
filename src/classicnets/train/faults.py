"""Stopping cleanly: SIGINT / SIGTERM become a checkpoint and a clean exit.

Inside ``SignalGuard`` the first SIGINT (Ctrl-C) or SIGTERM (``kill``, a cluster scheduler's
pre-emption) only sets a flag; the training loop sees it after the current step, writes a
checkpoint and raises ``StopRequested``, which the command line reports with the command to
resume. A second signal while stopping restores the default behaviour (an immediate
``KeyboardInterrupt``). SIGKILL cannot be caught: there the last periodic checkpoint is what
remains, and ``classicnets resume`` continues from it exactly.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["SignalGuard", "StopRequested"]


class StopRequested(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(
        self, signal_name: str, step: int, checkpoint: str | None, resume_path: str | None = None
    ) -> None:
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped by {signal_name} at step {step}{where}")
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint
        self.resume_path = resume_path  # what to resume, when not the checkpoint's run (a sweep)
        self.exit_code = 128 + getattr(signal, signal_name, signal.SIGTERM).value


class SignalGuard:
    """Turn SIGINT/SIGTERM into a flag for the duration of a ``with`` block (main thread only;
    elsewhere it does nothing)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # second signal: give up on the clean stop
            self._restore()
            raise KeyboardInterrupt(f"second {name} while stopping")
        self.received = name

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
