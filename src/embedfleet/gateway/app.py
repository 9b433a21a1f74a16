"""The gateway's HTTP API: the worker's routes, with /embed and /v1/embeddings served through the cache.

Other TEI routes (/rerank, /embed_sparse, /predict, ...) are forwarded to the pool as they are.
Responses say what the cache did: ``X-Cache: hit|miss|partial`` with ``X-Cache-Hits`` and
``X-Cache-Misses`` (unique inputs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedfleet import __version__
from embedfleet.api import errors
from embedfleet.api.errors import EmbedfleetError
from embedfleet.api.http import BodyLimit, install_error_handlers, is_openai, json_response, lifespan
from embedfleet.api.schemas import (
    EmbedRequest,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
)
from embedfleet.cache.tiered import TieredCache
from embedfleet.gateway.auth import KeyCheck
from embedfleet.gateway.router import ModelPrefix, ModelRouter
from embedfleet.gateway.service import CachePolicy, EmbeddingService, EmbedResult

log = logging.getLogger("embedfleet.gateway")
access_log = logging.getLogger("embedfleet.gateway.access")

PASSTHROUGH = ("/embed_all", "/embed_sparse", "/rerank", "/predict", "/similarity", "/tokenize", "/decode")


def _inputs(value: str | list[Any]) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [value]
    return list(value)


def _cache_headers(result: EmbedResult) -> dict[str, str]:
    return {"x-cache": result.cache_status, "x-cache-hits": str(result.hits), "x-cache-misses": str(result.misses)}


def _joined(items: list[bytes], opening: bytes, closing: bytes) -> list[bytes]:
    """``opening``, the items with commas between, ``closing``: parts for one ``b"".join``, so a large
    body is copied once."""
    parts = [opening]
    for item in items:
        parts += (item, b",")
    if items:
        parts.pop()
    parts.append(closing)
    return parts


def render_embed(result: EmbedResult) -> bytes:
    """The /embed body: the vectors as a JSON array of arrays, byte for byte what ``orjson.dumps`` writes
    for the float32 matrix, joined from each entry's (cached) JSON."""
    return b"".join(_joined(result.json_rows(), b"[", b"]"))


def render_openai(result: EmbedResult, model: str, base64: bool) -> bytes:
    """The /v1/embeddings body, byte for byte what ``orjson.dumps`` writes for the response object.

    ``usage`` counts every input's tokens, hits included (each cache entry keeps its input's count), so
    the body is the same whether the cache answered or a worker did.
    """
    parts = [b'{"object":"list","data":[']
    for i, row in enumerate(result.b64_rows() if base64 else result.json_rows()):
        parts += (b'{"object":"embedding","index":%d,"embedding":' % i, row, b"},")
    if len(parts) > 1:
        parts[-1] = b"}"  # the last object's closing brace, without the comma
    usage = b'"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (result.tokens, result.tokens)
    parts += (b'],"model":', orjson.dumps(model), b",", usage)
    return b"".join(parts)


class _GatewayCollector(Collector):
    """Cache and upstream figures of every pool, read at scrape time."""

    def __init__(self, router: ModelRouter, cache: TieredCache) -> None:
        self.router = router
        self.cache = cache

    def collect(self) -> Any:
        c = self.cache.counters
        tiers = CounterMetricFamily("ef_cache_lookups", "Unique inputs looked up, by answering tier",
                                    labels=["result"])
        tiers.add_metric(["memory_hit"], c.memory_hits)
        tiers.add_metric(["store_hit"], c.store_hits)
        tiers.add_metric(["miss"], c.misses)
        yield tiers
        yield CounterMetricFamily("ef_cache_store_errors", "Cache store reads or writes that failed",
                                  value=c.store_errors)
        yield CounterMetricFamily("ef_cache_writes_dropped", "Cache writes dropped (queue full or store down)",
                                  value=c.writes_dropped)
        hits = CounterMetricFamily("ef_model_cache_hits", "Unique inputs answered from the cache", labels=["model"])
        misses = CounterMetricFamily("ef_model_cache_misses", "Unique inputs computed", labels=["model"])
        sent = CounterMetricFamily("ef_upstream_inputs", "Inputs sent to upstreams", labels=["model"])
        retries = CounterMetricFamily("ef_upstream_retries", "Calls retried on another replica", labels=["model"])
        ejections = CounterMetricFamily("ef_upstream_ejections", "Replicas ejected after errors", labels=["model"])
        in_flight = GaugeMetricFamily("ef_upstream_in_flight", "Estimated tokens in flight per upstream",
                                      labels=["model", "upstream"])
        healthy = GaugeMetricFamily("ef_upstream_healthy", "1 when the upstream is healthy",
                                    labels=["model", "upstream"])
        ratio = GaugeMetricFamily("ef_chars_per_token", "Characters per token the pool's answers show "
                                  "(the gateway's token estimate for splitting; 4 until workers answer)",
                                  labels=["model"])
        for name, service in self.router.services.items():
            ratio.add_metric([name], service.estimate.chars_per_token)
            hits.add_metric([name], service.hits)
            misses.add_metric([name], service.misses)
            sent.add_metric([name], service.upstream_inputs)
            retries.add_metric([name], service.pool.retried)
            ejections.add_metric([name], service.pool.ejections)
            for u in service.pool.upstreams:
                in_flight.add_metric([name, u.url], u.in_flight)
                healthy.add_metric([name, u.url], 1.0 if u.healthy else 0.0)
        yield from (hits, misses, sent, retries, ejections, in_flight, healthy, ratio)
        yield from self.cache.store_latency.collect()


class KeyCheckMiddleware:
    """ASGI middleware: 401/403 before any work unless the request carries the key its route needs."""

    def __init__(self, app: ASGIApp, keys: KeyCheck) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            auth = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            try:
                self.keys.check(scope["path"], auth)
            except EmbedfleetError as exc:
                body = exc.render(is_openai(scope["path"]))
                await send({"type": "http.response.start", "status": exc.status, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class RequestTimer:
    """ASGI middleware: request latency by route and status."""

    def __init__(self, app: ASGIApp, histogram: Histogram, routes: set[str]) -> None:
        self.app = app
        self.histogram = histogram
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.histogram.labels(route, str(status)).observe(time.perf_counter() - started)


FAST_ROUTES = {"/embed": False, "/v1/embeddings": True, "/embeddings": True}
"""The routes the fast path serves, and whether each is an OpenAI one."""
_JSON = b"application/json"


class _Replay:
    """``receive`` for the full stack after the fast path gave up: first what it read, then the rest."""

    def __init__(self, messages: list[Message], receive: Receive) -> None:
        self.messages = messages
        self.receive = receive

    async def __call__(self) -> Message:
        if self.messages:
            return self.messages.pop(0)
        return await self.receive()


FastPath = Callable[[Scope, Receive, Send], Awaitable[Receive | None]]


class GatewayApp(FastAPI):
    """The gateway's FastAPI app, with a fast path in front for ``POST /embed`` and ``/v1/embeddings``.

    The fast path answers well-formed requests (the key checked, the body parsed with orjson and
    validated by the same pydantic models) without FastAPI's per-request machinery. Anything else (a
    bad key, a body it would not accept, CORS, debug access logging) goes through the full stack with
    the body replayed, so every error leaves exactly as the routes below write it. The routes stay
    declared for the OpenAPI document and for that fallback.
    """

    fast_path: FastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast_path
        if fast is not None and scope["type"] == "http" and scope["method"] == "POST":
            rest = await fast(scope, receive, send)
            if rest is None:
                return
            receive = rest
        await super().__call__(scope, receive, send)


def _is_json(content_type: bytes) -> bool:
    """``application/json``, with parameters or not, as FastAPI reads a JSON body (other ``+json`` types
    are left to FastAPI)."""
    return content_type.partition(b";")[0].strip().lower() == _JSON


def create_gateway_app(router: ModelRouter, cache: TieredCache, payload_limit: int, max_client_batch_size: int,
                       cache_enabled: bool = True, keys: KeyCheck | None = None,
                       cors_origins: Sequence[str] = (), on_startup: Callable[[], Awaitable[None]] | None = None,
                       on_shutdown: Callable[[], Awaitable[None]] | None = None,
                       collectors: Sequence[Collector] = ()) -> FastAPI:
    """The gateway's FastAPI application over the model pools (``collectors``: more for /metrics)."""

    app = GatewayApp(title="embedfleet gateway", version=__version__, lifespan=lifespan(on_startup, on_shutdown),
                  description="Caching, load-balancing entry point in front of embedfleet workers or TEI servers.")
    app.add_middleware(BodyLimit, limit=payload_limit)  # type: ignore[arg-type]
    install_error_handlers(app, access_log=access_log)
    keys = keys or KeyCheck()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_GatewayCollector(router, cache))
    for collector in collectors:
        registry.register(collector)
    durations = Histogram("ef_request_duration_seconds", "Gateway request duration", ["route", "status"],
                          registry=registry)
    routes: set[str] = set()  # filled once every route is declared, below
    app.add_middleware(RequestTimer, histogram=durations, routes=routes)  # type: ignore[arg-type]
    app.add_middleware(KeyCheckMiddleware, keys=keys)  # type: ignore[arg-type]
    if cors_origins:
        # Outside the key check, so browsers' preflight requests (which carry no key) are answered.
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type", "x-model", "cache-control"],
                           expose_headers=["x-cache", "x-cache-hits", "x-cache-misses"])
    app.add_middleware(ModelPrefix)  # outermost: /models/{name}/... is rewritten before anything else

    no_cache = CachePolicy(read=False, write=False)
    default_policy = CachePolicy()

    def policy_of(header: str | None) -> CachePolicy:
        if not cache_enabled:
            return no_cache
        return default_policy if header is None else CachePolicy.from_header(header)

    def policy(request: Request) -> CachePolicy:
        return policy_of(request.headers.get("cache-control"))

    def pick(request: Request, body_model: str | None = None) -> EmbeddingService:
        header = request.headers.get("x-model")
        if header:
            return router.pick(request.url.path, header)
        return router.pick(request.url.path, body_model, strict=False)

    async def tei_embed(service: EmbeddingService, req: EmbedRequest, policy: CachePolicy) -> tuple[bytes, EmbedResult]:
        result = await service.embed(
            _inputs(req.inputs), normalize=req.normalize, truncate=req.truncate, direction=req.truncation_direction,
            prompt_name=req.prompt_name, dimensions=req.dimensions, policy=policy)
        return render_embed(result), result

    async def openai_embed(service: EmbeddingService, req: OpenAIEmbeddingRequest,
                           policy: CachePolicy) -> tuple[bytes, EmbedResult]:
        result = await service.embed(_inputs(req.input), normalize=True, dimensions=req.dimensions, policy=policy)
        return render_openai(result, service.pool.name, req.encoding_format == "base64"), result

    @app.post("/embed", response_model=list[list[float]], tags=["TEI"])
    async def embed(req: EmbedRequest, request: Request) -> Response:
        """Pooled embeddings, from the cache where possible."""
        body, result = await tei_embed(pick(request), req, policy(request))
        return Response(body, media_type="application/json", headers=_cache_headers(result))

    @app.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, tags=["OpenAI"])
    @app.post("/embeddings", response_model=OpenAIEmbeddingResponse, include_in_schema=False)
    async def openai_embeddings(req: OpenAIEmbeddingRequest, request: Request) -> Response:
        """OpenAI-compatible embeddings, from the cache where possible; ``model`` picks the pool."""
        body, result = await openai_embed(pick(request, req.model), req, policy(request))
        return Response(body, media_type="application/json", headers=_cache_headers(result))

    timers: dict[tuple[str, int], Any] = {}  # the histogram's children, by route and status

    def observe(route: str, status: int, started: float) -> None:
        child = timers.get((route, status))
        if child is None:
            child = timers[(route, status)] = durations.labels(route, str(status))
        child.observe(time.perf_counter() - started)

    async def fast_path(scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Serve a well-formed embedding request; otherwise hand the full stack a ``receive`` to go on with."""
        path: str = scope["path"]
        prefixed: str | None = None
        if path.startswith("/models/"):  # as ModelPrefix rewrites it
            name, _, rest = path[len("/models/"):].partition("/")
            if name and rest:
                path, prefixed = "/" + rest, name.encode().decode("latin-1")
        openai = FAST_ROUTES.get(path)
        if openai is None or access_log.isEnabledFor(logging.DEBUG):
            return receive
        auth = content_type = length = x_model = cache_control = None
        for key, value in scope["headers"]:  # the first of each, as starlette's Headers.get
            if key == b"authorization":
                auth = value if auth is None else auth
            elif key == b"content-type":
                content_type = value if content_type is None else content_type
            elif key == b"content-length":
                length = value  # the last, as BodyLimit reads it
            elif key == b"x-model":
                x_model = value if x_model is None else x_model
            elif key == b"cache-control":
                cache_control = value if cache_control is None else cache_control
            elif key == b"origin" and cors_origins:
                return receive  # CORS headers are the middleware's business
        if content_type is None or not _is_json(content_type):
            return receive
        if length is not None and (not length.isdigit() or int(length) > payload_limit):
            return receive
        try:
            keys.check(path, None if auth is None else auth.decode("latin-1"))
        except EmbedfleetError:
            return receive
        started = time.perf_counter()
        messages: list[Message] = []
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return _Replay(messages, receive)
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > payload_limit:
                return _Replay(messages, receive)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            data = orjson.loads(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            req = OpenAIEmbeddingRequest.model_validate(data) if openai else EmbedRequest.model_validate(data)
        except Exception:  # not JSON, or not valid: FastAPI writes the error, as it always has
            return _Replay(messages, receive)

        status = 500
        responded = False
        try:
            model = prefixed or (x_model.decode("latin-1") if x_model else None)
            cache = policy_of(None if cache_control is None else cache_control.decode("latin-1"))
            try:
                if isinstance(req, OpenAIEmbeddingRequest):
                    service = router.pick(path, model) if model else router.pick(path, req.model, strict=False)
                    body, result = await openai_embed(service, req, cache)
                else:
                    service = router.pick(path, model) if model else router.pick(path, None, strict=False)
                    body, result = await tei_embed(service, req, cache)
            except EmbedfleetError as exc:
                body = exc.render(is_openai(path))
                status, responded = exc.status, True
                await send({"type": "http.response.start", "status": status, "headers": [
                    (b"content-length", b"%d" % len(body)), (b"content-type", _JSON)]})
            else:
                status, responded = 200, True
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"x-cache", result.cache_status.encode()), (b"x-cache-hits", b"%d" % result.hits),
                    (b"x-cache-misses", b"%d" % result.misses), (b"content-length", b"%d" % len(body)),
                    (b"content-type", _JSON)]})
            await send({"type": "http.response.body", "body": body})
        except Exception:
            if not responded:  # nothing sent yet: answer as starlette's ServerErrorMiddleware does
                await send({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-length", b"21"), (b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": b"Internal Server Error"})
            raise
        finally:
            observe(path, status, started)
        return None

    @app.get("/v1/models", tags=["OpenAI"])
    async def openai_models() -> Response:
        """The served models."""
        return json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "embedfleet",
             "model_id": s.pool.info.model_id if s.pool.info else None} for name, s in router.services.items()]})

    async def passthrough(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise errors.validation("Json deserialize error: invalid JSON") from None
        if not isinstance(body, dict):
            raise errors.validation("Json deserialize error: the body must be a JSON object")
        return json_response(await pick(request).pool.post(request.url.path, body))

    for route in PASSTHROUGH:
        app.add_api_route(route, passthrough, methods=["POST"], tags=["TEI"],
                          summary=f"Forwarded to the model's pool: {route}")

    @app.get("/info", tags=["TEI"])
    async def info(request: Request) -> Response:
        """The model's /info (the only one, or the one X-Model names), with the gateway's request limits."""
        service = pick(request)
        up = service.pool.info
        if up is None:
            raise errors.unhealthy(f"no upstream of {service.pool.name!r} has answered /info yet")
        return json_response({**up.raw, "max_client_batch_size": max_client_batch_size, "version": __version__,
                              "served_model_name": service.pool.name, "models": list(router.services),
                              "upstreams": [{"url": u.url, "healthy": u.healthy} for u in service.pool.upstreams]})

    @app.get("/health", tags=["TEI"])
    async def health() -> Response:
        """200 while every model has a healthy upstream."""
        down = [name for name, s in router.services.items() if not s.pool.healthy]
        if down:
            raise errors.unhealthy(f"no healthy upstream for: {', '.join(down)}")
        return Response(status_code=200)

    @app.get("/metrics", tags=["TEI"])
    async def metrics() -> Response:
        """Prometheus metrics of the gateway."""
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/cache/stats", tags=["cache"])
    async def cache_stats() -> Response:
        """Entries and bytes per model in each tier, and hit ratios."""
        c = cache.counters
        looked = c.memory_hits + c.store_hits + c.misses
        memory = await cache.memory.stats()
        store = await cache.store.stats() if cache.store is not None else None
        names = {s.pool.info.fingerprint.tag.hex(): name for name, s in router.services.items() if s.pool.info}

        def per_model(stats: Any) -> dict[str, Any]:
            return {names.get(tag, tag): {"entries": n, "bytes": b} for tag, (n, b) in stats.per_model.items()}

        return json_response({
            "hit_ratio": (c.memory_hits + c.store_hits) / looked if looked else None,
            "models": {name: {"hits": s.hits, "misses": s.misses,
                              "hit_ratio": s.hits / (s.hits + s.misses) if s.hits + s.misses else None}
                       for name, s in router.services.items()},
            "lookups": {"memory_hits": c.memory_hits, "store_hits": c.store_hits, "misses": c.misses},
            "store_errors": c.store_errors,
            "memory": {"entries": memory.entries, "bytes": memory.bytes, "models": per_model(memory)},
            "store": None if store is None or cache.store is None else {
                "name": cache.store.name, "entries": store.entries, "bytes": store.bytes, "models": per_model(store)},
        })

    @app.delete("/cache", tags=["cache"])
    async def clear_cache(request: Request, model: str | None = None) -> Response:
        """Delete every entry, or one model's (``?model=`` a pool name or model id). Needs the admin key."""
        keys.check(request.url.path, request.headers.get("authorization"), admin=True)
        tag = None
        if model is not None:
            service = router.pick("/embed", model)
            if service.pool.info is None:
                raise errors.unhealthy(f"{model!r} has not answered /info yet")
            tag = service.pool.info.fingerprint.tag
        return json_response({"deleted": await cache.delete(tag)})

    routes.update(r.path for r in app.routes if hasattr(r, "path"))
    app.fast_path = fast_path
    return app
