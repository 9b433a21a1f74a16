"""Which backend and precision a worker runs: ``--dtype auto`` chosen per machine, checked at load.

``auto`` (the default) means fp16 on CUDA (as TEI does); on CPUs with native bf16 (AMX or AVX512-BF16),
bf16 through OpenVINO; fp32 elsewhere, through whichever of OpenVINO and onnxruntime runs faster on this
machine (measured once, then remembered under the data dir). A precision chosen by ``auto`` below fp32 must
pass an accuracy gate at load: over a fixed set of varied probe texts, its minimum cosine to the same
backend in fp32 must be at least :data:`GATE_MIN_COSINE`, or the worker falls back to fp32 with a warning.
A precision asked for by name is used as asked.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedfleet.engine.backends.base import Backend, PaddedBatch
from embedfleet.engine.model import ModelError, ModelInfo
from embedfleet.engine.tokenization import Tokenization

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
"""CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic."""

GATE_MIN_COSINE = 0.999
"""The least a reduced precision chosen by ``auto`` must agree with fp32 (minimum cosine over the probes)."""

FASTEST = "fastest"
"""The backend of a :class:`Choice` that is measured at load: OpenVINO or onnxruntime, in fp32."""

PROBE_TEXTS = (
    "hello",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a: int, b: int) -> int:\n    return a + b",
    "SELECT id, name FROM users WHERE created_at > NOW() - INTERVAL '7 days' ORDER BY name;",
    "Die Katze sitzt auf der Matte und schaut aus dem Fenster.",
    "東京は日本の首都であり、世界最大の都市圏の一つです。",
    "Prix: 1 234,56 € (TVA 20 %), livraison le 12/03/2025.",
    "!!! ??? ... --- *** ### @@@",
    "3.14159 2.71828 1.41421 1.73205 0.57721 1.61803",
    "Embedding models map text to vectors so that similar meanings end up close together; retrieval "
    "systems index millions of such vectors and search them by cosine similarity. " * 4,
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin walked on the surface while "
    "Michael Collins orbited above in the command module Columbia.",
    "ERROR 2026-03-01T12:00:00Z worker-3 timeout after 30s (retrying 2/5) upstream=http://10.0.0.7:8081",
    "a",
    "Résumé of a naïve café owner's coöperation with the façade renovation.",
    "<html><body><h1>Title</h1><p>Paragraph with <a href='#'>a link</a>.</p></body></html>",
)
"""Varied texts (languages, code, numbers, markup, one word to a few hundred tokens) for the accuracy gate."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (empty where ``/proc/cpuinfo`` is not readable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AMX or AVX512-BF16)."""
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


@dataclass(frozen=True, slots=True)
class Choice:
    """A backend and dtype to build, and why."""

    backend: str  # onnx, openvino, torch, or FASTEST
    dtype: str  # float32, float16, bfloat16, int8
    reason: str
    gated: bool = False  # chosen by auto below fp32: checked against fp32 at load


def choose(device: str, backend: str, dtype: str, quantize: str | None, *, bf16: bool, openvino: bool) -> Choice:
    """The backend and dtype for ``--backend``/``--dtype``/``--quantize`` on ``device`` (``cpu`` or ``cuda[:N]``),
    on a CPU with (``bf16``) or without native bf16, with or without the openvino package. Pure: no I/O."""
    cuda = device.startswith("cuda")
    if quantize is not None:
        if backend not in ("auto", "onnx"):
            raise ModelError(f"--quantize {quantize} needs the onnx backend")
        if dtype not in ("auto", "float32"):
            raise ModelError(f"--quantize {quantize} quantizes the float32 graph; drop --dtype {dtype}")
        return Choice("onnx", quantize, f"--quantize {quantize}")
    if backend == "openvino" and cuda:
        raise ModelError("the openvino backend runs on the CPU; use --device cpu, or --backend torch on CUDA")
    if backend == "openvino" and not openvino:
        raise ModelError("the openvino backend needs the openvino package (pip install openvino)")
    if not cuda and dtype == "float16":
        raise ModelError("float16 is only supported on CUDA; use float32 or bfloat16 on CPU")
    if dtype == "auto":
        if cuda:
            return Choice("onnx", "float32", "auto: onnx runs float32") if backend == "onnx" else \
                Choice("torch", "float16", "auto: float16 on CUDA")
        if backend in ("auto", "openvino") and bf16 and openvino:
            return Choice("openvino", "bfloat16", "auto: bfloat16 on a CPU with native bf16", gated=True)
        dtype = "float32"
    if backend == "auto":
        if cuda:
            return Choice("torch", dtype, f"--dtype {dtype} on CUDA")
        if dtype == "bfloat16":
            return Choice("openvino" if openvino else "torch", dtype, "--dtype bfloat16 on CPU")
        if openvino:
            return Choice(FASTEST, "float32", "float32 on CPU: the faster of openvino and onnx here")
        return Choice("onnx", "float32", "float32 on CPU (openvino is not installed)")
    if backend == "onnx" and dtype != "float32":
        raise ModelError("the onnx backend runs float32 (use --quantize int8, or --backend openvino for bfloat16)")
    return Choice(backend, dtype, f"--backend {backend} --dtype {dtype}")


def build(choice: Choice, info: ModelInfo, device: str, cache_dir: Path, threads: int | None,
          streams: int | None = None) -> Backend:
    """The backend a choice names (not :data:`FASTEST`); ``streams`` applies to openvino."""
    if choice.backend == "onnx":
        from embedfleet.engine.backends.onnx_backend import OnnxBackend

        quantize = None if choice.dtype == "float32" else choice.dtype
        return OnnxBackend(info, cache_dir, device=device, threads=threads, quantize=quantize)
    if choice.backend == "openvino":
        from embedfleet.engine.backends.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(info, cache_dir, dtype=choice.dtype, threads=threads, streams=streams)
    if choice.backend == "torch":
        from embedfleet.engine.backends.torch_backend import TorchBackend

        return TorchBackend(info, device=device, dtype=choice.dtype, threads=threads)
    raise ModelError(f"backend {choice.backend!r} is not supported (auto, onnx, openvino, torch)")


def probe_batches(info: ModelInfo) -> list[PaddedBatch]:
    """:data:`PROBE_TEXTS`, tokenized (truncated to the model's maximum) and batched by length."""
    tokens = Tokenization(info.path, info.max_input_length).encode(PROBE_TEXTS, truncate=True)
    ordered = sorted(tokens, key=lambda e: e.length)
    return [PaddedBatch.from_encoded(ordered[i:i + 8]) for i in range(0, len(ordered), 8)]


def min_cosine(a: Backend, b: Backend, batches: list[PaddedBatch]) -> float:
    """The smallest cosine between the two backends' outputs on ``batches``: per input for vectors; over
    all inputs at once for a few logits per input (a reranker's single score has no per-input angle)."""
    output = a.default_output()
    x = np.concatenate([a.forward(batch, output) for batch in batches]).astype(np.float64)
    y = np.concatenate([b.forward(batch, output) for batch in batches]).astype(np.float64)
    if x.ndim == 1 or x.shape[-1] < 8:
        x, y = x.reshape(1, -1), y.reshape(1, -1)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-30)
    return float(cos.min())


def gate(candidate: Backend, info: ModelInfo, device: str, cache_dir: Path, threads: int | None,
         streams: int | None = None) -> float:
    """``candidate``'s minimum cosine over the probes to the same backend in fp32."""
    reference = build(Choice(candidate.name, "float32", "gate reference"), info, device, cache_dir, threads, streams)
    return min_cosine(candidate, reference, probe_batches(info))


def _race_key(info: ModelInfo, threads: int | None, streams: int | None) -> str:
    import onnxruntime
    import openvino

    h = hashlib.blake2b(digest_size=8)
    for part in (info.sha, info.task.value, platform.processor(), " ".join(sorted(cpu_flags())), str(os.cpu_count()),
                 onnxruntime.__version__, openvino.__version__, str(threads), f"streams={streams}"):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def _rate(backend: Backend, batches: list[PaddedBatch], rounds: int) -> float:
    """Inputs per second over ``rounds`` passes of ``batches`` on each of the backend's streams at once, as
    the batcher runs them (after one untimed pass)."""
    output = backend.default_output()

    def passes(n: int) -> None:
        for _ in range(n):
            for batch in batches:
                backend.forward(batch, output)

    with ThreadPoolExecutor(backend.streams) as pool:
        list(pool.map(passes, [1] * backend.streams))
        started = time.perf_counter()
        list(pool.map(passes, [rounds] * backend.streams))
    inputs = backend.streams * rounds * sum(int(b.input_ids.shape[0]) for b in batches)
    return inputs / (time.perf_counter() - started)


def race_batches(max_length: int) -> list[PaddedBatch]:
    """What the fp32 race runs: a batch of 32 short inputs and one of 32 long ones (random token ids; at most
    ``max_length`` tokens)."""
    from embedfleet.engine.tokenization import Encoded

    rng = np.random.default_rng(0)

    def batch(length: int) -> PaddedBatch:
        return PaddedBatch.from_encoded([Encoded(ids=rng.integers(1000, 2000, length, dtype=np.int64),
                                                 type_ids=np.zeros(length, dtype=np.int64), characters=0)
                                         for _ in range(32)])

    return [batch(min(24, max_length)), batch(min(192, max_length))]


def fastest_fp32(info: ModelInfo, cache_dir: Path, threads: int | None,
                 streams: int | None = None) -> tuple[Backend, str]:
    """OpenVINO or onnxruntime in fp32, whichever runs faster on this machine; returns it and why. Measured
    the first time (a few seconds), then remembered in ``<cache_dir>/choices`` for this model, CPU, thread
    count and runtime versions. Workers starting together wait for the first one's measurement."""
    from embedfleet.engine.backends.onnx_backend import file_lock

    folder = cache_dir / "choices"
    record = folder / f"{_race_key(info, threads, streams)}.json"
    with file_lock(folder / f"{record.stem}.lock"):
        try:
            known = json.loads(record.read_text())
            name, rates = str(known["backend"]), dict(known["rates"])
        except (OSError, ValueError, KeyError, TypeError):
            name, rates = "", {}
        if name in ("onnx", "openvino"):
            chosen = build(Choice(name, "float32", "race"), info, "cpu", cache_dir, threads, streams)
            return chosen, _why(name, rates, measured_now=False)
        contenders = {n: build(Choice(n, "float32", "race"), info, "cpu", cache_dir, threads, streams)
                      for n in ("openvino", "onnx")}
        batches = race_batches(info.max_input_length)
        rates = {n: 0.0 for n in contenders}
        for _ in range(2):  # alternating, so a burst of other load hits both
            for n, backend in contenders.items():
                rates[n] += _rate(backend, batches, rounds=2) / 2
        name = max(rates, key=lambda n: rates[n])
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"backend": name, "rates": rates}))
        os.replace(tmp, record)
        return contenders[name], _why(name, rates, measured_now=True)


def _why(name: str, rates: dict[str, float], measured_now: bool) -> str:
    figures = ", ".join(f"{n} {r:.0f}/s" for n, r in sorted(rates.items()))
    return f"float32 on CPU: {name} is the faster here ({figures}{'' if measured_now else ', measured earlier'})"
