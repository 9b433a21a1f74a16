"""Cache keys: a BLAKE2b hash over a versioned schema of model, parameters and text.

Stored keys are ``model tag (8 bytes) + entry hash (32 bytes)``. The entry hash already covers the
model; the tag in front lets a store count or delete one model's entries by prefix.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Any

KEY_SCHEMA_VERSION = 2
"""2: the model fingerprint covers the numeric precision (``model_dtype``: float32, float16, bfloat16, int8)."""
MODEL_TAG_BYTES = 8
ENTRY_HASH_BYTES = 32
KEY_BYTES = MODEL_TAG_BYTES + ENTRY_HASH_BYTES


_LENGTH = struct.Struct("<I").pack


def _field(value: str | None) -> bytes:
    """Length-prefixed UTF-8 (None and "" differ), so no two field lists encode alike."""
    if value is None:
        return b"\xff\xff\xff\xff"
    data = value.encode("utf-8")
    return struct.pack("<I", len(data)) + data


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies a model's outputs, as its upstream's /info reports it: the model, its task and
    pooling, and the precision it runs at (an int8 or bfloat16 replica's vectors are not a float32 one's)."""

    model_id: str
    revision: str | None
    task: str
    pooling: str | None
    precision: str | None = None

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> ModelFingerprint:
        """From an embedfleet worker's or a TEI server's /info (KeyError without ``model_id``)."""
        model_type = info.get("model_type") or {}
        task = str(info.get("task") or next(iter(model_type), "embedding"))
        pooling = info.get("pooling")
        if pooling is None and "embedding" in model_type:
            pooling = model_type["embedding"].get("pooling")
        return cls(str(info["model_id"]), info.get("model_sha") or info.get("revision"), task, pooling,
                   info.get("model_dtype"))

    def encode(self) -> bytes:
        """Canonical bytes of the fingerprint."""
        return b"".join(_field(v) for v in (self.model_id, self.revision, self.task, self.pooling, self.precision))

    @cached_property
    def tag(self) -> bytes:
        """The 8-byte prefix of this model's stored keys."""
        return hashlib.blake2b(self.encode(), digest_size=MODEL_TAG_BYTES, person=b"embedfleet-model").digest()

    @property
    def name(self) -> str:
        """A readable id for stats and logs: ``model_id@revision``."""
        return f"{self.model_id}@{self.revision}" if self.revision else self.model_id

    def __str__(self) -> str:
        return f"{self.name} ({self.task}, {self.pooling or 'head'}, {self.precision or 'precision unknown'})"


@dataclass(frozen=True)
class EmbedParams:
    """Every request parameter that changes the vector. ``truncate`` is the effective value."""

    normalize: bool = True
    truncate: bool = False
    truncation_direction: str = "right"
    prompt_name: str | None = None
    dimensions: int | None = None

    def encode(self) -> bytes:
        """Canonical bytes of the parameters."""
        dims = -1 if self.dimensions is None else self.dimensions
        return (struct.pack("<??q", self.normalize, self.truncate, dims)
                + _field(self.truncation_direction.lower()) + _field(self.prompt_name))


class KeyHasher:
    """Keys of many texts under one model and parameter set: the shared prefix is hashed once."""

    def __init__(self, model: ModelFingerprint, params: EmbedParams) -> None:
        self.tag = model.tag
        self._prefix = hashlib.blake2b(digest_size=ENTRY_HASH_BYTES, person=b"embedfleet-key")
        self._prefix.update(struct.pack("<H", KEY_SCHEMA_VERSION))
        self._prefix.update(model.encode())
        self._prefix.update(params.encode())

    def key(self, text: str) -> bytes:
        """The stored key of one text's vector."""
        data = text.encode("utf-8")
        h = self._prefix.copy()
        h.update(_LENGTH(len(data)))  # what _field(text) writes, without building it
        h.update(data)
        return self.tag + h.digest()


def cache_key(model: ModelFingerprint, params: EmbedParams, text: str) -> bytes:
    """The stored key of one text's vector: model tag + BLAKE2b-256 of (schema version, model, params, text)."""
    return KeyHasher(model, params).key(text)
