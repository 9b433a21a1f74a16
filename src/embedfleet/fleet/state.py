"""The fleet's persisted desired state: one JSON file, written atomically, read forgivingly.

Writes go to a temporary file in the same folder, are flushed and fsynced, then renamed over the
old file (and the folder fsynced), so a crash leaves either the old state or the new one, never a
mix. A file that cannot be read back is moved aside (never deleted) and the service starts empty
rather than crash-looping. A lock file keeps two ``serve`` processes off one state file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from embedfleet.fleet.errors import timestamp

log = logging.getLogger("embedfleet.fleet")

STATE_VERSION = 1


class StateLockedError(RuntimeError):
    """Another process holds the state file's lock."""


class StateFile:
    """The desired state of a fleet, persisted at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._async_lock = asyncio.Lock()
        # save_sync may be called from any thread, and save() runs it in one.
        self._write_lock = threading.Lock()
        self._lock_fd: int | None = None

    # ----- reading -----

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none or it cannot be used.

        A file that cannot be read or parsed, is not an object or has another ``version`` is moved
        aside to ``<name>.corrupt-<UTC time>`` with a warning; this never raises for that.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._quarantine(f"cannot be read ({exc})")
            return None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self._quarantine(f"is not valid JSON ({exc})")
            return None
        if not isinstance(data, dict):
            self._quarantine(f"holds a JSON {type(data).__name__}, not an object")
            return None
        version = data.get("version")
        if version != STATE_VERSION or isinstance(version, bool):
            self._quarantine(f"has version {version!r}; this embedfleet reads version {STATE_VERSION}")
            return None
        return data

    def _quarantine(self, reason: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        try:
            os.replace(self.path, target)
        except OSError as exc:
            log.error("state file %s %s and could not be moved aside (%s); starting with an empty state",
                      self.path, reason, exc)
            return
        log.warning("state file %s %s; moved it to %s and starting with an empty state", self.path, reason, target)

    # ----- writing -----

    @staticmethod
    def encode(data: dict[str, Any]) -> bytes:
        """The file's bytes: ``data`` plus ``version`` and ``saved_at``, indented for people."""
        payload = {**data, "version": STATE_VERSION, "saved_at": timestamp()}
        return orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)

    def save_sync(self, data: dict[str, Any]) -> None:
        """Write ``data`` atomically (blocking: call from a thread in async code)."""
        self._write(self.encode(data))

    async def save(self, data: dict[str, Any]) -> None:
        """Write ``data`` atomically in a thread; saves are applied one at a time, in call order."""
        async with self._async_lock:
            # Encoded here, in the loop, so a caller changing ``data`` afterwards cannot race the thread.
            content = self.encode(data)
            await asyncio.to_thread(self._write, content)

    def _write(self, content: bytes) -> None:
        folder = self.path.parent
        with self._write_lock:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(content)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            # The rename is durable only once the folder entry is on disk.
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    # ----- one process per state file -----

    def acquire_lock(self) -> None:
        """Lock ``<path>.lock`` for this process; StateLockedError if another process holds it."""
        if self._lock_fd is not None:
            return
        self.lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                pid = int(os.read(fd, 32).decode().strip())
                holder = f" (pid {pid})"
            os.close(fd)
            raise StateLockedError(
                f"state file {self.path} is in use by another embedfleet process{holder}: "
                f"{self.lock_path} is locked; stop that process or use another state file"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder's pid, for the error message above and for people.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release_lock(self) -> None:
        """Release the lock (the lock file stays: removing it would race a process taking it)."""
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
