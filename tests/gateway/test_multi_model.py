"""Several model pools behind one gateway: routing by task, model field, X-Model and path prefix, and the
cache kept per model."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.gateway.support import gateway_key, wait_until_stored
from tests.helpers import GatewayProcess, WorkerProcess

pytestmark = pytest.mark.slow

ADMIN = "multi-model-admin"


@pytest.fixture(scope="module")
def embedder(start_worker: object) -> WorkerProcess:
    """The default model (all-MiniLM-L6-v2, 384 dimensions)."""
    return start_worker()  # type: ignore[operator, no-any-return]


@pytest.fixture(scope="module")
def reranker(start_worker: object, tiny_models: dict[str, Path]) -> WorkerProcess:
    """A tiny random reranker (a sequence-classification head with one label)."""
    return start_worker("--model", str(tiny_models["reranker"]))  # type: ignore[operator, no-any-return]


def _gateway(log_dir: Path, pools: dict[str, WorkerProcess], *extra: str) -> GatewayProcess:
    """A gateway with one pool per name, in the order given."""
    args = [a for name, w in pools.items() for a in ("--upstream", f"{name}={w.url}")]
    g = GatewayProcess([*args, *extra], log_dir, log_dir)
    g.start()
    return g


def test_routing_between_an_embedder_and_a_reranker(embedder: WorkerProcess, reranker: WorkerProcess,
                                                    tmp_path: Path) -> None:
    g = _gateway(tmp_path, {"minilm": embedder, "ranker": reranker}, "--cache", "memory://")
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


@pytest.fixture(scope="module")
def splade(start_worker: object, tiny_models: dict[str, Path]) -> WorkerProcess:
    """A tiny random SPLADE model (a masked-LM head)."""
    return start_worker("--model", str(tiny_models["splade"]))  # type: ignore[operator, no-any-return]


@pytest.fixture(scope="module")
def classifier(start_worker: object, tiny_models: dict[str, Path]) -> WorkerProcess:
    """A tiny random classifier with three labels."""
    return start_worker("--model", str(tiny_models["classifier"]))  # type: ignore[operator, no-any-return]


def _calls(pools: dict[str, WorkerProcess]) -> dict[tuple[str, str], float]:
    """Requests each pool's worker has received, per task route."""
    return {(name, method): w.metric("te_request_count_total", method=method)
            for name, w in pools.items() for method in ("embed", "embed_sparse", "rerank", "predict")}


def test_sparse_and_predict_go_to_their_pools_without_a_model_named(
        embedder: WorkerProcess, reranker: WorkerProcess, splade: WorkerProcess, classifier: WorkerProcess,
        tmp_path: Path) -> None:
    pools = {"minilm": embedder, "splade": splade, "classes": classifier, "ranker": reranker}
    g = _gateway(tmp_path, pools, "--cache", "memory://")
    try:
        before = _calls(pools)
        sparse = g.post("/embed_sparse", {"inputs": ["a sparse text", "another"]})
        assert sparse.status_code == 200, sparse.text
        assert len(sparse.json()) == 2
        assert all(set(pair) == {"index", "value"} and 0 <= pair["index"] < 30522
                   for row in sparse.json() for pair in row)
        predicted = g.post("/predict", {"inputs": "a text to classify"})
        assert predicted.status_code == 200, predicted.text
        assert {p["label"] for p in predicted.json()} == {"negative", "neutral", "positive"}  # the classifier's
        assert len(g.post("/embed", {"inputs": "dense"}).json()[0]) == 384
        assert g.post("/rerank", {"query": "q", "texts": ["a"]}).status_code == 200
        after = _calls(pools)
        grown = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        assert grown == {("splade", "embed_sparse"): 1, ("classes", "predict"): 1, ("minilm", "embed"): 1,
                         ("ranker", "rerank"): 1}
    finally:
        g.stop()


def test_predict_prefers_the_classifier_to_a_reranker_listed_first(
        embedder: WorkerProcess, reranker: WorkerProcess, classifier: WorkerProcess, tmp_path: Path) -> None:
    pools = {"minilm": embedder, "ranker": reranker, "classes": classifier}
    g = _gateway(tmp_path, pools, "--cache", "memory://")
    try:
        before = _calls(pools)
        predicted = g.post("/predict", {"inputs": "a text to classify"})
        assert predicted.status_code == 200, predicted.text
        assert {p["label"] for p in predicted.json()} == {"negative", "neutral", "positive"}
        after = _calls(pools)
        assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {("classes", "predict"): 1}
    finally:
        g.stop()


def test_delete_cache_of_one_model_keeps_the_others(embedder: WorkerProcess, start_worker: object,
                                                   tiny_models: dict[str, Path], tmp_path: Path) -> None:
    tiny: WorkerProcess = start_worker("--model", str(tiny_models["cls"]))  # type: ignore[operator]
    store = f"lmdb://{tmp_path / 'cache'}"
    g = _gateway(tmp_path, {"minilm": embedder, "tiny": tiny}, "--cache", store, "--admin-key", ADMIN)
    texts = [f"kept per model {i}" for i in range(3)]
    try:
        for model in ("minilm", "tiny"):
            assert g.post("/embed", {"inputs": texts}, headers={"x-model": model}).headers["x-cache"] == "miss"
        # Both tiers hold both models before the delete (a write landing after it would undo it).
        wait_until_stored(store, [gateway_key(g, t, model=m) for m in ("minilm", "tiny") for t in texts])
        for model in ("minilm", "tiny"):
            assert g.post("/embed", {"inputs": texts}, headers={"x-model": model}).headers["x-cache"] == "hit"

        assert httpx.delete(f"{g.url}/cache", params={"model": "tiny"}).status_code == 401  # an admin route
        admin = {"authorization": f"Bearer {ADMIN}"}
        unknown = httpx.delete(f"{g.url}/cache", params={"model": "nobody"}, headers=admin)
        assert unknown.status_code == 404
        deleted = httpx.delete(f"{g.url}/cache", params={"model": "tiny"}, headers=admin)
        assert deleted.status_code == 200 and deleted.json() == {"deleted": 3}

        before = {name: w.metric("te_embed_count_total") for name, w in (("minilm", embedder), ("tiny", tiny))}
        kept = g.post("/embed", {"inputs": texts}, headers={"x-model": "minilm"})
        assert kept.headers["x-cache"] == "hit"
        gone = g.post("/embed", {"inputs": texts}, headers={"x-model": "tiny"})
        assert gone.status_code == 200 and gone.headers["x-cache"] == "miss" and gone.headers["x-cache-misses"] == "3"
        assert embedder.metric("te_embed_count_total") == before["minilm"]  # answered by the cache
        assert tiny.metric("te_embed_count_total") == before["tiny"] + 3  # computed again
        store_models = g.get("/cache/stats").json()["store"]["models"]
        assert store_models["minilm"]["entries"] == 3
    finally:
        g.stop()
