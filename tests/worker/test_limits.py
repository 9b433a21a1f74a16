"""The worker's default batch budget follows the backend: onnx on CPU runs ~512-token batches fastest."""

from __future__ import annotations

from pathlib import Path

from embedfleet.engine.backends import create_backend
from embedfleet.engine.infer import DEFAULT_BATCH_TOKENS
from embedfleet.engine.model import inspect
from embedfleet.worker.server import default_batch_tokens


def test_default_batch_tokens_per_backend(data_dir: Path) -> None:
    info = inspect("default")
    onnx = create_backend(info, "onnx", "cpu", data_dir, threads=1)
    torch = create_backend(info, "torch", "cpu", data_dir, threads=1)
    assert onnx.preferred_batch_tokens == 512 and torch.preferred_batch_tokens is None
    assert default_batch_tokens(onnx, info.max_input_length) == 512
    assert default_batch_tokens(torch, info.max_input_length) == DEFAULT_BATCH_TOKENS == 16384
    # A long-context model: one input of its maximum length always fits a batch.
    assert default_batch_tokens(onnx, 8192) == 8192
