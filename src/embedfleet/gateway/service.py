"""The gateway's embedding path: dedupe, one cache lookup, single-flight, split, merge.

For one request: identical texts are computed once; every key is looked up in one round trip per
tier; a key that another request is already computing is awaited, not computed again (in this process,
and through the cache's leases in other gateways sharing its store); the rest is
split into sub-batches that fit the upstreams' ``max_client_batch_size`` and (estimated) token
budget, sent to replicas in parallel, and merged back in input order. All or nothing: a request
gets every vector or an error.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import orjson

from embedfleet.api import binary
from embedfleet.api.edge import count_token_ids
from embedfleet.cache.keys import EmbedParams, KeyHasher, ModelFingerprint
from embedfleet.cache.memory import B64, JSON, TOKENS, Entry, MemoryStore, render_b64, render_json
from embedfleet.cache.tiered import TieredCache
from embedfleet.engine import errors
from embedfleet.engine.errors import EngineError
from embedfleet.engine.tokenization import TruncationDirection
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


@dataclass(slots=True)
class _Request:
    """One request's inputs by cache key. Token-id inputs have no text to key on: they are computed, never
    cached."""

    input_keys: list[bytes | None]
    """Each input's key (None for token ids), in input order."""
    texts: dict[bytes, str]
    """The text of each unique key, in first-seen order."""
    raw: list[tuple[int, list[int]]]
    """The token-id inputs and their positions."""
    unique: list[bytes]
    """The unique keys, in first-seen order."""

    @classmethod
    def of(cls, inputs: Sequence[str | list[int]], hasher: KeyHasher) -> _Request:
        """Key every text input."""
        input_keys: list[bytes | None] = []
        texts: dict[bytes, str] = {}
        raw: list[tuple[int, list[int]]] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                key = hasher.key(item)
                texts.setdefault(key, item)
                input_keys.append(key)
            else:
                input_keys.append(None)
                raw.append((i, item))
        return cls(input_keys, texts, raw, list(texts))


class EmbeddingService:
    """Embeddings of one model pool, through the cache."""

    def __init__(self, pool: Pool, cache: TieredCache, max_client_batch_size: int) -> None:
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

    def max_token_ids(self, info: UpstreamInfo) -> int:
        """The most token ids a request may carry in all: a full batch of inputs of the model's maximum
        length."""
        return self.max_client_batch_size * info.max_input_length

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
                    dimensions: int | None = None, policy: CachePolicy = CachePolicy(),
                    max_inputs: int | None = None) -> EmbedResult:
        """Vectors for the inputs, from the cache where possible: key, look up, claim, compute, merge.

        ``max_inputs``: the most inputs the request may carry, where not the gateway's
        ``max_client_batch_size`` (Arrow batches have their own row limit)."""
        errors.check_batch_size(len(inputs), max_inputs or self.max_client_batch_size)
        info = self._info()
        errors.check_token_ids(count_token_ids(inputs), self.max_token_ids(info))
        if truncate is None:
            truncate = info.auto_truncate
        request = _Request.of(inputs, self._hasher((info.fingerprint, normalize, truncate, direction.value,
                                                    prompt_name, dimensions)))
        found: dict[bytes, Entry] = {}
        from_memory: set[bytes] = set()
        if policy.read and request.unique:
            entries, missing = self.cache.lookup_memory(request.unique)
            if not missing and not request.raw:
                return self._memory_hits(request, entries)
            found, from_memory = await self._lookup_rest(request.unique, entries, missing)
        mine, waiting = self._claim(request, found)
        body: dict[str, Any] = {"normalize": normalize, "truncate": truncate,
                                "truncation_direction": direction.value.capitalize()}
        if prompt_name is not None:
            body["prompt_name"] = prompt_name
        if dimensions is not None:
            body["dimensions"] = dimensions
        computed = await self._compute_own(request, mine, body, policy, request.raw)
        shared = await self._await_shared(request, waiting, body, policy)
        return self._merge(request, found, from_memory, mine, computed, shared)

    async def forward_batched(self, route: str, body: dict[str, Any], inputs: Sequence[str]) -> list[Any]:
        """A passthrough route's answers for many inputs (``body`` plus ``inputs``), in input order: the inputs
        cut into calls of the replicas' ``max_client_batch_size``, sent to the pool in parallel (for the sparse
        Arrow batches, whose route the gateway does not cache). An error about one input names its position."""
        info = self._info()
        size = max(1, info.max_client_batch_size)
        estimate = self.estimate

        async def call(start: int) -> list[Any]:
            chunk = list(inputs[start:start + size])
            try:
                answer: Any = await self.pool.post(route, {**body, "inputs": chunk}, weight=sum(map(estimate, chunk)))
            except EngineError as exc:
                raise exc.remapped(range(start, start + len(chunk))) from None
            if not isinstance(answer, list) or len(answer) != len(chunk):
                raise errors.backend(f"upstream answered {route} with no list of {len(chunk)} rows")
            return answer

        parts = await asyncio.gather(*(call(start) for start in range(0, len(inputs), size)))
        return [row for part in parts for row in part]

    async def _lookup_rest(self, unique: list[bytes], entries: list[Entry | None],
                           missing: list[int]) -> tuple[dict[bytes, Entry], set[bytes]]:
        """The cached entries of the request's keys, the memory tier's answer completed by the store's (one
        round trip), and which keys the memory tier had."""
        from_memory = {k for k, e in zip(unique, entries, strict=True) if e is not None}
        if missing:
            await self.cache.lookup_rest(unique, entries, missing)
        return {k: e for k, e in zip(unique, entries, strict=True) if e is not None}, from_memory

    def _memory_hits(self, request: _Request, entries: list[Entry | None]) -> EmbedResult:
        """Every input is in the memory tier (the hot path): no futures, no task, no waiting."""
        found = cast(list[Entry], entries)  # none missing
        keys = cast(list[bytes], request.input_keys)  # no token-id inputs
        hits = len(request.unique)
        self.hits += hits
        if hits == len(keys):
            return EmbedResult(found, hits=hits, misses=0, memory=self.cache.memory, served=request.unique)
        by_key = dict(zip(request.unique, found, strict=True))  # duplicates in the request
        return EmbedResult([by_key[k] for k in keys], hits=hits, misses=0, memory=self.cache.memory, served=keys)

    def _claim(self, request: _Request, found: dict[bytes, Entry]) -> tuple[dict[bytes, asyncio.Future[Entry]],
                                                                               dict[bytes, asyncio.Future[Entry]]]:
        """Split the misses into keys this request computes (claimed, with a future for others to wait on)
        and keys another request is already computing (awaited: single-flight)."""
        mine: dict[bytes, asyncio.Future[Entry]] = {}
        waiting: dict[bytes, asyncio.Future[Entry]] = {}
        loop = asyncio.get_running_loop()
        for key in request.unique:
            if key in found:
                continue
            if key in self._in_flight:
                waiting[key] = self._in_flight[key]
            else:
                mine[key] = self._in_flight[key] = loop.create_future()
        return mine, waiting

    async def _compute_own(self, request: _Request, mine: dict[bytes, asyncio.Future[Entry]], body: dict[str, Any],
                           policy: CachePolicy, raw: list[tuple[int, list[int]]]) -> list[Entry]:
        """Compute the claimed keys and the token-id inputs ``raw``. The computation is its own task: if this
        client goes away, the requests waiting on the same keys still get their vectors, and the cache still
        gets them. An error about one input names the client's position of it."""
        if not mine and not raw:
            return []
        items: list[str | list[int]] = [*(request.texts[k] for k in mine), *(item for _, item in raw)]
        task = asyncio.get_running_loop().create_task(self._resolve(mine, items, body, policy))
        self._tasks.add(task)  # a strong reference until done
        task.add_done_callback(self._tasks.discard)
        try:
            return await asyncio.shield(task)
        except EngineError as exc:
            if exc.input is None:  # the common case (overloaded, unhealthy): no positions to work out
                raise
            raise exc.remapped([*(request.input_keys.index(k) for k in mine), *(i for i, _ in raw)]) from None

    async def _await_shared(self, request: _Request, waiting: dict[bytes, asyncio.Future[Entry]],
                            body: dict[str, Any], policy: CachePolicy) -> dict[bytes, Entry]:
        """The entries other requests were computing for this one. Where such a computation failed, the
        failure was the other request's (another input of its batch, say): this request computes those
        texts itself, so it only ever sees an error its own inputs cause."""
        shared: dict[bytes, Entry] = {}
        failed: list[bytes] = []
        for key, fut in waiting.items():
            try:
                shared[key] = await fut
            except Exception:  # whatever it was, it was another request's
                failed.append(key)
        if failed:
            loop = asyncio.get_running_loop()
            own = {key: loop.create_future() for key in failed}  # private: nobody else waits on these
            shared.update(zip(own, await self._compute_own(request, own, body, policy, []), strict=True))
        return shared

    def _merge(self, request: _Request, found: dict[bytes, Entry], from_memory: set[bytes],
               mine: dict[bytes, asyncio.Future[Entry]], computed: list[Entry],
               shared: dict[bytes, Entry]) -> EmbedResult:
        """Every input's entry, in input order: cached, computed here, or computed by another request."""
        hits = len(found)
        for key, entry in zip(mine, computed, strict=False):
            found[key] = entry
        found.update(shared)
        raw_entries = dict(zip((i for i, _ in request.raw), computed[len(mine):], strict=True))
        rows = [found[k] if k is not None else raw_entries[i] for i, k in enumerate(request.input_keys)]
        served = [k if k in from_memory else None for k in request.input_keys] if from_memory else ()
        result = EmbedResult(rows, hits=hits, misses=len(request.unique) - hits + len(request.raw),
                             memory=self.cache.memory, served=served)
        self.hits += result.hits
        self.misses += result.misses
        return result

    async def _resolve(self, mine: dict[bytes, asyncio.Future[Entry]], items: list[str | list[int]],
                       body: dict[str, Any], policy: CachePolicy) -> list[Entry]:
        """Compute this request's own misses (and raw inputs), settle their futures, cache them.

        Where the cache shares flights across gateways (and the request may both read and write it), the
        misses are claimed there first: a text another gateway is computing is awaited, not computed again.
        """
        leased: list[bytes] = []
        fetched: set[bytes] = set()
        try:
            if mine and policy.read and policy.write and self.cache.shares_flights:
                computed, fetched, leased = await self._compute_shared(list(mine), items, body)
            else:
                computed = await self._compute_entries(items, body)
        except Exception as exc:
            # Waiters get the error without this request's position of the input at fault.
            shared = exc.at(None) if isinstance(exc, EngineError) else exc
            for key, fut in mine.items():
                self._forget(key, fut)
                fut.set_exception(shared)
                fut.exception()  # marked retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        for (key, fut), entry in zip(mine.items(), computed, strict=False):
            self._forget(key, fut)
            fut.set_result(entry)
        if mine and policy.write:
            own = [(k, e) for k, e in zip(mine, computed, strict=False) if k not in fetched]
            self.cache.store_entries(own, leased)
        return computed

    async def _compute_entries(self, items: list[str | list[int]], body: dict[str, Any]) -> list[Entry]:
        """Cache entries of freshly computed inputs, in order."""
        vectors, tokens = await self._compute(items, body)
        return [self.cache.entry(v, t) for v, t in zip(vectors, tokens, strict=True)]

    async def _compute_shared(self, keys: list[bytes], items: list[str | list[int]],
                              body: dict[str, Any]) -> tuple[list[Entry], set[bytes], list[bytes]]:
        """Entries for ``items`` (the texts of ``keys``, then token-id inputs), single-flight across gateways:
        the keys whose leases this gateway takes are computed here (with the token-id inputs), while those
        another gateway holds are awaited, and computed here too where their holder gives up. Returns the
        entries, the keys another gateway computed, and the keys whose leases this gateway holds."""
        index = {k: i for i, k in enumerate(keys)}
        rows: list[Entry | None] = [None] * len(items)
        claim = await self.cache.claim(keys)
        for key, entry in claim.found.items():
            rows[index[key]] = entry
        fetched = set(claim.found)
        leased = list(claim.owned)
        waiter = (asyncio.get_running_loop().create_task(self.cache.await_foreign(claim.foreign))
                  if claim.foreign else None)
        try:
            async with self.cache.holding(claim.owned):
                await self._compute_into(items, [*(index[k] for k in claim.owned), *range(len(keys), len(items))],
                                         rows, body)
            if waiter is not None:
                rest = await waiter
                for key, entry in rest.found.items():
                    rows[index[key]] = entry
                fetched.update(rest.found)
                leased += rest.owned
                async with self.cache.holding(rest.owned):
                    await self._compute_into(items, [index[k] for k in rest.owned], rows, body)
        except BaseException:
            if waiter is not None:
                waiter.cancel()
            self.cache.release(leased)
            raise
        return cast(list[Entry], rows), fetched, leased

    async def _compute_into(self, items: list[str | list[int]], positions: list[int], rows: list[Entry | None],
                            body: dict[str, Any]) -> None:
        """Compute the inputs at ``positions`` of ``items`` into ``rows``; an error about one input names its
        position in ``items``."""
        if not positions:
            return
        try:
            entries = await self._compute_entries([items[i] for i in positions], body)
        except EngineError as exc:
            raise exc.remapped(positions) from None
        for position, entry in zip(positions, entries, strict=True):
            rows[position] = entry

    def _forget(self, key: bytes, fut: asyncio.Future[Entry]) -> None:
        """The key is no longer being computed by the computation that owns ``fut`` (a private recompute
        owns none)."""
        if self._in_flight.get(key) is fut:
            del self._in_flight[key]

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
        starts = list(itertools.accumulate((len(c) for c in chunks[:-1]), initial=0))

        model = info.fingerprint.tag.hex()

        def parse(reply: Reply) -> tuple[np.ndarray, np.ndarray | None]:
            return read_embeddings(reply, model)

        async def call(chunk: list[str | list[int]], start: int) -> tuple[np.ndarray, np.ndarray | None]:
            try:
                return await self.pool.post("/embed", {**body, "inputs": chunk}, weight=sum(map(estimate, chunk)),
                                            parse=parse, accept=binary.ACCEPT)
            except EngineError as exc:  # name the input by its position in ``items`` (if the upstream's is sane)
                raise exc.remapped(order[start:start + len(chunk)]) from None

        results = await asyncio.gather(*(call(chunk, start) for chunk, start in zip(chunks, starts, strict=True)))
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


def read_embeddings(reply: Reply, model: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """An upstream's /embed answer: ``(vectors [n, dim] float32, token counts or None)``.

    An embedfleet worker answers in the binary form the gateway asks for, with token counts; a TEI server
    answers JSON, without. ValueError for a body that is neither, or that a worker computed with another
    model than ``model`` (a fingerprint tag): the pool then ejects the replica, reads its /info again,
    and tries another; such vectors are never cached under the wrong model.
    """
    if model is not None and reply.model is not None and reply.model != model:
        raise ValueError(f"the replica answered with model {reply.model}, not the pool's {model}: it was "
                         "restarted with another model")
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
