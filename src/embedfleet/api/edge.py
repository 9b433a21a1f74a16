"""The HTTP edge shared by the worker, the gateway and the admin API.

Each concern is written once here: batch normalisation (:func:`batch`), the body limit, API keys,
model routing by path prefix, latency metrics and the access log (all in the :class:`Edge` ASGI
middleware, one layer for the lot), error rendering (:func:`send_error` and the handlers of
:func:`install_error_handlers`, both through :func:`embedfleet.api.errors.render`), and the server's
configuration (:func:`server_config`).
"""

from __future__ import annotations

import gc
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import Histogram
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedfleet.api import errors
from embedfleet.api.auth import Auth
from embedfleet.api.errors import ClientError, EdgeError
from embedfleet.engine import errors as engine_errors
from embedfleet.engine.errors import EngineError
from embedfleet.fleet.errors import FleetError

Hook = Callable[[], Awaitable[None]]

KEEP_ALIVE_S = 75
"""How long the worker and the gateway keep an idle client connection open (uvicorn's default: 5 s).
Longer than the idle timeouts of the clients and proxies in front of them (httpx 5 s, aiohttp 15 s,
the gateway's 30 s, nginx's upstream keepalive 60 s), so it is the client that closes an idle
connection, never the server just as the client sends a request on it."""

JSON = b"application/json"


def batch(value: str | list[Any]) -> list[str | list[int]]:
    """TEI's ``Input`` (one input or a batch of them; each a text or token ids) as a batch."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [value]  # one sequence of token ids
    return list(value)


def count_token_ids(value: Any) -> int:
    """The token ids in an input field (``inputs``, ``ids``): a sequence of ids or a batch of them (texts
    count 0)."""
    if not isinstance(value, list):
        return 0
    return sum(len(v) if isinstance(v, list) else isinstance(v, int) for v in value)


def model_prefix(path: str) -> tuple[str, str | None]:
    """``/models/{name}/embed`` is ``/embed`` for model ``name``, and ``/models/{name}`` its base URL ``/``;
    other paths name no model."""
    if path.startswith("/models/"):
        name, _, rest = path[len("/models/"):].partition("/")
        if name:
            return "/" + rest, name
    return path, None


def lifespan(on_startup: Hook | None,
             on_shutdown: Hook | None) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A FastAPI lifespan that runs the start-up hook, serves, then the shut-down hook."""

    @asynccontextmanager
    async def run(_: FastAPI) -> AsyncIterator[None]:
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()

    return run


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """orjson-serialised JSON (numpy arrays included)."""
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(exc: ClientError, path: str) -> Response:
    """The response for an error raised by the route at ``path``."""
    status, body = errors.render(exc, path)
    return Response(body, status_code=status, media_type="application/json", headers=_extra_headers(exc))


def _extra_headers(exc: ClientError) -> dict[str, str] | None:
    if isinstance(exc, EdgeError) and exc.kind is errors.EdgeKind.UNAUTHORIZED:
        return {"www-authenticate": "Bearer"}
    if isinstance(exc, EngineError) and exc.input is not None:
        # The input at fault, for a gateway that cut the client's batch: it names the client's position.
        return {INPUT_HEADER: str(exc.input)}
    return None


INPUT_HEADER = "x-error-input"
"""Response header of an error about one input: its position in the request's batch."""

MODEL_HEADER = "x-embedfleet-model"
"""Response header of a worker's answers: the tag of the model fingerprint that computed them, which a
gateway checks against the fingerprint it keys the answer's cache entries with."""


async def send_error(send: Send, exc: ClientError, path: str, rendered: tuple[int, bytes] | None = None) -> None:
    """Answer a raw ASGI request with an error (``rendered``: its status and body, where already made)."""
    status, body = rendered or errors.render(exc, path)
    headers = [(b"content-type", JSON), (b"content-length", b"%d" % len(body))]
    headers += [(k.encode(), v.encode()) for k, v in (_extra_headers(exc) or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def validation_message(exc: RequestValidationError) -> str:
    """One readable line: the first problem of each field. A union type reports one error per variant
    (``inputs.str``, ``inputs.list[...]``), so a field with several errors is named alone."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"Json deserialize error: {err.get('ctx', {}).get('error', 'invalid JSON')}"
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        grouped.setdefault(loc[0] if loc else "body", []).append(err)
    parts = []
    for field, errs in grouped.items():
        loc = [str(p) for p in errs[0].get("loc", ()) if p != "body"]
        path = ".".join(loc) if len(errs) == 1 and loc else field
        detail = errs[0].get("msg") if len(errs) == 1 else "invalid type or value"
        parts.append(f"`{path}`: {detail}")
    return "Json deserialize error: " + "; ".join(parts)


def install_error_handlers(app: FastAPI, on_error: Callable[[EngineError], None] | None = None) -> None:
    """Every failure leaves in its route's error shape (TEI's, OpenAI's on /v1/*, the admin's on
    /admin/*), with its status; FastAPI's own 404, 405 and 422 included. ``on_error`` sees engine errors
    (the worker counts them)."""

    async def client_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EngineError | EdgeError | FleetError)
        if on_error is not None and isinstance(exc, EngineError):
            on_error(exc)
        return error_response(exc, request.url.path)

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return await client_error(request, engine_errors.validation(validation_message(exc)))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if exc.status_code == 413 else f"{exc.detail}: {request.method} {request.url.path}"
        return error_response(errors.from_status(exc.status_code, detail), request.url.path)

    for kind in (EngineError, EdgeError, FleetError):
        app.add_exception_handler(kind, client_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body validated by ``model``, failing as FastAPI's own body parsing does (for routes whose
    body model is only known once the request is in: ``POST /`` serves the model's task)."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


class Edge:
    """ASGI middleware in front of an app: every request's cross-cutting rules, in one layer.

    In order: ``/models/{name}/...`` becomes ``.../`` with ``X-Model: name`` (``route_models``); the API
    key the route needs (``auth``); a declared body over ``limit`` is refused before it is read, and
    a body that grows past it while read fails with 413; the request's latency by route and status
    (``durations``, for ``routes``; others count as ``other``); one debug access-log line. With
    ``max_in_flight``, a POST beyond that many under way is answered 429 ``Overloaded`` at once.
    """

    def __init__(self, app: ASGIApp, limit: int, auth: Auth | None = None, route_models: bool = False,
                 durations: Histogram | None = None, routes: Iterable[str] = (),
                 access_log: logging.Logger | None = None, max_in_flight: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.auth = auth
        self.route_models = route_models
        self.durations = durations
        self.routes = set(routes)
        self.access_log = access_log
        self._timers: dict[tuple[str, int], Any] = {}  # the histogram's children, by route and status
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # POSTs under way

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        if self.route_models and path.startswith("/models/"):
            path, model = model_prefix(path)
            if model is not None:
                headers = [(k, v) for k, v in scope["headers"] if k != b"x-model"]
                scope = {**scope, "path": path, "raw_path": path.encode(),
                         "headers": [*headers, (b"x-model", model.encode())]}
        logging_on = self._logging()
        status = 500
        tokens: bytes | None = None

        async def observed(message: Message) -> None:
            nonlocal status, tokens
            if message["type"] == "http.response.start":
                status = message["status"]
                if logging_on:
                    tokens = next((v for k, v in message.get("headers", ()) if k == b"x-compute-tokens"), None)
            await send(message)

        counted = False
        try:
            problem, declared = self._refusal(scope)
            cap = self.max_in_flight
            if problem is None and cap is not None and scope["method"] == "POST":
                if self.in_flight >= cap:
                    problem = engine_errors.overloaded(f"more than {cap} requests under way; retry later")
                else:
                    counted = True
                    self.in_flight += 1
            if problem is not None:
                status, body = errors.render(problem, path)
                await send_error(send, problem, path, (status, body))
                return
            # A declared length within the limit is all the server reads (HTTP framing); a body of unknown
            # length (chunked) is counted as it comes.
            await self.app(scope, receive if declared else self._limited(receive), observed)
        finally:
            if counted:
                self.in_flight -= 1
            self._observe(scope, path, status, started, tokens, logging_on)

    def _refusal(self, scope: Scope) -> tuple[ClientError | None, bool]:
        """Why the request is refused before it is read (no valid key, or a declared body too large), and
        whether its body has a declared length within the limit."""
        authorization = declared = None
        asks_cors = False
        for key, value in scope["headers"]:
            if key == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif key == b"content-length":
                declared = value
            elif key == b"access-control-request-method":
                asks_cors = True
        preflight = asks_cors and scope["method"] == "OPTIONS"  # carries no key, and does no work
        if self.auth is not None and not preflight:
            try:
                self.auth.check(scope["method"], scope["path"], authorization)
            except EdgeError as exc:
                return exc, False
        if declared is None or not declared.isdigit():
            return None, False
        if int(declared) > self.limit:
            return errors.payload_too_large(self.limit), False
        return None, True

    def _limited(self, receive: Receive) -> Receive:
        limit = self.limit
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # An HTTPException survives FastAPI's body reading (others become a 400).
                    raise StarletteHTTPException(413, errors.payload_too_large(limit).message)
            return message

        return limited

    def _logging(self) -> bool:
        return self.access_log is not None and self.access_log.isEnabledFor(logging.DEBUG)

    def _observe(self, scope: Scope, path: str, status: int, started: float, tokens: bytes | None,
                 logging_on: bool) -> None:
        elapsed = time.perf_counter() - started
        if self.durations is not None:
            route = path if path in self.routes else "other"
            child = self._timers.get((route, status))
            if child is None:
                child = self._timers[(route, status)] = self.durations.labels(route, str(status))
            child.observe(elapsed)
        if logging_on and self.access_log is not None:
            self.access_log.debug("request", extra={"method": scope["method"], "path": path, "status": status,
                                                    "duration_ms": round(elapsed * 1000, 2),
                                                    "tokens": tokens.decode() if tokens else None})


def freeze_startup_objects() -> None:
    """Keep what start-up made (models, modules, routes), which never dies, out of every full GC pass:
    those passes' pauses were the p99 under load."""
    gc.freeze()


def server_config(app: ASGIApp, host: str, port: int, tls_cert: Path | None = None, tls_key: Path | None = None,
                  tls_client_ca: Path | None = None) -> uvicorn.Config:
    """uvicorn's configuration for one of our servers: our logging, HTTPS and mTLS when configured, long
    keep-alive (:data:`KEEP_ALIVE_S`), and SIGTERM drains requests for up to 10 s."""
    tls: dict[str, Any] = {}
    if tls_cert is not None:
        tls = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)}
        if tls_client_ca is not None:
            tls |= {"ssl_ca_certs": str(tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=10,
                          timeout_keep_alive=KEEP_ALIVE_S, lifespan="on", **tls)
