"""The binary /embed form: exact round trips; anything malformed is a ValueError, never a wrong vector."""

from __future__ import annotations

import numpy as np
import pytest

from embedfleet.api import binary


def test_round_trip_is_exact() -> None:
    vectors = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    body = binary.encode(vectors, [7, 1, 512])
    got, tokens = binary.decode(body)
    assert got.tobytes() == vectors.tobytes() and got.shape == (3, 5)
    assert tokens.tolist() == [7, 1, 512]
    assert len(body) == 12 + 3 * 4 + 3 * 5 * 4


@pytest.mark.parametrize("body", [b"", b"EFE1", b"XXXX" + bytes(8), b"EFE1\x01\x00\x00\x00\x02\x00\x00\x00",
                                  binary.encode(np.ones((2, 2), np.float32), [1, 2])[:-1],
                                  binary.encode(np.ones((2, 2), np.float32), [1, 2]) + b"\x00"])
def test_malformed_bodies_raise(body: bytes) -> None:
    with pytest.raises(ValueError, match="binary embeddings"):
        binary.decode(body)


def test_accept_header() -> None:
    assert binary.accepts(binary.ACCEPT)
    assert binary.accepts(binary.MEDIA_TYPE)
    assert not binary.accepts("application/json")
    assert not binary.accepts(None)
    with pytest.raises(ValueError):
        binary.encode(np.ones((2, 2), np.float32), [1])
