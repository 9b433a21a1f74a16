"""Arrow IPC batches: EmbedArrow / EmbedSparseArrow over gRPC and their HTTP twins, against real workers:
row order, the cache and the split across replicas for 10,000+ rows, LZ4 answers, noop, and every kind of
bad input refused with the row named."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import numpy as np
import pyarrow as pa
import pytest

from tests.grpc.conftest import GrpcGateway
from tests.helpers import WorkerProcess

pytestmark = pytest.mark.slow

ARROW = "application/vnd.apache.arrow.stream"


def ipc(columns: dict[str, Any], compression: str | None = None, chunk: int | None = None) -> bytes:
    """An Arrow IPC stream of a table."""
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_table(table, max_chunksize=chunk)
    return bytes(sink.getvalue())


def read(data: bytes) -> pa.Table:
    """An Arrow IPC stream's table."""
    return pa.ipc.open_stream(data).read_all()


def _fail(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    return err.code(), err.details()


def test_embed_arrow_big_batch_cache_split_and_order(gateway: GrpcGateway, embedders: list[WorkerProcess],
                                                     grpc_stubs: SimpleNamespace) -> None:
    mx = grpc_stubs.mx
    m = grpc_stubs.mx_grpc.TeiMultiplexerStub(gateway.channel())
    texts = [f"arrow row {i} " + "z" * (i % 13) for i in range(12_000)]
    calls_before = [w.metric("te_request_count_total") for w in embedders]
    answer = m.EmbedArrow(mx.EmbedArrowRequest(arrow_ipc=ipc({"text": texts}, chunk=5_000), normalize=True))
    table = read(answer.arrow_ipc)
    assert table.schema.field("embeddings").type == pa.list_(pa.float32(), 32) and table.num_rows == len(texts)
    matrix = np.asarray(table.column("embeddings").combine_chunks().flatten()).reshape(len(texts), 32)
    sample = [0, 1, 4_999, 5_000, 11_999]
    http = gateway.post("/embed", {"inputs": [texts[i] for i in sample]}).json()
    assert np.allclose(matrix[sample], np.asarray(http), atol=1e-6)  # row order kept
    # Split across both replicas.
    assert all(w.metric("te_request_count_total") > before for w, before in zip(embedders, calls_before, strict=True))
    hits = gateway.get("/cache/stats").json()["models"]["embed"]["hits"]
    again = m.EmbedArrow(mx.EmbedArrowRequest(arrow_ipc=ipc({"text": texts}), normalize=True))
    assert np.array_equal(np.asarray(read(again.arrow_ipc).column("embeddings").combine_chunks().flatten()),
                          matrix.reshape(-1))
    assert gateway.get("/cache/stats").json()["models"]["embed"]["hits"] >= hits + len(texts)  # all from the cache


def test_lz4_noop_large_utf8_and_the_http_twin(gateway: GrpcGateway, grpc_stubs: SimpleNamespace) -> None:
    mx = grpc_stubs.mx
    m = grpc_stubs.mx_grpc.TeiMultiplexerStub(gateway.channel())
    texts = [f"noop {i}" for i in range(5_000)]
    plain = m.EmbedArrow(mx.EmbedArrowRequest(arrow_ipc=ipc({"text": texts}), noop=True)).arrow_ipc
    packed = m.EmbedArrow(mx.EmbedArrowRequest(arrow_ipc=ipc({"text": texts}, "lz4"), noop=True)).arrow_ipc
    assert read(plain).equals(read(packed)) and not np.any(read(plain).column(0).combine_chunks().flatten())
    assert len(plain) > 5_000 * 32 * 4 > 20 * len(packed)  # zeros: the LZ4 answer is far smaller

    large = pa.array(["a", "b"], type=pa.large_string())
    http = httpx.post(f"{gateway.url}/embed_arrow", content=ipc({"text": large}), headers={"content-type": ARROW},
                      timeout=60)
    assert http.status_code == 200 and http.headers["content-type"] == ARROW
    grpc_answer = m.EmbedArrow(mx.EmbedArrowRequest(arrow_ipc=ipc({"text": ["a", "b"]}), normalize=True))
    assert read(http.content).equals(read(grpc_answer.arrow_ipc))
    raw = httpx.post(f"{gateway.url}/embed_arrow?normalize=false", content=ipc({"text": ["a"]}), timeout=60)
    assert abs(np.linalg.norm(read(raw.content).column(0)[0].as_py()) - 1) > 1e-3

    sparse = m.EmbedSparseArrow(mx.EmbedSparseArrowRequest(target=mx.Target(model_id="splade"),
                                                            arrow_ipc=ipc({"text": ["x", "y"]})))
    rows = read(sparse.arrow_ipc)
    assert rows.schema.field("sparse_embeddings").type == pa.list_(
        pa.struct([("index", pa.uint32()), ("value", pa.float32())]))
    expected = gateway.post("/embed_sparse", {"inputs": ["x", "y"]}).json()
    assert [[v["index"] for v in row] for row in rows.column(0).to_pylist()] == \
        [[v["index"] for v in row] for row in expected]
    http_sparse = httpx.post(f"{gateway.url}/embed_sparse_arrow", content=ipc({"text": ["x", "y"]}), timeout=60)
    assert read(http_sparse.content).equals(rows)
    empty = m.EmbedSparseArrow(mx.EmbedSparseArrowRequest(target=mx.Target(model_id="splade"),
                                                           arrow_ipc=ipc({"text": ["x"]}), noop=True))
    assert read(empty.arrow_ipc).column(0).to_pylist() == [[]]


BAD: list[tuple[str, bytes, str]] = [
    ("null", ipc({"text": ["a", "b", None, "d"]}, chunk=2), "row 2"),
    ("missing column", ipc({"txt": ["a"]}), "no column `text` (its columns: `txt`)"),
    ("mistyped column", ipc({"text": [1, 2]}), "`text` is int64"),
    ("corrupt bytes", b"\xff\xff\xff\xff\x10\x00\x00\x00not arrow at all", "cannot be read"),
    ("truncated stream", ipc({"text": ["a"] * 100})[:-40], "cannot be read"),
    ("a second stream", ipc({"text": ["a"]}) + ipc({"other": [1]}), "follow the end"),
    ("no rows", ipc({"text": pa.array([], type=pa.string())}), "no rows"),
    ("empty text", ipc({"text": ["a", ""]}), "row 1"),
    ("too many rows", ipc({"text": ["r"] * 20_001}), "more than 20000 rows"),
]


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in BAD], ids=[n for n, _, _ in BAD])
def test_bad_arrow_input(gateway: GrpcGateway, grpc_stubs: SimpleNamespace, data: bytes, message: str) -> None:
    mx = grpc_stubs.mx
    m = grpc_stubs.mx_grpc.TeiMultiplexerStub(gateway.channel())
    code, details = _fail(lambda: m.EmbedArrow(mx.EmbedArrowRequest(arrow_ipc=data)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details
    http = httpx.post(f"{gateway.url}/embed_arrow", content=data, headers={"content-type": ARROW}, timeout=60)
    assert http.status_code in (400, 422) and message in http.json()["error"]
