"""LMDB's size bound and counters: the map grows up to ``max_size``, then writes are refused as counted
drops (logged once a minute); stats come from per-model counters, never a scan of the entries."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest

from embedfleet.cache import EmbedParams, ModelFingerprint, cache_key, encode
from embedfleet.cache.base import StoreFull
from embedfleet.cache.lmdb_store import LmdbStore
from embedfleet.cache.memory import MemoryStore, entry_from_blob
from embedfleet.cache.tiered import TieredCache
from embedfleet.cache.urls import StoreURLError, open_store, parse_size

A = ModelFingerprint("model-a", "1", "embedding", "mean")
B = ModelFingerprint("model-b", "1", "embedding", "mean")
KiB = 1024


def _entries(model: ModelFingerprint, n: int, dim: int = 384, start: int = 0) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(start)
    return [(cache_key(model, EmbedParams(), f"text {i}"), encode(rng.standard_normal(dim).astype(np.float32)))
            for i in range(start, start + n)]


def _size(items: list[tuple[bytes, bytes]]) -> int:
    return sum(len(k) + len(v) for k, v in items)


def test_map_grows_to_its_bound_then_refuses_writes(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "c", map_size=16 * KiB, max_size=256 * KiB)
    assert store.map_size == 16 * KiB
    written: list[tuple[bytes, bytes]] = []
    for item in _entries(A, 500):
        try:
            store._set([item])
        except StoreFull as exc:
            assert exc.dropped == 1
            break
        written.append(item)
    else:
        pytest.fail("a 256 KiB map took 500 vectors of 1.5 KiB")
    assert store.map_size == 256 * KiB  # doubled from 16 KiB up to the bound, not beyond
    assert len(written) > 16 * KiB // 1600 * 4  # it did grow: far more than the first map holds
    with pytest.raises(StoreFull) as refused:
        store._set(_entries(B, 3))
    assert refused.value.dropped == 3
    # Reads and stats go on at the bound, and the counts are what landed.
    assert store._get([k for k, _ in written]) == [v for _, v in written]
    stats = store._stats()
    assert (stats.entries, stats.bytes) == (len(written), _size(written))
    assert stats.per_model == {A.tag.hex(): (len(written), _size(written))}
    asyncio.run(store.close())


def test_tiered_cache_counts_drops_at_the_bound_and_logs_once(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        store = LmdbStore(tmp_path / "c", map_size=16 * KiB, max_size=64 * KiB)
        cache = TieredCache(MemoryStore(), store, write_batch=4)
        cache.start()
        items = [(k, entry_from_blob(v)) for k, v in _entries(A, 200)]
        for i in range(0, len(items), 4):  # many flushes, most of them refused
            cache.store_entries(items[i:i + 4])
            await asyncio.sleep(0)
        await cache.close()
        stored = (await LmdbStore(tmp_path / "c", map_size=16 * KiB, max_size=64 * KiB).stats()).entries
        assert 0 < stored < 200
        assert cache.counters.writes_dropped == 200 - stored
        assert cache.counters.store_errors == 0  # a full store is not a broken one: no back-off for reads

    with caplog.at_level(logging.WARNING, logger="embedfleet.cache.tiered"):
        asyncio.run(run())
    full = [r for r in caplog.records if "at its bound" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in caplog.records]


def test_lmdb_url_sets_the_sizes(tmp_path: Path) -> None:
    store = open_store(f"lmdb://{tmp_path / 'c'}?map_size=64KiB&max_size=1MiB")
    assert isinstance(store, LmdbStore) and (store.map_size, store.max_size) == (64 * KiB, 1024 * KiB)
    asyncio.run(store.close())
    small = open_store(f"lmdb://{tmp_path / 'd'}?max_size=128KiB")  # the start follows a smaller bound
    assert isinstance(small, LmdbStore) and (small.map_size, small.max_size) == (128 * KiB, 128 * KiB)
    asyncio.run(small.close())
    assert parse_size("4096") == 4096 and parse_size("1.5GB") == 1_500_000_000 and parse_size("2 GiB") == 2 * 1024**3
    for bad in ("?mapsize=1GiB", "?map_size=lots", "?map_size=2MiB&max_size=1MiB", "?map_size"):
        with pytest.raises(StoreURLError):
            open_store(f"lmdb://{tmp_path / 'e'}{bad}")


class _Spy:
    """Wraps an LMDB environment and counts the records its transactions and cursors read."""

    def __init__(self, inner: Any, reads: list[int]) -> None:
        self._inner, self._reads = inner, reads

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def begin(self, *args: Any, **kwargs: Any) -> _Spy:
        return _Spy(self._inner.begin(*args, **kwargs), self._reads)

    def __enter__(self) -> _Spy:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._inner.__exit__(*exc)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        self._reads[0] += 1
        return self._inner.get(*args, **kwargs)

    def cursor(self, *args: Any, **kwargs: Any) -> _Spy:
        return _Spy(self._inner.cursor(*args, **kwargs), self._reads)

    def _count(self, rows: Any) -> Any:
        for row in rows:
            self._reads[0] += 1
            yield row

    def __iter__(self) -> Any:
        return self._count(iter(self._inner))

    def iternext(self, *args: Any, **kwargs: Any) -> Any:
        return self._count(self._inner.iternext(*args, **kwargs))


def test_stats_read_the_counters_not_the_entries(tmp_path: Path) -> None:
    async def run() -> None:
        store = LmdbStore(tmp_path / "c")
        a, b = _entries(A, 3000, dim=8), _entries(B, 7, dim=8)
        await store.set_many(a)
        await store.set_many(b)
        bigger = [(k, encode(np.ones(16, dtype=np.float32))) for k, _ in a[:10]]  # overwrites change bytes only
        await store.set_many(bigger)
        a[:10] = bigger
        reads = [0]
        store._env = _Spy(store._env, reads)  # type: ignore[assignment]
        stats = await store.stats()
        assert reads[0] <= 4, f"stats read {reads[0]} records for 2 models"
        assert stats.per_model == {A.tag.hex(): (3000, _size(a)), B.tag.hex(): (7, _size(b))}
        assert (stats.entries, stats.bytes) == (3007, _size(a) + _size(b))
        store._env = store._env._inner  # type: ignore[attr-defined]
        assert await store.delete(B.tag) == 7
        assert (await store.stats()).per_model == {A.tag.hex(): (3000, _size(a))}
        assert await store.delete() == 3000
        assert (await store.stats()).entries == 0
        await store.set_many(b)  # counting goes on after a full delete
        assert (await store.stats()).per_model == {B.tag.hex(): (7, _size(b))}
        await store.close()

    asyncio.run(run())


def test_a_file_from_before_the_counters_is_counted_once_when_opened(tmp_path: Path) -> None:
    entries = _entries(A, 20, dim=8) + _entries(B, 5, dim=8)
    env = lmdb.open(str(tmp_path / "old"), map_size=16 * 1024**2)  # as an earlier version wrote it
    with env.begin(write=True) as txn:
        for key, value in entries:
            txn.put(key, value)
    env.close()
    store = LmdbStore(tmp_path / "old")
    stats = store._stats()
    assert stats.per_model == {A.tag.hex(): (20, _size(entries[:20])), B.tag.hex(): (5, _size(entries[20:]))}
    asyncio.run(store.close())
