"""HTTP plumbing shared by the worker and the gateway: JSON responses, the error handlers that
turn every failure into TEI's (or OpenAI's) error body, the request-body limit, the access log."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedfleet.api import errors
from embedfleet.api.errors import EmbedfleetError

Hook = Callable[[], Awaitable[None]]

KEEP_ALIVE_S = 75
"""How long the worker and the gateway keep an idle client connection open (uvicorn's default: 5 s).
Longer than the idle timeouts of the clients and proxies in front of them (httpx 5 s, aiohttp 15 s,
the gateway's 30 s, nginx's upstream keepalive 60 s), so it is the client that closes an idle
connection, never the server just as the client sends a request on it."""


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


def is_openai(path: str) -> bool:
    """Routes that answer errors in OpenAI's shape."""
    return path.startswith("/v1/") or path == "/embeddings"


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """orjson-serialised JSON (numpy arrays included)."""
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


class BodyLimit:
    """ASGI middleware: bodies over the limit get 413 before they are read into memory."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, errors.payload_too_large(limit), is_openai(scope["path"]))
            return
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

        await self.app(scope, limited, send)


async def _send_error(send: Send, err: EmbedfleetError, openai: bool) -> None:
    body = err.render(openai)
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
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


def install_error_handlers(app: FastAPI, on_error: Callable[[EmbedfleetError], None] | None = None,
                           access_log: logging.Logger | None = None) -> None:
    """Every failure leaves as TEI's error body (OpenAI's on /v1/*), with its status; a debug access log."""

    @app.exception_handler(EmbedfleetError)
    async def _embedfleet_error(request: Request, exc: EmbedfleetError) -> Response:
        if on_error is not None:
            on_error(exc)
        return Response(exc.render(is_openai(request.url.path)), status_code=exc.status,
                        media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return await _embedfleet_error(request, errors.validation(validation_message(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        err = EmbedfleetError(errors.ErrorType.VALIDATION, f"{exc.detail}: {request.method} {request.url.path}",
                              status=exc.status_code)
        return Response(err.render(is_openai(request.url.path)), status_code=exc.status_code,
                        media_type="application/json")

    if access_log is not None:
        app.add_middleware(AccessLog, logger=access_log)  # type: ignore[arg-type]


class AccessLog:
    """ASGI middleware: one structured debug line per request (free when debug is off).

    Plain ASGI rather than ``@app.middleware``: starlette's BaseHTTPMiddleware adds task groups and
    streams to every request, which measured as half the gateway's cache-hit CPU.
    """

    def __init__(self, app: ASGIApp, logger: logging.Logger) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.logger.isEnabledFor(logging.DEBUG):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        tokens: str | None = None

        async def observed(message: Message) -> None:
            nonlocal status, tokens
            if message["type"] == "http.response.start":
                status = message["status"]
                tokens = dict(message.get("headers", [])).get(b"x-compute-tokens", b"").decode() or None
            await send(message)

        await self.app(scope, receive, observed)
        self.logger.debug("request", extra={"method": scope["method"], "path": scope["path"], "status": status,
                                            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                                            "tokens": tokens})
