"""``memory://``: a bounded in-process LRU, by bytes. Also the gateway's first tier.

The tier keeps each value as an :data:`Entry`: the stored bytes, checked once when they come in, and
the vector as a view of them, so a memory hit costs neither a checksum nor a copy. An entry served
from memory also keeps the vector as rendered for responses (the JSON array, the base64 string) once
a response needed it (:meth:`MemoryStore.keep`): a repeated hit then costs neither float formatting nor
encoding. Every byte kept counts against ``max_bytes``: key, value and rendered forms.

Entries are plain tuples of bytes, an array view and a float: the garbage collector stops tracking
such tuples, so a full collection does not walk the cache (objects with attributes would make every
full collection visit every entry).
"""

from __future__ import annotations

import binascii
import sys
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

import numpy as np
import orjson

from embedfleet.cache import codec
from embedfleet.cache.base import Store, StoreStats
from embedfleet.cache.keys import MODEL_TAG_BYTES

DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
_NUMPY = orjson.OPT_SERIALIZE_NUMPY

Entry = tuple[bytes, np.ndarray | None, float, bytes | None, bytes | None, int]
"""``(value bytes, vector or None, expires_at, JSON array or None, base64 JSON string or None, tokens)``.

The vector is a read-only view of the value's float32 bytes; None where the bytes are malformed or fail
their checksum (a :class:`MemoryStore` used as a plain store keeps whatever it is given; the cache reads
such an entry as a miss). ``expires_at`` is in unix seconds, 0 for never. ``tokens`` is the input's token
count from the value's header (0 where unknown), read once so that summing a response's usage is cheap."""

# Positions in an Entry.
BLOB: Final = 0
VECTOR: Final = 1
EXPIRES: Final = 2
JSON: Final = 3
B64: Final = 4
TOKENS: Final = 5


def entry_from_blob(blob: bytes) -> Entry:
    """An entry for stored bytes, checked now (layout and checksum; expiry is checked on reads)."""
    fields = codec.fields(blob)
    if fields is None:
        return (blob, None, 0.0, None, None, 0)
    return (blob, codec.payload(blob), fields.expires_at, None, None, fields.tokens)


def entry_from_vector(vector: np.ndarray, expires_at: float = 0.0, tokens: int = 0) -> Entry:
    """An entry for a vector (stored as little-endian float32) and its input's token count."""
    blob = codec.encode(vector, expires_at, tokens)
    return (blob, codec.payload(blob), expires_at, None, None, tokens)


_BYTES_HEADER = sys.getsizeof(b"")
ENTRY_OVERHEAD = (2 * _BYTES_HEADER + sys.getsizeof((0,) * 6) + sys.getsizeof(np.frombuffer(bytes(4), np.float32))
                  + sys.getsizeof(0.0) + 340)
"""What an entry costs besides its bytes: the key's and value's object headers, the entry tuple, the
vector's array view and its expiry (~290 bytes on CPython 3.11), plus ~340 for its slot in the ordered
dict and the small-object allocator's slack: under long eviction churn of tiny entries the process holds
~1.45x what is live (measured with RSS; without any of this a tier of 1-dimensional vectors held ~5x its
bound; tests/cache/test_memory_bound.py holds every dimension from 1 to 4,096 within 1.25x)."""


def entry_size(entry: Entry) -> int:
    """Memory an entry holds beyond its key's bytes: its value and rendered forms, with their overhead."""
    json, b64 = entry[JSON], entry[B64]
    return (ENTRY_OVERHEAD + len(entry[BLOB]) + (len(json) + _BYTES_HEADER if json else 0)
            + (len(b64) + _BYTES_HEADER if b64 else 0))


def render_json(entry: Entry) -> bytes:
    """The vector as a JSON array, exactly as ``orjson.dumps`` writes a float32 array."""
    return entry[JSON] or orjson.dumps(entry[VECTOR], option=_NUMPY)


def render_b64(entry: Entry) -> bytes:
    """The vector's little-endian float32 bytes in base64, as a JSON string (with its quotes)."""
    if entry[B64]:
        return entry[B64]
    vector = entry[VECTOR]
    assert vector is not None  # only entries with a checked vector are served
    return b'"' + binascii.b2a_base64(vector.data, newline=False) + b'"'


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

    def lookup(self, keys: Sequence[bytes]) -> list[Entry | None]:
        """Entries in order (None where absent); each hit becomes the most recently used."""
        data = self._data
        out: list[Entry | None] = []
        for key in keys:
            entry = data.get(key)
            if entry is not None:
                data.move_to_end(key)
            out.append(entry)
        return out

    def insert(self, items: Sequence[tuple[bytes, Entry]]) -> None:
        """Insert or replace, then evict the least recently used until under the bound."""
        data = self._data
        for key, entry in items:
            size = len(key) + entry_size(entry)
            if size > self.max_bytes:
                continue  # larger than the whole tier: never cacheable here
            old = data.pop(key, None)
            if old is not None:
                self._bytes -= len(key) + entry_size(old)
            data[key] = entry
            self._bytes += size
        self._evict()

    def keep(self, key: bytes, entry: Entry, json: bytes | None = None, b64: bytes | None = None) -> None:
        """Keep rendered forms of an entry that was served from memory, if it is still there as it was."""
        if self._data.get(key) is not entry:
            return  # evicted, replaced, or already given its rendered forms
        json = None if entry[JSON] is not None else json
        b64 = None if entry[B64] is not None else b64
        if json is None and b64 is None:
            return
        if json is not None:
            # orjson's output keeps its whole write buffer (about 4 KiB for a short vector's JSON): a
            # right-sized copy is what is worth keeping for as long as the entry lives.
            json = bytes(memoryview(json))
        kept: Entry = (entry[BLOB], entry[VECTOR], entry[EXPIRES], json or entry[JSON], b64 or entry[B64],
                       entry[TOKENS])
        self._data[key] = kept
        self._bytes += entry_size(kept) - entry_size(entry)
        self._evict()

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._data:
            key, entry = self._data.popitem(last=False)
            self._bytes -= len(key) + entry_size(entry)

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in order; each hit becomes the most recently used."""
        return [None if e is None else e[BLOB] for e in self.lookup(keys)]

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl: float | None = None) -> None:
        """Insert or replace, then evict the least recently used until under the bound."""
        self.insert([(key, entry_from_blob(value)) for key, value in items])

    async def delete(self, model_tag: bytes | None = None) -> int:
        """Drop one model's entries, or all."""
        if model_tag is None:
            count = len(self._data)
            self._data.clear()
            self._bytes = 0
            return count
        doomed = [k for k in self._data if k[:MODEL_TAG_BYTES] == model_tag]
        for key in doomed:
            self._bytes -= len(key) + entry_size(self._data.pop(key))
        return len(doomed)

    async def stats(self) -> StoreStats:
        """Entries and bytes, per model tag."""
        stats = StoreStats(entries=len(self._data), bytes=self._bytes)
        for key, entry in self._data.items():
            tag = key[:MODEL_TAG_BYTES].hex()
            entries, size = stats.per_model.get(tag, (0, 0))
            stats.per_model[tag] = (entries + 1, size + len(key) + entry_size(entry))
        return stats

    async def close(self) -> None:
        """Nothing to release: the entries go with the process."""
