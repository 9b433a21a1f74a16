"""The lexical half of hybrid search: identifier-aware terms of a chunk, as a sparse vector that Qdrant scores
like BM25 (its ``IDF`` modifier supplies the inverse document frequency; the stored values are BM25's
saturated, length-normalised term frequencies).

Terms: identifiers are split at underscores and case changes (``LmdbStore._resize`` gives ``lmdb``,
``store``, ``resize``; ``CUDA_VISIBLE_DEVICES`` gives ``cuda``, ``visible``, ``devices``), and a compound
identifier is also kept whole (``acquire_lock``, ``getAppDir``), so a query that names it matches it
exactly. Words are lower-cased, English stop words dropped, and the rest stemmed (Snowball), so that
"batches" meets ``batch`` and "tokenizing" meets ``tokenize``. A query goes through the same tokenizer.

A chunk's terms are its code (identifiers, comments and docstrings alike) plus its file path and symbol,
which count :data:`NAME_WEIGHT` times: a definition's name and place say more about it than any one use of
a word in its body.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections import Counter
from collections.abc import Iterable

import snowballstemmer

K1 = 1.2
"""BM25's term-frequency saturation."""
B = 0.75
"""BM25's length normalisation."""
AVERAGE_TERMS = 120.0
"""BM25's average document length. Fixed, so that an incremental index never has to re-weigh the chunks it
keeps; about a chunk's terms with its names (a larger value penalises long chunks less)."""
NAME_WEIGHT = 3
"""How many times the terms of a chunk's symbol and file path count."""
MIN_LENGTH = 2

STOP_WORDS = frozenset({
    "a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are", "as", "at", "be",
    "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did", "do",
    "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have", "having",
    "he", "her", "here", "hers", "herself", "him", "himself", "his", "how", "i", "if", "in", "into", "is", "it",
    "its", "itself", "just", "me", "more", "most", "my", "myself", "no", "nor", "not", "of", "off", "on", "once",
    "only", "or", "other", "our", "ours", "ourselves", "out", "over", "own", "same", "she", "should", "so", "some",
    "such", "than", "that", "the", "their", "theirs", "them", "themselves", "then", "there", "these", "they",
    "this", "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what", "when",
    "where", "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours", "yourself",
    "yourselves",
})
"""English words too common to tell chunks apart (matched before stemming)."""

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_PARTS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


@functools.cache
def _stemmer() -> snowballstemmer.stemmer:
    return snowballstemmer.stemmer("english")


@functools.lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    stem: str = _stemmer().stemWord(word)
    return stem


def words(text: str) -> list[str]:
    """The words of a text's identifiers, lower-cased, unstemmed (``LmdbStore._resize`` gives ``lmdb``,
    ``store``, ``resize``)."""
    return [part.lower() for identifier in _IDENTIFIER.findall(text) for part in _PARTS.findall(identifier)]


@functools.lru_cache(maxsize=65536)
def _identifier_terms(identifier: str) -> tuple[str, ...]:
    parts = [p.lower() for p in _PARTS.findall(identifier)]
    terms = [_stem(p) for p in parts if len(p) >= MIN_LENGTH and p not in STOP_WORDS]
    whole = identifier.strip("_").lower()
    if len(parts) > 1 and len(whole) >= MIN_LENGTH:
        terms.append(whole)
    return tuple(terms)


def terms(text: str) -> list[str]:
    """The terms of a text (code or a query), in order, repeats kept."""
    return [term for identifier in _IDENTIFIER.findall(text) for term in _identifier_terms(identifier)]


def term_id(term: str) -> int:
    """A term's index in the sparse vector space (a stable 32-bit hash)."""
    return zlib.crc32(term.encode("utf-8"))


def _vector(counts: Counter[str], length: int) -> tuple[list[int], list[float]]:
    weights: dict[int, float] = {}
    norm = K1 * (1 - B + B * length / AVERAGE_TERMS)
    for term, tf in counts.items():
        index = term_id(term)
        weights[index] = weights.get(index, 0.0) + tf * (K1 + 1) / (tf + norm)
    indices = sorted(weights)
    return indices, [weights[i] for i in indices]


def document_vector(text: str, names: Iterable[str] = ()) -> tuple[list[int], list[float]]:
    """The sparse vector of a chunk (indices, values): BM25 term weights of its text, with the terms of
    ``names`` (its symbol, its file's path) counted :data:`NAME_WEIGHT` times more."""
    counts = Counter(terms(text))
    for name in names:
        for term in terms(name):
            counts[term] += NAME_WEIGHT
    return _vector(counts, sum(counts.values()))


def query_vector(text: str) -> tuple[list[int], list[float]]:
    """The sparse vector of a query: each distinct term once (the index's IDF weighs them)."""
    indices = sorted({term_id(t) for t in terms(text)})
    return indices, [1.0] * len(indices)
