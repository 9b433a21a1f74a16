"""Several model pools behind one gateway: routing by task, model field, X-Model and path prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import GatewayProcess, WorkerProcess

pytestmark = pytest.mark.slow


def test_routing_between_an_embedder_and_a_reranker(start_worker: object, tiny_models: dict[str, Path],
                                                    tmp_path: Path) -> None:
    embedder: WorkerProcess = start_worker()  # type: ignore[operator]
    reranker: WorkerProcess = start_worker("--model", str(tiny_models["reranker"]))  # type: ignore[operator]
    g = GatewayProcess(["--upstream", f"minilm={embedder.url}", "--upstream", f"ranker={reranker.url}",
                        "--cache", "memory://"], tmp_path, tmp_path).start()
    try:
        # By task, no model named.
        assert len(g.post("/embed", {"inputs": "a"}).json()[0]) == 384
        ranks = g.post("/rerank", {"query": "q", "texts": ["a", "b"]})
        assert ranks.status_code == 200 and {r["index"] for r in ranks.json()} == {0, 1}
        # By name: header, path prefix, OpenAI model field (pool name or model id).
        assert g.post("/embed", {"inputs": "a"}, headers={"x-model": "ranker"}).status_code == 424
        assert g.post("/models/minilm/embed", {"inputs": "a"}).status_code == 200
        assert g.post("/models/ranker/rerank", {"query": "q", "texts": ["a"]}).status_code == 200
        by_id = g.post("/v1/embeddings", {"input": "a", "model": "sentence-transformers/all-MiniLM-L6-v2"})
        assert by_id.status_code == 200 and by_id.json()["model"] == "minilm"
        # Unknown names: 404 with the served models.
        unknown = g.post("/embed", {"inputs": "a"}, headers={"x-model": "nope"})
        assert unknown.status_code == 404 and "minilm, ranker" in unknown.json()["error"]
        assert g.post("/models/nope/embed", {"inputs": "a"}).status_code == 404
        assert g.post("/embed_sparse", {"inputs": "a"}).status_code == 404  # nobody serves SPLADE
        models = g.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["minilm", "ranker"]
        assert g.get("/models/ranker/info").json()["model_type"]["reranker"]["id2label"] == {"0": "LABEL_0"}
        stats = g.get("/cache/stats").json()["models"]
        assert stats["minilm"]["misses"] >= 1
    finally:
        g.stop()
