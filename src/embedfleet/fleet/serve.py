"""``embedfleet serve``: the gateway, the supervisor of its workers and the admin API in one process.

Start: restore the persisted state, merge the declared instances, start every worker, print a table
and one "ready" line once each has settled. SIGINT/SIGTERM: stop accepting, drain requests under way
(10 s at most), stop the workers (SIGTERM, then SIGKILL after ``stop_timeout``), flush the cache's
writes, exit 0. A second signal kills the workers at once and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import threading
from collections.abc import Callable, Generator
from types import FrameType

import uvicorn
from rich.console import Console

from embedfleet.config import ConfigError, FleetSettings, GatewaySettings
from embedfleet.fleet.admin import install_admin
from embedfleet.fleet.client import instances_table
from embedfleet.fleet.devices import visible_gpus
from embedfleet.fleet.errors import FleetError
from embedfleet.fleet.metrics import FleetCollector
from embedfleet.fleet.plan import declared, reconcile
from embedfleet.fleet.registry import ModelRegistry
from embedfleet.fleet.state import StateFile
from embedfleet.fleet.supervisor import InstanceState, Supervisor, SupervisorSettings
from embedfleet.gateway.server import build_gateway, uvicorn_config

log = logging.getLogger("embedfleet.fleet")


class FleetServer(uvicorn.Server):
    """uvicorn's server with the fleet's signal handling: the first SIGINT/SIGTERM shuts down gracefully,
    a second forces; the process then exits normally instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, on_force: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_force = on_force

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Handle SIGINT/SIGTERM while serving; restore the old handlers afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: graceful; second: force."""
        if self.should_exit:
            self.force_exit = True
            log.warning("second signal: killing the workers and exiting now")
            self.on_force()
        else:
            log.info("shutting down: draining requests, then stopping the workers (Ctrl-C again to force)")
            self.should_exit = True


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(fleet: FleetSettings, gateway: GatewaySettings) -> None:
    """ConfigError for /admin without any key on an address others can reach, unless explicitly allowed:
    from there a caller could start worker processes from any folder, make the fleet fetch any URL, or
    add an external server that joins a pool and reads its clients' texts."""
    has_key = bool(gateway.admin_key or gateway.api_key or gateway.api_key_file)
    if has_key or is_loopback(gateway.host) or fleet.allow_open_admin:
        return
    raise ConfigError(f"refusing to serve /admin without any key on {gateway.host}: set an admin key "
                      "([gateway] admin_key, --admin-key or EMBEDFLEET_GATEWAY_ADMIN_KEY), listen on 127.0.0.1, "
                      "or set allow_open_admin = true in [fleet] if the network is yours alone")


def run_serve(fleet: FleetSettings, gateway_settings: GatewaySettings, console: Console | None = None) -> int:
    """Serve until interrupted; returns the exit code (1 when every instance failed to start)."""
    check_exposure(fleet, gateway_settings)
    console = console or Console(stderr=True)
    gpus = visible_gpus()
    specs = declared(fleet, gpus)
    state = StateFile(fleet.state_dir / "state.json")
    state.acquire_lock()
    saved = state.load() or {}
    desired = reconcile(list(saved.get("instances", [])), specs)

    collector = FleetCollector()
    exit_code = 0
    server: FleetServer | None = None

    async def persist() -> None:
        await state.save({"instances": supervisor.desired(), "models": registry.to_state()})

    async def report_ready() -> None:
        nonlocal exit_code
        await supervisor.wait_settled()
        console.print(instances_table([i.describe() for i in supervisor.instances.values()],
                                      title="embedfleet instances"))
        instances = list(supervisor.instances.values())
        failed = [i for i in instances if i.state == InstanceState.FAILED]
        for i in failed:
            console.print(f"[bold red]error:[/] instance {i.name} failed: {i.last_error}")
        scheme = "https" if gateway_settings.tls_cert else "http"
        url = f"{scheme}://{gateway_settings.host}:{gateway_settings.port}"
        running = [i for i in instances if i.state == InstanceState.RUNNING]
        if instances and not running and failed:
            console.print("[bold red]no instance could start; exiting[/]")
            exit_code = 1
            if server is not None:
                server.should_exit = True
            return
        models = sorted({i.spec.pool for i in running})
        grpc = f"; gRPC on {gateway_settings.host}:{gateway_settings.grpc_port}" if gateway_settings.grpc_port else ""
        message = (f"ready: {url} ({len(running)}/{len(instances)} instance(s) running{grpc}; "
                   f"models: {', '.join(models) or 'none'}; admin API at {url}/admin/instances)")
        console.print(f"[bold green]{message}[/]" if not failed else f"[bold yellow]{message}[/]")
        log.info("%s", message)

    tasks: list[asyncio.Task[None]] = []

    async def on_startup() -> None:
        registry.restore(list(saved.get("models", [])))
        await registry.scan()
        for d in desired:
            try:
                await supervisor.add([d.spec], stopped=d.stopped, persist=False, origin=d.origin)
            except FleetError as exc:  # e.g. a saved fixed port now taken: keep the definition, report it
                log.error("instance %s cannot start: %s", d.spec.name, exc.message)
                await supervisor.add([d.spec], start=False, persist=False, origin=d.origin, check=False)
        await persist()
        log.info("fleet state in %s; %d instance(s) (%d stopped by a user)", state.path, len(desired),
                 sum(d.stopped for d in desired))
        tasks.append(asyncio.get_running_loop().create_task(report_ready(), name="report-ready"))

    async def on_shutdown() -> None:
        for task in tasks:
            task.cancel()
        await supervisor.close()
        await registry.close()

    gateway = build_gateway(gateway_settings, dynamic=True, on_startup=on_startup, on_shutdown=on_shutdown,
                            collectors=[collector])
    supervisor = Supervisor(SupervisorSettings.of(fleet, gpus, reserved_ports=frozenset(
        {gateway_settings.port, *([gateway_settings.grpc_port] if gateway_settings.grpc_port else [])})),
                            gateway.router, on_change=persist)
    registry = ModelRegistry(on_change=persist)
    collector.supervisor = supervisor
    gateway.targets.instances = lambda: [(i.name, i.spec.pool) for i in supervisor.instances.values()]
    install_admin(gateway.app, supervisor, registry, gateway.auth)

    def force() -> None:
        supervisor.kill_all()

    server = FleetServer(uvicorn_config(gateway.app, gateway_settings), on_force=force)
    try:
        server.run()
    finally:
        state.release_lock()
    if not server.started and exit_code == 0:
        return 1  # uvicorn could not bind, or start-up failed: it has logged why
    return exit_code
