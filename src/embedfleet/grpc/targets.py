"""Which pool a gRPC request goes to.

TEI's clients (``tei.v1``) have no target: they name a model with ``x-model`` metadata, as HTTP clients
do with the header, or get the pool whose task fits the method. The TEI manager's clients
(``tei_multiplexer.v1``) send a ``Target``:

- ``model_id``: a pool name or the model id a pool serves;
- ``instance_name`` / ``instance_index``: an instance, whose pool then serves the request (an instance's
  replicas are interchangeable, so the cache, single-flight, routing and failover still apply). Under
  ``embedfleet serve`` the instances are the fleet's (``embed-0``, ``embed-1``, ... in the order they
  were added); under ``embedfleet gateway`` each pool is one instance, in ``--upstream`` order.

An unknown target is ``NotFound``, and the message lists what is served.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from embedfleet.api import errors
from embedfleet.gateway.router import ModelRouter
from embedfleet.gateway.service import EmbeddingService

Instances = Callable[[], Sequence[tuple[str, str]]]
"""The served instances, in order, as ``(instance name, pool name)``."""


class Targets:
    """Resolve ``x-model`` metadata and multiplexer ``Target`` s against the gateway's pools and instances."""

    def __init__(self, router: ModelRouter, instances: Instances | None = None) -> None:
        self.router = router
        self.instances = instances
        """Set by ``embedfleet serve`` (the fleet's instances); None: each pool is an instance."""

    def _instances(self) -> Sequence[tuple[str, str]]:
        if self.instances is not None:
            return self.instances()
        return [(name, name) for name in self.router.services]

    def _served(self) -> str:
        instances = ", ".join(f"{i} ({pool})" for i, pool in self._instances()) or "none yet"
        return f"instances: {instances}; models: {', '.join(self.router.services) or 'none yet'}"

    def _pool(self, pool: str, what: str) -> EmbeddingService:
        service = self.router.services.get(pool)
        if service is None:
            raise errors.not_found(f"{what} serves no model now; served {self._served()}")
        return service

    def pick(self, route: str, model: str | None) -> EmbeddingService:
        """The pool for a ``tei.v1`` request: the one ``x-model`` names, else the one whose task fits ``route``."""
        return self.router.pick(route, model)

    def resolve(self, route: str, kind: str | None, value: str | int | None,
                model: str | None = None) -> EmbeddingService:
        """The pool for a multiplexer request whose ``Target`` is set to ``kind`` (``instance_name``,
        ``model_id``, ``instance_index``) with ``value``; without a target, as :meth:`pick` (``x-model``)."""
        if kind is None:
            return self.pick(route, model)
        if kind == "model_id":
            service = self.router.named(str(value))
            if service is None:
                raise errors.not_found(f"model {value!r} is not served here; served {self._served()}")
            return service
        instances = self._instances()
        if kind == "instance_name":
            for name, pool in instances:
                if name == value:
                    return self._pool(pool, f"instance {name!r}")
            raise errors.not_found(f"instance {value!r} is not served here; served {self._served()}")
        assert isinstance(value, int)
        if 0 <= value < len(instances):
            name, pool = instances[value]
            return self._pool(pool, f"instance {value} ({name!r})")
        raise errors.not_found(f"instance_index {value} is out of range ({len(instances)} instance(s)); "
                               f"served {self._served()}")
