"""Cross-gateway single-flight on a real redis-server: the leases' contract, and the tier's use of them.

Two :class:`RedisStore` objects on one server stand for two gateways (each has its own lease token).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest

from embedfleet.cache import EmbedParams, ModelFingerprint, cache_key
from embedfleet.cache.memory import VECTOR, MemoryStore, entry_from_vector
from embedfleet.cache.redis_store import LEASE_PREFIX, RedisStore
from embedfleet.cache.tiered import TieredCache
from tests.cache.redis_server import RedisServer, needs_redis_server

pytestmark = needs_redis_server

MODEL = ModelFingerprint("model-a", "1", "embedding", "mean")
LEASE_S = 0.5
"""Short, so that a lapsed lease is seen quickly."""


def _keys(n: int, prefix: str = "text") -> list[bytes]:
    return [cache_key(MODEL, EmbedParams(), f"{prefix} {i}") for i in range(n)]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One server for the module; each test uses its own texts."""
    with RedisServer() as server:
        yield server


def test_claim_takes_free_leases_reports_held_ones_and_returns_values(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
        try:
            keys = _keys(3, "claim")
            assert await a.leases.claim(keys[:2], LEASE_S) == [True, True]
            # b: the first two are a's; the third is free
            assert await b.leases.claim(keys, LEASE_S) == [False, False, True]
            # a claims again what it holds: still its own (a retry never blocks itself)
            assert await a.leases.claim(keys[:1], LEASE_S) == [True]
            # a publishes the first value and drops its leases; b then sees the value, not a lease
            await a.leases.publish([(keys[0], b"value 0")], None, keys[:2])
            assert await b.leases.claim(keys[:2], 30.0) == [b"value 0", True]
            # dropping a lease never drops another's: a's release of keys[1] leaves b's lease alone
            await a.leases.publish([], None, keys[1:2])
            assert await a.leases.claim(keys[1:2], LEASE_S) == [False]
            # leases live outside the namespace: delete and stats see values only
            assert (await a.stats()).entries == 1
            raw = await a._client.exists(LEASE_PREFIX + a.namespace + keys[1])
            assert raw == 1
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_lease_lapses_unless_renewed(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
        try:
            held, dropped = _keys(2, "lapse")
            assert await a.leases.claim([held, dropped], LEASE_S) == [True, True]
            deadline = time.monotonic() + 3 * LEASE_S
            while time.monotonic() < deadline:  # renew one of the two for three lease lives
                await a.leases.renew([held], LEASE_S)
                await asyncio.sleep(LEASE_S / 3)
            assert await b.leases.claim([held], LEASE_S) == [False]  # renewed: still a's
            assert await b.leases.claim([dropped], LEASE_S) == [True]  # lapsed: b took it over
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def _tier(url: str, **options: float) -> TieredCache:
    return TieredCache(MemoryStore(1 << 20), RedisStore(url), lease_ttl=LEASE_S, **options)  # type: ignore[arg-type]


def test_a_waiter_gets_the_holders_value(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        holder, waiter = _tier(redis_server.url), _tier(redis_server.url)
        holder.start()
        waiter.start()
        try:
            keys = _keys(4, "waiter")
            assert holder.shares_flights
            claim = await holder.claim(keys)
            assert claim.owned == keys and not claim.foreign
            other = await waiter.claim(keys)
            assert other.foreign == keys and not other.owned
            waiting = asyncio.create_task(waiter.await_foreign(other.foreign))
            entries = [entry_from_vector(np.full(4, i, np.float32)) for i in range(4)]
            async with holder.holding(keys):
                await asyncio.sleep(2 * LEASE_S)  # a computation longer than a lease: renewed, never lapses
                assert not waiting.done()
            holder.store_entries(list(zip(keys, entries, strict=True)), leased=keys)
            got = await asyncio.wait_for(waiting, 10)
            assert not got.owned
            assert [float(got.found[k][VECTOR][0]) for k in keys] == [0.0, 1.0, 2.0, 3.0]  # type: ignore[index]
            assert waiter.counters.flights_joined == 4 and waiter.counters.flights_taken_over == 0
            # and the holder's values are in the store, so a third gateway finds them
            assert len((await _tier(redis_server.url).claim(keys)).found) == 4
        finally:
            await holder.close()
            await waiter.close()

    asyncio.run(scenario())


def test_a_waiter_takes_over_when_the_holder_dies_or_fails(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        dead, failing, waiter = _tier(redis_server.url), _tier(redis_server.url), _tier(redis_server.url)
        try:
            lapsed, released = _keys(1, "died") + _keys(1, "failed")
            await dead.claim([lapsed])  # then never renews nor publishes: its process died
            await failing.claim([released])
            other = await waiter.claim([lapsed, released])
            assert other.foreign == [lapsed, released]
            started = time.monotonic()
            waiting = asyncio.create_task(waiter.await_foreign(other.foreign))
            failing.release([released])  # its computation failed: the waiter computes at once
            got = await asyncio.wait_for(waiting, 10)
            assert sorted(got.owned) == sorted([lapsed, released]) and not got.found
            assert time.monotonic() - started < 10 * LEASE_S
            assert waiter.counters.flights_taken_over == 2
            # the waiter now holds both leases (renewed while it computes): a fourth gateway waits on it
            async with waiter.holding(got.owned):
                await asyncio.sleep(LEASE_S)
                assert (await _tier(redis_server.url).claim([lapsed, released])).foreign == [lapsed, released]
        finally:
            for tier in (dead, failing, waiter):
                await tier.close()

    asyncio.run(scenario())


def test_leases_fail_open_and_can_be_turned_off(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        keys = _keys(2, "open")
        off = _tier(redis_server.url, leases=False)  # type: ignore[arg-type]
        assert not off.shares_flights and (await off.claim(keys)).owned == keys
        await off.close()
        gone = RedisServer()
        gone.start()
        down = _tier(gone.url)
        try:
            gone.kill()
            claim = await down.claim(keys)  # Redis gone: everything is the caller's to compute, no error
            assert claim.owned == keys and not claim.foreign
            assert down.counters.store_errors == 1 and not down.shares_flights  # in back-off now
        finally:
            await down.close()
            gone.close()

    asyncio.run(scenario())
