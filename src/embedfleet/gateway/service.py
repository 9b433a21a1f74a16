"""The gateway's embedding path: dedupe, one cache lookup, single-flight, split, merge.

For one request: identical texts are computed once; every key is looked up in one round trip per
tier; a key that another request is already computing is awaited, not computed again; the rest is
split into sub-batches that fit the upstreams' ``max_client_batch_size`` and (estimated) token
budget, sent to replicas in parallel, and merged back in input order. All or nothing: a request
gets every vector or an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from embedfleet.api import binary, errors
from embedfleet.api.schemas import TruncationDirection
from embedfleet.cache.keys import EmbedParams, KeyHasher, ModelFingerprint
from embedfleet.cache.memory import B64, JSON, TOKENS, VECTOR, Entry, MemoryStore, render_b64, render_json
from embedfleet.cache.tiered import TieredCache
from embedfleet.gateway.upstream import Pool, Reply, UpstreamInfo


@dataclass(frozen=True)
class CachePolicy:
    """What one request may do with the cache (from its Cache-Control header)."""

    read: bool = True
    write: bool = True

    @classmethod
    def from_header(cls, value: str | None) -> CachePolicy:
        """``no-cache`` recomputes and overwrites; ``no-store`` neither reads nor writes."""
        directives = {d.strip().lower() for d in (value or "").split(",")}
        if "no-store" in directives:
            return cls(read=False, write=False)
        if "no-cache" in directives:
            return cls(read=False, write=True)
        return cls()


@dataclass
class EmbedResult:
    """Cache entries in input order (one per input: its vector and rendered forms), and how many
    unique inputs were hits."""

    rows: list[Entry]
    hits: int
    misses: int
    memory: MemoryStore | None = None
    served: Sequence[bytes | None] = ()
    """Per row, the key of a row the memory tier answered (its rendered forms are worth keeping there)."""

    @property
    def vectors(self) -> np.ndarray:
        """The vectors as one float32 array, in input order."""
        return np.stack([row[VECTOR] for row in self.rows if row[VECTOR] is not None])

    def json_rows(self) -> list[bytes]:
        """Each vector as a JSON array (kept in the memory tier for rows it answered)."""
        return self._rendered(JSON, render_json, "json")

    def b64_rows(self) -> list[bytes]:
        """Each vector's float32 bytes as a base64 JSON string (kept in the memory tier for rows it answered)."""
        return self._rendered(B64, render_b64, "b64")

    def _rendered(self, slot: int, render: Callable[[Entry], bytes], form: str) -> list[bytes]:
        out = []
        for i, row in enumerate(self.rows):
            rendered = row[slot]
            if not isinstance(rendered, bytes):  # not rendered yet (None)
                rendered = render(row)
                key = self.served[i] if self.served else None
                if key is not None and self.memory is not None:
                    self.memory.keep(key, row, **{form: rendered})
            out.append(rendered)
        return out

    @property
    def tokens(self) -> int:
        """Tokens of all inputs, as the worker counted them when it computed each (0 for inputs whose
        upstream did not say: TEI servers do not report per-input counts)."""
        return sum([row[TOKENS] for row in self.rows])

    @property
    def cache_status(self) -> str:
        """``hit``, ``miss`` or ``partial``."""
        if self.misses == 0:
            return "hit"
        return "miss" if self.hits == 0 else "partial"


MIN_SPREAD_INPUTS = 8
"""A request's misses are spread over as many idle replicas as give each at least this many inputs."""

CALL_TOKENS = 16384
"""Estimated tokens one call to a replica may carry (or the replica's batch budget, where larger). A
worker cuts a call into batches of its own budget (512 tokens for onnx on CPU): calls cut to that
budget would only add HTTP round trips for the same batches."""

HasherKey = tuple[ModelFingerprint, bool, bool, str, str | None, int | None]


class EmbeddingService:
    """Embeddings of one model pool, through the cache."""

    def __init__(self, pool: Pool, cache: TieredCache, max_client_batch_size: int = 2048) -> None:
        self.pool = pool
        self.cache = cache
        self.max_client_batch_size = max_client_batch_size
        self._in_flight: dict[bytes, asyncio.Future[Entry]] = {}
        self._tasks: set[asyncio.Task[list[Entry]]] = set()
        self._hashers: dict[HasherKey, KeyHasher] = {}
        self.estimate = TokenEstimator()
        self.upstream_inputs = 0
        self.hits = 0
        self.misses = 0

    def _info(self) -> UpstreamInfo:
        info = self.pool.info
        if info is None:
            raise errors.unhealthy(f"no upstream of model {self.pool.name!r} has answered /info yet")
        return info

    def _hasher(self, key: HasherKey) -> KeyHasher:
        """The key hasher of one model and parameter set (the shared prefix is hashed once, then reused)."""
        hasher = self._hashers.get(key)
        if hasher is None:
            if len(self._hashers) >= 256:  # parameter sets are few; never let odd clients grow this
                self._hashers.clear()
            model, normalize, truncate, direction, prompt_name, dimensions = key
            native = self._info().raw.get("dimension")
            if self.cache.store is not None and isinstance(native, int) and native > 0:
                self.cache.store.model_dimension(model.tag, native)
            hasher = self._hashers[key] = KeyHasher(model, EmbedParams(
                normalize=normalize, truncate=truncate, truncation_direction=direction, prompt_name=prompt_name,
                dimensions=dimensions))
        return hasher

    async def embed(self, inputs: Sequence[str | list[int]], *, normalize: bool = True, truncate: bool | None = None,
                    direction: TruncationDirection = TruncationDirection.RIGHT, prompt_name: str | None = None,
                    dimensions: int | None = None, policy: CachePolicy = CachePolicy()) -> EmbedResult:
        """Vectors for the inputs, from the cache where possible."""
        if not inputs:
            raise errors.empty()
        if len(inputs) > self.max_client_batch_size:
            raise errors.validation(
                f"batch size {len(inputs)} > maximum allowed batch size {self.max_client_batch_size}")
        info = self._info()
        if truncate is None:
            truncate = info.auto_truncate
        hasher = self._hasher((info.fingerprint, normalize, truncate, direction.value, prompt_name, dimensions))

        # Token-id inputs have no text to key on: they are computed, never cached.
        keyed: dict[bytes, str] = {}
        input_keys: list[bytes | None] = []
        raw: list[tuple[int, list[int]]] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                key = hasher.key(item)
                keyed.setdefault(key, item)
                input_keys.append(key)
            else:
                input_keys.append(None)
                raw.append((i, item))
        unique = list(keyed)
        found: dict[bytes, Entry] = {}
        from_memory: set[bytes] = set()
        if unique and policy.read:
            entries, missing = self.cache.lookup_memory(unique)
            if missing:
                from_memory = {k for k, e in zip(unique, entries, strict=True) if e is not None}
                await self.cache.lookup_rest(unique, entries, missing)
            elif not raw:  # every input hit: no futures, no task, no waiting
                hits = len(unique)
                self.hits += hits
                served: list[bytes | None] = list(unique)
                if hits != len(inputs):  # duplicates in the request
                    by_key = dict(zip(unique, entries, strict=True))
                    entries = [by_key[k] for k in input_keys if k is not None]
                    served = input_keys
                return EmbedResult([e for e in entries if e is not None], hits=hits, misses=0,
                                   memory=self.cache.memory, served=served)
            for key, entry in zip(unique, entries, strict=True):
                if entry is not None:
                    found[key] = entry
        hits = len(found)

        waiting: dict[bytes, asyncio.Future[Entry]] = {}
        mine: dict[bytes, asyncio.Future[Entry]] = {}
        loop = asyncio.get_running_loop()
        for key in unique:
            if key in found:
                continue
            if key in self._in_flight:
                waiting[key] = self._in_flight[key]
            else:
                mine[key] = self._in_flight[key] = loop.create_future()

        # The computation is its own task: if this client goes away, the requests waiting on the
        # same keys still get their vectors, and the cache still gets them.
        computed: list[Entry] = []
        if mine or raw:
            body: dict[str, Any] = {"normalize": normalize, "truncate": truncate,
                                    "truncation_direction": direction.value.capitalize()}
            if prompt_name is not None:
                body["prompt_name"] = prompt_name
            if dimensions is not None:
                body["dimensions"] = dimensions
            task = asyncio.get_running_loop().create_task(
                self._resolve(mine, [keyed[k] for k in mine], [item for _, item in raw], body, policy))
            self._tasks.add(task)  # a strong reference until done
            task.add_done_callback(self._tasks.discard)
            computed = await asyncio.shield(task)
        for key, entry in zip(mine, computed, strict=False):
            found[key] = entry
        for key, fut in waiting.items():
            found[key] = await fut

        raw_entries = dict(zip((i for i, _ in raw), computed[len(mine):], strict=True))
        rows = [found[k] if k is not None else raw_entries[i] for i, k in enumerate(input_keys)]
        result = EmbedResult(rows, hits=hits, misses=len(unique) - hits + len(raw), memory=self.cache.memory,
                             served=[k if k in from_memory else None for k in input_keys] if from_memory else ())
        self.hits += result.hits
        self.misses += result.misses
        return result

    async def _resolve(self, mine: dict[bytes, asyncio.Future[Entry]], texts: list[str],
                       raw: list[list[int]], body: dict[str, Any], policy: CachePolicy) -> list[Entry]:
        """Compute this request's own misses (and raw inputs), settle their futures, cache them."""
        try:
            vectors, tokens = await self._compute([*texts, *raw], body)
            computed = [self.cache.entry(v, t) for v, t in zip(vectors, tokens, strict=True)]
        except Exception as exc:
            for key, fut in mine.items():
                self._in_flight.pop(key, None)
                fut.set_exception(exc)
                fut.exception()  # marked retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        for (key, fut), entry in zip(mine.items(), computed, strict=False):
            self._in_flight.pop(key, None)
            fut.set_result(entry)
        if mine and policy.write:
            self.cache.store_entries(list(zip(mine, computed, strict=False)))
        return computed

    async def _compute(self, items: list[str | list[int]], body: dict[str, Any]) -> tuple[list[np.ndarray], list[int]]:
        """Send the misses to the upstreams in parallel sub-batches; vectors and token counts in order.

        Sub-batches respect the upstreams' ``max_client_batch_size`` and carry at most
        :data:`CALL_TOKENS` estimated tokens (or an upstream's larger batch budget). A request with
        enough misses is also spread over the replicas that are idle now, so one client sending one
        batch at a time still gets every replica working for it (under load, when no replica is idle,
        each request goes whole to the least-loaded one: cutting it would only cost more calls). The
        misses are ordered by length before they are cut, so each sub-batch holds inputs of about one
        length (a replica pads a batch to its longest input).
        """
        if not items:
            return [], []
        info = self._info()
        estimate = self.estimate
        order = sorted(range(len(items)), key=lambda i: estimate(items[i]))
        ranked = [items[i] for i in order]
        idle = sum(1 for u in self.pool.healthy if u.in_flight == 0)
        replicas = max(1, min(idle, len(items) // MIN_SPREAD_INPUTS))
        per_chunk = min(max(1, info.max_client_batch_size), -(-len(items) // replicas))
        chunks = split(ranked, per_chunk, max(info.max_batch_tokens, CALL_TOKENS), estimate)
        self.upstream_inputs += len(items)
        results = await asyncio.gather(
            *(self.pool.post("/embed", {**body, "inputs": chunk}, weight=sum(map(estimate, chunk)),
                             parse=read_embeddings, accept=binary.ACCEPT)
              for chunk in chunks))
        vectors: list[np.ndarray] = [np.empty(0, np.float32)] * len(items)
        tokens = [0] * len(items)
        position = iter(order)
        for chunk, (matrix, counts) in zip(chunks, results, strict=True):
            if len(matrix) != len(chunk):
                raise errors.backend(f"upstream returned {len(matrix)} vectors for {len(chunk)} inputs")
            for j, vector in enumerate(matrix):
                i = next(position)
                vectors[i] = vector
                if counts is not None:
                    tokens[i] = int(counts[j])
            if counts is not None:
                estimate.learn(chunk, counts, info.max_input_length)
        return vectors, tokens


def read_embeddings(reply: Reply) -> tuple[np.ndarray, np.ndarray | None]:
    """An upstream's /embed answer: ``(vectors [n, dim] float32, token counts or None)``.

    An embedfleet worker answers in the binary form the gateway asks for, with token counts; a TEI server
    answers JSON, without. ValueError for a body that is neither (the pool then tries another replica).
    """
    if reply.content_type == binary.MEDIA_TYPE:
        return binary.decode(reply.body)
    rows = orjson.loads(reply.body)
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise ValueError("upstream /embed answer is not a list of vectors")
    matrix = np.asarray(rows, dtype=np.float32) if rows else np.empty((0, 0), dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError("upstream /embed answer has vectors of different lengths")
    return matrix, None


class TokenEstimator:
    """Tokens an input will take, guessed before the upstream tokenizes it (the gateway has no tokenizer).

    Text: its characters over a characters-per-token ratio, plus the special tokens. The ratio starts at
    4 (English WordPiece/BPE) and follows what the pool's tokenizer really does: embedfleet workers
    answer every vector with its input's token count, and each answer moves the ratio towards the one it
    shows (code and CJK text take far more tokens per character than English prose). A TEI upstream
    reports no counts, so its pool keeps 4. Token-id inputs are exact.
    """

    SPECIAL = 2
    START = 4.0
    LEARN_RATE = 0.25  # an exponential moving average over answers: a few answers adapt it
    MIN_TOKENS = 64  # an answer with fewer (non-special, untruncated) tokens says too little to learn from

    def __init__(self) -> None:
        self.chars_per_token = self.START

    def __call__(self, item: str | list[int]) -> int:
        if isinstance(item, list):
            return len(item)
        return round(len(item) / self.chars_per_token) + self.SPECIAL

    def learn(self, items: Sequence[str | list[int]], counts: np.ndarray, max_length: int) -> None:
        """Move the ratio towards the one an answer shows. Inputs cut at ``max_length`` (or near it) are
        left out: their count says nothing of their characters."""
        chars = tokens = 0
        for item, count in zip(items, counts.tolist(), strict=True):
            if isinstance(item, str) and self.SPECIAL < count < max_length:
                chars += len(item)
                tokens += count - self.SPECIAL
        if tokens >= self.MIN_TOKENS:
            seen = min(max(chars / tokens, 0.5), 32.0)
            self.chars_per_token += self.LEARN_RATE * (seen - self.chars_per_token)


def split(items: list[str | list[int]], max_inputs: int, max_tokens: int,
          estimate: Callable[[str | list[int]], int]) -> list[list[str | list[int]]]:
    """Consecutive sub-batches of at most ``max_inputs`` inputs and about ``max_tokens`` tokens, as
    ``estimate`` counts them (an input over the budget alone goes alone: the upstream truncates or
    rejects it)."""
    chunks: list[list[str | list[int]]] = []
    current: list[str | list[int]] = []
    tokens = 0
    for item in items:
        cost = estimate(item)
        if current and (len(current) >= max_inputs or tokens + cost > max_tokens):
            chunks.append(current)
            current, tokens = [], 0
        current.append(item)
        tokens += cost
    if current:
        chunks.append(current)
    return chunks
