"""The embedding routes of a real worker process, checked against sentence-transformers and TEI's schemas."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedfleet.api import binary
from embedfleet.engine.backends.onnx_backend import CPU_BATCH_TOKENS
from embedfleet.engine.backends.openvino_backend import BATCH_TOKENS
from tests.helpers import WorkerProcess, validate_schema
from tests.worker import busy

pytestmark = pytest.mark.slow

TEXTS = ["The cat sits on the mat.", "Quarterly revenue grew by ten percent.", "x"]
TIMING_HEADERS = ("x-compute-type", "x-compute-time", "x-compute-characters", "x-compute-tokens", "x-total-time",
                  "x-tokenization-time", "x-queue-time", "x-inference-time")


@pytest.fixture(scope="module")
def st_model(default_path: Path) -> object:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_path), device="cpu")


def test_vectors_equal_the_reference(worker: WorkerProcess, st_model: object) -> None:
    r = worker.post("/embed", {"inputs": TEXTS})
    assert r.status_code == 200
    validate_schema(r.json(), "EmbedResponse")
    got = np.array(r.json(), dtype=np.float32)
    ref = st_model.encode(TEXTS, normalize_embeddings=True)  # type: ignore[attr-defined]
    assert got.shape == (3, 384)
    assert ((got * ref).sum(axis=1)).min() >= 0.9999
    for header in TIMING_HEADERS:
        assert header in r.headers
    assert int(r.headers["x-compute-tokens"]) == sum(len(st_model.tokenizer(t)["input_ids"]) for t in TEXTS)  # type: ignore[attr-defined]


def test_binary_form_has_the_same_floats_and_each_inputs_tokens(worker: WorkerProcess, st_model: object) -> None:
    body = {"inputs": TEXTS, "normalize": False, "dimensions": 100}
    as_json = worker.post("/embed", body)
    as_binary = worker.post("/embed", body, headers={"accept": binary.ACCEPT})
    assert as_binary.status_code == 200 and as_binary.headers["content-type"] == binary.MEDIA_TYPE
    vectors, tokens = binary.decode(as_binary.content)
    assert vectors.tobytes() == np.array(as_json.json(), dtype=np.float32).tobytes()
    assert tokens.tolist() == [len(st_model.tokenizer(t)["input_ids"]) for t in TEXTS]  # type: ignore[attr-defined]
    assert int(as_binary.headers["x-compute-tokens"]) == sum(tokens.tolist())
    # Errors stay TEI's JSON, whatever the client accepts.
    bad = worker.post("/embed", {"inputs": ""}, headers={"accept": binary.ACCEPT})
    assert bad.status_code == 400 and bad.json()["error_type"] == "Empty"


def test_single_string_and_paraphrase_closer_than_unrelated(worker: WorkerProcess) -> None:
    def emb(text: str) -> np.ndarray:
        r = worker.post("/embed", {"inputs": text})
        assert r.status_code == 200 and len(r.json()) == 1
        return np.array(r.json()[0])

    a = emb("How do I reset my password?")
    b = emb("What are the steps to change my password?")
    c = emb("The recipe needs two cups of flour.")
    assert a @ b > a @ c + 0.3


def test_normalize_on_and_off(worker: WorkerProcess, st_model: object) -> None:
    from sentence_transformers import SentenceTransformer

    raw = np.array(worker.post("/embed", {"inputs": TEXTS, "normalize": False}).json())
    unit = np.array(worker.post("/embed", {"inputs": TEXTS}).json())
    # all-MiniLM-L6-v2 ends with a Normalize module, which `normalize_embeddings=False` does not skip: the
    # unnormalised reference is the same pipeline without it (Transformer + mean Pooling).
    assert [type(m).__name__ for m in st_model] == ["Transformer", "Pooling", "Normalize"]  # type: ignore[attr-defined]
    pooled_only = SentenceTransformer(modules=[st_model[0], st_model[1]], device="cpu")  # type: ignore[index]
    ref = pooled_only.encode(TEXTS, normalize_embeddings=False)
    assert raw.shape == ref.shape == (3, 384)
    cos = (raw * ref).sum(axis=1) / (np.linalg.norm(raw, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.9999, cos
    assert np.allclose(raw, ref, rtol=0, atol=1e-5), np.abs(raw - ref).max()  # the lengths too, not only directions
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-2)
    assert np.allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, atol=1e-5)


def test_dimensions_cut_then_renormalise(worker: WorkerProcess) -> None:
    full = np.array(worker.post("/embed", {"inputs": TEXTS[0], "normalize": False}).json()[0])
    cut = np.array(worker.post("/embed", {"inputs": TEXTS[0], "dimensions": 64}).json()[0])
    assert cut.shape == (64,)
    assert np.allclose(cut, full[:64] / np.linalg.norm(full[:64]), atol=1e-5)


def test_truncation_left_right(worker: WorkerProcess) -> None:
    long_text = " ".join(f"token{i}" for i in range(400))
    r = worker.post("/embed", {"inputs": ["short", long_text], "truncate": False})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    assert r.json()["error"].endswith("(input 1)") and r.headers["x-error-input"] == "1"
    right = worker.post("/embed", {"inputs": long_text, "truncate": True})
    left = worker.post("/embed", {"inputs": long_text, "truncate": True, "truncation_direction": "Left"})
    assert right.status_code == left.status_code == 200
    assert int(right.headers["x-compute-tokens"]) == 256
    assert not np.allclose(right.json(), left.json())
    head = worker.post("/embed", {"inputs": long_text[: len(long_text) // 3], "truncate": True}).json()
    assert np.allclose(head, right.json(), atol=1e-5)  # right-truncation keeps the start


def test_prompt_name(start_worker: object, prompts_model: Path, st_model: object) -> None:
    w: WorkerProcess = start_worker("--model", str(prompts_model))  # type: ignore[operator]
    r = w.post("/embed", {"inputs": ["What is TEI?"], "prompt_name": "query"})
    assert r.status_code == 200
    ref = st_model.encode(["query: What is TEI?"], normalize_embeddings=True)  # type: ignore[attr-defined]
    assert float(np.array(r.json()[0]) @ ref[0]) >= 0.9999
    plain = np.array(w.post("/embed", {"inputs": ["What is TEI?"]}).json()[0])
    assert float(plain @ ref[0]) < 0.999
    bad = w.post("/embed", {"inputs": "x", "prompt_name": "nope"})
    assert bad.status_code == 422 and "Available prompts" in bad.json()["error"]


def test_token_id_inputs_equal_text(worker: WorkerProcess) -> None:
    ids = worker.post("/tokenize", {"inputs": "hello world"}).json()[0]
    validate_schema([ids], "TokenizeResponse")
    by_ids = worker.post("/embed", {"inputs": [t["id"] for t in ids]}).json()
    by_text = worker.post("/embed", {"inputs": "hello world"}).json()
    assert np.allclose(by_ids, by_text, atol=1e-6)
    assert worker.post("/decode", {"ids": [t["id"] for t in ids]}).json() == ["hello world"]


def test_embed_all_and_similarity(worker: WorkerProcess) -> None:
    r = worker.post("/embed_all", {"inputs": ["hello world", "a longer sentence here"]})
    assert r.status_code == 200
    validate_schema(r.json(), "EmbedAllResponse")
    assert [len(x) for x in r.json()] == [4, 6] and len(r.json()[0][0]) == 384
    s = worker.post("/similarity", {"inputs": {"source_sentence": "How do I reset my password?",
                                               "sentences": ["Steps to change a password", "Flour and sugar"]}})
    assert s.status_code == 200
    validate_schema(s.json(), "SimilarityResponse")
    assert s.json()[0] > s.json()[1]


def test_info_health_metrics_openapi(worker: WorkerProcess) -> None:
    info = worker.get("/info").json()
    validate_schema(info, "Info")
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert (info["max_input_length"], info["dimension"], info["max_client_batch_size"]) == (256, 384, 32)
    # The batch budget of the runtime the fp32 race picked on this machine (512 tokens for onnx on CPU).
    expected_tokens = {"onnx": CPU_BATCH_TOKENS, "openvino": BATCH_TOKENS["float32"]}[info["backend"]]
    assert (info["model_dtype"], info["quantization"]) == ("float32", None)
    assert (info["max_batch_tokens"], info["max_batch_requests"]) == (expected_tokens, 32)
    probes = worker.metric("te_batch_inference_success_total")
    assert worker.get("/health").status_code == 200
    assert worker.metric("te_batch_inference_success_total") == probes + 1  # idle: a real one-input inference
    before = worker.metric("te_request_count_total", method="embed")
    worker.post("/embed", {"inputs": "count me"})
    assert worker.metric("te_request_count_total", method="embed") == before + 1
    text = worker.get("/metrics").text
    for name in ("te_queue_size", "te_batch_next_size", "te_batch_next_tokens", "te_request_duration",
                 "te_embed_count_total"):
        assert name in text
    assert "/embed" in worker.get("/openapi.json").json()["paths"]
    assert worker.get("/docs").status_code == 200


def test_64_concurrent_mixed_requests_equal_sequential(worker: WorkerProcess) -> None:
    words = ["retrieval", "augmented", "generation", "needs", "fast", "embedding", "servers", "with", "caching"]
    bodies = [
        {"inputs": [" ".join(words[: 1 + (i * 5 + j) % len(words)] * (1 + (i + j) % 12)) for j in range(1 + i % 4)]}
        for i in range(64)
    ]
    sequential = [worker.post("/embed", b).json() for b in bodies]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=worker.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/embed", json=b) for b in bodies))

    concurrent = asyncio.run(fire())
    assert all(r.status_code == 200 for r in concurrent)
    for seq, conc in zip(sequential, concurrent, strict=True):
        a, b = np.array(seq), np.array(conc.json())
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 1e-4  # same rows; only float rounding of batch shapes differs
    assert worker.metric("te_batch_next_size_count") > 0


def test_health_answers_while_a_long_batch_runs(start_worker: object) -> None:
    """/health answers 200 while one long batch is in the inference thread (seen in /metrics), not after it."""
    w: WorkerProcess = start_worker(*busy.LONG_BATCH_ARGS)  # type: ignore[operator]

    async def attempt(client: httpx.AsyncClient) -> bool:
        before = await busy.progress(client)
        embed = asyncio.create_task(client.post("/embed", json=busy.long_body("h")))
        running = await busy.wait_for(client, lambda now: busy.batch_running(before, now), embed)
        if running is None:  # the whole batch ran between two polls: nothing was shown, try again
            assert (await embed).status_code == 200
            return False
        health = await client.get("/health")
        after_health = await busy.progress(client)
        r = await embed
        assert health.status_code == 200
        assert after_health.batches == before.batches, "/health answered only once the long batch had finished"
        assert r.status_code == 200 and np.array(r.json()).shape == (busy.LONG_INPUTS, 384)
        assert (await busy.progress(client)).batches == before.batches + 1  # it was one batch
        return True

    async def run() -> None:
        async with httpx.AsyncClient(base_url=w.url, timeout=120) as client:
            for _ in range(3):
                if await attempt(client):
                    return
        pytest.fail("the long batch was never seen running in /metrics")

    try:
        asyncio.run(run())
    finally:
        w.stop()  # its long batches hold memory; no later test needs it


def test_auto_truncate_is_the_default_and_can_be_turned_off(worker: WorkerProcess, start_worker: object) -> None:
    long_text = " ".join(f"token{i}" for i in range(400))
    r = worker.post("/embed", {"inputs": long_text})  # as current TEI: over-long inputs are cut by default
    assert r.status_code == 200 and int(r.headers["x-compute-tokens"]) == 256
    assert worker.get("/info").json()["auto_truncate"] is True
    refused = worker.post("/embed", {"inputs": long_text, "truncate": False})  # the request's own choice wins
    assert refused.status_code == 422 and refused.json()["error_type"] == "Validation"
    strict: WorkerProcess = start_worker("--no-auto-truncate")  # type: ignore[operator]
    assert strict.get("/info").json()["auto_truncate"] is False
    openai = strict.post("/v1/embeddings", {"input": ["fine", long_text]})
    assert openai.status_code == 422 and openai.json()["error_type"] == "Validation"
    assert "`input`" in openai.json()["message"] and "`inputs`" not in openai.json()["message"]
    assert strict.post("/embed", {"inputs": long_text, "truncate": True}).status_code == 200
