"""Tokenization: TEI's length rules, truncation direction, prompts and token-id inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedfleet.engine.errors import EngineError, ErrorKind
from embedfleet.engine.tokenization import Tokenization, TruncationDirection

CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def tok(default_path: Path) -> Tokenization:
    return Tokenization(default_path, 16, prompts={"query": "query: "})


def test_too_long_without_truncate_is_validation_error(tok: Tokenization) -> None:
    with pytest.raises(EngineError) as err:
        tok.encode(["word " * 40], truncate=False)
    assert err.value.kind is ErrorKind.VALIDATION
    assert "must have less than 16 tokens" in err.value.message


def test_truncation_keeps_special_tokens_and_direction(tok: Tokenization) -> None:
    text = " ".join(f"w{i}" for i in range(40))
    right = tok.encode([text], truncate=True, direction=TruncationDirection.RIGHT)[0].ids.tolist()
    left = tok.encode([text], truncate=True, direction=TruncationDirection.LEFT)[0].ids.tolist()
    full = tok.tokenizer.encode(text).ids
    assert len(right) == len(left) == 16
    assert right[0] == left[0] == CLS and right[-1] == left[-1] == SEP
    assert right[1:-1] == full[1:15]
    assert left[1:-1] == full[-15:-1]


def test_prompts_and_unknown_prompt(tok: Tokenization) -> None:
    assert tok.apply_prompt(["x"], "query") == ["query: x"]
    with pytest.raises(EngineError, match="Available prompts: \\[query\\]"):
        tok.apply_prompt(["x"], "nope")


def test_token_id_inputs(tok: Tokenization) -> None:
    enc = tok.encode([[CLS, 7592, SEP]], truncate=False)[0]
    assert enc.ids.tolist() == [CLS, 7592, SEP]
    assert tok.encode([list(range(1, 30))], truncate=True, direction=TruncationDirection.LEFT)[0].ids[0] == 14
    with pytest.raises(EngineError, match="out of range"):
        tok.encode([[10**6]], truncate=False)


def test_pairs_are_truncated_longest_first(tok: Tokenization) -> None:
    enc = tok.encode(["short query"], truncate=True, pairs=["long " * 50])[0]
    assert enc.length == 16
    assert set(enc.type_ids.tolist()) == {0, 1}
