"""The gateway in front of real workers: cache correctness, single-flight, splitting, failover."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.gateway.support import gateway_key, metric_value, wait_for, wait_until_stored
from tests.helpers import GatewayProcess, WorkerProcess

pytestmark = pytest.mark.slow

ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def workers(start_worker: object) -> list[WorkerProcess]:
    return [start_worker("--max-client-batch-size", "32") for _ in range(2)]  # type: ignore[operator]


def _gateway(workers: list[WorkerProcess], cache: str, log_dir: Path, *extra: str) -> GatewayProcess:
    args = [a for w in workers for a in ("--upstream", w.url)] + ["--cache", cache, *extra]
    return GatewayProcess(args, log_dir, log_dir).start()


@pytest.fixture(scope="module")
def lmdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-lmdb") / "cache"


@pytest.fixture(scope="module")
def gateway(workers: list[WorkerProcess], lmdb_path: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GatewayProcess]:
    g = _gateway(workers, f"lmdb://{lmdb_path}", tmp_path_factory.mktemp("gw-log"), "--admin-key", ADMIN)
    yield g
    g.stop()


def _computed(workers: list[WorkerProcess]) -> float:
    """Inputs the workers have embedded, read from their own metrics."""
    return sum(w.metric("te_embed_count_total") for w in workers)


def test_hit_is_byte_equal_to_miss(gateway: GatewayProcess, workers: list[WorkerProcess]) -> None:
    body = {"inputs": ["the first text", "the second text", "the first text"]}
    before = _computed(workers)
    miss = gateway.post("/embed", body)
    assert miss.status_code == 200 and miss.headers["x-cache"] == "miss"
    assert miss.headers["x-cache-misses"] == "2"  # duplicates inside a request are computed once
    assert _computed(workers) == before + 2
    hit = gateway.post("/embed", body)
    assert hit.headers["x-cache"] == "hit" and hit.content == miss.content
    assert _computed(workers) == before + 2
    direct = workers[0].post("/embed", body)
    assert np.array_equal(np.array(direct.json(), dtype=np.float32), np.array(hit.json(), dtype=np.float32))
    assert "access-control-allow-origin" not in gateway.post("/embed", body, headers={"origin": "https://x.example"}).headers
    partial = gateway.post("/embed", {"inputs": ["the first text", "a brand new text"]})
    assert partial.headers["x-cache"] == "partial"


def test_changed_parameters_never_hit(gateway: GatewayProcess) -> None:
    text = "parameters change the vector"
    base = gateway.post("/embed", {"inputs": text})
    assert base.headers["x-cache"] == "miss"
    for extra in ({"normalize": False}, {"dimensions": 64}, {"truncate": False}, {"truncation_direction": "left"}):
        r = gateway.post("/embed", {"inputs": text, **extra})
        assert r.status_code == 200 and r.headers["x-cache"] == "miss", extra
    raw = gateway.post("/embed", {"inputs": text, "normalize": False})
    assert raw.headers["x-cache"] == "hit"
    assert not np.isclose(np.linalg.norm(raw.json()[0]), 1.0, atol=1e-3)  # unnormalised on a hit too
    assert np.isclose(np.linalg.norm(base.json()[0]), 1.0, atol=1e-5)


def test_one_computation_for_100_concurrent_requests(gateway: GatewayProcess, workers: list[WorkerProcess]) -> None:
    before = _computed(workers)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/embed", json={"inputs": "one brand new text, 100 times"})
                                          for _ in range(100)))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert len({r.content for r in responses}) == 1
    assert _computed(workers) == before + 1


def test_big_batches_are_split_across_replicas(gateway: GatewayProcess, workers: list[WorkerProcess]) -> None:
    texts = [f"split me {i}" for i in range(200)]  # the workers take 32 per request
    before = [w.metric("te_request_count_total", method="embed") for w in workers]
    r = gateway.post("/embed", {"inputs": texts})
    assert r.status_code == 200 and len(r.json()) == 200
    after = [w.metric("te_request_count_total", method="embed") for w in workers]
    assert sum(a - b for a, b in zip(after, before, strict=True)) == 7  # ceil(200 / 32)
    assert all(a > b for a, b in zip(after, before, strict=True))  # both replicas took a share
    direct = np.array(workers[0].post("/embed", {"inputs": texts[150:160]}).json(), dtype=np.float32)
    assert np.array_equal(np.array(r.json()[150:160], dtype=np.float32), direct)  # merged in input order
    assert gateway.post("/embed", {"inputs": ["x"] * 2049}).status_code == 422


def test_one_request_is_spread_over_idle_replicas(gateway: GatewayProcess, workers: list[WorkerProcess]) -> None:
    # One client, one batch: both replicas work on it. Lengths vary so that ordering by length permutes.
    texts = [f"spread {i} " + "word " * (24 + (i * 7) % 23) for i in range(32)]  # 16 of them: > 512 tokens
    before = [w.metric("te_embed_count_total", method="embed") for w in workers]
    calls = [w.metric("te_request_count_total", method="embed") for w in workers]
    r = gateway.post("/embed", {"inputs": texts})
    assert r.status_code == 200
    after = [w.metric("te_embed_count_total", method="embed") for w in workers]
    assert [a - b for a, b in zip(after, before, strict=True)] == [16, 16]
    # One call each: the workers' 512-token batch budget does not cut the request into more calls.
    new_calls = [w.metric("te_request_count_total", method="embed") - c for w, c in zip(workers, calls, strict=True)]
    assert new_calls == [1, 1]
    got = np.array(r.json(), dtype=np.float32)
    direct = np.array(workers[1].post("/embed", {"inputs": texts}).json(), dtype=np.float32)
    similarity = got @ direct.T
    assert np.array_equal(similarity.argmax(axis=1), np.arange(32))  # every row in its input's place
    assert np.diag(similarity).min() > 0.9999


def test_token_estimate_follows_the_workers_counts(gateway: GatewayProcess) -> None:
    # The gateway has no tokenizer: it learns characters per token from the counts workers answer.
    # Chinese takes one token a character here (English prose some 4 to 5), so sub-batches cut by the
    # estimate keep to the workers' token budget.
    hanzi = "汉字文本测试数据向量检索模型服务"
    for r in range(8):
        texts = [hanzi * 2 + f" {r} {i}" for i in range(32)]
        assert gateway.post("/embed", {"inputs": texts}).status_code == 200
    ratio = gateway.metric("embedfleet_chars_per_token")
    assert 0.9 < ratio < 1.5


def test_cache_control(gateway: GatewayProcess, workers: list[WorkerProcess]) -> None:
    text = {"inputs": "cache control text"}
    gateway.post("/embed", text)
    assert gateway.post("/embed", text).headers["x-cache"] == "hit"  # cached
    before = _computed(workers)
    fresh = gateway.post("/embed", text, headers={"cache-control": "no-cache"})
    assert fresh.headers["x-cache"] == "miss" and _computed(workers) == before + 1


def test_no_store_neither_reads_nor_writes(gateway: GatewayProcess, workers: list[WorkerProcess]) -> None:
    cached = {"inputs": "no-store: a text in the cache"}
    gateway.post("/embed", cached)
    assert gateway.post("/embed", cached).headers["x-cache"] == "hit"
    before = _computed(workers)
    ignored = gateway.post("/embed", cached, headers={"cache-control": "no-store"})
    assert ignored.status_code == 200 and ignored.headers["x-cache"] == "miss"  # not read...
    assert _computed(workers) == before + 1  # ...but computed by a worker
    new = {"inputs": "no-store: a text never stored"}
    assert gateway.post("/embed", new, headers={"cache-control": "No-Store"}).headers["x-cache"] == "miss"
    assert _computed(workers) == before + 2
    after = gateway.post("/embed", new)  # nothing was written: computed once more
    assert after.headers["x-cache"] == "miss" and _computed(workers) == before + 3


def test_upstream_errors_pass_through(gateway: GatewayProcess) -> None:
    too_long = gateway.post("/embed", {"inputs": " ".join(f"w{i}" for i in range(400)), "truncate": False})
    assert too_long.status_code == 422 and too_long.json()["error_type"] == "Validation"
    wrong_task = gateway.post("/rerank", {"query": "a", "texts": ["b"]})
    assert wrong_task.status_code == 424 and wrong_task.json()["error_type"] == "Backend"
    assert gateway.post("/embed", {"inputs": []}).status_code == 400
    tokens = gateway.post("/tokenize", {"inputs": "hello"})
    assert tokens.status_code == 200 and tokens.json()[0][1]["text"] == "hello"


def test_a_models_base_url_serves_its_task(gateway: GatewayProcess) -> None:
    direct = gateway.post("/embed", {"inputs": "base url text"}).json()
    for route in ("/models/default", "/models/default/", "/models/default/invocations"):
        r = gateway.post(route, {"inputs": "base url text"})
        assert r.status_code == 200 and r.json() == direct, route
    missing = gateway.post("/models/nobody", {"inputs": "x"})
    assert missing.status_code == 404 and missing.json()["error_type"] == "NotFound"


def test_errors_name_the_clients_input(gateway: GatewayProcess) -> None:
    # The gateway orders misses by length and cuts them into calls: the worker sees the long text first,
    # in its own batch, but the client must hear of its own position.
    long = " ".join(f"w{i}" for i in range(400))
    texts = ["short one", "another short text", long, "and a third"]
    r = gateway.post("/embed", {"inputs": texts, "truncate": False})
    assert r.status_code == 422 and r.json()["error"].endswith("(input 2)"), r.json()
    assert r.headers["x-error-input"] == "2"
    openai = gateway.post("/v1/embeddings", {"input": ["", "x"]})
    assert openai.status_code == 400 and "`input`" in openai.json()["message"]
    assert openai.json()["message"].endswith("(input 0)")


def test_openai_route_uses_the_cache(gateway: GatewayProcess) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    first = client.embeddings.create(model="default", input=["openai via gateway"])
    second = client.embeddings.with_raw_response.create(model="default", input=["openai via gateway"])
    assert second.headers["x-cache"] == "hit"
    assert second.parse().data[0].embedding == first.data[0].embedding


def test_openai_usage_counts_tokens_on_misses_and_hits(gateway: GatewayProcess, workers: list[WorkerProcess]) -> None:
    texts = ["usage counts one", "and a second, longer input for usage counts", "usage counts one"]
    direct = workers[0].post("/v1/embeddings", {"input": texts, "model": "default"}).json()["usage"]
    assert direct["prompt_tokens"] > 0
    miss = gateway.post("/v1/embeddings", {"input": texts, "model": "default"})
    hit = gateway.post("/v1/embeddings", {"input": texts, "model": "default"})
    assert miss.headers["x-cache"] == "miss" and hit.headers["x-cache"] == "hit"
    assert miss.json()["usage"] == hit.json()["usage"] == direct
    assert hit.content == miss.content  # the cache is invisible in the body


def test_restart_and_a_second_gateway_share_lmdb(gateway: GatewayProcess, workers: list[WorkerProcess],
                                                 lmdb_path: Path, tmp_path: Path) -> None:
    assert gateway.post("/embed", {"inputs": "persisted text"}).headers["x-cache"] == "miss"
    wait_until_stored(f"lmdb://{lmdb_path}", [gateway_key(gateway, "persisted text")])  # written behind
    before = _computed(workers)
    # Started after the first gateway wrote: the second one's memory tier is cold, and its very first
    # request must be answered from LMDB, with no worker asked.
    second = _gateway(workers, f"lmdb://{lmdb_path}", tmp_path)
    try:
        first = second.post("/embed", {"inputs": "persisted text"})
        assert first.status_code == 200 and first.headers["x-cache"] == "hit"
        assert second.metric("embedfleet_cache_lookups_total", result="store_hit") == 1
        assert second.metric("embedfleet_cache_lookups_total", result="memory_hit") == 0
        assert second.metric("embedfleet_upstream_inputs_total") == 0
        assert _computed(workers) == before
    finally:
        second.stop()
    gateway.stop()
    gateway.start()
    assert gateway.post("/embed", {"inputs": "persisted text"}).headers["x-cache"] == "hit"
    stats = gateway.get("/cache/stats").json()
    assert stats["store"]["entries"] >= 1
    assert gateway.metric("embedfleet_cache_store_seconds_count", op="read") >= 1
    gateway.post("/embed", {"inputs": "written after the restart"})
    wait_for(lambda: gateway.metric("embedfleet_cache_store_seconds_count", op="write") >= 1, "a write behind")
    assert gateway.request_delete() == 401  # admin routes need the admin key
    assert httpx.delete(f"{gateway.url}/cache", headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
    assert gateway.post("/embed", {"inputs": "persisted text"}).headers["x-cache"] == "miss"


def test_kill_a_worker_mid_load_loses_no_request(start_worker: object, tmp_path: Path) -> None:
    pair = [start_worker("--max-client-batch-size", "8") for _ in range(2)]  # type: ignore[operator]
    victim = pair[0]
    g = _gateway(pair, "memory://", tmp_path)
    try:
        async def victim_busy(client: httpx.AsyncClient) -> bool:
            """Calls to the victim are under way: the gateway counts them, and the victim is working on them."""
            gateway_side = metric_value((await client.get("/metrics")).text, "embedfleet_upstream_in_flight",
                                        upstream=victim.url)
            worker_side = metric_value((await client.get(f"{victim.url}/metrics")).text, "te_request_in_flight")
            return gateway_side > 0 and worker_side > 0

        async def load() -> list[int | str]:
            async with httpx.AsyncClient(base_url=g.url, timeout=120) as client:
                async def one(i: int) -> int | str:
                    texts = [f"load {i} {j} " + "some words " * 20 for j in range(16)]  # 2 calls of 8 each
                    try:
                        return (await client.post("/embed", json={"inputs": texts})).status_code
                    except httpx.HTTPError as exc:  # counted as an outcome too
                        return type(exc).__name__

                burst = [asyncio.create_task(one(i)) for i in range(40)]
                deadline = time.monotonic() + 60
                while not await victim_busy(client):
                    assert time.monotonic() < deadline and not all(t.done() for t in burst), "victim never busy"
                    await asyncio.sleep(0.05)
                victim.kill()  # SIGKILL with requests in flight on it
                return await asyncio.gather(*burst)

        codes = asyncio.run(load())
        assert Counter(codes) == {200: 40}  # every request's outcome: none failed
        assert g.metric("embedfleet_upstream_retries_total") >= 1  # the victim's calls went to the other one
        assert g.metric("embedfleet_upstream_healthy", upstream=victim.url) == 0
        assert g.get("/health").status_code == 200
        pair[1].kill()
        wait_for(lambda: g.get("/health").status_code == 503, "503 with no replica left")
        r = g.post("/embed", {"inputs": "nobody left"})
        assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy"
    finally:
        g.stop()


def test_api_keys_and_admin_key(workers: list[WorkerProcess], tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key\n\n")
    g = _gateway(workers, "memory://", tmp_path, "--api-key", "flag-key", "--api-key-file", str(key_file),
                 "--cors-origin", "https://app.example")
    try:
        assert g.get("/health").status_code == 200  # open, for load balancers
        denied = g.post("/embed", {"inputs": "a"})
        assert denied.status_code == 401 and denied.json()["error_type"] == "Unauthorized"
        assert g.post("/embed", {"inputs": "a"}, headers={"authorization": "Bearer wrong"}).status_code == 401
        for key in ("flag-key", "file-key"):
            assert g.post("/embed", {"inputs": "a"}, headers={"authorization": f"Bearer {key}"}).status_code == 200
        openai_denied = g.post("/v1/embeddings", {"input": "a"})
        assert openai_denied.status_code == 401 and openai_denied.json()["code"] == 401
        from openai import OpenAI

        client = OpenAI(base_url=f"{g.url}/v1", api_key="flag-key", max_retries=0)
        assert len(client.embeddings.create(model="default", input="a").data[0].embedding) == 384
        preflight = httpx.options(f"{g.url}/embed", headers={"origin": "https://app.example",
                                                             "access-control-request-method": "POST"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(f"{g.url}/embed", headers={"origin": "https://evil.example",
                                                         "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in other.headers
        assert httpx.options(f"{g.url}/embed").status_code == 401  # only real preflights go without a key
        off = httpx.delete(f"{g.url}/cache", headers={"authorization": "Bearer flag-key"})
        assert off.status_code == 403 and off.json()["error_type"] == "Forbidden"  # no --admin-key
    finally:
        g.stop()


FAST_PATH_CASES = [
    ("/embed", {"inputs": ["fast path one", "fast path two", "fast path one"]}, {}),
    ("/embed", {"inputs": "fast path one", "truncation_direction": "LEFT", "unknown_field": 1}, {}),
    ("/embed", {"inputs": ["fast path one"], "normalize": False, "dimensions": 8}, {}),
    ("/embed", {"inputs": [[101, 7592, 102], "fast path two"]}, {}),  # token ids: computed, never cached
    ("/embed", {"inputs": "fast path one"}, {"cache-control": "no-store"}),
    ("/models/default/embed", {"inputs": "fast path one"}, {}),
    ("/v1/embeddings", {"input": ["fast path one", "fast path two"], "model": "default"}, {}),
    ("/v1/embeddings", {"input": ["fast path one", "fast path two"], "encoding_format": "BASE64"}, {}),
    ("/embeddings", {"input": "fast path one", "encoding_format": "float", "dimensions": 16}, {}),
    # errors: every status and body as FastAPI's routes write them
    ("/embed", {"inputs": []}, {}),
    ("/embed", {"inputs": 5}, {}),
    ("/embed", {"inputs": "x", "normalize": "yes"}, {}),
    ("/embed", {"inputs": ["x"] * 2049}, {}),
    ("/embed", {"inputs": "fast path one"}, {"x-model": "nobody"}),
    ("/models/nobody/embed", {"inputs": "fast path one"}, {}),
    ("/v1/embeddings", {"input": []}, {}),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, {}),
    ("/v1/embeddings", {"inputs": "x"}, {}),
]


@pytest.mark.parametrize(("route", "body", "headers"), FAST_PATH_CASES)
def test_fast_path_answers_exactly_as_the_full_stack(gateway: GatewayProcess, route: str, body: object,
                                                     headers: dict[str, str]) -> None:
    # application/json takes the fast path; another JSON media type goes through FastAPI's route.
    import orjson

    content = orjson.dumps(body)
    gateway.post(route, body, headers=headers)  # the same cache state for both
    answers = [httpx.post(f"{gateway.url}{route}", content=content, timeout=60,
                          headers={**headers, "content-type": media_type})
               for media_type in ("application/json", "application/vnd.embedfleet-test+json")]
    fast, full = ({k: v for k, v in a.headers.items() if k != "date"} for a in answers)
    assert answers[0].status_code == answers[1].status_code
    assert answers[0].content == answers[1].content
    assert fast == full


def test_fast_path_hits_are_exact_floats_and_base64(gateway: GatewayProcess, workers: list[WorkerProcess]) -> None:
    import base64

    texts = [f"exact values {i}" for i in range(5)]
    direct = np.array(workers[0].post("/embed", {"inputs": texts}).json(), dtype=np.float32)
    for _ in range(3):  # a miss, a first hit, then hits served from the kept JSON and base64
        tei = gateway.post("/embed", {"inputs": texts})
        assert np.array_equal(np.array(tei.json(), dtype=np.float32), direct)
        b64 = gateway.post("/v1/embeddings", {"input": texts, "encoding_format": "base64"}).json()
        got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]])
        assert np.array_equal(got, direct) and [d["index"] for d in b64["data"]] == list(range(5))
        floats = gateway.post("/v1/embeddings", {"input": texts}).json()
        assert np.array_equal(np.array([d["embedding"] for d in floats["data"]], dtype=np.float32), direct)
    assert tei.headers["x-cache"] == "hit"


def test_fast_path_body_limit_and_media_types(workers: list[WorkerProcess], tmp_path: Path) -> None:
    g = _gateway(workers, "memory://", tmp_path, "--payload-limit", "1000")
    try:
        big = g.post("/embed", {"inputs": "x" * 2000})
        assert big.status_code == 413 and big.json()["error_type"] == "PayloadTooLarge"
        streamed = httpx.post(f"{g.url}/v1/embeddings", content=iter([b'{"input": "', b"x" * 2000, b'"}']),
                              headers={"content-type": "application/json"}, timeout=30)
        assert streamed.status_code == 413 and streamed.json()["code"] == 413
        assert streamed.json()["error_type"] == "PayloadTooLarge"
        for media_type in (None, "text/plain"):
            r = httpx.post(f"{g.url}/embed", content=b'{"inputs": "a"}', timeout=30,
                           headers={"content-type": media_type} if media_type else {})
            assert r.status_code == 422 and r.json()["error_type"] == "Validation"
        ok = httpx.post(f"{g.url}/embed", content=b'{"inputs": "a"}', timeout=30,
                        headers={"content-type": "Application/JSON; charset=utf-8"})
        assert ok.status_code == 200 and ok.headers["x-cache"] == "miss"
        assert g.metric("embedfleet_request_duration_seconds_count", route="/embed", status="413") == 1
        assert g.metric("embedfleet_request_duration_seconds_count", route="/embed", status="200") == 1
    finally:
        g.stop()
