"""Worker processes: independent pieces of work (an experiment's variants) side by side.

``run_workers(specs, jobs)`` starts each ``WorkerSpec``'s command as a process of its own, at
most ``jobs`` at a time, and returns once every one has ended. What it does for them:

- **threads**: each worker gets ``spec.threads`` CPU threads (``OMP_NUM_THREADS``, and
  ``CLASSICNETS_WORKER_THREADS`` for ``torch.set_num_threads``), so that side-by-side workers
  split the machine's cores instead of fighting over them; ``spec.env`` adds the rest (a GPU
  each: ``CUDA_VISIBLE_DEVICES``).
- **progress**: a worker's training loop writes its progress to a pipe
  (``progress_to_parent``) and this process draws one bar per worker, all at once.
- **signals**: each worker runs in a session of its own, so a Ctrl-C at the terminal reaches
  this process only, which hands SIGINT / SIGTERM on to every running worker once (each then
  checkpoints and stops, as one process does) and starts no new one. A worker whose parent
  dies, even by SIGKILL, gets SIGTERM (``die_with_parent``, Linux), so no orphan keeps writing.
- **outcomes**: a worker that fails leaves the others running; each ``WorkerOutcome`` has the
  exit code and the JSON result the worker wrote (``write_result``), if it wrote one.

No pickles cross between the processes: the command line, the environment and JSON files.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PROGRESS_FD",
    "THREADS",
    "WorkerFailed",
    "WorkerOutcome",
    "WorkerSpec",
    "die_with_parent",
    "progress_to_parent",
    "read_result",
    "run_workers",
    "write_result",
]

PROGRESS_FD = "CLASSICNETS_PROGRESS_FD"  # the pipe a worker reports its progress on
THREADS = "CLASSICNETS_WORKER_THREADS"  # torch.set_num_threads in a worker


class WorkerFailed(RuntimeError):
    """A worker process ended without a result (it crashed or was killed)."""


@dataclass
class WorkerSpec:
    """One worker: ``argv`` (the command), shown as ``name``, with ``threads`` CPU threads and
    the extra environment ``env``; it writes its JSON result to ``result_path``."""

    name: str
    argv: list[str]
    result_path: Path
    threads: int = 1
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class WorkerOutcome:
    """How a worker ended: its exit code (negative: killed by that signal; None: never
    started, because the run was stopped first), its JSON result, if it wrote one, and when it
    started and ended (``time.monotonic()``; None for one never started)."""

    name: str
    returncode: int | None
    result: dict[str, Any] | None
    started: float | None = None
    ended: float | None = None

    def describe(self) -> str:
        if self.returncode is None:
            return "was not started (the run was stopped first)"
        if self.returncode < 0:
            return f"was killed by {signal.Signals(-self.returncode).name}"
        return f"exited with code {self.returncode}"


def run_workers(specs: list[WorkerSpec], jobs: int) -> list[WorkerOutcome]:
    """Run every spec, at most ``jobs`` at a time, in order; their outcomes in the same order.

    SIGINT and SIGTERM received meanwhile are handed on to the running workers and no new
    worker starts; the call still waits for every running one to end.
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: expected at least 1")
    pending = list(enumerate(specs))
    running: dict[int, tuple[subprocess.Popen, threading.Thread]] = {}
    started: dict[int, float] = {}
    outcomes: dict[int, WorkerOutcome] = {}
    received: list[int] = []
    slots = list(range(jobs))  # progress-bar rows free for the next worker

    def forward(signum, frame) -> None:
        received.append(signum)
        for process, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)

    with _signals_forwarded(forward):
        while running or (pending and not received):  # after a signal, no new one starts
            while pending and len(running) < jobs and not received:
                index, spec = pending.pop(0)
                started[index] = time.monotonic()
                running[index] = _start(spec, slots.pop(0))
            time.sleep(0.02)
            for index in [i for i, (p, _) in running.items() if p.poll() is not None]:
                process, reader = running.pop(index)
                reader.join()
                slots.append(reader.slot)  # type: ignore[attr-defined]
                spec = specs[index]
                outcomes[index] = WorkerOutcome(spec.name, process.returncode, read_result(spec),
                                                started[index], time.monotonic())  # fmt: skip
        for index, spec in pending:
            outcomes[index] = WorkerOutcome(spec.name, None, None)
    return [outcomes[i] for i in range(len(specs))]


@contextlib.contextmanager
def _signals_forwarded(handler):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _start(spec: WorkerSpec, slot: int) -> tuple[subprocess.Popen, threading.Thread]:
    spec.result_path.unlink(missing_ok=True)  # a result of an earlier session is not this one's
    read_end, write_end = os.pipe()
    threads = str(max(1, spec.threads))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           THREADS: threads, PROGRESS_FD: str(write_end), **spec.env}  # fmt: skip
    try:
        process = subprocess.Popen(
            spec.argv, env=env, pass_fds=(write_end,), start_new_session=True
        )
    finally:
        os.close(write_end)  # the worker holds the only writing end: its exit ends the reader
    reader = threading.Thread(target=_draw_progress, args=(read_end, spec.name, slot), daemon=True)
    reader.slot = slot  # type: ignore[attr-defined]
    reader.start()
    return process, reader


def _draw_progress(read_end: int, name: str, slot: int) -> None:
    """One progress bar, in row ``slot``, from the JSON lines a worker writes on its pipe."""
    bar = None
    with open(read_end, encoding="utf-8", errors="replace") as pipe:
        for line in pipe:
            try:
                message = json.loads(line)
                if bar is None:
                    from tqdm.auto import tqdm

                    total, initial = int(message["total"]), int(message["n"])
                    bar = tqdm(total=total, initial=initial, desc=name, unit="step",
                               dynamic_ncols=True, position=slot, leave=True)  # fmt: skip
                bar.set_postfix(message.get("postfix") or {}, refresh=False)
                bar.update(int(message["n"]) - bar.n)
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a killed worker: the next one says where it is
    if bar is not None:
        bar.close()


class _PipeProgress:
    """What ``fit`` draws its progress with inside a worker: the parent draws the bar."""

    def __init__(self, fd: int, total: int, initial: int) -> None:
        self._pipe = open(fd, "w", encoding="utf-8", buffering=1, closefd=False)
        self.total, self.n = total, initial
        self._postfix: dict[str, Any] = {}
        self._send()

    def _send(self) -> None:
        message = {"total": self.total, "n": self.n, "postfix": self._postfix}
        with contextlib.suppress(OSError, ValueError):  # the parent is gone: nobody to draw for
            self._pipe.write(json.dumps(message) + "\n")

    def set_postfix(self, postfix: dict[str, Any]) -> None:
        self._postfix = {k: str(v) for k, v in postfix.items()}

    def update(self, n: int) -> None:
        self.n += n
        self._send()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._pipe.flush()


def progress_to_parent(total: int, initial: int) -> _PipeProgress | None:
    """In a worker started by ``run_workers``, a progress bar that the parent draws (the
    interface of tqdm's ``update``, ``set_postfix`` and ``close``); elsewhere None."""
    fd = os.environ.get(PROGRESS_FD)
    if fd is None:
        return None
    try:
        return _PipeProgress(int(fd), total, initial)
    except (OSError, ValueError):
        return None  # not a pipe of ours (an environment inherited by something else)


def die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent process dies (elsewhere this does nothing), so a
    worker of a killed run checkpoints and stops instead of training on unseen."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def write_result(path: str | os.PathLike, result: dict[str, Any]) -> None:
    """A worker's JSON result, written atomically (a reader never sees half of it)."""
    from classicnets.files import atomic_write_text
    from classicnets.train.run import json_default

    atomic_write_text(path, json.dumps(result, allow_nan=True, default=json_default))


def read_result(spec: WorkerSpec) -> dict[str, Any] | None:
    """The JSON object a worker wrote, or None when it wrote none (or not an object)."""
    try:
        value = json.loads(spec.result_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
