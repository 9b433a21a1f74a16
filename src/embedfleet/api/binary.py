"""The binary /embed response: how an embedfleet worker hands vectors to the gateway.

JSON costs both sides: the worker formats every float as text and the gateway parses it back (about
a hundred times the CPU of this form), the text is three times the bytes, and it says nothing of how
many tokens each input took.
A client that sends ``Accept:`` :data:`MEDIA_TYPE` to ``POST /embed`` gets instead (little-endian)::

    b"EFE1" | count u32 | dim u32 | count x u32 token counts | count x dim float32

The floats are the exact float32 values the JSON form would spell. TEI servers ignore the header and
answer JSON, so a client asking for this form must read either (check the response's Content-Type).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

MEDIA_TYPE = "application/x-embedfleet-embeddings"
ACCEPT = f"{MEDIA_TYPE}, application/json;q=0.5"
"""The Accept header a client of either kind of server sends: this form, else JSON."""

MAGIC = b"EFE1"
_HEADER = struct.Struct("<4sII")


def accepts(header: str | None) -> bool:
    """Whether an Accept header asks for the binary form."""
    return header is not None and MEDIA_TYPE in header


def encode(vectors: np.ndarray, tokens: Sequence[int]) -> bytes:
    """The body for ``vectors`` [count, dim] and each input's token count."""
    count, dim = vectors.shape
    if len(tokens) != count:
        raise ValueError(f"{len(tokens)} token counts for {count} vectors")
    return b"".join((_HEADER.pack(MAGIC, count, dim), np.asarray(tokens, dtype="<u4").tobytes(),
                     np.ascontiguousarray(vectors, dtype="<f4").tobytes()))


def decode(body: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors [count, dim] float32, token counts [count] uint32)``, views of ``body``.

    Raises ValueError for a body that is not exactly one well-formed message.
    """
    if len(body) < _HEADER.size:
        raise ValueError(f"binary embeddings: {len(body)} bytes is shorter than the header")
    magic, count, dim = _HEADER.unpack_from(body)
    if magic != MAGIC:
        raise ValueError(f"binary embeddings: bad magic {magic!r}")
    expected = _HEADER.size + 4 * count + 4 * count * dim
    if len(body) != expected:
        raise ValueError(f"binary embeddings: {len(body)} bytes, expected {expected} for {count} x {dim}")
    tokens = np.frombuffer(body, dtype="<u4", count=count, offset=_HEADER.size)
    vectors = np.frombuffer(body, dtype="<f4", offset=_HEADER.size + 4 * count).reshape(count, dim)
    return vectors, tokens
