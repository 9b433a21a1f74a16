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


class Store(ABC):
    """A key-value store of cache entries. Keys start with an 8-byte model tag."""

    name: str

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
