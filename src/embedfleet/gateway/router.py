"""Which model pool a request goes to.

A request names its model with OpenAI's ``model`` field, an ``X-Model`` header or a
``/models/{name}/...`` path prefix (rewritten to ``X-Model`` by the edge). Without one,
a route goes to the pool whose task fits it: /rerank to a reranker, /embed_sparse to a SPLADE model,
/predict to a classifier, the embedding routes to an embedder. A name nobody serves is a 404 that
lists the served models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from embedfleet.api import errors
from embedfleet.gateway.service import EmbeddingService

ROUTE_TASKS: dict[str, tuple[str, ...]] = {
    "/rerank": ("reranker",),
    "/embed_sparse": ("sparse",),
    "/predict": ("classifier", "reranker"),
}
EMBEDDING_TASKS = ("embedding",)


class ModelRouter:
    """The pools by name, in configuration order.

    With a ``factory`` the pools change at run time (the fleet's supervisor calls :meth:`join` and
    :meth:`leave` as instances become healthy or stop); without one they are fixed at start.
    """

    def __init__(self, services: Mapping[str, EmbeddingService],
                 factory: Callable[[str], EmbeddingService] | None = None) -> None:
        if not services and factory is None:
            raise ValueError("at least one model pool is needed")
        self.services = dict(services)
        self.factory = factory

    def _names(self) -> str:
        return ", ".join(self.services) or "none yet"

    def ensure(self, name: str) -> EmbeddingService:
        """The pool called ``name``, made (empty) if it does not exist yet."""
        service = self.services.get(name)
        if service is None:
            if self.factory is None:
                raise ValueError("the pools of this gateway are fixed")
            service = self.factory(name)
            # A new dict, never a mutation: readers iterating the old one are not disturbed.
            self.services = {**self.services, name: service}
        return service

    async def join(self, name: str, url: str) -> None:
        """Route model ``name`` to the replica at ``url`` too (it must be healthy now)."""
        await self.ensure(name).pool.add(url)

    async def leave(self, name: str, url: str, drain_timeout: float = 30.0) -> None:
        """Stop routing to ``url``; returns once its calls under way have finished (or the timeout)."""
        service = self.services.get(name)
        if service is None:
            return
        upstream = service.pool.remove(url)
        if upstream is not None:
            await service.pool.drain(upstream, drain_timeout)

    async def suspend(self, name: str, url: str, reason: str) -> None:
        """Stop routing to ``url`` at once, its calls under way retried elsewhere, until it joins again."""
        service = self.services.get(name)
        if service is not None:
            await service.pool.suspend(url, reason)

    async def forget(self, name: str) -> None:
        """Drop the pool of a model no instance serves any more (its requests then get 404)."""
        service = self.services.get(name)
        if service is not None and not service.pool.upstreams:
            self.services = {k: v for k, v in self.services.items() if k != name}
            await service.pool.close()

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
                raise self._unknown(model)
        if len(self.services) == 1:
            return next(iter(self.services.values()))
        tasks = ROUTE_TASKS.get(route, EMBEDDING_TASKS)
        fitting = [s for s in self.services.values() if s.pool.info is None or s.pool.info.fingerprint.task in tasks]
        # The route's own task first (/predict: a classifier before a reranker), then configuration order.
        fitting.sort(key=lambda s: tasks.index(s.pool.info.fingerprint.task) if s.pool.info else len(tasks))
        if not fitting:
            raise errors.not_found(f"no served model does {route}; served models: {self._names()}")
        if model and not strict and len(fitting) > 1:
            raise self._unknown(model)
        return fitting[0]

    def default(self, model: str | None = None) -> EmbeddingService:
        """The pool a request without a route of its own goes to (``POST /``): the one named, else the first."""
        if model:
            return self.pick("/", model)
        if not self.services:
            raise errors.not_found("no model is served yet")
        return next(iter(self.services.values()))

    def _unknown(self, model: str) -> errors.EdgeError:
        return errors.not_found(f"model {model!r} is not served here; served models: {self._names()}")
