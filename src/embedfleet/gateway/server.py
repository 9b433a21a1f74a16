"""Run the gateway: connect the pool, open the cache, serve."""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl

import uvicorn
from fastapi import FastAPI

from embedfleet.cache.memory import MemoryStore
from embedfleet.cache.tiered import TieredCache
from embedfleet.cache.urls import open_store
from embedfleet.config import GatewaySettings
from embedfleet.gateway.app import create_gateway_app
from embedfleet.gateway.auth import KeyCheck, read_key_file
from embedfleet.gateway.router import ModelRouter
from embedfleet.gateway.service import EmbeddingService
from embedfleet.gateway.upstream import Pool

log = logging.getLogger("embedfleet.gateway")


def parse_upstreams(specs: list[str]) -> dict[str, list[str]]:
    """``URL`` or ``NAME=URL``, repeated: the URLs of each model pool (``default`` when unnamed)."""
    pools: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or "://" in name:
            name, url = "default", spec
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"upstream {spec!r} is not an http(s) URL")
        pools.setdefault(name, []).append(url)
    return pools


def build_gateway(settings: GatewaySettings) -> FastAPI:
    """The gateway app; pools are checked and the cache writer started when the server starts."""
    if not settings.upstream:
        raise ValueError("at least one --upstream URL is needed")
    store = open_store(settings.cache)
    cache = TieredCache(MemoryStore(settings.memory_cache_bytes), store, ttl=settings.cache_ttl,
                        read_timeout=settings.store_timeout)
    pools = [Pool(name, urls, timeout=settings.upstream_timeout, health_interval=settings.health_interval)
             for name, urls in parse_upstreams(settings.upstream).items()]
    router = ModelRouter({p.name: EmbeddingService(p, cache, settings.max_client_batch_size) for p in pools})
    api_keys = [*settings.api_key, *(read_key_file(settings.api_key_file) if settings.api_key_file else [])]
    keys = KeyCheck(api_keys, settings.admin_key)

    async def on_startup() -> None:
        await asyncio.gather(*(p.start() for p in pools))
        cache.start()
        # Start-up objects (models, modules) never die: keep them out of every full GC pass,
        # whose pauses were the p99 under load.
        gc.freeze()
        for p in pools:
            info = p.info
            log.info("pool %r: %d upstream(s), %d healthy, model=%s task=%s dim=%s", p.name, len(p.upstreams),
                     len(p.healthy), info.model_id if info else "unknown (no upstream answered yet)",
                     info.fingerprint.task if info else "?", info.raw.get("dimension", "?") if info else "?")
        log.info("gateway on %s://%s:%d, cache=%s (memory tier %d MiB), %d model(s)",
                 "https" if settings.tls_cert else "http", settings.host, settings.port, settings.cache,
                 settings.memory_cache_bytes // (1024 * 1024), len(pools))

    async def on_shutdown() -> None:
        await cache.close()
        await asyncio.gather(*(p.close() for p in pools))

    return create_gateway_app(router, cache, settings.payload_limit, settings.max_client_batch_size,
                              cache_enabled=settings.cache != "none", keys=keys, cors_origins=settings.cors_origin,
                              on_startup=on_startup, on_shutdown=on_shutdown)


def serve(app: FastAPI, settings: GatewaySettings) -> None:
    """Serve until interrupted (SIGTERM flushes the cache's write queue); HTTPS and mTLS when configured."""
    tls: dict[str, object] = {}
    if settings.tls_cert is not None:
        tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
        if settings.tls_client_ca is not None:
            tls |= {"ssl_ca_certs": str(settings.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=10, lifespan="on", **tls)  # type: ignore[arg-type]
    uvicorn.Server(config).run()
