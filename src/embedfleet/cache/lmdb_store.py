"""``lmdb://PATH``: the embedded persistent store (survives restarts; safe for several processes).

LMDB's own locking lets many gateway processes on one host share a path. Disk work runs in a thread
so the event loop never blocks. LMDB has no expiry: the value header carries it (see codec).

Size: the map (LMDB's address-space reservation, the most the file may hold) starts at ``map_size``
and doubles whenever a write finds it full, up to ``max_size``. At that bound a write is refused
with :class:`StoreFull`: the entries are dropped (counted and logged by the tiered cache) and reads
go on as before.

Stats: entries and bytes per model are counters kept in the file itself, updated in the write
transaction that changes them, so every process sharing the file sees the same figures and
``stats()`` reads one record per model instead of scanning every entry.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lmdb

from embedfleet.cache.base import Store, StoreFull, StoreStats
from embedfleet.cache.keys import MODEL_TAG_BYTES

log = logging.getLogger(__name__)

DEFAULT_MAP_SIZE = 1024**3
"""The map a new environment starts with (address space only: the file grows with the data)."""
DEFAULT_MAX_SIZE = 64 * 1024**3
"""The bound the map may grow to."""

# Bookkeeping records live in the main database under a reserved model tag: model tags are hashes, and
# none is eight zero bytes. (Named databases would be cleaner, but existing files keep their entries in
# the main database, and dropping it, as DELETE /cache does, would orphan a named one.)
_META = bytes(MODEL_TAG_BYTES)
_COUNT = _META + b"model:"  # + a model tag -> _PAIR(entries, bytes)
_COUNTED = _META + b"counted"  # present once the counters cover every entry of the file
_PAIR = struct.Struct("<qq")

T = TypeVar("T")


class _SharedLock:
    """Many holders of the shared side, or one of the exclusive side: ``set_mapsize`` may only run while
    this process has no transaction open (reads and writes take the shared side)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _is_meta(key: bytes) -> bool:
    return key.startswith(_COUNT) or key == _COUNTED


class LmdbStore(Store):
    """One LMDB environment; reads in one read transaction per batch, writes in one write transaction."""

    name = "lmdb"

    def __init__(self, path: str | Path, map_size: int = DEFAULT_MAP_SIZE, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if map_size > max_size:
            raise ValueError(f"LMDB map_size ({map_size}) is larger than max_size ({max_size})")
        self.path = Path(path).expanduser()
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_size = max_size
        self._lock = _SharedLock()
        # sync=False: a crash may lose the last writes, never corrupt the file; a lost cache entry
        # is only a future miss. readahead=False: lookups are random.
        self._env = lmdb.open(str(self.path), map_size=map_size, max_readers=1024, readahead=False,
                              sync=False, metasync=False, lock=True)
        try:
            self._ensure_counters()
        except StoreFull:
            log.warning("LMDB cache at %s is at its bound: its per-model counters could not be built, so "
                        "/cache/stats undercounts it", self.path)

    @property
    def map_size(self) -> int:
        """The current map size in bytes (grows up to ``max_size``)."""
        return int(self._env.info()["map_size"])

    def _resize(self, size: int) -> None:
        """Set the map to ``size`` (0: adopt the size another process gave it), unless it is there already."""
        with self._lock.exclusive():
            if size == 0 or self.map_size < size:
                self._env.set_mapsize(size)
                log.info("LMDB cache at %s: map size now %d bytes", self.path, self.map_size)

    def _read(self, fn: Callable[[lmdb.Transaction[bytes]], T]) -> T:
        while True:
            try:
                with self._lock.shared(), self._env.begin() as txn:
                    return fn(txn)
            except lmdb.MapResizedError:  # another process grew the map past ours
                self._resize(0)

    def _write(self, fn: Callable[[lmdb.Transaction[bytes]], T], what: int) -> T:
        """Run ``fn`` in a write transaction, growing the map while it is full and below the bound."""
        while True:
            size = self.map_size
            try:
                with self._lock.shared(), self._env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                self._resize(0)
            except lmdb.MapFullError:
                if size >= self.max_size:
                    raise StoreFull(what, f"LMDB cache at {self.path} is at its bound "
                                          f"(max_size {self.max_size} bytes)") from None
                self._resize(min(size * 2, self.max_size))

    def _ensure_counters(self) -> None:
        """Count a file written before counters existed, once (later writes keep the counts)."""
        if self._read(lambda txn: txn.get(_COUNTED)) is not None:
            return

        def count(txn: lmdb.Transaction[bytes]) -> None:
            if txn.get(_COUNTED) is not None:  # another process counted it meanwhile
                return
            totals: dict[bytes, list[int]] = {}
            for key, value in txn.cursor():
                if not _is_meta(key):
                    pair = totals.setdefault(key[:MODEL_TAG_BYTES], [0, 0])
                    pair[0] += 1
                    pair[1] += len(key) + len(value)
            for tag, (entries, size) in totals.items():
                txn.put(_COUNT + tag, _PAIR.pack(entries, size))
            txn.put(_COUNTED, b"")

        self._write(count, 0)

    @staticmethod
    def _add_counts(txn: lmdb.Transaction, deltas: dict[bytes, list[int]]) -> None:
        for tag, (entries, size) in deltas.items():
            record = txn.get(_COUNT + tag)
            old_entries, old_size = _PAIR.unpack(record) if record is not None else (0, 0)
            if old_entries + entries > 0:
                txn.put(_COUNT + tag, _PAIR.pack(old_entries + entries, old_size + size))
            elif record is not None:
                txn.delete(_COUNT + tag)

    def _get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return self._read(lambda txn: [txn.get(k) for k in keys])

    def _set(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        def put(txn: lmdb.Transaction[bytes]) -> None:
            deltas: dict[bytes, list[int]] = {}
            for key, value in items:
                old = txn.replace(key, value)
                delta = deltas.setdefault(key[:MODEL_TAG_BYTES], [0, 0])
                if old is None:
                    delta[0] += 1
                    delta[1] += len(key) + len(value)
                else:
                    delta[1] += len(value) - len(old)
            self._add_counts(txn, deltas)

        self._write(put, len(items))

    def _delete(self, model_tag: bytes | None) -> int:
        def delete(txn: lmdb.Transaction[bytes]) -> int:
            if model_tag is None:
                cursor = txn.cursor()
                count = 0
                if cursor.set_range(_COUNT):
                    for key, value in cursor.iternext():
                        if not key.startswith(_COUNT):
                            break
                        count += _PAIR.unpack(value)[0]
                txn.drop(self._env.open_db(), delete=False)
                txn.put(_COUNTED, b"")
                return count
            cursor = txn.cursor()
            count = 0
            if cursor.set_range(model_tag):
                while cursor.key()[:MODEL_TAG_BYTES] == model_tag:
                    count += 1
                    if not cursor.delete():
                        break
            txn.delete(_COUNT + model_tag)
            return count

        return self._write(delete, 0)

    def _stats(self) -> StoreStats:
        def read(txn: lmdb.Transaction[bytes]) -> StoreStats:
            stats = StoreStats()
            cursor = txn.cursor()
            if cursor.set_range(_COUNT):
                for key, value in cursor.iternext():
                    if not key.startswith(_COUNT):
                        break
                    entries, size = _PAIR.unpack(value)
                    stats.per_model[key[len(_COUNT):].hex()] = (entries, size)
                    stats.entries += entries
                    stats.bytes += size
            return stats

        return self._read(read)

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in order, from one read transaction."""
        return await asyncio.to_thread(self._get, keys)

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl: float | None = None) -> None:
        """Write all in one transaction (expiry lives in the value header); :class:`StoreFull` at the bound."""
        if items:
            await asyncio.to_thread(self._set, items)

    async def delete(self, model_tag: bytes | None = None) -> int:
        """Delete by model-tag prefix, or everything."""
        return await asyncio.to_thread(self._delete, model_tag)

    async def stats(self) -> StoreStats:
        """Entries and bytes (keys plus values) per model, from the counters: one record read per model."""
        return await asyncio.to_thread(self._stats)

    async def close(self) -> None:
        """Flush to disk and close."""
        await asyncio.to_thread(self._env.sync, True)
        self._env.close()
