"""The inference engine: admission, tokenization, batching and post-processing for each task.

HTTP handlers call :class:`Engine`; it never blocks the event loop (tokenization runs in a thread
pool, the forward pass on the batcher's inference thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from embedfleet.engine import errors
from embedfleet.engine.backends.base import Backend, Output
from embedfleet.engine.batching import Batcher, RowResult
from embedfleet.engine.metrics import EngineMetrics
from embedfleet.engine.model import ModelInfo, Task
from embedfleet.engine.tokenization import Encoded, Tokenization, TruncationDirection

DEFAULT_BATCH_TOKENS = 16384
"""Padded tokens per batch unless the backend prefers fewer (TEI's default)."""


@dataclass(frozen=True)
class Limits:
    """Request and batch limits of a replica. No defaults here: the worker's settings define them
    (``config.WorkerSettings``), and ``worker.server.build_engine`` resolves those the device decides."""

    max_batch_tokens: int
    max_batch_requests: int
    max_client_batch_size: int
    max_concurrent_requests: int
    auto_truncate: bool
    tokenization_workers: int


@dataclass
class Stats:
    """What one request cost; becomes TEI's x-compute-* and x-*-time headers."""

    characters: int = 0
    tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    """Tokens of each input, in input order."""
    tokenization_time: float = 0.0
    queue_time: float = 0.0
    inference_time: float = 0.0
    started: float = field(default_factory=time.perf_counter)


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


TASK_ROUTES: dict[Task, str] = {Task.EMBEDDING: "/embed", Task.SPARSE: "/embed_sparse", Task.RERANKER: "/rerank",
                                 Task.CLASSIFIER: "/predict"}
"""The TEI route of each task: where its errors point clients, and what ``POST /`` means for it."""


class Engine:
    """One model served: tokenizer, backend, batcher, metrics and limits."""

    def __init__(self, info: ModelInfo, backend: Backend, limits: Limits,
                 metrics: EngineMetrics | None = None) -> None:
        if info.max_input_length > limits.max_batch_tokens:
            raise ValueError(
                f"max_batch_tokens ({limits.max_batch_tokens}) must be at least the model's "
                f"max input length ({info.max_input_length})"
            )
        self.info = info
        self.backend = backend
        self.limits = limits
        self.metrics = metrics or EngineMetrics()
        self.tokenization = Tokenization(info.path, info.max_input_length, info.prompts, info.default_prompt_name)
        self._tokenize_pool = ThreadPoolExecutor(limits.tokenization_workers, thread_name_prefix="tokenize")
        self.batcher = Batcher(backend, limits.max_batch_tokens, limits.max_batch_requests, self.metrics)
        self._in_flight = 0

    def start(self) -> None:
        """Start batching (call from the event loop)."""
        self.batcher.start()

    async def close(self) -> None:
        """Stop batching and the worker threads."""
        await self.batcher.close()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Admit one request, or fail at once with 429 when too many are in flight."""
        if self._in_flight >= self.limits.max_concurrent_requests:
            raise errors.overloaded()
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        try:
            yield
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)

    async def check_health(self, timeout: float = 30.0) -> None:
        """Raise Unhealthy unless the backend can run. When idle, a one-input batch proves it (as TEI
        does); while batches are running, their success is the proof and the check does not wait."""
        if not self.batcher.idle:
            if self.batcher.failed_in_a_row >= 3:
                raise errors.unhealthy("the last batches failed")
            return
        probe = Encoded(ids=np.array([1, 2], dtype=np.int64), type_ids=np.zeros(2, dtype=np.int64), characters=0)
        try:
            await asyncio.wait_for(self.batcher.submit([probe], self.backend.default_output()), timeout)
        except (TimeoutError, errors.EngineError) as exc:
            raise errors.unhealthy(f"health check inference failed: {exc}") from exc

    # ----- validation helpers -----

    def _require(self, *tasks: Task, message: str) -> None:
        if self.info.task not in tasks:
            raise errors.backend(
                f"Backend error: {message} ({self.info.model_id} is {_article(self.info.task.value)} model: "
                f"use `{TASK_ROUTES[self.info.task]}`)"
            )

    def check_batch(self, n: int, field: str = "inputs") -> None:
        """Empty and over-large batches are rejected before any work."""
        errors.check_batch_size(n, self.limits.max_client_batch_size, field)

    def _truncate(self, truncate: bool | None) -> bool:
        return self.limits.auto_truncate if truncate is None else truncate

    async def _encode(self, inputs: Sequence[str | list[int]], truncate: bool | None,
                      direction: TruncationDirection, stats: Stats, prompt_name: str | None = None,
                      pairs: Sequence[str] | None = None) -> list[Encoded]:
        if pairs is None and "" in inputs:
            raise errors.empty("Input validation error: `inputs` cannot be empty", input=list(inputs).index(""))
        texts: Sequence[str | list[int]] = inputs
        if prompt_name is not None or self.tokenization.default_prompt_name is not None:
            plain = [x for x in inputs if isinstance(x, str)]
            prompted = iter(self.tokenization.apply_prompt(plain, prompt_name))
            texts = [next(prompted) if isinstance(x, str) else x for x in inputs]
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(
            self._tokenize_pool, self.tokenization.encode, texts, self._truncate(truncate), direction, pairs
        )
        stats.tokenization_time = time.perf_counter() - started
        stats.lengths = [e.length for e in encoded]
        stats.tokens = sum(stats.lengths)
        stats.characters = sum(e.characters for e in encoded)
        self.metrics.tokenization_duration.observe(stats.tokenization_time)
        for e in encoded:
            self.metrics.input_length.observe(e.length)
        return encoded

    async def _run(self, encoded: list[Encoded], output: Output, stats: Stats, method: str) -> list[RowResult]:
        self.metrics.embed_count.labels(method).inc(len(encoded))
        rows = await self.batcher.submit(encoded, output)
        self.metrics.embed_success.labels(method).inc(len(encoded))
        stats.queue_time = max(r.queue_time for r in rows)
        stats.inference_time = max(r.inference_time for r in rows)
        self.metrics.queue_duration.observe(stats.queue_time)
        self.metrics.inference_duration.observe(stats.inference_time)
        return rows

    # ----- tasks -----

    def check_dimensions(self, dimensions: int | None) -> None:
        """Matryoshka truncation must keep at least one and at most all dimensions."""
        if dimensions is None:
            return
        if dimensions == 0:
            raise errors.validation("Input validation error: `dimensions` should be positive")
        if dimensions > self.info.dimension:
            raise errors.validation(
                "Input validation error: `dimensions` should be smaller than the maximum embedding dimension "
                f"({self.info.dimension})"
            )

    async def embed(self, inputs: Sequence[str | list[int]], *, normalize: bool = True, truncate: bool | None = None,
                    direction: TruncationDirection = TruncationDirection.RIGHT, prompt_name: str | None = None,
                    dimensions: int | None = None, stats: Stats | None = None) -> np.ndarray:
        """Pooled embeddings [N, D] (float32), cut to ``dimensions`` and then normalised if asked."""
        stats = stats or Stats()
        self.check_batch(len(inputs))
        self._require(Task.EMBEDDING, Task.SPARSE, message="Model is not an embedding model")
        if self.info.task is Task.SPARSE and normalize:
            raise errors.backend("Backend error: `normalize` is not available for SPLADE models")
        self.check_dimensions(dimensions)
        encoded = await self._encode(inputs, truncate, direction, stats, prompt_name)
        output = Output.SPARSE if self.info.task is Task.SPARSE else Output.POOLED
        rows = await self._run(encoded, output, stats, "embed")
        vectors = np.stack([r.value for r in rows])
        if dimensions is not None:
            vectors = np.ascontiguousarray(vectors[:, :dimensions])
        if normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors.astype(np.float32, copy=False)

    async def embed_all(self, inputs: Sequence[str | list[int]], *, truncate: bool | None = None,
                        direction: TruncationDirection = TruncationDirection.RIGHT, prompt_name: str | None = None,
                        stats: Stats | None = None) -> list[np.ndarray]:
        """Token embeddings, one [T, H] array per input (special tokens included)."""
        stats = stats or Stats()
        self.check_batch(len(inputs))
        self._require(Task.EMBEDDING, message="Model is not an embedding model")
        encoded = await self._encode(inputs, truncate, direction, stats, prompt_name)
        return [r.value for r in await self._run(encoded, Output.TOKENS, stats, "embed_all")]

    async def embed_sparse(self, inputs: Sequence[str | list[int]], *, truncate: bool | None = None,
                           direction: TruncationDirection = TruncationDirection.RIGHT,
                           prompt_name: str | None = None,
                           stats: Stats | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """SPLADE vectors as (indices, values) of the non-zero entries, per input."""
        stats = stats or Stats()
        self.check_batch(len(inputs))
        self._require(Task.SPARSE, message="Model is not an embedding model with SPLADE pooling")
        encoded = await self._encode(inputs, truncate, direction, stats, prompt_name)
        out = []
        for r in await self._run(encoded, Output.SPARSE, stats, "embed_sparse"):
            idx = np.flatnonzero(r.value > 0)
            out.append((idx, r.value[idx]))
        return out

    async def rerank(self, query: str, texts: Sequence[str], *, raw_scores: bool = False,
                     truncate: bool | None = None, direction: TruncationDirection = TruncationDirection.RIGHT,
                     stats: Stats | None = None) -> np.ndarray:
        """One relevance score per text (sigmoid of the logit unless ``raw_scores``)."""
        stats = stats or Stats()
        self.check_batch(len(texts), "texts")
        self._require(Task.RERANKER, message="model is not a re-ranker model")
        encoded = await self._encode([query] * len(texts), truncate, direction, stats, pairs=list(texts))
        rows = await self._run(encoded, Output.LOGITS, stats, "rerank")
        logits = np.array([r.value[0] for r in rows], dtype=np.float32)
        return logits if raw_scores else 1.0 / (1.0 + np.exp(-logits))

    async def predict(self, inputs: Sequence[tuple[str, str | None]], *, raw_scores: bool = False,
                      truncate: bool | None = None, direction: TruncationDirection = TruncationDirection.RIGHT,
                      stats: Stats | None = None) -> list[np.ndarray]:
        """Class scores per input (softmax, or sigmoid for a single-label model, unless ``raw_scores``)."""
        stats = stats or Stats()
        self.check_batch(len(inputs))
        self._require(Task.CLASSIFIER, Task.RERANKER, message="Model is not a classifier model")
        singles = [i for i, (_, b) in enumerate(inputs) if b is None]
        doubles = [i for i, (_, b) in enumerate(inputs) if b is not None]
        encoded: list[Encoded | None] = [None] * len(inputs)
        for group, pairs in ((singles, None), (doubles, [str(inputs[i][1]) for i in doubles])):
            if not group:
                continue
            part = Stats()
            enc = await self._encode([inputs[i][0] for i in group], truncate, direction, part, pairs=pairs)
            stats.tokens += part.tokens
            stats.characters += part.characters
            stats.tokenization_time += part.tokenization_time
            for i, e in zip(group, enc, strict=True):
                encoded[i] = e
        rows = await self._run([e for e in encoded if e is not None], Output.LOGITS, stats, "predict")
        out = []
        for r in rows:
            logits = r.value.astype(np.float64)
            if raw_scores:
                scores = logits
            elif logits.shape[0] == 1:
                scores = 1.0 / (1.0 + np.exp(-logits))
            else:
                e = np.exp(logits - logits.max())
                scores = e / e.sum()
            out.append(scores.astype(np.float32))
        return out

    async def similarity(self, source: str, sentences: Sequence[str], *, truncate: bool | None = None,
                         direction: TruncationDirection = TruncationDirection.RIGHT, prompt_name: str | None = None,
                         stats: Stats | None = None) -> np.ndarray:
        """Cosine similarity of each sentence to the source sentence."""
        if not sentences:
            raise errors.empty("`inputs.sentences` cannot be empty")
        self.check_batch(len(sentences) + 1)
        vectors = await self.embed([source, *sentences], normalize=True, truncate=truncate, direction=direction,
                                   prompt_name=prompt_name, stats=stats)
        scores: np.ndarray = vectors[1:] @ vectors[0]
        return scores

    # ----- tokenizer routes (run in the tokenization pool: they may be long) -----

    async def tokenize(self, inputs: Sequence[str], add_special_tokens: bool,
                       prompt_name: str | None) -> list[list[dict[str, object]]]:
        """Tokens with ids, text, special flag and character offsets."""
        self.check_batch(len(inputs))
        texts = self.tokenization.apply_prompt(inputs, prompt_name)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, self._tokenize, texts, add_special_tokens)

    def _tokenize(self, texts: list[str], add_special_tokens: bool) -> list[list[dict[str, object]]]:
        tok = self.tokenization.tokenizer
        try:
            encodings = tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        except Exception as exc:
            raise errors.tokenizer(str(exc)) from exc
        out = []
        for text, enc in zip(texts, encodings, strict=True):
            tokens: list[dict[str, object]] = []
            for tid, special, (start, stop) in zip(enc.ids, enc.special_tokens_mask, enc.offsets, strict=True):
                is_special = bool(special)
                tokens.append({
                    "id": tid,
                    "text": tok.id_to_token(tid) if is_special else text[start:stop],
                    "special": is_special,
                    "start": None if is_special else start,
                    "stop": None if is_special else stop,
                })
            out.append(tokens)
        return out

    async def decode(self, ids: Sequence[Sequence[int]], skip_special_tokens: bool) -> list[str]:
        """Token ids back to text."""
        self.check_batch(len(ids))
        for i, seq in enumerate(ids):
            for t in seq:
                if t >= self.tokenization.vocab_size:
                    raise errors.validation(f"token id {t} is out of range (vocabulary size "
                                            f"{self.tokenization.vocab_size})", input=i)
        loop = asyncio.get_running_loop()
        tok = self.tokenization.tokenizer
        try:
            decoded: list[str] = await loop.run_in_executor(
                self._tokenize_pool, lambda: tok.decode_batch([list(s) for s in ids],
                                                              skip_special_tokens=skip_special_tokens))
        except Exception as exc:
            raise errors.tokenizer(str(exc)) from exc
        return decoded
