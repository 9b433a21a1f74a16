"""Upstreams: the worker replicas (or TEI servers) behind the gateway, pooled per model.

Each upstream has one keep-alive HTTP client: aiohttp's, which costs several times less CPU a call
than httpx's (its anyio and httpcore layers), and the gateway's CPU is what every miss pays on top of
the worker's. A pool sends each call to the healthy replica with
the fewest inputs in flight; a connection error, timeout or 5xx ejects the replica at once
(passive) and the call is retried on another; an active check polls /health and re-admits
replicas that answer 200. A replica that fails a check while calls wait on it (hung: a stopped
process still accepts connections) has those calls cut, and they are retried on another at once.
A ``dns+http://NAME:PORT`` upstream stands for every address NAME resolves to (a Kubernetes headless
Service, a round-robin DNS record): the pool looks the name up again every ``dns_interval`` seconds,
adds the addresses that appear and drains and drops those that disappear.
A kept-alive connection that the replica dropped as the call went out is not a failure: the call
goes once more to the same replica, on another connection. A 4xx is the client's error and is passed
through as the error it reports.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson

from embedfleet.api import errors as edge_errors
from embedfleet.api.edge import INPUT_HEADER, MODEL_HEADER
from embedfleet.api.errors import EdgeError
from embedfleet.cache.keys import ModelFingerprint
from embedfleet.config import HEALTH_CHECK_TIMEOUT_S
from embedfleet.engine import errors
from embedfleet.engine.errors import EngineError

log = logging.getLogger(__name__)

T = TypeVar("T")
_JSON_HEADERS = {"content-type": "application/json"}
_CHECK_TIMEOUT = aiohttp.ClientTimeout(total=HEALTH_CHECK_TIMEOUT_S)


@dataclass(frozen=True, slots=True)
class Reply:
    """An upstream's answer, read whole."""

    status: int
    content_type: str
    body: bytes
    reason: str = ""
    input: int | None = None
    """On an error about one input, its position in the call's batch (our workers say which)."""
    model: str | None = None
    """The tag of the model fingerprint the answer was computed with (our workers say; TEI servers do not)."""


STREAM_ABOVE = 1 << 20
"""Forwarded answers larger than this (or of unknown length) are streamed to the client as they come, in
chunks of :data:`STREAM_CHUNK`, rather than read whole: an /embed_all answer (a vector per token) can be
a thousand times its request, and the gateway's memory must not grow with it."""

STREAM_CHUNK = 1 << 16


@dataclass(slots=True)
class Streamed:
    """An upstream's 2xx answer on its way: its status and content type, then its body in chunks. The
    call's slot on the replica is held until the body is read to its end or :meth:`close` is called."""

    status: int
    content_type: str
    _response: aiohttp.ClientResponse
    _release: AsyncExitStack

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk; the call is released at its end (or when the client goes away: the
        iterator is closed)."""
        try:
            async for chunk in self._response.content.iter_chunked(STREAM_CHUNK):
                yield chunk
        finally:
            await self.close()

    async def close(self) -> None:
        """Release the call (a body not read to its end closes its connection)."""
        await self._release.aclose()


class UpstreamFailed(Exception):
    """A call that the replica, not the client, failed: a 5xx answer (the pool ejects it and retries)."""


FAILURES = (aiohttp.ClientError, TimeoutError, UpstreamFailed, ValueError)
"""What a call to a replica raises when the replica failed it (ValueError: a body that cannot be read)."""


MIN_TOKENS_PER_S = 250.0
"""The slowest a replica is expected to embed (a large model on a small CPU): a call's deadline is the
configured timeout plus its estimated tokens at this rate, so one large valid request is never cut short
(and its replica never ejected) for being large."""

MAX_CALLS_PER_UPSTREAM = 64
"""Calls in flight to one replica at most; more wait their turn in the gateway rather than pile up in
the replica's queue."""

UPSTREAM_IDLE_S = 30.0
"""How long the gateway keeps an idle connection to a replica: below the workers' own idle timeout
(``api.edge.KEEP_ALIVE_S``), so the gateway, not the worker, closes idle connections."""


def _dropped_before_answer(exc: BaseException) -> bool:
    """A connection lost while the request went out or before any answer, other than a refused connect:
    typically a kept-alive connection the server closed (its idle timeout, a restart) just as it was
    reused. Not the replica's fault: the call is sent once more (the dropped connection is discarded, so
    on another one)."""
    return (isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)
            and not isinstance(exc, aiohttp.ClientConnectorError))


def describe(exc: BaseException) -> str:
    """An exception in words, never empty (a timeout's message is)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def redact(url: str) -> str:
    """A URL fit for logs and metrics: any ``user:password@`` in it replaced by ``***@``."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if "@" not in host:
        return url
    return f"{scheme}{sep}***@{host.rpartition('@')[2]}{slash}{path}"


def parse_json(reply: Reply) -> Any:
    """A reply's JSON body (ValueError where it is not JSON)."""
    return orjson.loads(reply.body)


@dataclass(frozen=True)
class UpstreamInfo:
    """What the gateway needs from an upstream's /info."""

    model_id: str
    fingerprint: ModelFingerprint
    max_client_batch_size: int
    max_batch_tokens: int
    max_input_length: int
    auto_truncate: bool
    raw: dict[str, Any]

    @classmethod
    def parse(cls, info: dict[str, Any]) -> UpstreamInfo:
        """From an embedfleet worker's or a TEI server's /info."""
        fingerprint = ModelFingerprint.from_info(info)
        return cls(fingerprint.model_id, fingerprint, int(info.get("max_client_batch_size") or 32),
                   int(info.get("max_batch_tokens") or 16384), int(info.get("max_input_length") or 512),
                   bool(info.get("auto_truncate", False)), info)


def _upstream_error(reply: Reply) -> EngineError | EdgeError:
    """An upstream's 4xx answer as the error it reports (TEI's ``error_type``, else what its status means).
    An error about one input keeps that input's position in the call, for the caller to map to its own."""
    text = reply.body.decode(errors="replace")
    try:
        body = orjson.loads(reply.body)
        message = str(body.get("error") or body.get("message") or text)
        error = edge_errors.from_type(str(body.get("error_type")), message, reply.status)
    except (orjson.JSONDecodeError, ValueError, AttributeError):
        error = edge_errors.from_status(reply.status, text or reply.reason)
    if isinstance(error, EngineError) and reply.input is not None:
        suffix = f" (input {reply.input})"
        return EngineError(error.kind, error.detail.removesuffix(suffix), reply.input)
    return error


DNS_PREFIX = "dns+"
"""An upstream URL with this prefix (``dns+http://NAME:PORT``) names a DNS name that resolves to every replica."""


@dataclass(frozen=True, slots=True)
class DnsName:
    """A ``dns+http://NAME[:PORT]`` upstream: one replica per address NAME resolves to."""

    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> DnsName:
        """From ``dns+http://NAME[:PORT]`` (port 80 by default); ValueError for anything else."""
        parts = urlsplit(url)
        if parts.scheme == "dns+https":
            raise ValueError(f"upstream {url!r}: dns+https is not supported (replicas are called by address, "
                             "which a certificate for the name does not cover); use dns+http inside the cluster")
        try:
            port = parts.port or 80
        except ValueError:
            port = -1
        if parts.scheme != "dns+http" or not parts.hostname or port < 1 or parts.username or parts.path.strip("/") \
                or parts.query:
            raise ValueError(f"upstream {url!r} is not dns+http://NAME[:PORT]")
        return cls(parts.hostname, port)

    def __str__(self) -> str:
        return f"{DNS_PREFIX}http://{self.host}:{self.port}"

    async def resolve(self) -> set[str]:
        """The replica URLs, one per address the name resolves to now (OSError when the look-up fails)."""
        infos = await asyncio.get_running_loop().getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        urls = set()
        for *_, address in infos:
            ip = ipaddress.ip_address(str(address[0]).partition("%")[0])
            urls.add(f"http://{ip if ip.version == 4 else f'[{ip}]'}:{self.port}")
        return urls


class Upstream:
    """One replica."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.label = redact(self.url)
        """The URL without credentials: what logs, metrics and /info show."""
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.alive = False
        """It answered its last health check (and nothing failed on it since)."""
        self.healthy = False
        """Admitted: alive, and serving its pool's model. Calls go to healthy replicas only."""
        self.mismatch: str | None = None
        """Why an alive replica is kept out of its pool: it serves another model than the rest."""
        self.in_flight = 0  # estimated tokens of the calls under way
        self.calls = 0  # calls under way
        self.info: UpstreamInfo | None = None
        self.base_timeout = timeout
        self._calls = asyncio.Semaphore(MAX_CALLS_PER_UPSTREAM)
        self._under_way: set[asyncio.Task[Reply]] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The keep-alive connection pool (made on first use: aiohttp needs the running event loop)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(self.url, timeout=self.timeout, connector=aiohttp.TCPConnector(
                limit=256, limit_per_host=256, keepalive_timeout=UPSTREAM_IDLE_S))
        return self._session

    async def _call(self, method: str, route: str, timeout: aiohttp.ClientTimeout | None = None,
                    data: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
        async with self.session.request(method, route, data=data, headers=headers,
                                        timeout=timeout or self.timeout) as r:
            position = r.headers.get(INPUT_HEADER)
            return Reply(r.status, r.content_type, await r.read(), r.reason or "",
                         int(position) if position is not None and position.isdigit() else None,
                         r.headers.get(MODEL_HEADER))

    def deadline(self, weight: int) -> float:
        """Seconds a call of ``weight`` estimated tokens may take: it grows with the work asked for."""
        return self.base_timeout + weight / MIN_TOKENS_PER_S

    async def _send(self, route: str, data: bytes, headers: dict[str, str], weight: int) -> Reply:
        """POST once, and once more where the connection was dropped before any answer."""
        timeout = aiohttp.ClientTimeout(total=self.deadline(weight))
        async with self._calls:
            session = self.session
            try:
                return await self._call("POST", route, timeout, data=data, headers=headers)
            except aiohttp.ClientError as exc:
                if not _dropped_before_answer(exc) or session.closed or session is not self._session:
                    # closed or replaced: cut by a failed check (or closing), never sent again there
                    raise
                log.debug("upstream %s dropped a connection (%s); sending again", self.label, exc)
                return await self._call("POST", route, timeout, data=data, headers=headers)

    async def stream(self, route: str, body: dict[str, Any], weight: int) -> Reply | Streamed:
        """POST JSON and return the answer: read whole (a :class:`Reply`) where it is small, else
        :class:`Streamed`. Raises as :meth:`post` does for a 4xx or a failed call. The deadline bounds the
        wait between two reads, not the whole transfer, so a slow client is not cut off by it."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=_CHECK_TIMEOUT.total,
                                        sock_read=self.deadline(weight))
        data = orjson.dumps(body)
        stack = AsyncExitStack()
        self.in_flight += weight
        stack.callback(self._done, weight)
        try:
            await stack.enter_async_context(self._calls)
            try:
                r = await stack.enter_async_context(self._request(route, data, timeout))
            except aiohttp.ClientError as exc:
                if not _dropped_before_answer(exc):
                    raise
                log.debug("upstream %s dropped a connection (%s); sending again", self.label, exc)
                r = await stack.enter_async_context(self._request(route, data, timeout))
            if r.status >= 500:
                raise UpstreamFailed(f"{r.status} {r.reason} from {self.label}")
            length = r.content_length
            if r.status >= 400 or (length is not None and length <= STREAM_ABOVE):
                position = r.headers.get(INPUT_HEADER)
                reply = Reply(r.status, r.content_type, await r.read(), r.reason or "",
                              int(position) if position is not None and position.isdigit() else None)
                if reply.status >= 400:
                    raise _upstream_error(reply)
                orjson.loads(reply.body)  # an unreadable answer fails the replica (ValueError), as on every route
                return reply
            return Streamed(r.status, r.content_type, r, stack.pop_all())  # released once the body is passed on
        finally:
            await stack.aclose()

    def _request(self, route: str, data: bytes, timeout: aiohttp.ClientTimeout) -> Any:
        return self.session.request("POST", route, data=data, headers=_JSON_HEADERS, timeout=timeout)

    def _done(self, weight: int) -> None:
        self.in_flight -= weight

    async def answers_health(self) -> bool:
        """Whether the replica answers /health now (without changing what the pool thinks of it)."""
        try:
            return (await self._call("GET", "/health", _CHECK_TIMEOUT)).status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def refresh(self) -> bool:
        """Check /health; returns whether the replica is alive. /info is read again whenever the replica
        comes (back) to life: a replica restarted at the same address may serve another model."""
        try:
            alive = (await self._call("GET", "/health", _CHECK_TIMEOUT)).status == 200
            if alive and (not self.alive or self.info is None):
                info = await self._call("GET", "/info", _CHECK_TIMEOUT)
                if info.status != 200:
                    raise ValueError(f"/info answered {info.status}")
                self.info = UpstreamInfo.parse(orjson.loads(info.body))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
            alive = False
        if alive != self.alive:
            log.info("upstream %s is %s", self.label, "up" if alive else "down")
        self.alive = alive
        if not alive:
            # Out of the pool now, not when the pool next settles: a call routed here while the calls under
            # way are cut would open a new connection to the dead replica and wait for the next check.
            self.healthy = False
            if self.calls:
                await self.cut_calls()
        return alive

    async def cut_calls(self) -> None:
        """Fail the calls under way now (cancelled, their connections closed): a replica that fails its health check
        while calls wait on it is hung (a stopped process still accepts connections but never answers), and
        its calls would otherwise wait out their deadline (a minute or more) before the pool retries them on
        another replica. The next call opens a new connection pool."""
        log.warning("upstream %s failed its health check with %d calls under way: retrying them elsewhere",
                    self.label, self.calls)
        # Cancelled, not only disconnected: closing the connections fails a call waiting for its answer, but
        # not one that is connecting, or sending again on a new connection after a drop (to a host whose
        # link is cut, that waits out the call's whole deadline).
        for call in list(self._under_way):
            call.cancel()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def post(self, route: str, body: dict[str, Any], weight: int, parse: Callable[[Reply], T],
                   accept: str | None = None) -> T:
        """POST JSON; returns ``parse(reply)``. Raises the client's error for a 4xx, and one of
        :data:`FAILURES` where the replica failed the call (5xx, connection, timeout, unreadable body)."""
        headers = _JSON_HEADERS if accept is None else {**_JSON_HEADERS, "accept": accept}
        self.in_flight += weight
        self.calls += 1
        call = asyncio.get_running_loop().create_task(self._send(route, orjson.dumps(body), headers, weight))
        self._under_way.add(call)
        try:
            reply = await call
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if call.cancelled() and (current is None or not current.cancelling()):  # cut, not our caller's cancel
                raise UpstreamFailed(f"call to {self.label} cut: it failed its health check") from None
            raise
        finally:
            self._under_way.discard(call)
            self.in_flight -= weight
            self.calls -= 1
        if reply.status >= 500:
            raise UpstreamFailed(f"{reply.status} {reply.reason} from {self.label}")
        if reply.status >= 400:
            raise _upstream_error(reply)
        return parse(reply)

    async def close(self) -> None:
        """Close the connection pool (calls still under way fail, and the pool retries them elsewhere)."""
        if self._session is not None:
            await self._session.close()


class Pool:
    """The replicas of one model.

    The pool serves one model fingerprint (model, revision, task, pooling, precision): the one its live
    replicas report. A replica that reports another while the rest agree is kept out (logged, counted,
    and shown in /info); when every live replica reports a new one (a one-replica pool whose worker was
    restarted with another model, say), the pool adopts it, and its old cache entries stop hitting.
    """

    def __init__(self, name: str, urls: Sequence[str], timeout: float = 60.0, health_interval: float | None = 1.0,
                 retries: int = 2, dns_interval: float = 5.0) -> None:
        self.name = name
        self.timeout = timeout
        self.names = [DnsName.parse(u) for u in urls if u.startswith(DNS_PREFIX)]
        """The DNS names whose addresses are members (see the module's docstring)."""
        self.dns_interval = dns_interval
        self._resolved: dict[DnsName, set[str]] = {}
        self._discovered: set[str] = set()
        self.upstreams = [Upstream(u, timeout) for u in urls if not u.startswith(DNS_PREFIX)]
        self.health_interval = health_interval
        self.retries = retries
        self.ejections = 0
        self.retried = 0
        self.mismatches = 0
        self.fingerprint: ModelFingerprint | None = None
        """The model the pool serves (None until a replica has answered /info)."""
        self._info: UpstreamInfo | None = None
        self._checker: asyncio.Task[None] | None = None
        self._resolver: asyncio.Task[None] | None = None
        self._draining: set[asyncio.Task[None]] = set()

    @property
    def info(self) -> UpstreamInfo | None:
        """The model's info, from a replica that serves the pool's model (kept by :meth:`settle`: every
        request reads it)."""
        return self._info

    def _agrees(self, upstream: Upstream) -> bool:
        return upstream.info is not None and upstream.info.fingerprint == self.fingerprint

    def settle(self) -> None:
        """Admit the live replicas that serve the pool's model and keep the others out; adopt a new model
        when every live replica reports the same new one."""
        reported = {u.info.fingerprint for u in self.upstreams if u.alive and u.info is not None}
        if len(reported) == 1 and self.fingerprint not in reported:
            new = next(iter(reported))
            if self.fingerprint is not None:
                log.warning("pool %r now serves %s (was %s): every live replica reports it; entries cached for "
                            "the old model no longer hit", self.name, new, self.fingerprint)
            self.fingerprint = new
        for u in self.upstreams:
            agrees = self._agrees(u)
            if u.alive and u.info is not None and not agrees:
                if u.mismatch is None:
                    self.mismatches += 1
                    log.warning("upstream %s kept out of pool %r: it serves %s, the pool serves %s", u.label,
                                self.name, u.info.fingerprint, self.fingerprint)
                u.mismatch = f"serves {u.info.fingerprint}, the pool serves {self.fingerprint}"
            else:
                u.mismatch = None
            u.healthy = u.alive and agrees
        self._info = next((u.info for u in self.upstreams if u.info is not None and self._agrees(u)), None)

    @property
    def healthy(self) -> list[Upstream]:
        """Replicas that can take calls now."""
        return [u for u in self.upstreams if u.healthy]

    async def start(self) -> None:
        """Check every replica once, then keep checking in the background (unless ``health_interval`` is
        None: then whoever manages the members, the fleet's supervisor, checks them). DNS names are looked up
        first, and again every ``dns_interval`` seconds."""
        if self.names:
            await self.discover()
            self._resolver = asyncio.get_running_loop().create_task(self._resolve_loop(), name=f"dns-{self.name}")
        await asyncio.gather(*(u.refresh() for u in self.upstreams))
        fingerprints = {u.info.fingerprint for u in self.upstreams if u.info is not None}
        if len(fingerprints) > 1:
            raise ValueError(f"pool {self.name!r} mixes models: {sorted(str(f) for f in fingerprints)}")
        self.settle()
        if self.health_interval is not None:
            self._checker = asyncio.get_running_loop().create_task(self._check_loop(self.health_interval),
                                                                   name=f"health-{self.name}")

    async def _check_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(u.refresh() for u in self.upstreams))
            self.settle()

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self.dns_interval)
            await self.discover()

    async def discover(self) -> None:
        """Look the DNS names up: add the replicas at new addresses (checked at once), drain and drop those at
        addresses no name gives any more. A failed look-up keeps that name's replicas (a DNS outage is not
        theirs; their health checks still eject the dead)."""
        for name in self.names:
            try:
                self._resolved[name] = await name.resolve()
            except OSError as exc:
                log.warning("pool %r: cannot resolve %s (%s); keeping its %d replica(s)", self.name, name,
                            describe(exc), len(self._resolved.get(name, ())))
        wanted = set().union(*self._resolved.values())
        static = {u.url for u in self.upstreams if u.url not in self._discovered}
        gone = [u for u in self.upstreams if u.url in self._discovered - wanted - static]
        new = [Upstream(url, self.timeout) for url in sorted(wanted - {u.url for u in self.upstreams})]
        self._discovered = wanted
        if not new and not gone:
            return
        await asyncio.gather(*(u.refresh() for u in new))
        self.upstreams = [*(u for u in self.upstreams if u not in gone), *new]
        for u in new:
            log.info("upstream %s joined pool %r (DNS)", u.label, self.name)
        for u in gone:
            log.info("upstream %s left pool %r (no longer in DNS)", u.label, self.name)
            task = asyncio.get_running_loop().create_task(self.drain(u))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        self.settle()

    @staticmethod
    async def drain(upstream: Upstream, timeout: float = 30.0) -> None:
        """Wait for a removed replica's calls under way to finish (or ``timeout``), then close its client."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while upstream.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await upstream.close()

    def find(self, url: str) -> Upstream | None:
        """The member at this URL."""
        url = url.rstrip("/")
        return next((u for u in self.upstreams if u.url == url), None)

    async def add(self, url: str) -> Upstream:
        """Admit a replica that answers /health now (its /info read again: it may have been restarted with
        another model). ValueError if it is not alive, or serves another model than the pool's other live
        replicas (it is kept out)."""
        upstream = self.find(url)
        if upstream is not None and upstream.healthy:
            return upstream  # a member in good standing (the supervisor joins after every health check)
        new = upstream is None
        if upstream is None:
            upstream = Upstream(url, self.timeout)
        upstream.alive = False  # ejected, or new: read its /info again
        if not await upstream.refresh() or upstream.info is None:
            if new:
                await upstream.close()
            raise ValueError(f"{upstream.label} is not healthy")
        if new:
            self.upstreams = [*self.upstreams, upstream]
            log.info("upstream %s joined pool %r", upstream.label, self.name)
        self.settle()
        if not upstream.healthy:
            reason = upstream.mismatch or "it is not healthy"
            if new:
                self.upstreams = [u for u in self.upstreams if u is not upstream]
                await upstream.close()
            raise ValueError(f"{upstream.label} cannot join pool {self.name!r}: {reason}")
        return upstream

    def remove(self, url: str) -> Upstream | None:
        """Take a replica out: no new call goes to it. Calls under way finish; the caller closes its client
        once the replica has drained."""
        upstream = self.find(url)
        if upstream is not None:
            self.upstreams = [u for u in self.upstreams if u is not upstream]
            log.info("upstream %s left pool %r", upstream.label, self.name)
            self.settle()
        return upstream

    async def suspend(self, url: str, reason: str) -> None:
        """Stop routing to the member at ``url`` now and fail its calls under way, which are retried on
        other replicas: its supervisor found it not answering (hung). :meth:`add` re-admits it."""
        upstream = self.find(url)
        if upstream is None:
            return
        self._eject(upstream, RuntimeError(reason))
        if upstream.calls:
            await upstream.cut_calls()

    def _eject(self, upstream: Upstream, reason: BaseException) -> None:
        upstream.alive = False  # until a health check finds it alive again (and reads its /info again)
        if upstream.healthy:
            upstream.healthy = False
            self.ejections += 1
            log.warning("ejected upstream %s: %s", upstream.label, describe(reason))

    async def post(self, route: str, body: dict[str, Any], weight: int = 1,
                   parse: Callable[[Reply], T] = parse_json, accept: str | None = None) -> T:
        """Call the least-loaded healthy replica; on failure (an unreadable body included) eject it and retry
        on another."""
        return await self._call(lambda u: u.post(route, body, weight, parse, accept), weight)

    async def stream(self, route: str, body: dict[str, Any], weight: int = 1) -> Reply | Streamed:
        """As :meth:`post`, for an answer passed on as it is: a large one is streamed
        (:meth:`Upstream.stream`)."""
        return await self._call(lambda u: u.stream(route, body, weight), weight)

    async def _call(self, call: Callable[[Upstream], Awaitable[T]], weight: int) -> T:
        tried: set[Upstream] = set()
        last: BaseException | None = None
        busy = False
        for attempt in range(self.retries + 1):
            untried = [u for u in self.healthy if u not in tried]
            candidates = untried or ([] if busy else self.healthy)
            if not candidates:
                break
            upstream = min(candidates, key=lambda u: u.in_flight)
            tried.add(upstream)
            if attempt:
                self.retried += 1
            try:
                return await call(upstream)
            except (EngineError, EdgeError):
                raise
            except FAILURES as exc:
                last = exc
                if isinstance(exc, TimeoutError) and await upstream.answers_health():
                    busy = True  # slow because busy, not broken: kept in the pool
                    log.warning("upstream %s is busy: a call of ~%d tokens took more than %.0fs", upstream.label,
                                weight, upstream.deadline(weight))
                    continue
                self._eject(upstream, exc)
        if busy:
            raise errors.overloaded(f"the replicas of model {self.name!r} are busy: the call did not finish in "
                                    "time; retry later")
        detail = f" (last error: {describe(last)})" if last else ""
        raise errors.unhealthy(f"no healthy upstream for model {self.name!r}{detail}")

    async def close(self) -> None:
        """Stop checking and close every client."""
        tasks = [t for t in (self._checker, self._resolver, *self._draining) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(u.close() for u in self.upstreams))
