"""The ``tei.v1`` methods on one pool: protobuf requests in, protobuf answers out, through the gateway's
service layer, exactly as the HTTP routes serve them.

``Embed`` goes through the cache (:meth:`EmbeddingService.embed`); the other tasks are forwarded to the
pool (least-loaded replica, failover), as the HTTP gateway forwards ``/embed_sparse``, ``/rerank``,
``/predict``, ``/tokenize``, ``/decode`` and ``/embed_all``. Errors are the engine's and the edge's own
(:mod:`embedfleet.engine.errors`, :mod:`embedfleet.api.errors`); the server maps them to status codes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from embedfleet import __version__
from embedfleet.cache.memory import TOKENS, VECTOR
from embedfleet.engine import errors
from embedfleet.engine.errors import EngineError
from embedfleet.engine.tokenization import TruncationDirection
from embedfleet.gateway.service import CachePolicy, EmbeddingService
from embedfleet.gateway.upstream import UpstreamInfo
from embedfleet.grpc.proto import tei_pb2 as pb

DIRECTIONS: dict[int, TruncationDirection] = {pb.TRUNCATION_DIRECTION_RIGHT: TruncationDirection.RIGHT,
                                              pb.TRUNCATION_DIRECTION_LEFT: TruncationDirection.LEFT}
MODEL_TYPES = {"classifier": pb.MODEL_TYPE_CLASSIFIER, "reranker": pb.MODEL_TYPE_RERANKER}


def _direction(value: int) -> TruncationDirection:
    return DIRECTIONS.get(value, TruncationDirection.RIGHT)


def _truncate(value: bool) -> bool | None:
    """Proto3 bools cannot be unset: ``false`` means "the server's default" (``--auto-truncate``, on by
    default, as current TEI), ``true`` truncates."""
    return True if value else None


def _forward_body(truncate: bool, direction: int, **fields: Any) -> dict[str, Any]:
    body = {k: v for k, v in fields.items() if v is not None}
    if truncate:
        body["truncate"] = True
    body["truncation_direction"] = _direction(direction).value.capitalize()
    return body


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def embed_response(vector: np.ndarray, metadata: pb.Metadata) -> bytes:
    """A serialised ``EmbedResponse``, written straight from the vector's float32 bytes: field 1
    (``embeddings``, packed little-endian floats), then field 2 (``metadata``). The same bytes as
    ``EmbedResponse(embeddings=..., metadata=...).SerializeToString()``, without a float object per
    dimension (the cache keeps the vectors as float32 bytes already)."""
    data = vector.astype("<f4", copy=False).tobytes()
    meta = metadata.SerializeToString()
    return b"\x0a" + _varint(len(data)) + data + b"\x12" + _varint(len(meta)) + meta


def _metadata(started: int, chars: int, tokens: int = 0) -> pb.Metadata:
    return pb.Metadata(compute_chars=chars, compute_tokens=tokens, total_time_ns=time.perf_counter_ns() - started)


def _one(answer: Any, what: str) -> list[Any]:
    """The first (only) row of a forwarded batch answer (TEI answers a single input as a batch of one)."""
    if isinstance(answer, list) and answer and isinstance(answer[0], list):
        answer = answer[0]
    if not isinstance(answer, list):
        raise errors.backend(f"upstream answered {what} with no list")
    return answer


def _info(service: EmbeddingService) -> UpstreamInfo:
    info = service.pool.info
    if info is None:
        raise errors.unhealthy(f"no upstream of model {service.pool.name!r} has answered /info yet")
    return info


def _predictions(rows: list[Any]) -> list[pb.Prediction]:
    return [pb.Prediction(score=float(p["score"]), label=str(p["label"])) for p in rows]


class TeiCalls:
    """The ``tei.v1`` methods, each on the pool the caller picked."""

    def __init__(self, max_client_batch_size: int) -> None:
        self.max_client_batch_size = max_client_batch_size

    def info(self, service: EmbeddingService) -> pb.InfoResponse:
        """The pool's model, as TEI's ``Info`` describes it (with the gateway's request limits)."""
        raw = _info(service).raw
        task = _info(service).fingerprint.task
        optional: dict[str, Any] = {}
        if raw.get("model_sha"):
            optional["model_sha"] = str(raw["model_sha"])
        if raw.get("max_batch_requests"):
            optional["max_batch_requests"] = int(raw["max_batch_requests"])
        return pb.InfoResponse(
            version=__version__, model_id=str(raw.get("model_id", "")), model_dtype=str(raw.get("model_dtype", "")),
            model_type=MODEL_TYPES.get(task, pb.MODEL_TYPE_EMBEDDING),
            max_concurrent_requests=int(raw.get("max_concurrent_requests") or 0),
            max_input_length=int(raw.get("max_input_length") or 0),
            max_batch_tokens=int(raw.get("max_batch_tokens") or 0),
            max_client_batch_size=self.max_client_batch_size,
            tokenization_workers=int(raw.get("tokenization_workers") or 0), **optional)

    async def embed(self, service: EmbeddingService, req: pb.EmbedRequest, policy: CachePolicy) -> bytes:
        """One text's pooled embedding, through the cache: a serialised ``EmbedResponse``."""
        started = time.perf_counter_ns()
        result = await service.embed(
            [req.inputs], normalize=req.normalize if req.HasField("normalize") else True,
            truncate=_truncate(req.truncate), direction=_direction(req.truncation_direction),
            prompt_name=req.prompt_name if req.HasField("prompt_name") else None,
            dimensions=req.dimensions if req.HasField("dimensions") else None, policy=policy)
        row = result.rows[0]
        return embed_response(cast(np.ndarray, row[VECTOR]), _metadata(started, len(req.inputs), row[TOKENS]))

    async def embed_many(self, items: Sequence[tuple[EmbeddingService, pb.EmbedRequest]],
                         policy: CachePolicy, first: int = 0) -> list[bytes]:
        """Several ``Embed`` requests (a stream's, as they arrived), answered in order: those for the same
        pool with the same parameters go through the cache as one batch. An error about one text names
        its message in the stream (``message N``; ``first``: the stream position of ``items[0]``)."""
        started = time.perf_counter_ns()
        groups: dict[tuple[int, bool, bool | None, int, str | None, int | None], list[int]] = {}
        for i, (service, req) in enumerate(items):
            key = (id(service), req.normalize if req.HasField("normalize") else True, _truncate(req.truncate),
                   int(req.truncation_direction), req.prompt_name if req.HasField("prompt_name") else None,
                   req.dimensions if req.HasField("dimensions") else None)
            groups.setdefault(key, []).append(i)

        async def group(key: tuple[int, bool, bool | None, int, str | None, int | None],
                        positions: list[int]) -> list[Any]:
            _, normalize, truncate, direction, prompt_name, dimensions = key
            try:
                result = await items[positions[0]][0].embed(
                    [items[i][1].inputs for i in positions], normalize=normalize, truncate=truncate,
                    direction=_direction(direction), prompt_name=prompt_name, dimensions=dimensions, policy=policy)
            except EngineError as exc:
                if exc.input is None:
                    raise
                raise EngineError(exc.kind, f"{exc.detail} (message {first + positions[exc.input]})") from None
            return result.rows

        answers: list[bytes] = [b""] * len(items)
        keys = list(groups)
        for key, rows in zip(keys, await asyncio.gather(*(group(k, groups[k]) for k in keys)), strict=True):
            for i, row in zip(groups[key], rows, strict=True):
                answers[i] = embed_response(cast(np.ndarray, row[VECTOR]),
                                            _metadata(started, len(items[i][1].inputs), row[TOKENS]))
        return answers

    async def embed_sparse(self, service: EmbeddingService, req: pb.EmbedSparseRequest) -> pb.EmbedSparseResponse:
        """One text's SPLADE vector (forwarded)."""
        started = time.perf_counter_ns()
        body = _forward_body(req.truncate, req.truncation_direction, inputs=req.inputs,
                             prompt_name=req.prompt_name if req.HasField("prompt_name") else None)
        rows = _one(await service.pool.post("/embed_sparse", body, weight=service.estimate(req.inputs)),
                    "/embed_sparse")
        return pb.EmbedSparseResponse(
            sparse_embeddings=[pb.SparseValue(index=int(v["index"]), value=float(v["value"])) for v in rows],
            metadata=_metadata(started, len(req.inputs)))

    async def embed_all(self, service: EmbeddingService, req: pb.EmbedAllRequest) -> pb.EmbedAllResponse:
        """One text's token embeddings (forwarded)."""
        started = time.perf_counter_ns()
        body = _forward_body(req.truncate, req.truncation_direction, inputs=req.inputs,
                             prompt_name=req.prompt_name if req.HasField("prompt_name") else None)
        answer: Any = await service.pool.post("/embed_all", body, weight=service.estimate(req.inputs))
        tokens = answer[0] if isinstance(answer, list) and answer and isinstance(answer[0], list) and answer[0] \
            and isinstance(answer[0][0], list) else answer
        if not isinstance(tokens, list):
            raise errors.backend("upstream answered /embed_all with no list")
        return pb.EmbedAllResponse(token_embeddings=[pb.TokenEmbedding(embeddings=t) for t in tokens],
                                   metadata=_metadata(started, len(req.inputs), len(tokens)))

    async def predict(self, service: EmbeddingService, req: pb.PredictRequest) -> pb.PredictResponse:
        """One text's class scores (forwarded)."""
        started = time.perf_counter_ns()
        body = _forward_body(req.truncate, req.truncation_direction, inputs=req.inputs, raw_scores=req.raw_scores)
        rows = _one(await service.pool.post("/predict", body, weight=service.estimate(req.inputs)), "/predict")
        return pb.PredictResponse(predictions=_predictions(rows), metadata=_metadata(started, len(req.inputs)))

    async def predict_pair(self, service: EmbeddingService, req: pb.PredictPairRequest) -> pb.PredictResponse:
        """A pair's class scores (forwarded as a batch of one pair)."""
        started = time.perf_counter_ns()
        if len(req.inputs) != 2:
            raise errors.validation(f"`inputs` must hold a pair of texts, not {len(req.inputs)}")
        pair = list(req.inputs)
        body = _forward_body(req.truncate, req.truncation_direction, inputs=[pair], raw_scores=req.raw_scores)
        rows = _one(await service.pool.post("/predict", body, weight=sum(map(service.estimate, pair))), "/predict")
        return pb.PredictResponse(predictions=_predictions(rows), metadata=_metadata(started, sum(map(len, pair))))

    async def rerank(self, service: EmbeddingService, req: pb.RerankRequest) -> pb.RerankResponse:
        """The texts ranked against the query (forwarded)."""
        started = time.perf_counter_ns()
        ranks = await self._rerank(service, [(req.query, list(req.texts))], req.truncate, req.truncation_direction,
                                   req.raw_scores, req.return_text)
        return pb.RerankResponse(ranks=ranks, metadata=_metadata(started, len(req.query) + sum(map(len, req.texts))))

    async def rerank_stream(self, service: EmbeddingService,
                            reqs: Sequence[pb.RerankStreamRequest]) -> pb.RerankResponse:
        """Every streamed (query, text) pair ranked in one answer; ``index`` is the message's position.
        ``raw_scores`` and ``return_text`` are the first message's, as TEI reads them."""
        started = time.perf_counter_ns()
        if not reqs:
            raise errors.empty("the stream carried no (query, text) pair")
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.query, []).append(i)
        first = reqs[0]
        parts = await asyncio.gather(*(
            self._rerank(service, [(query, [reqs[i].text for i in positions])], first.truncate,
                         first.truncation_direction, first.raw_scores, first.return_text, positions)
            for query, positions in groups.items()))
        ranks = sorted((r for part in parts for r in part), key=lambda r: -r.score)
        chars = sum(len(r.query) + len(r.text) for r in reqs)
        return pb.RerankResponse(ranks=ranks, metadata=_metadata(started, chars))

    async def _rerank(self, service: EmbeddingService, pairs: list[tuple[str, list[str]]], truncate: bool,
                      direction: int, raw_scores: bool, return_text: bool,
                      positions: list[int] | None = None) -> list[pb.Rank]:
        (query, texts), = pairs
        body = _forward_body(truncate, direction, query=query, texts=texts, raw_scores=raw_scores,
                             return_text=return_text)
        answer: Any = await service.pool.post("/rerank", body, weight=sum(map(service.estimate, [query, *texts])))
        if not isinstance(answer, list):
            raise errors.backend("upstream answered /rerank with no list")
        ranks = []
        for r in answer:
            index = int(r["index"])
            rank = pb.Rank(index=positions[index] if positions is not None else index, score=float(r["score"]))
            if r.get("text") is not None:
                rank.text = str(r["text"])
            ranks.append(rank)
        return ranks

    async def tokenize(self, service: EmbeddingService, req: pb.EncodeRequest) -> pb.EncodeResponse:
        """One text's tokens (forwarded)."""
        body: dict[str, Any] = {"inputs": req.inputs, "add_special_tokens": req.add_special_tokens}
        if req.HasField("prompt_name"):
            body["prompt_name"] = req.prompt_name
        rows = _one(await service.pool.post("/tokenize", body, weight=service.estimate(req.inputs)), "/tokenize")
        tokens = []
        for t in rows:
            token = pb.SimpleToken(id=int(t["id"]), text=str(t["text"]), special=bool(t["special"]))
            if t.get("start") is not None:
                token.start = int(t["start"])
            if t.get("stop") is not None:
                token.stop = int(t["stop"])
            tokens.append(token)
        return pb.EncodeResponse(tokens=tokens)

    async def decode(self, service: EmbeddingService, req: pb.DecodeRequest) -> pb.DecodeResponse:
        """Token ids back to text (forwarded)."""
        body = {"ids": list(req.ids), "skip_special_tokens": req.skip_special_tokens}
        answer: Any = await service.pool.post("/decode", body, weight=len(req.ids))
        if isinstance(answer, list) and answer:
            answer = answer[0]
        if not isinstance(answer, str):
            raise errors.backend("upstream answered /decode with no text")
        return pb.DecodeResponse(text=answer)
