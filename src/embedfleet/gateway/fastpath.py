"""The gateway's fast path: ``POST /embed`` and ``/v1/embeddings`` without FastAPI's per-request machinery.

It sits behind the edge (so keys, body limit, model prefix, metrics and the access log are already
handled) and in front of FastAPI. A well-formed request is parsed with orjson, validated by the same
pydantic models, served by the same functions as the routes (:func:`~embedfleet.gateway.routes.embed_tei`,
:func:`~embedfleet.gateway.routes.embed_openai`) and its errors rendered by the same edge. Anything it
would not serve (not JSON, a body the models refuse) goes on to FastAPI with the body replayed, so
every error leaves exactly as the routes write it.
"""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedfleet.api import errors
from embedfleet.api.edge import JSON, send_error
from embedfleet.api.errors import EdgeError
from embedfleet.api.schemas import EmbedRequest, OpenAIEmbeddingRequest
from embedfleet.engine.errors import EngineError
from embedfleet.gateway.routes import GatewayState, embed_openai, embed_tei

ROUTES = {path: errors.shape_of(path) is errors.Shape.OPENAI for path in ("/embed", "/v1/embeddings", "/embeddings")}
"""The routes the fast path serves, and whether each is an OpenAI one."""


class _Replay:
    """``receive`` for FastAPI after the fast path gave up: first what it read, then the rest."""

    def __init__(self, messages: list[Message], receive: Receive) -> None:
        self.messages = messages
        self.receive = receive

    async def __call__(self) -> Message:
        if self.messages:
            return self.messages.pop(0)
        return await self.receive()


def _is_json(content_type: bytes) -> bool:
    """``application/json``, with parameters or not, as FastAPI reads a JSON body (other ``+json`` types
    are left to FastAPI)."""
    return content_type.partition(b";")[0].strip().lower() == JSON


class FastPath:
    """ASGI middleware: serves the embedding routes of the gateway directly when it can."""

    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"] if scope["type"] == "http" and scope["method"] == "POST" else ""
        openai = ROUTES.get(path)
        if openai is None:
            await self.app(scope, receive, send)
            return
        content_type = x_model = cache_control = None
        for key, value in scope["headers"]:  # the first of each, as starlette's Headers.get
            if key == b"content-type":
                content_type = value if content_type is None else content_type
            elif key == b"x-model":
                x_model = value if x_model is None else x_model
            elif key == b"cache-control":
                cache_control = value if cache_control is None else cache_control
        if content_type is None or not _is_json(content_type):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        chunks: list[bytes] = []
        try:
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request":
                    await self.app(scope, _Replay(messages, receive), send)
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except StarletteHTTPException as exc:  # the edge's body limit
            await send_error(send, errors.from_status(exc.status_code, str(exc.detail)), path)
            return
        try:
            data = orjson.loads(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            req = OpenAIEmbeddingRequest.model_validate(data) if openai else EmbedRequest.model_validate(data)
        except Exception:  # not JSON, or not valid: FastAPI writes the error, as it always has
            await self.app(scope, _Replay(messages, receive), send)
            return
        state = self.state
        model = x_model.decode("latin-1") if x_model else None
        policy = state.policy(None if cache_control is None else cache_control.decode("latin-1"))
        try:
            if isinstance(req, OpenAIEmbeddingRequest):
                body, result = await embed_openai(state.pick(path, model, req.model), req, policy)
            else:
                body, result = await embed_tei(state.pick(path, model), req, policy)
        except (EngineError, EdgeError) as exc:
            await send_error(send, exc, path)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"x-cache", result.cache_status.encode()), (b"x-cache-hits", b"%d" % result.hits),
            (b"x-cache-misses", b"%d" % result.misses), (b"content-length", b"%d" % len(body)),
            (b"content-type", JSON)]})
        await send({"type": "http.response.body", "body": body})
