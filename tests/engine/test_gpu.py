"""CUDA paths (run with -m gpu on a CUDA machine; skipped cleanly elsewhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedfleet.engine.backends import create_backend
from embedfleet.engine.backends.base import Output, PaddedBatch
from embedfleet.engine.model import inspect
from embedfleet.engine.tokenization import Tokenization

pytestmark = pytest.mark.gpu

TEXTS = ["The cat sits on the mat.", "GPU inference in half precision", " ".join(["long"] * 200)]


def _run(backend: object, texts: list[str]) -> np.ndarray:
    info = inspect("default")
    tok = Tokenization(info.path, info.max_input_length)
    out = backend.forward(PaddedBatch.from_encoded(tok.encode(texts, truncate=True)), Output.POOLED)  # type: ignore[attr-defined]
    return out / np.linalg.norm(out, axis=1, keepdims=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_cuda_half_precision_matches_fp32(dtype: str, tmp_path: Path) -> None:
    info = inspect("default")
    fp32 = create_backend(info, "torch", "cpu", tmp_path)
    half = create_backend(info, "torch", "cuda", tmp_path, dtype=dtype)
    assert half.dtype == dtype and half.device == "cuda"
    cos = (_run(fp32, TEXTS) * _run(half, TEXTS)).sum(axis=1)
    assert cos.min() >= 0.999


def test_auto_backend_on_cuda_is_torch_fp16(tmp_path: Path) -> None:
    backend = create_backend(inspect("default"), "auto", "auto", tmp_path)
    assert (backend.name, backend.device, backend.dtype) == ("torch", "cuda", "float16")


@pytest.mark.slow
def test_worker_on_cuda(start_worker: object) -> None:
    w = start_worker("--device", "cuda")  # type: ignore[operator]
    info = w.get("/info").json()
    assert (info["backend"], info["model_dtype"]) == ("torch", "float16")
    r = w.post("/embed", {"inputs": TEXTS, "truncate": True})
    assert r.status_code == 200 and r.headers["x-compute-type"] == "gpu"
