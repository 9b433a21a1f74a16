"""A replica that is slow because it is busy stays in its pool: a call that outlives its deadline is
answered 429 Overloaded when the replica still answers /health (not ejected, so one large valid request
cannot empty a pool), deadlines grow with the work a call carries, and the gateway answers 429 itself
beyond ``--max-concurrent-requests`` POSTs under way."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from tests.helpers import GatewayProcess

INFO = {"model_id": "slow-model", "model_sha": "1", "model_dtype": "float32", "max_client_batch_size": 32,
        "max_batch_tokens": 16384, "max_input_length": 512, "auto_truncate": True,
        "model_type": {"embedding": {"pooling": "mean"}}}


class SlowReplica(BaseHTTPRequestHandler):
    """TEI-shaped: /health and /info at once, /embed after :attr:`delay` seconds. Counts /embed calls."""

    delay: ClassVar[float] = 0.0
    embeds: ClassVar[list[float]] = []

    def do_GET(self) -> None:
        body = json.dumps(INFO).encode() if self.path == "/info" else b""
        self._answer(200, body)

    def do_POST(self) -> None:
        inputs = json.loads(self.rfile.read(int(self.headers["content-length"])))["inputs"]
        self.embeds.append(time.monotonic())
        time.sleep(self.delay)
        self._answer(200, json.dumps([[1.0, float(len(t))] for t in inputs]).encode())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_replica() -> Iterator[str]:
    SlowReplica.embeds = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowReplica)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_calls_deadline_grows_with_its_work() -> None:
    from embedfleet.gateway.upstream import MIN_TOKENS_PER_S, Upstream

    upstream = Upstream("http://127.0.0.1:9", timeout=60.0)
    assert upstream.deadline(0) == 60.0
    assert upstream.deadline(25_000) == 60.0 + 25_000 / MIN_TOKENS_PER_S


@pytest.mark.slow
def test_a_busy_replica_is_not_ejected(slow_replica: str, tmp_path: Path) -> None:
    SlowReplica.delay = 3.0
    g = GatewayProcess(["--upstream", slow_replica, "--cache", "memory://", "--upstream-timeout", "0.5"],
                       tmp_path, tmp_path).start()
    try:
        r = g.post("/embed", {"inputs": "a text the busy replica takes too long for"})
        assert r.status_code == 429 and r.json()["error_type"] == "Overloaded", r.text
        assert g.metric("embedfleet_upstream_ejections_total") == 0
        assert g.metric("embedfleet_upstream_healthy", upstream=slow_replica) == 1
        SlowReplica.delay = 0.0
        ok = g.post("/embed", {"inputs": "served once it has time again"})
        assert ok.status_code == 200 and ok.headers["x-cache"] == "miss"
    finally:
        g.stop()


@pytest.mark.slow
def test_the_gateway_answers_429_beyond_its_concurrency_limit(slow_replica: str, tmp_path: Path) -> None:
    SlowReplica.delay = 2.0
    g = GatewayProcess(["--upstream", slow_replica, "--cache", "memory://", "--max-concurrent-requests", "2"],
                       tmp_path, tmp_path).start()
    try:
        with ThreadPoolExecutor(4) as pool:
            held = [pool.submit(g.post, "/embed", {"inputs": f"held {i}"}) for i in range(2)]
            deadline = time.monotonic() + 30
            while len(SlowReplica.embeds) < 2:  # both are under way at the replica
                assert time.monotonic() < deadline
                time.sleep(0.05)
            extra = [httpx.post(f"{g.url}/embed", json={"inputs": f"extra {i}"}, timeout=30) for i in range(2)]
            for r in extra:
                assert r.status_code == 429 and r.json()["error_type"] == "Overloaded", r.text
            assert all(f.result().status_code == 200 for f in held)
        assert g.get("/health").status_code == 200  # GETs are never counted
        assert g.post("/embed", {"inputs": "after the burst"}).status_code == 200
    finally:
        g.stop()
