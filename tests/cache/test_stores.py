"""Memory and LMDB stores: batched get/set, per-model delete and stats, bounds, persistence, sharing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from embedfleet.cache import EmbedParams, ModelFingerprint, cache_key, decode, encode
from embedfleet.cache.base import Store
from embedfleet.cache.lmdb_store import LmdbStore
from embedfleet.cache.memory import MemoryStore

A = ModelFingerprint("model-a", "1", "embedding", "mean")
B = ModelFingerprint("model-b", "1", "embedding", "mean")


def _entries(model: ModelFingerprint, n: int) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(len(model.model_id) + n)
    return [(cache_key(model, EmbedParams(), f"text {i}"), encode(rng.standard_normal(16).astype(np.float32)))
            for i in range(n)]


@pytest.fixture(params=["memory", "lmdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return MemoryStore() if request.param == "memory" else LmdbStore(tmp_path / "cache")


def test_get_set_delete_stats(store: Store) -> None:
    async def run() -> None:
        a, b = _entries(A, 5), _entries(B, 3)
        await store.set_many(a + b)
        got = await store.get_many([k for k, _ in a] + [b"\0" * 40])
        assert got[:5] == [v for _, v in a] and got[5] is None
        stats = await store.stats()
        assert stats.entries == 8
        assert stats.per_model[A.tag.hex()][0] == 5 and stats.per_model[B.tag.hex()][0] == 3
        assert await store.delete(A.tag) == 5
        assert await store.get_many([a[0][0], b[0][0]]) == [None, b[0][1]]
        assert await store.delete() == 3
        assert (await store.stats()).entries == 0
        await store.close()

    asyncio.run(run())


def test_overwrite_replaces_a_corrupt_value(store: Store) -> None:
    async def run() -> None:
        key = cache_key(A, EmbedParams(), "x")
        await store.set_many([(key, b"corrupt")])
        assert decode((await store.get_many([key]))[0]) is None
        good = encode(np.ones(4, dtype=np.float32))
        await store.set_many([(key, good)])
        assert (await store.get_many([key]))[0] == good
        await store.close()

    asyncio.run(run())


def test_memory_lru_is_bounded_by_bytes() -> None:
    async def run() -> None:
        entries = _entries(A, 10)
        size = len(entries[0][0]) + len(entries[0][1])
        store = MemoryStore(max_bytes=size * 4)
        await store.set_many(entries[:4])
        await store.get_many([entries[0][0]])  # entry 0 becomes most recent
        await store.set_many(entries[4:6])
        got = await store.get_many([k for k, _ in entries[:6]])
        assert [g is not None for g in got] == [True, False, False, True, True, True]
        assert (await store.stats()).bytes <= size * 4 and store.evictions == 2

    asyncio.run(run())


@pytest.mark.slow
def test_lmdb_survives_restart_and_is_shared_between_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared"
    entries = _entries(A, 50)

    mine = LmdbStore(path)  # stays open while the other process reads and writes
    asyncio.run(mine.set_many(entries))
    other = textwrap.dedent(f"""
        import asyncio, sys
        from embedfleet.cache.lmdb_store import LmdbStore
        keys = [bytes.fromhex(h) for h in sys.argv[1].split(",")]
        async def main():
            store = LmdbStore({str(path)!r})
            values = await store.get_many(keys)
            await store.set_many([(b"\\x01" * 40, b"from the other process")])
            await store.close()
            print(sum(v is not None for v in values))
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", other, ",".join(k.hex() for k, _ in entries)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "50"
    assert asyncio.run(mine.get_many([b"\x01" * 40])) == [b"from the other process"]  # seen live
    asyncio.run(mine.close())

    async def reopen() -> None:
        store = LmdbStore(path)
        assert await store.get_many([entries[0][0], b"\x01" * 40]) == [entries[0][1], b"from the other process"]
        await store.close()

    asyncio.run(reopen())
