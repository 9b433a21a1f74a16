"""The ``embedfleet`` command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from embedfleet import __version__
from embedfleet.config import ConfigError, GatewaySettings, WorkerSettings

app = typer.Typer(help="embedfleet: self-hosted text-embedding serving.", no_args_is_help=True,
                  add_completion=False)
err = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(2)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command()
def worker(
    model: Annotated[str | None, typer.Option(help="Local folder, Hugging Face id, or `default` "
                                                  "(all-MiniLM-L6-v2, bundled).")] = None,
    revision: Annotated[str | None, typer.Option(help="Hugging Face revision.")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Name reported to clients.")] = None,
    pooling: Annotated[str | None, typer.Option(help="Override pooling: mean, cls, last_token, splade.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8081).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    backend: Annotated[str | None, typer.Option(help="auto (onnx on CPU, torch on CUDA), onnx or torch.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, float16 or bfloat16 (torch).")] = None,
    threads: Annotated[int | None, typer.Option(help="Backend threads (default: all cores).")] = None,
    quantize: Annotated[str | None, typer.Option(help="int8: dynamic int8 quantization (onnx).")] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(help="Padded tokens per batch (16384).")] = None,
    max_batch_requests: Annotated[int | None, typer.Option(help="Inputs per batch (32 on CPU, 256 on CUDA).")] = None,
    max_client_batch_size: Annotated[int | None, typer.Option(help="Inputs per request (32).")] = None,
    max_concurrent_requests: Annotated[int | None, typer.Option(help="Requests in flight before 429 (512).")] = None,
    auto_truncate: Annotated[bool | None, typer.Option("--auto-truncate/--no-auto-truncate",
                                                       help="Truncate over-long inputs by default.")] = None,
    tokenization_workers: Annotated[int | None, typer.Option(help="Tokenizer threads.")] = None,
    payload_limit: Annotated[int | None, typer.Option(help="Largest request body, bytes (2000000).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where exported models are cached.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    log_format: Annotated[str | None, typer.Option(help="text or json.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config file (its [worker] table).")] = None,
) -> None:
    """Serve one model: text-embeddings-inference's API plus OpenAI's /v1/embeddings."""
    flags = {k: v for k, v in locals().items() if k != "config"}
    try:
        settings = WorkerSettings.load(config, table="worker", **flags)
    except (ConfigError, ValidationError) as exc:
        raise _fail(str(exc)) from None

    from embedfleet.logging_setup import setup_logging
    from embedfleet.worker.server import run_worker

    setup_logging(settings.log_level, settings.log_format)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # Before torch loads OpenMP: idle OpenMP threads would spin and starve the event loop and the
    # tokenizer (measured: torch bf16 over HTTP, long texts, 65 -> 118 embeddings/s on 2 cores).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    run_worker(settings)


@app.command()
def gateway(
    upstream: Annotated[list[str] | None, typer.Option(help="Worker or TEI URL; repeat for replicas.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8080).")] = None,
    cache: Annotated[str | None, typer.Option(help="lmdb://PATH (default, under ~/.local/share/embedfleet), "
                                                  "redis://HOST:PORT/DB, qdrant://HOST:PORT, "
                                                  "qdrant+local://PATH, memory:// or none.")] = None,
    memory_cache_bytes: Annotated[int | None, typer.Option(help="In-process LRU bound (256 MiB).")] = None,
    cache_ttl: Annotated[float | None, typer.Option(help="Entry lifetime in seconds (default: forever).")] = None,
    max_client_batch_size: Annotated[int | None, typer.Option(help="Inputs per request (2048).")] = None,
    payload_limit: Annotated[int | None, typer.Option(help="Largest request body, bytes.")] = None,
    upstream_timeout: Annotated[float | None, typer.Option(help="Seconds per upstream call (60).")] = None,
    health_interval: Annotated[float | None, typer.Option(help="Seconds between health checks (1).")] = None,
    store_timeout: Annotated[float | None, typer.Option(help="Cache reads slower than this miss (0.25).")] = None,
    api_key: Annotated[list[str] | None, typer.Option(help="Accepted API key (repeat); none: no auth.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="File with one API key per line.")] = None,
    admin_key: Annotated[str | None, typer.Option(help="Key for admin routes; unset: they are off.")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(help="Allow browsers from this origin (repeat); "
                                                                "default: no CORS.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: serve HTTPS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(help="CA bundle: require client certificates (mTLS).")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    log_format: Annotated[str | None, typer.Option(help="text or json.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config file (its [gateway] table).")] = None,
) -> None:
    """The caching, load-balancing entry point in front of workers (or TEI servers)."""
    flags = {k: v for k, v in locals().items() if k != "config"}
    try:
        settings = GatewaySettings.load(config, table="gateway", **flags)
    except (ConfigError, ValidationError) as exc:
        raise _fail(str(exc)) from None

    from embedfleet.gateway.server import build_gateway, serve
    from embedfleet.logging_setup import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    try:
        gateway_app = build_gateway(settings)
    except ValueError as exc:  # no upstream, a bad cache URL
        raise _fail(str(exc)) from None
    serve(gateway_app, settings)


def main() -> None:  # pragma: no cover - console entry point
    """Entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
