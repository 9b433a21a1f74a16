"""The ``embedfleet`` command."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape

from embedfleet import __version__
from embedfleet.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_FILE,
    BenchSettings,
    CodesearchSettings,
    ConfigError,
    FleetSettings,
    GatewaySettings,
    Settings,
    WorkerSettings,
    flag_name,
    without_none,
)
from embedfleet.fleet.spec import WORKER_OPTIONS, InstanceRequest

# Plain click help: it wraps to the terminal without cutting option names, and shows `[worker]` as written
# (rich markup would take it for a style).
app = typer.Typer(help="embedfleet: self-hosted text-embedding serving.", no_args_is_help=True,
                  add_completion=False, rich_markup_mode=None)
err = Console(stderr=True)
out = Console()

SERVE_GATEWAY_OPTIONS = ("host", "port", "grpc_port", "cache", "api_key", "admin_key")
"""The gateway settings ``embedfleet serve`` takes as flags (the rest: ``[gateway]`` or the environment)."""


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(2)


def _help(model: type[BaseModel], name: str, flag: str, env: str | None) -> str:
    """A field's help: its description, environment variable and default, all from its definition."""
    info = model.model_fields[name]
    notes = [f"env var: {env}"] if env else []
    default = info.get_default(call_default_factory=True)
    if isinstance(default, bool):
        notes.append(f"default: {flag if default else '--no-' + flag[2:]}")
    elif default is not None and default != []:
        notes.append(f"default: {default}")
    return " ".join([info.description or "", f"[{'; '.join(notes)}]" if notes else ""]).strip()


def _option(model: type[BaseModel], name: str, env: str | None = None, alias: str | None = None,
            flag: str | None = None) -> inspect.Parameter:
    """The typer option of a field: ``--name`` (``--name/--no-name`` for a boolean, repeated for a list),
    or ``--alias`` (also the parameter's name), or ``--flag`` (the parameter keeps the field's name); its value
    None means "not given"."""
    value_type = without_none(model.model_fields[name].annotation)
    if get_origin(value_type) is Annotated:  # bounds: pydantic checks them
        value_type = get_args(value_type)[0]
    flag = flag_name(flag or alias or name)
    decl = f"{flag}/--no-{flag[2:]}" if value_type is bool else flag
    items = get_args(value_type) if get_origin(value_type) is list else ()
    option = typer.Option(decl, help=_help(model, name, flag, env), show_default=False,
                          metavar=f"<{items[0].__name__}>" if items else None)
    return inspect.Parameter(alias or name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[value_type | None, option])


def _derived(fn: Callable[..., None], command: Callable[..., None], params: list[inspect.Parameter],
             ) -> Callable[..., None]:
    """``command``, named and documented as ``fn``, with the signature typer reads its options from."""
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__, command.__qualname__, command.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return command


def settings_command(*parts: type[Settings] | tuple[type[Settings], Sequence[str]],
                     ) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Make ``fn(settings, ...)`` a command whose options are the settings' fields (all but the config file's
    own tables, or the names given with a class), plus ``--config``; ``fn`` gets one loaded settings object
    per class, and its own keyword-only options (``config``, if it takes it, is the config file given)."""
    classes = [p if isinstance(p, tuple) else (p, [n for n in p.model_fields if n not in p.file_only])
               for p in parts]
    owner = {name: i for i, (_, names) in enumerate(classes) for name in names}
    if len(owner) < sum(len(names) for _, names in classes):
        raise TypeError("two settings classes give a command the same option")
    params = [_option(cls, name, cls.env_name(name), flag=cls.flags.get(name))
              for cls, names in classes for name in names]
    tables = " and ".join(f"[{cls.table}]" for cls, _ in classes) + (" tables" if len(classes) > 1 else " table")
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Path | None, typer.Option(help=f"TOML config file, its {tables} [env var: {CONFIG_ENV}; default: "
                                       f"./{DEFAULT_CONFIG_FILE} if present]", show_default=False)]))

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind == p.KEYWORD_ONLY]

        def command(**options: Any) -> None:
            config = options.pop("config")
            extra = {p.name: config if p.name == "config" else options.pop(p.name) for p in own}
            flags: list[dict[str, Any]] = [{} for _ in classes]
            for name, value in options.items():
                flags[owner[name]][name] = value
            try:
                loaded = [cls.load(config, **given) for (cls, _), given in zip(classes, flags, strict=True)]
            except (ConfigError, ValidationError) as exc:
                raise _fail(str(exc)) from None
            fn(*loaded, **extra)

        return _derived(fn, command, [*params, *(p for p in own if p.name != "config")])

    return wrap


def body_options(model: type[BaseModel], skip: Collection[str] = (), last: Collection[str] = (),
                 aliases: Mapping[str, str] | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command ``model``'s fields (but ``skip``; ``last`` after the others) as options, named
    ``--alias`` where one is given, between its arguments and its own options; ``fn`` gets the fields given
    as ``body``."""
    aliases = aliases or {}
    names = sorted((n for n in model.model_fields if n not in skip), key=lambda n: n in last)

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "body"]
        params = [*(p for p in own if p.default is p.empty), *(_option(model, n, alias=aliases.get(n)) for n in names),
                  *(p.replace(kind=p.KEYWORD_ONLY) for p in own if p.default is not p.empty)]

        def command(**options: Any) -> None:
            given = {n: options.pop(aliases.get(n, n)) for n in names}
            fn(body={n: v for n, v in given.items() if v is not None}, **options)

        return _derived(fn, command, params)

    return wrap


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command()
@settings_command(WorkerSettings)
def worker(settings: WorkerSettings) -> None:
    """Serve one model: text-embeddings-inference's API plus OpenAI's /v1/embeddings."""
    from embedfleet.logging_setup import setup_logging
    from embedfleet.worker.server import run_worker

    setup_logging(settings.log_level, settings.log_format)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # Before torch loads OpenMP: idle OpenMP threads would spin and starve the event loop and the
    # tokenizer (torch bf16 over HTTP, long texts, went almost twice as fast with it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    run_worker(settings)


@app.command()
@settings_command(GatewaySettings)
def gateway(settings: GatewaySettings) -> None:
    """The caching, load-balancing entry point in front of workers (or TEI servers)."""
    from embedfleet.gateway.server import build_gateway, serve
    from embedfleet.logging_setup import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    try:
        gateway_app = build_gateway(settings).app
    except ValueError as exc:  # no upstream, a bad cache URL
        raise _fail(str(exc)) from None
    serve(gateway_app, settings)


@app.command()
@settings_command(FleetSettings, (GatewaySettings, SERVE_GATEWAY_OPTIONS))
def serve(fleet_settings: FleetSettings, gateway_settings: GatewaySettings) -> None:
    """Serve everything: the gateway on :8080 and supervised workers on every GPU (or CPU core)."""
    from embedfleet.fleet.serve import run_serve
    from embedfleet.fleet.state import StateLockedError
    from embedfleet.logging_setup import setup_logging

    setup_logging(fleet_settings.log_level, fleet_settings.log_format)
    try:
        code = run_serve(fleet_settings, gateway_settings)
    except (ConfigError, StateLockedError, ValueError) as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


deploy_app = typer.Typer(help="Write deployment files (Compose, nginx, Kubernetes) from the config `serve` reads.",
                         no_args_is_help=True, rich_markup_mode=None)
app.add_typer(deploy_app, name="deploy")
OutOption = Annotated[Path, typer.Option("--out", help="Folder to write the files into (made if missing).",
                                         show_default=False)]
GpusOption = Annotated[int, typer.Option(min=0, max=64, help="GPUs of each target host: one worker per GPU "
                                         "(0: CPU workers).")]
CpusOption = Annotated[int | None, typer.Option(min=1, max=1024, help="Cores of each target host: how many CPU "
                                                "workers when [fleet] replicas is unset (default: this machine's).",
                                                show_default=False)]


def _deploy(kind: str, fleet_settings: FleetSettings, gateway_settings: GatewaySettings, config: Path | None,
            folder: Path, gpus: int, cpus: int | None, **options: Any) -> None:
    from embedfleet.deploy.plan import DeployError
    from embedfleet.deploy.run import run_deploy

    try:
        run_deploy(kind, fleet_settings, gateway_settings, config, folder, gpus, cpus, out, **options)
    except (ConfigError, DeployError, OSError) as exc:
        raise _fail(str(exc)) from None


@deploy_app.command("compose")
@settings_command(FleetSettings, (GatewaySettings, SERVE_GATEWAY_OPTIONS))
def deploy_compose(fleet_settings: FleetSettings, gateway_settings: GatewaySettings, *, out: OutOption,
                   gpus: GpusOption = 0, cpus: CpusOption = None, config: Path | None = None) -> None:
    """docker-compose.yml: a worker per GPU (or CPU replica), the gateway, its cache, Prometheus and Grafana."""
    _deploy("compose", fleet_settings, gateway_settings, config, out, gpus, cpus)


@deploy_app.command("nginx")
@settings_command(FleetSettings, (GatewaySettings, SERVE_GATEWAY_OPTIONS))
def deploy_nginx(fleet_settings: FleetSettings, gateway_settings: GatewaySettings, *, out: OutOption,
                 gateway: Annotated[list[str] | None, typer.Option(
                     "--gateway", help="A gateway as HOST or HOST:PORT, repeated (default: gateway-1 and "
                                       "gateway-2 on the configured port).", show_default=False)] = None,
                 listen: Annotated[str, typer.Option(help="Where nginx listens: [ADDRESS:]PORT.")] = "80",
                 config: Path | None = None) -> None:
    """nginx.conf in front of several gateways: least_conn, keep-alive, retries on the next gateway."""
    _deploy("nginx", fleet_settings, gateway_settings, config, out, 0, 1, gateways=gateway or [], listen=listen)


@deploy_app.command("k8s")
@settings_command(FleetSettings, (GatewaySettings, SERVE_GATEWAY_OPTIONS))
def deploy_k8s(fleet_settings: FleetSettings, gateway_settings: GatewaySettings, *, out: OutOption,
               gpus: GpusOption = 0, cpus: CpusOption = None, config: Path | None = None) -> None:
    """Kubernetes manifests and kustomization.yaml: workers, gateway (Service, HPA, PDB), Redis, ConfigMaps."""
    _deploy("k8s", fleet_settings, gateway_settings, config, out, gpus, cpus)


instances_app = typer.Typer(help="Manage the instances of a running `embedfleet serve`.", no_args_is_help=True,
                            rich_markup_mode=None)
models_app = typer.Typer(help="Manage the models a running `embedfleet serve` knows.", no_args_is_help=True,
                         rich_markup_mode=None)
app.add_typer(instances_app, name="instances")
app.add_typer(models_app, name="models")

UrlOption = Annotated[str, typer.Option("--url", envvar="EMBEDFLEET_URL", help="The service's URL.")]
KeyOption = Annotated[str | None, typer.Option(
    "--admin-key", envvar=["EMBEDFLEET_ADMIN_KEY", GatewaySettings.env_name("admin_key")],
    help="Admin key, when the service has keys (also the server's own variable).")]
DEFAULT_URL = "http://127.0.0.1:8080"
_NAME_HELP = InstanceRequest.model_fields["name"].description


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
@body_options(InstanceRequest, skip={"name"}, last=WORKER_OPTIONS, aliases={"url": "external_url"})
def instances_add(
    name: Annotated[str, typer.Argument(help=_NAME_HELP, show_default=False)],
    body: dict[str, Any],
    wait: Annotated[bool, typer.Option(help="Wait until they are running (or failed).")] = True,
    url: UrlOption = DEFAULT_URL,
    admin_key: KeyOption = None,
) -> None:
    """Add and start instances (the options are those of POST /admin/instances)."""
    result = _admin(url, admin_key, "POST", f"/instances?wait={str(wait).lower()}", timeout=900,
                    json={"name": name, **body})
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


@app.command()
@settings_command(BenchSettings)
def bench(settings: BenchSettings, *,
          url: Annotated[str, typer.Argument(metavar="URL", help="The target's base URL: http(s)://HOST[:PORT]"
                                             "[/PREFIX], grpc(s)://HOST:PORT for --mode grpc and arrow.",
                                             show_default=False)]) -> None:
    """Load-test an embedding endpoint (embedfleet, TEI, infinity, OpenAI-compatible): throughput, latency,
    errors and cache hits."""
    from embedfleet.bench.command import BenchError, run_bench

    try:
        code = run_bench(settings, url, out)
    except BenchError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


codesearch_app = typer.Typer(help="Code search: index repositories, search them by meaning (needs `pip install "
                                    "'embedfleet[codesearch]'`).", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(codesearch_app, name="codesearch")
_STORE_OPTIONS = ("data_dir", "qdrant", "qdrant_api_key", "collection")
_SERVICE_OPTIONS = ("url", "api_key", "model", "replicas")
INDEX_OPTIONS = (*_STORE_OPTIONS, *_SERVICE_OPTIONS, "concurrency", "batch_size", "max_lines", "window_lines",
                 "overlap_lines")
SEARCH_OPTIONS = (*_STORE_OPTIONS, *_SERVICE_OPTIONS, "reranker")
UI_OPTIONS = (*SEARCH_OPTIONS, "host", "port")
"""The code-search settings each ``codesearch`` command takes as flags."""


def _codesearch(run: Callable[[], object]) -> None:
    """Run a code-search command: its errors (and a missing extra) as one clear line, exit code 2."""
    try:
        run()
    except ImportError as exc:
        raise _fail(f"code search needs `pip install 'embedfleet[codesearch]'` ({exc})") from None
    except Exception as exc:
        from embedfleet.codesearch.errors import CodeSearchError

        if isinstance(exc, CodeSearchError):
            raise _fail(str(exc)) from None
        raise


@codesearch_app.command("index")
@settings_command((CodesearchSettings, INDEX_OPTIONS))
def codesearch_index(
    settings: CodesearchSettings,
    *,
    path: Annotated[str, typer.Argument(help="a folder, a local git repository or a git URL (cloned)",
                                        show_default=False)],
    repo: Annotated[str | None, typer.Option(help="the repository's name in the index [default: the folder's "
                                                  "name]", show_default=False)] = None,
) -> None:
    """Index a repository: only files changed since the last run are embedded; deleted files are removed."""
    from embedfleet.codesearch import cli as codesearch

    _codesearch(lambda: codesearch.run_index(settings, path, repo, err))


@codesearch_app.command("search")
@settings_command((CodesearchSettings, SEARCH_OPTIONS))
def codesearch_search(
    settings: CodesearchSettings,
    *,
    query: Annotated[str, typer.Argument(help="what the code does, in words", show_default=False)],
    limit: Annotated[int, typer.Option("--limit", "-k", min=1, max=1000, help="results")] = 10,
    repo: Annotated[str | None, typer.Option(help="only this repository", show_default=False)] = None,
    language: Annotated[str | None, typer.Option(help="only this language (python, go, ...)",
                                                 show_default=False)] = None,
    rerank: Annotated[bool, typer.Option(help="re-order candidates with the reranker (--reranker)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Search the index by meaning: file:line, symbol, score and the code of the best chunks."""
    from embedfleet.codesearch import cli as codesearch

    _codesearch(lambda: codesearch.run_search(settings, query, limit=limit, repo=repo, language=language,
                                              rerank=rerank, as_json=as_json, out=out, console=err))


@codesearch_app.command("status")
@settings_command((CodesearchSettings, _STORE_OPTIONS))
def codesearch_status(settings: CodesearchSettings) -> None:
    """The repositories in the index: files, chunks and languages."""
    from embedfleet.codesearch import cli as codesearch

    _codesearch(lambda: codesearch.run_status(settings, out))


@codesearch_app.command("ui")
@settings_command((CodesearchSettings, UI_OPTIONS))
def codesearch_ui(settings: CodesearchSettings) -> None:
    """Serve the search page (index status, a query box, highlighted results) until interrupted."""
    from embedfleet.codesearch import cli as codesearch

    _codesearch(lambda: codesearch.run_ui(settings, err))


def main() -> None:  # pragma: no cover - console entry point
    """Entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
