"""Two tiers: a bounded in-process LRU in front of a persistent store.

Reads look in memory, then in the store (one round trip for all keys), and back-fill memory. A
slow or dead store never fails or holds up a request beyond ``read_timeout``: the read counts as
misses (fail open), the error is counted and logged at most every few seconds, and the store is
skipped for a short back-off before it is tried again. Writes go to memory at once and to the store
through a bounded write-behind queue, flushed on close; when the queue is full, or a store at its
size bound refuses them (:class:`StoreFull`: not an error, reads go on), entries are dropped and
counted (a dropped write is only a future miss), and a full store is logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import Histogram

from embedfleet.cache.base import Store, StoreFull
from embedfleet.cache.memory import BLOB, EXPIRES, VECTOR, Entry, MemoryStore, entry_from_blob, entry_from_vector

log = logging.getLogger(__name__)

FULL_LOG_INTERVAL = 60.0
"""Seconds between two warnings about a full store."""


@dataclass
class TierCounters:
    """Lookups answered by each tier, and store failures."""

    memory_hits: int = 0
    store_hits: int = 0
    misses: int = 0
    store_errors: int = 0
    writes_dropped: int = 0


class TieredCache:
    """Memory LRU + optional persistent store, with fail-open reads and write-behind."""

    def __init__(self, memory: MemoryStore, store: Store | None, ttl: float | None = None,
                 read_timeout: float = 0.25, write_queue: int = 65536, write_batch: int = 512,
                 backoff: float = 1.0) -> None:
        self.memory = memory
        self.store = store
        self.ttl = ttl
        self.read_timeout = read_timeout
        self.write_batch = write_batch
        self.backoff = backoff
        self.counters = TierCounters()
        # Not registered anywhere: whoever serves /metrics collects it (see the gateway's collector).
        self.store_latency = Histogram("embedfleet_cache_store_seconds", "Cache store call latency", ["op"],
                                       registry=None,
                                       buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
        # None is the stop sentinel; put() never enqueues None.
        self._queue: asyncio.Queue[tuple[bytes, bytes] | None] = asyncio.Queue(maxsize=write_queue)
        self._writer: asyncio.Task[None] | None = None
        self._store_down_until = 0.0
        self._last_error_log = 0.0
        self._last_full_log: float | None = None
        self._full_since_log = 0

    def start(self) -> None:
        """Start the write-behind task (call from the event loop)."""
        if self.store is not None and self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="cache-writer")

    @property
    def store_available(self) -> bool:
        """False while the store is in back-off after an error."""
        return self.store is not None and time.monotonic() >= self._store_down_until

    def _store_failed(self, exc: BaseException, what: str) -> None:
        self.counters.store_errors += 1
        self._store_down_until = time.monotonic() + self.backoff
        now = time.monotonic()
        if now - self._last_error_log >= 5.0:
            self._last_error_log = now
            log.warning("cache store %s %s failed (%s); serving without it for %.1fs",
                        self.store.name if self.store else "-", what, exc or type(exc).__name__, self.backoff)

    def lookup_memory(self, keys: Sequence[bytes]) -> tuple[list[Entry | None], list[int]]:
        """Entries from the memory tier (None for misses and expired entries), and the positions missed.

        Synchronous: an all-hit request never yields to the event loop. Counts the memory hits; pass
        the misses to :meth:`lookup_rest`, which counts the rest.
        """
        found = self.memory.lookup(keys)
        missing: list[int] = []
        now = 0.0
        for i, entry in enumerate(found):
            if entry is None or entry[VECTOR] is None:
                found[i] = None
                missing.append(i)
            elif entry[EXPIRES]:
                now = now or time.time()
                if entry[EXPIRES] <= now:
                    found[i] = None
                    missing.append(i)
        self.counters.memory_hits += len(found) - len(missing)
        return found, missing

    async def lookup_rest(self, keys: Sequence[bytes], found: list[Entry | None], missing: list[int],
                          read_store: bool = True) -> None:
        """Look the memory misses up in the store (one round trip), fill them into ``found``, back-fill memory."""
        if missing and read_store and self.store is not None and self.store_available:
            started = time.perf_counter()
            try:
                stored = await asyncio.wait_for(self.store.get_many([keys[i] for i in missing]), self.read_timeout)
            except Exception as exc:  # any store failure is a miss, never a failed request
                self._store_failed(exc, "read")
            else:
                self.store_latency.labels("read").observe(time.perf_counter() - started)
                backfill = []
                now = time.time()
                for i, blob in zip(missing, stored, strict=True):
                    if blob is None:
                        continue
                    entry = entry_from_blob(bytes(blob))
                    if entry[VECTOR] is not None and not (entry[EXPIRES] and entry[EXPIRES] <= now):
                        found[i] = entry
                        backfill.append((keys[i], entry))
                        self.counters.store_hits += 1
                if backfill:
                    self.memory.insert(backfill)
        self.counters.misses += sum(found[i] is None for i in missing)

    async def lookup(self, keys: Sequence[bytes], read_store: bool = True) -> list[Entry | None]:
        """Entries for the keys (None for misses); corrupt or expired entries are misses."""
        found, missing = self.lookup_memory(keys)
        if missing:
            await self.lookup_rest(keys, found, missing, read_store)
        return found

    async def get(self, keys: Sequence[bytes], read_store: bool = True) -> list[np.ndarray | None]:
        """Vectors for the keys (None for misses); corrupt or expired entries are misses."""
        return [None if e is None else e[VECTOR] for e in await self.lookup(keys, read_store)]

    def entry(self, vector: np.ndarray, tokens: int = 0) -> Entry:
        """A value for a vector and its input's token count, with this cache's expiry (float32, as stored)."""
        return entry_from_vector(vector, time.time() + self.ttl if self.ttl else 0.0, tokens)

    def store_entries(self, items: Sequence[tuple[bytes, Entry]]) -> None:
        """Cache entries: memory now, the store through the write-behind queue."""
        self.memory.insert(items)
        if self.store is None:
            return
        for key, entry in items:
            try:
                self._queue.put_nowait((key, entry[BLOB]))
            except asyncio.QueueFull:
                self.counters.writes_dropped += 1

    async def put(self, items: Sequence[tuple[bytes, np.ndarray]]) -> None:
        """Cache vectors: memory now, the store through the write-behind queue."""
        self.store_entries([(k, self.entry(v)) for k, v in items])

    async def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            batch: list[tuple[bytes, bytes]] = []
            item = await self._queue.get()
            while True:
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                if stopping or len(batch) >= self.write_batch or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                await self._flush(batch)

    async def _flush(self, batch: list[tuple[bytes, bytes]]) -> None:
        assert self.store is not None
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self.store.set_many(batch, self.ttl), max(self.read_timeout * 8, 2.0))
        except StoreFull as exc:
            self.counters.writes_dropped += exc.dropped
            self._store_full(exc)
        except Exception as exc:
            self.counters.writes_dropped += len(batch)
            self._store_failed(exc, "write")
        else:
            self.store_latency.labels("write").observe(time.perf_counter() - started)

    def _store_full(self, exc: StoreFull) -> None:
        self._full_since_log += exc.dropped
        now = time.monotonic()
        if self._last_full_log is None or now - self._last_full_log >= FULL_LOG_INTERVAL:
            self._last_full_log = now
            log.warning("%s; %d cache writes dropped since the last message (embedfleet_cache_writes_dropped_total "
                        "counts them all)", exc, self._full_since_log)
            self._full_since_log = 0

    async def delete(self, model_tag: bytes | None = None) -> int:
        """Delete from both tiers; returns the larger count (the tiers overlap)."""
        in_memory = await self.memory.delete(model_tag)
        in_store = await self.store.delete(model_tag) if self.store is not None else 0
        return max(in_memory, in_store)

    async def close(self) -> None:
        """Flush every queued write, then close the store."""
        if self._writer is not None:
            await self._queue.put(None)
            await self._writer
            self._writer = None
        if self.store is not None:
            await self.store.close()
        await self.memory.close()
