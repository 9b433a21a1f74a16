"""The persisted state file: atomic writes, forgiving reads, one process per file."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from embedfleet.fleet.state import StateFile, StateLockedError


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_round_trip_creates_private_parent(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "deeper" / "state.json"
    state = StateFile(path)
    assert state.load() is None
    data = {"instances": [{"name": "a", "port": 8081}], "models": [{"id": "default"}]}
    asyncio.run(state.save(data))
    loaded = state.load()
    assert loaded is not None
    assert loaded["version"] == 1
    assert loaded["saved_at"].endswith("Z")
    assert {k: v for k, v in loaded.items() if k not in ("version", "saved_at")} == data
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert b'\n  "instances"' in path.read_bytes()  # indented for people
    assert _leftovers(path.parent) == []


def test_save_sync_replaces_previous(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    state.save_sync({"n": 1})
    state.save_sync({"n": 2})
    loaded = state.load()
    assert loaded is not None and loaded["n"] == 2
    assert _leftovers(tmp_path) == []


def test_failed_write_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    state = StateFile(path)
    state.save_sync({"n": 1})
    before = path.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)  # fault injection: the rename never happens
    with pytest.raises(OSError, match="No space left"):
        asyncio.run(state.save({"n": 2}))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    loaded = state.load()
    assert loaded is not None and loaded["n"] == 1


def test_unserialisable_data_raises_and_keeps_file(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    state.save_sync({"n": 1})
    with pytest.raises(TypeError):
        state.save_sync({"n": object()})
    loaded = state.load()
    assert loaded is not None and loaded["n"] == 1


@pytest.mark.parametrize(("content", "reason"), [
    (b'{"version": 1, "models": [', "not valid JSON"),
    (b'[1, 2, 3]', "not an object"),
    (b'{"version": 2, "models": []}', "version 2"),
    (b'{"models": []}', "version None"),
    (b'{"version": true}', "version True"),
    (b'\xff\xfe', "not valid JSON"),
])
def test_corrupt_file_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes,
                                  reason: str) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    state = StateFile(path)
    with caplog.at_level(logging.WARNING, logger="embedfleet.fleet"):
        assert state.load() is None
    assert not path.exists()
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert len(moved) == 1
    assert moved[0].read_bytes() == content
    assert any(reason in r.getMessage() and str(moved[0]) in r.getMessage() for r in caplog.records)
    # A second corrupt file in the same second gets its own name: nothing is overwritten.
    path.write_bytes(content)
    assert state.load() is None
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("state.json.corrupt-")]) == 2
    # And the service can write a fresh state over it.
    state.save_sync({"n": 1})
    assert state.load() is not None


def test_unreadable_file_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.json"
    path.mkdir()  # reading it fails with an OSError, as a permission error would (and this works as root)
    (path / "inside").write_text("kept")
    with caplog.at_level(logging.WARNING, logger="embedfleet.fleet"):
        assert StateFile(path).load() is None
    assert not path.exists()
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert len(moved) == 1 and (moved[0] / "inside").read_text() == "kept"
    assert any("cannot be read" in r.getMessage() for r in caplog.records)


def test_concurrent_saves_are_serialised(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = StateFile(path)
    payloads = [{"n": i, "models": [{"id": f"m{j}"} for j in range(i)]} for i in range(50)]

    async def main() -> None:
        await asyncio.gather(*(state.save(p) for p in payloads))

    asyncio.run(main())
    loaded = orjson.loads(path.read_bytes())
    body: dict[str, Any] = {k: v for k, v in loaded.items() if k not in ("version", "saved_at")}
    assert body in payloads
    assert body == payloads[-1]  # the lock is FIFO: the last save wins
    assert _leftovers(tmp_path) == []


HOLDER = """
import sys
from pathlib import Path
from embedfleet.fleet.state import StateFile
state = StateFile(Path(sys.argv[1]))
state.acquire_lock()
print("locked", flush=True)
sys.stdin.read()
"""


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        state = StateFile(path)
        with pytest.raises(StateLockedError, match=str(path)) as info:
            state.acquire_lock()
        assert f"pid {holder.pid}" in str(info.value)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    # The holder is gone: the lock is free again.
    state.acquire_lock()
    state.acquire_lock()  # idempotent
    other = StateFile(path)
    with pytest.raises(StateLockedError):
        other.acquire_lock()
    state.release_lock()
    state.release_lock()  # idempotent
    other.acquire_lock()
    other.release_lock()


def test_lock_excludes_second_holder_in_same_process(tmp_path: Path) -> None:
    first, second = StateFile(tmp_path / "s.json"), StateFile(tmp_path / "s.json")
    first.acquire_lock()
    with pytest.raises(StateLockedError):
        second.acquire_lock()
    first.release_lock()
    second.acquire_lock()
    second.release_lock()
