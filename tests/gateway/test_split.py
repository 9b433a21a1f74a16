"""Sub-batch splitting by input count and estimated tokens."""

from __future__ import annotations

from embedfleet.gateway.service import estimate_tokens, split


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
