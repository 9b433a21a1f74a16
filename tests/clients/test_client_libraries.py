"""Real client libraries against a real worker and a real gateway in front of it.

Every library below is pointed at the worker's URL and at the gateway's, the way its own documentation says to
point it at TEI or at OpenAI, and must get the vectors that a direct ``POST /embed`` gets. Each result is checked
against that reference with cosine > 1 - 1e-5, which makes any two libraries agree with cosine > 0.9999 (the angles
add up at most). Nothing may try to reach the internet: :func:`no_internet` refuses and records any connection or
name lookup that is not to the loopback interface.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import GatewayProcess, WorkerProcess

pytestmark = pytest.mark.slow

TEXTS = ["hello world", "embedding servers for retrieval", "The quick brown fox jumps over the lazy dog."]
DIMENSION = 384  # all-MiniLM-L6-v2
MIN_COSINE = 1 - 1e-5
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


@pytest.fixture(scope="module")
def embed_worker(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One ``embedfleet worker --model default`` with its default settings (auto-truncate included)."""
    with WorkerProcess(["--model", "default"], data_dir, tmp_path_factory.mktemp("clients-worker-log")) as proc:
        yield proc


@pytest.fixture(scope="module")
def embed_gateway(embed_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One ``embedfleet gateway`` with an in-memory cache in front of :func:`embed_worker`."""
    log_dir = tmp_path_factory.mktemp("clients-gateway-log")
    with GatewayProcess(["--upstream", embed_worker.url, "--cache", "memory://"], log_dir, log_dir) as proc:
        yield proc


@pytest.fixture(scope="module", params=["worker", "gateway"])
def base_url(request: pytest.FixtureRequest) -> str:
    """The URL a client is pointed at: the worker's, then the gateway's."""
    proc: WorkerProcess = request.getfixturevalue(f"embed_{request.param}")
    return proc.url


@pytest.fixture(scope="module")
def reference(embed_worker: WorkerProcess) -> np.ndarray:
    """The vectors of :data:`TEXTS` from a direct ``POST /embed`` to the worker."""
    r = embed_worker.post("/embed", {"inputs": TEXTS})
    assert r.status_code == 200, r.text
    vectors = np.array(r.json(), dtype=np.float64)
    assert vectors.shape == (len(TEXTS), DIMENSION)
    return vectors


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse (and record) every connection and name lookup that is not to the loopback interface."""
    attempts: list[str] = []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(sock: socket.socket, address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in LOOPBACK:
            attempts.append(f"connect {address}")
            raise OSError(errno.ENETUNREACH, f"test: no internet ({address})")
        real_connect(sock, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name not in LOOPBACK:
            attempts.append(f"getaddrinfo {name}")
            raise socket.gaierror(socket.EAI_NONAME, f"test: no internet ({name})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert not attempts, f"a client tried to reach the internet: {attempts}"


@pytest.fixture
def hub_client_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let huggingface_hub's HTTP client send requests although HF_HUB_OFFLINE=1.

    huggingface_hub (1.x, 2.x) refuses every request made with its session while offline mode is on, one to an
    endpoint URL on localhost included (``OfflineModeIsEnabled``, before any connection). Offline mode stays on for
    everything else in this process; :func:`no_internet` still refuses anything that is not on loopback.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _unit(vectors: Any) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float64)
    unit: np.ndarray = array / np.linalg.norm(array, axis=-1, keepdims=True)
    return unit


def assert_same_vectors(got: Any, expected: np.ndarray, *, normalised: bool = True) -> None:
    """Same shape, unit length (when ``normalised``) and cosine > :data:`MIN_COSINE` row by row."""
    array = np.asarray(got, dtype=np.float64)
    assert array.shape == expected.shape, (array.shape, expected.shape)
    if normalised:
        norms = np.linalg.norm(array, axis=-1)
        assert np.allclose(norms, 1.0, atol=1e-3), norms
    cosines = (_unit(array) * _unit(expected)).sum(axis=-1)
    assert cosines.min() > MIN_COSINE, cosines


def _long_text(words: int = 5000) -> str:
    return " ".join(f"word{i % 97} retrieval" if i % 5 == 0 else f"w{i % 31}" for i in range(words))


# --- the servers themselves --------------------------------------------------------------------------------------


def test_gateway_embed_matches_worker(embed_gateway: GatewayProcess, reference: np.ndarray) -> None:
    r = embed_gateway.post("/embed", {"inputs": TEXTS})
    assert r.status_code == 200, r.text
    assert_same_vectors(r.json(), reference)


def test_base_url_routes(base_url: str, reference: np.ndarray) -> None:
    """TEI's routes on the base URL, which clients pointed at "the endpoint" use: GET / and /ping, POST / and
    /invocations (the model's task route: /embed for an embedder)."""
    import httpx

    with httpx.Client(base_url=base_url, timeout=60) as client:
        for route in ("/", "/ping", "/health"):
            r = client.get(route)
            assert r.status_code == 200, (f"GET {route}", r.status_code, r.text[:300])
        for route in ("/", "/invocations"):
            r = client.post(route, json={"inputs": TEXTS})
            assert r.status_code == 200, (f"POST {route}", r.status_code, r.text[:300])
            assert_same_vectors(r.json(), reference)


# --- openai ------------------------------------------------------------------------------------------------------


def test_openai_sync(base_url: str, reference: np.ndarray) -> None:
    from openai import OpenAI

    with OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as client:
        floats = client.embeddings.create(model="default", input=TEXTS, encoding_format="float")
        assert_same_vectors([d.embedding for d in floats.data], reference)
        raw = client.embeddings.create(model="default", input=TEXTS, encoding_format="base64")
        decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]  # type: ignore[arg-type]
        assert_same_vectors(decoded, reference)
        default = client.embeddings.create(model="default", input=TEXTS)  # the SDK asks for base64 and decodes it
        assert_same_vectors([d.embedding for d in default.data], reference)
        cut = client.embeddings.create(model="default", input=TEXTS, dimensions=128)
        assert [len(d.embedding) for d in cut.data] == [128] * len(TEXTS)
        assert_same_vectors([d.embedding for d in cut.data], reference[:, :128])  # cut, then normalised
        assert floats.usage.prompt_tokens > 0


def test_openai_async(base_url: str, reference: np.ndarray) -> None:
    from openai import AsyncOpenAI

    async def run() -> tuple[list[list[float]], list[list[float]]]:
        async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as client:
            full, cut = await asyncio.gather(
                client.embeddings.create(model="default", input=TEXTS),
                client.embeddings.create(model="default", input=TEXTS, dimensions=64, encoding_format="float"))
            return [d.embedding for d in full.data], [d.embedding for d in cut.data]

    full, cut = asyncio.run(run())
    assert_same_vectors(full, reference)
    assert [len(v) for v in cut] == [64] * len(TEXTS)
    assert_same_vectors(cut, reference[:, :64])


def test_openai_over_long_input_is_truncated(base_url: str, embed_worker: WorkerProcess) -> None:
    """A 5000-word input is embedded (cut at the model's maximum length), not refused: auto-truncate is on by
    default, as in current TEI."""
    from openai import OpenAI

    text = _long_text()
    max_length = embed_worker.get("/info").json()["max_input_length"]
    with OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as client:
        result = client.embeddings.create(model="default", input=[text, TEXTS[0]], encoding_format="float")
    assert [len(d.embedding) for d in result.data] == [DIMENSION, DIMENSION]
    assert 0 < result.usage.prompt_tokens <= max_length + 16
    explicit = embed_worker.post("/embed", {"inputs": [text], "truncate": True})
    assert explicit.status_code == 200, explicit.text
    assert_same_vectors([result.data[0].embedding], np.array(explicit.json(), dtype=np.float64))


# --- huggingface_hub ---------------------------------------------------------------------------------------------


def test_huggingface_hub_offline_mode_blocks_endpoint_urls(base_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With HF_HUB_OFFLINE=1 the InferenceClient refuses to call even a local endpoint URL: a client process must run
    without it (the servers themselves keep it)."""
    from huggingface_hub import InferenceClient, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineModeIsEnabled):
        InferenceClient(model=base_url).feature_extraction(TEXTS[0])


@pytest.mark.usefixtures("hub_client_online")
def test_huggingface_hub_feature_extraction_sync(base_url: str, reference: np.ndarray) -> None:
    """``InferenceClient(model=URL)`` POSTs ``{"inputs": text, ...}`` to the URL itself, i.e. ``POST /``."""
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=base_url)
    rows = [client.feature_extraction(text) for text in TEXTS]
    assert all(row.shape == (1, DIMENSION) for row in rows), [row.shape for row in rows]
    assert_same_vectors(np.concatenate(rows), reference)
    cut = client.feature_extraction(TEXTS[1], dimensions=128, truncate=True)  # parameters go at the root, as TEI's
    assert cut.shape == (1, 128)
    assert_same_vectors(cut, reference[1:2, :128])


@pytest.mark.usefixtures("hub_client_online")
def test_huggingface_hub_feature_extraction_async(base_url: str, reference: np.ndarray) -> None:
    from huggingface_hub import AsyncInferenceClient

    async def run() -> list[np.ndarray]:
        async with AsyncInferenceClient(model=base_url) as client:
            return list(await asyncio.gather(*(client.feature_extraction(text) for text in TEXTS)))

    assert_same_vectors(np.concatenate(asyncio.run(run())), reference)


@pytest.mark.usefixtures("hub_client_online")
def test_huggingface_hub_sentence_similarity(base_url: str, reference: np.ndarray) -> None:
    """``sentence_similarity`` posts ``{"inputs": {"source_sentence", "sentences"}, "parameters": {}}`` to the URL
    it is given. TEI serves that body on ``/similarity`` (on ``POST /`` only when started with
    TASK=sentence-similarity), so the client is pointed at ``URL/similarity``."""
    from huggingface_hub import InferenceClient

    scores = InferenceClient(model=f"{base_url}/similarity").sentence_similarity(TEXTS[0], TEXTS[1:])
    expected = _unit(reference[1:]) @ _unit(reference[0])
    assert np.allclose(scores, expected, atol=1e-4), (scores, expected)


@pytest.mark.usefixtures("hub_client_online")
def test_huggingface_hub_sentence_similarity_on_base_url_is_an_embed_request(base_url: str) -> None:
    """On the base URL the similarity body reaches the embedder's task route (``POST /`` = /embed), which refuses
    it with 422 as TEI does: ``sentence_similarity`` does not apply to a TEI embedder's base URL."""
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as caught:
        InferenceClient(model=base_url).sentence_similarity(TEXTS[0], TEXTS[1:])
    assert caught.value.response is not None and caught.value.response.status_code == 422


@pytest.mark.usefixtures("hub_client_online")
def test_huggingface_hub_health_and_info(base_url: str) -> None:
    from huggingface_hub import InferenceClient

    # Both methods refuse to run unless the provider is named: the default (None) raises ValueError.
    client = InferenceClient(model=base_url, provider="hf-inference")
    assert client.health_check() is True
    info = client.get_endpoint_info()
    assert info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["max_client_batch_size"] > 0


# --- llama-index ---------------------------------------------------------------------------------------------------


def _llama_index(base_url: str) -> Any:
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    # model_name only picks client-side instruction prefixes (for BGE and Instructor models); none for MiniLM.
    return TextEmbeddingsInference(base_url=base_url, model_name="sentence-transformers/all-MiniLM-L6-v2",
                                   embed_batch_size=2)


def test_llama_index_sync(base_url: str, reference: np.ndarray) -> None:
    embedder = _llama_index(base_url)
    assert_same_vectors([embedder.get_text_embedding(TEXTS[0])], reference[:1])
    assert_same_vectors(embedder.get_text_embedding_batch(TEXTS), reference)  # two requests: batches of 2 and 1
    assert_same_vectors([embedder.get_query_embedding(TEXTS[2])], reference[2:])


def test_llama_index_async(base_url: str, reference: np.ndarray) -> None:
    embedder = _llama_index(base_url)

    async def run() -> tuple[list[float], list[list[float]]]:
        return await embedder.aget_text_embedding(TEXTS[1]), await embedder.aget_text_embedding_batch(TEXTS)

    one, batch = asyncio.run(run())
    assert_same_vectors([one], reference[1:2])
    assert_same_vectors(batch, reference)


# --- langchain-openai ----------------------------------------------------------------------------------------------


def _langchain(base_url: str, **kwargs: Any) -> Any:
    from langchain_openai import OpenAIEmbeddings

    options: dict[str, Any] = {"check_embedding_ctx_length": False, "max_retries": 0, **kwargs}
    return OpenAIEmbeddings(base_url=f"{base_url}/v1", api_key="x", model="default", **options)  # type: ignore[arg-type]


def test_langchain_openai_sync(base_url: str, reference: np.ndarray) -> None:
    embedder = _langchain(base_url)
    assert_same_vectors(embedder.embed_documents(TEXTS), reference)
    assert_same_vectors([embedder.embed_query(TEXTS[0])], reference[:1])
    cut = _langchain(base_url, dimensions=96).embed_documents(TEXTS)
    assert_same_vectors(cut, reference[:, :96])


def test_langchain_openai_async(base_url: str, reference: np.ndarray) -> None:
    embedder = _langchain(base_url)

    async def run() -> tuple[list[list[float]], list[float]]:
        return await embedder.aembed_documents(TEXTS), await embedder.aembed_query(TEXTS[2])

    documents, query = asyncio.run(run())
    assert_same_vectors(documents, reference)
    assert_same_vectors([query], reference[2:])


def test_langchain_openai_default_sends_tiktoken_ids(base_url: str, reference: np.ndarray,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default ``check_embedding_ctx_length=True`` langchain-openai tokenizes with tiktoken (whose
    ``cl100k_base`` file it would download) and sends the token ids, not the text. Ids of another vocabulary mean
    nothing to this model: the request succeeds and the vectors are wrong. A stand-in byte-level encoding replaces
    the downloaded one so that this runs offline; cl100k ids would be as meaningless."""
    import tiktoken

    byte_level = tiktoken.Encoding(name="test-bytes", pat_str=r"\S+|\s+",
                                   mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={})
    sent: list[Any] = []

    def get_encoding(name: str) -> tiktoken.Encoding:
        sent.append(name)
        return byte_level

    def encoding_for_model(name: str) -> tiktoken.Encoding:
        raise KeyError(name)  # what tiktoken does for a model name it does not know, such as "default"

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    monkeypatch.setattr(tiktoken, "encoding_for_model", encoding_for_model)
    vectors = np.asarray(_langchain(base_url, check_embedding_ctx_length=True).embed_documents(TEXTS))
    assert sent == ["cl100k_base"]
    assert vectors.shape == reference.shape
    cosines = (_unit(vectors) * _unit(reference)).sum(axis=-1)
    assert cosines.max() < 0.9, cosines  # the model embedded byte ids as if they were its own word pieces


# --- haystack ------------------------------------------------------------------------------------------------------


def _documents(texts: Sequence[str]) -> list[Any]:
    from haystack import Document

    return [Document(content=text) for text in texts]


def _document_vectors(result: dict[str, Any]) -> list[list[float]]:
    return [doc.embedding for doc in result["documents"]]


def _haystack_hf(base_url: str) -> tuple[Any, Any]:
    from haystack_integrations.components.embedders.huggingface_api import (
        HuggingFaceAPIDocumentEmbedder,
        HuggingFaceAPITextEmbedder,
    )

    # normalize defaults to False in these components (TEI's own default is true).
    options: dict[str, Any] = {"api_type": "text_embeddings_inference", "api_params": {"url": base_url},
                               "token": None, "normalize": True}
    return (HuggingFaceAPITextEmbedder(**options),
            HuggingFaceAPIDocumentEmbedder(**options, batch_size=2, progress_bar=False))


def _haystack_openai(base_url: str) -> tuple[Any, Any]:
    from haystack.components.embedders import OpenAIDocumentEmbedder, OpenAITextEmbedder
    from haystack.utils import Secret

    options: dict[str, Any] = {"api_base_url": f"{base_url}/v1", "api_key": Secret.from_token("x"),
                               "model": "default", "max_retries": 0}
    return (OpenAITextEmbedder(**options),
            OpenAIDocumentEmbedder(**options, batch_size=2, progress_bar=False, raise_on_failure=True))


HAYSTACK = {"huggingface-api": _haystack_hf, "openai": _haystack_openai}


@pytest.mark.parametrize("kind", HAYSTACK)
@pytest.mark.usefixtures("hub_client_online")
def test_haystack_sync(kind: str, base_url: str, reference: np.ndarray) -> None:
    make: Callable[[str], tuple[Any, Any]] = HAYSTACK[kind]
    text_embedder, document_embedder = make(base_url)
    assert_same_vectors([text_embedder.run(text=TEXTS[0])["embedding"]], reference[:1])
    assert_same_vectors(_document_vectors(document_embedder.run(documents=_documents(TEXTS))), reference)


@pytest.mark.parametrize("kind", HAYSTACK)
@pytest.mark.usefixtures("hub_client_online")
def test_haystack_async(kind: str, base_url: str, reference: np.ndarray) -> None:
    make: Callable[[str], tuple[Any, Any]] = HAYSTACK[kind]
    text_embedder, document_embedder = make(base_url)

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        text = await text_embedder.run_async(text=TEXTS[1])
        documents = await document_embedder.run_async(documents=_documents(TEXTS))
        return text, documents

    text, documents = asyncio.run(run())
    assert_same_vectors([text["embedding"]], reference[1:2])
    assert_same_vectors(_document_vectors(documents), reference)
