"""Tokenization with text-embeddings-inference's rules.

Inputs longer than the model's maximum fail with a Validation error unless truncation is asked
for; truncation cuts from the left or the right and keeps the special tokens. Batch encoding
uses the Rust tokenizer's own parallelism and releases the GIL, so callers run it in a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from embedfleet.engine import errors


class TruncationDirection(StrEnum):
    """Which end of an over-long input is cut off. Accepted in any letter case."""

    LEFT = "left"
    RIGHT = "right"

    @classmethod
    def _missing_(cls, value: object) -> TruncationDirection | None:
        if isinstance(value, str):
            lowered = value.lower()
            for member in cls:
                if member.value == lowered:
                    return member
        return None


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized input, ready to batch."""

    ids: np.ndarray
    type_ids: np.ndarray
    characters: int

    @property
    def length(self) -> int:
        """Number of tokens."""
        return int(self.ids.shape[0])


def _load(path: Path) -> Tokenizer:
    file = path / "tokenizer.json"
    if file.is_file():
        return Tokenizer.from_file(str(file))
    # No tokenizer.json: let transformers convert the slow tokenizer files into a fast one.
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    backend: Tokenizer = fast.backend_tokenizer
    return backend


class Tokenization:
    """The model's tokenizer, configured once per truncation mode (configs are not thread-safe)."""

    def __init__(self, path: Path, max_input_length: int, prompts: dict[str, str] | None = None,
                 default_prompt_name: str | None = None) -> None:
        base = _load(path)
        base.no_padding()
        base.no_truncation()
        self.max_input_length = max_input_length
        self.prompts = prompts or {}
        self.default_prompt_name = default_prompt_name
        self._plain = base
        self._truncating: dict[TruncationDirection, Tokenizer] = {}
        for direction in TruncationDirection:
            tok = Tokenizer.from_str(base.to_str())
            tok.no_padding()
            tok.enable_truncation(max_input_length, strategy="longest_first", direction=direction.value)
            self._truncating[direction] = tok
        self.vocab_size = base.get_vocab_size(with_added_tokens=True)

    @property
    def tokenizer(self) -> Tokenizer:
        """The untruncated tokenizer (for /tokenize and /decode)."""
        return self._plain

    def apply_prompt(self, texts: Sequence[str], prompt_name: str | None) -> list[str]:
        """Prepend the named sentence-transformers prompt. Unknown names are a Validation error."""
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return list(texts)
        if name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise errors.validation(
                f"Input validation error: `prompt_name` is set to `{name}` but it was not found in the "
                f"Sentence Transformers prompts. Available prompts: [{known}]"
            )
        prefix = self.prompts[name]
        return [prefix + t for t in texts]

    def encode(
        self,
        inputs: Sequence[str | list[int]],
        truncate: bool,
        direction: TruncationDirection = TruncationDirection.RIGHT,
        pairs: Sequence[str] | None = None,
    ) -> list[Encoded]:
        """Tokenize a batch. ``pairs``, if given, is the second text of each input (rerank, predict)."""
        out: list[Encoded | None] = [None] * len(inputs)
        text_idx = [i for i, x in enumerate(inputs) if isinstance(x, str)]
        tok = self._truncating[direction] if truncate else self._plain
        if text_idx:
            batch: list[str | tuple[str, str]]
            if pairs is not None:
                batch = [(str(inputs[i]), pairs[i]) for i in text_idx]
            else:
                batch = [str(inputs[i]) for i in text_idx]
            try:
                encodings: list[Encoding] = tok.encode_batch(batch, add_special_tokens=True)
            except Exception as exc:  # the Rust tokenizer raises plain Exceptions
                raise errors.tokenizer(str(exc)) from exc
            for i, enc in zip(text_idx, encodings, strict=True):
                characters = len(str(inputs[i])) + (len(pairs[i]) if pairs is not None else 0)
                out[i] = self._check(enc.ids, enc.type_ids, characters, truncate, direction, i)
        for i, x in enumerate(inputs):
            if isinstance(x, list):
                for t in x:
                    if t >= self.vocab_size:
                        raise errors.validation(
                            f"token id {t} is out of range (vocabulary size {self.vocab_size})", input=i)
                out[i] = self._check(x, [0] * len(x), 0, truncate, direction, i)
        return [e for e in out if e is not None]

    def _check(self, ids: Sequence[int], type_ids: Sequence[int], characters: int, truncate: bool,
               direction: TruncationDirection, index: int) -> Encoded:
        n = len(ids)
        if n > self.max_input_length:
            if not truncate:
                raise errors.validation(
                    f"Input validation error: `inputs` must have less than {self.max_input_length} tokens. "
                    f"Given: {n}; set `truncate: true` to cut it", input=index)
            # Only token-id inputs reach here: text inputs were truncated by the tokenizer.
            keep = self.max_input_length
            ids = ids[n - keep:] if direction is TruncationDirection.LEFT else ids[:keep]
            type_ids = type_ids[:keep]
        if n == 0:
            raise errors.empty("Input validation error: `inputs` cannot be empty", input=index)
        return Encoded(
            ids=np.asarray(ids, dtype=np.int64),
            type_ids=np.asarray(type_ids, dtype=np.int64),
            characters=characters,
        )

