"""Every cache store behind a real gateway: hits are byte-equal to misses; corrupt entries are misses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embedfleet.cache import EmbedParams, ModelFingerprint, cache_key
from tests.cache.redis_server import RedisServer, needs_redis_server
from tests.gateway.support import POLL_S
from tests.helpers import GatewayProcess, WorkerProcess

pytestmark = pytest.mark.slow

STORES = ["lmdb", pytest.param("redis", marks=needs_redis_server), "qdrant+local"]


@pytest.fixture(scope="module")
def worker(start_worker: object) -> WorkerProcess:
    return start_worker()  # type: ignore[operator, no-any-return]


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "redis":
        with RedisServer() as server:
            yield server.url
    else:
        yield f"{request.param}://{tmp_path / 'store'}"


def _key(g: GatewayProcess, text: str, **params: object) -> bytes:
    info = g.get("/info").json()
    fp = ModelFingerprint.from_info(info)
    params.setdefault("truncate", info["auto_truncate"])  # what a request without `truncate` gets
    return cache_key(fp, EmbedParams(**params), text)  # type: ignore[arg-type]


def _poll_hit(g: GatewayProcess, body: dict[str, object]) -> bytes:
    deadline = time.monotonic() + 30  # writes go behind: poll for the hit, with a pause that leaves them the CPU
    while True:
        r = g.post("/embed", body)
        if r.headers["x-cache"] == "hit":
            return r.content
        assert time.monotonic() < deadline, "entry never reached the store"
        time.sleep(POLL_S)


def test_store_hits_are_byte_equal(worker: WorkerProcess, store_url: str, tmp_path: Path) -> None:
    # A 1-byte memory tier: every hit below comes from the store itself.
    g = GatewayProcess(["--upstream", worker.url, "--cache", store_url, "--memory-cache-bytes", "1"],
                       tmp_path, tmp_path).start()
    try:
        # `dimensions` first: a store with one vector size per model (Qdrant) must still keep full vectors.
        for body in ({"inputs": "cut short", "dimensions": 128}, {"inputs": ["store me", "and me"]},
                     {"inputs": "unnormalised", "normalize": False}):
            miss = g.post("/embed", body)
            assert miss.headers["x-cache"] == "miss"
            assert _poll_hit(g, body) == miss.content
        raw = np.array(g.post("/embed", {"inputs": "unnormalised", "normalize": False}).json()[0])
        assert abs(np.linalg.norm(raw) - 1.0) > 1e-3
        # Token counts travel with the stored value: OpenAI usage is the same from the store.
        openai = {"input": ["store me", "and me"], "model": "default"}
        stored = g.post("/v1/embeddings", openai)
        assert stored.headers["x-cache"] == "hit"
        assert stored.json()["usage"] == worker.post("/v1/embeddings", openai).json()["usage"]
    finally:
        g.stop()


@pytest.mark.parametrize("kind", ["lmdb", pytest.param("redis", marks=needs_redis_server)])
def test_corrupt_entry_is_a_miss_and_is_overwritten(worker: WorkerProcess, kind: str, tmp_path: Path) -> None:
    redis = RedisServer().start() if kind == "redis" else None
    url = redis.url if redis else f"lmdb://{tmp_path / 'lmdb'}"
    g = GatewayProcess(["--upstream", worker.url, "--cache", url, "--memory-cache-bytes", "1"],
                       tmp_path, tmp_path).start()
    try:
        body = {"inputs": "to be corrupted"}
        good = g.post("/embed", body).content
        _poll_hit(g, body)
        key = _key(g, "to be corrupted")

        async def corrupt() -> None:
            if redis is not None:
                from embedfleet.cache.redis_store import RedisStore

                store: object = RedisStore(redis.url)
            else:
                from embedfleet.cache.lmdb_store import LmdbStore

                store = LmdbStore(tmp_path / "lmdb")  # LMDB is safe to open from a second process
            value = (await store.get_many([key]))[0]  # type: ignore[attr-defined]
            assert value is not None
            flipped = bytearray(value)
            flipped[-1] ^= 0xFF
            await store.set_many([(key, bytes(flipped))])  # type: ignore[attr-defined]
            await store.close()  # type: ignore[attr-defined]

        asyncio.run(corrupt())
        again = g.post("/embed", body)
        assert again.headers["x-cache"] == "miss" and again.content == good  # recomputed, never the bad bytes
        assert _poll_hit(g, body) == good  # and the entry was overwritten
    finally:
        g.stop()
        if redis is not None:
            redis.close()


def test_cache_ttl_setting_expires_entries(worker: WorkerProcess, tmp_path: Path) -> None:
    # The flag reaches the cache: an entry hits, then, once its 2 s are up, is computed again.
    g = GatewayProcess(["--upstream", worker.url, "--cache", f"lmdb://{tmp_path / 'lmdb'}", "--cache-ttl", "2"],
                       tmp_path, tmp_path).start()
    try:
        body = {"inputs": "lives two seconds"}
        written = time.monotonic()
        assert g.post("/embed", body).headers["x-cache"] == "miss"
        if time.monotonic() - written < 1.5:  # (a stall that long would be no fault of the gateway)
            assert g.post("/embed", body).headers["x-cache"] == "hit"
        deadline = time.monotonic() + 30
        while g.post("/embed", body).headers["x-cache"] != "miss":
            assert time.monotonic() < deadline, "the entry never expired"
            time.sleep(POLL_S)
        assert time.monotonic() - written >= 1.9  # not before its time
    finally:
        g.stop()
