"""The protocols ``embedfleet bench`` speaks: one registry, one class per mode.

A mode turns a batch of texts into a request built before it is timed (:meth:`Mode.prepare`) and opens
channels (:meth:`Mode.channel`), one per concurrent client, that send such requests and return a
:class:`Reply`. The load loops (:mod:`embedfleet.bench.runner`) know nothing else of the protocol, so a mode
over another transport (gRPC, say) registers its own class with :func:`register` and needs no other change.
"""

from __future__ import annotations

import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

import orjson

from embedfleet.bench.loadgen import Connection, Endpoint, LoadError, build_requests, header_value

Encoding = Literal["float", "base64"]


class Reply(NamedTuple):
    """What one request got: a status (HTTP's), an error code for failures, and the cache's report."""

    status: int
    code: str | None  # the error type or code the server gave a failure (None for a success)
    cache: str | None  # X-Cache: hit, miss or partial (None when the target does not say)
    hits: int  # X-Cache-Hits (0 when absent)
    misses: int  # X-Cache-Misses (0 when absent)


class Channel(Protocol):
    """One client's connection to the target; requests on it go one at a time."""

    async def open(self) -> None:
        """Connect (a failure raises LoadError)."""

    async def send(self, request: Any) -> Reply:
        """Send one prepared request and wait for its reply (LoadError when it could not complete)."""

    def close(self) -> None:
        """Drop the connection."""

    def expire(self, now: float) -> None:
        """Abort the request under way if it is past the target's timeout (``now``: ``time.perf_counter()``);
        its :meth:`send` then raises LoadError("timeout"). Called by a watchdog, so that no request needs a
        timer of its own."""


@dataclass(frozen=True)
class Target:
    """Where and how to send: the endpoint and everything that is the same for every request."""

    endpoint: Endpoint
    tls: ssl.SSLContext | None = None
    api_key: str | None = None
    model: str | None = None
    encoding: Encoding = "float"
    timeout: float | None = None  # seconds a request may take before it counts as failed


class Mode(ABC):
    """A protocol: how texts become a request, and how requests are sent."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def __init__(self, target: Target) -> None:
        self.target = target

    @abstractmethod
    def prepare(self, texts: Sequence[str]) -> Any:
        """One request for these texts, ready to send (built outside the timed path)."""

    @abstractmethod
    def channel(self) -> Channel:
        """A new, unopened channel to the target."""


MODES: dict[str, type[Mode]] = {}
"""The modes by name, in the order they were registered."""


def register(mode: type[Mode]) -> type[Mode]:
    """Add a mode to :data:`MODES` (a class decorator)."""
    if mode.name in MODES:
        raise ValueError(f"mode {mode.name!r} is registered twice")
    MODES[mode.name] = mode
    return mode


def error_code(body: bytes) -> str | None:
    """The error type of a failure's body: embedfleet's and TEI's ``error_type``, OpenAI's ``error.type`` or
    ``error.code``, the admin API's ``code``; None when the body says none."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("error"), dict):
        doc = doc["error"]
    for key in ("error_type", "type", "code"):
        value = doc.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return None


NO_CACHE = Reply(200, None, None, 0, 0)
MAX_REPLY_FORMS = 4096


class HttpChannel:
    """A :class:`~embedfleet.bench.loadgen.Connection` that reads the cache headers of each answer."""

    def __init__(self, target: Target) -> None:
        self.connection = Connection(target.endpoint.host, target.endpoint.port, target.tls)
        self.timeout = target.timeout
        self.since = 0.0  # when the request under way was sent (0: none)
        self.replies: dict[bytes, Reply] = {}
        self.expired = False

    async def open(self) -> None:
        """Connect."""
        try:
            await self.connection.open()
        except OSError as exc:
            raise LoadError(f"{type(exc).__name__}: {exc}") from exc

    def expire(self, now: float) -> None:
        """Abort an overdue request: its connection is dropped (an answer that comes later is never read as
        the next request's)."""
        if self.timeout is not None and self.since and now - self.since > self.timeout:
            self.expired = True
            self.connection.abort()

    async def send(self, request: bytes) -> Reply:
        """Send one pre-built HTTP request."""
        self.since = time.perf_counter()
        try:
            status, head, body = await self.connection.request(request)
        except LoadError:
            if self.expired:
                self.expired = False
                raise LoadError("timeout") from None
            raise
        finally:
            self.since = 0.0
        if status != 200:
            return Reply(status, error_code(body), header_value(head, b"x-cache"), 0, 0)
        at = head.find(b"\r\nx-cache")
        if at < 0:
            return NO_CACHE
        # Answers repeat their cache headers (and what follows them): parse each form once.
        tail = head[at:]
        reply = self.replies.get(tail)
        if reply is None:
            reply = Reply(200, None, header_value(head, b"x-cache"), int(header_value(head, b"x-cache-hits") or 0),
                          int(header_value(head, b"x-cache-misses") or 0))
            if len(self.replies) < MAX_REPLY_FORMS:
                self.replies[tail] = reply
        return reply

    def close(self) -> None:
        """Drop the connection."""
        self.connection.close()


class HttpMode(Mode):
    """A JSON POST over keep-alive HTTP/1.1: subclasses give the route and the body."""

    path: ClassVar[str]

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        headers = {}
        if target.api_key:
            headers["authorization"] = f"Bearer {target.api_key}"
        headers.update(self.headers())
        self._head = build_requests(str(target.endpoint), self.route(), [b""], headers)[0][:-len(b"0\r\n\r\n")]

    def route(self) -> str:
        """The path after the endpoint's own prefix."""
        return self.path

    def headers(self) -> dict[str, str]:
        """Headers of this mode's requests beyond the content type and the API key."""
        return {}

    @abstractmethod
    def body(self, texts: Sequence[str]) -> bytes:
        """The JSON body for these texts."""

    def prepare(self, texts: Sequence[str]) -> bytes:
        """The whole HTTP request, bytes ready to write."""
        body = self.body(texts)
        return b"%s%d\r\n\r\n%s" % (self._head, len(body), body)

    def channel(self) -> HttpChannel:
        """A keep-alive connection."""
        return HttpChannel(self.target)


@register
class TeiMode(HttpMode):
    """text-embeddings-inference's ``POST /embed``: ``{"inputs": [...]}``."""

    name = "http"
    summary = "TEI POST /embed (JSON); --model goes in X-Model (embedfleet's multi-model gateways)"
    path = "/embed"

    def headers(self) -> dict[str, str]:
        """``X-Model`` when a model is named."""
        return {"x-model": self.target.model} if self.target.model else {}

    def body(self, texts: Sequence[str]) -> bytes:
        """``{"inputs": texts}``."""
        return orjson.dumps({"inputs": list(texts)})


@register
class OpenAIMode(HttpMode):
    """OpenAI's ``POST /v1/embeddings``: ``{"input": [...], "model": ..., "encoding_format": ...}``."""

    name = "openai"
    summary = "OpenAI POST /v1/embeddings (--encoding float or base64)"
    path = "/v1/embeddings"

    def route(self) -> str:
        """``/embeddings`` under a base URL that already ends in ``/v1`` (as OpenAI clients are given)."""
        return "/embeddings" if self.target.endpoint.prefix.endswith("/v1") else self.path

    def body(self, texts: Sequence[str]) -> bytes:
        """The OpenAI request (``model`` defaults to ``default``, which embedfleet and many servers take)."""
        return orjson.dumps({"input": list(texts), "model": self.target.model or "default",
                             "encoding_format": self.target.encoding})
