"""Run the gateway: connect the pool, open the cache, serve."""

from __future__ import annotations

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
from embedfleet.gateway.service import EmbeddingService
from embedfleet.gateway.upstream import Pool

log = logging.getLogger("embedfleet.gateway")


def build_gateway(settings: GatewaySettings) -> FastAPI:
    """The gateway app; the pool is checked and the cache writer started when the server starts."""
    if not settings.upstream:
        raise ValueError("at least one --upstream URL is needed")
    urls = [u.split("=", 1)[1] if "=" in u.split("://")[0] else u for u in settings.upstream]
    names = {u.split("=", 1)[0] for u in settings.upstream if "=" in u.split("://")[0]}
    pool = Pool(names.pop() if names else "default", urls, timeout=settings.upstream_timeout,
                health_interval=settings.health_interval)
    store = open_store(settings.cache)
    cache = TieredCache(MemoryStore(settings.memory_cache_bytes), store, ttl=settings.cache_ttl,
                        read_timeout=settings.store_timeout)
    service = EmbeddingService(pool, cache, settings.max_client_batch_size)
    api_keys = [*settings.api_key, *(read_key_file(settings.api_key_file) if settings.api_key_file else [])]
    keys = KeyCheck(api_keys, settings.admin_key)

    async def on_startup() -> None:
        await pool.start()
        cache.start()
        info = pool.info
        log.info("gateway on http://%s:%d: pool %r with %d upstream(s) (%d healthy), model=%s dim=%s, "
                 "cache=%s (memory tier %d MiB)", settings.host, settings.port, pool.name, len(pool.upstreams),
                 len(pool.healthy), info.model_id if info else "unknown (no upstream answered yet)",
                 info.raw.get("dimension", "?") if info else "?", settings.cache,
                 settings.memory_cache_bytes // (1024 * 1024))

    async def on_shutdown() -> None:
        await cache.close()
        await pool.close()

    return create_gateway_app(service, settings.payload_limit, cache_enabled=settings.cache != "none", keys=keys,
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
