"""Sub-batch splitting by input count and estimated tokens; reading the upstreams' answers."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from embedfleet.api import binary
from embedfleet.gateway.service import TokenEstimator, read_embeddings, split
from embedfleet.gateway.upstream import Reply


def test_split_by_count_and_tokens_keeps_order() -> None:
    estimate = TokenEstimator()
    items: list[str | list[int]] = [f"text {i}" for i in range(70)]
    chunks = split(items, max_inputs=32, max_tokens=10_000, estimate=estimate)
    assert [len(c) for c in chunks] == [32, 32, 6]
    assert [x for c in chunks for x in c] == items
    long: list[str | list[int]] = ["x" * 400] * 10  # ~102 tokens each
    assert [len(c) for c in split(long, max_inputs=32, max_tokens=300, estimate=estimate)] == [2, 2, 2, 2, 2]
    # An input over the budget goes alone, not dropped.
    assert split(["x" * 10_000], max_inputs=32, max_tokens=100, estimate=estimate) == [["x" * 10_000]]


def test_estimates_start_at_four_characters_a_token() -> None:
    estimate = TokenEstimator()
    assert estimate([1, 2, 3]) == 3  # token ids: exact
    assert estimate("") == 2
    assert estimate("a" * 40) == 12


def test_estimates_learn_the_pools_ratio_from_worker_counts() -> None:
    """Dense text (CJK, code) takes far more tokens per character: answers teach the estimator that,
    so sub-batches keep to the upstream's token budget."""
    estimate = TokenEstimator()
    texts: list[str | list[int]] = ["字" * 30] * 8  # 30 characters, 30 tokens + 2 special each
    for _ in range(20):
        estimate.learn(texts, np.full(8, 32), max_length=512)
    assert estimate.chars_per_token == pytest.approx(1.0, abs=0.01)
    assert estimate("字" * 30) == 32
    assert [len(c) for c in split(texts * 4, max_inputs=32, max_tokens=320, estimate=estimate)] == [10, 10, 10, 2]


def test_estimates_ignore_truncated_inputs_token_ids_and_small_answers() -> None:
    estimate = TokenEstimator()
    estimate.learn(["word " * 1000] * 4, np.full(4, 512), max_length=512)  # cut at the limit: no ratio
    estimate.learn([[1, 2, 3, 4, 5] * 20] * 4, np.full(4, 100), max_length=512)  # token ids: no characters
    estimate.learn(["abc"], np.array([3]), max_length=512)  # one token: too little to learn from
    assert estimate.chars_per_token == TokenEstimator.START


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
