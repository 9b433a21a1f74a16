"""Texts for ``embedfleet bench``: read from a file or generated, and mixed into requests at a hit ratio.

Files: ``.jsonl`` (one JSON object a line, the text under ``--column``, default ``text``; or one JSON
string a line), ``.csv`` (``--column``, default ``text``, else the first column), ``.parquet`` (pyarrow,
``embedfleet[bench]``; ``--column``, default ``text``, else the first string column) and anything else as
plain text, one text a line. Generated texts (``--text-tokens N``) are about N word-piece tokens of common
English words, each made unique by a run id and its number, so a fresh text was never seen by any cache.
"""

from __future__ import annotations

import csv
import random
import secrets
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson

_COMMON_WORDS = (
    "the of and to in is was for on that with as by at from his her an they which or be this had not are but "
    "were have one all their there been has when who will more no if out so said what up its about into than "
    "them can only other new some could time these two may then do first any my now such like our over man "
    "me even most made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three small large water house city river music "
    "early light paper system search model cache vector server request answer number point group family"
)
WORDS = _COMMON_WORDS.split()
PRIMING_BATCH = 32
"""Texts per request that fills the hot set: TEI's and embedfleet's default ``max_client_batch_size``."""


class TextError(ValueError):
    """A text file that cannot be read as asked."""


def read_texts(path: Path, column: str | None = None) -> list[str]:
    """The non-empty texts of a file, by its suffix (see the module's docstring)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            texts = _jsonl(path, column or "text")
        elif suffix == ".csv":
            texts = _csv(path, column)
        elif suffix == ".parquet":
            texts = _parquet(path, column)
        else:
            texts = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, orjson.JSONDecodeError, csv.Error) as exc:
        raise TextError(f"cannot read {path}: {exc}") from exc
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TextError(f"{path} holds no text")
    return texts


def _jsonl(path: Path, column: str) -> list[str]:
    texts = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            value: Any = orjson.loads(line)
            if isinstance(value, dict):
                if column not in value:
                    raise TextError(f"{path}:{number} has no field {column!r} (--column)")
                value = value[column]
            if not isinstance(value, str):
                raise TextError(f"{path}:{number}: the text is {type(value).__name__}, not a string")
            texts.append(value)
    return texts


def _csv(path: Path, column: str | None) -> list[str]:
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        fields = reader.fieldnames or []
        name = column or ("text" if "text" in fields else (fields[0] if fields else None))
        if name is None or name not in fields:
            raise TextError(f"{path} has no column {name!r} (columns: {', '.join(fields) or 'none'})")
        return [row[name] or "" for row in reader]


def _parquet(path: Path, column: str | None) -> list[str]:
    try:
        import pyarrow.parquet as pq
        import pyarrow.types as pa_types
    except ImportError:
        raise TextError("reading parquet needs pyarrow: pip install 'embedfleet[bench]'") from None
    schema = pq.read_schema(path)
    strings = [f.name for f in schema if pa_types.is_string(f.type) or pa_types.is_large_string(f.type)]
    name = column or ("text" if "text" in schema.names else (strings[0] if strings else None))
    if name is None or name not in schema.names:
        raise TextError(f"{path} has no column {name!r} (columns: {', '.join(schema.names)})")
    if name not in strings:
        raise TextError(f"{path}: column {name!r} holds {schema.field(name).type}, not strings")
    values: list[str | None] = pq.read_table(path, columns=[name]).column(name).to_pylist()
    return [v for v in values if v]


def generated_text(tag: str, number: int, tokens: int) -> str:
    """About ``tokens`` tokens: ``tag`` and ``number`` (which make it unique), then common words."""
    words = random.Random(f"{tag}:{number}").choices(WORDS, k=max(tokens - 3, 1))
    return f"{tag} {number} {' '.join(words)}"


class TextMix:
    """The texts of every request of a run, in order.

    Without a hit ratio, request ``r`` takes the next ``batch_size`` texts of the source (a file is cycled;
    generated texts are all new). With a hit ratio ``R``, each text slot is either a *hot* text (one of
    ``hot_count``, sent once by :meth:`priming` before the run so a cache holds them) or a *fresh* one, never
    sent before; the slots are spread evenly (Bresenham), so every prefix of the run has the ratio to within
    one text. Requests made only of hot texts (or of a cycled file) repeat, so they are built once.
    """

    def __init__(self, prepare: Callable[[Sequence[str]], Any], batch_size: int, *, texts: Sequence[str] | None = None,
                 text_tokens: int = 16, hit_ratio: float | None = None, hot_count: int = 256,
                 run_id: str | None = None) -> None:
        self.prepare = prepare
        self.batch_size = batch_size
        self.file = list(texts) if texts is not None else None
        self.tokens = text_tokens
        self.run_id = run_id or secrets.token_hex(3)
        self.ratio = Fraction(hit_ratio).limit_denominator(1000) if hit_ratio is not None else None
        # Integer arithmetic in take(): Fraction's would cost microseconds a request.
        self._num, self._den = (self.ratio.numerator, self.ratio.denominator) if self.ratio is not None else (0, 1)
        hot_count = max(hot_count, batch_size)  # no text twice in one request
        if self.file is not None and self.ratio is not None:
            hot_count = min(hot_count, len(self.file))
        self.hot = [self._hot_text(i) for i in range(hot_count)] if self.ratio else []
        self.next_request = 0
        self._built: dict[int, Any] = {}

    def _hot_text(self, i: int) -> str:
        return self.file[i] if self.file is not None else generated_text(f"h{self.run_id}", i, self.tokens)

    def _fresh_text(self, i: int) -> str:
        if self.file is None:
            return generated_text(f"f{self.run_id}", i, self.tokens)
        if self.ratio is None:
            return self.file[i % len(self.file)]
        unused = len(self.file) - len(self.hot)
        if 0 <= i < unused:
            return self.file[len(self.hot) + i]
        return f"{self.file[i % len(self.file)]} ({self.run_id} {i})"  # the file is spent: made new

    def priming(self) -> list[Any]:
        """Requests that send every hot text once (empty without a hit ratio), ``PRIMING_BATCH`` at a time
        when the run's requests are smaller (a cache keeps each text on its own)."""
        b = max(self.batch_size, PRIMING_BATCH)
        return [self.prepare(self.hot[i:i + b]) for i in range(0, len(self.hot), b)]

    def take(self) -> tuple[Any, int]:
        """The next request, prepared, and how many texts it carries."""
        r = self.next_request
        self.next_request += 1
        b = self.batch_size
        first = r * b
        ratio = self.ratio
        if ratio is None:
            if self.file is None:
                return self.prepare([self._fresh_text(k) for k in range(first, first + b)]), b
            key = first % len(self.file)
            if (built := self._built.get(key)) is None:
                built = self._built[key] = self.prepare([self._fresh_text(k) for k in range(first, first + b)])
            return built, b
        num, den = self._num, self._den
        hot_before = first * num // den
        if (first + b) * num // den - hot_before == b:  # every slot hot: a request that repeats
            key = hot_before % len(self.hot)
            if (built := self._built.get(key)) is None:
                built = self._built[key] = self.prepare([self.hot[(hot_before + j) % len(self.hot)]
                                                         for j in range(b)])
            return built, b
        texts = []
        for k in range(first, first + b):
            hot = k * num // den
            if (k + 1) * num // den > hot:
                texts.append(self.hot[hot % len(self.hot)])
            else:
                texts.append(self._fresh_text(k - hot))
        return self.prepare(texts), b
