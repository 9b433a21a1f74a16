"""The benchmarks' HTTP load generator: lean keep-alive HTTP/1.1 connections on one event loop.

The load generator shares the machine with the servers it measures (2 cores here), so it must cost as
little CPU as possible. httpx costs about half a millisecond of CPU per request (more than the gateway
needs to answer a cache hit) plus the parsing of every answer; with it, the benchmarks measured the
client as much as the server. A :class:`Connection` writes pre-built requests and reads
``Content-Length`` bodies with asyncio streams (some 15 to 60 microseconds a request, more for larger
answers), on uvloop when it is installed. Answers are kept as bytes: whoever needs the vectors parses
them after the timed run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

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


class Connection:
    """One keep-alive HTTP/1.1 connection of the load generator: pre-built requests out, answers in.

    Deliberately lean (asyncio streams, no per-request objects beyond the answer's bytes): httpx costs
    about half a millisecond of CPU per request, more than the gateway needs to answer one, so with it
    the load generator, not the server, was measured. Answers must carry ``Content-Length`` (uvicorn's
    do for every response of the servers measured here).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @classmethod
    def to(cls, url: str) -> Connection:
        """A connection (not opened yet) to ``http://HOST:PORT``."""
        host, _, port = url.split("://", 1)[1].rstrip("/").rpartition(":")
        return cls(host, int(port))

    async def open(self) -> None:
        """Connect (again)."""
        self.close()
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        """Drop the connection."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> tuple[int, bytes, bytes]:
        """Send one pre-built request; its status, lower-cased head and body."""
        if self.reader is None or self.writer is None:
            await self.open()
            assert self.reader is not None and self.writer is not None
        try:
            self.writer.write(raw)
            head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
            start = head.find(b"\r\ncontent-length:")
            if start < 0:
                raise LoadError("answer without content-length")
            start += len(b"\r\ncontent-length:")
            body = await self.reader.readexactly(int(head[start:head.index(b"\r", start)]))
            return int(head[9:12]), head, body
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise LoadError(f"{type(exc).__name__}: {exc}") from exc


def header_value(head: bytes, name: bytes) -> str | None:
    """A header's value from a lower-cased response head (``name`` lower case)."""
    start = head.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    return head[start:head.index(b"\r", start)].strip().decode("latin-1")


def build_requests(url: str, path: str, bodies: Sequence[bytes]) -> list[bytes]:
    """Complete HTTP/1.1 POST requests of JSON bodies, ready to write."""
    host = url.split("://", 1)[1].rstrip("/")
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: "
    return [b"%s%d\r\n\r\n%s" % (head.encode(), len(b), b) for b in bodies]


