"""Helpers for the gateway's tests: polling with a deadline, cache keys as a gateway computes them, a look
straight into a cache store (to know that a write-behind has landed before another gateway reads), and a
bare HTTP/1.1 server on loopback for upstreams that misbehave on purpose, and a drill that hangs a replica
under load."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import httpx

from embedfleet.cache import EmbedParams, ModelFingerprint, cache_key
from embedfleet.cache.urls import open_store
from tests.helpers import GatewayProcess

POLL_S = 0.05
"""Pause between two polls: short, but long enough that polling leaves the CPU to what it waits for."""


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it does not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(POLL_S)


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """One sample's value (summed over unnamed labels; 0 when absent) from a /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(exposition) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def gateway_key(g: GatewayProcess, text: str, model: str | None = None, **params: object) -> bytes:
    """The cache key the gateway gives ``text`` with these request parameters (``model``: the pool name)."""
    import httpx

    headers = {"x-model": model} if model else {}
    info = httpx.get(f"{g.url}/info", headers=headers, timeout=30).json()
    fp = ModelFingerprint.from_info(info)
    params.setdefault("truncate", info["auto_truncate"])  # what a request without `truncate` gets
    return cache_key(fp, EmbedParams(**params), text)  # type: ignore[arg-type]


def wait_until_stored(store_url: str, keys: list[bytes], timeout: float = 30.0) -> None:
    """Poll the store behind ``store_url`` (opened here, as another gateway would) until it holds every key:
    a gateway writes behind, so this is how a test knows the write has landed."""

    async def run() -> None:
        store = open_store(store_url)
        assert store is not None, f"{store_url} has no persistent store"
        try:
            deadline = time.monotonic() + timeout
            while any(v is None for v in await store.get_many(keys)):
                assert time.monotonic() < deadline, f"entries never reached {store_url} within {timeout}s"
                await asyncio.sleep(POLL_S)
        finally:
            await store.close()

    asyncio.run(run())


class LoopbackServer:
    """A bare asyncio HTTP/1.1 server on a free loopback port; subclasses answer in :meth:`serve`."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        """Listen; returns the base URL."""
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.serve(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer the requests of one connection."""
        raise NotImplementedError

    @staticmethod
    async def read_body(reader: asyncio.StreamReader) -> bytes:
        """The body of the next request on the connection (its head read and dropped)."""
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        start = head.index(b"content-length:") + len(b"content-length:")
        return await reader.readexactly(int(head[start:head.index(b"\r", start)]))

    async def stop(self) -> None:
        """Stop listening."""
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


class HangDrill:
    """Load through a gateway while one of its replicas hangs (SIGSTOP: alive, port open, answers nothing).

    Each request carries 16 texts, two calls of 8 with ``--max-client-batch-size 8``; an outcome is a status
    code, or the name of the client's error (a client timeout is an outcome too)."""

    def __init__(self, gateway_url: str, victim_url: str, victim_pid: int, client_timeout: float) -> None:
        self.gateway_url, self.victim_url, self.victim_pid = gateway_url, victim_url, victim_pid
        self.client_timeout = client_timeout
        self.stopped = False

    async def _victim_busy(self, client: httpx.AsyncClient) -> bool:
        """Calls to the victim are under way: the gateway counts them, and the victim is working on them."""
        gateway_side = metric_value((await client.get("/metrics")).text, "embedfleet_upstream_in_flight",
                                    upstream=self.victim_url)
        worker_side = metric_value((await client.get(f"{self.victim_url}/metrics")).text, "te_request_in_flight")
        return gateway_side > 0 and worker_side > 0

    @staticmethod
    async def _one(client: httpx.AsyncClient, tag: str, i: int) -> int | str:
        texts = [f"{tag} {i} {j} " + "some words " * 20 for j in range(16)]
        try:
            return (await client.post("/embed", json={"inputs": texts})).status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__

    def load_then_stop(self, requests: int = 40) -> list[int | str]:
        """Send ``requests`` at once, SIGSTOP the victim while calls are under way on it, and return every
        request's outcome (waiting at most the client timeout for each)."""
        async def run() -> list[int | str]:
            async with httpx.AsyncClient(base_url=self.gateway_url, timeout=self.client_timeout) as client:
                burst = [asyncio.create_task(self._one(client, "hang", i)) for i in range(requests)]
                deadline = time.monotonic() + 60
                while not await self._victim_busy(client):
                    assert time.monotonic() < deadline and not all(t.done() for t in burst), "victim never busy"
                    await asyncio.sleep(POLL_S)
                os.kill(self.victim_pid, signal.SIGSTOP)  # hung with calls in flight on it, not dead
                self.stopped = True
                return await asyncio.gather(*burst)

        return asyncio.run(run())

    def load(self, tag: str, requests: int = 16) -> list[int | str]:
        """``requests`` at once; their outcomes."""
        async def run() -> list[int | str]:
            async with httpx.AsyncClient(base_url=self.gateway_url, timeout=120) as client:
                return await asyncio.gather(*(self._one(client, tag, i) for i in range(requests)))

        return asyncio.run(run())

    def resume(self) -> None:
        """SIGCONT the victim (safe to call when it is not stopped)."""
        if self.stopped:
            os.kill(self.victim_pid, signal.SIGCONT)
            self.stopped = False
