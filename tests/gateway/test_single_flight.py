"""Single-flight never hands one request's failure to another: a request waiting on a text that another
request's batch was computing gets that text computed for itself when the other batch fails.

The upstream is a real HTTP/1.1 server on loopback that speaks TEI's ``/embed`` (JSON vectors; a 422 with
TEI's body and our ``X-Error-Input`` header for an input it refuses) and holds its first answer until the
test lets it go, so the second request is certain to be waiting on the first one's computation.
"""

from __future__ import annotations

import asyncio

import orjson

from embedfleet.cache.memory import MemoryStore
from embedfleet.cache.tiered import TieredCache
from embedfleet.engine.errors import EngineError, ErrorKind
from embedfleet.gateway.service import EmbeddingService
from embedfleet.gateway.upstream import Pool, UpstreamInfo
from tests.gateway.support import LoopbackServer

BAD = "a text this upstream refuses"
INFO = {"model_id": "m", "model_sha": "s", "task": "embedding", "pooling": "mean", "max_client_batch_size": 32,
        "max_batch_tokens": 16384, "max_input_length": 512, "auto_truncate": True, "dimension": 2}


class HoldingServer(LoopbackServer):
    """TEI-shaped ``POST /embed``; the first call waits for :attr:`release`."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.calls: list[list[str]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            inputs: list[str] = orjson.loads(await self.read_body(reader))["inputs"]
            self.calls.append(inputs)
            if len(self.calls) == 1:
                await self.release.wait()
            if BAD in inputs:
                answer = orjson.dumps({"error": "refused", "error_type": "Validation"})
                extra = b"x-error-input: %d\r\n" % inputs.index(BAD)
                status = b"422 Unprocessable Entity"
            else:
                answer = orjson.dumps([[float(len(t)), 1.0] for t in inputs])
                extra, status = b"", b"200 OK"
            writer.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n%scontent-length: %d\r\n\r\n%s"
                         % (status, extra, len(answer), answer))
            await writer.drain()


def test_a_waiter_never_gets_another_requests_error() -> None:
    async def scenario() -> None:
        server = HoldingServer()
        pool = Pool("m", [await server.start()], health_interval=None)
        upstream = pool.upstreams[0]
        upstream.alive, upstream.info = True, UpstreamInfo.parse(INFO)
        pool.settle()
        service = EmbeddingService(pool, TieredCache(MemoryStore(1 << 20), None), 32)
        try:
            first = asyncio.create_task(service.embed(["shared text", BAD]))
            while not server.calls:  # the first request's batch is at the upstream, held there
                await asyncio.sleep(0.01)
            second = asyncio.create_task(service.embed(["shared text"]))
            for _ in range(50):  # let the second request reach its wait on the shared text
                await asyncio.sleep(0)
            assert not second.done() and len(server.calls) == 1  # it waits; it sent nothing itself
            server.release.set()
            try:
                await first
            except EngineError as exc:  # the first request's own input at fault, at its own position
                assert exc.kind is ErrorKind.VALIDATION and exc.input == 1
            else:
                raise AssertionError("the refused input must fail the first request")
            result = await second
            assert result.misses == 1 and result.rows[0][1] is not None
            assert server.calls[-1] == ["shared text"]  # computed again, for the second request alone
        finally:
            await pool.close()
            await server.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))
