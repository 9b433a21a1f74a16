"""The upstream pool's handling of dropped connections, against a real HTTP/1.1 server on loopback that
misbehaves on purpose: it drops the second request of every connection without answering, as a server
does when it closes a kept-alive connection (idle timeout, restart) just as the client reuses it."""

from __future__ import annotations

import asyncio

import pytest

from embedfleet.engine.errors import EngineError, ErrorKind
from embedfleet.gateway.upstream import Pool
from tests.gateway.support import LoopbackServer

ANSWER = b"[[1.0,2.0]]"


class DroppingServer(LoopbackServer):
    """Answers the first request of each connection (kept alive), drops the connection on the second."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[int, int]] = []  # (connection number, request number on it)
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        for number in (1, 2):
            await self.read_body(reader)
            self.requests.append((connection, number))
            if number == 2:
                break  # dropped: no answer
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(ANSWER), ANSWER))
            await writer.drain()


def test_a_connection_dropped_before_the_answer_is_sent_again_not_ejected() -> None:
    async def scenario() -> None:
        server = DroppingServer()
        pool = Pool("m", [await server.start()], health_interval=None)
        pool.upstreams[0].healthy = True  # admitted (the server has no /health: it only answers POSTs)
        try:
            assert await pool.post("/embed", {"inputs": ["a"]}) == [[1.0, 2.0]]
            # Same kept-alive connection: the server drops it; the call goes again on a new connection.
            assert await pool.post("/embed", {"inputs": ["b"]}) == [[1.0, 2.0]]
            assert server.requests == [(1, 1), (1, 2), (2, 1)]
            assert pool.ejections == 0 and pool.retried == 0 and pool.upstreams[0].healthy
            # A replica that is gone (connection refused) is still ejected at once.
            await server.stop()
            await pool.upstreams[0].session.close()
            pool.upstreams[0]._session = None
            with pytest.raises(EngineError) as caught:
                await pool.post("/embed", {"inputs": ["c"]})
            assert caught.value.kind is ErrorKind.UNHEALTHY and pool.ejections == 1 and not pool.upstreams[0].healthy
        finally:
            await pool.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_replica_that_fails_its_health_check_takes_no_new_call_while_its_calls_are_cut() -> None:
    """The calls under way on a replica found dead are cut (its connections closed, an await); a call
    routed meanwhile must not go to it (it would open a new connection to a host that does not answer, as
    after a link cut, and wait for the next check)."""

    async def scenario() -> None:
        alive, dead = DroppingServer(), DroppingServer()
        pool = Pool("m", [await alive.start(), await dead.start()], health_interval=None)
        for upstream in pool.upstreams:
            upstream.alive = upstream.healthy = True
        victim = pool.upstreams[1]
        victim.calls = 1  # a call under way, to be cut
        assert dead.server is not None
        dead.server.close()
        await dead.server.wait_closed()
        routed: list[list[str]] = []

        async def cut_and_route() -> None:
            # What happens while the cut awaits: another request is routed.
            routed.append([u.url for u in pool.healthy])

        victim.cut_calls = cut_and_route  # type: ignore[method-assign]
        try:
            assert not await victim.refresh()  # /health refused: dead
            assert routed == [[pool.upstreams[0].url]]  # during the cut, only the live replica takes calls
            assert pool.healthy == [pool.upstreams[0]]
        finally:
            victim.calls = 0
            await pool.close()

    asyncio.run(scenario())


class SilentServer(LoopbackServer):
    """Reads each request and never answers (a host whose link is cut, as the caller sees it)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.read_body(reader)
        self.requests += 1
        await asyncio.Event().wait()


def test_cutting_a_replicas_calls_retries_them_on_another_at_once() -> None:
    async def scenario() -> None:
        silent, answering = SilentServer(), DroppingServer()
        pool = Pool("m", [await silent.start(), await answering.start()], health_interval=None)
        for upstream in pool.upstreams:
            upstream.alive = upstream.healthy = True
        stuck = pool.upstreams[0]
        try:
            call = asyncio.create_task(pool.post("/embed", {"inputs": ["a"]}))  # least loaded: the first
            deadline = asyncio.get_running_loop().time() + 10
            while silent.requests == 0:
                assert asyncio.get_running_loop().time() < deadline, "the call never reached the silent replica"
                await asyncio.sleep(0.01)
            stuck.alive = stuck.healthy = False  # what a failed health check does before it cuts
            await stuck.cut_calls()
            assert await asyncio.wait_for(call, 5) == [[1.0, 2.0]]  # retried on the other, not after 60 s
            assert pool.retried == 1 and stuck.calls == 0 and not stuck._under_way
        finally:
            await pool.close()

    asyncio.run(scenario())
