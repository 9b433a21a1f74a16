"""Check that a model loads and computes: ``python -m embedfleet.fleet.verify SPEC [--revision R]``.

The fleet runs this in a child process so that the serving process never holds a model's weights.
It loads the model the way a worker does (torch on the CPU, which skips the ONNX export: this is a
load-and-run check, not a benchmark), runs one input suited to the model's task, and prints ONE
JSON line: ``{"ok": true, "dimension", "task", "pooling", "max_input_length", "sha", "model_id",
"path", "seconds"}``, or ``{"ok": false, "error"}`` with exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from typing import Any

# Before torch is imported: idle OpenMP threads must not spin (see embedfleet.cli.worker).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import orjson


async def _check(spec: str, revision: str | None) -> dict[str, Any]:
    import asyncio

    import numpy as np

    from embedfleet.engine.backends import create_backend
    from embedfleet.engine.infer import DEFAULT_BATCH_TOKENS, Engine, Limits
    from embedfleet.engine.model import Task, inspect

    started = time.perf_counter()
    info = await asyncio.to_thread(inspect, spec, revision)
    # The data dir is unused by the torch backend; a folder that exists keeps create_backend's contract.
    backend = await asyncio.to_thread(partial(create_backend, info, "torch", "cpu", info.path, threads=1))
    await asyncio.to_thread(backend.warmup)
    # Every limit given: one request of one input, whatever the worker's defaults are.
    limits = Limits(max_batch_tokens=max(DEFAULT_BATCH_TOKENS, info.max_input_length), max_batch_requests=8,
                    max_client_batch_size=8, max_concurrent_requests=1, auto_truncate=True, tokenization_workers=1)
    engine = Engine(info, backend, limits)
    engine.start()
    try:
        values: list[np.ndarray]
        if info.task is Task.EMBEDDING:
            values = [await engine.embed(["hello world"])]
        elif info.task is Task.SPARSE:
            values = [v for _, v in await engine.embed_sparse(["hello world"])]
        elif info.task is Task.RERANKER:
            values = [await engine.rerank("what is the capital of France?", ["Paris is the capital of France."])]
        else:
            values = await engine.predict([("hello world", None)])
    finally:
        await engine.close()
    if not all(np.all(np.isfinite(v)) for v in values):
        raise ValueError("the model produced NaN or infinite outputs")
    return {
        "ok": True,
        "model_id": info.model_id,
        "task": info.task.value,
        "pooling": info.pooling.value if info.pooling else None,
        "dimension": info.dimension,
        "max_input_length": info.max_input_length,
        "sha": info.sha,
        "path": str(info.path),
        "seconds": round(time.perf_counter() - started, 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Verify one model; print the JSON result line; 0 when it works, 1 when it does not."""
    import asyncio

    parser = argparse.ArgumentParser(prog="python -m embedfleet.fleet.verify", description=__doc__)
    parser.add_argument("spec", help="local folder, Hugging Face id, or `default`")
    parser.add_argument("--revision", default=None, help="Hugging Face revision")
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(_check(args.spec, args.revision))
    except Exception as exc:
        from embedfleet.engine.model import ModelError

        message = str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}"
        result = {"ok": False, "error": message}
    # Libraries may print to stdout; the result is always the last line.
    sys.stdout.flush()
    sys.stdout.buffer.write(b"\n" + orjson.dumps(result) + b"\n")
    sys.stdout.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
