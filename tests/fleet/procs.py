"""Process checks for the fleet tests: is a pid still a live process, and waiting until some are gone."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (exited, waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def assert_gone(pids: Iterable[int], timeout: float = 30.0) -> None:
    """Every one of ``pids`` has stopped running within ``timeout`` seconds (polled)."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running after {timeout}s: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)
