"""Reranker, classifier and SPLADE workers on tiny local models, checked against transformers directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import WorkerProcess, validate_schema

pytestmark = pytest.mark.slow


def _hf(folder: Path, kind: str) -> tuple[object, object]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    cls = transformers.AutoModelForSequenceClassification if kind == "seq" else transformers.AutoModelForMaskedLM
    return tok, cls.from_pretrained(str(folder)).eval()


def test_rerank_matches_transformers(start_worker: object, tiny_models: dict[str, Path]) -> None:
    w: WorkerProcess = start_worker("--model", str(tiny_models["reranker"]))  # type: ignore[operator]
    query, texts = "what is deep learning", ["Deep learning is a kind of ML.", "Cheese is tasty.", "Neural nets"]
    r = w.post("/rerank", {"query": query, "texts": texts, "return_text": True})
    assert r.status_code == 200
    validate_schema(r.json(), "RerankResponse")
    tok, model = _hf(tiny_models["reranker"], "seq")
    with torch.no_grad():
        logits = model(**tok([query] * 3, texts, return_tensors="pt", padding=True)).logits[:, 0]  # type: ignore[operator]
    expected = torch.sigmoid(logits).numpy()
    ranks = r.json()
    assert [x["score"] for x in ranks] == sorted((x["score"] for x in ranks), reverse=True)
    for x in ranks:
        assert abs(x["score"] - expected[x["index"]]) < 1e-4
        assert x["text"] == texts[x["index"]]
    raw = w.post("/rerank", {"query": query, "texts": texts, "raw_scores": True}).json()
    assert all("text" not in x for x in raw)
    assert all(abs(x["score"] - float(logits[x["index"]])) < 1e-4 for x in raw)
    assert w.get("/info").json()["model_type"]["reranker"]["id2label"] == {"0": "LABEL_0"}
    wrong = w.post("/embed", {"inputs": "a"})
    assert wrong.status_code == 424 and wrong.json()["error_type"] == "Backend"


def test_predict_classifier(start_worker: object, tiny_models: dict[str, Path]) -> None:
    w: WorkerProcess = start_worker("--model", str(tiny_models["classifier"]))  # type: ignore[operator]
    single = w.post("/predict", {"inputs": "I love it"})
    assert single.status_code == 200
    validate_schema(single.json(), "PredictResponse")
    assert {p["label"] for p in single.json()} == {"negative", "neutral", "positive"}
    assert abs(sum(p["score"] for p in single.json()) - 1.0) < 1e-5
    batch = w.post("/predict", {"inputs": [["I love it"], ["premise", "hypothesis"]]}).json()
    assert len(batch) == 2 and batch[0] == single.json()
    tok, model = _hf(tiny_models["classifier"], "seq")
    with torch.no_grad():
        probs = torch.softmax(model(**tok("premise", "hypothesis", return_tensors="pt")).logits[0], -1)  # type: ignore[operator]
    got = {p["label"]: p["score"] for p in batch[1]}
    assert abs(got["positive"] - float(probs[2])) < 1e-4
    assert w.post("/rerank", {"query": "a", "texts": ["b"]}).status_code == 424
    assert w.post("/predict", {"inputs": ["a", "b", "c"]}).status_code == 422


def test_sparse_matches_splade_formula(start_worker: object, tiny_models: dict[str, Path]) -> None:
    # Exact float32: the test compares the nonzero indices with the formula's.
    w: WorkerProcess = start_worker("--model", str(tiny_models["splade"]), "--dtype", "float32")  # type: ignore[operator]
    texts = ["sparse retrieval with splade", "hello"]
    r = w.post("/embed_sparse", {"inputs": texts})
    assert r.status_code == 200
    validate_schema(r.json(), "EmbedSparseResponse")
    tok, model = _hf(tiny_models["splade"], "mlm")
    for text, got in zip(texts, r.json(), strict=True):
        with torch.no_grad():
            logits = model(**tok(text, return_tensors="pt")).logits[0]  # type: ignore[operator]
        expected = torch.log1p(torch.relu(logits)).max(dim=0).values.numpy()
        assert got, "a SPLADE vector has non-zero entries"
        assert [x["index"] for x in got] == np.flatnonzero(expected > 0).tolist()
        assert np.allclose([x["value"] for x in got], expected[expected > 0], atol=1e-4)
    assert w.get("/info").json()["model_type"] == {"embedding": {"pooling": "splade"}}
    assert w.post("/embed", {"inputs": "a"}).status_code == 424  # normalize=true is not defined for SPLADE
    dense = w.post("/embed", {"inputs": "hello", "normalize": False})
    assert dense.status_code == 200 and len(dense.json()[0]) == 30522
    assert w.post("/embed_all", {"inputs": "a"}).status_code == 424
