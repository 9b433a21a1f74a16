"""The gateway's gRPC server: ``tei.v1``, ``tei_multiplexer.v1``, ``grpc.health.v1`` and reflection.

It runs in the gateway process, on the HTTP app's event loop (started and stopped by the gateway's
lifespan), and calls the same service layer: the cache, single-flight, splitting, routing and failover
apply to both. Every method of every service, health and reflection included, is wrapped once
(:meth:`GrpcServer._wrap`) with what the HTTP edge does for a route: the API key check
(``authorization: Bearer KEY`` metadata, through :class:`~embedfleet.api.auth.Auth`; health is open, as
``/health`` is), the status code of an error (``embedfleet.api.errors.GRPC_CODE``, the one map) and the
metrics per method and code.

Streams answer in request order and read ahead at most :data:`STREAM_WINDOW` requests: when a client
reads slowly, the gateway stops reading its requests (HTTP/2 flow control then holds the client back),
so its memory does not grow with the stream. A client that cancels ends the stream's work at once
(computations other requests wait on carry on, for them and for the cache).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeAlias, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from embedfleet.api.auth import Access, Auth, Rule
from embedfleet.api.errors import EdgeError, grpc_code_of
from embedfleet.config import GatewaySettings
from embedfleet.engine.errors import EngineError
from embedfleet.gateway.routes import GatewayState
from embedfleet.gateway.service import CachePolicy, EmbeddingService
from embedfleet.grpc import arrow
from embedfleet.grpc.calls import TeiCalls, _truncate
from embedfleet.grpc.proto import tei_multiplexer_pb2 as mx
from embedfleet.grpc.proto import tei_pb2 as pb
from embedfleet.grpc.targets import Targets

log = logging.getLogger("embedfleet.grpc")

STREAM_WINDOW = 16
"""Requests of one stream in progress at most (read ahead of the answer the client is reading)."""
EMBED_WINDOW = 64
"""The same for ``EmbedStream``, whose answers are small and whose requests are batched (:func:`batched`)."""

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
MULTIPLEXER = "tei_multiplexer.v1.TeiMultiplexer"
TEI_SERVICES = ("tei.v1.Info", "tei.v1.Embed", "tei.v1.Predict", "tei.v1.Rerank", "tei.v1.Tokenize")
AUTH_RULES = (Rule(f"/{HEALTH}/", Access.OPEN),)
"""Health checks need no key (as HTTP's /health); every other method needs an API key where keys are set."""

SERVICE_TASKS: dict[str, tuple[str, ...] | None] = {
    "tei.v1.Embed": ("embedding", "sparse"), "tei.v1.Predict": ("classifier", "reranker"),
    "tei.v1.Rerank": ("reranker",), "tei.v1.Info": None, "tei.v1.Tokenize": None, MULTIPLEXER: None,
}
"""A service is SERVING while a healthy pool does one of its tasks (None: any task)."""

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Handlers: TypeAlias = "dict[str, Handler]"


def metadata(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str | None:
    """One metadata value of the call (None when absent)."""
    for item in context.invocation_metadata() or ():
        if item[0] == key:
            value = item[1]
            return value.decode() if isinstance(value, bytes) else value
    return None


Q = TypeVar("Q")


async def _next(queue: asyncio.Queue[Q], reader: asyncio.Task[None]) -> Q:
    """The queue's next item; the reader's error if it ends, having failed, before putting its end marker."""
    getter = asyncio.get_running_loop().create_task(queue.get())
    await asyncio.wait((getter, reader), return_when=asyncio.FIRST_COMPLETED)
    if not getter.done():
        getter.cancel()
        await reader  # raises its error
    return getter.result()


async def ordered(requests: AsyncIterator[Req], handle: Callable[[Req], Awaitable[Resp]],
                  window: int = STREAM_WINDOW) -> AsyncIterator[Resp]:
    """``handle`` each request, up to ``window`` at a time, and yield the answers in request order.

    A reader task takes requests as they come (so a client that waits for an answer before it sends
    the next one is served) and blocks once ``window`` answers wait to be read. When the consumer goes
    away (the client cancelled, or an answer failed), the reader and every request in progress are
    cancelled.
    """
    queue: asyncio.Queue[asyncio.Future[Resp] | None] = asyncio.Queue(window)
    loop = asyncio.get_running_loop()

    async def read() -> None:
        async for request in requests:
            await queue.put(loop.create_task(handle(request)))  # type: ignore[arg-type]
        await queue.put(None)

    reader = loop.create_task(read())
    try:
        while True:
            item = await _next(queue, reader)
            if item is None:
                return
            yield await item
    finally:
        reader.cancel()
        while not queue.empty():
            pending = queue.get_nowait()
            if pending is not None:
                pending.cancel()
                pending.add_done_callback(_retrieved)


async def batched(requests: AsyncIterator[Req], handle: Callable[[list[Req], int], Awaitable[list[Resp]]],
                  window: int = EMBED_WINDOW) -> AsyncIterator[Resp]:
    """As :func:`ordered`, but the requests that arrived while earlier ones were computed are handled together,
    as one batch (``handle`` answers a list of requests, the first at a given stream position, in order): a
    client streaming 32 texts gets them
    computed in two batches (the first text alone, then the rest), not as 32 calls of one text.

    No timer: whenever the answer the client is due next is not ready, every request read since the last
    batch starts as the next batch, so batches grow with the load and nothing waits to fill one.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[asyncio.Future[Resp] | None] = asyncio.Queue(window)
    waiting: list[tuple[Req, asyncio.Future[Resp]]] = []
    running: set[asyncio.Task[list[Resp]]] = set()
    started = 0

    async def read() -> None:
        async for request in requests:
            future: asyncio.Future[Resp] = loop.create_future()
            waiting.append((request, future))
            await queue.put(future)
        await queue.put(None)

    def settle(batch: list[tuple[Req, asyncio.Future[Resp]]], task: asyncio.Task[list[Resp]]) -> None:
        running.discard(task)
        futures = [f for _, f in batch]
        if task.cancelled():
            for f in futures:
                f.cancel()
        elif (exc := task.exception()) is not None:
            for f in futures:
                f.set_exception(exc)
                f.exception()  # the consumer re-raises it for the first; the rest are dropped quietly
        else:
            for f, answer in zip(futures, task.result(), strict=True):
                f.set_result(answer)

    def start() -> None:
        nonlocal started
        batch = waiting[:]
        waiting.clear()
        work = cast("Coroutine[Any, Any, list[Resp]]", handle([r for r, _ in batch], started))
        task = loop.create_task(work)
        running.add(task)
        started += len(batch)
        task.add_done_callback(lambda t: settle(batch, t))

    reader = loop.create_task(read())
    try:
        while True:
            item = await _next(queue, reader)
            if item is None:
                return
            if not item.done() and waiting:
                start()
            yield await item
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a dropped task's outcome as seen (no "exception was never retrieved" in the log)."""
    if not task.cancelled():
        task.exception()


def _capture(add: Callable[[Any, Any], None], servicer: Any) -> tuple[str, Handlers]:
    """The method handlers a generated ``add_*Servicer_to_server`` registers, captured for wrapping."""

    class Capture:
        def __init__(self) -> None:
            self.name = ""
            self.handlers: Handlers = {}

        def add_generic_rpc_handlers(self, _: Any) -> None:
            pass

        def add_registered_method_handlers(self, name: str, handlers: Handlers) -> None:
            self.name, self.handlers = name, dict(handlers)

    capture = Capture()
    add(servicer, capture)
    return capture.name, capture.handlers


class GrpcServer:
    """The gRPC services over the gateway's state, on one port."""

    def __init__(self, state: GatewayState, auth: Auth, targets: Targets, settings: GatewaySettings,
                 registry: CollectorRegistry) -> None:
        self.state = state
        self.auth = auth
        self.targets = targets
        self.settings = settings
        self.calls = TeiCalls(state.max_client_batch_size)
        auth.declare(*AUTH_RULES)
        self.requests = Counter("embedfleet_grpc_requests", "gRPC calls by method and status code",
                                ["method", "code"], registry=registry)
        self.durations = Histogram("embedfleet_grpc_request_duration_seconds", "gRPC call duration",
                                   ["method", "code"], registry=registry)
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._watch: asyncio.Task[None] | None = None

    # -- wrapping: auth, status codes, metrics ------------------------------------------------------

    def _observe(self, method: str, code: str, started: float) -> None:
        children = self._children.get((method, code))
        if children is None:  # labels() costs more than the increment: each pair is looked up once
            children = self._children[method, code] = (self.requests.labels(method, code),
                                                       self.durations.labels(method, code))
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    @staticmethod
    def _code(method: str, exc: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str | None]:
        """The status code of a method's error, and the message to abort the call with (None: the method
        aborted it itself)."""
        if isinstance(exc, EngineError | EdgeError):
            return grpc_code_of(exc), exc.message
        if isinstance(exc, grpc.aio.AbortError):
            code = context.code() if hasattr(context, "code") else None
            return (code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"), None
        log.error("gRPC %s failed", method, exc_info=exc)
        return "INTERNAL", f"internal error: {type(exc).__name__}"

    def _check(self, path: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not self.auth.open:
            self.auth.check("POST", path, metadata(context, "authorization"))

    def _wrap(self, service: str, name: str, handler: Handler) -> Handler:
        """The handler with the key check, the error's status code and the metrics around it."""
        path = f"/{service}/{name}"
        if handler.response_streaming:
            stream_behavior: Any = handler.unary_stream or handler.stream_stream

            async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                started = time.perf_counter()
                try:
                    self._check(path, context)
                    async for item in stream_behavior(request, context):
                        yield item
                except Exception as exc:
                    code, message = self._code(path, exc, context)
                    self._observe(path, code, started)
                    if message is not None:
                        await context.abort(grpc.StatusCode[code], message)
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    self._observe(path, "CANCELLED", started)
                    raise
                self._observe(path, "OK", started)

            field = "unary_stream" if handler.unary_stream else "stream_stream"
            return handler._replace(**{field: streaming})  # type: ignore[attr-defined,no-any-return]
        behavior: Any = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            try:
                self._check(path, context)
                answer = await behavior(request, context)
            except Exception as exc:
                code, message = self._code(path, exc, context)
                self._observe(path, code, started)
                if message is not None:
                    await context.abort(grpc.StatusCode[code], message)
                raise
            except asyncio.CancelledError:
                self._observe(path, "CANCELLED", started)
                raise
            self._observe(path, "OK", started)
            return answer

        field = "unary_unary" if handler.unary_unary else "stream_unary"
        return handler._replace(**{field: unary})  # type: ignore[attr-defined,no-any-return]

    # -- request helpers ------------------------------------------------------------------------------

    def _policy(self, context: grpc.aio.ServicerContext[Any, Any]) -> CachePolicy:
        return self.state.policy(metadata(context, "cache-control"))

    def _pick(self, route: str, context: grpc.aio.ServicerContext[Any, Any]) -> EmbeddingService:
        return self.targets.pick(route, metadata(context, "x-model"))

    def _target(self, route: str, target: mx.Target, context: grpc.aio.ServicerContext[Any, Any]) -> EmbeddingService:
        kind = target.WhichOneof("routing")
        return self.targets.resolve(route, kind, getattr(target, kind) if kind else None,
                                    metadata(context, "x-model"))

    # -- the services ----------------------------------------------------------------------------------

    def _tei(self) -> dict[str, Handlers]:
        """``tei.v1``: each method on the pool ``x-model`` names, else the one whose task fits."""
        calls, pick, policy = self.calls, self._pick, self._policy

        async def info(req: pb.InfoRequest, ctx: Any) -> pb.InfoResponse:
            return calls.info(pick("/info", ctx))

        async def embed(req: pb.EmbedRequest, ctx: Any) -> bytes:  # a serialised EmbedResponse
            return await calls.embed(pick("/embed", ctx), req, policy(ctx))

        def embed_stream(reqs: AsyncIterator[pb.EmbedRequest], ctx: Any) -> AsyncIterator[bytes]:
            service, cache = pick("/embed", ctx), policy(ctx)
            return batched(reqs, lambda rs, first: calls.embed_many([(service, r) for r in rs], cache, first))

        def stream(route: str, call: Callable[[EmbeddingService, Any], Awaitable[Any]]) -> Callable[..., Any]:
            def run(reqs: AsyncIterator[Any], ctx: Any) -> AsyncIterator[Any]:
                service = pick(route, ctx)
                return ordered(reqs, lambda r: call(service, r))
            return run

        def unary(route: str, call: Callable[[EmbeddingService, Any], Awaitable[Any]]) -> Callable[..., Any]:
            async def run(req: Any, ctx: Any) -> Any:
                return await call(pick(route, ctx), req)
            return run

        async def rerank_stream(reqs: AsyncIterator[pb.RerankStreamRequest], ctx: Any) -> pb.RerankResponse:
            service = pick("/rerank", ctx)
            return await calls.rerank_stream(service, [r async for r in reqs])

        return {
            "tei.v1.Info": {"Info": _uu(info, pb.InfoRequest, pb.InfoResponse)},
            "tei.v1.Embed": {
                "Embed": _uu(embed, pb.EmbedRequest, pb.EmbedResponse),
                "EmbedStream": _ss(embed_stream, pb.EmbedRequest, pb.EmbedResponse),
                "EmbedSparse": _uu(unary("/embed_sparse", calls.embed_sparse), pb.EmbedSparseRequest,
                                   pb.EmbedSparseResponse),
                "EmbedSparseStream": _ss(stream("/embed_sparse", calls.embed_sparse), pb.EmbedSparseRequest,
                                         pb.EmbedSparseResponse),
                "EmbedAll": _uu(unary("/embed_all", calls.embed_all), pb.EmbedAllRequest, pb.EmbedAllResponse),
                "EmbedAllStream": _ss(stream("/embed_all", calls.embed_all), pb.EmbedAllRequest, pb.EmbedAllResponse),
            },
            "tei.v1.Predict": {
                "Predict": _uu(unary("/predict", calls.predict), pb.PredictRequest, pb.PredictResponse),
                "PredictPair": _uu(unary("/predict", calls.predict_pair), pb.PredictPairRequest, pb.PredictResponse),
                "PredictStream": _ss(stream("/predict", calls.predict), pb.PredictRequest, pb.PredictResponse),
                "PredictPairStream": _ss(stream("/predict", calls.predict_pair), pb.PredictPairRequest,
                                         pb.PredictResponse),
            },
            "tei.v1.Rerank": {
                "Rerank": _uu(unary("/rerank", calls.rerank), pb.RerankRequest, pb.RerankResponse),
                "RerankStream": _su(rerank_stream, pb.RerankStreamRequest, pb.RerankResponse),
            },
            "tei.v1.Tokenize": {
                "Tokenize": _uu(unary("/tokenize", calls.tokenize), pb.EncodeRequest, pb.EncodeResponse),
                "TokenizeStream": _ss(stream("/tokenize", calls.tokenize), pb.EncodeRequest, pb.EncodeResponse),
                "Decode": _uu(unary("/decode", calls.decode), pb.DecodeRequest, pb.DecodeResponse),
                "DecodeStream": _ss(stream("/decode", calls.decode), pb.DecodeRequest, pb.DecodeResponse),
            },
        }

    def _multiplexer(self) -> Handlers:
        """``tei_multiplexer.v1.TeiMultiplexer``: each message routed by its ``Target``."""
        calls, target, policy, settings = self.calls, self._target, self._policy, self.settings

        def unary(route: str, call: Callable[..., Awaitable[Any]], cached: bool = False) -> Callable[..., Any]:
            async def run(req: Any, ctx: Any) -> Any:
                service = target(route, req.target, ctx)
                return await (call(service, req.request, policy(ctx)) if cached else call(service, req.request))
            return run

        def stream(route: str, call: Callable[..., Awaitable[Any]], cached: bool = False) -> Callable[..., Any]:
            def run(reqs: AsyncIterator[Any], ctx: Any) -> AsyncIterator[Any]:
                cache = policy(ctx)

                async def one(req: Any) -> Any:
                    service = target(route, req.target, ctx)
                    return await (call(service, req.request, cache) if cached else call(service, req.request))
                return ordered(reqs, one)
            return run

        def embed_stream(reqs: AsyncIterator[mx.EmbedRequest], ctx: Any) -> AsyncIterator[bytes]:
            cache = policy(ctx)
            return batched(reqs, lambda rs, first: calls.embed_many([(target("/embed", r.target, ctx), r.request)
                                                                      for r in rs], cache, first))

        async def info(req: mx.InfoRequest, ctx: Any) -> pb.InfoResponse:
            return calls.info(target("/info", req.target, ctx))

        async def rerank_stream(reqs: AsyncIterator[mx.RerankStreamRequest], ctx: Any) -> pb.RerankResponse:
            messages = [r async for r in reqs]
            service = target("/rerank", messages[0].target if messages else mx.Target(), ctx)
            return await calls.rerank_stream(service, [m.request for m in messages])

        async def embed_arrow(req: mx.EmbedArrowRequest, ctx: Any) -> mx.EmbedArrowResponse:
            service = target("/embed", req.target, ctx)
            return mx.EmbedArrowResponse(arrow_ipc=await arrow.embed_arrow(
                service, req.arrow_ipc, truncate=_truncate(req.truncate), normalize=req.normalize, noop=req.noop,
                max_rows=settings.arrow_max_rows, policy=policy(ctx)))

        async def embed_sparse_arrow(req: mx.EmbedSparseArrowRequest, ctx: Any) -> mx.EmbedSparseArrowResponse:
            service = target("/embed_sparse", req.target, ctx)
            return mx.EmbedSparseArrowResponse(arrow_ipc=await arrow.embed_sparse_arrow(
                service, req.arrow_ipc, truncate=_truncate(req.truncate), noop=req.noop,
                max_rows=settings.arrow_max_rows))

        return {
            "Info": _uu(info, mx.InfoRequest, pb.InfoResponse),
            "Embed": _uu(unary("/embed", calls.embed, cached=True), mx.EmbedRequest, pb.EmbedResponse),
            "EmbedStream": _ss(embed_stream, mx.EmbedRequest, pb.EmbedResponse),
            "EmbedSparse": _uu(unary("/embed_sparse", calls.embed_sparse), mx.EmbedSparseRequest,
                               pb.EmbedSparseResponse),
            "EmbedSparseStream": _ss(stream("/embed_sparse", calls.embed_sparse), mx.EmbedSparseRequest,
                                     pb.EmbedSparseResponse),
            "EmbedAll": _uu(unary("/embed_all", calls.embed_all), mx.EmbedAllRequest, pb.EmbedAllResponse),
            "EmbedAllStream": _ss(stream("/embed_all", calls.embed_all), mx.EmbedAllRequest, pb.EmbedAllResponse),
            "EmbedArrow": _uu(embed_arrow, mx.EmbedArrowRequest, mx.EmbedArrowResponse),
            "EmbedSparseArrow": _uu(embed_sparse_arrow, mx.EmbedSparseArrowRequest, mx.EmbedSparseArrowResponse),
            "Predict": _uu(unary("/predict", calls.predict), mx.PredictRequest, pb.PredictResponse),
            "PredictPair": _uu(unary("/predict", calls.predict_pair), mx.PredictPairRequest, pb.PredictResponse),
            "PredictStream": _ss(stream("/predict", calls.predict), mx.PredictRequest, pb.PredictResponse),
            "PredictPairStream": _ss(stream("/predict", calls.predict_pair), mx.PredictPairRequest,
                                     pb.PredictResponse),
            "Rerank": _uu(unary("/rerank", calls.rerank), mx.RerankRequest, pb.RerankResponse),
            "RerankStream": _su(rerank_stream, mx.RerankStreamRequest, pb.RerankResponse),
            "Tokenize": _uu(unary("/tokenize", calls.tokenize), mx.EncodeRequest, pb.EncodeResponse),
            "TokenizeStream": _ss(stream("/tokenize", calls.tokenize), mx.EncodeRequest, pb.EncodeResponse),
            "Decode": _uu(unary("/decode", calls.decode), mx.DecodeRequest, pb.DecodeResponse),
            "DecodeStream": _ss(stream("/decode", calls.decode), mx.DecodeRequest, pb.DecodeResponse),
        }

    def services(self) -> dict[str, Handlers]:
        """Every service's method handlers, wrapped."""
        names = [*TEI_SERVICES, MULTIPLEXER, HEALTH, REFLECTION]
        raw: dict[str, Handlers] = {**self._tei(), MULTIPLEXER: self._multiplexer()}
        for add, servicer in ((health_pb2_grpc.add_HealthServicer_to_server, self.health),
                              (reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
                               reflection_aio.ReflectionServicer(names))):
            name, handlers = _capture(add, servicer)
            raw[name] = handlers
        return {service: {m: self._wrap(service, m, h) for m, h in handlers.items()}
                for service, handlers in raw.items()}

    # -- health ------------------------------------------------------------------------------------------

    async def update_health(self) -> None:
        """Each service SERVING while a healthy pool does its task; the server (``""``) while every pool has
        a healthy replica (as HTTP's /health)."""
        services = list(self.state.router.services.values())
        healthy = [s for s in services if s.pool.healthy]
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", serving if services and len(healthy) == len(services) else not_serving)
        for name, tasks in SERVICE_TASKS.items():
            fits = any(tasks is None or (s.pool.info is not None and s.pool.info.fingerprint.task in tasks)
                       for s in healthy)
            await self.health.set(name, serving if fits else not_serving)

    async def _follow_health(self) -> None:
        while True:
            try:
                await self.update_health()
            except Exception:  # never let the watcher die
                log.exception("gRPC health update failed")
            await asyncio.sleep(self.settings.health_interval)

    # -- lifecycle -----------------------------------------------------------------------------------------

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        ca = Path(s.tls_client_ca).read_bytes() if s.tls_client_ca is not None else None
        return grpc.ssl_server_credentials([(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())],
                                           root_certificates=ca, require_client_auth=ca is not None)

    async def start(self) -> None:
        """Listen on ``--grpc-port`` (TLS and mTLS as the HTTP server) and follow the pools' health."""
        limit = self.settings.grpc_max_message_bytes
        # Beyond --max-concurrent-requests calls under way, grpc answers RESOURCE_EXHAUSTED (HTTP's 429).
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                   ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(maximum_concurrent_rpcs=self.settings.max_concurrent_requests, options=options)
        for service, handlers in self.services().items():
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
            server.add_registered_method_handlers(service, handlers)
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        credentials = self._credentials()
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        if port == 0:
            raise RuntimeError(f"cannot listen for gRPC on {address}")
        await server.start()
        self.server, self.port = server, port
        await self.update_health()
        self._watch = asyncio.get_running_loop().create_task(self._follow_health(), name="grpc-health")
        log.info("gRPC on %s:%d (%s): tei.v1, tei_multiplexer.v1, grpc.health.v1, reflection", self.settings.host,
                 port, "TLS" if credentials else "plaintext")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls; those under way get ``grace`` seconds."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)


def _serializer(resp: Any) -> Callable[[Any], bytes]:
    """A message's serializer that also passes answers already serialised (``Embed``'s) through."""
    serialize = resp.SerializeToString

    def run(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)  # type: ignore[no-any-return]
    return run


def _uu(fn: Callable[..., Any], req: Any, resp: Any) -> Handler:
    return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req.FromString,
                                               response_serializer=_serializer(resp))


def _su(fn: Callable[..., Any], req: Any, resp: Any) -> Handler:
    return grpc.stream_unary_rpc_method_handler(fn, request_deserializer=req.FromString,
                                                response_serializer=_serializer(resp))


def _ss(fn: Callable[..., Any], req: Any, resp: Any) -> Handler:
    return grpc.stream_stream_rpc_method_handler(fn, request_deserializer=req.FromString,
                                                 response_serializer=_serializer(resp))


def service_names(handlers: Mapping[str, Handlers]) -> list[str]:
    """The full names of the services served (what reflection lists)."""
    return list(handlers)
