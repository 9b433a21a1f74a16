"""``lmdb://PATH``: the embedded persistent store (survives restarts; safe for several processes).

LMDB's own locking lets many gateway processes on one host share a path. Disk work runs in a thread
so the event loop never blocks. LMDB has no expiry: the value header carries it (see codec).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import lmdb

from embedfleet.cache.base import Store, StoreStats
from embedfleet.cache.keys import MODEL_TAG_BYTES

log = logging.getLogger(__name__)

DEFAULT_MAP_SIZE = 64 * 1024**3  # address space only: the file grows with the data


class LmdbStore(Store):
    """One LMDB environment; reads in one read transaction per batch, writes in one write transaction."""

    name = "lmdb"

    def __init__(self, path: str | Path, map_size: int = DEFAULT_MAP_SIZE) -> None:
        self.path = Path(path).expanduser()
        self.path.mkdir(parents=True, exist_ok=True)
        # sync=False: a crash may lose the last writes, never corrupt the file; a lost cache entry
        # is only a future miss. readahead=False: lookups are random.
        self._env = lmdb.open(str(self.path), map_size=map_size, max_readers=1024, readahead=False,
                              sync=False, metasync=False, lock=True)

    def _get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._env.begin(buffers=False) as txn:
            return [txn.get(k) for k in keys]

    def _set(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        try:
            with self._env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value)
        except lmdb.MapFullError:
            log.warning("LMDB cache at %s is full (map size %d bytes); %d entries not written",
                        self.path, self._env.info()["map_size"], len(items))

    def _delete(self, model_tag: bytes | None) -> int:
        with self._env.begin(write=True) as txn:
            if model_tag is None:
                count = int(txn.stat()["entries"])
                txn.drop(self._env.open_db(), delete=False)
                return count
            cursor = txn.cursor()
            count = 0
            if cursor.set_range(model_tag):
                while cursor.key()[:MODEL_TAG_BYTES] == model_tag:
                    count += 1
                    if not cursor.delete():
                        break
        return count

    def _stats(self) -> StoreStats:
        stats = StoreStats()
        with self._env.begin(buffers=True) as txn:
            for key, value in txn.cursor():
                tag = bytes(key[:MODEL_TAG_BYTES]).hex()
                size = len(key) + len(value)
                entries, total = stats.per_model.get(tag, (0, 0))
                stats.per_model[tag] = (entries + 1, total + size)
                stats.entries += 1
                stats.bytes += size
        return stats

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in order, from one read transaction."""
        return await asyncio.to_thread(self._get, keys)

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl: float | None = None) -> None:
        """Write all in one transaction (expiry lives in the value header)."""
        if items:
            await asyncio.to_thread(self._set, items)

    async def delete(self, model_tag: bytes | None = None) -> int:
        """Delete by model-tag prefix, or everything."""
        return await asyncio.to_thread(self._delete, model_tag)

    async def stats(self) -> StoreStats:
        """A full scan (an admin call, not on the request path)."""
        return await asyncio.to_thread(self._stats)

    async def close(self) -> None:
        """Flush to disk and close."""
        await asyncio.to_thread(self._env.sync, True)
        self._env.close()
