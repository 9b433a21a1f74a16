"""Fleet test support: a one-worker fleet config, and process checks (is a pid still a live process, and
waiting until some are gone)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from tests.helpers import free_port


def one_worker_config(tmp: Path, data_dir: Path, cache: str = "memory://", **fleet: object) -> Path:
    """An ``embedfleet.toml`` for a fleet of one single-thread worker of the default model (instance
    ``embed``), its state under ``tmp``, exported graphs in ``data_dir``; ``fleet``: more ``[fleet]`` keys."""
    low = 21000 + free_port() % 20000
    extra = "".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in fleet.items())
    path = tmp / "embedfleet.toml"
    path.write_text(f"""
[fleet]
state_dir = "{tmp / 'state'}"
data_dir = "{data_dir}"
port_range = "{low}-{low + 20}"
{extra}
[[fleet.instances]]
name = "embed"
model = "default"
threads = 1

[gateway]
cache = "{cache}"
""")
    return path


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
