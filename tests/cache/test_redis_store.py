"""Redis store against a real redis-server: the Store contract, expiry, namespacing, round trips, outages, sharing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis

from embedfleet.cache import EmbedParams, ModelFingerprint, cache_key, encode
from embedfleet.cache.keys import ENTRY_HASH_BYTES
from embedfleet.cache.memory import MemoryStore
from embedfleet.cache.redis_store import RedisStore, StoreUnavailable, glob_escape
from tests.cache.redis_server import RedisServer, needs_redis_server

A = ModelFingerprint("model-a", "1", "embedding", "mean")
B = ModelFingerprint("model-b", "1", "embedding", "mean")

# Tags whose glob reading matches other tags: deleting one by an unescaped pattern would take the others too.
GLOB_TAGS = [
    b"********",
    b"????????",
    b"[ab]\\\\xy",  # as a glob: one of a/b, a backslash, "xy": matches TAG_A below
    b"a\\xy1234",
    b"\x00\xff*?[]\\\x00",
    b"\x00\xff\x00\x00\x00\x00\x00\x00",
]


TTL_S = 2.0
"""Long enough to check an entry before it expires, even on a loaded machine."""
FAIL_FAST_LIMIT_S = 10.0
"""What "fails fast" must beat: a client without timeouts would hang on a dead or hung Redis for good."""


def _entries(model: ModelFingerprint, n: int) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(len(model.model_id) + n)
    return [(cache_key(model, EmbedParams(), f"text {i}"), encode(rng.standard_normal(16).astype(np.float32)))
            for i in range(n)]


def _tagged(tag: bytes, n: int) -> list[tuple[bytes, bytes]]:
    return [(tag + bytes([i]) * ENTRY_HASH_BYTES, f"value {i} of {tag!r}".encode()) for i in range(n)]


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> float:
    """Poll ``check`` until it is true (returns the seconds that took); fail at the deadline."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(0.05)  # poll interval only: the condition decides
    raise AssertionError(f"condition not met within {timeout}s")


def _calls(client: redis.Redis, command: str) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    """A plain synchronous client for looking behind the store's back."""
    with redis.Redis.from_url(server.url) as plain:
        yield plain


def test_glob_escape_is_binary_safe() -> None:
    assert glob_escape(b"ef:") == b"ef:"
    assert glob_escape(b"a*b?c[d]e\\f") == b"a\\*b\\?c\\[d\\]e\\\\f"
    assert glob_escape(b"\x00\xff") == b"\x00\xff"


def test_rejects_other_urls_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="scheme"):
        RedisStore("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="namespace"):
        RedisStore("redis://127.0.0.1:6379/0", namespace=b"")
    store = RedisStore("redis://user:secret@127.0.0.1:1/3")
    assert "secret" not in repr(store) and store.location == "redis://127.0.0.1:1/3"

    async def run() -> None:
        with pytest.raises(ValueError, match="ttl"):
            await store.set_many([(b"k", b"v")], ttl=0)
        assert await store.get_many([]) == []  # no round trip, so no error even with nothing listening
        await store.set_many([])
        await store.close()

    asyncio.run(run())


@pytest.mark.slow
@needs_redis_server
def test_replies_are_parsed_by_hiredis(server: RedisServer) -> None:
    from redis._parsers import _AsyncHiredisParser
    from redis.utils import HIREDIS_AVAILABLE

    assert HIREDIS_AVAILABLE, "the redis[hiredis] extra should install hiredis >= 3.2"

    async def run() -> None:
        store = RedisStore(server.url)
        await store.get_many([b"x"])
        connection = await store._client.connection_pool.get_connection()
        try:
            assert isinstance(connection._parser, _AsyncHiredisParser)
        finally:
            await store._client.connection_pool.release(connection)
        await store.close()

    asyncio.run(run())


@pytest.mark.slow
@needs_redis_server
def test_overwrite_with_a_ttl_replaces_the_value(server: RedisServer) -> None:
    # The generic overwrite test (test_stores.py) writes without a ttl; Redis takes another path with one.
    async def run() -> None:
        store = RedisStore(server.url)
        key = cache_key(A, EmbedParams(), "x")
        await store.set_many([(key, encode(np.ones(4, dtype=np.float32)))])
        await store.set_many([(key, b"corrupt again")], ttl=60)  # the ttl path overwrites too
        assert (await store.get_many([key]))[0] == b"corrupt again"
        await store.close()

    asyncio.run(run())


@pytest.mark.slow
@needs_redis_server
def test_stats_count_like_the_memory_store(server: RedisServer) -> None:
    async def run() -> None:
        store, reference = RedisStore(server.url), MemoryStore()
        items = _entries(A, 40) + _entries(B, 7) + _tagged(GLOB_TAGS[4], 3)
        await store.set_many(items[:20])
        await store.set_many(items[20:], ttl=600)
        await reference.set_many(items)
        stats, memory = await store.stats(), await reference.stats()
        # The same entries per model; Redis counts the bytes stored, the memory tier what they cost it.
        assert stats.entries == memory.entries == len(items)
        assert {t: n for t, (n, _) in stats.per_model.items()} == {t: n for t, (n, _) in memory.per_model.items()}
        assert stats.bytes == sum(len(k) + len(v) for k, v in items) < memory.bytes
        await store.close()

    asyncio.run(run())


@pytest.mark.slow
@needs_redis_server
def test_ttl_expires_entries(server: RedisServer, client: redis.Redis) -> None:
    async def run() -> None:
        store = RedisStore(server.url)
        (short_key, short_value), (long_key, long_value) = _entries(A, 2)
        written = time.monotonic()
        await store.set_many([(short_key, short_value)], ttl=TTL_S)
        await store.set_many([(long_key, long_value)])
        pttl = client.pttl(b"ef:" + short_key)
        assert client.pttl(b"ef:" + long_key) == -1  # no ttl: no expiry
        got = await store.get_many([short_key, long_key])
        if time.monotonic() - written < TTL_S * 0.75:  # (a stall that long would be no fault of the store)
            assert 0 < pttl <= TTL_S * 1000  # seconds became milliseconds
            assert got == [short_value, long_value]

        async def gone() -> bool:
            return (await store.get_many([short_key]))[0] is None

        await _until(gone)
        assert time.monotonic() - written >= TTL_S - 0.05  # not before its time
        assert await store.get_many([long_key]) == [long_value]
        assert (await store.stats()).entries == 1
        await store.close()

    asyncio.run(run())


@pytest.mark.slow
@needs_redis_server
def test_delete_all_leaves_keys_outside_the_namespace(server: RedisServer, client: redis.Redis) -> None:
    async def run() -> None:
        store, other = RedisStore(server.url), RedisStore(server.url, namespace="ef2:")
        client.set(b"unrelated", b"1")
        client.set(b"ef", b"2")  # a prefix of the namespace, not in it
        client.set(b"EF:" + b"\0" * 40, b"3")  # patterns are case-sensitive
        await store.set_many(_entries(A, 4))
        await other.set_many(_entries(A, 2))
        assert await store.delete() == 4
        assert await store.delete() == 0
        assert client.dbsize() == 5
        assert client.get(b"unrelated") == b"1" and client.get(b"ef") == b"2"
        assert (await other.stats()).entries == 2
        assert (await store.stats()).entries == 0  # ef2:... is not in ef:*
        await store.close()
        await other.close()

    asyncio.run(run())


@pytest.mark.slow
@needs_redis_server
def test_one_mget_per_get_many_and_one_mset_per_set_many(server: RedisServer, client: redis.Redis) -> None:
    async def run() -> None:
        store = RedisStore(server.url)
        items = _entries(A, 500)
        mset = _calls(client, "mset")
        await store.set_many(items)
        assert _calls(client, "mset") == mset + 1

        mget = _calls(client, "mget")
        got = await store.get_many([k for k, _ in items] + [b"\1" * 40])
        assert got == [v for _, v in items] + [None]
        assert _calls(client, "mget") == mget + 1
        assert await store.get_many([]) == []
        assert _calls(client, "mget") == mget + 1  # nothing asked: no call

        sets = _calls(client, "set")
        await store.set_many(items[:50], ttl=60)
        assert _calls(client, "set") == sets + 50 and _calls(client, "mset") == mset + 1
        assert _calls(client, "multi") == 0  # the ttl pipeline is not a transaction
        await store.close()

    asyncio.run(run())


@pytest.mark.slow
@needs_redis_server
def test_delete_by_tag_with_glob_metacharacters(server: RedisServer, client: redis.Redis) -> None:
    async def run() -> None:
        store = RedisStore(server.url)
        for tag in GLOB_TAGS:
            await store.set_many(_tagged(tag, 3))
        left = len(GLOB_TAGS) * 3
        assert await store.delete(b"[a]") == 0  # matched literally; as a glob it would match b"a\\xy1234"
        for tag in GLOB_TAGS:
            assert await store.delete(tag) == 3, tag
            left -= 3
            stats = await store.stats()
            assert stats.entries == left and tag.hex() not in stats.per_model
            assert client.dbsize() == left
        await store.close()

    asyncio.run(run())


@pytest.mark.slow
@needs_redis_server
def test_namespace_with_glob_metacharacters(server: RedisServer, client: redis.Redis) -> None:
    async def run() -> None:
        store, lookalike = RedisStore(server.url, namespace=b"c[a]*:"), RedisStore(server.url, namespace=b"ca:")
        await store.set_many(_tagged(GLOB_TAGS[0], 2))
        await lookalike.set_many(_tagged(GLOB_TAGS[0], 5))
        assert (await store.stats()).entries == 2
        assert await store.delete() == 2
        assert client.dbsize() == 5
        await store.close()
        await lookalike.close()

    asyncio.run(run())


@pytest.mark.slow
@needs_redis_server
def test_delete_and_stats_page_through_scan(server: RedisServer) -> None:
    async def run() -> None:
        store = RedisStore(server.url)
        items = _entries(A, 2500)  # several SCAN pages
        await store.set_many(items)
        stats = await store.stats()
        assert stats.entries == 2500 and stats.per_model[A.tag.hex()][0] == 2500
        assert await store.delete(A.tag) == 2500
        assert (await store.stats()).entries == 0
        await store.close()

    asyncio.run(run())


async def _fails_fast(call: Awaitable[object], limit: float = FAIL_FAST_LIMIT_S) -> float:
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await call
    elapsed = time.monotonic() - start
    assert elapsed < limit, f"took {elapsed:.2f}s to fail"
    assert isinstance(info.value, ConnectionError)
    return elapsed


@pytest.mark.slow
@needs_redis_server
def test_redis_killed_then_back_on_the_same_port(server: RedisServer) -> None:
    async def run() -> None:
        store = RedisStore(server.url)
        items = _entries(A, 10)
        await store.set_many(items)
        assert (await store.get_many([items[0][0]]))[0] == items[0][1]

        server.kill()
        await _fails_fast(store.get_many([k for k, _ in items]))
        await _fails_fast(store.set_many(items))
        await _fails_fast(store.set_many(items, ttl=5))
        await _fails_fast(store.delete(A.tag))
        await _fails_fast(store.stats())
        await _fails_fast(store.get_many([items[0][0]]))  # still down: still fast, no retry storm

        server.start()

        async def works() -> bool:
            try:
                await store.get_many([items[0][0]])
            except StoreUnavailable:
                return False
            return True

        await _until(works)
        assert await store.get_many([items[0][0]]) == [None]  # nothing persisted: a cold cache
        await store.set_many(items)
        assert await store.get_many([k for k, _ in items]) == [v for _, v in items]
        await store.close()

    asyncio.run(run())


@pytest.mark.slow
@needs_redis_server
def test_first_call_after_a_restart_succeeds_on_stale_connections(server: RedisServer) -> None:
    async def run() -> None:
        store = RedisStore(server.url)
        items = _entries(A, 4)
        # Several pooled connections, all left open.
        await asyncio.gather(*(store.set_many(items) for _ in range(4)))
        server.kill()
        server.start()
        # No call in between: the pooled connections are stale; the store replaces them itself.
        assert await store.get_many([items[0][0]]) == [None]
        await asyncio.gather(*(store.set_many(items) for _ in range(4)))
        assert await store.get_many([k for k, _ in items]) == [v for _, v in items]
        await store.close()

    asyncio.run(run())


@pytest.mark.slow
@needs_redis_server
def test_hung_redis_fails_fast_and_recovers(server: RedisServer) -> None:
    async def run() -> None:
        store = RedisStore(server.url)
        items = _entries(A, 4)
        await store.set_many(items)
        server.pause()
        try:
            await _fails_fast(store.get_many([items[0][0]]))
            await _fails_fast(store.set_many(items))
        finally:
            server.resume()
        assert await store.get_many([items[0][0]]) == [items[0][1]]
        await store.close()

    asyncio.run(run())


@pytest.mark.slow
@needs_redis_server
def test_two_stores_see_each_others_writes(server: RedisServer) -> None:
    async def run() -> None:
        gateway_1, gateway_2 = RedisStore(server.url), RedisStore(server.unix_url)
        a, b = _entries(A, 6), _entries(B, 6)
        await gateway_1.set_many(a)
        await gateway_2.set_many(b, ttl=60)
        assert await gateway_2.get_many([k for k, _ in a]) == [v for _, v in a]
        assert await gateway_1.get_many([k for k, _ in b]) == [v for _, v in b]
        assert await gateway_2.delete(A.tag) == 6
        assert await gateway_1.get_many([a[0][0]]) == [None]
        assert (await gateway_1.stats()) == (await gateway_2.stats())
        await gateway_1.close()
        await gateway_2.close()

    asyncio.run(run())
