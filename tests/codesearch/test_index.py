"""Indexing and search end to end, against real worker and gateway processes: incremental re-indexing,
several repositories with filters, reranking, and the ``embedfleet codesearch`` commands."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from qdrant_client import QdrantClient, models

from embedfleet.codesearch.embedder import Embedder
from embedfleet.codesearch.errors import CodeSearchError
from embedfleet.codesearch.index import Indexer, IndexReport
from embedfleet.codesearch.lexical import term_id
from embedfleet.codesearch.search import search
from embedfleet.codesearch.store import DENSE, LEXICAL, CodeStore, Hit, point_id
from tests.codesearch import samples
from tests.helpers import GatewayProcess

pytestmark = pytest.mark.slow
T = TypeVar("T")


def _with(gateway: GatewayProcess, qdrant: str, fn: Callable[[CodeStore, Embedder], Awaitable[T]],
          reranker: str | None = "ranker") -> T:
    async def go() -> T:
        store = CodeStore(qdrant)
        try:
            async with Embedder(gateway.url, model="minilm", reranker=reranker, concurrency=3,
                                batch_size=4) as embedder:
                return await fn(store, embedder)
        finally:
            await store.close()

    return asyncio.run(go())


def _index(gateway: GatewayProcess, qdrant: str, root: Path, repo: str) -> IndexReport:
    return _with(gateway, qdrant, lambda s, e: Indexer(s, e).index(root, repo))


def _search(gateway: GatewayProcess, qdrant: str, query: str, **kwargs: object) -> list[Hit]:
    return _with(gateway, qdrant, lambda s, e: search(s, e, query, **kwargs))  # type: ignore[arg-type]


def _cache_hits(gateway: GatewayProcess) -> int:
    hits: int = gateway.get("/cache/stats").json()["models"]["minilm"]["hits"]
    return hits


def test_index_search_filters_and_incremental_reindex(gateway: GatewayProcess, tmp_path: Path) -> None:
    qdrant = f"qdrant+local://{tmp_path / 'qdrant'}"
    root = samples.write_repo(tmp_path / "demo")
    first = _index(gateway, qdrant, root, "demo")
    assert first.files == 6 and len(first.changed) == 6 and first.deleted == [] and first.chunks >= 20

    hits = _search(gateway, qdrant, "round a money amount to whole cents", limit=3)
    assert (hits[0].path, hits[0].symbol, hits[0].start_line) == ("billing/payments.py", "round_cents", 8)
    assert hits[0].language == "python" and "math.floor" in hits[0].text and hits[0].score > hits[-1].score
    words = _search(gateway, qdrant, "count how many times each word occurs", limit=3)
    assert "counter/src/lib.rs" in {h.path for h in words}
    go_only = _search(gateway, qdrant, "register an HTTP route handler", limit=5, language="go")
    assert go_only and {h.language for h in go_only} == {"go"} and go_only[0].symbol == "Handle"

    # A second repository in the same index; the filter keeps them apart.
    other = tmp_path / "other"
    other.mkdir()
    (other / "units.py").write_text("def round_to_cents(value):\n    return round(value, 2)\n")
    assert _index(gateway, qdrant, other, "other").changed == ["units.py"]
    both = {h.repo for h in _search(gateway, qdrant, "round money to cents", limit=10)}
    assert both == {"demo", "other"}
    assert {h.repo for h in _search(gateway, qdrant, "round money to cents", limit=10, repo="other")} == {"other"}

    # Change one file, delete another: only those are touched; the unchanged chunks of the changed file
    # come from the gateway's cache.
    hits_before = _cache_hits(gateway)
    payments = root / "billing" / "payments.py"
    payments.write_text(payments.read_text() + "\n\ndef refund(amount):\n    return -round_cents(amount)\n")
    (root / "server" / "server.go").unlink()
    second = _index(gateway, qdrant, root, "demo")
    assert second.changed == ["billing/payments.py"] and second.deleted == ["server/server.go"]
    assert second.chunks == 6  # the module, round_cents, Invoice, its two members, and the new refund
    assert _cache_hits(gateway) - hits_before == 5 + 1  # its 5 unchanged chunks, and the start-up probe
    assert _search(gateway, qdrant, "register an HTTP route handler", language="go") == []
    refund = _search(gateway, qdrant, "refund an amount", limit=1, repo="demo")
    assert refund[0].symbol == "refund" and refund[0].start_line == 27
    third = _index(gateway, qdrant, root, "demo")
    assert third.changed == [] and third.deleted == [] and third.chunks == 0


def test_rerank_reorders_candidates_by_the_reranker(gateway: GatewayProcess, tmp_path: Path) -> None:
    qdrant = f"qdrant+local://{tmp_path / 'qdrant'}"
    _index(gateway, qdrant, samples.write_repo(tmp_path / "demo"), "demo")
    plain = _search(gateway, qdrant, "parse a JSON configuration", limit=12)
    ranked = _search(gateway, qdrant, "parse a JSON configuration", limit=3, rerank=True)
    assert len(ranked) == 3 and [h.score for h in ranked] == sorted((h.score for h in ranked), reverse=True)
    assert {(h.path, h.start_line) for h in ranked} <= {(h.path, h.start_line) for h in plain}
    scores = _with(gateway, qdrant, lambda s, e: e.rerank("parse a JSON configuration", ["a", "b"]))
    assert len(scores) == 2 and all(isinstance(x, float) for x in scores)
    with pytest.raises(CodeSearchError, match="424"):  # the embedder's pool cannot rerank
        _with(gateway, qdrant, lambda s, e: search(s, e, "q", rerank=True), reranker="minilm")
    with pytest.raises(CodeSearchError, match="empty"):
        _search(gateway, qdrant, "   ")


def test_hybrid_search_and_an_index_built_before_it(gateway: GatewayProcess, tmp_path: Path) -> None:
    qdrant = f"qdrant+local://{tmp_path / 'qdrant'}"
    root = samples.write_repo(tmp_path / "demo")
    _index(gateway, qdrant, root, "demo")
    # Each point holds its embedding and its lexical terms (its symbol's among them).
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    try:
        point = client.retrieve("codesearch", [point_id("demo", "billing/payments.py", 1)], with_vectors=True)[0]
    finally:
        client.close()
    assert isinstance(point.vector, dict) and len(point.vector[DENSE]) == 384  # type: ignore[arg-type]
    sparse = point.vector[LEXICAL]
    assert isinstance(sparse, models.SparseVector) and {term_id("round"), term_id("cent")} <= set(sparse.indices)

    # An identifier named in the query is found by the lexical half, whatever the embedding makes of it.
    hybrid = _search(gateway, qdrant, "retryWithBackoff attempts", limit=3)
    assert hybrid[0].symbol == "retryWithBackoff" and hybrid[0].score > hybrid[-1].score
    dense = _search(gateway, qdrant, "retryWithBackoff attempts", limit=3, hybrid=False)
    assert len(dense) == 3 and all(-1 <= h.score <= 1 for h in dense)  # cosine, not fused ranks
    assert {h.language for h in _search(gateway, qdrant, "round cents", limit=5, language="go")} == {"go"}

    # An index an older embedfleet built (one unnamed vector): a clear message to rebuild it, nothing changed.
    legacy = tmp_path / "legacy"
    client = QdrantClient(path=str(legacy))
    client.create_collection("codesearch", vectors_config=models.VectorParams(size=384,
                                                                              distance=models.Distance.COSINE))
    client.upsert("codesearch", [models.PointStruct(id=point_id("demo", "gone.py", 0), vector=[0.05] * 384, payload={
        "repo": "demo", "root": str(root), "path": "gone.py", "language": "python", "symbol": "f", "kind": "function",
        "start_line": 1, "end_line": 2, "text": "def f():\n    pass", "file_hash": "0"})])
    client.close()
    old = f"qdrant+local://{legacy}"
    for attempt in (lambda: _search(gateway, old, "round cents"), lambda: _search(gateway, old, "x", hybrid=False),
                    lambda: _index(gateway, old, root, "demo")):
        with pytest.raises(CodeSearchError, match=r"built by an older embedfleet.*rebuild it"):
            attempt()
    client = QdrantClient(path=str(legacy))
    try:
        assert client.count("codesearch").count == 1  # the indexer stopped before removing gone.py
    finally:
        client.close()


def _cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedfleet.cli", "codesearch", *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", **(env or {})})


def test_cli_index_search_status_and_errors(gateway: GatewayProcess, tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    remote = ["--url", gateway.url, "--model", "minilm", *data]
    root = samples.write_repo(tmp_path / "demo")
    done = _cli("index", str(root), *remote, "--concurrency", "2")
    assert done.returncode == 0, done.stderr
    assert "indexed demo" in done.stderr and "6 file(s), 6 changed" in done.stderr

    found = _cli("search", "a user service that finds users by name", *remote, "--json", "-k", "2",
                 "--language", "typescript", "--repo", "demo")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert len(hits) == 2 and hits[0]["path"] == "web/users.ts" and hits[0]["symbol"].startswith("UserService")
    assert set(hits[0]) >= {"repo", "path", "language", "symbol", "start_line", "end_line", "score", "text"}

    table = _cli("search", "round to cents", *remote, "-k", "1")
    assert table.returncode == 0 and "billing/payments.py:8" in table.stdout and "round_cents" in table.stdout
    status = _cli("status", *data)
    assert status.returncode == 0 and "demo" in status.stdout and "typescript" in status.stdout

    legacy = QdrantClient(path=str(tmp_path / "legacy" / "qdrant"))  # an index an older embedfleet built
    legacy.create_collection("codesearch", vectors_config=models.VectorParams(size=384,
                                                                              distance=models.Distance.COSINE))
    legacy.close()
    for args, message in (
        (["search", "x", "--url", gateway.url, "--model", "minilm", "--data-dir", str(tmp_path / "legacy")],
         "built by an older embedfleet"),
        (["index", str(tmp_path / "missing"), *remote], "is not a folder"),
        (["index", str(root), "--url", "http://127.0.0.1:9", *data], "ConnectError"),
        (["index", "https://127.0.0.1:9/nothing.git", *remote], "git could not fetch"),
        (["search", "x", "--rerank", *data], "--rerank without --url needs --reranker"),
        (["index", str(root), "--overlap-lines", "50", *remote], "overlap_lines"),
    ):
        failed = _cli(*args)
        assert failed.returncode == 2 and message in failed.stderr, (args, failed.stderr)


def test_cli_starts_its_own_service_by_default(tmp_path: Path, tiny_models: dict[str, Path],
                                               data_dir: Path) -> None:
    """No --url: `embedfleet serve` is started on a free port (with a reranker when one is given) and stopped."""
    root = samples.write_repo(tmp_path / "demo")
    local = ["--data-dir", str(tmp_path / "data"), "--replicas", "1"]
    env = {"EMBEDFLEET_FLEET_DATA_DIR": str(data_dir)}  # the session's exported ONNX graphs
    done = _cli("index", str(root), *local, env=env)
    assert done.returncode == 0 and "6 changed" in done.stderr, done.stderr
    found = _cli("search", "round to cents", *local, "--reranker", str(tiny_models["reranker"]), "--rerank",
                 "--json", "-k", "3", env=env)
    assert found.returncode == 0, found.stderr
    assert len(json.loads(found.stdout)) == 3 and "embedding service at http://127.0.0.1:" in found.stderr
    assert (tmp_path / "data" / "cache").is_dir()  # the local service's gateway cache lives in the data dir
