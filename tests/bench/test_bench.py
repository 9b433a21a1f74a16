"""``embedfleet bench`` against real worker and gateway processes (and a deliberately slow loopback server)."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from embedfleet.bench.report import TEI_KEYS
from embedfleet.cli import app
from tests.gateway.support import LoopbackServer
from tests.helpers import GatewayProcess, TlsFiles, WorkerProcess, free_port

pytestmark = pytest.mark.slow

runner = CliRunner()
QUICK = ["--warmup", "0", "--no-progress", "--concurrency", "4"]


@pytest.fixture(scope="module")
def gateway(worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("bench-gw")
    g = GatewayProcess(["--upstream", worker.url, "--cache", "memory://"], log, log).start()
    yield g
    g.stop()


def bench(tmp_path: Path, url: str, *args: str, code: int = 0) -> dict[str, Any]:
    """Run ``embedfleet bench`` in this process; its JSON document."""
    out = tmp_path / "bench.json"
    out.unlink(missing_ok=True)
    result = runner.invoke(app, ["bench", url, *QUICK, "--json", str(out), *args], env={"COLUMNS": "120"})
    assert result.exit_code == code and isinstance(result.exception, SystemExit | None), result.output
    doc: dict[str, Any] = orjson.loads(out.read_bytes())
    return doc


def test_http_mode_all_hits_json_and_plot(gateway: GatewayProcess, tmp_path: Path) -> None:
    png = tmp_path / "latency.png"
    doc = bench(tmp_path, gateway.url, "--mode", "http", "--hit-ratio", "1", "--hot-texts", "32", "--num-texts", "300",
                "--plot", str(png))
    assert list(doc)[:len(TEI_KEYS)] == list(TEI_KEYS)
    assert (doc["mode"], doc["num_texts"], doc["batch_size"], doc["num_requests"]) == ("http", 300, 1, 300)
    assert (doc["successful"], doc["failed"], doc["errors"]) == (300, 0, {})
    assert doc["total_duration_secs"] > 0 and doc["throughput_per_sec"] == doc["embeddings_per_sec"] > 0
    assert doc["x_cache"] == {"hit": 300} and doc["cache_hit_ratio"] == 1.0
    assert 0 < doc["latency_ms"]["p50"] <= doc["latency_ms"]["p99"] <= doc["latency_ms"]["max"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_openai_modes_honour_the_hit_ratio(gateway: GatewayProcess, tmp_path: Path, encoding: str) -> None:
    doc = bench(tmp_path, f"{gateway.url}/v1", "--mode", "openai", "--encoding", encoding, "--batch-size", "4",
                "--hit-ratio", "0.75", "--hot-texts", "8", "--num-texts", "64")
    assert (doc["mode"], doc["encoding"], doc["successful"], doc["num_requests"]) == ("openai", encoding, 64, 16)
    # The gateway's own count of the texts it answered from its cache, request by request (X-Cache-Hits).
    assert (doc["cache_hits"], doc["cache_misses"]) == (48, 16) and doc["cache_hit_ratio"] == 0.75
    assert set(doc["x_cache"]) <= {"hit", "partial"}


def test_texts_from_a_file_and_compare(gateway: GatewayProcess, worker: WorkerProcess, tmp_path: Path) -> None:
    texts = tmp_path / "texts.csv"
    texts.write_text("id,passage\n" + "".join(f'{i},"passage number {i}, about rivers"\n' for i in range(6)))
    doc = bench(tmp_path, worker.url, "--texts", str(texts), "--column", "passage", "--batch-size", "2",
                "--num-texts", "16", "--compare", gateway.url, "--rounds", "2")
    assert (doc["successful"], doc["num_requests"], doc["texts_file"]) == (16, 8, str(texts))
    assert doc["cache_hit_ratio"] is None  # a worker says nothing of a cache
    other = doc["compare"]
    assert other["url"] == gateway.url and other["successful"] == 16 and other["rounds"] == 2
    assert other["ratios_b_over_a"]["requests_per_sec"] > 0


def test_errors_are_counted_not_fatal(gateway: GatewayProcess, worker: WorkerProcess, tmp_path: Path) -> None:
    too_big = bench(tmp_path, worker.url, "--batch-size", "40", "--num-texts", "80", code=1)  # worker takes 32
    assert too_big["errors"] == {"422 Validation": 2} and (too_big["successful"], too_big["failed"]) == (0, 80)
    unknown = bench(tmp_path, gateway.url, "--model", "no-such-model", "--num-texts", "5", code=1)  # X-Model
    assert unknown["errors"] == {"404 NotFound": 5}
    nobody = bench(tmp_path, f"http://127.0.0.1:{free_port()}", "--num-texts", "6", code=1)
    assert nobody["errors"] == {"transport: ConnectionRefusedError": 6} and nobody["failed"] == 6


def test_mtls_target(worker: WorkerProcess, tmp_path: Path) -> None:
    tls = TlsFiles.make(tmp_path, "bench@example.test")
    ca_file, client = tls.ca_file, tls.client
    g = GatewayProcess(["--upstream", worker.url, "--cache", "memory://", *tls.server_args], tmp_path, tmp_path)
    g.url = g.url.replace("http://", "https://")
    g.verify = ssl.create_default_context(cafile=str(ca_file))
    g.verify.load_cert_chain(str(client))
    with g:
        ok = bench(tmp_path, g.url, "--cacert", str(ca_file), "--cert", str(client), "--num-texts", "8")
        assert ok["successful"] == 8 and ok["x_cache"]
        refused = bench(tmp_path, g.url, "--cacert", str(ca_file), "--num-texts", "4", code=1)  # no client cert
        assert refused["failed"] == 4 and all(k.startswith("transport:") for k in refused["errors"])


class SlowServer(LoopbackServer):
    """Answers one request at a time, each after ``delay`` seconds: a server of known, small capacity. The
    answer is ``[[0.0]]``, with a length, or chunked (in two chunks)."""

    def __init__(self, delay: float, chunked: bool = False) -> None:
        super().__init__()
        self.delay = delay
        self.chunked = chunked
        self.lock = asyncio.Lock()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer after the delay, behind every request that came before."""
        while True:
            await self.read_body(reader)
            async with self.lock:
                await asyncio.sleep(self.delay)
            if self.chunked:
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n[[0\r\n4\r\n.0]]\r\n0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n[[0.0]]")
            await writer.drain()


@pytest.fixture(scope="module")
def server_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop on its own thread, for the loopback servers."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop

    async def finish() -> None:  # the handlers still waiting close their connections
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.01)

    asyncio.run_coroutine_threadsafe(finish(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _serve(loop: asyncio.AbstractEventLoop, server: SlowServer) -> Iterator[str]:
    yield asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)


@pytest.fixture(scope="module")
def slow_server(server_loop: asyncio.AbstractEventLoop) -> Iterator[str]:
    """A :class:`SlowServer` of 20 ms a request, so 50 requests/s at most."""
    yield from _serve(server_loop, SlowServer(0.02))


def test_timeouts_and_chunked_answers(server_loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    for url in _serve(server_loop, SlowServer(0.0, chunked=True)):
        assert bench(tmp_path, url, "--num-texts", "20")["successful"] == 20
    for url in _serve(server_loop, SlowServer(1.0)):
        late = bench(tmp_path, url, "--num-texts", "4", "--timeout", "0.2", code=1)
        assert late["errors"] == {"transport: timeout": 4} and late["total_duration_secs"] < 0.9


def test_open_loop_latency_counts_the_queue(slow_server: str, tmp_path: Path) -> None:
    under = bench(tmp_path, slow_server, "--rate", "20", "--num-texts", "10")
    assert under["successful"] == 10 and under["latency_ms"]["max"] < 100  # below capacity: the service time
    # 60 requests due at 100/s on a server that answers 50/s: the last is due at 0.59 s but answered at about
    # 1.2 s. Timed from its send by a client (a closed loop), no request would take much over 20 ms x 4.
    over = bench(tmp_path, slow_server, "--rate", "100", "--num-texts", "60", "--progress")  # the bar too
    assert over["successful"] == 60 and over["rate"] == 100
    assert over["latency_ms"]["max"] > 400 and over["latency_ms"]["p50"] > 150
    assert over["total_duration_secs"] > 1.0  # the server's capacity, not the schedule, set the pace
