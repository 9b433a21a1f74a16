"""``memory://``: a bounded in-process LRU, by bytes. Also the gateway's first tier."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from embedfleet.cache.base import Store, StoreStats
from embedfleet.cache.keys import MODEL_TAG_BYTES

DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024


class MemoryStore(Store):
    """Least-recently-used eviction once keys + values exceed ``max_bytes``.

    All operations are O(1) dictionary work on the event loop thread, so no locking is needed.
    """

    name = "memory"

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in order; each hit becomes the most recently used."""
        out: list[bytes | None] = []
        for key in keys:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            out.append(value)
        return out

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl: float | None = None) -> None:
        """Insert or replace, then evict the least recently used until under the bound."""
        for key, value in items:
            size = len(key) + len(value)
            if size > self.max_bytes:
                continue  # larger than the whole tier: never cacheable here
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= len(key) + len(old)
            self._data[key] = value
            self._bytes += size
        while self._bytes > self.max_bytes:
            key, value = self._data.popitem(last=False)
            self._bytes -= len(key) + len(value)
            self.evictions += 1

    async def delete(self, model_tag: bytes | None = None) -> int:
        """Drop one model's entries, or all."""
        if model_tag is None:
            count = len(self._data)
            self._data.clear()
            self._bytes = 0
            return count
        doomed = [k for k in self._data if k[:MODEL_TAG_BYTES] == model_tag]
        for key in doomed:
            self._bytes -= len(key) + len(self._data.pop(key))
        return len(doomed)

    async def stats(self) -> StoreStats:
        """Entries and bytes, per model tag."""
        stats = StoreStats(entries=len(self._data), bytes=self._bytes)
        for key, value in self._data.items():
            tag = key[:MODEL_TAG_BYTES].hex()
            entries, size = stats.per_model.get(tag, (0, 0))
            stats.per_model[tag] = (entries + 1, size + len(key) + len(value))
        return stats

    async def close(self) -> None:
        """Nothing to release: the entries go with the process."""
