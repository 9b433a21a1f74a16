"""Dense projection modules and last-token pooling, served by real workers on each backend, give the vectors
sentence-transformers computes in process from the same folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.engine import st_models
from tests.helpers import WorkerProcess

pytestmark = pytest.mark.slow

# Different lengths in one request, so one batch pads: last-token pooling must pick each input's own last token.
TEXTS = ["x", "The cat sits on the mat.", "Quarterly revenue grew by ten percent in the third quarter.", "a b"]


@pytest.fixture(scope="module")
def st_folders(tmp_path_factory: pytest.TempPathFactory, default_path: Path) -> dict[str, Path]:
    """Two tiny models in the hub's metadata format: mean pooling + Dense 32->16 (Tanh), and last-token pooling."""
    root = tmp_path_factory.mktemp("st-modules")
    base = st_models.tiny_bert(root / "base", default_path)
    return {
        "dense": st_models.to_hub_format(st_models.save_st(root / "dense", base, "mean", dense_out=16)),
        "last_token": st_models.to_hub_format(st_models.save_st(root / "last_token", base, "lasttoken")),
    }


@pytest.mark.parametrize("backend", ["onnx", "torch"])
@pytest.mark.parametrize("kind,modules,pooling,dimension", [
    ("dense", ["Transformer", "Pooling", "Dense"], "mean", 16),
    ("last_token", ["Transformer", "Pooling"], "last_token", 32),
], ids=["dense", "last_token"])
def test_served_vectors_equal_sentence_transformers(kind: str, modules: list[str], pooling: str, dimension: int,
                                                    backend: str, st_folders: dict[str, Path],
                                                    start_worker: object) -> None:
    from sentence_transformers import SentenceTransformer

    folder = st_folders[kind]
    st = SentenceTransformer(str(folder), device="cpu")
    assert [type(m).__name__ for m in st] == modules  # the reference really has the module under test
    ref = st.encode(TEXTS)  # no Normalize module: raw vectors
    w: WorkerProcess = start_worker("--model", str(folder), "--backend", backend,  # type: ignore[operator]
                                    "--device", "cpu")
    try:
        info = w.get("/info").json()
        assert (info["backend"], info["pooling"], info["dimension"]) == (backend, pooling, dimension)
        r = w.post("/embed", {"inputs": TEXTS, "normalize": False})
        assert r.status_code == 200, r.text
        got = np.array(r.json(), dtype=np.float32)
        assert got.shape == ref.shape == (len(TEXTS), dimension)
        cos = (got * ref).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.min() >= 0.9999, cos
        assert np.allclose(got, ref, rtol=0, atol=1e-4), np.abs(got - ref).max()
    finally:
        w.stop()
