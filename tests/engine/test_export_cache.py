"""Cached ONNX graphs are keyed by what they depend on: the model, the export settings and the exporter."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedfleet.engine.backends import onnx_backend
from embedfleet.engine.model import inspect


@pytest.mark.slow
def test_a_changed_exporter_never_reuses_a_cached_graph(tiny_models: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    info = inspect(str(tiny_models["cls"]))
    onnx_backend.exporter_fingerprint.cache_clear()
    try:
        first = onnx_backend.prepare(info, tmp_path, optimize=False)
        assert onnx_backend.exporter_fingerprint() in first.name
        assert onnx_backend.prepare(info, tmp_path, optimize=False) == first  # same exporter: reused
        monkeypatch.setattr(torch, "__version__", "0.0.0+another-exporter")
        onnx_backend.exporter_fingerprint.cache_clear()
        second = onnx_backend.prepare(info, tmp_path, optimize=False)
        assert second != first and second.exists() and first.exists()
    finally:
        onnx_backend.exporter_fingerprint.cache_clear()
