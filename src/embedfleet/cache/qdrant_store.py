"""``qdrant://HOST:PORT`` and ``qdrant+local://PATH``: the cache kept in Qdrant, as vectors a search can use.

Each model gets its own collection, ``embedfleet_<model tag hex>``, created on first write with the
vector size of the first value written and the ``Dot`` distance. Never ``Cosine``: Qdrant normalises
vectors on write in a Cosine collection, so an unnormalised embedding would be stored as a different
vector (it would then fail the value checksum and read as a miss, here; elsewhere it is silently wrong).

A point's id is a UUID made of the first 16 bytes of the key's entry hash; its payload holds the full
key, the model tag, the expiry, the input's token count and the value checksum, so a read rebuilds the
exact value bytes (header + little-endian float32) and :func:`~embedfleet.cache.codec.decode` can verify
them. A point whose payload names another key (an id collision), has the wrong size, or fails its
checksum reads as a miss.

URLs:

- ``qdrant://HOST[:PORT][/PREFIX][?api_key=KEY]``: a Qdrant server over HTTP (port 6333 by default);
  ``qdrants://`` for HTTPS. The API key can also be given as ``QdrantStore(url, api_key=...)``.
- ``qdrant+local://PATH``: qdrant-client's local mode, persisted under ``PATH`` (``:memory:`` for an
  in-process store). Meant for tests and small caches: only one client at a time can open a path
  (qdrant-client locks it; a second one, in this process or another, gets a RuntimeError), opening
  loads every collection into memory (in the constructor), and every write commits to SQLite.

All client calls run in worker threads, so the event loop never blocks. ``AsyncQdrantClient`` is not
used: in local mode (qdrant-client 1.20) its ``async`` methods do the SQLite work inline, on the event
loop. In local mode, calls run one at a time on one thread (local mode is not thread-safe).

A collection has one vector size: the model's native dimension when the gateway has given it
(:meth:`QdrantStore.model_dimension`, from the upstream's /info), else the size of the first value
written. Shorter values (requests with ``dimensions``, Matryoshka truncation) are stored zero-padded to
that size with their true length in the payload, and read back cut to it, so they round-trip exactly;
longer ones are skipped and stay misses. Qdrant has no expiry, so expired points stay (reading as
misses) until their model is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import struct
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from qdrant_client import QdrantClient, models

from embedfleet.cache import codec
from embedfleet.cache.base import Store, StoreStats
from embedfleet.cache.keys import KEY_BYTES, MODEL_TAG_BYTES

log = logging.getLogger(__name__)

COLLECTION_PREFIX = "embedfleet_"
DISTANCE = models.Distance.DOT
DEFAULT_PORT = 6333
REMOTE_THREADS = 8
_COLLECTION_RE = re.compile(rf"^{COLLECTION_PREFIX}([0-9a-f]{{{2 * MODEL_TAG_BYTES}}})$")
_ID_BYTES = 16

T = TypeVar("T")


def collection_name(model_tag: bytes) -> str:
    """The collection holding one model's entries."""
    return f"{COLLECTION_PREFIX}{model_tag.hex()}"


def point_id(key: bytes) -> str:
    """A key's point id: a UUID made of the first 16 bytes of its entry hash."""
    return str(uuid.UUID(bytes=key[MODEL_TAG_BYTES:MODEL_TAG_BYTES + _ID_BYTES]))


def _parse_value(value: bytes) -> tuple[codec.Fields, np.ndarray] | None:
    """The header fields and vector of a well-formed value, or None for one not worth storing.

    Rejected: a malformed or corrupt value (bad magic, length or checksum), an empty vector (Qdrant
    needs a size of at least 1), and non-finite numbers (JSON, the server's wire format, has none).
    """
    found = codec.fields(value)  # checks layout and checksum, not expiry
    if found is None:
        return None
    vector = codec.payload(value)
    if found.dim == 0 or not math.isfinite(found.expires_at) or not np.isfinite(vector).all():
        return None
    return found, vector


def _int_field(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _rebuild_value(key: bytes, record: models.Record) -> bytes | None:
    """The exact value bytes a point stands for, or None where anything disagrees or fails the checksum.

    A point written before values carried token counts has no ``tokens``: it rebuilds a version 1 value.
    """
    payload = record.payload or {}
    expires_at, checksum_hex, vector = payload.get("expires_at"), payload.get("checksum"), record.vector
    length, tokens = _int_field(payload, "dim"), _int_field(payload, "tokens")
    if payload.get("key") != key.hex() or not isinstance(checksum_hex, str) or not isinstance(vector, list):
        return None
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        return None
    try:
        checksum = bytes.fromhex(checksum_hex)
        array = np.asarray(vector, dtype="<f4")
        if length is not None and 0 < length <= len(array):
            array = array[:length]  # stored zero-padded to the collection's size
        header = codec.Fields(1 if tokens is None else 2, len(array), tokens or 0, float(expires_at), checksum)
        value = codec.assemble(header, array.tobytes())
    except (ValueError, TypeError, OverflowError, struct.error):  # a malformed payload or vector
        return None
    if len(checksum) != 8:  # "8s" would pad or cut it
        return None
    if array.ndim != 1 or len(array) == 0:
        return None
    return value if codec.decode(value, now=-math.inf) is not None else None


def _padded(point: models.PointStruct, size: int) -> models.PointStruct:
    """The point with its vector zero-padded to ``size`` (its payload keeps the true length)."""
    vector = point.vector
    assert isinstance(vector, list)
    if len(vector) < size:
        point.vector = [*vector, *([0.0] * (size - len(vector)))]
    return point


def _vector_params(info: models.CollectionInfo) -> models.VectorParams | None:
    vectors = info.config.params.vectors
    return vectors if isinstance(vectors, models.VectorParams) else None


def client_args(url: str, api_key: str | None = None, timeout: int | None = None) -> dict[str, Any]:
    """``QdrantClient`` arguments for a store URL (see the module docstring); ValueError for another URL."""
    if url.startswith("qdrant+local://"):
        path = url[len("qdrant+local://"):]
        if not path:
            raise ValueError(f"no path in {url!r}: use qdrant+local://PATH or qdrant+local://:memory:")
        where = {"location": ":memory:"} if path == ":memory:" else {"path": os.path.expanduser(path)}
        # Our single worker thread uses SQLite connections the constructor opened on this one.
        return {**where, "force_disable_check_same_thread": True}
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        port = 0
    if parts.scheme not in ("qdrant", "qdrants") or not parts.hostname or not port:
        raise ValueError(f"not a Qdrant URL: {url!r} (qdrant://HOST:PORT, qdrants://HOST:PORT or qdrant+local://PATH)")
    query = parse_qs(parts.query)
    if api_key is None and "api_key" in query:
        api_key = query["api_key"][-1]
    return {"host": parts.hostname, "port": port, "https": parts.scheme == "qdrants", "api_key": api_key,
            "prefix": unquote(parts.path).strip("/") or None, "timeout": timeout,
            "check_compatibility": False}  # no blocking network call in the constructor


class QdrantStore(Store):
    """Cache entries as Qdrant points, one collection per model; see the module docstring."""

    name = "qdrant"

    def __init__(self, url: str, *, api_key: str | None = None, timeout: int | None = None) -> None:
        """Open a store for ``qdrant://``, ``qdrants://`` or ``qdrant+local://`` (no network call yet)."""
        self.url = url
        args = client_args(url, api_key=api_key, timeout=timeout)
        self.local = "path" in args or "location" in args
        # Collection name -> vector size, for collections known to exist (None: not usable by us).
        self._collections: dict[str, int | None] = {}
        self._native: dict[bytes, int] = {}  # model tag -> native dimension, from the gateway
        self._warned: set[tuple[str, int]] = set()
        self.skipped_writes = 0
        self._closed = False
        self.client = QdrantClient(**args)
        # Local mode is not thread-safe: one thread, calls in order. A server takes calls in parallel.
        self._executor = ThreadPoolExecutor(1 if self.local else REMOTE_THREADS,
                                            thread_name_prefix="qdrant-local" if self.local else "qdrant")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- collections (worker thread) ---

    def model_dimension(self, model_tag: bytes, dimension: int) -> None:
        """Size the model's collection by its native dimension when it is created."""
        self._native[model_tag] = dimension

    def _known_size(self, name: str) -> int | None:
        """The vector size of an existing collection we can use, from the cache or the server."""
        if name not in self._collections:
            params = _vector_params(self.client.get_collection(name))
            usable = params is not None and params.distance != models.Distance.COSINE
            if not usable:  # not made by us: named vectors, or Cosine, which would alter what we store
                log.warning("Qdrant collection %s is not a single-vector, non-Cosine collection; "
                            "embedfleet will not write to it", name)
            self._collections[name] = params.size if usable and params is not None else None
        return self._collections[name]

    def _ensure(self, name: str, dim: int) -> int | None:
        """Create the collection if need be (tolerating a concurrent creator); returns its vector size."""
        if name in self._collections:
            return self._collections[name]
        if not self.client.collection_exists(name):
            try:
                self.client.create_collection(name, vectors_config=models.VectorParams(size=dim, distance=DISTANCE))
                self._collections[name] = dim
                return dim
            except Exception:
                if not self.client.collection_exists(name):  # not a lost race: a real failure
                    raise
        return self._known_size(name)

    def _forget(self, name: str) -> None:
        self._collections.pop(name, None)

    # --- operations (worker thread) ---

    def _get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        groups: dict[bytes, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            if len(key) == KEY_BYTES:
                groups[key[:MODEL_TAG_BYTES]].append(i)
        for tag, positions in groups.items():
            name = collection_name(tag)
            ids = list(dict.fromkeys(point_id(keys[i]) for i in positions))
            try:
                records = self.client.retrieve(name, ids, with_payload=True, with_vectors=True)
            except Exception:
                if self.client.collection_exists(name):
                    raise
                self._forget(name)
                continue  # no collection: all misses
            by_id: dict[str, models.Record] = {}
            for record in records:
                if isinstance(record.id, str | uuid.UUID):
                    with contextlib.suppress(ValueError):
                        by_id[str(uuid.UUID(str(record.id)))] = record
            for i in positions:
                found = by_id.get(point_id(keys[i]))
                if found is not None:
                    out[i] = _rebuild_value(keys[i], found)  # None unless its payload names this very key
        return out

    def _set(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        groups: dict[bytes, dict[str, models.PointStruct]] = defaultdict(dict)
        dims: dict[bytes, int] = {}
        for key, value in items:
            parsed = _parse_value(value) if len(key) == KEY_BYTES else None
            if parsed is None:
                self.skipped_writes += 1
                log.debug("not storing a malformed cache entry (key %s, %d bytes)", key.hex(), len(value))
                continue
            header, vector = parsed
            tag = key[:MODEL_TAG_BYTES]
            dims.setdefault(tag, self._native.get(tag, len(vector)))
            payload: dict[str, Any] = {"key": key.hex(), "model_tag": tag.hex(), "expires_at": header.expires_at,
                                       "checksum": header.checksum.hex(), "dim": len(vector)}
            if header.version == 2:
                payload["tokens"] = header.tokens
            pid = point_id(key)
            groups[tag].pop(pid, None)  # the last write of a key wins
            groups[tag][pid] = models.PointStruct(id=pid, vector=vector.tolist(), payload=payload)
        for tag, by_id in groups.items():
            self._upsert(collection_name(tag), list(by_id.values()), dims[tag])

    def _upsert(self, name: str, points: list[models.PointStruct], dim: int) -> None:
        """Upsert the points of the collection's size (creating it with ``dim`` if need be); skip the rest."""
        for attempt in (1, 2):
            size = self._ensure(name, dim)
            fitting = [_padded(p, size) for p in points if isinstance(p.vector, list) and size is not None
                       and len(p.vector) <= size]
            if not fitting:
                break
            try:
                self.client.upsert(name, fitting, wait=True)
                break
            except Exception:
                if attempt == 2 or self.client.collection_exists(name):
                    raise
                self._forget(name)  # deleted since we cached it (by another process): create it again
        if len(fitting) < len(points):
            self.skipped_writes += len(points) - len(fitting)
            self._warn_size(name, size, {len(p.vector) for p in points
                                         if isinstance(p.vector, list) and len(p.vector) > (size or 0)})

    def _warn_size(self, name: str, size: int | None, dims: set[int]) -> None:
        for dim in dims:
            if (name, dim) not in self._warned:
                self._warned.add((name, dim))
                log.warning("Qdrant collection %s holds %s vectors; %d-dimensional entries are not cached there",
                            name, f"{size}-dimensional" if size else "incompatible", dim)

    def _our_collections(self) -> list[str]:
        return sorted(c.name for c in self.client.get_collections().collections if _COLLECTION_RE.match(c.name))

    def _delete(self, model_tag: bytes | None) -> int:
        names = self._our_collections() if model_tag is None else [collection_name(model_tag)]
        count = 0
        for name in names:
            self._forget(name)
            try:
                count += self.client.count(name, exact=True).count
            except Exception:
                if self.client.collection_exists(name):
                    raise
                continue  # no such collection (or deleted meanwhile)
            self.client.delete_collection(name)
        return count

    def _stats(self) -> StoreStats:
        stats = StoreStats()
        for name in self._our_collections():
            match = _COLLECTION_RE.match(name)
            assert match is not None
            try:
                params = _vector_params(self.client.get_collection(name))
                entries = self.client.count(name, exact=True).count
            except Exception:
                if self.client.collection_exists(name):
                    raise
                continue  # deleted meanwhile
            dim = params.size if params is not None else 0
            size = entries * (KEY_BYTES + codec.HEADER_BYTES + 4 * dim)
            stats.per_model[match.group(1)] = (entries, size)
            stats.entries += entries
            stats.bytes += size
        return stats

    # --- the Store interface ---

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in order: one ``retrieve`` per model among the keys; a missing collection is all misses."""
        if not keys:
            return []
        return await self._run(self._get, list(keys))

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl: float | None = None) -> None:
        """Upsert per model (``wait=True``), creating collections as needed; malformed values are skipped.

        ``ttl`` is not used: Qdrant has no expiry; the value header carries it (see codec).
        """
        if items:
            await self._run(self._set, list(items))

    async def delete(self, model_tag: bytes | None = None) -> int:
        """Drop one model's collection, or every ``embedfleet_*`` one (no other); returns the points they held."""
        return await self._run(self._delete, model_tag)

    async def stats(self) -> StoreStats:
        """Points per model; bytes estimate the cache-value size, ``entries * (key + header + 4 * dim)``.

        Qdrant's own disk and memory use (payload, indexes) is larger; this is the size the entries
        would take as cache values.
        """
        return await self._run(self._stats)

    async def close(self) -> None:
        """Close the client (releasing a local path's lock) and the worker threads; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._run(self.client.close)
        self._executor.shutdown(wait=False)  # never wait on the event loop; closing queued after the rest
