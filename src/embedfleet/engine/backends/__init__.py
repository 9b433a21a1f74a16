"""Inference backends: one class per runtime behind :class:`Backend`."""

from __future__ import annotations

from pathlib import Path

from embedfleet.config import normalize_device
from embedfleet.engine.backends.base import Backend, Output, PaddedBatch
from embedfleet.engine.model import ModelError, ModelInfo

__all__ = ["Backend", "Output", "PaddedBatch", "create_backend", "resolve_device"]


def resolve_device(device: str) -> str:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; other devices in their canonical form."""
    try:
        device = normalize_device(device, auto=True)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def create_backend(info: ModelInfo, backend: str, device: str, cache_dir: Path, dtype: str | None = None,
                   threads: int | None = None, quantize: str | None = None) -> Backend:
    """Build the backend asked for; ``auto`` is onnx on CPU and torch on CUDA."""
    device = resolve_device(device)
    if backend == "auto":
        backend = "torch" if device.startswith("cuda") else "onnx"
    if quantize and backend != "onnx":
        raise ModelError("--quantize applies to the onnx backend only")
    if backend == "onnx":
        from embedfleet.engine.backends.onnx_backend import OnnxBackend

        return OnnxBackend(info, cache_dir, device=device, threads=threads, quantize=quantize, dtype=dtype)
    if backend == "torch":
        from embedfleet.engine.backends.torch_backend import TorchBackend

        return TorchBackend(info, device=device, dtype=dtype, threads=threads)
    raise ModelError(f"backend {backend!r} is not supported (auto, onnx, torch)")
