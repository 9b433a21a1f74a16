"""Bad input: each case has its status code and error type, in TEI's (or OpenAI's) schema; never a 500."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.helpers import WorkerProcess, validate_schema
from tests.worker import busy

pytestmark = pytest.mark.slow

LONG = " ".join(f"t{i}" for i in range(600))

CASES: list[tuple[str, str, Any, int, str]] = [
    ("empty list", "/embed", {"inputs": []}, 400, "Empty"),
    ("empty string", "/embed", {"inputs": ""}, 400, "Empty"),
    ("empty string in batch", "/embed", {"inputs": ["a", ""]}, 400, "Empty"),
    ("too many inputs", "/embed", {"inputs": ["a"] * 33}, 422, "Validation"),
    ("number instead of text", "/embed", {"inputs": 5}, 422, "Validation"),
    ("missing inputs", "/embed", {"normalize": True}, 422, "Validation"),
    ("normalize not bool", "/embed", {"inputs": "a", "normalize": "yes"}, 422, "Validation"),
    ("negative token id", "/embed", {"inputs": [-1, 5]}, 422, "Validation"),
    ("token id out of vocab", "/embed", {"inputs": [101, 999999, 102]}, 422, "Validation"),
    ("too long", "/embed", {"inputs": LONG, "truncate": False}, 422, "Validation"),
    ("bad truncation direction", "/embed", {"inputs": "a", "truncation_direction": "up"}, 422, "Validation"),
    ("dimensions zero", "/embed", {"inputs": "a", "dimensions": 0}, 422, "Validation"),
    ("dimensions too big", "/embed", {"inputs": "a", "dimensions": 385}, 422, "Validation"),
    ("prompt unknown", "/embed", {"inputs": "a", "prompt_name": "query"}, 422, "Validation"),
    ("rerank on embedder", "/rerank", {"query": "a", "texts": ["b"]}, 424, "Backend"),
    ("rerank empty texts", "/rerank", {"query": "a", "texts": []}, 400, "Empty"),
    ("sparse on embedder", "/embed_sparse", {"inputs": "a"}, 424, "Backend"),
    ("predict on embedder", "/predict", {"inputs": "a"}, 424, "Backend"),
    ("similarity empty", "/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, 400, "Empty"),
    ("tokenize wrong type", "/tokenize", {"inputs": {"a": 1}}, 422, "Validation"),
    ("decode empty batch", "/decode", {"ids": []}, 400, "Empty"),
]


@pytest.mark.parametrize("name,route,body,status,error_type", CASES, ids=[c[0] for c in CASES])
def test_bad_input(worker: WorkerProcess, name: str, route: str, body: Any, status: int, error_type: str) -> None:
    r = worker.post(route, body)
    assert r.status_code == status, r.text
    assert r.json()["error_type"] == error_type
    validate_schema(r.json(), "ErrorResponse")


RAW_CASES: list[tuple[str, bytes, dict[str, str], int]] = [
    ("malformed json", b'{"inputs": ', {"content-type": "application/json"}, 422),
    ("not an object", b"[1, 2", {"content-type": "application/json"}, 422),
    ("binary garbage", b"\xff\xfe\x00garbage", {"content-type": "application/json"}, 422),
    ("empty body", b"", {"content-type": "application/json"}, 422),
]


@pytest.mark.parametrize("name,body,headers,status", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_malformed_bodies(worker: WorkerProcess, name: str, body: bytes, headers: dict[str, str],
                          status: int) -> None:
    r = httpx.post(f"{worker.url}/embed", content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error_type"] == "Validation"
    validate_schema(r.json(), "ErrorResponse")


def test_body_over_limit_is_413(start_worker: object) -> None:
    w: WorkerProcess = start_worker("--payload-limit", "1000", "--max-concurrent-requests", "2")  # type: ignore[operator]
    big = {"inputs": "word " * 400}
    r = w.post("/embed", big)
    assert r.status_code == 413
    assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == "PayloadTooLarge"

    def chunks() -> Any:
        yield b'{"inputs": "'
        for _ in range(50):
            yield b"word " * 10
        yield b'"}'

    streamed = httpx.post(f"{w.url}/embed", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert streamed.status_code == 413
    assert streamed.json()["error_type"] == "PayloadTooLarge"
    openai = w.post("/v1/embeddings", {"input": "word " * 400})
    assert openai.status_code == 413
    assert openai.json()["code"] == 413 and openai.json()["error_type"] == "PayloadTooLarge"
    assert w.post("/embed", {"inputs": "small"}).status_code == 200


def test_overload_gives_429_and_the_worker_recovers(start_worker: object) -> None:
    """With 2 requests in flight (seen in /metrics) and a limit of 2, every further request gets 429 at once."""
    w: WorkerProcess = start_worker(*busy.LONG_BATCH_ARGS, "--max-concurrent-requests", "2")  # type: ignore[operator]

    async def attempt(client: httpx.AsyncClient) -> bool:
        holders = asyncio.gather(*(client.post("/embed", json=busy.long_body(tag)) for tag in ("a", "b")))
        full = await busy.wait_for(client, lambda now: now.in_flight == 2, holders)
        if full is None:  # both long requests were answered between two polls: try again
            assert [r.status_code for r in await holders] == [200, 200]
            return False
        burst = await asyncio.gather(*(client.post("/embed", json={"inputs": f"burst {i}"}) for i in range(4)))
        # Still 2 in flight once the burst is answered, and nothing else was sent: the holders were in flight
        # all along, so every burst request met a full worker.
        still_full = await busy.progress(client)
        held = await holders
        assert [r.status_code for r in burst] == [429] * 4, ([r.text for r in burst], still_full)
        assert still_full.in_flight == 2, "the long requests ended before the burst was answered"
        for r in burst:
            assert r.json()["error_type"] == "Overloaded"
            validate_schema(r.json(), "ErrorResponse")
        assert [r.status_code for r in held] == [200, 200]  # the admitted requests are unharmed
        assert all(len(r.json()) == busy.LONG_INPUTS for r in held)
        return True

    async def run() -> None:
        async with httpx.AsyncClient(base_url=w.url, timeout=120) as client:
            for _ in range(3):
                if await attempt(client):
                    break
            else:
                pytest.fail("the worker was never seen with 2 requests in flight")
            assert (await busy.progress(client)).in_flight == 0
            after = await client.post("/embed", json={"inputs": ["after the burst"] * 3})
            assert after.status_code == 200 and len(after.json()) == 3

    try:
        asyncio.run(run())
        assert w.metric("te_request_failure_total", err="overloaded") >= 4
    finally:
        w.stop()  # its long batches hold memory; no later test needs it


def test_openai_errors_use_openai_shape(worker: WorkerProcess) -> None:
    r = worker.post("/v1/embeddings", {"input": []})
    assert r.status_code == 400
    validate_schema(r.json(), "OpenAICompatErrorResponse")
    assert r.json()["code"] == 400 and r.json()["error_type"] == "Empty"
    r = worker.post("/v1/embeddings", {"input": "a", "encoding_format": "int8"})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"


def test_validation_messages_name_the_field(worker: WorkerProcess) -> None:
    msg = worker.post("/embed", {"inputs": 5}).json()["error"]
    assert msg.startswith("Json deserialize error: `inputs`")
    assert "`normalize`" in worker.post("/embed", {"inputs": "a", "normalize": "yes"}).json()["error"]


def test_unknown_route_and_method_have_their_own_types(worker: WorkerProcess) -> None:
    missing = worker.post("/nope", {})
    assert missing.status_code == 404 and missing.json()["error_type"] == "NotFound"
    wrong = worker.get("/embed")
    assert wrong.status_code == 405 and wrong.json()["error_type"] == "MethodNotAllowed"
    openai = worker.get("/v1/embeddings")
    assert openai.status_code == 405 and openai.json()["code"] == 405


def test_errors_name_the_input_at_fault(worker: WorkerProcess) -> None:
    r = worker.post("/embed", {"inputs": ["a", "b", ""]})
    assert r.status_code == 400 and r.json()["error_type"] == "Empty"
    assert r.json()["error"].endswith("(input 2)") and r.headers["x-error-input"] == "2"
    openai = worker.post("/v1/embeddings", {"input": ["a", ""]})
    assert openai.status_code == 400 and "`input`" in openai.json()["message"]


def test_worker_survives_all_bad_input(worker: WorkerProcess) -> None:
    assert worker.get("/health").status_code == 200
    assert worker.metric("te_request_failure_total") >= 1
    assert worker.post("/embed", {"inputs": "still fine"}).status_code == 200
