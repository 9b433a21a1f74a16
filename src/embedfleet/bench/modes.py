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
    """What one request got: a status (HTTP's, or the name of gRPC's code), an error code for failures, and the
    cache's report."""

    status: int | str  # 200 ... for HTTP; "OK", "NOT_FOUND" ... for gRPC
    code: str | None  # the error type or code the server gave a failure (None for a success)
    cache: str | None  # X-Cache: hit, miss or partial (None when the target does not say)
    hits: int  # X-Cache-Hits (0 when absent)
    misses: int  # X-Cache-Misses (0 when absent)

    @property
    def ok(self) -> bool:
        """A success: HTTP 200 or gRPC OK."""
        return self.status == 200 or self.status == "OK"

    @property
    def error(self) -> str:
        """How a failure is counted: ``404 NotFound`` (HTTP status and error type), ``NOT_FOUND`` (gRPC)."""
        return f"{self.status} {self.code or ''}".strip()


class Channel(Protocol):
    """One client's connection to the target; requests on it go one at a time."""

    async def open(self) -> None:
        """Connect (a failure raises LoadError)."""

    async def send(self, request: Any) -> Reply:
        """Send one prepared request and wait for its reply (LoadError when it could not complete)."""

    async def close(self) -> None:
        """Drop the connection."""

    def expire(self, now: float) -> None:
        """Abort the request under way if it is past the target's timeout (``now``: ``time.perf_counter()``);
        its :meth:`send` then raises LoadError("timeout"). Called by a watchdog, so that no request needs a
        timer of its own."""


TargetKind = Literal["instance_name", "model_id", "instance_index"]
TARGET_FLAGS: dict[str, TargetKind] = {"name": "instance_name", "model": "model_id", "index": "instance_index"}


def parse_target(text: str) -> tuple[TargetKind, str | int]:
    """``--target name=X|model=Y|index=N``: the multiplexer's ``Target`` field and its value (ValueError when
    malformed)."""
    flag, sep, value = text.partition("=")
    if not sep or flag not in TARGET_FLAGS or not value:
        raise ValueError(f"--target {text!r}: give name=INSTANCE, model=MODEL_ID or index=N")
    kind = TARGET_FLAGS[flag]
    if kind != "instance_index":
        return kind, value
    if not value.isdigit():
        raise ValueError(f"--target {text!r}: index is a number from 0")
    return kind, int(value)


@dataclass(frozen=True)
class GrpcTls:
    """PEM bytes of a grpcs:// client: the CA to verify the server with (None: the system's), and the client's
    key and certificate chain for mTLS."""

    root: bytes | None = None
    key: bytes | None = None
    chain: bytes | None = None


@dataclass(frozen=True)
class Target:
    """Where and how to send: the endpoint and everything that is the same for every request."""

    endpoint: Endpoint
    tls: ssl.SSLContext | None = None
    api_key: str | None = None
    model: str | None = None
    encoding: Encoding = "float"
    timeout: float | None = None  # seconds a request may take before it counts as failed
    grpc_tls: GrpcTls | None = None  # grpcs://
    pick: tuple[TargetKind, str | int] | None = None  # --target: the multiplexer's Target
    compression: str | None = None  # Arrow IPC body compression: "lz4" or "zstd" (None: none)


class Mode(ABC):
    """A protocol: how texts become a request, and how requests are sent."""

    name: ClassVar[str]
    summary: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]] = ("http", "https")
    """The URL schemes the mode speaks."""

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

    async def close(self) -> None:
        """Drop the connection."""
        self.connection.close()


class HttpMode(Mode):
    """A POST (JSON, unless ``content_type`` says otherwise) over keep-alive HTTP/1.1: subclasses give the route
    and the body."""

    path: ClassVar[str]
    content_type: ClassVar[str] = "application/json"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        headers = {}
        if target.api_key:
            headers["authorization"] = f"Bearer {target.api_key}"
        headers.update(self.headers())
        self._head = build_requests(str(target.endpoint), self.route(), [b""], headers,
                                    self.content_type)[0][:-len(b"0\r\n\r\n")]

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


GRPC_OK = Reply("OK", None, None, 0, 0)


class GrpcChannel:
    """One ``grpc.aio`` channel (one HTTP/2 connection) and its calls. Requests and answers are bytes (the calls
    have no serializers): a request is one serialised message (a unary call) or a tuple of them (one
    streaming call, whose answers are read and dropped). Failures are counted by the name of their status
    code; a request past ``--timeout`` fails with ``DEADLINE_EXCEEDED`` (gRPC's deadline, no timer of ours).
    The gateway's gRPC answers say nothing of its cache."""

    def __init__(self, target: Target, unary: str, stream: str | None, metadata: tuple[tuple[str, str], ...]) -> None:
        self.target = target
        self.methods = (unary, stream)
        self.metadata = metadata or None
        self.channel: Any = None
        self.unary: Any = None
        self.stream: Any = None

    async def open(self) -> None:
        """Make the channel (it connects on the first call, and again after a failure)."""
        import grpc

        from embedfleet.grpc.client import channel_options

        await self.close()
        tls, authority = self.target.grpc_tls, self.target.endpoint.authority
        if tls is None:
            self.channel = grpc.aio.insecure_channel(authority, options=channel_options())
        else:
            credentials = grpc.ssl_channel_credentials(tls.root, tls.key, tls.chain)
            self.channel = grpc.aio.secure_channel(authority, credentials, options=channel_options())
        unary, stream = self.methods
        self.unary = self.channel.unary_unary(unary)
        self.stream = self.channel.stream_stream(stream) if stream else None

    def expire(self, now: float) -> None:
        """Nothing to do: each call carries its deadline."""

    async def send(self, request: bytes | tuple[bytes, ...]) -> Reply:
        """One unary call, or one streaming call of several messages."""
        import grpc

        if self.channel is None:
            await self.open()
        try:
            if isinstance(request, bytes):
                await self.unary(request, timeout=self.target.timeout, metadata=self.metadata)
            else:
                async for _ in self.stream(iter(request), timeout=self.target.timeout, metadata=self.metadata):
                    pass
        except grpc.aio.AioRpcError as exc:
            return Reply(exc.code().name, None, None, 0, 0)
        return GRPC_OK

    async def close(self) -> None:
        """Close the channel."""
        if self.channel is not None:
            channel, self.channel = self.channel, None
            await channel.close()


class GrpcMode(Mode):
    """Calls on the gateway's gRPC port: ``tei.v1``, or ``tei_multiplexer.v1`` with ``--target``."""

    schemes = ("grpc", "grpcs")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The API key as ``authorization: Bearer`` and ``--model`` as ``x-model`` (without ``--target``)."""
        items = []
        if self.target.api_key:
            items.append(("authorization", f"Bearer {self.target.api_key}"))
        if self.target.model and self.target.pick is None:
            items.append(("x-model", self.target.model))
        return tuple(items)

    def target_message(self) -> Any:
        """The multiplexer's ``Target`` of ``--target`` (None without it)."""
        if self.target.pick is None:
            return None
        from embedfleet.grpc.proto import tei_multiplexer_pb2 as mx

        kind, value = self.target.pick
        fields: dict[str, Any] = {kind: value}
        return mx.Target(**fields)


@register
class TeiGrpcMode(GrpcMode):
    """``tei.v1.Embed/Embed`` (one text a call); a batch is one ``EmbedStream`` call of one message a text, as
    TEI's gRPC API has no batch ``Embed``. ``--target``: the multiplexer's ``Embed``/``EmbedStream``."""

    name = "grpc"
    summary = ("gRPC tei.v1 Embed (EmbedStream for --batch-size > 1) on a grpc:// or grpcs:// URL; --target "
               "name=X|model=Y|index=N: tei_multiplexer.v1 with that Target; --model goes in x-model")

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        from embedfleet.grpc.proto import tei_multiplexer_pb2 as mx
        from embedfleet.grpc.proto import tei_pb2 as pb

        self._pb, self._mx, self._target = pb, mx, self.target_message()
        service = "/tei.v1.Embed/" if self._target is None else "/tei_multiplexer.v1.TeiMultiplexer/"
        self.methods = (service + "Embed", service + "EmbedStream")

    def message(self, text: str) -> bytes:
        """One serialised ``EmbedRequest`` (the multiplexer's, with its target, under ``--target``)."""
        request = self._pb.EmbedRequest(inputs=text, normalize=True)
        if self._target is not None:
            return bytes(self._mx.EmbedRequest(target=self._target, request=request).SerializeToString())
        return bytes(request.SerializeToString())

    def prepare(self, texts: Sequence[str]) -> bytes | tuple[bytes, ...]:
        """One message, or the messages of one stream."""
        messages = tuple(self.message(t) for t in texts)
        return messages[0] if len(messages) == 1 else messages

    def channel(self) -> GrpcChannel:
        """A gRPC channel of its own."""
        return GrpcChannel(self.target, *self.methods, self.metadata())


class GrpcArrowMode(GrpcMode):
    """``tei_multiplexer.v1.TeiMultiplexer/EmbedArrow``: a batch is one Arrow IPC stream."""

    def prepare(self, texts: Sequence[str]) -> bytes:
        """A serialised ``EmbedArrowRequest`` (``--model`` as its target's ``model_id``)."""
        from embedfleet.grpc.client import arrow_batch
        from embedfleet.grpc.proto import tei_multiplexer_pb2 as mx

        target = self.target_message()
        if target is None and self.target.model:
            target = mx.Target(model_id=self.target.model)
        return bytes(mx.EmbedArrowRequest(target=target, arrow_ipc=arrow_batch(texts, self.target.compression),
                                          normalize=True).SerializeToString())

    def channel(self) -> GrpcChannel:
        """A gRPC channel of its own."""
        from embedfleet.grpc.client import EMBED_ARROW

        return GrpcChannel(self.target, EMBED_ARROW, None, self.metadata())


class HttpArrowMode(HttpMode):
    """The HTTP twin, ``POST /embed_arrow`` (``application/vnd.apache.arrow.stream``)."""

    path = "/embed_arrow"
    content_type = "application/vnd.apache.arrow.stream"

    def headers(self) -> dict[str, str]:
        """``X-Model`` when a model is named."""
        return {"x-model": self.target.model} if self.target.model else {}

    def body(self, texts: Sequence[str]) -> bytes:
        """An Arrow IPC stream with the ``text`` column."""
        from embedfleet.grpc.client import arrow_batch

        return arrow_batch(texts, self.target.compression)


@register
class ArrowMode(Mode):
    """Arrow IPC batches: ``EmbedArrow`` on a grpc(s):// URL, ``POST /embed_arrow`` on an http(s):// one."""

    name = "arrow"
    summary = ("Arrow IPC batches of --batch-size rows: gRPC EmbedArrow on a grpc(s):// URL (--target as in "
               "grpc mode), POST /embed_arrow on an http(s):// one; --arrow-compression lz4|zstd")
    schemes = ("grpc", "grpcs", "http", "https")

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.inner: Mode = (GrpcArrowMode if target.endpoint.scheme.startswith("grpc") else HttpArrowMode)(target)

    def prepare(self, texts: Sequence[str]) -> Any:
        """The transport's request."""
        return self.inner.prepare(texts)

    def channel(self) -> Channel:
        """The transport's channel."""
        return self.inner.channel()
