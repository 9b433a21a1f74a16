"""The worker's HTTP API: text-embeddings-inference's routes plus OpenAI's /v1/embeddings.

The server listens at once and loads the model in a thread; until it is ready every inference
route answers 503 Unhealthy, as /health does. Handlers are plain functions of a request and the
:class:`WorkerState` (a FastAPI dependency): they validate, call the engine, and serialise with
orjson. Errors leave through the shared edge (``embedfleet.api.edge``).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request, Response

from embedfleet import __version__
from embedfleet.api import binary
from embedfleet.api.edge import MODEL_HEADER, Edge, batch, install_error_handlers, json_response, lifespan, parse_body
from embedfleet.api.schemas import (
    HEALTH,
    METRICS,
    OPENAI_ERRORS,
    TEI_ERRORS,
    DecodeRequest,
    EmbedAllRequest,
    EmbedRequest,
    EmbedSparseRequest,
    Info,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    Prediction,
    PredictRequest,
    Rank,
    RerankRequest,
    SimilarityRequest,
    SimpleToken,
    SparseValue,
    TokenizeRequest,
)
from embedfleet.cache.keys import ModelFingerprint
from embedfleet.engine import errors
from embedfleet.engine.errors import EngineError
from embedfleet.engine.infer import Engine, Stats
from embedfleet.engine.model import Task
from embedfleet.engine.tokenization import TruncationDirection

log = logging.getLogger("embedfleet.worker")
access_log = logging.getLogger("embedfleet.worker.access")

_TEI_ERRORS, _OPENAI_ERRORS = TEI_ERRORS, OPENAI_ERRORS


class WorkerState:
    """What the routes need: the engine once loaded, or why it is not."""

    def __init__(self, served_model_name: str | None, payload_limit: int) -> None:
        self.engine: Engine | None = None
        self.error: str | None = None
        self.served_model_name = served_model_name
        self.payload_limit = payload_limit
        self.compute_type = "cpu"
        self.exit_code = 0  # set when the worker must exit with an error once the server stops
        self.stop_server: Callable[[], None] | None = None  # asks the HTTP server to shut down
        self.model_tag = ""  # the fingerprint tag of the model, once loaded (see MODEL_HEADER)

    def loaded(self, engine: Engine) -> None:
        """The engine is ready: serve it."""
        self.model_tag = ModelFingerprint.from_info(info_body(self, engine)).tag.hex()
        self.engine = engine

    def ready(self) -> Engine:
        """The engine, or 503 while loading or after a failed load."""
        if self.engine is None:
            raise errors.unhealthy(self.error or "the model is still loading")
        return self.engine

    @property
    def model_name(self) -> str:
        """The name reported to clients."""
        if self.served_model_name:
            return self.served_model_name
        return self.engine.info.model_id if self.engine else "unknown"


async def worker_state(request: Request) -> WorkerState:
    """The state of the app serving the request (a dependency; async, so it runs on the event loop)."""
    state: WorkerState = request.app.state.worker
    return state


State = Annotated[WorkerState, Depends(worker_state)]
Work = Callable[[Engine, Stats], Awaitable[Any]]


def _timing_headers(state: WorkerState, stats: Stats) -> dict[str, str]:
    total = time.perf_counter() - stats.started

    def ms(seconds: float) -> str:
        return str(int(seconds * 1000))

    return {
        MODEL_HEADER: state.model_tag,
        "x-compute-type": state.compute_type,
        "x-compute-time": ms(total),
        "x-compute-characters": str(stats.characters),
        "x-compute-tokens": str(stats.tokens),
        "x-total-time": ms(total),
        "x-tokenization-time": ms(stats.tokenization_time),
        "x-queue-time": ms(stats.queue_time),
        "x-inference-time": ms(stats.inference_time),
    }


async def _answer(state: WorkerState, method: str, work: Work, as_binary: bool = False) -> Response:
    """Admit the request, run ``work`` on the engine, count it, and answer with TEI's timing headers."""
    engine = state.ready()
    stats = Stats()
    m = engine.metrics
    m.request_count.labels(method).inc()
    async with engine.admit():
        body = await work(engine, stats)
    m.request_success.labels(method).inc()
    m.request_duration.labels(method).observe(time.perf_counter() - stats.started)
    if as_binary:
        return Response(binary.encode(*body), media_type=binary.MEDIA_TYPE, headers=_timing_headers(state, stats))
    return json_response(body, headers=_timing_headers(state, stats))


router = APIRouter()


# ----- TEI routes -----

@router.post("/embed", response_model=list[list[float]], responses=_TEI_ERRORS, tags=["TEI"])
async def embed(req: EmbedRequest, request: Request, state: State) -> Response:
    """Pooled embeddings. With ``Accept: application/x-embedfleet-embeddings``, float32 bytes and each
    input's token count instead of JSON (what the gateway asks for)."""
    as_binary = binary.accepts(request.headers.get("accept"))

    async def work(engine: Engine, stats: Stats) -> Any:
        vectors = await engine.embed(batch(req.inputs), normalize=req.normalize, truncate=req.truncate,
                                     direction=req.truncation_direction, prompt_name=req.prompt_name,
                                     dimensions=req.dimensions, stats=stats)
        return (vectors, stats.lengths) if as_binary else vectors

    return await _answer(state, "embed", work, as_binary)


@router.post("/embed_all", response_model=list[list[list[float]]], responses=_TEI_ERRORS, tags=["TEI"])
async def embed_all(req: EmbedAllRequest, state: State) -> Response:
    """Token embeddings of every input."""

    async def work(engine: Engine, stats: Stats) -> Any:
        return await engine.embed_all(batch(req.inputs), truncate=req.truncate, direction=req.truncation_direction,
                                      prompt_name=req.prompt_name, stats=stats)

    return await _answer(state, "embed_all", work)


@router.post("/embed_sparse", response_model=list[list[SparseValue]], responses=_TEI_ERRORS, tags=["TEI"])
async def embed_sparse(req: EmbedSparseRequest, state: State) -> Response:
    """SPLADE sparse embeddings: the non-zero entries of each vector."""

    async def work(engine: Engine, stats: Stats) -> Any:
        out = await engine.embed_sparse(batch(req.inputs), truncate=req.truncate, direction=req.truncation_direction,
                                        prompt_name=req.prompt_name, stats=stats)
        return [[{"index": int(i), "value": float(v)} for i, v in zip(idx, val, strict=True)] for idx, val in out]

    return await _answer(state, "embed_sparse", work)


@router.post("/rerank", response_model=list[Rank], responses=_TEI_ERRORS, tags=["TEI"])
async def rerank(req: RerankRequest, state: State) -> Response:
    """Score texts against a query; results sorted by score, best first."""

    async def work(engine: Engine, stats: Stats) -> Any:
        scores = await engine.rerank(req.query, req.texts, raw_scores=req.raw_scores, truncate=req.truncate,
                                     direction=req.truncation_direction, stats=stats)
        ranks = []
        for i in np.argsort(-scores, kind="stable"):
            rank: dict[str, Any] = {"index": int(i), "score": float(scores[i])}
            if req.return_text:
                rank["text"] = req.texts[i]
            ranks.append(rank)
        return ranks

    return await _answer(state, "rerank", work)


@router.post("/predict", response_model=list[Prediction] | list[list[Prediction]], responses=_TEI_ERRORS,
             tags=["TEI"])
async def predict(req: PredictRequest, state: State) -> Response:
    """Class scores for a text, a pair, or a batch of texts and pairs."""
    inputs, single = predict_inputs(req.inputs)

    async def work(engine: Engine, stats: Stats) -> Any:
        scores = await engine.predict(inputs, raw_scores=req.raw_scores, truncate=req.truncate,
                                      direction=req.truncation_direction, stats=stats)
        labels = engine.info.id2label
        out = [[{"score": float(s[j]), "label": labels.get(int(j), f"LABEL_{j}")} for j in np.argsort(-s)]
               for s in scores]
        return out[0] if single else out

    return await _answer(state, "predict", work)


@router.post("/similarity", response_model=list[float], responses=_TEI_ERRORS, tags=["TEI"])
async def similarity(req: SimilarityRequest, state: State) -> Response:
    """Cosine similarity of each sentence to the source sentence."""
    params = req.parameters

    async def work(engine: Engine, stats: Stats) -> Any:
        return await engine.similarity(
            req.inputs.source_sentence, req.inputs.sentences, truncate=params.truncate if params else None,
            direction=params.truncation_direction if params else TruncationDirection.RIGHT,
            prompt_name=params.prompt_name if params else None, stats=stats)

    return await _answer(state, "similarity", work)


@router.post("/tokenize", response_model=list[list[SimpleToken]], responses=_TEI_ERRORS, tags=["TEI"])
async def tokenize(req: TokenizeRequest, state: State) -> Response:
    """Tokens of each input, with character offsets."""
    inputs = [req.inputs] if isinstance(req.inputs, str) else req.inputs

    async def work(engine: Engine, stats: Stats) -> Any:
        return await engine.tokenize(inputs, req.add_special_tokens, req.prompt_name)

    return await _answer(state, "tokenize", work)


@router.post("/decode", response_model=list[str], responses=_TEI_ERRORS, tags=["TEI"])
async def decode(req: DecodeRequest, state: State) -> Response:
    """Token ids back to text."""
    ids = [req.ids] if req.ids and isinstance(req.ids[0], int) else req.ids

    async def work(engine: Engine, stats: Stats) -> Any:
        return await engine.decode(ids, req.skip_special_tokens)  # type: ignore[arg-type]

    return await _answer(state, "decode", work)


@router.post("/", responses=_TEI_ERRORS, tags=["TEI"])
@router.post("/invocations", responses=_TEI_ERRORS, tags=["TEI"])
async def invocations(request: Request, state: State) -> Response:
    """The model's task route, as TEI serves it at ``/`` and ``/invocations`` (SageMaker): ``/embed`` for
    an embedder, ``/embed_sparse`` for SPLADE, ``/rerank`` for a reranker, ``/predict`` for a classifier."""
    task = state.ready().info.task
    if task is Task.SPARSE:
        return await embed_sparse(await parse_body(request, EmbedSparseRequest), state)
    if task is Task.RERANKER:
        return await rerank(await parse_body(request, RerankRequest), state)
    if task is Task.CLASSIFIER:
        return await predict(await parse_body(request, PredictRequest), state)
    return await embed(await parse_body(request, EmbedRequest), request, state)


# ----- OpenAI -----

@router.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, responses=_OPENAI_ERRORS, tags=["OpenAI"])
@router.post("/embeddings", response_model=OpenAIEmbeddingResponse, responses=_OPENAI_ERRORS,
             include_in_schema=False)
async def openai_embeddings(req: OpenAIEmbeddingRequest, state: State) -> Response:
    """OpenAI-compatible embeddings (float or base64 little-endian float32)."""

    async def work(engine: Engine, stats: Stats) -> Any:
        vectors = await engine.embed(batch(req.input), normalize=True, dimensions=req.dimensions, stats=stats)
        if req.encoding_format == "base64":
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()} for i, v in enumerate(vectors)]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": state.model_name,
                "usage": {"prompt_tokens": stats.tokens, "total_tokens": stats.tokens}}

    return await _answer(state, "openai", work)


@router.get("/v1/models", tags=["OpenAI"])
async def openai_models(state: State) -> Response:
    """The one model this worker serves."""
    state.ready()
    return json_response({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": 0, "owned_by": "embedfleet"}]})


# ----- operations -----

@router.get("/info", response_model=Info, tags=["TEI"])
async def info(state: State) -> Response:
    """Model and limits of this replica."""
    return json_response(info_body(state, state.ready()))


def info_body(state: WorkerState, engine: Engine) -> dict[str, Any]:
    """The /info document: TEI's fields, plus what a gateway needs to fingerprint the model (``task``,
    ``pooling``, ``model_dtype``: the precision it runs at) and to size its calls."""
    i = engine.info
    lim = engine.limits
    if i.task is Task.EMBEDDING or i.task is Task.SPARSE:
        model_type: dict[str, Any] = {"embedding": {"pooling": i.pooling.value if i.pooling else "mean"}}
    else:
        labels = {"id2label": {str(k): v for k, v in i.id2label.items()},
                  "label2id": {v: k for k, v in i.id2label.items()}}
        model_type = {i.task.value: labels}
    return {
        "model_id": i.model_id, "model_sha": i.sha, "model_dtype": engine.backend.dtype,
        "model_type": model_type, "served_model_name": state.model_name,
        "max_concurrent_requests": lim.max_concurrent_requests, "max_input_length": i.max_input_length,
        "max_batch_tokens": lim.max_batch_tokens, "max_batch_requests": lim.max_batch_requests,
        "max_client_batch_size": lim.max_client_batch_size, "auto_truncate": lim.auto_truncate,
        "tokenization_workers": lim.tokenization_workers, "version": __version__, "sha": None,
        "docker_label": None, "task": i.task.value, "pooling": i.pooling.value if i.pooling else None,
        "dimension": i.dimension, "backend": engine.backend.name, "device": engine.backend.device,
        "quantization": engine.backend.dtype if engine.backend.dtype == "int8" else None,
        "backend_selection": engine.backend.selection, "inference_streams": engine.batcher.streams,
        "revision": i.revision,
    }


@router.get("/health", **HEALTH, tags=["TEI"])
@router.get("/ping", include_in_schema=False)
@router.get("/", include_in_schema=False)
async def health(state: State) -> Response:
    """200 when the model is loaded and can run; 503 while loading or when inference fails."""
    await state.ready().check_health()
    return Response(status_code=200)


@router.get("/metrics", **METRICS, tags=["TEI"])
async def metrics(state: State) -> Response:
    """Prometheus metrics."""
    engine = state.engine
    body = engine.metrics.render() if engine else b""
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


def predict_inputs(value: str | list[str] | list[list[str]]) -> tuple[list[tuple[str, str | None]], bool]:
    """TEI's PredictInput: a text, a pair [a, b], or a batch of [text] and [a, b]. Returns (batch, single)."""
    if isinstance(value, str):
        return [(value, None)], True
    if value and all(isinstance(v, str) for v in value):
        if len(value) > 2:
            raise errors.validation("`inputs` must be a string, a pair of strings or a batch of mixed strings "
                                    "and pairs [[string], [string, string], ...]")
        return [(str(value[0]), str(value[1]) if len(value) == 2 else None)], True
    pairs: list[tuple[str, str | None]] = []
    for i, item in enumerate(value):
        if not isinstance(item, list) or not 1 <= len(item) <= 2:
            raise errors.validation("an input must be [text] or [text_a, text_b]", input=i)
        pairs.append((item[0], item[1] if len(item) == 2 else None))
    return pairs, False


def create_app(state: WorkerState, on_startup: Callable[[], Awaitable[None]] | None = None,
               on_shutdown: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    """The worker's FastAPI application over ``state``."""
    app = FastAPI(
        title="embedfleet worker",
        description="Text-embeddings-inference compatible inference replica (embeddings, sparse, rerank).",
        version=__version__,
        lifespan=lifespan(on_startup, on_shutdown),
    )
    app.state.worker = state

    def count_failure(exc: EngineError) -> None:
        if state.engine is not None:
            state.engine.metrics.request_failure.labels(exc.kind.value.lower()).inc()

    install_error_handlers(app, count_failure)
    app.include_router(router)
    app.add_middleware(Edge, limit=state.payload_limit, access_log=access_log)  # type: ignore[arg-type]
    return app
