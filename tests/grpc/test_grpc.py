"""gRPC on the gateway: every tei.v1 and tei_multiplexer.v1 method from independently generated clients,
against real workers, compared with the HTTP routes; targets, streams, cancellation, health, reflection
and metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.gateway.support import metric_value, wait_for
from tests.grpc.conftest import GrpcGateway
from tests.helpers import WorkerProcess

pytestmark = pytest.mark.slow


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    return err.code(), err.details()


def test_tei_embed_matches_http_and_uses_the_cache(gateway: GrpcGateway, grpc_stubs: SimpleNamespace) -> None:
    tei = grpc_stubs.tei
    embed = grpc_stubs.tei_grpc.EmbedStub(gateway.channel())
    http = np.asarray(gateway.post("/embed", {"inputs": "a gRPC text"}).json()[0], dtype=np.float32)
    hits = gateway.get("/cache/stats").json()["models"]["embed"]["hits"]
    answer = embed.Embed(tei.EmbedRequest(inputs="a gRPC text"))
    assert np.array_equal(np.asarray(answer.embeddings, dtype=np.float32), http)
    assert answer.metadata.compute_chars == len("a gRPC text") and answer.metadata.compute_tokens > 0
    assert gateway.get("/cache/stats").json()["models"]["embed"]["hits"] == hits + 1  # served from the cache
    raw = embed.Embed(tei.EmbedRequest(inputs="a gRPC text", normalize=False, dimensions=8))
    assert len(raw.embeddings) == 8 and abs(np.linalg.norm(raw.embeddings) - 1) > 1e-3
    code, details = _code(lambda: embed.Embed(tei.EmbedRequest(inputs="")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in details


def test_tei_every_method(gateway: GrpcGateway, grpc_stubs: SimpleNamespace) -> None:
    tei, stubs, channel = grpc_stubs.tei, grpc_stubs.tei_grpc, gateway.channel()
    info = stubs.InfoStub(channel).Info(tei.InfoRequest())
    assert info.model_type == tei.MODEL_TYPE_EMBEDDING and info.max_client_batch_size == 2048
    assert info.model_id == gateway.get("/info").json()["model_id"]

    embed = stubs.EmbedStub(channel)
    sparse = embed.EmbedSparse(tei.EmbedSparseRequest(inputs="sparse"))
    http_sparse = gateway.post("/embed_sparse", {"inputs": "sparse"}).json()[0]
    assert [(v.index, pytest.approx(v.value)) for v in sparse.sparse_embeddings] == \
        [(v["index"], pytest.approx(v["value"])) for v in http_sparse]
    assert len(list(embed.EmbedSparseStream(iter([tei.EmbedSparseRequest(inputs=t) for t in "ab"])))) == 2
    every = embed.EmbedAll(tei.EmbedAllRequest(inputs="two words"))
    assert len(every.token_embeddings) == len(gateway.post("/embed_all", {"inputs": "two words"}).json()[0])
    assert len(list(embed.EmbedAllStream(iter([tei.EmbedAllRequest(inputs="x")] * 3)))) == 3

    predict = stubs.PredictStub(channel)
    one = predict.Predict(tei.PredictRequest(inputs="classify me"))
    assert one.predictions[0].label == gateway.post("/predict", {"inputs": "classify me"}).json()[0]["label"]
    pair = predict.PredictPair(tei.PredictPairRequest(inputs=["a", "b"]))
    assert pair.predictions[0].score == pytest.approx(
        gateway.post("/predict", {"inputs": [["a", "b"]]}).json()[0][0]["score"])
    assert len(list(predict.PredictStream(iter([tei.PredictRequest(inputs="x")] * 2)))) == 2
    assert len(list(predict.PredictPairStream(iter([tei.PredictPairRequest(inputs=["x", "y"])] * 2)))) == 2
    code, _ = _code(lambda: predict.PredictPair(tei.PredictPairRequest(inputs=["only one"])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    rerank = stubs.RerankStub(channel)
    ranks = rerank.Rerank(tei.RerankRequest(query="q", texts=["a", "b", "c"], return_text=True))
    http_ranks = gateway.post("/rerank", {"query": "q", "texts": ["a", "b", "c"]}).json()
    assert [r.index for r in ranks.ranks] == [r["index"] for r in http_ranks]
    assert {r.text for r in ranks.ranks} == {"a", "b", "c"}
    streamed = rerank.RerankStream(iter([tei.RerankStreamRequest(query="q", text=t) for t in ["a", "b", "c"]]))
    assert [r.index for r in streamed.ranks] == [r["index"] for r in http_ranks]

    tokenize = stubs.TokenizeStub(channel)
    tokens = tokenize.Tokenize(tei.EncodeRequest(inputs="hello world", add_special_tokens=True))
    http_tokens = gateway.post("/tokenize", {"inputs": "hello world"}).json()[0]
    assert [t.id for t in tokens.tokens] == [t["id"] for t in http_tokens]
    assert tokens.tokens[1].start == 0 and tokens.tokens[1].stop == 5 and tokens.tokens[0].special
    assert len(list(tokenize.TokenizeStream(iter([tei.EncodeRequest(inputs="x")] * 2)))) == 2
    ids = [t.id for t in tokens.tokens]
    decoded = tokenize.Decode(tei.DecodeRequest(ids=ids, skip_special_tokens=True))
    assert decoded.text == "hello world"
    assert [d.text for d in tokenize.DecodeStream(iter([tei.DecodeRequest(ids=ids, skip_special_tokens=True)] * 2))] \
        == ["hello world"] * 2


def test_x_model_metadata_and_error_codes(gateway: GrpcGateway, grpc_stubs: SimpleNamespace) -> None:
    tei = grpc_stubs.tei
    embed = grpc_stubs.tei_grpc.EmbedStub(gateway.channel())
    info = grpc_stubs.tei_grpc.InfoStub(gateway.channel()).Info(tei.InfoRequest(), metadata=[("x-model", "ranker")])
    assert info.model_type == tei.MODEL_TYPE_RERANKER
    # Embed on a reranker: the worker's Backend error, FAILED_PRECONDITION as TEI maps it.
    code, _ = _code(lambda: embed.Embed(tei.EmbedRequest(inputs="x"), metadata=[("x-model", "ranker")]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, details = _code(lambda: embed.Embed(tei.EmbedRequest(inputs="x"), metadata=[("x-model", "nope")]))
    assert code == grpc.StatusCode.NOT_FOUND and "embed, ranker, splade" in details


def test_multiplexer_targets_and_every_method(gateway: GrpcGateway, grpc_stubs: SimpleNamespace) -> None:
    tei, mx = grpc_stubs.tei, grpc_stubs.mx
    m = grpc_stubs.mx_grpc.TeiMultiplexerStub(gateway.channel())
    Target = mx.Target
    for target in (Target(model_id="ranker"), Target(instance_name="ranker"), Target(instance_index=1)):
        assert m.Info(mx.InfoRequest(target=target)).model_type == tei.MODEL_TYPE_RERANKER
    by_id = m.Info(mx.InfoRequest(target=Target(model_id=gateway.get("/info").json()["model_id"])))
    assert by_id.model_type == tei.MODEL_TYPE_EMBEDDING
    for target in (Target(instance_name="nope"), Target(model_id="nope"), Target(instance_index=7)):
        code, details = _code(lambda t=target: m.Info(mx.InfoRequest(target=t)))
        assert code == grpc.StatusCode.NOT_FOUND and "embed (embed), ranker (ranker), splade (splade)" in details

    embed_t, rank_t, sparse_t = Target(model_id="embed"), Target(model_id="ranker"), Target(model_id="splade")
    one = m.Embed(mx.EmbedRequest(target=embed_t, request=tei.EmbedRequest(inputs="mx")))
    http = gateway.post("/embed", {"inputs": "mx"}).json()[0]
    assert np.allclose(one.embeddings, http)
    assert len(m.Embed(mx.EmbedRequest(request=tei.EmbedRequest(inputs="no target"))).embeddings) == len(http)
    streamed = list(m.EmbedStream(iter([mx.EmbedRequest(target=embed_t, request=tei.EmbedRequest(inputs=f"s{i}"))
                                        for i in range(4)])))
    assert len(streamed) == 4
    assert m.EmbedSparse(mx.EmbedSparseRequest(target=sparse_t, request=tei.EmbedSparseRequest(inputs="x"))) \
        .sparse_embeddings
    sparse_req = mx.EmbedSparseRequest(target=sparse_t, request=tei.EmbedSparseRequest(inputs="x"))
    assert len(list(m.EmbedSparseStream(iter([sparse_req])))) == 1
    assert m.EmbedAll(mx.EmbedAllRequest(target=embed_t, request=tei.EmbedAllRequest(inputs="x"))).token_embeddings
    assert len(list(m.EmbedAllStream(iter([mx.EmbedAllRequest(target=embed_t,
                                                              request=tei.EmbedAllRequest(inputs="x"))] * 2)))) == 2
    assert m.Predict(mx.PredictRequest(target=rank_t, request=tei.PredictRequest(inputs="x"))).predictions
    pair = tei.PredictPairRequest(inputs=["x", "y"])
    assert m.PredictPair(mx.PredictPairRequest(target=rank_t, request=pair)).predictions
    assert len(list(m.PredictStream(iter([mx.PredictRequest(target=rank_t,
                                                            request=tei.PredictRequest(inputs="x"))] * 2)))) == 2
    assert len(list(m.PredictPairStream(iter([mx.PredictPairRequest(target=rank_t, request=pair)] * 2)))) == 2
    ranks = m.Rerank(mx.RerankRequest(target=rank_t, request=tei.RerankRequest(query="q", texts=["a", "b"])))
    assert sorted(r.index for r in ranks.ranks) == [0, 1]
    streamed_ranks = m.RerankStream(iter([mx.RerankStreamRequest(target=rank_t,
                                                                 request=tei.RerankStreamRequest(query="q", text=t))
                                          for t in ["a", "b"]]))
    assert [r.index for r in streamed_ranks.ranks] == [r.index for r in ranks.ranks]
    enc = tei.EncodeRequest(inputs="hello", add_special_tokens=False)
    assert [t.text for t in m.Tokenize(mx.EncodeRequest(target=embed_t, request=enc)).tokens] == ["hello"]
    assert len(list(m.TokenizeStream(iter([mx.EncodeRequest(target=embed_t, request=enc)] * 2)))) == 2
    dec = tei.DecodeRequest(ids=[7592], skip_special_tokens=True)
    assert m.Decode(mx.DecodeRequest(target=embed_t, request=dec)).text == "hello"
    assert [d.text for d in m.DecodeStream(iter([mx.DecodeRequest(target=embed_t, request=dec)] * 2))] == ["hello"] * 2


def test_stream_keeps_order(gateway: GrpcGateway, grpc_stubs: SimpleNamespace) -> None:
    tei = grpc_stubs.tei
    embed = grpc_stubs.tei_grpc.EmbedStub(gateway.channel())
    texts = [f"ordered text {i} " + "x" * (i % 37) for i in range(120)]  # lengths vary: answers finish out of order
    streamed = [list(r.embeddings) for r in embed.EmbedStream(iter([tei.EmbedRequest(inputs=t) for t in texts]))]
    http = gateway.post("/embed", {"inputs": texts}).json()
    assert np.allclose(np.asarray(streamed), np.asarray(http), atol=1e-6)


def test_embed_stream_batches_what_arrives_together(gateway: GrpcGateway, embedders: list[WorkerProcess],
                                                   grpc_stubs: SimpleNamespace) -> None:
    """32 new texts streamed at once reach the workers in a few calls, not 32; an error names its message."""
    tei = grpc_stubs.tei
    embed = grpc_stubs.tei_grpc.EmbedStub(gateway.channel())
    before = sum(w.metric("te_request_count_total") for w in embedders)
    texts = [f"batched stream text {i}" for i in range(32)]
    answers = list(embed.EmbedStream(iter([tei.EmbedRequest(inputs=t) for t in texts])))
    calls = sum(w.metric("te_request_count_total") for w in embedders) - before
    assert len(answers) == 32 and calls <= 8, f"{calls} worker calls for 32 streamed texts"
    assert np.allclose([list(a.embeddings) for a in answers], gateway.post("/embed", {"inputs": texts}).json(),
                       atol=1e-6)
    bad = [tei.EmbedRequest(inputs=t) for t in ["fine 1", "fine 2", "", "fine 3"]]
    with pytest.raises(grpc.RpcError) as info:
        list(embed.EmbedStream(iter(bad)))
    err: Any = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "(message 2)" in err.details()


def test_stream_back_pressure_and_cancellation(gateway: GrpcGateway, grpc_stubs: SimpleNamespace) -> None:
    """A client that sends without reading: once the answers fill the client's HTTP/2 window, the gateway stops
    taking its requests (it would otherwise keep every answer); cancelling ends the call, and the gateway
    counts it. Answers of 128 tokens x 32 floats: 16 KB each, so a few hundred fill the window."""
    tei = grpc_stubs.tei
    embed = grpc_stubs.tei_grpc.EmbedStub(gateway.channel())
    sent = 0
    stop = threading.Event()

    def requests() -> Iterator[Any]:
        nonlocal sent
        while not stop.is_set() and sent < 20_000:
            sent += 1
            yield tei.EmbedAllRequest(inputs=f"pressure {sent} " + "hello " * 700)

    call = embed.EmbedAllStream(requests())
    next(call)  # the first answer: the stream is running
    last, still_since = -1, time.monotonic()

    def settled() -> bool:  # no request taken for a second
        nonlocal last, still_since
        if sent != last:
            last, still_since = sent, time.monotonic()
        return time.monotonic() - still_since > 1.0

    wait_for(settled, "the gateway to stop taking requests from a client that does not read", timeout=60)
    # The client's receive window holds a few hundred answers, the gateway's transport a few MB of requests.
    assert sent < 5_000, f"{sent} requests (80 MB) taken while the client read one answer"
    call.cancel()
    stop.set()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
    wait_for(lambda: metric_value(gateway.get("/metrics").text, "embedfleet_grpc_requests_total",
                                  method="/tei.v1.Embed/EmbedAllStream", code="CANCELLED") >= 1,
             "the cancelled stream to be counted")
    assert gateway.get("/health").status_code == 200


def test_health_reflection_and_metrics(gateway: GrpcGateway, grpc_stubs: SimpleNamespace) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = gateway.channel()
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "tei.v1.Embed", "tei.v1.Rerank", "tei.v1.Predict", "tei_multiplexer.v1.TeiMultiplexer"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == serving, service
    code, _ = _code(lambda: health.Check(health_pb2.HealthCheckRequest(service="no.such.Service")))
    assert code == grpc.StatusCode.NOT_FOUND

    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"tei.v1.Embed", "tei.v1.Info", "tei.v1.Predict", "tei.v1.Rerank", "tei.v1.Tokenize",
            "tei_multiplexer.v1.TeiMultiplexer", "grpc.health.v1.Health"} <= services

    grpc_stubs.tei_grpc.InfoStub(channel).Info(grpc_stubs.tei.InfoRequest())
    text = gateway.get("/metrics").text
    assert metric_value(text, "embedfleet_grpc_requests_total", method="/tei.v1.Info/Info", code="OK") >= 1
    assert metric_value(text, "embedfleet_grpc_request_duration_seconds_count", method="/tei.v1.Info/Info",
                        code="OK") >= 1
