"""Sub-batch splitting by input count and estimated tokens; reading the upstreams' answers."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from embedfleet.api import binary
from embedfleet.gateway.service import estimate_tokens, read_embeddings, split
from embedfleet.gateway.upstream import Reply


def test_split_by_count_and_tokens_keeps_order() -> None:
    items: list[str | list[int]] = [f"text {i}" for i in range(70)]
    chunks = split(items, max_inputs=32, max_tokens=10_000)
    assert [len(c) for c in chunks] == [32, 32, 6]
    assert [x for c in chunks for x in c] == items
    long = ["x" * 400] * 10  # ~102 tokens each
    assert [len(c) for c in split(long, max_inputs=32, max_tokens=300)] == [2, 2, 2, 2, 2]
    assert split(["x" * 10_000], max_inputs=32, max_tokens=100) == [["x" * 10_000]]  # alone, not dropped


def test_estimates() -> None:
    assert estimate_tokens([1, 2, 3]) == 3
    assert estimate_tokens("") == 2
    assert estimate_tokens("a" * 40) == 12


def _response(content: bytes, content_type: str) -> Reply:
    return Reply(200, content_type, content)


def test_upstream_answers_in_either_form() -> None:
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    got, tokens = read_embeddings(_response(binary.encode(vectors, [4, 9]), binary.MEDIA_TYPE))
    assert got.tobytes() == vectors.tobytes() and tokens is not None and tokens.tolist() == [4, 9]
    # A TEI server ignores the Accept header and answers JSON: same vectors, no token counts.
    got, tokens = read_embeddings(_response(orjson.dumps(vectors, option=orjson.OPT_SERIALIZE_NUMPY),
                                            "application/json"))
    assert got.tobytes() == vectors.tobytes() and tokens is None


@pytest.mark.parametrize("content", [b"{}", b"[[1.0], [1.0, 2.0]]", b'[["a"]]', b"[1.0]", b"not json"])
def test_unreadable_upstream_answers_raise(content: bytes) -> None:
    with pytest.raises(ValueError):  # the pool ejects the replica and retries on another
        read_embeddings(_response(content, "application/json"))
