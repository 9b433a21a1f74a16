"""``embedfleet bench --mode grpc`` and ``--mode arrow`` against a real worker and a gateway serving gRPC.

The runs go through ``python -m embedfleet.cli bench`` in a subprocess: the bench's gRPC modes load
embedfleet's generated ``tei.v1`` messages, which this test process must never import (``grpc_stubs`` in
tests/conftest.py defines the same messages from the reference protos)."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from embedfleet.cli import app
from tests.grpc.conftest import GrpcGateway, wait_grpc
from tests.helpers import TlsFiles, WorkerProcess, free_port

pytestmark = pytest.mark.slow

QUICK = ["--warmup", "0", "--no-progress", "--concurrency", "4"]
KEY = "bench-grpc-key"


@pytest.fixture(scope="module")
def gateway(worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcGateway]:
    """One pool, ``embed`` (the default model), memory cache, gRPC on."""
    g = GrpcGateway(["--upstream", f"embed={worker.url}", "--cache", "memory://"], tmp_path_factory.mktemp("bg"))
    with g:
        wait_grpc(g.target)
        yield g


def bench(tmp_path: Path, url: str, *args: str, code: int = 0) -> dict[str, Any]:
    """Run ``embedfleet bench`` in a subprocess; its JSON document."""
    out = tmp_path / "bench.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "embedfleet.cli", "bench", url, *QUICK, "--json", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, timeout=120, env={**os.environ, "COLUMNS": "120"})
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == code, output
    doc: dict[str, Any] = orjson.loads(out.read_bytes())
    return doc


def test_grpc_mode_unary_and_streams(gateway: GrpcGateway, tmp_path: Path) -> None:
    url = f"grpc://{gateway.target}"
    png = tmp_path / "grpc.png"
    one = bench(tmp_path, url, "--mode", "grpc", "--hit-ratio", "1", "--hot-texts", "16", "--num-texts", "40",
                "--plot", str(png))
    assert (one["mode"], one["url"], one["num_requests"], one["successful"], one["errors"]) == ("grpc", url, 40, 40, {})
    assert 0 < one["latency_ms"]["p50"] <= one["latency_ms"]["max"] and one["embeddings_per_sec"] > 0
    assert one["cache_hit_ratio"] is None and one["x_cache"] == {}  # gRPC answers carry no cache counts
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    batched = bench(tmp_path, url, "--mode", "grpc", "--batch-size", "4", "--num-texts", "32", "--model", "embed")
    assert (batched["num_requests"], batched["successful"], batched["failed"]) == (8, 32, 0)  # 8 EmbedStream calls


def test_multiplexer_targets_and_grpc_errors(gateway: GrpcGateway, tmp_path: Path) -> None:
    url = f"grpc://{gateway.target}"
    for target in ("name=embed", "model=embed", "index=0"):
        doc = bench(tmp_path, url, "--mode", "grpc", "--target", target, "--batch-size", "2", "--num-texts", "8")
        assert (doc["target"], doc["successful"], doc["errors"]) == (target, 8, {}), target
    # Errors are counted by the name of their gRPC status code, never fatal.
    unknown = bench(tmp_path, url, "--mode", "grpc", "--target", "name=no-such-instance", "--num-texts", "5", code=1)
    assert unknown["errors"] == {"NOT_FOUND": 5} and (unknown["successful"], unknown["failed"]) == (0, 5)
    mixed = bench(tmp_path, url, "--mode", "arrow", "--target", "index=7", "--batch-size", "3", "--num-texts", "6",
                  code=1)
    assert mixed["errors"] == {"NOT_FOUND": 2} and mixed["failed"] == 6
    nobody = bench(tmp_path, f"grpc://127.0.0.1:{free_port()}", "--mode", "grpc", "--num-texts", "3", code=1)
    assert nobody["errors"] == {"UNAVAILABLE": 3}


def test_arrow_over_grpc_and_http_compared(gateway: GrpcGateway, tmp_path: Path) -> None:
    grpc_url = f"grpc://{gateway.target}"
    doc = bench(tmp_path, grpc_url, "--mode", "arrow", "--batch-size", "50", "--num-texts", "200",
                "--arrow-compression", "lz4", "--model", "embed", "--compare", gateway.url, "--rounds", "2")
    assert (doc["mode"], doc["arrow_compression"], doc["num_requests"], doc["successful"]) == ("arrow", "lz4", 4, 200)
    assert doc["errors"] == {} and doc["cache_hit_ratio"] is None
    http = doc["compare"]  # the HTTP twin, POST /embed_arrow, with the same batches
    assert (http["url"], http["successful"], http["errors"], http["rounds"]) == (gateway.url, 200, {}, 2)
    assert http["ratios_b_over_a"]["embeddings_per_sec"] > 0


def test_grpcs_with_mtls_and_api_key(worker: WorkerProcess, tmp_path: Path) -> None:
    files = TlsFiles.make(tmp_path, "bench@example.test")
    ca_file, client = files.ca_file, files.client
    g = GrpcGateway(["--upstream", worker.url, "--cache", "memory://", "--api-key", KEY, *files.server_args],
                    tmp_path)
    g.url = g.url.replace("http://", "https://")
    g.verify = ssl.create_default_context(cafile=str(ca_file))
    g.verify.load_cert_chain(str(client))
    url, tls = f"grpcs://{g.target}", ["--cacert", str(ca_file), "--cert", str(client)]  # --cert holds the key
    with g:
        ok = bench(tmp_path, url, "--mode", "grpc", *tls, "--api-key", KEY, "--num-texts", "6")
        assert (ok["successful"], ok["errors"]) == (6, {})
        arrow = bench(tmp_path, url, "--mode", "arrow", *tls, "--api-key", KEY, "--batch-size", "3", "--num-texts", "6")
        assert (arrow["successful"], arrow["errors"]) == (6, {})
        no_key = bench(tmp_path, url, "--mode", "grpc", *tls, "--num-texts", "4", code=1)
        assert no_key["errors"] == {"UNAUTHENTICATED": 4}
        no_cert = bench(tmp_path, url, "--mode", "grpc", "--cacert", str(ca_file), "--api-key", KEY, "--num-texts",
                        "4", code=1)
        assert no_cert["errors"] == {"UNAVAILABLE": 4}  # the handshake fails: no channel


@pytest.mark.parametrize(("args", "message"), [
    (["grpc://127.0.0.1:1", "--mode", "http"], "http://"),
    (["http://127.0.0.1:1", "--mode", "grpc"], "grpc://"),
    (["grpc://127.0.0.1", "--mode", "grpc"], "needs a port"),
    (["http://127.0.0.1:1", "--mode", "arrow", "--target", "index=0"], "--target needs a grpc"),
    (["grpc://127.0.0.1:1", "--mode", "grpc", "--target", "port=3"], "name=INSTANCE"),
    (["grpc://127.0.0.1:1", "--mode", "http", "--target", "index=0"], "--target is for"),
    (["grpcs://127.0.0.1:1", "--mode", "grpc", "--insecure"], "--insecure is not available"),
])
def test_bad_grpc_settings_are_clear_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["bench", *args, "--no-progress"], env={"COLUMNS": "200"})
    assert result.exit_code not in (0, 1) and message in " ".join(result.output.split()), result.output
    assert "embedfleet.grpc.proto.tei_pb2" not in sys.modules  # refused before any gRPC mode was made
