"""The lean HTTP/1.1 load generator: keep-alive connections on one event loop, pre-built requests.

A load generator shares the machine with what it measures, so it must cost as little CPU as possible.
httpx costs about half a millisecond of CPU per request (more than the gateway needs to answer a cache
hit) plus the parsing of every answer; with it, a benchmark measures the client as much as the server.
A :class:`Connection` writes pre-built requests and reads the answers with asyncio streams (some 15 to 60
microseconds a request, more for larger answers), on uvloop when it is installed. Answers are kept as
bytes: whoever needs the vectors parses them after the timed run. ``embedfleet bench`` and the
benchmarks under ``benchmarks/`` share it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh event loop: uvloop's when installed (a cheaper load generator)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class LoadError(Exception):
    """A request the load generator could not complete (connection lost, malformed answer)."""


DEFAULT_PORTS: dict[str, int | None] = {"http": 80, "https": 443, "grpc": None, "grpcs": None}
"""The schemes an :class:`Endpoint` may have, with their default ports (gRPC has none: a URL gives it)."""


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: ``http(s)://HOST[:PORT][/PREFIX]`` (or ``grpc(s)://HOST:PORT`` where allowed)."""

    scheme: str
    host: str
    port: int
    prefix: str  # path prefix without a trailing slash ("" for the root)

    @classmethod
    def parse(cls, url: str, schemes: Sequence[str] = ("http", "https")) -> Endpoint:
        """Read a base URL; ValueError when it is not ``SCHEME://HOST[:PORT][/PATH]`` with one of ``schemes``
        (a ``grpc(s)://`` URL needs its port and has no path)."""
        parts = urlsplit(url.strip())
        if parts.scheme not in schemes or parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"{url!r} is not a {', '.join(f'{s}://' for s in schemes)} URL")
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r}: a base URL has no query or fragment")
        try:
            port = parts.port or DEFAULT_PORTS[parts.scheme]
        except ValueError as exc:
            raise ValueError(f"{url!r}: {exc}") from None
        if port is None:
            raise ValueError(f"{url!r}: a {parts.scheme}:// URL needs a port")
        path = parts.path.rstrip("/")
        if path and parts.scheme.startswith("grpc"):
            raise ValueError(f"{url!r}: a {parts.scheme}:// URL has no path")
        return cls(parts.scheme, parts.hostname, port, path)

    @property
    def secure(self) -> bool:
        """TLS (``https``, ``grpcs``)."""
        return self.scheme in ("https", "grpcs")

    @property
    def authority(self) -> str:
        """The ``Host`` header's value (``HOST:PORT``, the gRPC target, for gRPC)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.prefix}"


MAX_HEAD = 64 * 1024
"""Bytes an answer's head may take (more: the answer is malformed)."""


class _Answer(asyncio.Protocol):
    """The protocol under a :class:`Connection`: collects bytes until one whole answer is in, then resolves the
    waiting request's future. No stream objects, no coroutine per read: the cheapest way asyncio offers."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bytes]] | None = None
        self.head: bytes | None = None
        self.length = -1  # the body's length; -1: chunked
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(LoadError(f"{type(self.lost).__name__}: {self.lost}"))

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if not self.buffer and waiter is not None and not waiter.done() and self._whole(data, waiter):
            return
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            try:
                self._parse(self.waiter)
            except (ValueError, LoadError) as exc:
                self.waiter.set_exception(exc if isinstance(exc, LoadError) else LoadError(f"bad answer: {exc}"))
                if self.transport is not None:
                    self.transport.abort()

    def _whole(self, data: bytes, waiter: asyncio.Future[tuple[int, bytes, bytes]]) -> bool:
        """The usual case, without copies: ``data`` is exactly one answer with a length. False otherwise."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = data[:end + 4].lower()
        start = head.find(b"\r\ncontent-length:")
        if start < 0:
            return False
        start += len(b"\r\ncontent-length:")
        try:
            whole = int(head[start:head.index(b"\r", start)]) == len(data) - end - 4
            status = int(head[9:12])
        except ValueError:
            return False  # the general path says what is wrong
        if whole:
            waiter.set_result((status, head, data[end + 4:]))
            if b"\r\nconnection: close" in head and self.transport is not None:
                self.transport.close()
        return whole

    def _parse(self, waiter: asyncio.Future[tuple[int, bytes, bytes]]) -> None:
        buffer = self.buffer
        if self.head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    raise LoadError("answer head too long")
                return
            head = self.head = bytes(buffer[:end + 4]).lower()
            del buffer[:end + 4]
            start = head.find(b"\r\ncontent-length:")
            if start >= 0:
                start += len(b"\r\ncontent-length:")
                self.length = int(head[start:head.index(b"\r", start)])
            elif header_value(head, b"transfer-encoding") == "chunked":
                self.length = -1
            else:
                raise LoadError("answer without content-length")
        if self.length >= 0:
            if len(buffer) < self.length:
                return
            body = bytes(buffer[:self.length])
            del buffer[:self.length]
        else:
            chunked = _dechunk(buffer)
            if chunked is None:
                return
            body, used = chunked
            del buffer[:used]
        head, self.head = self.head, None
        waiter.set_result((int(head[9:12]), head, body))
        if b"\r\nconnection: close" in head and self.transport is not None:
            self.transport.close()


def _dechunk(buffer: bytearray) -> tuple[bytes, int] | None:
    """A whole chunked body at the start of ``buffer`` and the bytes it took (trailers included); None while
    it is incomplete."""
    parts: list[bytes] = []
    at = 0
    while True:
        eol = buffer.find(b"\r\n", at)
        if eol < 0:
            return None
        size = int(bytes(buffer[at:eol]).split(b";", 1)[0], 16)
        at = eol + 2
        if size == 0:
            end = buffer.find(b"\r\n", at)  # trailers end with an empty line
            while end >= 0 and end != at:
                at = end + 2
                end = buffer.find(b"\r\n", at)
            return None if end < 0 else (b"".join(parts), end + 2)
        if len(buffer) < at + size + 2:
            return None
        parts.append(bytes(buffer[at:at + size]))
        at += size + 2


class Connection:
    """One keep-alive HTTP/1.1 connection of the load generator: pre-built requests out, answers in.

    Deliberately lean: an :class:`asyncio.Protocol` (no streams), one future per request, no other per-request
    object beyond the answer's bytes. Answers carry ``Content-Length`` (uvicorn's and axum's JSON answers
    do) or are chunked; an answer with ``Connection: close`` closes the connection after it is read (the next
    request opens a new one). Requests on one connection go one at a time.
    """

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.protocol: _Answer | None = None

    @classmethod
    def to(cls, url: str, tls: ssl.SSLContext | None = None) -> Connection:
        """A connection (not opened yet) to ``http(s)://HOST[:PORT]``."""
        endpoint = Endpoint.parse(url)
        return cls(endpoint.host, endpoint.port, tls)

    async def open(self) -> None:
        """Connect (again)."""
        self.close()
        loop = asyncio.get_running_loop()
        if self.tls is None:
            _, self.protocol = await loop.create_connection(_Answer, self.host, self.port)
        else:
            _, self.protocol = await loop.create_connection(_Answer, self.host, self.port, ssl=self.tls,
                                                            server_hostname=self.host)

    def close(self) -> None:
        """Drop the connection."""
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()
        self.protocol = None

    def abort(self) -> None:
        """Drop the connection at once; a request waiting on it fails with LoadError."""
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.abort()

    async def request(self, raw: bytes) -> tuple[int, bytes, bytes]:
        """Send one pre-built request; its status, lower-cased head and body."""
        protocol = self.protocol
        try:
            if protocol is None or protocol.lost is not None:
                await self.open()
                protocol = self.protocol
                assert protocol is not None and protocol.transport is not None
            waiter = protocol.waiter = asyncio.get_running_loop().create_future()
            assert protocol.transport is not None
            protocol.transport.write(raw)
            answer: tuple[int, bytes, bytes] = await waiter
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise LoadError(f"{type(exc).__name__}: {exc}") from exc
        except LoadError:
            self.close()
            raise
        finally:
            if protocol is not None:
                protocol.waiter = None
        if protocol.lost is not None:  # Connection: close
            self.protocol = None
        return answer


def header_value(head: bytes, name: bytes) -> str | None:
    """A header's value from a lower-cased response head (``name`` lower case)."""
    start = head.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    return head[start:head.index(b"\r", start)].strip().decode("latin-1")


def build_requests(url: str, path: str, bodies: Sequence[bytes], headers: Mapping[str, str] | None = None,
                   content_type: str = "application/json") -> list[bytes]:
    """Complete HTTP/1.1 POST requests of (JSON) bodies to ``url`` + ``path``, ready to write."""
    endpoint = Endpoint.parse(url)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"POST {endpoint.prefix}{path} HTTP/1.1\r\nhost: {endpoint.authority}\r\n{extra}"
            f"content-type: {content_type}\r\ncontent-length: ").encode()
    return [b"%s%d\r\n\r\n%s" % (head, len(b), b) for b in bodies]
