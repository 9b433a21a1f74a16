"""Inference backends: one class per runtime behind :class:`Backend`."""

from __future__ import annotations

import logging
from pathlib import Path

from embedfleet.config import normalize_device
from embedfleet.engine.backends.base import Backend, Output, PaddedBatch
from embedfleet.engine.model import ModelError, ModelInfo

__all__ = ["Backend", "Output", "PaddedBatch", "create_backend", "resolve_device"]

log = logging.getLogger(__name__)


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
                   threads: int | None = None, quantize: str | None = None, streams: int | None = None) -> Backend:
    """Build the backend asked for, choosing what ``auto`` leaves open (:mod:`.choice`). The backend's
    ``selection`` says what was chosen and why (in /info and the start-up log)."""
    from embedfleet.engine.backends import choice as pick
    from embedfleet.engine.backends.openvino_backend import available

    device = resolve_device(device)
    chosen = pick.choose(device, backend, dtype or "auto", quantize, bf16=pick.native_bf16(), openvino=available())
    if chosen.gated:
        candidate = pick.build(chosen, info, device, cache_dir, threads, streams)
        cosine = pick.gate(candidate, info, device, cache_dir, threads, streams)
        if cosine >= pick.GATE_MIN_COSINE:
            candidate.selection = f"{chosen.reason} (accuracy gate: min cosine {cosine:.6f} to float32)"
            return candidate
        log.warning("%s %s disagrees with float32 on the probe texts (min cosine %.6f < %s): using float32",
                    candidate.name, candidate.dtype, cosine, pick.GATE_MIN_COSINE)
        chosen = pick.choose(device, backend, "float32", None, bf16=False, openvino=available())
        reason = f"auto: float32, as {candidate.dtype} failed the accuracy gate (min cosine {cosine:.6f})"
    else:
        reason = chosen.reason
    if chosen.backend == pick.FASTEST:
        built, raced = pick.fastest_fp32(info, cache_dir, threads, streams)
        reason = raced if reason == chosen.reason else f"{reason}; {raced}"
    else:
        built = pick.build(chosen, info, device, cache_dir, threads, streams)
    built.selection = reason
    return built
