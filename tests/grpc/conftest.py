"""gRPC fixtures: real workers and a real gateway serving gRPC (the client stubs: ``grpc_stubs`` in
tests/conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.helpers import GatewayProcess, WorkerProcess, free_port

MAX_MESSAGE = 64 * 1024 * 1024

def wait_grpc(target: str, timeout: float = 60.0, credentials: grpc.ChannelCredentials | None = None) -> None:
    """Poll until the gRPC port accepts a channel (with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
            return
        except grpc.FutureTimeoutError:
            assert time.monotonic() < deadline, f"gRPC on {target} never became ready"
        finally:
            channel.close()


class GrpcGateway(GatewayProcess):
    """A gateway serving gRPC on its own free port too."""

    def __init__(self, args: list[str], log_dir: Path) -> None:
        self.grpc_port = free_port()
        super().__init__([*args, "--grpc-port", str(self.grpc_port)], log_dir, log_dir)
        self.target = f"127.0.0.1:{self.grpc_port}"

    def channel(self) -> grpc.Channel:
        """A plaintext channel to the gateway's gRPC port."""
        return grpc.insecure_channel(self.target, options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                                           ("grpc.max_send_message_length", MAX_MESSAGE)])


@pytest.fixture(scope="session")
def embedders(start_worker: object, tiny_models: dict[str, Path]) -> list[WorkerProcess]:
    """Two replicas of a tiny CLS-pooling embedder (32 dimensions)."""
    return [start_worker("--model", str(tiny_models["cls"]), "--backend", "torch") for _ in range(2)]  # type: ignore[operator]


@pytest.fixture(scope="session")
def ranker(start_worker: object, tiny_models: dict[str, Path]) -> WorkerProcess:
    """A tiny reranker (it also serves /predict)."""
    return start_worker("--model", str(tiny_models["reranker"]), "--backend", "torch")  # type: ignore[operator, no-any-return]


@pytest.fixture(scope="session")
def splade(start_worker: object, tiny_models: dict[str, Path]) -> WorkerProcess:
    """A tiny SPLADE model."""
    return start_worker("--model", str(tiny_models["splade"]), "--backend", "torch")  # type: ignore[operator, no-any-return]


@pytest.fixture(scope="session")
def gateway(embedders: list[WorkerProcess], ranker: WorkerProcess, splade: WorkerProcess,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcGateway]:
    """Pools ``embed`` (two replicas), ``ranker`` and ``splade``, memory cache, gRPC on."""
    args = [*(a for w in embedders for a in ("--upstream", f"embed={w.url}")),
            "--upstream", f"ranker={ranker.url}", "--upstream", f"splade={splade.url}", "--cache", "memory://",
            "--arrow-max-rows", "20000"]
    g = GrpcGateway(args, tmp_path_factory.mktemp("grpc-gateway"))
    with g:
        wait_grpc(g.target)
        yield g
