"""Which model pool a request goes to.

A request names its model with OpenAI's ``model`` field, an ``X-Model`` header or a
``/models/{name}/...`` path prefix (rewritten to ``X-Model`` by :class:`ModelPrefix`). Without one,
a route goes to the pool whose task fits it: /rerank to a reranker, /embed_sparse to a SPLADE model,
/predict to a classifier, the embedding routes to an embedder. A name nobody serves is a 404 that
lists the served models.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from embedfleet.api.errors import EmbedfleetError, ErrorType
from embedfleet.gateway.service import EmbeddingService

ROUTE_TASKS: dict[str, tuple[str, ...]] = {
    "/rerank": ("reranker",),
    "/embed_sparse": ("sparse",),
    "/predict": ("classifier", "reranker"),
}
EMBEDDING_TASKS = ("embedding",)


class ModelRouter:
    """The pools by name, in configuration order."""

    def __init__(self, services: Mapping[str, EmbeddingService]) -> None:
        if not services:
            raise ValueError("at least one model pool is needed")
        self.services = dict(services)

    def _names(self) -> str:
        return ", ".join(self.services)

    def named(self, name: str) -> EmbeddingService | None:
        """The pool with this name, or serving this model id."""
        if name in self.services:
            return self.services[name]
        for service in self.services.values():
            info = service.pool.info
            if info is not None and name in (info.model_id, info.fingerprint.name):
                return service
        return None

    def pick(self, route: str, model: str | None = None, strict: bool = True) -> EmbeddingService:
        """The pool for a request. ``strict=False`` (OpenAI's always-present ``model`` field) falls back
        to routing by task when the name is unknown and only one pool fits."""
        if model:
            found = self.named(model)
            if found is not None:
                return found
            if strict:
                raise EmbedfleetError(ErrorType.VALIDATION,
                                      f"model {model!r} is not served here; served models: {self._names()}",
                                      status=404)
        tasks = ROUTE_TASKS.get(route, EMBEDDING_TASKS)
        fitting = [s for s in self.services.values() if s.pool.info is None or s.pool.info.fingerprint.task in tasks]
        if len(self.services) == 1:
            return next(iter(self.services.values()))
        if not fitting:
            raise EmbedfleetError(ErrorType.VALIDATION, f"no served model does {route}; served models: "
                                  f"{self._names()}", status=404)
        if model and not strict and len(fitting) > 1:
            raise EmbedfleetError(ErrorType.VALIDATION,
                                  f"model {model!r} is not served here; served models: {self._names()}", status=404)
        return fitting[0]


class ModelPrefix:
    """ASGI middleware: ``/models/{name}/embed`` becomes ``/embed`` with ``X-Model: name``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/models/"):
            name, _, rest = path[len("/models/"):].partition("/")
            if name and rest:
                headers = [(k, v) for k, v in scope["headers"] if k != b"x-model"]
                scope = {**scope, "path": "/" + rest, "raw_path": ("/" + rest).encode(),
                         "headers": [*headers, (b"x-model", name.encode())]}
        await self.app(scope, receive, send)
