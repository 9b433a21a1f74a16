"""The gateway in front of a TEI-shaped server (JSON only, no token counts): caching, splitting and errors."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.gateway.tei_like_server import MAX_INPUT_CHARS, TeiLikeServer, vector
from tests.helpers import GatewayProcess, validate_schema

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tei() -> Iterator[TeiLikeServer]:
    with TeiLikeServer(max_client_batch_size=4) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(tei: TeiLikeServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    log_dir = tmp_path_factory.mktemp("gw-tei")
    g = GatewayProcess(["--upstream", f"tei={tei.url}", "--cache", "memory://"], log_dir, log_dir)
    g.start()
    yield g
    g.stop()


def _rows(response: httpx.Response) -> np.ndarray:
    return np.array(response.json(), dtype=np.float32)


def test_the_stand_in_is_tei_shaped(tei: TeiLikeServer) -> None:
    info = httpx.get(f"{tei.url}/info", timeout=30).json()
    validate_schema(info, "Info")
    binary = httpx.post(f"{tei.url}/embed", json={"inputs": "x"}, timeout=30,
                        headers={"accept": "application/x-embedfleet-embeddings"})
    assert binary.headers["content-type"] == "application/json" and binary.json() == [vector("x").tolist()]


def test_hits_are_byte_equal_behind_a_tei_server(gateway: GatewayProcess, tei: TeiLikeServer) -> None:
    body = {"inputs": ["tei one", "tei two", "tei one"]}
    calls = len(tei.batches)
    miss = gateway.post("/embed", body)
    assert miss.status_code == 200, miss.text
    assert miss.headers["x-cache"] == "miss" and miss.headers["x-cache-misses"] == "2"
    assert tei.batches[calls:] == [["tei one", "tei two"]]  # duplicates computed once
    assert "application/x-embedfleet-embeddings" in tei.accepts[-1]  # asked for, answered with JSON anyway
    assert np.array_equal(_rows(miss), np.stack([vector(t) for t in body["inputs"]]))
    hit = gateway.post("/embed", body)
    assert hit.headers["x-cache"] == "hit" and hit.content == miss.content
    assert len(tei.batches) == calls + 1  # the hit reached no upstream
    # No per-input token counts from TEI: usage counts 0, and the pool keeps 4 characters a token.
    openai = gateway.post("/v1/embeddings", {"input": ["tei one"], "model": "tei"})
    assert openai.headers["x-cache"] == "hit" and openai.json()["usage"]["prompt_tokens"] == 0
    assert gateway.metric("embedfleet_chars_per_token", model="tei") == 4.0


def test_a_batch_over_the_servers_limit_is_split_and_reassembled(gateway: GatewayProcess,
                                                                   tei: TeiLikeServer) -> None:
    # Lengths vary so that ordering the misses by length permutes them before they are cut into calls.
    texts = [f"split {i} " + "abc " * ((i * 7) % 11) for i in range(10)]
    calls = len(tei.batches)
    r = gateway.post("/embed", {"inputs": texts})
    assert r.status_code == 200, r.text
    sent = [batch for batch in tei.batches[calls:] if batch[0].startswith("split ")]
    assert len(sent) == 3 and all(len(batch) <= 4 for batch in sent)  # ceil(10 / 4) calls, each within 4
    assert sorted(t for batch in sent for t in batch) == sorted(texts)
    assert [t for batch in sent for t in batch] != texts  # the calls did not carry the client's order...
    assert np.array_equal(_rows(r), np.stack([vector(t) for t in texts]))  # ...and the answer does


def test_tei_errors_pass_through_with_their_type(gateway: GatewayProcess, tei: TeiLikeServer) -> None:
    texts = ["a fine text", "x" * (MAX_INPUT_CHARS + 1), "another fine text"]
    r = gateway.post("/embed", {"inputs": texts, "truncate": False})
    # TEI answers its Validation errors with 413; embedfleet gives that type its own status, 422.
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "Validation"
    assert "must have less than 64 tokens" in r.json()["error"]
    assert gateway.post("/embed", {"inputs": texts[:1]}).status_code == 200  # the replica was not ejected
