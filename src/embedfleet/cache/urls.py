"""Cache store URLs: ``lmdb://PATH``, ``redis://HOST:PORT/DB``, ``qdrant://HOST:PORT``,
``qdrant+local://PATH``, ``memory://`` (the in-process tier only) and ``none`` (no caching)."""

from __future__ import annotations

from embedfleet.cache.base import Store


class StoreURLError(ValueError):
    """The cache URL names no store embedfleet has."""


def open_store(url: str) -> Store | None:
    """The persistent store a URL names; None for ``memory://`` and ``none`` (no persistent tier)."""
    scheme, sep, rest = url.partition("://")
    if url in ("none", "memory://", "memory"):
        return None
    if not sep:
        raise StoreURLError(f"cache URL {url!r} has no scheme (lmdb://, redis://, qdrant://, memory://, none)")
    if scheme == "lmdb":
        from embedfleet.cache.lmdb_store import LmdbStore

        if not rest:
            raise StoreURLError("lmdb:// needs a path, e.g. lmdb:///var/lib/embedfleet/cache")
        return LmdbStore(rest)
    if scheme in ("redis", "rediss", "unix"):
        try:
            from embedfleet.cache.redis_store import RedisStore
        except ImportError as exc:
            raise StoreURLError("the redis store needs `pip install 'embedfleet[redis]'`") from exc
        return RedisStore(url)
    if scheme in ("qdrant", "qdrants", "qdrant+local"):
        try:
            from embedfleet.cache.qdrant_store import QdrantStore
        except ImportError as exc:
            raise StoreURLError("the qdrant store needs `pip install 'embedfleet[qdrant]'`") from exc
        return QdrantStore(url)
    raise StoreURLError(f"unknown cache store {scheme!r} (lmdb, redis, qdrant, qdrant+local, memory, none)")
