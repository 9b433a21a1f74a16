"""Cache values: exact float32 bytes behind a header with length, token count, expiry and checksum.

Layout (little-endian), version 2: ``b"EFv2" | dim u32 | tokens u32 | expires_at f64 (unix s, 0 = never)
| checksum 8 bytes | dim x float32``. ``tokens`` is the input's token count as the worker tokenized it (0
where the upstream did not say, e.g. a TEI server), so a hit reports the same OpenAI ``usage`` as a miss.

Version 1 (``b"EFv1" | dim u32 | expires_at f64 | checksum | floats``, no token count) is still read, so
a cache filled by an earlier embedfleet stays warm; it reads as 0 tokens. New values are version 2.

The checksum (BLAKE2b-64) covers the header fields and the floats, so a truncated, torn or bit-flipped
value decodes to None: a miss, never a wrong vector.
"""

from __future__ import annotations

import hashlib
import struct
import time
from typing import NamedTuple

import numpy as np

MAGIC = b"EFv2"
HEADER = struct.Struct("<4sIId8s")
"""The version 2 header: magic, dim, tokens, expires_at, checksum."""
HEADER_BYTES = HEADER.size

MAGIC_V1 = b"EFv1"
HEADER_V1 = struct.Struct("<4sId8s")
"""The version 1 header: magic, dim, expires_at, checksum."""


class Fields(NamedTuple):
    """A value's header fields."""

    version: int
    dim: int
    tokens: int
    expires_at: float
    checksum: bytes

    @property
    def size(self) -> int:
        """Header bytes (the floats start here)."""
        return HEADER_BYTES if self.version == 2 else HEADER_V1.size


def _checksum(version: int, dim: int, tokens: int, expires_at: float, payload: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=8, person=b"embedfleet-val")
    h.update(struct.pack("<IId", dim, tokens, expires_at) if version == 2 else struct.pack("<Id", dim, expires_at))
    h.update(payload)
    return h.digest()


def assemble(fields: Fields, floats: bytes) -> bytes:
    """A value from its header fields and float32 bytes (the checksum is taken as given, not computed)."""
    if fields.version == 2:
        header = HEADER.pack(MAGIC, fields.dim, fields.tokens, fields.expires_at, fields.checksum)
    else:
        header = HEADER_V1.pack(MAGIC_V1, fields.dim, fields.expires_at, fields.checksum)
    return header + floats


def encode(vector: np.ndarray, expires_at: float = 0.0, tokens: int = 0) -> bytes:
    """Serialise one vector (any float dtype; stored as float32) with its input's token count."""
    payload = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    dim = len(payload) // 4
    return HEADER.pack(MAGIC, dim, tokens, expires_at, _checksum(2, dim, tokens, expires_at, payload)) + payload


def fields(blob: bytes | None) -> Fields | None:
    """The header of a well-formed value whose checksum matches (expiry not checked), else None."""
    if blob is None or len(blob) < HEADER_V1.size:
        return None
    magic = blob[:4]
    if magic == MAGIC and len(blob) >= HEADER_BYTES:
        _, dim, tokens, expires_at, checksum = HEADER.unpack_from(blob)
        found = Fields(2, dim, tokens, expires_at, checksum)
    elif magic == MAGIC_V1:
        _, dim, expires_at, checksum = HEADER_V1.unpack_from(blob)
        found = Fields(1, dim, 0, expires_at, checksum)
    else:
        return None
    if len(blob) != found.size + 4 * dim:
        return None
    if _checksum(found.version, dim, found.tokens, expires_at, memoryview(blob)[found.size:]) != checksum:
        return None
    return found


def verify(blob: bytes | None) -> float | None:
    """``expires_at`` of a well-formed value whose checksum matches (expiry not checked), else None."""
    found = fields(blob)
    return None if found is None else float(found.expires_at)


def payload(blob: bytes) -> np.ndarray:
    """The vector of a value :func:`verify` accepted: a read-only view of its bytes, no copy."""
    return np.frombuffer(blob, dtype="<f4", offset=HEADER_BYTES if blob[:4] == MAGIC else HEADER_V1.size)


def decode(blob: bytes | memoryview | None, now: float | None = None) -> np.ndarray | None:
    """The vector, or None when the value is absent, malformed, corrupt or expired."""
    if blob is None:
        return None
    data = bytes(blob)
    expires_at = verify(data)
    if expires_at is None:
        return None
    if expires_at and expires_at <= (time.time() if now is None else now):
        return None
    return payload(data)
