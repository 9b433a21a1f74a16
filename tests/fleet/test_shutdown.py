"""``embedfleet serve`` shutting down under load, as the README promises.

SIGTERM: requests under way are drained (each gets its 200), the workers stop, the cache's writes are
flushed (what the drained requests computed is a hit after a restart on the same LMDB cache), exit 0.
A second SIGINT kills the workers and exits at once. The tests share one fleet (one single-thread
default-model worker) and an LMDB cache under a tmp dir.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedfleet.cache.lmdb_store import LmdbStore
from embedfleet.cache.memory import VECTOR, MemoryStore, entry_from_blob
from embedfleet.cache.tiered import TieredCache
from tests.fleet.loadgen import Outcomes
from tests.fleet.procs import assert_gone, one_worker_config
from tests.helpers import ServeProcess

# About 100 tokens a text: four requests of 32 keep a single-thread worker busy for a few seconds,
# well within the gateway's 10 s drain.
FILLER = ("the quick brown fox jumps over the lazy dog while a careful reader checks every line of the "
          "report before the meeting starts and the team writes down what was decided about the plan ") * 3


def _config(tmp: Path, data_dir: Path) -> Path:
    return one_worker_config(tmp, data_dir, cache=f"lmdb://{tmp / 'cache'}", health_interval=0.5,
                             stop_timeout=60)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("shutdown")
    proc = ServeProcess(["--config", str(_config(tmp, data_dir))], data_dir, tmp / "log")
    with proc:
        yield proc


class Requests:
    """One client thread per request, each posting its texts once; outcomes counted, answers kept."""

    def __init__(self, url: str, batches: list[list[str]]) -> None:
        self.url, self.batches = url, batches
        self.outcomes = Outcomes()
        self.answers: dict[int, Any] = {}
        self.finished: dict[int, float] = {}  # monotonic time each request got its outcome
        self._threads = [threading.Thread(target=self._one, args=(k,), daemon=True) for k in range(len(batches))]

    def _one(self, k: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            r = self.outcomes.post(client, "/embed", {"inputs": self.batches[k]}, len(self.batches[k]))
        self.finished[k] = time.monotonic()
        if r is not None and r.status_code == 200:
            self.answers[k] = r.json()

    def start(self) -> Requests:
        """Send them all."""
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float = 120) -> None:
        """Until every request has its outcome."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), f"a request never ended: {self.outcomes.summary()}"


def _batches(tag: str, requests: int, texts: int) -> list[list[str]]:
    return [[f"{tag} {k} {j} {FILLER}" for j in range(texts)] for k in range(requests)]


def _wait_under_way(fleet: ServeProcess, before: float, inputs: int, timeout: float = 60) -> None:
    """Until the gateway has sent ``inputs`` more inputs upstream: their requests are being served."""
    deadline = time.monotonic() + timeout
    while fleet.metric("embedfleet_upstream_inputs_total") - before < inputs:
        assert time.monotonic() < deadline, f"the requests never got under way:\n{fleet.log()[-3000:]}"
        time.sleep(0.05)


def _wait_log(fleet: ServeProcess, text: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while fleet.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{fleet.log()[-3000:]}"
        time.sleep(0.05)


def _worker_pids(fleet: ServeProcess) -> list[int]:
    pids = [i["pid"] for i in fleet.admin("GET", "/instances").json()["instances"]]
    assert pids and all(pids), pids
    return pids


@pytest.mark.slow
def test_sigterm_drains_requests_under_way_and_flushes_the_cache(fleet: ServeProcess) -> None:
    assert fleet.proc is not None
    pids = _worker_pids(fleet)
    batches = _batches("drain", requests=4, texts=32)
    before = fleet.metric("embedfleet_upstream_inputs_total")
    shutting_down = fleet.log().count("shutting down: draining")
    load = Requests(fleet.url, batches).start()
    try:
        _wait_under_way(fleet, before, sum(map(len, batches)))
        signalled = time.monotonic()
        os.kill(fleet.proc.pid, signal.SIGTERM)
        load.join()
        code = fleet.proc.wait(timeout=120)
    finally:
        fleet.stop()
    assert code == 0, fleet.log()[-3000:]
    assert fleet.log().count("shutting down: draining") == shutting_down + 1
    load.outcomes.assert_all_ok(at_least=len(batches))  # every request sent before SIGTERM got its 200
    assert load.outcomes.sent == len(batches)
    assert max(load.finished.values()) > signalled, "every request ended before SIGTERM: nothing was drained"
    assert_gone(pids)

    fleet.start()  # same state dir, same LMDB cache
    for k, texts in enumerate(batches):
        again = fleet.post("/embed", {"inputs": texts})
        assert again.status_code == 200, again.text
        assert (again.headers["x-cache"], again.headers["x-cache-hits"]) == ("hit", str(len(texts))), again.headers
        assert again.json() == load.answers[k]


@pytest.mark.slow
def test_a_second_sigint_kills_the_workers_and_exits_at_once(fleet: ServeProcess) -> None:
    assert fleet.proc is not None
    if fleet.proc.poll() is not None:
        fleet.start()
    pids = _worker_pids(fleet)
    # Far more work than the 10 s drain: a graceful stop would wait the whole drain, then for the worker.
    batches = _batches("force", requests=4, texts=256)
    before = fleet.metric("embedfleet_upstream_inputs_total")
    first = fleet.log().count("shutting down: draining")
    second = fleet.log().count("second signal: killing the workers")
    load = Requests(fleet.url, batches).start()
    try:
        _wait_under_way(fleet, before, sum(map(len, batches)))
        os.kill(fleet.proc.pid, signal.SIGINT)
        _wait_log(fleet, "shutting down: draining", first + 1)  # the first one is being handled
        forced = time.monotonic()
        os.kill(fleet.proc.pid, signal.SIGINT)
        fleet.proc.wait(timeout=120)
        took = time.monotonic() - forced
        assert_gone(pids)
        load.join()
    finally:
        fleet.stop()
    assert fleet.log().count("second signal: killing the workers") == second + 1
    assert took < 8, f"exit took {took:.1f}s after the second SIGINT:\n{fleet.log()[-3000:]}"
    assert load.outcomes.ok < len(batches), "the load ended before the second SIGINT: nothing was cut short"


def test_cache_close_flushes_queued_writes(tmp_path: Path) -> None:
    """The write-behind queue is written out on close: entries queued just before shutdown survive it."""
    keys = [bytes([i]) * 32 for i in range(1, 65)]
    vectors = [np.full(8, i, np.float32) for i in range(1, 65)]

    async def write_then_close() -> None:
        cache = TieredCache(MemoryStore(1 << 20), LmdbStore(tmp_path / "cache"))
        cache.start()
        await cache.put(list(zip(keys, vectors, strict=True)))  # queued; the writer has not run yet
        await cache.close()

    async def read() -> list[bytes | None]:
        store = LmdbStore(tmp_path / "cache")
        try:
            return await store.get_many(keys)
        finally:
            await store.close()

    asyncio.run(write_then_close())
    blobs = asyncio.run(read())
    assert all(b is not None for b in blobs), f"{sum(b is None for b in blobs)} of {len(keys)} writes lost"
    for blob, vector in zip(blobs, vectors, strict=True):
        assert blob is not None
        np.testing.assert_array_equal(entry_from_blob(blob)[VECTOR], vector)
