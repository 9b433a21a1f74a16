"""The gateway over a real redis-server: shared by two gateways, and fail-open when Redis dies."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.cache.redis_server import RedisServer, needs_redis_server
from tests.helpers import GatewayProcess, WorkerProcess

pytestmark = [pytest.mark.slow, needs_redis_server]


def _gateway(worker: WorkerProcess, cache: str, log_dir: Path) -> GatewayProcess:
    return GatewayProcess(["--upstream", worker.url, "--cache", cache, "--memory-cache-bytes", "1"],
                          log_dir, log_dir).start()


def _wait_for_hit(g: GatewayProcess, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while g.post("/embed", {"inputs": text}).headers["x-cache"] != "hit":
        assert time.monotonic() < deadline, f"{text!r} never became a hit"


def test_two_gateways_share_redis_and_survive_its_death(start_worker: object, tmp_path: Path) -> None:
    worker: WorkerProcess = start_worker()  # type: ignore[operator]
    with RedisServer() as redis:
        # A 1-byte memory tier: every hit below comes from Redis.
        a = _gateway(worker, redis.url, tmp_path / "a")
        b = _gateway(worker, redis.url, tmp_path / "b")
        try:
            assert a.post("/embed", {"inputs": "shared through redis"}).headers["x-cache"] == "miss"
            _wait_for_hit(b, "shared through redis")  # written behind by a, read by b

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
