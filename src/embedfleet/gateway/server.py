"""Run the gateway: connect the pool, open the cache, serve."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI
from prometheus_client.registry import Collector

from embedfleet.api.auth import Auth, read_key_file
from embedfleet.api.edge import freeze_startup_objects, server_config
from embedfleet.cache.memory import MemoryStore
from embedfleet.cache.tiered import TieredCache
from embedfleet.cache.urls import open_store
from embedfleet.config import GatewaySettings
from embedfleet.gateway.app import create_gateway_app
from embedfleet.gateway.router import ModelRouter
from embedfleet.gateway.service import EmbeddingService
from embedfleet.gateway.upstream import DNS_PREFIX, DnsName, Pool
from embedfleet.grpc.targets import Targets

if TYPE_CHECKING:
    from embedfleet.grpc.server import GrpcServer

log = logging.getLogger("embedfleet.gateway")


def parse_upstreams(specs: list[str]) -> dict[str, list[str]]:
    """``URL`` or ``NAME=URL``, repeated: the URLs of each model pool (``default`` when unnamed). A URL is
    ``http(s)://HOST:PORT``, or ``dns+http://NAME:PORT`` for every address NAME resolves to."""
    pools: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or "://" in name:
            name, url = "default", spec
        if url.startswith(DNS_PREFIX):
            DnsName.parse(url)  # ValueError when malformed
        elif not url.startswith(("http://", "https://")):
            raise ValueError(f"upstream {spec!r} is not an http(s):// or dns+http:// URL")
        pools.setdefault(name, []).append(url)
    return pools


@dataclass
class Gateway:
    """The gateway app and the parts the fleet drives: the model router, the cache, the keys and the gRPC
    targets (the fleet tells them its instances)."""

    app: FastAPI
    router: ModelRouter
    cache: TieredCache
    auth: Auth
    targets: Targets


Hook = Callable[[], Awaitable[None]]


def build_gateway(settings: GatewaySettings, dynamic: bool = False, on_startup: Hook | None = None,
                  on_shutdown: Hook | None = None, collectors: Sequence[Collector] = ()) -> Gateway:
    """The gateway; pools are checked and the cache writer started when the server starts.

    ``dynamic``: the pools follow the fleet's supervisor (``--upstream`` is then optional), which
    checks their health; ``on_startup`` runs after the gateway's own start-up, ``on_shutdown`` before
    the cache's write queue is flushed.
    """
    if not settings.upstream and not dynamic:
        raise ValueError("at least one --upstream URL is needed")
    store = open_store(settings.cache)
    cache = TieredCache(MemoryStore(settings.memory_cache_bytes), store, ttl=settings.cache_ttl,
                        read_timeout=settings.store_timeout, leases=settings.cache_leases,
                        lease_ttl=settings.cache_lease_ttl, lease_wait=settings.upstream_timeout)
    pools = [Pool(name, urls, timeout=settings.upstream_timeout, health_interval=settings.health_interval,
                  dns_interval=settings.upstream_dns_interval)
             for name, urls in parse_upstreams(settings.upstream).items()]

    def new_service(name: str) -> EmbeddingService:
        pool = Pool(name, [], timeout=settings.upstream_timeout, health_interval=None)
        return EmbeddingService(pool, cache, settings.max_client_batch_size)

    router = ModelRouter({p.name: EmbeddingService(p, cache, settings.max_client_batch_size) for p in pools},
                         factory=new_service if dynamic else None)
    api_keys = [*settings.api_key, *(read_key_file(settings.api_key_file) if settings.api_key_file else [])]
    auth = Auth(api_keys, settings.admin_key)
    targets = Targets(router)
    grpc_servers: list[GrpcServer] = []

    async def start_grpc() -> None:
        # Imported here: only a gateway that serves gRPC loads the protobuf modules.
        from embedfleet.grpc.server import GrpcServer

        server = GrpcServer(app.state.gateway, auth, targets, settings, app.state.gateway.metrics)
        await server.start()
        grpc_servers.append(server)

    async def startup() -> None:
        await asyncio.gather(*(p.start() for p in pools))
        cache.start()
        for p in pools:
            info = p.info
            log.info("pool %r: %d upstream(s), %d healthy, model=%s task=%s dim=%s", p.name, len(p.upstreams),
                     len(p.healthy), info.model_id if info else "unknown (no upstream answered yet)",
                     info.fingerprint.task if info else "?", info.raw.get("dimension", "?") if info else "?")
        log.info("gateway on %s://%s:%d, cache=%s (memory tier %d MiB), %d model(s)",
                 "https" if settings.tls_cert else "http", settings.host, settings.port, settings.cache,
                 settings.memory_cache_bytes // (1024 * 1024), len(pools))
        if settings.grpc_port:
            await start_grpc()
        if on_startup is not None:
            await on_startup()
        freeze_startup_objects()

    async def shutdown() -> None:
        try:
            for server in grpc_servers:
                await server.stop()
            if on_shutdown is not None:
                await on_shutdown()
        finally:
            await cache.close()
            await asyncio.gather(*(s.pool.close() for s in router.services.values()))

    app = create_gateway_app(router, cache, settings.payload_limit, settings.max_client_batch_size,
                             auth=auth, max_concurrent_requests=settings.max_concurrent_requests,
                             cache_enabled=settings.cache != "none", cors_origins=settings.cors_origin,
                             arrow_max_rows=settings.arrow_max_rows,
                             on_startup=startup, on_shutdown=shutdown, collectors=collectors)
    return Gateway(app, router, cache, auth, targets)


def uvicorn_config(app: FastAPI, settings: GatewaySettings) -> uvicorn.Config:
    """The server's config: HTTPS and mTLS when configured."""
    return server_config(app, settings.host, settings.port, settings.tls_cert, settings.tls_key, settings.tls_client_ca)


def serve(app: FastAPI, settings: GatewaySettings) -> None:
    """Serve until interrupted (SIGTERM flushes the cache's write queue)."""
    uvicorn.Server(uvicorn_config(app, settings)).run()
