"""The gateway over a real redis-server: shared by two gateways, and fail-open when Redis dies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.cache.redis_server import RedisServer, needs_redis_server
from tests.gateway.support import gateway_key, wait_for, wait_until_stored
from tests.helpers import GatewayProcess, WorkerProcess

pytestmark = [pytest.mark.slow, needs_redis_server]


def _gateway(worker: WorkerProcess, cache: str, log_dir: Path) -> GatewayProcess:
    return GatewayProcess(["--upstream", worker.url, "--cache", cache, "--memory-cache-bytes", "1"],
                          log_dir, log_dir).start()


def _wait_for_hit(g: GatewayProcess, text: str, timeout: float = 30.0) -> None:
    wait_for(lambda: g.post("/embed", {"inputs": text}).headers["x-cache"] == "hit", f"{text!r} a hit", timeout)


def test_two_gateways_share_redis_and_survive_its_death(start_worker: object, tmp_path: Path) -> None:
    worker: WorkerProcess = start_worker()  # type: ignore[operator]
    with RedisServer() as redis:
        # A 1-byte memory tier: every hit below comes from Redis.
        a = _gateway(worker, redis.url, tmp_path / "a")
        b = _gateway(worker, redis.url, tmp_path / "b")
        try:
            assert a.post("/embed", {"inputs": "shared through redis"}).headers["x-cache"] == "miss"
            wait_until_stored(redis.url, [gateway_key(a, "shared through redis")])  # written behind by a
            before = worker.metric("te_embed_count_total")
            first = b.post("/embed", {"inputs": "shared through redis"})  # b's first request: read from Redis
            assert first.status_code == 200 and first.headers["x-cache"] == "hit"
            assert b.metric("embedfleet_cache_lookups_total", result="store_hit") == 1
            assert b.metric("embedfleet_upstream_inputs_total") == 0
            assert worker.metric("te_embed_count_total") == before  # no worker was asked

            async def load() -> list[int]:
                async with httpx.AsyncClient(base_url=a.url, timeout=60) as client:
                    async def one(i: int) -> int:
                        r = await client.post("/embed", json={"inputs": [f"during outage {i}", "shared through redis"]})
                        return r.status_code

                    first = await asyncio.gather(*(one(i) for i in range(10)))
                    redis.kill()
                    rest = await asyncio.gather(*(one(i) for i in range(10, 40)))
                    return [*first, *rest]

            assert asyncio.run(load()) == [200] * 40  # Redis down: misses, never failures
            assert a.metric("embedfleet_cache_store_errors_total") >= 1
            redis.start()
            _wait_for_hit(a, "back after the outage")  # miss, written, then a hit from Redis again
        finally:
            a.stop()
            b.stop()
