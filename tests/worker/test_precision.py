"""A worker started with no precision flags (``--dtype auto``): what it chose is in /info and the start-up log,
and its vectors stay within the accuracy gate of sentence-transformers' fp32 ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedfleet.config import usable_cpus
from embedfleet.engine.backends.choice import GATE_MIN_COSINE, native_bf16
from tests.helpers import WorkerProcess

pytestmark = pytest.mark.slow

TEXTS = ["The cat sits on the mat.", "def f(x):\n    return x * 2", "Quarterly revenue grew by ten percent.", "x",
         "Die Katze sitzt auf der Matte. " * 20]


def test_default_worker_reports_and_keeps_its_precision(start_worker: object, default_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    w: WorkerProcess = start_worker("--model", "default")  # type: ignore[operator]
    info = w.get("/info").json()
    if native_bf16():
        assert (info["backend"], info["model_dtype"]) == ("openvino", "bfloat16")
        assert "accuracy gate: min cosine" in info["backend_selection"]
    else:
        assert info["model_dtype"] == "float32" and info["backend"] in ("onnx", "openvino")
    assert info["quantization"] is None
    assert info["backend_selection"] in w.log()  # the start-up line says the same
    if info["backend"] == "openvino":  # one single-thread stream per core, each running its own batches
        assert info["inference_streams"] == usable_cpus()
    assert f"streams={info['inference_streams']}" in w.log()

    got = np.array(w.post("/embed", {"inputs": TEXTS}).json(), dtype=np.float32)
    ref = SentenceTransformer(str(default_path), device="cpu").encode(TEXTS, normalize_embeddings=True)
    assert (got * ref).sum(axis=1).min() >= GATE_MIN_COSINE


def test_streams_flag_reaches_openvino(start_worker: object) -> None:
    w: WorkerProcess = start_worker("--model", "default", "--backend", "openvino", "--dtype", "float32",  # type: ignore[operator]
                                    "--threads", "2", "--streams", "1")
    info = w.get("/info").json()
    assert (info["backend"], info["inference_streams"]) == ("openvino", 1)
    assert len(w.post("/embed", {"inputs": TEXTS}).json()) == len(TEXTS)


def test_quantized_worker_reports_int8(start_worker: object) -> None:
    w: WorkerProcess = start_worker("--model", "default", "--quantize", "int8")  # type: ignore[operator]
    info = w.get("/info").json()
    assert (info["backend"], info["model_dtype"], info["quantization"]) == ("onnx", "int8", "int8")
    assert info["backend_selection"] == "--quantize int8"
