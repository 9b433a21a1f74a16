"""The gateway when what is behind it misbehaves: a cache store that hangs, a replica that dies and comes back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path
from types import TracebackType

import httpx
import pytest

from tests.gateway.support import HangDrill, wait_for
from tests.helpers import GatewayProcess, WorkerProcess

pytestmark = pytest.mark.slow


class HungServer:
    """A TCP server on a free loopback port that accepts connections and reads what comes, but never answers:
    a Redis that hangs. It runs an event loop in a thread; ``with`` stops it."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hung-server", daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        while chunk := await reader.read(65536):
            self.received += len(chunk)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> HungServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()


def test_a_hung_cache_store_never_fails_a_request(worker: WorkerProcess, tmp_path: Path) -> None:
    with HungServer() as hung:
        g = GatewayProcess(["--upstream", worker.url, "--cache", f"redis://127.0.0.1:{hung.port}/0",
                            "--store-timeout", "0.25"], tmp_path, tmp_path).start()
        try:
            started = time.monotonic()
            r = httpx.post(f"{g.url}/embed", json={"inputs": "the store hangs"}, timeout=30)
            elapsed = time.monotonic() - started
            assert r.status_code == 200 and r.headers["x-cache"] == "miss"
            assert len(r.json()[0]) == 384
            assert hung.connections >= 1 and hung.received > 0  # the gateway did ask the store...
            assert elapsed >= 0.2  # ...waited for its read timeout, then computed the vector
            assert g.metric("embedfleet_cache_store_errors_total") >= 1
            # The store still hangs: every later request is served too (the store is retried after a back-off).
            codes = [httpx.post(f"{g.url}/embed", json={"inputs": f"still served {i}"}, timeout=30).status_code
                     for i in range(4)]
            assert codes == [200] * 4
        finally:
            g.stop()


def test_an_ejected_replica_is_readmitted_and_takes_load_again(start_worker: object, tmp_path: Path) -> None:
    pair: list[WorkerProcess] = [start_worker("--max-client-batch-size", "8") for _ in range(2)]  # type: ignore[operator]
    back = pair[0]
    g = GatewayProcess([a for w in pair for a in ("--upstream", w.url)] + ["--cache", "memory://"],
                       tmp_path, tmp_path).start()

    def healthy() -> float:
        return g.metric("embedfleet_upstream_healthy", upstream=back.url)

    async def load(tag: str) -> list[int]:
        """16 concurrent requests of 8 new texts each: work for both replicas."""
        async with httpx.AsyncClient(base_url=g.url, timeout=120) as client:
            async def one(i: int) -> int:
                texts = [f"{tag} {i} {j} " + "a few words " * 8 for j in range(8)]
                return (await client.post("/embed", json={"inputs": texts})).status_code

            return await asyncio.gather(*(one(i) for i in range(16)))

    try:
        assert healthy() == 1
        back.kill()
        assert Counter(asyncio.run(load("while down"))) == {200: 16}  # the other replica takes it all
        wait_for(lambda: healthy() == 0, "the dead replica out of the pool")
        back.start()  # the same port, a new process: its request counter starts at 0
        wait_for(lambda: healthy() == 1, "the replica re-admitted by the health checks")
        assert back.metric("te_request_count_total", method="embed") == 0
        assert Counter(asyncio.run(load("back again"))) == {200: 16}
        assert back.metric("te_request_count_total", method="embed") > 0  # it takes load again
        assert healthy() == 1
    finally:
        g.stop()


HUNG_CLIENT_TIMEOUT_S = 45.0
"""What a client (or a proxy in front of the gateway) waits at most: below the gateway's 60 s call deadline, so
a call left waiting on a hung replica until its deadline fails the request."""


def test_a_hung_replica_loses_no_request_and_rejoins_after_sigcont(start_worker: object, tmp_path: Path) -> None:
    """SIGSTOP a worker with calls in flight: it hangs without dying (its socket still accepts, nothing answers).
    Every request still succeeds, well before the gateway's 60 s call deadline: the health check finds the replica
    dead and its calls are retried on the other one. After SIGCONT it rejoins and takes load again."""
    pair: list[WorkerProcess] = [start_worker("--max-client-batch-size", "8") for _ in range(2)]  # type: ignore[operator]
    victim = pair[0]
    assert victim.proc is not None
    g = GatewayProcess([a for w in pair for a in ("--upstream", w.url)] + ["--cache", "memory://"],
                       tmp_path, tmp_path).start()

    def healthy() -> float:
        return g.metric("embedfleet_upstream_healthy", upstream=victim.url)

    drill = HangDrill(g.url, victim.url, victim.proc.pid, HUNG_CLIENT_TIMEOUT_S)
    try:
        codes = drill.load_then_stop()
        assert Counter(codes) == {200: 40}  # every request's outcome: none failed, none waited out its deadline
        assert g.metric("embedfleet_upstream_retries_total") >= 1  # the victim's calls went to the other one
        assert healthy() == 0
        assert Counter(drill.load("while hung")) == {200: 16}  # the other replica takes it all
        drill.resume()
        wait_for(lambda: healthy() == 1, "the replica re-admitted after SIGCONT", timeout=60)
        # Let it finish what it read while stopped (calls the gateway gave up on), then count from there.
        wait_for(lambda: victim.metric("te_request_in_flight") == 0, "the victim idle", timeout=60)
        before = victim.metric("te_request_count_total", method="embed")
        assert Counter(drill.load("back again")) == {200: 16}
        assert victim.metric("te_request_count_total", method="embed") > before  # it takes load again
        assert healthy() == 1
    finally:
        drill.resume()
        g.stop()
