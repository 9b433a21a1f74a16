"""Cache values: exact float32 bytes behind a header with length, expiry and checksum.

Layout (little-endian): ``b"EFv1" | dim u32 | expires_at f64 (unix s, 0 = never) | checksum 8 bytes |
dim x float32``. The checksum (BLAKE2b-64) covers everything after it and the header fields, so a
truncated, torn or bit-flipped value decodes to None: a miss, never a wrong vector.
"""

from __future__ import annotations

import hashlib
import struct
import time

import numpy as np

MAGIC = b"EFv1"
HEADER = struct.Struct("<4sId8s")
"""The value header: magic, dim, expires_at, checksum."""
HEADER_BYTES = HEADER.size


def _checksum(dim: int, expires_at: float, payload: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=8, person=b"embedfleet-val")
    h.update(struct.pack("<Id", dim, expires_at))
    h.update(payload)
    return h.digest()


def encode(vector: np.ndarray, expires_at: float = 0.0) -> bytes:
    """Serialise one vector (any float dtype; stored as float32)."""
    payload = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    dim = len(payload) // 4
    return HEADER.pack(MAGIC, dim, expires_at, _checksum(dim, expires_at, payload)) + payload


def verify(blob: bytes | None) -> float | None:
    """``expires_at`` of a well-formed value whose checksum matches (expiry not checked), else None."""
    if blob is None or len(blob) < HEADER_BYTES:
        return None
    magic, dim, expires_at, checksum = HEADER.unpack_from(blob)
    if magic != MAGIC or len(blob) != HEADER_BYTES + 4 * dim:
        return None
    if _checksum(dim, expires_at, memoryview(blob)[HEADER_BYTES:]) != checksum:
        return None
    return float(expires_at)


def payload(blob: bytes) -> np.ndarray:
    """The vector of a value :func:`verify` accepted: a read-only view of its bytes, no copy."""
    return np.frombuffer(blob, dtype="<f4", offset=HEADER_BYTES)


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
