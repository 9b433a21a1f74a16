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
from typing import Any, TypeVar
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


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: ``http(s)://HOST[:PORT][/PREFIX]``."""

    scheme: str
    host: str
    port: int
    prefix: str  # path prefix without a trailing slash ("" for the root)

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Read a base URL; ValueError when it is not ``http(s)://HOST[:PORT][/PATH]``."""
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r}: a base URL has no query or fragment")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def authority(self) -> str:
        """The ``Host`` header's value."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.prefix}"


class Connection:
    """One keep-alive HTTP/1.1 connection of the load generator: pre-built requests out, answers in.

    Deliberately lean (asyncio streams, no per-request objects beyond the answer's bytes). Answers carry
    ``Content-Length`` (uvicorn's and axum's JSON answers do) or are chunked; an answer with
    ``Connection: close`` closes the connection after it is read (the next request opens a new one).
    """

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @classmethod
    def to(cls, url: str, tls: ssl.SSLContext | None = None) -> Connection:
        """A connection (not opened yet) to ``http(s)://HOST[:PORT]``."""
        endpoint = Endpoint.parse(url)
        return cls(endpoint.host, endpoint.port, tls)

    async def open(self) -> None:
        """Connect (again)."""
        self.close()
        if self.tls is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        else:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls,
                                                                     server_hostname=self.host)

    def close(self) -> None:
        """Drop the connection."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> tuple[int, bytes, bytes]:
        """Send one pre-built request; its status, lower-cased head and body."""
        try:
            if self.reader is None or self.writer is None:
                await self.open()
                assert self.reader is not None and self.writer is not None
            self.writer.write(raw)
            head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
            start = head.find(b"\r\ncontent-length:")
            if start >= 0:
                start += len(b"\r\ncontent-length:")
                body = await self.reader.readexactly(int(head[start:head.index(b"\r", start)]))
            elif header_value(head, b"transfer-encoding") == "chunked":
                body = await self._chunked()
            else:
                raise LoadError("answer without content-length")
            if b"\r\nconnection: close" in head:
                self.close()
            return int(head[9:12]), head, body
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise LoadError(f"{type(exc).__name__}: {exc}") from exc

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        parts: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await self._trailers()
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    async def _trailers(self) -> None:
        assert self.reader is not None
        while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
            pass


def header_value(head: bytes, name: bytes) -> str | None:
    """A header's value from a lower-cased response head (``name`` lower case)."""
    start = head.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    return head[start:head.index(b"\r", start)].strip().decode("latin-1")


def build_requests(url: str, path: str, bodies: Sequence[bytes], headers: Mapping[str, str] | None = None,
                   ) -> list[bytes]:
    """Complete HTTP/1.1 POST requests of JSON bodies to ``url`` + ``path``, ready to write."""
    endpoint = Endpoint.parse(url)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"POST {endpoint.prefix}{path} HTTP/1.1\r\nhost: {endpoint.authority}\r\n{extra}"
            "content-type: application/json\r\ncontent-length: ").encode()
    return [b"%s%d\r\n\r\n%s" % (head, len(b), b) for b in bodies]
