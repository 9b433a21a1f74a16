"""``memory://``: a bounded in-process LRU, by bytes. Also the gateway's first tier.

The tier keeps each value as an :class:`Entry`: the stored bytes, checked once when they come in, and
the vector as a view of them, so a memory hit costs neither a checksum nor a copy. An entry that has
been served from memory also keeps the vector rendered for responses (the JSON array, the base64
string) once it was asked for: a repeated hit then costs neither float formatting nor encoding. Every
byte kept counts against ``max_bytes``: key, value and rendered forms.
"""

from __future__ import annotations

import binascii
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import orjson

from embedfleet.cache import codec
from embedfleet.cache.base import Store, StoreStats
from embedfleet.cache.keys import MODEL_TAG_BYTES

DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
_NUMPY = orjson.OPT_SERIALIZE_NUMPY


class Entry:
    """One cache value: its bytes, whether they check out, and what was rendered from them.

    ``vector`` is None for bytes that are malformed or fail their checksum (a :class:`MemoryStore`
    used as a plain store keeps whatever it is given; the cache reads such an entry as a miss).
    """

    __slots__ = ("_b64", "_home", "_json", "blob", "expires_at", "hot", "vector")

    def __init__(self, blob: bytes, vector: np.ndarray | None, expires_at: float = 0.0) -> None:
        self.blob = blob
        self.vector = vector
        self.expires_at = expires_at
        self.hot = False  # served from memory at least once: worth keeping the rendered forms
        self._json: bytes | None = None
        self._b64: bytes | None = None
        self._home: MemoryStore | None = None

    @classmethod
    def from_blob(cls, blob: bytes) -> Entry:
        """An entry for stored bytes, checked now (layout and checksum; expiry is checked on reads)."""
        expires_at = codec.verify(blob)
        return cls(blob, None) if expires_at is None else cls(blob, codec.payload(blob), expires_at)

    @classmethod
    def from_vector(cls, vector: np.ndarray, expires_at: float = 0.0) -> Entry:
        """An entry for a vector (stored as little-endian float32)."""
        blob = codec.encode(vector, expires_at)
        return cls(blob, codec.payload(blob), expires_at)

    @property
    def size(self) -> int:
        """Bytes this entry holds beyond its key."""
        return len(self.blob) + len(self._json or b"") + len(self._b64 or b"")

    def expired(self, now: float) -> bool:
        """True once the expiry in the value's header has passed."""
        return bool(self.expires_at) and self.expires_at <= now

    def json(self) -> bytes:
        """The vector as a JSON array, exactly as ``orjson.dumps`` writes a float32 array."""
        rendered = self._json
        if rendered is None:
            rendered = orjson.dumps(self.vector, option=_NUMPY)
            if self.hot and self._home is not None:
                self._json = rendered
                self._home._grew(len(rendered))
        return rendered

    def b64(self) -> bytes:
        """The vector's little-endian float32 bytes in base64, as a JSON string (with its quotes)."""
        rendered = self._b64
        if rendered is None:
            rendered = b'"' + binascii.b2a_base64(memoryview(self.blob)[codec.HEADER_BYTES:], newline=False) + b'"'
            if self.hot and self._home is not None:
                self._b64 = rendered
                self._home._grew(len(rendered))
        return rendered


class MemoryStore(Store):
    """Least-recently-used eviction once keys + values (+ rendered forms) exceed ``max_bytes``.

    All operations are O(1) dictionary work on the event loop thread, so no locking is needed.
    """

    name = "memory"

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._data: OrderedDict[bytes, Entry] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    def lookup(self, keys: Sequence[bytes]) -> list[Entry | None]:
        """Entries in order (None where absent); each hit becomes the most recently used."""
        data = self._data
        out: list[Entry | None] = []
        for key in keys:
            entry = data.get(key)
            if entry is not None:
                data.move_to_end(key)
                entry.hot = True
            out.append(entry)
        return out

    def insert(self, items: Sequence[tuple[bytes, Entry]]) -> None:
        """Insert or replace, then evict the least recently used until under the bound."""
        data = self._data
        for key, entry in items:
            size = len(key) + entry.size
            if size > self.max_bytes:
                continue  # larger than the whole tier: never cacheable here
            old = data.pop(key, None)
            if old is not None:
                self._bytes -= len(key) + old.size
                old._home = None
            if entry._home is not None:  # held elsewhere: a copy, so each holder counts its own bytes
                entry = Entry(entry.blob, entry.vector, entry.expires_at)
            entry._home = self
            data[key] = entry
            self._bytes += size
        self._evict()

    def _grew(self, extra: int) -> None:
        """An entry of this tier kept a rendered form: count it, and evict if need be."""
        self._bytes += extra
        self._evict()

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._data:
            key, entry = self._data.popitem(last=False)
            self._bytes -= len(key) + entry.size
            entry._home = None
            self.evictions += 1

    def _remove(self, key: bytes) -> None:
        entry = self._data.pop(key)
        self._bytes -= len(key) + entry.size
        entry._home = None

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in order; each hit becomes the most recently used."""
        return [None if e is None else e.blob for e in self.lookup(keys)]

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl: float | None = None) -> None:
        """Insert or replace, then evict the least recently used until under the bound."""
        self.insert([(key, Entry.from_blob(value)) for key, value in items])

    async def delete(self, model_tag: bytes | None = None) -> int:
        """Drop one model's entries, or all."""
        if model_tag is None:
            count = len(self._data)
            for entry in self._data.values():
                entry._home = None
            self._data.clear()
            self._bytes = 0
            return count
        doomed = [k for k in self._data if k[:MODEL_TAG_BYTES] == model_tag]
        for key in doomed:
            self._remove(key)
        return len(doomed)

    async def stats(self) -> StoreStats:
        """Entries and bytes, per model tag."""
        stats = StoreStats(entries=len(self._data), bytes=self._bytes)
        for key, entry in self._data.items():
            tag = key[:MODEL_TAG_BYTES].hex()
            entries, size = stats.per_model.get(tag, (0, 0))
            stats.per_model[tag] = (entries + 1, size + len(key) + entry.size)
        return stats

    async def close(self) -> None:
        """Nothing to release: the entries go with the process."""
