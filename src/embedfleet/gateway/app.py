"""The gateway's ASGI application: its routes, the fast path and the shared edge, assembled."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import Histogram
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from embedfleet import __version__
from embedfleet.api.auth import Access, Auth, Rule
from embedfleet.api.edge import INPUT_HEADER, Edge, Hook, install_error_handlers, lifespan
from embedfleet.cache.tiered import TieredCache
from embedfleet.gateway.fastpath import FastPath
from embedfleet.gateway.metrics import GatewayCollector
from embedfleet.gateway.router import ModelRouter
from embedfleet.gateway.routes import GatewayState, router

access_log = logging.getLogger("embedfleet.gateway.access")

ADMIN_RULES = (Rule("/cache", Access.ADMIN, frozenset({"DELETE"}), exact=True),)
"""The gateway's own admin route."""


class GatewayApp(FastAPI):
    """FastAPI, with the edge and the fast path in front of its own middleware stack.

    FastAPI's per-request machinery (its middleware stack, routing, dependencies) costs more than a
    cache hit itself; so HTTP requests meet CORS (where allowed), the edge and the fast path first, and
    only what the fast path does not serve goes through FastAPI.
    """

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is not None and scope["type"] == "http":
            await self.front(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def behind(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI's own stack, behind the front."""
        await super().__call__(scope, receive, send)


def create_gateway_app(router_: ModelRouter, cache: TieredCache, payload_limit: int, max_client_batch_size: int,
                       auth: Auth, max_concurrent_requests: int | None = None, cache_enabled: bool = True,
                       cors_origins: Sequence[str] = (), arrow_max_rows: int = 100_000,
                       on_startup: Hook | None = None, on_shutdown: Hook | None = None,
                       collectors: Sequence[Collector] = ()) -> FastAPI:
    """The gateway's FastAPI application over the model pools (``collectors``: more for /metrics).

    Requests pass, outermost first: CORS (when origins are allowed, so browsers' preflights, which carry
    no key, are answered), the edge (model prefix, keys, body limit, latency, access log), the fast path,
    then FastAPI's own stack and routes (see :class:`GatewayApp`).
    """
    app = GatewayApp(title="embedfleet gateway", version=__version__, lifespan=lifespan(on_startup, on_shutdown),
                  description="Caching, load-balancing entry point in front of embedfleet workers or TEI servers.")
    state = GatewayState(router_, cache, max_client_batch_size, cache_enabled, arrow_max_rows)
    app.state.gateway = state
    state.metrics.register(GatewayCollector(router_, cache))
    for collector in collectors:
        state.metrics.register(collector)
    durations = Histogram("embedfleet_request_duration_seconds", "Gateway request duration", ["route", "status"],
                          registry=state.metrics)
    auth.declare(*ADMIN_RULES)
    install_error_handlers(app)
    app.include_router(router)
    routes = {r.path for r in router.routes if hasattr(r, "path")}
    front: ASGIApp = Edge(FastPath(app.behind, state), limit=payload_limit, auth=auth, route_models=True,
                          durations=durations, routes=routes, access_log=access_log,
                          max_in_flight=max_concurrent_requests)
    if cors_origins:
        front = CORSMiddleware(front, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                               allow_headers=["authorization", "content-type", "x-model", "cache-control"],
                               expose_headers=["x-cache", "x-cache-hits", "x-cache-misses", INPUT_HEADER])
    app.front = front
    return app
