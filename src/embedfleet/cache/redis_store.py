"""``redis://HOST:PORT/DB`` (also ``rediss://``, ``unix://PATH?db=N``): the shared store for gateways on several hosts.

Entries live at ``namespace + raw key`` (default namespace ``ef:``), values are the codec's opaque bytes.
Expiry is Redis's own (``SET ... PX``) when a ttl is given, on top of any expiry in the value header.

One store holds one :class:`redis.asyncio.BlockingConnectionPool` (TCP keep-alive on, short socket and
connect timeouts, one immediate retry so a connection left stale by a Redis restart is replaced
transparently). redis-py parses replies with hiredis whenever ``hiredis`` >= 3.2 is importable
(``redis.utils.HIREDIS_AVAILABLE``; the ``redis[hiredis]`` extra installs it), and the tests check that
the pool's connections use ``_AsyncHiredisParser``. The store is bound to the event loop it is first
used on, like any asyncio client.

A Redis that is down, hung or still loading raises :class:`StoreUnavailable` within about a second
instead of stalling the request path. Redis Cluster is not supported (MGET spans hash slots).

The store also offers :class:`RedisLeases` (cross-gateway single-flight): a text's lease lives at
``lease:`` + namespace + raw key (outside the namespace's own keys, so ``delete`` and ``stats`` never
see one), holds a random token of the store object, and is taken with ``SET NX PX`` inside a Lua script
that first looks for the value, so "the value is there" and "take the lease" are one atomic step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import urlparse

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from embedfleet.cache.base import Leases, Store, StoreStats
from embedfleet.cache.keys import MODEL_TAG_BYTES

DEFAULT_NAMESPACE = b"ef:"
DEFAULT_SOCKET_TIMEOUT_S = 0.25
DEFAULT_CONNECT_TIMEOUT_S = 0.25
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_POOL_TIMEOUT_S = 1.0
SCAN_COUNT = 1000  # keys per SCAN page, and per UNLINK / STRLEN batch

_GLOB_SPECIAL = frozenset(b"*?[]\\")

LEASE_PREFIX = b"lease:"
"""Before the namespace in a lease's key (``lease:ef:<raw key>``)."""

# KEYS: value and lease key of each text, in pairs; ARGV: token, milliseconds. Per text: the value if
# stored, else 1 where this token holds the lease now (taken, or already its own), else 0.
_CLAIM = """
local out = {}
for i = 1, #KEYS, 2 do
  local value = redis.call('GET', KEYS[i])
  if value then
    out[#out + 1] = value
  elseif redis.call('SET', KEYS[i + 1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[#out + 1] = 1
  elseif redis.call('GET', KEYS[i + 1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i + 1], ARGV[2])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: lease keys; ARGV: token, milliseconds. Extends the leases this token holds.
_RENEW = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  end
end
return 0
"""

# KEYS: lease keys; ARGV: token. Drops the leases this token holds.
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
  end
end
return 0
"""


class StoreUnavailable(ConnectionError):
    """The store cannot be reached (down, hung, refusing connections or still loading its data).

    Callers treat it as a miss (reads) or a skipped write; the store recovers by itself once the
    server is back.
    """


def glob_escape(data: bytes) -> bytes:
    """``data`` as a Redis glob pattern that matches exactly itself (binary-safe)."""
    out = bytearray()
    for byte in data:
        if byte in _GLOB_SPECIAL:
            out.append(0x5C)  # backslash
        out.append(byte)
    return bytes(out)


class RedisStore(Store):
    """Entries in Redis under a namespace prefix: MGET reads, pipelined writes, SCAN-based delete and stats.

    ``get_many`` is exactly one MGET; ``set_many`` is one round trip (MSET, or one non-transactional
    pipeline of ``SET key value PX ms`` when a ttl is given). ``delete`` and ``stats`` SCAN this
    namespace only, so other data in the same database is never touched (no FLUSHDB).
    """

    name = "redis"

    def __init__(self, url: str, *, namespace: bytes | str = DEFAULT_NAMESPACE,
                 socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_S, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, pool_timeout: float = DEFAULT_POOL_TIMEOUT_S,
                 retries: int = 1) -> None:
        """Create the pool; no connection is opened until the first call.

        ``socket_timeout`` bounds each reply, ``connect_timeout`` each connect; ``pool_timeout`` is how
        long a call may wait for a free connection when all ``max_connections`` are busy. ``retries``
        immediate retries follow a connection error or timeout (every command used is idempotent).
        Options in the URL's query string (``?socket_timeout=1``) override these arguments.
        """
        scheme = urlparse(url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a Redis URL (redis://, rediss:// or unix://): scheme {scheme!r}")
        self.namespace = namespace.encode() if isinstance(namespace, str) else bytes(namespace)
        if not self.namespace:
            raise ValueError("namespace must not be empty: delete() would match the whole database")
        self._pattern = glob_escape(self.namespace)
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(NoBackoff(), retries),
        }
        if scheme != "unix":
            options["socket_keepalive"] = True  # TCP only: unix sockets take no keep-alive option
        pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=pool_timeout,
                                               **options)
        self._client = Redis.from_pool(pool)  # the client owns the pool and closes it
        kwargs = pool.connection_kwargs
        self.location = (f"unix:{kwargs.get('path')}" if scheme == "unix"
                         else f"{scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}")
        self.location += f"/{kwargs.get('db', 0)}"  # no credentials: safe for logs and errors
        self.leases: RedisLeases = RedisLeases(self)

    def __repr__(self) -> str:
        return f"RedisStore({self.location!r}, namespace={self.namespace!r})"

    @contextmanager
    def _unavailable(self, action: str) -> Iterator[None]:
        """Raise connection failures and timeouts as :class:`StoreUnavailable`."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as err:
            raise StoreUnavailable(f"redis at {self.location} unavailable ({action}): {err}") from err

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in order (None where absent or expired), from one MGET."""
        if not keys:
            return []
        ns = self.namespace
        with self._unavailable("get"):
            values = await self._client.mget([ns + k for k in keys])
        return cast("list[bytes | None]", values)  # decode_responses is off: values are bytes

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl: float | None = None) -> None:
        """Write all in one round trip; a ttl (seconds, > 0) becomes Redis expiry in milliseconds."""
        if ttl is not None and ttl <= 0:
            raise ValueError("ttl must be positive (None: no expiry)")
        if not items:
            return
        ns = self.namespace
        with self._unavailable("set"):
            if ttl is None:
                await self._client.mset({ns + k: v for k, v in items})
                return
            async with self._client.pipeline(transaction=False) as pipe:
                self._queue_sets(pipe, items, ttl)
                await pipe.execute()

    def _queue_sets(self, pipe: Any, items: Sequence[tuple[bytes, bytes]], ttl: float | None) -> None:
        """Add the writes of ``items`` to a pipeline."""
        ns = self.namespace
        if ttl is None:
            pipe.mset({ns + k: v for k, v in items})
            return
        px = max(1, round(ttl * 1000))
        for key, value in items:
            pipe.set(ns + key, value, px=px)

    async def _scan_page(self, cursor: int, pattern: bytes) -> tuple[int, list[bytes]]:
        """One SCAN step: the next cursor (0 when done) and a page of matching keys."""
        cursor, keys = await self._client.scan(cursor, match=pattern, count=SCAN_COUNT)
        return int(cursor), cast("list[bytes]", keys)

    async def delete(self, model_tag: bytes | None = None) -> int:
        """UNLINK one model's entries (SCAN ``namespace + tag*``), or this namespace's; returns how many."""
        pattern = self._pattern + (b"" if model_tag is None else glob_escape(model_tag)) + b"*"
        deleted = 0
        with self._unavailable("delete"):
            cursor = 0
            while True:
                cursor, keys = await self._scan_page(cursor, pattern)
                if keys:
                    deleted += int(await self._client.unlink(*keys))
                if cursor == 0:
                    return deleted

    async def stats(self) -> StoreStats:
        """SCAN the namespace and STRLEN each key in pipelined batches (an admin call, not the request path).

        Sizes count the raw key (without the namespace) plus the value, like the other stores. A key that
        expires between SCAN and STRLEN (length 0) or that is not a string is left out. SCAN may return a
        key twice (when Redis resizes its table mid-scan), so keys seen are remembered: about 100 bytes of
        this process's memory per entry, for the duration of the call.
        """
        stats = StoreStats()
        skip = len(self.namespace)
        seen: set[bytes] = set()
        with self._unavailable("stats"):
            cursor = 0
            while True:
                cursor, keys = await self._scan_page(cursor, self._pattern + b"*")
                keys = [k for k in keys if k not in seen]
                seen.update(keys)
                if keys:
                    async with self._client.pipeline(transaction=False) as pipe:
                        for key in keys:
                            pipe.strlen(key)
                        lengths = await pipe.execute(raise_on_error=False)
                    for key, length in zip(keys, lengths, strict=True):
                        if isinstance(length, ResponseError) or not length:
                            continue
                        raw = key[skip:]
                        tag = raw[:MODEL_TAG_BYTES].hex()
                        size = len(raw) + int(length)
                        entries, total = stats.per_model.get(tag, (0, 0))
                        stats.per_model[tag] = (entries + 1, total + size)
                        stats.entries += 1
                        stats.bytes += size
                if cursor == 0:
                    return stats

    async def close(self) -> None:
        """Close the pool's connections (nothing to flush: every write was acknowledged)."""
        await self._client.aclose()


def _millis(ttl: float) -> int:
    if ttl <= 0:
        raise ValueError("a lease's ttl must be positive")
    return max(1, round(ttl * 1000))


class RedisLeases(Leases):
    """A :class:`RedisStore`'s leases: Lua scripts over its connection pool, one round trip a call.

    The token is random per object: one gateway process, one token; its single-flight within the process
    makes sure that it never claims one text twice at a time.
    """

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.token = os.urandom(16)
        client = store._client
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)

    def lease_key(self, key: bytes) -> bytes:
        """Where a text's lease lives."""
        return LEASE_PREFIX + self.store.namespace + key

    async def claim(self, keys: Sequence[bytes], ttl: float) -> list[bytes | bool]:
        """Values, or leases taken (True) or held by another (False), in one EVALSHA."""
        if not keys:
            return []
        ns = self.store.namespace
        pairs = [k for key in keys for k in (ns + key, self.lease_key(key))]
        with self.store._unavailable("claim"):
            replies = await self._claim(keys=pairs, args=[self.token, _millis(ttl)])
        return [r if isinstance(r, bytes) else bool(r) for r in cast("list[bytes | int]", replies)]

    async def renew(self, keys: Sequence[bytes], ttl: float) -> None:
        """Extend this object's leases on the keys."""
        if keys:
            with self.store._unavailable("renew"):
                await self._renew(keys=[self.lease_key(k) for k in keys], args=[self.token, _millis(ttl)])

    async def publish(self, items: Sequence[tuple[bytes, bytes]], ttl: float | None, release: Sequence[bytes]) -> None:
        """Write the entries, then drop this object's leases on ``release``: one pipeline, in that order."""
        if ttl is not None and ttl <= 0:
            raise ValueError("ttl must be positive (None: no expiry)")
        if not items and not release:
            return
        with self.store._unavailable("publish"):
            async with self.store._client.pipeline(transaction=False) as pipe:
                if items:
                    self.store._queue_sets(pipe, items, ttl)
                if release:  # EVAL, not EVALSHA: a pipeline would first ask whether the script is loaded
                    pipe.eval(_RELEASE, len(release), *(self.lease_key(k) for k in release), self.token)
                await pipe.execute()
