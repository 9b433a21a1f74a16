"""The worker's HTTP API: text-embeddings-inference's routes plus OpenAI's /v1/embeddings.

The server listens at once and loads the model in a thread; until it is ready every inference
route answers 503 Unhealthy, as /health does. Handlers validate, call the engine, and serialise
with orjson; every failure leaves as TEI's error body (OpenAI's on /v1/*) with its status code.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response

from embedfleet import __version__
from embedfleet.api import binary, errors
from embedfleet.api.errors import EmbedfleetError
from embedfleet.api.http import BodyLimit, install_error_handlers, json_response, lifespan
from embedfleet.api.schemas import (
    DecodeRequest,
    EmbedAllRequest,
    EmbedRequest,
    EmbedSparseRequest,
    ErrorResponse,
    Info,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    OpenAIErrorResponse,
    Prediction,
    PredictRequest,
    Rank,
    RerankRequest,
    SimilarityRequest,
    SimpleToken,
    SparseValue,
    TokenizeRequest,
    TruncationDirection,
)
from embedfleet.engine.infer import Engine, Stats
from embedfleet.engine.model import Task

log = logging.getLogger("embedfleet.worker")
access_log = logging.getLogger("embedfleet.worker.access")

_TEI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 413, 422, 424, 429, 503)
}
_OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse} for code in (400, 413, 422, 424, 429, 503)
}


class WorkerState:
    """What the routes need: the engine once loaded, or why it is not."""

    def __init__(self, served_model_name: str | None = None, payload_limit: int = 2_000_000) -> None:
        self.engine: Engine | None = None
        self.error: str | None = None
        self.served_model_name = served_model_name
        self.payload_limit = payload_limit
        self.compute_type = "cpu"
        self.exit_code = 0  # set when the worker must exit with an error once the server stops
        self.stop_server: Callable[[], None] | None = None  # asks the HTTP server to shut down

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


def _timing_headers(state: WorkerState, stats: Stats) -> dict[str, str]:
    total = time.perf_counter() - stats.started

    def ms(seconds: float) -> str:
        return str(int(seconds * 1000))

    return {
        "x-compute-type": state.compute_type,
        "x-compute-time": ms(total),
        "x-compute-characters": str(stats.characters),
        "x-compute-tokens": str(stats.tokens),
        "x-total-time": ms(total),
        "x-tokenization-time": ms(stats.tokenization_time),
        "x-queue-time": ms(stats.queue_time),
        "x-inference-time": ms(stats.inference_time),
    }


def _inputs(value: str | list[Any]) -> list[str | list[int]]:
    """Normalise TEI's Input (one input or a batch; each a text or token ids) to a batch."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [value]  # one sequence of token ids
    return list(value)


def create_app(state: WorkerState, on_startup: Callable[[], Awaitable[None]] | None = None,
               on_shutdown: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    """The worker's FastAPI application over ``state``."""

    app = FastAPI(
        title="embedfleet worker",
        description="Text-embeddings-inference compatible inference replica (embeddings, sparse, rerank).",
        version=__version__,
        lifespan=lifespan(on_startup, on_shutdown),
    )
    app.add_middleware(BodyLimit, limit=state.payload_limit)  # type: ignore[arg-type]

    def _count_failure(exc: EmbedfleetError) -> None:
        if state.engine is not None:
            state.engine.metrics.request_failure.labels(exc.error_type.value.lower()).inc()

    install_error_handlers(app, _count_failure, access_log)

    async def _handle(name: str, work: Callable[[Engine, Stats], Awaitable[Any]],
                      binary_body: bool = False) -> Response:
        engine = state.ready()
        stats = Stats()
        m = engine.metrics
        m.request_count.labels(name).inc()
        async with engine.admit():
            body = await work(engine, stats)
        m.request_success.labels(name).inc()
        m.request_duration.labels(name).observe(time.perf_counter() - stats.started)
        if binary_body:
            return Response(binary.encode(*body), media_type=binary.MEDIA_TYPE, headers=_timing_headers(state, stats))
        return json_response(body, headers=_timing_headers(state, stats))

    # ----- TEI routes -----

    @app.post("/embed", response_model=list[list[float]], responses=_TEI_ERRORS, tags=["TEI"])
    async def embed(req: EmbedRequest, request: Request) -> Response:
        """Pooled embeddings. With ``Accept: application/x-embedfleet-embeddings``, float32 bytes and each
        input's token count instead of JSON (what the gateway asks for)."""
        as_binary = binary.accepts(request.headers.get("accept"))

        async def work(engine: Engine, stats: Stats) -> Any:
            vectors = await engine.embed(_inputs(req.inputs), normalize=req.normalize, truncate=req.truncate,
                                         direction=req.truncation_direction, prompt_name=req.prompt_name,
                                         dimensions=req.dimensions, stats=stats)
            return (vectors, stats.lengths) if as_binary else vectors

        return await _handle("embed", work, binary_body=as_binary)

    @app.post("/embed_all", response_model=list[list[list[float]]], responses=_TEI_ERRORS, tags=["TEI"])
    async def embed_all(req: EmbedAllRequest) -> Response:
        """Token embeddings of every input."""

        async def work(engine: Engine, stats: Stats) -> Any:
            return await engine.embed_all(_inputs(req.inputs), truncate=req.truncate,
                                          direction=req.truncation_direction, prompt_name=req.prompt_name,
                                          stats=stats)

        return await _handle("embed_all", work)

    @app.post("/embed_sparse", response_model=list[list[SparseValue]], responses=_TEI_ERRORS, tags=["TEI"])
    async def embed_sparse(req: EmbedSparseRequest) -> Response:
        """SPLADE sparse embeddings: the non-zero entries of each vector."""

        async def work(engine: Engine, stats: Stats) -> Any:
            out = await engine.embed_sparse(_inputs(req.inputs), truncate=req.truncate,
                                            direction=req.truncation_direction, prompt_name=req.prompt_name,
                                            stats=stats)
            return [[{"index": int(i), "value": float(v)} for i, v in zip(idx, val, strict=True)]
                    for idx, val in out]

        return await _handle("embed_sparse", work)

    @app.post("/rerank", response_model=list[Rank], responses=_TEI_ERRORS, tags=["TEI"])
    async def rerank(req: RerankRequest) -> Response:
        """Score texts against a query; results sorted by score, best first."""

        async def work(engine: Engine, stats: Stats) -> Any:
            scores = await engine.rerank(req.query, req.texts, raw_scores=req.raw_scores, truncate=req.truncate,
                                         direction=req.truncation_direction, stats=stats)
            order = np.argsort(-scores, kind="stable")
            ranks = []
            for i in order:
                rank: dict[str, Any] = {"index": int(i), "score": float(scores[i])}
                if req.return_text:
                    rank["text"] = req.texts[i]
                ranks.append(rank)
            return ranks

        return await _handle("rerank", work)

    @app.post("/predict", response_model=list[Prediction] | list[list[Prediction]], responses=_TEI_ERRORS,
              tags=["TEI"])
    async def predict(req: PredictRequest) -> Response:
        """Class scores for a text, a pair, or a batch of texts and pairs."""
        batch, single = _predict_inputs(req.inputs)

        async def work(engine: Engine, stats: Stats) -> Any:
            scores = await engine.predict(batch, raw_scores=req.raw_scores, truncate=req.truncate,
                                          direction=req.truncation_direction, stats=stats)
            labels = engine.info.id2label
            out = [
                [{"score": float(s[j]), "label": labels.get(int(j), f"LABEL_{j}")} for j in np.argsort(-s)]
                for s in scores
            ]
            return out[0] if single else out

        return await _handle("predict", work)

    @app.post("/similarity", response_model=list[float], responses=_TEI_ERRORS, tags=["TEI"])
    async def similarity(req: SimilarityRequest) -> Response:
        """Cosine similarity of each sentence to the source sentence."""
        params = req.parameters

        async def work(engine: Engine, stats: Stats) -> Any:
            return await engine.similarity(
                req.inputs.source_sentence, req.inputs.sentences,
                truncate=params.truncate if params else None,
                direction=params.truncation_direction if params else TruncationDirection.RIGHT,
                prompt_name=params.prompt_name if params else None, stats=stats)

        return await _handle("similarity", work)

    @app.post("/tokenize", response_model=list[list[SimpleToken]], responses=_TEI_ERRORS, tags=["TEI"])
    async def tokenize(req: TokenizeRequest) -> Response:
        """Tokens of each input, with character offsets."""
        inputs = [req.inputs] if isinstance(req.inputs, str) else req.inputs

        async def work(engine: Engine, stats: Stats) -> Any:
            return await engine.tokenize(inputs, req.add_special_tokens, req.prompt_name)

        return await _handle("tokenize", work)

    @app.post("/decode", response_model=list[str], responses=_TEI_ERRORS, tags=["TEI"])
    async def decode(req: DecodeRequest) -> Response:
        """Token ids back to text."""
        ids = [req.ids] if req.ids and isinstance(req.ids[0], int) else req.ids

        async def work(engine: Engine, stats: Stats) -> Any:
            return await engine.decode(ids, req.skip_special_tokens)  # type: ignore[arg-type]

        return await _handle("decode", work)

    # ----- OpenAI -----

    @app.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, responses=_OPENAI_ERRORS, tags=["OpenAI"])
    @app.post("/embeddings", response_model=OpenAIEmbeddingResponse, responses=_OPENAI_ERRORS,
              include_in_schema=False)
    async def openai_embeddings(req: OpenAIEmbeddingRequest) -> Response:
        """OpenAI-compatible embeddings (float or base64 little-endian float32)."""

        async def work(engine: Engine, stats: Stats) -> Any:
            vectors = await engine.embed(_inputs(req.input), normalize=True, dimensions=req.dimensions,
                                         stats=stats)
            if req.encoding_format == "base64":
                data = [{"object": "embedding", "index": i,
                         "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
                        for i, v in enumerate(vectors)]
            else:
                data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
            return {"object": "list", "data": data, "model": state.model_name,
                    "usage": {"prompt_tokens": stats.tokens, "total_tokens": stats.tokens}}

        return await _handle("openai", work)

    @app.get("/v1/models", tags=["OpenAI"])
    async def openai_models() -> Response:
        """The one model this worker serves."""
        state.ready()
        return json_response({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": 0, "owned_by": "embedfleet"}]})

    # ----- operations -----

    @app.get("/info", response_model=Info, tags=["TEI"])
    async def info() -> Response:
        """Model and limits of this replica."""
        engine = state.ready()
        i = engine.info
        lim = engine.limits
        if i.task is Task.EMBEDDING or i.task is Task.SPARSE:
            model_type: dict[str, Any] = {"embedding": {"pooling": i.pooling.value if i.pooling else "mean"}}
        else:
            labels = {"id2label": {str(k): v for k, v in i.id2label.items()},
                      "label2id": {v: k for k, v in i.id2label.items()}}
            model_type = {i.task.value: labels}
        return json_response({
            "model_id": i.model_id, "model_sha": i.sha, "model_dtype": engine.backend.dtype,
            "model_type": model_type, "served_model_name": state.model_name,
            "max_concurrent_requests": lim.max_concurrent_requests, "max_input_length": i.max_input_length,
            "max_batch_tokens": lim.max_batch_tokens, "max_batch_requests": lim.max_batch_requests,
            "max_client_batch_size": lim.max_client_batch_size, "auto_truncate": lim.auto_truncate,
            "tokenization_workers": lim.tokenization_workers, "version": __version__, "sha": None,
            "docker_label": None, "task": i.task.value, "pooling": i.pooling.value if i.pooling else None,
            "dimension": i.dimension, "backend": engine.backend.name, "device": engine.backend.device,
            "revision": i.revision,
        })

    @app.get("/health", responses={503: {"model": ErrorResponse}}, tags=["TEI"])
    @app.get("/ping", include_in_schema=False)
    async def health() -> Response:
        """200 when the model is loaded and can run; 503 while loading or when inference fails."""
        await state.ready().check_health()
        return Response(status_code=200)

    @app.get("/metrics", tags=["TEI"])
    async def metrics() -> Response:
        """Prometheus metrics."""
        engine = state.engine
        body = engine.metrics.render() if engine else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _predict_inputs(value: str | list[str] | list[list[str]]) -> tuple[list[tuple[str, str | None]], bool]:
    """TEI's PredictInput: a text, a pair [a, b], or a batch of [text] and [a, b]. Returns (batch, single)."""
    if isinstance(value, str):
        return [(value, None)], True
    if value and all(isinstance(v, str) for v in value):
        if len(value) > 2:
            raise errors.validation("`inputs` must be a string, a pair of strings or a batch of mixed strings "
                                    "and pairs [[string], [string, string], ...]")
        return [(str(value[0]), str(value[1]) if len(value) == 2 else None)], True
    batch: list[tuple[str, str | None]] = []
    for i, item in enumerate(value):
        if not isinstance(item, list) or not 1 <= len(item) <= 2:
            raise errors.validation(f"inputs[{i}] must be [text] or [text_a, text_b]")
        batch.append((item[0], item[1] if len(item) == 2 else None))
    return batch, False
