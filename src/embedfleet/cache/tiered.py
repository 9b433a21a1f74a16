"""Two tiers: a bounded in-process LRU in front of a persistent store.

Reads look in memory, then in the store (one round trip for all keys), and back-fill memory. A
slow or dead store never fails or holds up a request beyond ``read_timeout``: the read counts as
misses (fail open), the error is counted and logged at most every few seconds, and the store is
skipped for a short back-off before it is tried again. Writes go to memory at once and to the store
through a bounded write-behind queue, flushed on close; when the queue is full, or a store at its
size bound refuses them (:class:`StoreFull`: not an error, reads go on), entries are dropped and
counted (a dropped write is only a future miss), and a full store is logged at most once a minute.

Where the store is shared by gateways on several hosts and offers :class:`~embedfleet.cache.base.Leases`
(Redis), misses are also single-flight across gateways: :meth:`TieredCache.claim` takes a short lease on
each text the caller is about to compute (or finds its value, or learns that another gateway holds its
lease); the caller renews its leases while it computes (:meth:`TieredCache.holding`) and publishes the
values with the leases dropped (:meth:`TieredCache.store_entries`), while the others poll for them
(:meth:`TieredCache.await_foreign`) and compute a text themselves only where its lease lapses without a
value (its holder died or failed) or their wait runs out. Every lease step fails open: a store that
cannot be reached means computing, never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Histogram

from embedfleet.cache.base import Leases, Store, StoreFull
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
    flights_joined: int = 0
    """Texts another gateway was computing, answered by its value."""
    flights_taken_over: int = 0
    """Texts another gateway held a lease on that was dropped or lapsed without a value (or waited on past
    the deadline): computed here."""


POLL_FIRST_S = 0.002
POLL_MAX_S = 0.05
"""A gateway waiting on another's lease polls the store after 2 ms, then ever less often, at least every 50 ms."""


@dataclass
class Claim:
    """What :meth:`TieredCache.claim` found for each key: stored entries, keys the caller is to compute
    (under its lease where the store offers them), and keys another gateway is computing."""

    found: dict[bytes, Entry] = field(default_factory=dict)
    owned: list[bytes] = field(default_factory=list)
    foreign: list[bytes] = field(default_factory=list)


class TieredCache:
    """Memory LRU + optional persistent store, with fail-open reads and write-behind."""

    def __init__(self, memory: MemoryStore, store: Store | None, ttl: float | None = None,
                 read_timeout: float = 0.25, write_queue: int = 65536, write_batch: int = 512,
                 backoff: float = 1.0, leases: bool = True, lease_ttl: float = 2.0, lease_wait: float = 60.0) -> None:
        """``leases``: single-flight across gateways where the store offers leases; ``lease_ttl``: seconds a
        lease lives unless renewed (its holder renews it every third of that); ``lease_wait``: seconds a
        gateway waits at most on texts another is computing before it computes them itself."""
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
        self._leases = store.leases if store is not None and leases else None
        self.lease_ttl = lease_ttl
        self.lease_wait = lease_wait
        # A claim precedes a computation (milliseconds to seconds): it may wait longer than a read before
        # failing open, which would compute the texts twice. A dead store is caught by the read before it.
        self.lease_timeout = min(max(read_timeout * 4, 1.0), lease_ttl / 3)
        self._lease_tasks: set[asyncio.Task[None]] = set()

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

    @property
    def shares_flights(self) -> bool:
        """Whether misses are single-flight across gateways now (leases on, and the store not in back-off)."""
        return self._leases is not None and self.store_available

    def _entries(self, keys: Sequence[bytes], blobs: Sequence[bytes]) -> dict[bytes, Entry]:
        """Stored values as entries, back-filled into memory (a corrupt or expired one is left out)."""
        now = time.time()
        found: dict[bytes, Entry] = {}
        for key, blob in zip(keys, blobs, strict=True):
            entry = entry_from_blob(bytes(blob))
            if entry[VECTOR] is not None and not (entry[EXPIRES] and entry[EXPIRES] <= now):
                found[key] = entry
        if found:
            self.memory.insert(list(found.items()))
        return found

    async def claim(self, keys: Sequence[bytes]) -> Claim:
        """For texts about to be computed: the entries stored meanwhile, the keys to compute here (their
        leases taken) and the keys another gateway holds leases on (:meth:`await_foreign`). Without leases,
        or when the store fails, every key is the caller's to compute."""
        leases = self._leases
        if leases is None or not keys or not self.store_available:
            return Claim(owned=list(keys))
        try:
            replies = await asyncio.wait_for(leases.claim(keys, self.lease_ttl), self.lease_timeout)
        except Exception as exc:  # computing is always possible: fail open
            self._store_failed(exc, "lease")
            return Claim(owned=list(keys))
        claim = Claim()
        stored = [(k, r) for k, r in zip(keys, replies, strict=True) if isinstance(r, bytes)]
        claim.found = self._entries([k for k, _ in stored], [r for _, r in stored])
        for key, reply in zip(keys, replies, strict=True):
            if reply is False:
                claim.foreign.append(key)
            elif key not in claim.found:  # its lease taken, or a stored value that is no use (corrupt, expired)
                claim.owned.append(key)
        return claim

    async def await_foreign(self, keys: Sequence[bytes]) -> Claim:
        """Wait for texts other gateways are computing: their entries as they appear, and the keys that are
        the caller's to compute after all (a lease dropped or lapsed without a value, whose lease the caller
        has now taken; or the wait ran past ``lease_wait``)."""
        result = Claim()
        pending = list(keys)
        deadline = time.monotonic() + self.lease_wait
        delay = POLL_FIRST_S
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, POLL_MAX_S)
            step = await self.claim(pending + result.owned)  # claiming again what it holds renews it
            result.found.update(step.found)
            result.owned = step.owned
            pending = step.foreign
        result.owned += pending
        self.counters.flights_joined += len(result.found)
        self.counters.flights_taken_over += len(result.owned)
        return result

    @contextlib.asynccontextmanager
    async def holding(self, keys: Sequence[bytes]) -> AsyncIterator[None]:
        """Renew the caller's leases on ``keys`` every third of ``lease_ttl`` while the body computes them."""
        leases = self._leases
        if leases is None or not keys:
            yield
            return
        task = asyncio.get_running_loop().create_task(self._renew_loop(leases, list(keys)), name="lease-renewal")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _renew_loop(self, leases: Leases, keys: list[bytes]) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                await asyncio.wait_for(leases.renew(keys, self.lease_ttl), self.lease_timeout)
            except Exception as exc:  # the lease lapses: at worst another gateway computes the text too
                self._store_failed(exc, "lease renewal")

    def release(self, keys: Sequence[bytes]) -> None:
        """Drop the caller's leases on texts it will not compute after all (its computation failed), in the
        background, so that the gateways waiting on them compute them at once."""
        if self._leases is not None and keys:
            self._publish([], list(keys))

    def _publish(self, items: list[tuple[bytes, bytes]], release: list[bytes]) -> None:
        task = asyncio.get_running_loop().create_task(self._publish_now(items, release), name="lease-publish")
        self._lease_tasks.add(task)  # a strong reference until done; close() waits for them
        task.add_done_callback(self._lease_tasks.discard)

    async def _publish_now(self, items: list[tuple[bytes, bytes]], release: list[bytes]) -> None:
        assert self._leases is not None
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self._leases.publish(items, self.ttl, release), max(self.read_timeout * 8, 2.0))
        except StoreFull as exc:
            self.counters.writes_dropped += exc.dropped
            self._store_full(exc)
        except Exception as exc:  # the leases lapse by themselves; the values are future misses
            self.counters.writes_dropped += len(items)
            self._store_failed(exc, "write")
        else:
            if items:
                self.store_latency.labels("write").observe(time.perf_counter() - started)

    def store_entries(self, items: Sequence[tuple[bytes, Entry]], leased: Sequence[bytes] = ()) -> None:
        """Cache entries: memory now, the store through the write-behind queue. Entries of ``leased`` keys
        (whose leases the caller holds) are written at once instead, with their leases dropped after them,
        for the gateways waiting on them."""
        self.memory.insert(items)
        if self.store is None:
            return
        held = set(leased) if self._leases is not None else set()
        if held:
            self._publish([(k, e[BLOB]) for k, e in items if k in held], list(held))
        for key, entry in items:
            if key in held:
                continue
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
        """Flush every queued write (and publish every lease's value), then close the store."""
        if self._lease_tasks:
            await asyncio.gather(*self._lease_tasks, return_exceptions=True)
        if self._writer is not None:
            await self._queue.put(None)
            await self._writer
            self._writer = None
        if self.store is not None:
            await self.store.close()
        await self.memory.close()
