"""A real gateway in front of a default-model worker (the session's) and a tiny random reranker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import GatewayProcess, WorkerProcess


@pytest.fixture(scope="package")
def reranker(start_worker: object, tiny_models: dict[str, Path]) -> WorkerProcess:
    """A tiny random reranker (mechanics only: its scores mean nothing)."""
    return start_worker("--model", str(tiny_models["reranker"]))  # type: ignore[operator, no-any-return]


@pytest.fixture(scope="package")
def gateway(worker: WorkerProcess, reranker: WorkerProcess,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Pools ``minilm`` (the default model) and ``ranker``, with an in-memory cache."""
    log_dir = tmp_path_factory.mktemp("codesearch-gateway")
    proc = GatewayProcess(["--upstream", f"minilm={worker.url}", "--upstream", f"ranker={reranker.url}",
                           "--cache", "memory://"], log_dir, log_dir)
    with proc:
        yield proc
