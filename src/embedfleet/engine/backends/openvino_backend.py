"""OpenVINO backend, the default on CPU.

It runs the plain ONNX export that the onnx backend also makes (and caches): onnxruntime's fused graph uses
contrib operators OpenVINO does not read. Compiled models are cached by OpenVINO itself under
``<data_dir>/openvino``, so a restart loads the compiled blob instead of compiling again.

Streams: OpenVINO splits the threads into ``streams`` independent streams, each running its own infer
request. One single-thread stream per core is the default, because small batches do not scale across threads
(measured in the README's worker section). The batcher runs one batch per stream at once (:attr:`Backend.streams`).

Precision is OpenVINO's inference precision hint: ``f32`` computes in fp32 throughout; ``bf16`` runs the
matrix multiplications in bf16 (AMX or AVX512-BF16 where the CPU has them) and keeps fp32 where accuracy
needs it (softmax, normalisation).
"""

from __future__ import annotations

import logging
import queue
from pathlib import Path
from typing import Any

import numpy as np

from embedfleet.config import usable_cpus
from embedfleet.engine.backends.base import Backend, Output, PaddedBatch
from embedfleet.engine.backends.onnx_backend import prepare
from embedfleet.engine.model import ModelError, ModelInfo, Task

log = logging.getLogger(__name__)

PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16"}
"""The dtypes this backend runs, as OpenVINO's inference precision hints."""

BATCH_TOKENS = {"float32": 1024, "bfloat16": 2048}
"""Padded tokens per batch at which OpenVINO runs fastest on CPU, per precision (all-MiniLM-L6-v2, 2 threads,
AMX: bf16 peaks between 800 and 1,700 tokens a batch and is ~20% slower at 3,200 and beyond; fp32 is flat
from 400 tokens on; the README's worker section)."""


def available() -> bool:
    """Whether the openvino package can be imported here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoBackend(Backend):
    """Runs the exported graph with OpenVINO on the CPU."""

    name = "openvino"

    def __init__(self, info: ModelInfo, cache_dir: Path, dtype: str = "float32", threads: int | None = None,
                 streams: int | None = None) -> None:
        if dtype not in PRECISION_HINTS:
            raise ModelError(f"the openvino backend runs {' or '.join(PRECISION_HINTS)}, not {dtype}")
        try:
            import openvino as ov
        except ImportError as exc:
            raise ModelError("the openvino backend needs the openvino package (pip install openvino)") from exc
        self.info = info
        self.device = "cpu"
        self.dtype = dtype
        path = prepare(info, cache_dir, optimize=False)
        total = threads or usable_cpus()
        streams = max(1, min(streams or total, total))
        core = ov.Core()
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[dtype],
            "NUM_STREAMS": streams,
            "INFERENCE_NUM_THREADS": total,
            # Pinning would put every worker of a fleet (one per core, each single-threaded) on the same cores.
            "ENABLE_CPU_PINNING": False,
            # One cache folder per precision, threads and streams: with a shared folder, OpenVINO 2026.4 loads
            # a bf16 model compiled after an f32 one of the same graph as NaNs (reproduced in tests/engine).
            "CACHE_DIR": str(cache_dir / "openvino" / f"{dtype}-t{total}-s{streams}"),
        }
        try:
            self.compiled = core.compile_model(str(path), "CPU", config)
        except RuntimeError as exc:
            raise ModelError(f"OpenVINO cannot compile {info.model_id}: {exc}") from exc
        # What OpenVINO compiled, which may be fewer streams than asked (it caps them by the cores it sees).
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()  # one per stream, each used by one thread
        for _ in range(self.streams):
            self._requests.put(self.compiled.create_infer_request())
        self._inputs = {port.get_any_name() for port in self.compiled.inputs}
        self._outputs = [port.get_any_name() for port in self.compiled.outputs]
        self.path = path
        log.info("openvino graph %s (%s, %d threads in %d streams)", path, PRECISION_HINTS[dtype], total,
                 self.streams)

    @property
    def preferred_batch_tokens(self) -> int | None:
        """:data:`BATCH_TOKENS` of this precision."""
        return BATCH_TOKENS[self.dtype]

    def forward(self, batch: PaddedBatch, output: Output) -> np.ndarray:
        """One forward pass on a free stream (OpenVINO releases the GIL while it runs)."""
        feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = batch.token_type_ids
        if output is Output.TOKENS:
            name = "token_embeddings"
        elif output is Output.POOLED and self.info.task is Task.EMBEDDING:
            name = "sentence_embedding"
        else:
            name = self._outputs[-1]
        request = self._requests.get()  # never waits: the batcher runs at most `streams` passes at once
        try:
            result = request.infer(feed)
            # The request reuses its output buffers on the next call: copy out.
            return np.array(result[self.compiled.output(name)], dtype=np.float32, copy=True)
        finally:
            self._requests.put(request)
