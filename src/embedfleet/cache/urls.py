"""Cache store URLs: ``lmdb://PATH[?map_size=1GiB&max_size=64GiB]``, ``redis://HOST:PORT/DB``, ``qdrant://HOST:PORT``,
``qdrant+local://PATH``, ``memory://`` (the in-process tier only) and ``none`` (no caching)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from embedfleet.cache.base import Store


class StoreURLError(ValueError):
    """The cache URL names no store embedfleet has."""


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``64KiB``, ``1.5GB`` (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise StoreURLError(f"{text!r} is not a size (e.g. 1073741824, 512MiB, 64GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def _open_lmdb(rest: str) -> Store:
    from embedfleet.cache.lmdb_store import DEFAULT_MAP_SIZE, DEFAULT_MAX_SIZE, LmdbStore

    path, _, query = rest.partition("?")
    if not path:
        raise StoreURLError("lmdb:// needs a path, e.g. lmdb:///var/lib/embedfleet/cache")
    sizes = {"map_size": DEFAULT_MAP_SIZE, "max_size": DEFAULT_MAX_SIZE}
    try:
        given = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError as exc:
        raise StoreURLError(f"lmdb:// query {query!r}: {exc}") from None
    for name, value in given.items():
        if name not in sizes:
            raise StoreURLError(f"lmdb:// takes map_size and max_size, not {name!r}")
        sizes[name] = parse_size(value)
    if "max_size" in given and "map_size" not in given:
        sizes["map_size"] = min(sizes["map_size"], sizes["max_size"])
    if sizes["map_size"] > sizes["max_size"]:
        raise StoreURLError(f"lmdb:// map_size ({sizes['map_size']}) is larger than max_size ({sizes['max_size']})")
    return LmdbStore(path, **sizes)


def open_store(url: str) -> Store | None:
    """The persistent store a URL names; None for ``memory://`` and ``none`` (no persistent tier)."""
    scheme, sep, rest = url.partition("://")
    if url in ("none", "memory://", "memory"):
        return None
    if not sep:
        raise StoreURLError(f"cache URL {url!r} has no scheme (lmdb://, redis://, qdrant://, memory://, none)")
    if scheme == "lmdb":
        return _open_lmdb(rest)
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
