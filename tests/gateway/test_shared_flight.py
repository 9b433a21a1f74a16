"""Cross-gateway single-flight: two gateway processes sharing a real redis-server, asked for the same new
texts at the same moment by 8 clients, compute each text about once (bound: 1.1x the unique texts)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cache.redis_server import RedisServer, needs_redis_server
from tests.helpers import GatewayProcess, WorkerProcess

pytestmark = [pytest.mark.slow, needs_redis_server]

CLIENTS = 8
TEXTS = 32
ROUNDS = 3
BOUND = 1.1
"""Upstream inputs at most this many times the unique texts."""


@pytest.fixture(scope="module")
def gateways(worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[GatewayProcess]]:
    """Two gateways in front of the session's worker, sharing one Redis (a 1-byte memory tier, so that
    nothing but the store and the leases can share work between them)."""
    logs = tmp_path_factory.mktemp("shared-flight")
    with RedisServer() as redis:
        started: list[GatewayProcess] = []
        try:
            for name in ("a", "b"):
                started.append(GatewayProcess(["--upstream", worker.url, "--cache", redis.url,
                                               "--memory-cache-bytes", "1"], Path(logs / name), logs / name).start())
            yield started
        finally:
            for g in started:
                g.stop()


async def _identical_batches(gateways: list[GatewayProcess], texts: list[str]) -> list[list[list[float]]]:
    """Every client sends ``texts`` at once, alternating gateways; the vectors each got."""
    async with httpx.AsyncClient(timeout=60) as client:
        async def one(i: int) -> list[list[float]]:
            r = await client.post(f"{gateways[i % len(gateways)].url}/embed", json={"inputs": texts})
            assert r.status_code == 200, r.text
            vectors: list[list[float]] = r.json()
            return vectors

        return list(await asyncio.gather(*(one(i) for i in range(CLIENTS))))


def test_identical_new_batches_through_two_gateways_are_computed_once(gateways: list[GatewayProcess]) -> None:
    def sent() -> float:
        return sum(g.metric("embedfleet_upstream_inputs_total") for g in gateways)

    before = sent()
    for r in range(ROUNDS):
        texts = [f"shared flight round {r} text {i}" for i in range(TEXTS)]
        answers = asyncio.run(_identical_batches(gateways, texts))
        assert all(a == answers[0] for a in answers)  # everyone got the same vectors
    upstream = sent() - before
    unique = ROUNDS * TEXTS
    assert unique <= upstream <= BOUND * unique, f"{upstream} upstream inputs for {unique} unique texts"
