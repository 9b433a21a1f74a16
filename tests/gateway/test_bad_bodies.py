"""Hostile or odd request bodies get a 4xx in the documented shape from the gateway, never a 500: deeply
nested JSON on the forwarded routes, integers beyond 64 bits (which could not be serialised again for
the upstream), with or without the fast path. Upstream URLs never show their credentials."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from embedfleet.cache.memory import MemoryStore
from embedfleet.cache.tiered import TieredCache
from embedfleet.gateway.metrics import GatewayCollector
from embedfleet.gateway.router import ModelRouter
from embedfleet.gateway.service import EmbeddingService
from embedfleet.gateway.upstream import Pool, describe, redact
from tests.helpers import GatewayProcess, WorkerProcess

DEEP = b"[" * 5000 + b"]" * 5000
HUGE = b"123456789012345678901234567890"


@pytest.fixture(scope="module")
def gateway(start_worker: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    worker: WorkerProcess = start_worker()  # type: ignore[operator]
    log_dir = tmp_path_factory.mktemp("bad-bodies")
    g = GatewayProcess(["--upstream", worker.url, "--cache", "memory://"], log_dir, log_dir).start()
    yield g
    g.stop()


def _post(g: GatewayProcess, route: str, body: bytes, json: bool = True) -> httpx.Response:
    headers = {"content-type": "application/json"} if json else {}
    return httpx.post(f"{g.url}{route}", content=body, headers=headers, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["/rerank", "/tokenize", "/embed_sparse", "/predict", "/embed", "/"])
def test_deeply_nested_json_is_a_422(gateway: GatewayProcess, route: str) -> None:
    r = _post(gateway, route, b'{"inputs": ' + DEEP + b', "query": "q", "texts": ["t"]}')
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "Validation"


@pytest.mark.slow
@pytest.mark.parametrize("json", [True, False], ids=["fast path", "FastAPI"])
def test_integers_beyond_64_bits_are_a_422(gateway: GatewayProcess, json: bool) -> None:
    for body in (b'{"inputs": "a", "dimensions": ' + HUGE + b"}", b'{"inputs": [' + HUGE + b"]}",
                 b'{"input": "a", "dimensions": ' + HUGE + b"}"):
        route = "/v1/embeddings" if body.startswith(b'{"input"') else "/embed"
        r = _post(gateway, route, body, json)
        assert r.status_code == 422, (body[:40], r.text)
    r = _post(gateway, "/tokenize", b'{"inputs": "a", "add_special_tokens": ' + HUGE + b"}")
    assert r.status_code == 422, r.text
    assert gateway.get("/health").status_code == 200
    assert "Traceback" not in gateway.log()


def test_upstream_credentials_never_show() -> None:
    assert redact("http://user:secret@10.0.0.1:8080/base") == "http://***@10.0.0.1:8080/base"
    assert redact("https://host:8443") == "https://host:8443"
    cache = TieredCache(MemoryStore(1 << 20), None)
    pool = Pool("m", ["http://user:secret@127.0.0.1:9"], health_interval=None)
    collector = GatewayCollector(ModelRouter({"m": EmbeddingService(pool, cache, 32)}), cache)
    labels = [s.labels for family in collector.collect() for s in family.samples]
    assert any("upstream" in lab for lab in labels)
    assert not any("secret" in str(lab) for lab in labels)


def test_an_ejection_reason_is_never_empty() -> None:
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ValueError("bad body")) == "ValueError: bad body"


def test_a_worker_model_that_reads_as_an_option_is_refused() -> None:
    from pydantic import ValidationError

    from embedfleet.fleet.spec import InstanceRequest, InstanceSpec

    for bad in ("--port=1", "-x", "a/../b", "/models/../etc", "two words"):
        with pytest.raises(ValidationError):
            InstanceSpec(name="w", model=bad)
    for good in ("default", "BAAI/bge-small-en-v1.5", "/srv/models/minilm"):
        assert InstanceRequest(name="w", model=good).model == good
    assert Path("/srv/models/minilm").is_absolute()


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(status[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


@pytest.mark.slow
def test_token_ids_beyond_a_full_batch_of_the_longest_inputs_are_a_422(gateway: GatewayProcess) -> None:
    info = gateway.get("/info").json()
    limit = info["max_client_batch_size"] * info["max_input_length"]
    too_many = b"[" + b",".join([b"1"] * (limit + 1)) + b"]"
    for route, body in (("/embed", b'{"inputs": ' + too_many + b"}"),
                        ("/v1/embeddings", b'{"input": [' + too_many + b"]}"),
                        ("/embed_all", b'{"inputs": ' + too_many + b"}"),
                        ("/decode", b'{"ids": ' + too_many + b"}")):
        r = _post(gateway, route, body)
        assert r.status_code == 422, (route, r.text)
        assert r.json()["error_type"] == "Validation"
        assert f"> maximum allowed {limit}" in r.text, r.text
    assert _post(gateway, "/embed", b'{"inputs": [[101, 7592, 102]]}').status_code == 200


@pytest.mark.slow
def test_a_large_forwarded_answer_is_streamed_not_held(gateway: GatewayProcess) -> None:
    assert gateway.proc is not None
    texts = [("lorem ipsum dolor sit amet " * 80)[:2000] for _ in range(32)]  # 64 KB asking for ~36 MB
    upstream = gateway.get("/info").json()["upstreams"][0]["url"]
    direct = httpx.post(f"{upstream}/embed_all", json={"inputs": texts}, timeout=300)
    assert direct.status_code == 200
    Path(f"/proc/{gateway.proc.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _memory(gateway.proc.pid)
    r = httpx.post(f"{gateway.url}/embed_all", json={"inputs": texts}, timeout=300)
    peak = _memory(gateway.proc.pid)["VmHWM"]
    assert r.status_code == 200 and r.content == direct.content
    assert "content-length" not in r.headers  # passed on as it came
    # Held whole, the answer cost ~7x its size (bytes, parsed floats, serialised again): 240 MiB here.
    assert peak - before["VmRSS"] < len(r.content) // 4, (peak - before["VmRSS"], len(r.content))
    # A small answer is still read whole, checked, and sent with its length; errors keep their shape.
    small = _post(gateway, "/embed_all", b'{"inputs": ["a"]}')
    assert small.status_code == 200 and "content-length" in small.headers
    bad = _post(gateway, "/embed_all", b'{"inputs": ""}')
    assert bad.status_code in (400, 422) and "error_type" in bad.json()
