"""The store interface: opaque keys and values, batched, async."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class StoreStats:
    """Entries and bytes held, in all and per model tag (hex)."""

    entries: int = 0
    bytes: int = 0
    per_model: dict[str, tuple[int, int]] = field(default_factory=dict)


class StoreFull(Exception):
    """A store at its size bound refused a write. Nothing is wrong with it: reads go on, and later writes
    may fit (after a delete, or as expired entries are overwritten)."""

    def __init__(self, dropped: int, message: str) -> None:
        super().__init__(message)
        self.dropped = dropped


class Leases(ABC):
    """Short per-key leases that every gateway sharing a store sees: cross-gateway single-flight.

    A gateway about to compute a text takes the text's lease; another gateway that wants the same text
    meanwhile waits for the value instead of computing it again. A lease expires by itself (``ttl``)
    unless its holder renews it, so a holder that dies delays the others by at most one ``ttl``; a holder
    that computed the value publishes it and drops the lease in one round trip. Only stores shared
    across hosts offer leases (:attr:`Store.leases`).
    """

    @abstractmethod
    async def claim(self, keys: Sequence[bytes], ttl: float) -> list[bytes | bool]:
        """Per key, in order and atomically per key: its stored value (bytes) if there is one, else True
        where this caller now holds the key's lease (for ``ttl`` seconds), else False (another holds it)."""

    @abstractmethod
    async def renew(self, keys: Sequence[bytes], ttl: float) -> None:
        """Extend this caller's leases on the keys by ``ttl`` (leases it no longer holds are left alone)."""

    @abstractmethod
    async def publish(self, items: Sequence[tuple[bytes, bytes]], ttl: float | None, release: Sequence[bytes]) -> None:
        """Write entries as :meth:`Store.set_many` does, then drop this caller's leases on ``release``
        (in that order: a waiter that sees a lease gone finds the value)."""


class Store(ABC):
    """A key-value store of cache entries. Keys start with an 8-byte model tag."""

    name: str
    leases: Leases | None = None
    """Cross-gateway single-flight, where the store is shared by gateways on several hosts (Redis)."""

    @abstractmethod
    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values for the keys, in order (None where absent), in one round trip."""

    @abstractmethod
    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl: float | None = None) -> None:
        """Write entries (overwriting). ``ttl`` in seconds lets stores that can expire entries do so.
        Raises :class:`StoreFull` when a bounded store has no room for them."""

    @abstractmethod
    async def delete(self, model_tag: bytes | None = None) -> int:
        """Delete one model's entries (by tag), or all; returns how many were deleted."""

    @abstractmethod
    async def stats(self) -> StoreStats:
        """What the store holds."""

    @abstractmethod
    async def close(self) -> None:
        """Release resources (flush, close files or connections)."""

    def model_dimension(self, model_tag: bytes, dimension: int) -> None:  # noqa: B027 - an optional hook
        """Hint: the native embedding size of a model (from its /info). Stores with typed collections
        (Qdrant) size them by it; opaque key-value stores ignore it."""
