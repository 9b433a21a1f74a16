"""The ``embedfleet`` command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from embedfleet import __version__
from embedfleet.config import ConfigError, FleetSettings, GatewaySettings, WorkerSettings

app = typer.Typer(help="embedfleet: self-hosted text-embedding serving.", no_args_is_help=True,
                  add_completion=False)
err = Console(stderr=True)
out = Console()


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
    max_batch_tokens: Annotated[int | None, typer.Option(
        help="Padded tokens per batch (512 for onnx on CPU, else 16384).")] = None,
    max_batch_requests: Annotated[int | None, typer.Option(help="Inputs per batch (32 on CPU, 256 on CUDA).")] = None,
    max_client_batch_size: Annotated[int | None, typer.Option(help="Inputs per request (32).")] = None,
    max_concurrent_requests: Annotated[int | None, typer.Option(help="Requests in flight before 429 (512).")] = None,
    auto_truncate: Annotated[bool | None, typer.Option("--auto-truncate/--no-auto-truncate",
                                                       help="Truncate over-long inputs by default.")] = None,
    tokenization_workers: Annotated[int | None, typer.Option(help="Tokenizer threads.")] = None,
    payload_limit: Annotated[int | None, typer.Option(help="Largest request body, bytes (2000000).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where exported models are cached.")] = None,
    exit_on_load_failure: Annotated[bool | None, typer.Option(
        "--exit-on-load-failure/--no-exit-on-load-failure",
        help="Exit (code 3) if the model fails to load, instead of answering 503.")] = None,
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
        gateway_app = build_gateway(settings).app
    except ValueError as exc:  # no upstream, a bad cache URL
        raise _fail(str(exc)) from None
    serve(gateway_app, settings)


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="Model to serve when the config declares no instances "
                                                  "(default: `default`, all-MiniLM-L6-v2).")] = None,
    replicas: Annotated[int | None, typer.Option(help="Workers of --model (default: one per GPU, "
                                                      "else one per CPU core).")] = None,
    devices: Annotated[str | None, typer.Option(help="Devices of --model's workers: `cpu` or GPU indices "
                                                     "such as 0,1 (default: every visible GPU, else cpu).")] = None,
    host: Annotated[str | None, typer.Option(help="Address of the gateway (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port of the gateway (default 8080).")] = None,
    cache: Annotated[str | None, typer.Option(help="Cache store URL (default: LMDB under "
                                                  "~/.local/share/embedfleet).")] = None,
    api_key: Annotated[list[str] | None, typer.Option(help="Accepted API key (repeat); none: no auth.")] = None,
    admin_key: Annotated[str | None, typer.Option(help="Key for /admin and DELETE /cache.")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Desired state and instance logs "
                                                        "(default ~/.local/share/embedfleet/fleet).")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config file ([fleet], [gateway] tables; "
                                                     "default ./embedfleet.toml if present).")] = None,
) -> None:
    """Serve everything: the gateway on :8080 and supervised workers on every GPU (or CPU core)."""
    try:
        fleet_settings = FleetSettings.load(config, table="fleet", model=model, replicas=replicas, devices=devices,
                                            state_dir=state_dir, log_level=log_level)
        gateway_settings = GatewaySettings.load(config, table="gateway", host=host, port=port, cache=cache,
                                                api_key=api_key, admin_key=admin_key, log_level=log_level)
    except (ConfigError, ValidationError) as exc:
        raise _fail(str(exc)) from None

    from embedfleet.fleet.serve import run_serve
    from embedfleet.fleet.state import StateLockedError
    from embedfleet.logging_setup import setup_logging

    setup_logging(fleet_settings.log_level, fleet_settings.log_format)
    try:
        code = run_serve(fleet_settings, gateway_settings)
    except (ConfigError, StateLockedError, ValueError) as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


instances_app = typer.Typer(help="Manage the instances of a running `embedfleet serve`.", no_args_is_help=True)
models_app = typer.Typer(help="Manage the models a running `embedfleet serve` knows.", no_args_is_help=True)
app.add_typer(instances_app, name="instances")
app.add_typer(models_app, name="models")

UrlOption = Annotated[str, typer.Option("--url", envvar="EMBEDFLEET_URL", help="The service's URL.")]
KeyOption = Annotated[str | None, typer.Option("--admin-key", envvar="EMBEDFLEET_ADMIN_KEY",
                                               help="Admin key, when the service has keys.")]
DEFAULT_URL = "http://127.0.0.1:8080"


def _admin(url: str, key: str | None, method: str, route: str, timeout: float | None = None,
           **kwargs: object) -> Any:
    from embedfleet.fleet.client import AdminClient, AdminError

    client = AdminClient(url, key)
    try:
        return client.call(method, route, timeout=timeout, **kwargs)
    except AdminError as exc:
        raise _fail(str(exc)) from None
    finally:
        client.close()


def _show_instances(instances: list[dict[str, Any]]) -> None:
    from embedfleet.fleet.client import instances_table

    out.print(instances_table(instances))


@app.command()
def status(url: UrlOption = DEFAULT_URL, admin_key: KeyOption = None) -> None:
    """The instances of a running service, as a table."""
    _show_instances(_admin(url, admin_key, "GET", "/instances")["instances"])


@instances_app.command("ls")
def instances_ls(url: UrlOption = DEFAULT_URL, admin_key: KeyOption = None) -> None:
    """List the instances."""
    _show_instances(_admin(url, admin_key, "GET", "/instances")["instances"])


@instances_app.command("add")
def instances_add(
    name: Annotated[str, typer.Argument(help="Instance name (NAME-0, NAME-1... with --replicas).")],
    model: Annotated[str | None, typer.Option(help="Local folder, Hugging Face id or `default`.")] = None,
    url_of: Annotated[str | None, typer.Option("--external-url", help="Register an external TEI-compatible "
                                                                       "server instead of a model.")] = None,
    served_name: Annotated[str | None, typer.Option(help="Model name clients use (default: the model).")] = None,
    revision: Annotated[str | None, typer.Option(help="Hugging Face revision.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or N.")] = None,
    replicas: Annotated[int, typer.Option(help="Workers to start.")] = 1,
    port: Annotated[int | None, typer.Option(help="Fixed port (replicas take the next ones).")] = None,
    backend: Annotated[str | None, typer.Option(help="auto, onnx or torch.")] = None,
    threads: Annotated[int | None, typer.Option(help="Threads per worker.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until they are running (or failed).")] = True,
    url: UrlOption = DEFAULT_URL,
    admin_key: KeyOption = None,
) -> None:
    """Add and start instances."""
    body = {k: v for k, v in {"name": name, "model": model, "url": url_of, "served_name": served_name,
                              "revision": revision, "device": device, "replicas": replicas, "port": port,
                              "backend": backend, "threads": threads}.items() if v is not None}
    result = _admin(url, admin_key, "POST", f"/instances?wait={str(wait).lower()}", timeout=900, json=body)
    _show_instances(result["instances"])


def _instance_action(action: str, name: str, url: str, key: str | None) -> None:
    route = f"/instances/{name}/{action}" + ("?wait=true" if action != "stop" else "")
    _show_instances([_admin(url, key, "POST", route, timeout=900)])


@instances_app.command("start")
def instances_start(name: str, url: UrlOption = DEFAULT_URL, admin_key: KeyOption = None) -> None:
    """Start a stopped or failed instance."""
    _instance_action("start", name, url, admin_key)


@instances_app.command("stop")
def instances_stop(name: str, url: UrlOption = DEFAULT_URL, admin_key: KeyOption = None) -> None:
    """Stop an instance; it stays stopped until started."""
    _instance_action("stop", name, url, admin_key)


@instances_app.command("restart")
def instances_restart(name: str, url: UrlOption = DEFAULT_URL, admin_key: KeyOption = None) -> None:
    """Restart an instance."""
    _instance_action("restart", name, url, admin_key)


@instances_app.command("rm")
def instances_rm(name: str, url: UrlOption = DEFAULT_URL, admin_key: KeyOption = None) -> None:
    """Stop an instance and forget it."""
    _admin(url, admin_key, "DELETE", f"/instances/{name}", timeout=120)
    out.print(f"removed {name}")


@instances_app.command("logs")
def instances_logs(name: str, tail: Annotated[int, typer.Option(help="Lines (at most 1000).")] = 100,
                   url: UrlOption = DEFAULT_URL, admin_key: KeyOption = None) -> None:
    """The last lines of an instance's log."""
    for line in _admin(url, admin_key, "GET", f"/instances/{name}/logs", params={"tail": tail})["lines"]:
        typer.echo(line)


def _show_models(models: list[dict[str, Any]]) -> None:
    from embedfleet.fleet.client import models_table

    out.print(models_table(models))


def _model_route(model: str) -> str:
    from urllib.parse import quote

    return f"/models/{quote(model, safe='')}"


@models_app.command("ls")
def models_ls(url: UrlOption = DEFAULT_URL, admin_key: KeyOption = None) -> None:
    """The models the service knows."""
    _show_models(_admin(url, admin_key, "GET", "/models")["models"])


@models_app.command("add")
def models_add(model: str, revision: Annotated[str | None, typer.Option()] = None, url: UrlOption = DEFAULT_URL,
               admin_key: KeyOption = None) -> None:
    """Register a model (a Hugging Face id or a local folder)."""
    _show_models([_admin(url, admin_key, "POST", "/models", json={"model": model, "revision": revision})])


@models_app.command("download")
def models_download(model: str, url: UrlOption = DEFAULT_URL, admin_key: KeyOption = None) -> None:
    """Download a model into the Hugging Face cache (waits for the outcome)."""
    _show_models([_admin(url, admin_key, "POST", f"{_model_route(model)}/download?wait=true", timeout=7200)])


@models_app.command("verify")
def models_verify(model: str, url: UrlOption = DEFAULT_URL, admin_key: KeyOption = None) -> None:
    """Load a model in a separate process, embed one text, and record what it is."""
    _show_models([_admin(url, admin_key, "POST", f"{_model_route(model)}/verify?wait=true", timeout=900)])


def main() -> None:  # pragma: no cover - console entry point
    """Entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
