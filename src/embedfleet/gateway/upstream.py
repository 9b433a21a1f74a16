"""Upstreams: the worker replicas (or TEI servers) behind the gateway, pooled per model.

Each upstream has one keep-alive HTTP client: aiohttp's, which costs several times less CPU a call
than httpx's (its anyio and httpcore layers), and the gateway's CPU is what every miss pays on top of
the worker's. A pool sends each call to the healthy replica with
the fewest inputs in flight; a connection error, timeout or 5xx ejects the replica at once
(passive) and the call is retried on another; an active check polls /health and re-admits
replicas that answer 200. A kept-alive connection that the replica dropped as the call went out is
not a failure: the call goes once more to the same replica, on another connection. A 4xx is the
client's error and is passed through as the error it reports.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson

from embedfleet.api import errors as edge_errors
from embedfleet.api.edge import INPUT_HEADER
from embedfleet.api.errors import EdgeError
from embedfleet.cache.keys import ModelFingerprint
from embedfleet.engine import errors
from embedfleet.engine.errors import EngineError

log = logging.getLogger(__name__)

T = TypeVar("T")
_JSON_HEADERS = {"content-type": "application/json"}
_CHECK_TIMEOUT = aiohttp.ClientTimeout(total=5.0)


@dataclass(frozen=True, slots=True)
class Reply:
    """An upstream's answer, read whole."""

    status: int
    content_type: str
    body: bytes
    reason: str = ""
    input: int | None = None
    """On an error about one input, its position in the call's batch (our workers say which)."""


class UpstreamFailed(Exception):
    """A call that the replica, not the client, failed: a 5xx answer (the pool ejects it and retries)."""


FAILURES = (aiohttp.ClientError, TimeoutError, UpstreamFailed, ValueError)
"""What a call to a replica raises when the replica failed it (ValueError: a body that cannot be read)."""


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
        model_type = info.get("model_type") or {}
        task = str(info.get("task") or next(iter(model_type), "embedding"))
        pooling = info.get("pooling")
        if pooling is None and "embedding" in model_type:
            pooling = model_type["embedding"].get("pooling")
        model_id = str(info["model_id"])
        fingerprint = ModelFingerprint(model_id, info.get("model_sha") or info.get("revision"), task, pooling)
        return cls(model_id, fingerprint, int(info.get("max_client_batch_size") or 32),
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


class Upstream:
    """One replica."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.label = redact(self.url)
        """The URL without credentials: what logs, metrics and /info show."""
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.healthy = False
        self.in_flight = 0  # estimated tokens of the calls under way
        self.info: UpstreamInfo | None = None

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
                         int(position) if position is not None and position.isdigit() else None)

    async def _send(self, route: str, data: bytes, headers: dict[str, str]) -> Reply:
        """POST once, and once more where the connection was dropped before any answer."""
        try:
            return await self._call("POST", route, data=data, headers=headers)
        except aiohttp.ClientError as exc:
            if not _dropped_before_answer(exc):
                raise
            log.debug("upstream %s dropped a connection (%s); sending again", self.label, exc)
            return await self._call("POST", route, data=data, headers=headers)

    async def refresh(self) -> bool:
        """Check /health (and read /info once); returns whether the replica is healthy."""
        try:
            if self.info is None:
                info = await self._call("GET", "/info", _CHECK_TIMEOUT)
                if info.status != 200:
                    raise ValueError(f"/info answered {info.status}")
                self.info = UpstreamInfo.parse(orjson.loads(info.body))
            healthy = (await self._call("GET", "/health", _CHECK_TIMEOUT)).status == 200
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
            healthy = False
        if healthy != self.healthy:
            log.info("upstream %s is %s", self.label, "healthy" if healthy else "unhealthy")
        self.healthy = healthy
        return healthy

    async def post(self, route: str, body: dict[str, Any], weight: int, parse: Callable[[Reply], T],
                   accept: str | None = None) -> T:
        """POST JSON; returns ``parse(reply)``. Raises the client's error for a 4xx, and one of
        :data:`FAILURES` where the replica failed the call (5xx, connection, timeout, unreadable body)."""
        headers = _JSON_HEADERS if accept is None else {**_JSON_HEADERS, "accept": accept}
        self.in_flight += weight
        try:
            reply = await self._send(route, orjson.dumps(body), headers)
        finally:
            self.in_flight -= weight
        if reply.status >= 500:
            raise UpstreamFailed(f"{reply.status} {reply.reason} from {self.label}")
        if reply.status >= 400:
            raise _upstream_error(reply)
        return parse(reply)

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()


class Pool:
    """The replicas of one model."""

    def __init__(self, name: str, urls: Sequence[str], timeout: float = 60.0, health_interval: float | None = 1.0,
                 retries: int = 2) -> None:
        self.name = name
        self.timeout = timeout
        self.upstreams = [Upstream(u, timeout) for u in urls]
        self.health_interval = health_interval
        self.retries = retries
        self.ejections = 0
        self.retried = 0
        self._checker: asyncio.Task[None] | None = None

    @property
    def info(self) -> UpstreamInfo | None:
        """The model's info, from the first replica that answered /info."""
        return next((u.info for u in self.upstreams if u.info is not None), None)

    @property
    def healthy(self) -> list[Upstream]:
        """Replicas that can take calls now."""
        return [u for u in self.upstreams if u.healthy]

    async def start(self) -> None:
        """Check every replica once, then keep checking in the background (unless ``health_interval`` is
        None: then whoever manages the members, the fleet's supervisor, checks them)."""
        await asyncio.gather(*(u.refresh() for u in self.upstreams))
        fingerprints = {u.info.fingerprint for u in self.upstreams if u.info is not None}
        if len(fingerprints) > 1:
            raise ValueError(f"pool {self.name!r} mixes models: {sorted(f.name for f in fingerprints)}")
        if self.health_interval is not None:
            self._checker = asyncio.get_running_loop().create_task(self._check_loop(self.health_interval),
                                                                   name=f"health-{self.name}")

    async def _check_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(u.refresh() for u in self.upstreams))

    def find(self, url: str) -> Upstream | None:
        """The member at this URL."""
        url = url.rstrip("/")
        return next((u for u in self.upstreams if u.url == url), None)

    async def add(self, url: str) -> Upstream:
        """Admit a replica that answers /health now; ValueError if it serves another model than the pool."""
        upstream = self.find(url)
        if upstream is None:
            upstream = Upstream(url, self.timeout)
            if not await upstream.refresh() or upstream.info is None:
                await upstream.close()
                raise ValueError(f"{upstream.label} is not healthy")
            ours = self.info
            if ours is not None and upstream.info.fingerprint != ours.fingerprint:
                await upstream.close()
                raise ValueError(f"{upstream.label} serves {upstream.info.fingerprint.name}, but pool {self.name!r} "
                                 f"serves {ours.fingerprint.name}")
            self.upstreams = [*self.upstreams, upstream]
            log.info("upstream %s joined pool %r", upstream.label, self.name)
        upstream.healthy = True
        return upstream

    def remove(self, url: str) -> Upstream | None:
        """Take a replica out: no new call goes to it. Calls under way finish; the caller closes its client
        once the replica has drained."""
        upstream = self.find(url)
        if upstream is not None:
            self.upstreams = [u for u in self.upstreams if u is not upstream]
            log.info("upstream %s left pool %r", upstream.label, self.name)
        return upstream

    def _eject(self, upstream: Upstream, reason: BaseException) -> None:
        if upstream.healthy:
            upstream.healthy = False
            self.ejections += 1
            log.warning("ejected upstream %s: %s", upstream.label, describe(reason))

    async def post(self, route: str, body: dict[str, Any], weight: int = 1,
                   parse: Callable[[Reply], T] = parse_json, accept: str | None = None) -> T:
        """Call the least-loaded healthy replica; on failure (an unreadable body included) eject it and retry
        on another."""
        tried: set[Upstream] = set()
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            candidates = [u for u in self.healthy if u not in tried] or self.healthy
            if not candidates:
                break
            upstream = min(candidates, key=lambda u: u.in_flight)
            tried.add(upstream)
            if attempt:
                self.retried += 1
            try:
                return await upstream.post(route, body, weight, parse, accept)
            except (EngineError, EdgeError):
                raise
            except FAILURES as exc:
                last = exc
                self._eject(upstream, exc)
        detail = f" (last error: {describe(last)})" if last else ""
        raise errors.unhealthy(f"no healthy upstream for model {self.name!r}{detail}")

    async def close(self) -> None:
        """Stop checking and close every client."""
        if self._checker is not None:
            self._checker.cancel()
            await asyncio.gather(self._checker, return_exceptions=True)
        await asyncio.gather(*(u.close() for u in self.upstreams))
