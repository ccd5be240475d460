"""Shared test fixtures.

Real-data tests read MNIST / Fashion-MNIST / PTB from ``CLASSICNETS_DATA`` (CI and the Makefile
point it at ``../shared/data``). Where the data is absent they skip, unless
``CLASSICNETS_REQUIRE_DATA=1`` (set by ``.ci/run``), where a missing dataset fails the run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# Runs train their variants one after the other in the test process (monkeypatches and
# in-process assertions reach them); tests/test_jobs.py sets ``jobs`` where it tests workers.
os.environ.setdefault("CLASSICNETS_JOBS", "1")

_REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [os.environ.get("CLASSICNETS_DATA"), str(_REPO.parent / "shared" / "data")]


def _data_root() -> Path | None:
    # Resolved: a relative CLASSICNETS_DATA (``../shared/data``) must mean the same folder to a
    # test that links into it from a temporary directory or changes the working directory.
    for c in _CANDIDATES:
        if c and Path(c).is_dir():
            return Path(c).resolve()
    return None


def _require(subdir: str) -> Path:
    root = _data_root()
    if root is None or not (root / subdir).is_dir():
        msg = f"dataset folder {subdir!r} not found (set CLASSICNETS_DATA to the data root)"
        if os.environ.get("CLASSICNETS_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data root holding ``mnist/`` (and ``fashion-mnist/``, ``ptb/``)."""
    return _require("mnist")


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    return _require("fashion-mnist")


@pytest.fixture(scope="session")
def ptb_data_root() -> Path:
    """The data root, holding ``ptb/``."""
    return _require("ptb")
