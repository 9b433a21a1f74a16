"""The official `openai` client against the worker."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.helpers import WorkerProcess, validate_schema

pytestmark = pytest.mark.slow


def test_openai_client_float_and_base64(worker: WorkerProcess) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0)
    texts = ["hello world", "embedding servers"]
    floats = client.embeddings.create(model="default", input=texts, encoding_format="float")
    b64 = client.embeddings.create(model="default", input=texts, encoding_format="base64")
    tei = np.array(worker.post("/embed", {"inputs": texts}).json())
    assert [d.index for d in floats.data] == [0, 1]
    assert np.allclose([d.embedding for d in floats.data], tei, atol=1e-6)
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in b64.data]  # type: ignore[arg-type]
    assert np.allclose(decoded, tei, atol=1e-6)
    # Without encoding_format the client asks for base64 itself and decodes it.
    default = client.embeddings.create(model="default", input=texts)
    assert np.allclose([d.embedding for d in default.data], tei, atol=1e-6)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    assert floats.model == "sentence-transformers/all-MiniLM-L6-v2"
    cut = client.embeddings.create(model="default", input="hello world", dimensions=128)
    assert len(cut.data[0].embedding) == 128


def test_raw_openai_response_schema_and_token_input(worker: WorkerProcess) -> None:
    r = worker.post("/v1/embeddings", {"input": [[101, 7592, 2088, 102]], "model": "x"})
    assert r.status_code == 200
    validate_schema(r.json(), "OpenAICompatResponse")
    assert r.json()["object"] == "list" and r.json()["data"][0]["object"] == "embedding"
    models = worker.get("/v1/models").json()
    assert models["data"][0]["id"] == "sentence-transformers/all-MiniLM-L6-v2"
