"""Run a worker: listen at once, load the model in a thread, then serve."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import uvicorn
from fastapi import FastAPI

from embedfleet.api.edge import freeze_startup_objects, server_config
from embedfleet.config import WorkerSettings
from embedfleet.engine.backends import create_backend, resolve_device
from embedfleet.engine.backends.base import Backend
from embedfleet.engine.infer import DEFAULT_BATCH_TOKENS, Engine, Limits
from embedfleet.engine.model import inspect
from embedfleet.worker.app import WorkerState, create_app

log = logging.getLogger("embedfleet.worker")


def default_batch_tokens(backend: Backend, max_input_length: int) -> int:
    """The padded-token budget of a batch when none is configured: what the backend runs fastest
    (:data:`DEFAULT_BATCH_TOKENS` where it has no preference), never below one input of the model's
    maximum length."""
    return max(backend.preferred_batch_tokens or DEFAULT_BATCH_TOKENS, max_input_length)


def build_engine(settings: WorkerSettings) -> Engine:
    """Inspect the model, build its backend and engine (blocking: seconds to minutes)."""
    info = inspect(settings.model, settings.revision, settings.pooling)
    backend = create_backend(info, settings.backend, settings.device, settings.data_dir, dtype=settings.dtype,
                             threads=settings.threads, quantize=settings.quantize,
                             streams=settings.streams)
    backend.warmup()
    max_batch_requests = settings.max_batch_requests or (256 if backend.device.startswith("cuda") else 32)
    limits = Limits(
        max_batch_tokens=settings.max_batch_tokens or default_batch_tokens(backend, info.max_input_length),
        max_batch_requests=max_batch_requests,
        max_client_batch_size=settings.max_client_batch_size,
        max_concurrent_requests=settings.max_concurrent_requests,
        auto_truncate=settings.auto_truncate,
        tokenization_workers=settings.tokenization_workers,
    )
    return Engine(info, backend, limits)


def summary(engine: Engine, settings: WorkerSettings, seconds: float) -> str:
    """The start-up line: what is served, where, on what."""
    i = engine.info
    b = engine.backend
    return (f"serving model={i.model_id} task={i.task.value} pooling={i.pooling.value if i.pooling else '-'} "
            f"dim={i.dimension} max_input_length={i.max_input_length} backend={b.name} device={b.device} "
            f"dtype={b.dtype} streams={b.streams} sha={i.sha[:12]} on http://{settings.host}:{settings.port} "
            f"(loaded in {seconds:.1f}s; {b.selection})")


def create_worker_app(settings: WorkerSettings) -> tuple[FastAPI, WorkerState]:
    """The ASGI app; the model loads in the background once the server starts."""
    state = WorkerState(settings.served_model_name, settings.payload_limit)
    state.compute_type = "gpu" if resolve_device(settings.device).startswith("cuda") else "cpu"
    loading: list[asyncio.Task[None]] = []

    async def load() -> None:
        started = time.perf_counter()
        try:
            engine = await asyncio.to_thread(build_engine, settings)
        except Exception as exc:
            state.error = f"model failed to load: {exc}"
            log.error("%s", state.error, exc_info=not isinstance(exc, (ValueError, OSError)))
            if settings.exit_on_load_failure:
                state.exit_code = 3
                if state.stop_server is not None:
                    state.stop_server()
            return
        engine.start()
        freeze_startup_objects()
        state.loaded(engine)
        log.info("%s", summary(engine, settings, time.perf_counter() - started))

    async def on_startup() -> None:
        log.info("loading %s (backend=%s device=%s); /health is 503 until ready", settings.model,
                 settings.backend, settings.device)
        loading.append(asyncio.get_running_loop().create_task(load()))

    async def on_shutdown() -> None:
        for task in loading:
            task.cancel()
        if state.engine is not None:
            await state.engine.close()

    return create_app(state, on_startup, on_shutdown), state


def run_worker(settings: WorkerSettings) -> None:
    """Serve until interrupted."""
    app, state = create_worker_app(settings)
    server = uvicorn.Server(server_config(app, settings.host, settings.port))
    state.stop_server = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.exit_code:
        sys.exit(state.exit_code)
