"""Memory, LMDB and Redis stores: batched get/set, per-model delete and stats; memory bounds; LMDB
persistence and sharing (Redis-only behaviour is in test_redis_store.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embedfleet.cache import EmbedParams, ModelFingerprint, cache_key, decode, encode
from embedfleet.cache.base import Store
from embedfleet.cache.lmdb_store import LmdbStore
from embedfleet.cache.memory import ENTRY_OVERHEAD, MemoryStore
from tests.cache.redis_server import RedisServer, needs_redis_server

A = ModelFingerprint("model-a", "1", "embedding", "mean")
B = ModelFingerprint("model-b", "1", "embedding", "mean")


def _entries(model: ModelFingerprint, n: int) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(len(model.model_id) + n)
    return [(cache_key(model, EmbedParams(), f"text {i}"), encode(rng.standard_normal(16).astype(np.float32)))
            for i in range(n)]


@pytest.fixture(params=["memory", "lmdb", pytest.param("redis", marks=[pytest.mark.slow, needs_redis_server])])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "redis":
        from embedfleet.cache.redis_store import RedisStore

        with RedisServer() as server:
            yield RedisStore(server.url)
    else:
        yield MemoryStore() if request.param == "memory" else LmdbStore(tmp_path / "cache")


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
        size = len(entries[0][0]) + len(entries[0][1]) + ENTRY_OVERHEAD
        store = MemoryStore(max_bytes=size * 4)
        await store.set_many(entries[:4])
        await store.get_many([entries[0][0]])  # entry 0 becomes most recent
        await store.set_many(entries[4:6])
        got = await store.get_many([k for k, _ in entries[:6]])
        assert [g is not None for g in got] == [True, False, False, True, True, True]
        stats = await store.stats()
        assert stats.bytes <= size * 4 and stats.entries == 4  # 6 inserted, the 2 least recently used evicted

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
    assert asyncio.run(mine.stats()).entries == 51  # the other process's write is counted for this one too
    asyncio.run(mine.close())

    async def reopen() -> None:
        store = LmdbStore(path)
        assert await store.get_many([entries[0][0], b"\x01" * 40]) == [entries[0][1], b"from the other process"]
        await store.close()

    asyncio.run(reopen())


def test_memory_tier_keeps_checked_entries_and_counts_rendered_forms() -> None:
    import base64
    import gc

    import orjson

    from embedfleet.cache.memory import render_b64, render_json
    from embedfleet.cache.tiered import TieredCache

    async def run() -> None:
        memory = MemoryStore()
        cache = TieredCache(memory, None)
        vectors = np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)
        keys = [k for k, _ in _entries(A, 3)]
        await cache.put(list(zip(keys, vectors, strict=True)))
        base = (await memory.stats()).bytes
        assert base == sum(len(k) + len(encode(v)) + ENTRY_OVERHEAD for k, v in zip(keys, vectors, strict=True))
        found, missing = cache.lookup_memory(keys)
        assert not missing and cache.counters.memory_hits == 3
        extra = 0
        for key, entry, v in zip(keys, found, vectors, strict=True):
            assert entry is not None and entry[1] is not None and entry[1].tobytes() == v.tobytes()
            json, b64 = render_json(entry), render_b64(entry)
            assert json == orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY)
            assert b64 == b'"' + base64.b64encode(v.tobytes()) + b'"'
            memory.keep(key, entry, json=json)
            memory.keep(key, entry, b64=b64)  # no longer the entry held: ignored
            memory.keep(key, memory.lookup([key])[0], b64=b64)  # type: ignore[arg-type]
            extra += len(json) + len(b64) + 2 * sys.getsizeof(b"")  # each a bytes object of its own
        # Kept rendered forms count against the bound, and are served as they were rendered.
        assert (await memory.stats()).bytes == base + extra
        again, _ = cache.lookup_memory(keys)
        assert [render_json(e) for e in again if e] == [orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY)
                                                        for v in vectors]
        gc.collect()
        assert not any(gc.is_tracked(e) for e in again)  # a full collection never walks the cache
        assert await memory.delete() == 3 and (await memory.stats()).bytes == 0

    asyncio.run(run())


def test_kept_rendered_forms_respect_the_bound() -> None:
    from embedfleet.cache.memory import render_json

    async def run() -> None:
        entries = _entries(A, 6)
        size = len(entries[0][0]) + len(entries[0][1]) + ENTRY_OVERHEAD
        store = MemoryStore(max_bytes=size * 4)
        await store.set_many(entries[:4])
        assert (await store.stats()).bytes == size * 4
        hot = store.lookup([entries[0][0]])[0]
        assert hot is not None
        store.keep(entries[0][0], hot, json=render_json(hot))  # over the bound now: the least recently used go
        stats = await store.stats()
        assert stats.bytes <= size * 4 and stats.entries < 4  # at least one evicted
        assert stats.bytes == sum(size + (len(e[3]) + sys.getsizeof(b"") if e[3] else 0) for e in store._data.values())
        assert (await store.get_many([entries[0][0]]))[0] == entries[0][1]  # the hot entry stayed
        await store.set_many(entries[:1])  # replaced: the rendered form goes with the old value
        assert (await store.stats()).bytes == size * len(store._data)

    asyncio.run(run())


def test_memory_tier_reads_corrupt_and_expired_values_as_misses() -> None:
    from embedfleet.cache.tiered import TieredCache

    async def run() -> None:
        memory = MemoryStore()
        cache = TieredCache(memory, None)
        good, bad, old = (k for k, _ in _entries(A, 3))
        blob = bytearray(encode(np.ones(4, dtype=np.float32)))
        blob[-1] ^= 1
        await memory.set_many([(good, encode(np.ones(4, dtype=np.float32))), (bad, bytes(blob)),
                               (old, encode(np.ones(4, dtype=np.float32), expires_at=1.0))])
        got = await cache.get([good, bad, old])
        assert got[0] is not None and got[1] is None and got[2] is None
        assert cache.counters.memory_hits == 1 and cache.counters.misses == 2

    asyncio.run(run())



TTL_S = 2.0
"""Long enough for the first read to come well before expiry, even on a loaded machine."""


@pytest.mark.slow  # waits for real time to pass
def test_cache_ttl_expires_entries(store: Store) -> None:
    """``--cache-ttl``: an entry answers until its time is up, then reads as a miss; in the memory tier itself
    (the ``memory`` case), and in LMDB and Redis behind a memory tier too small to hold it."""
    import time

    from embedfleet.cache.tiered import TieredCache

    async def run() -> None:
        if isinstance(store, MemoryStore):
            cache = TieredCache(store, None, ttl=TTL_S)
        else:
            cache = TieredCache(MemoryStore(max_bytes=1), store, ttl=TTL_S)
        cache.start()
        (key, _), (forever, _) = _entries(A, 2)
        vector = np.arange(16, dtype=np.float32)
        written = time.monotonic()
        await cache.put([(key, vector)])
        await store.set_many([(forever, encode(vector))])  # written without an expiry
        deadline = time.monotonic() + 30
        while (await store.get_many([key]))[0] is None:  # the cache writes behind
            assert time.monotonic() < deadline, "the entry never reached the store"
            await asyncio.sleep(0.05)
        got = (await cache.get([key]))[0]
        if time.monotonic() - written < TTL_S * 0.75:  # (a stall that long would be no fault of the cache)
            assert got is not None and np.array_equal(got, vector)  # alive before its time
        while (await cache.get([key]))[0] is not None:
            assert time.monotonic() < deadline, "the entry never expired"
            await asyncio.sleep(0.05)
        assert time.monotonic() - written >= TTL_S - 0.05  # expired, and not before its time
        assert (await cache.get([forever]))[0] is not None
        if store.name == "redis":  # Redis's own expiry removes it too: its clock started at the write-behind
            while (await store.get_many([key]))[0] is not None:
                assert time.monotonic() < deadline, "Redis never expired the entry"
                await asyncio.sleep(0.05)
        await cache.close()

    asyncio.run(run())
