"""The gateway's routes: the worker's API, with /embed and /v1/embeddings served through the cache.

Other TEI routes (/rerank, /embed_sparse, /predict, ...) are forwarded to the pool as they are.
Responses say what the cache did: ``X-Cache: hit|miss|partial`` with ``X-Cache-Hits`` and
``X-Cache-Misses`` (unique inputs). Handlers are plain functions of a request and the
:class:`GatewayState` (a FastAPI dependency); :mod:`embedfleet.gateway.fastpath` serves the two
embedding routes through the same :func:`embed_tei` and :func:`embed_openai`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest

from embedfleet import __version__
from embedfleet.api.edge import batch, count_token_ids, json_response, parse_body
from embedfleet.api.schemas import (
    HEALTH,
    METRICS,
    OPENAI_ERRORS,
    TEI_ERRORS,
    EmbedRequest,
    ErrorResponse,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
)
from embedfleet.cache.tiered import TieredCache
from embedfleet.engine import errors
from embedfleet.engine.infer import TASK_ROUTES
from embedfleet.engine.model import Task
from embedfleet.gateway.render import cache_headers, render_embed, render_openai
from embedfleet.gateway.router import ModelRouter
from embedfleet.gateway.service import CachePolicy, EmbeddingService, EmbedResult
from embedfleet.gateway.upstream import Reply
from embedfleet.grpc import arrow

PASSTHROUGH = ("/embed_all", "/embed_sparse", "/rerank", "/predict", "/similarity", "/tokenize", "/decode")
"""TEI routes the gateway forwards to the model's pool unchanged."""

NO_CACHE = CachePolicy(read=False, write=False)
DEFAULT_POLICY = CachePolicy()


@dataclass
class GatewayState:
    """What the routes need: the model pools, the cache and the request limits."""

    router: ModelRouter
    cache: TieredCache
    max_client_batch_size: int
    cache_enabled: bool = True
    arrow_max_rows: int = 100_000
    metrics: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def policy(self, cache_control: str | None) -> CachePolicy:
        """What a request may do with the cache, from its ``Cache-Control`` header."""
        if not self.cache_enabled:
            return NO_CACHE
        return DEFAULT_POLICY if cache_control is None else CachePolicy.from_header(cache_control)

    def pick(self, path: str, x_model: str | None, body_model: str | None = None) -> EmbeddingService:
        """The pool for a request: the one ``X-Model`` (or a ``/models/{name}`` prefix) names, else OpenAI's
        ``model`` field where it names one, else the pool whose task fits the route."""
        if x_model:
            return self.router.pick(path, x_model)
        return self.router.pick(path, body_model, strict=False)


async def gateway_state(request: Request) -> GatewayState:
    """The state of the app serving the request (a dependency; async, so it runs on the event loop)."""
    state: GatewayState = request.app.state.gateway
    return state


State = Annotated[GatewayState, Depends(gateway_state)]


async def embed_tei(service: EmbeddingService, req: EmbedRequest, policy: CachePolicy) -> tuple[bytes, EmbedResult]:
    """A TEI /embed request through the cache: the body and what the cache did."""
    result = await service.embed(batch(req.inputs), normalize=req.normalize, truncate=req.truncate,
                                 direction=req.truncation_direction, prompt_name=req.prompt_name,
                                 dimensions=req.dimensions, policy=policy)
    return render_embed(result), result


async def embed_openai(service: EmbeddingService, req: OpenAIEmbeddingRequest,
                       policy: CachePolicy) -> tuple[bytes, EmbedResult]:
    """An OpenAI /v1/embeddings request through the cache: the body and what the cache did."""
    result = await service.embed(batch(req.input), normalize=True, dimensions=req.dimensions, policy=policy)
    return render_openai(result, service.pool.name, req.encoding_format == "base64"), result


def _cached(body: bytes, result: EmbedResult) -> Response:
    return Response(body, media_type="application/json", headers=cache_headers(result))


router = APIRouter()


@router.post("/embed", response_model=list[list[float]], responses=TEI_ERRORS, tags=["TEI"])
async def embed(req: EmbedRequest, request: Request, state: State) -> Response:
    """Pooled embeddings, from the cache where possible."""
    service = state.pick(request.url.path, request.headers.get("x-model"))
    return _cached(*await embed_tei(service, req, state.policy(request.headers.get("cache-control"))))


@router.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, responses=OPENAI_ERRORS, tags=["OpenAI"])
@router.post("/embeddings", response_model=OpenAIEmbeddingResponse, include_in_schema=False)
async def openai_embeddings(req: OpenAIEmbeddingRequest, request: Request, state: State) -> Response:
    """OpenAI-compatible embeddings, from the cache where possible; ``model`` picks the pool."""
    service = state.pick(request.url.path, request.headers.get("x-model"), req.model)
    return _cached(*await embed_openai(service, req, state.policy(request.headers.get("cache-control"))))


ARROW_BODY = {"requestBody": {"required": True, "content": {arrow.MEDIA_TYPE: {"schema": {"type": "string",
                                                                                         "format": "binary"}}}}}
ARROW_ANSWER = {200: {"content": {arrow.MEDIA_TYPE: {}}, "description": "An Arrow IPC stream"}, **TEI_ERRORS}


@router.post("/embed_arrow", responses=ARROW_ANSWER, openapi_extra=ARROW_BODY, tags=["Arrow"])
async def embed_arrow(request: Request, state: State, truncate: bool | None = None, normalize: bool = True,
                      noop: bool = False) -> Response:
    """Pooled embeddings of an Arrow IPC stream's `text` column, through the cache: one record batch with
    `embeddings` as FixedSizeList<float32, dim>, in row order (LZ4_FRAME when the request was compressed).
    ``noop``: zero vectors, for round-trip tests."""
    service = state.pick("/embed", request.headers.get("x-model"))
    body = await arrow.embed_arrow(service, await request.body(), truncate=truncate, normalize=normalize, noop=noop,
                                   max_rows=state.arrow_max_rows,
                                   policy=state.policy(request.headers.get("cache-control")))
    return Response(body, media_type=arrow.MEDIA_TYPE)


@router.post("/embed_sparse_arrow", responses=ARROW_ANSWER, openapi_extra=ARROW_BODY, tags=["Arrow"])
async def embed_sparse_arrow(request: Request, state: State, truncate: bool | None = None,
                             noop: bool = False) -> Response:
    """SPLADE vectors of an Arrow IPC stream's `text` column: `sparse_embeddings` as
    List<Struct<index: uint32, value: float32>>, in row order."""
    service = state.pick("/embed_sparse", request.headers.get("x-model"))
    body = await arrow.embed_sparse_arrow(service, await request.body(), truncate=truncate, noop=noop,
                                          max_rows=state.arrow_max_rows)
    return Response(body, media_type=arrow.MEDIA_TYPE)


@router.post("/", responses=TEI_ERRORS, tags=["TEI"])
@router.post("/invocations", responses=TEI_ERRORS, tags=["TEI"])
async def invocations(request: Request, state: State) -> Response:
    """The default pool's task route, as TEI serves it at ``/`` and ``/invocations``: ``/embed`` (through the
    cache) for an embedder, ``/embed_sparse``, ``/rerank`` or ``/predict`` (forwarded) for the others.
    ``X-Model`` picks another pool."""
    service = state.router.default(request.headers.get("x-model"))
    info = service.pool.info
    task = Task(info.fingerprint.task) if info is not None else Task.EMBEDDING
    if task is Task.EMBEDDING:
        req = await parse_body(request, EmbedRequest)
        return _cached(*await embed_tei(service, req, state.policy(request.headers.get("cache-control"))))
    return await _forward(service, TASK_ROUTES[task], request)


async def _forward(service: EmbeddingService, route: str, request: Request) -> Response:
    # orjson, not the standard library: it refuses nesting deeper than 1024 levels (no RecursionError),
    # and what it parses it can always serialise again for the upstream.
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise errors.validation(f"Json deserialize error: {exc}") from None
    if not isinstance(body, dict):
        raise errors.validation("Json deserialize error: the body must be a JSON object")
    info = service.pool.info
    if info is not None:
        errors.check_token_ids(count_token_ids(body.get("inputs")) + count_token_ids(body.get("ids")),
                               service.max_token_ids(info))
    reply = await service.pool.stream(route, body)
    if isinstance(reply, Reply):
        return Response(reply.body, status_code=reply.status, media_type=reply.content_type)
    return StreamingResponse(reply.chunks(), status_code=reply.status, media_type=reply.content_type)


async def passthrough(request: Request, state: State) -> Response:
    """Forwarded to the model's pool as it is."""
    path = request.url.path
    return await _forward(state.pick(path, request.headers.get("x-model")), path, request)


for _route in PASSTHROUGH:
    router.add_api_route(_route, passthrough, methods=["POST"], responses=TEI_ERRORS, tags=["TEI"],
                         summary=f"Forwarded to the model's pool: {_route}")


@router.get("/v1/models", tags=["OpenAI"])
async def openai_models(state: State) -> Response:
    """The served models."""
    return json_response({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "embedfleet",
         "model_id": s.pool.info.model_id if s.pool.info else None} for name, s in state.router.services.items()]})


@router.get("/info", tags=["TEI"])
async def info(request: Request, state: State) -> Response:
    """The model's /info (the only one, or the one X-Model names), with the gateway's request limits."""
    service = state.pick(request.url.path, request.headers.get("x-model"))
    up = service.pool.info
    if up is None:
        raise errors.unhealthy(f"no upstream of {service.pool.name!r} has answered /info yet")
    return json_response({**up.raw, "max_client_batch_size": state.max_client_batch_size, "version": __version__,
                          "served_model_name": service.pool.name, "models": list(state.router.services),
                          "upstreams": [{"url": u.label, "healthy": u.healthy, "kept_out": u.mismatch}
                                        for u in service.pool.upstreams]})


@router.get("/health", **HEALTH, tags=["TEI"])
@router.get("/ping", include_in_schema=False)
@router.get("/", include_in_schema=False)
async def health(state: State) -> Response:
    """200 while every model has a healthy upstream."""
    down = [name for name, s in state.router.services.items() if not s.pool.healthy]
    if down:
        raise errors.unhealthy(f"no healthy upstream for: {', '.join(down)}")
    return Response(status_code=200)


@router.get("/metrics", **METRICS, tags=["TEI"])
async def metrics(state: State) -> Response:
    """Prometheus metrics of the gateway."""
    return Response(generate_latest(state.metrics), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/cache/stats", tags=["cache"])
async def cache_stats(state: State) -> Response:
    """Entries and bytes per model in each tier, and hit ratios."""
    cache, services = state.cache, state.router.services
    c = cache.counters
    looked = c.memory_hits + c.store_hits + c.misses
    memory = await cache.memory.stats()
    store = await cache.store.stats() if cache.store is not None else None
    names = {s.pool.info.fingerprint.tag.hex(): name for name, s in services.items() if s.pool.info}

    def per_model(stats: Any) -> dict[str, Any]:
        return {names.get(tag, tag): {"entries": n, "bytes": b} for tag, (n, b) in stats.per_model.items()}

    return json_response({
        "hit_ratio": (c.memory_hits + c.store_hits) / looked if looked else None,
        "models": {name: {"hits": s.hits, "misses": s.misses,
                          "hit_ratio": s.hits / (s.hits + s.misses) if s.hits + s.misses else None}
                   for name, s in services.items()},
        "lookups": {"memory_hits": c.memory_hits, "store_hits": c.store_hits, "misses": c.misses},
        "store_errors": c.store_errors,
        "memory": {"entries": memory.entries, "bytes": memory.bytes, "models": per_model(memory)},
        "store": None if store is None or cache.store is None else {
            "name": cache.store.name, "entries": store.entries, "bytes": store.bytes, "models": per_model(store)},
    })


@router.delete("/cache", responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}, tags=["cache"])
async def clear_cache(state: State, model: str | None = None) -> Response:
    """Delete every entry, or one model's (``?model=`` a pool name or model id). An admin route."""
    tag = None
    if model is not None:
        service = state.router.pick("/embed", model)
        if service.pool.info is None:
            raise errors.unhealthy(f"{model!r} has not answered /info yet")
        tag = service.pool.info.fingerprint.tag
    return json_response({"deleted": await state.cache.delete(tag)})
