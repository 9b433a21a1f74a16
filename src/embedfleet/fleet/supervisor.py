"""The supervisor: runs worker instances, watches their health, restarts them, and keeps the gateway's pools
in step.

Each instance has one runner task that owns its process: start, wait until /health answers 200,
join the gateway pool, check /health every ``health_interval`` seconds, and on an exit or
``health_failures`` failed checks in a row leave the pool and restart with exponential back-off,
until ``max_restarts`` restarts within ``restart_window`` seconds mark it ``failed``. Commands
(start, stop, restart, remove) cancel and replace the runner, under the instance's lock, so a
command never races the runner. An instance a user stopped is never started again by itself.

Workers run in their own session (a Ctrl-C in the terminal reaches the fleet only, which drains the
gateway before stopping them) and die with the fleet (``PR_SET_PDEATHSIG``), so a fleet killed with
-9 leaves no orphan holding a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import httpx

from embedfleet.config import ENV_PREFIX, HEALTH_CHECK_TIMEOUT_S, FleetSettings, WorkerSettings, settings_flags
from embedfleet.fleet.devices import placement
from embedfleet.fleet.errors import FleetError, FleetErrorCode, timestamp
from embedfleet.fleet.spec import WORKER_OPTIONS, InstanceSpec

log = logging.getLogger("embedfleet.fleet")

LOG_TAIL_LINES = 1000


class InstanceState(StrEnum):
    """Where an instance is in its life."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    UNHEALTHY = "unhealthy"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


ACTIVE = frozenset({InstanceState.STARTING, InstanceState.RUNNING, InstanceState.UNHEALTHY})


class Membership(Protocol):
    """The gateway side: which replicas each model pool routes to."""

    def ensure(self, name: str) -> object:
        """Make pool ``name`` (empty) if it does not exist: its requests wait for 503, not 404."""

    async def join(self, name: str, url: str) -> None:
        """Route pool ``name`` to ``url`` (healthy now)."""

    async def leave(self, name: str, url: str, drain_timeout: float = 30.0) -> None:
        """Stop routing to ``url``, once its calls under way are done."""

    async def suspend(self, name: str, url: str, reason: str) -> None:
        """Stop routing to ``url`` now, failing its calls under way over to other replicas (it did not
        answer a health check: hung, or cut off); :meth:`join` routes to it again."""

    async def forget(self, name: str) -> None:
        """Drop pool ``name`` if nothing serves it any more."""


@dataclass
class SupervisorSettings:
    """How instances are run and watched: the fleet's settings (:meth:`of`), plus the supervisor's own
    timings."""

    log_dir: Path
    data_dir: Path  # the workers' --data-dir (exported ONNX graphs)
    port_range: tuple[int, int]
    health_interval: float
    health_failures: int
    start_timeout: float
    stop_timeout: float
    max_restarts: int
    restart_window: float
    max_instances: int
    external_hosts: list[str] | None
    worker_log_level: str
    worker_log_format: str
    gpus: list[str] = field(default_factory=list)
    reserved_ports: frozenset[int] = frozenset()
    host: str = "127.0.0.1"  # workers listen on loopback: only the gateway talks to them
    health_timeout: float = HEALTH_CHECK_TIMEOUT_S
    drain_timeout: float = 30.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    stable_after: float = 60.0  # running this long resets the back-off

    @classmethod
    def of(cls, fleet: FleetSettings, gpus: list[str],
           reserved_ports: frozenset[int] = frozenset()) -> SupervisorSettings:
        """The supervisor's settings from the fleet's (``embedfleet serve``)."""
        return cls(log_dir=fleet.state_dir / "logs", data_dir=fleet.data_dir, port_range=fleet.ports,
                   health_interval=fleet.health_interval, health_failures=fleet.health_failures,
                   start_timeout=fleet.start_timeout, stop_timeout=fleet.stop_timeout, max_restarts=fleet.max_restarts,
                   restart_window=fleet.restart_window, max_instances=fleet.max_instances,
                   external_hosts=fleet.external_hosts, worker_log_level=fleet.log_level,
                   worker_log_format=fleet.log_format, gpus=gpus, reserved_ports=reserved_ports,
                   health_timeout=fleet.health_timeout)


class InstanceLog:
    """A per-instance log file plus the last lines in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered appends of a few hundred bytes: cheaper than a thread hop per line.
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()

    def write(self, line: str) -> None:
        """One line (without its newline)."""
        self.tail.append(line)
        with contextlib.suppress(OSError, ValueError):
            self._file.write(line + "\n")

    def note(self, message: str) -> None:
        """A line from the supervisor itself."""
        self.write(f"[embedfleet {timestamp()}] {message}")

    def last(self, n: int) -> list[str]:
        """The last ``n`` lines."""
        return list(self.tail)[-n:] if n > 0 else []

    def close(self) -> None:
        """Close the file."""
        self._file.close()


@dataclass
class Instance:
    """One instance and what the supervisor knows of it."""

    spec: InstanceSpec
    log: InstanceLog
    stopped_by_user: bool = False
    state: InstanceState = InstanceState.PENDING
    port: int | None = None
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    health_failures: int = 0  # in a row, now
    failed_checks: int = 0  # in all
    last_error: str | None = None
    info: dict[str, Any] | None = None
    started_at: float | None = None
    ready_at: float | None = None
    runner: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    recent_restarts: deque[float] = field(default_factory=deque)
    in_pool: bool = False
    origin: str = "api"  # "config": declared in the config file, reconciled with it at every start

    @property
    def name(self) -> str:
        """The instance's name."""
        return self.spec.name

    @property
    def url(self) -> str | None:
        """Where it listens."""
        if self.spec.url is not None:
            return self.spec.url
        return None if self.port is None else f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """Its process id while it has a live process."""
        p = self.process
        return p.pid if p is not None and p.returncode is None else None

    def describe(self) -> dict[str, Any]:
        """The admin API's view of the instance."""
        info = self.info or {}
        now = time.time()
        return {
            "name": self.name, "state": self.state.value, "model": self.spec.model, "url": self.url,
            "external": self.spec.external, "served_name": self.spec.pool, "device": self.spec.device,
            "port": self.port, "pid": self.pid, "stopped_by_user": self.stopped_by_user, "restarts": self.restarts,
            "health_failures": self.health_failures, "last_error": self.last_error,
            "model_id": info.get("model_id"), "task": info.get("task") or self.spec.task,
            "dimension": info.get("dimension"),
            "uptime_s": round(now - self.ready_at, 1) if self.ready_at and self.state in ACTIVE else None,
            "spec": self.spec.model_dump(exclude_none=True),
        }


class StartError(Exception):
    """An instance did not become healthy; the message carries the tail of its log."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host`` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def instance_options(spec: InstanceSpec) -> dict[str, Any]:
    """The worker settings an instance sets itself (the rest are the worker's defaults)."""
    return {k: v for k, v in spec.model_dump(include=set(WORKER_OPTIONS)).items() if v is not None}


def worker_command(spec: InstanceSpec, host: str, port: int, device: str, data_dir: Path,
                   log_level: str, log_format: str = "text") -> list[str]:
    """The ``embedfleet worker`` command line of an instance: every worker setting as a flag (the worker's
    defaults where the instance sets none), and no config file, so nothing but the instance decides."""
    assert spec.model is not None
    values = {name: field.get_default(call_default_factory=True)
              for name, field in WorkerSettings.model_fields.items()}
    values.update(instance_options(spec))
    values.update(model=spec.model, served_model_name=spec.served_name, host=host, port=port, device=device,
                  exit_on_load_failure=True, log_level=log_level, log_format=log_format, data_dir=data_dir)
    return [sys.executable, "-m", "embedfleet.cli", "worker", "--config", os.devnull, *settings_flags(values)]


def worker_env(environ: Mapping[str, str], placement_env: Mapping[str, str]) -> dict[str, str]:
    """A worker's environment: the fleet's without any ``EMBEDFLEET_*`` variable (a worker's settings are its
    flags alone), plus the device placement's variables."""
    # In any letter case: pydantic-settings matches variable names case-insensitively.
    inherited = {k: v for k, v in environ.items() if not k.upper().startswith(ENV_PREFIX)}
    return {**inherited, **placement_env, "PYTHONUNBUFFERED": "1"}


class Supervisor:
    """Every instance of the fleet."""

    def __init__(self, settings: SupervisorSettings, membership: Membership,
                 on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.membership = membership
        self.on_change = on_change
        self.instances: dict[str, Instance] = {}
        self._lock = asyncio.Lock()  # names and ports
        self._client = httpx.AsyncClient(timeout=settings.health_timeout)
        self._closing = False

    # ----- the desired state -----

    def desired(self) -> list[dict[str, Any]]:
        """What to persist: each definition and whether a user stopped it."""
        return [{"spec": i.spec.model_dump(exclude_none=True), "stopped": i.stopped_by_user, "origin": i.origin}
                for i in self.instances.values()]

    async def _changed(self) -> None:
        """Persist the desired state; STATE_NOT_SAVED where it cannot be written. Every change is saved
        before it is applied (and undone in memory when the save fails), so what the API answered, what
        runs and what a restarted fleet restores never disagree."""
        if self.on_change is None:
            return
        try:
            await self.on_change()
        except OSError as exc:
            log.error("the fleet's state could not be saved: %s", exc)
            raise FleetError(FleetErrorCode.STATE_NOT_SAVED, f"the fleet's state could not be saved "
                             f"({exc.strerror or exc}); nothing was changed") from exc

    def get(self, name: str) -> Instance:
        """The instance, or INSTANCE_NOT_FOUND."""
        instance = self.instances.get(name)
        if instance is None:
            raise FleetError(FleetErrorCode.INSTANCE_NOT_FOUND, f"no instance named {name!r}")
        return instance

    def _ports_taken(self, besides: Instance | None = None) -> set[int]:
        taken = set(self.settings.reserved_ports)
        for i in self.instances.values():
            if i is not besides and not i.spec.external:
                taken |= {p for p in (i.spec.port, i.port) if p is not None}
        return taken

    def check_port(self, port: int, besides: Instance | None = None) -> None:
        """PORT_CONFLICT unless ``port`` is ours to take."""
        if port in self._ports_taken(besides):
            owners = (i.name for i in self.instances.values() if i is not besides and port in (i.spec.port, i.port))
            owner = next(owners, "the gateway")
            raise FleetError(FleetErrorCode.PORT_CONFLICT, f"port {port} is already used by {owner}")
        if not port_free(self.settings.host, port):
            raise FleetError(FleetErrorCode.PORT_CONFLICT, f"port {port} is in use by another process on this host")

    def _allocate_port(self, instance: Instance) -> int:
        taken = self._ports_taken(instance)
        low, high = self.settings.port_range
        for port in range(low, high + 1):
            if port not in taken and port_free(self.settings.host, port):
                return port
        raise StartError(f"no free port in {low}-{high}")

    def check_external(self, spec: InstanceSpec) -> None:
        """VALIDATION_ERROR for an external instance whose host is not in ``external_hosts`` (when set)."""
        allowed = self.settings.external_hosts
        if spec.url is None or allowed is None:
            return
        netloc = spec.url.split("://", 1)[1].lower()
        host = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
        if not {netloc, host} & {h.lower() for h in allowed}:
            raise FleetError(FleetErrorCode.VALIDATION_ERROR, f"external url {spec.url!r} is not on an allowed host "
                             f"(external_hosts: {', '.join(allowed) or 'none'})")

    async def add(self, specs: Iterable[InstanceSpec], start: bool = True, stopped: bool = False,
                  persist: bool = True, origin: str = "api", check: bool = True) -> list[Instance]:
        """Add instances (all or none) and start them unless ``stopped``. ``check=False`` skips the port
        checks (a restored definition is kept even when its port is taken now)."""
        specs = list(specs)
        async with self._lock:
            names = [s.name for s in specs]
            for name in names:
                if name in self.instances or names.count(name) > 1:
                    raise FleetError(FleetErrorCode.INSTANCE_EXISTS, f"an instance named {name!r} already exists")
            if len(self.instances) + len(specs) > self.settings.max_instances:
                raise FleetError(FleetErrorCode.MAX_INSTANCES_REACHED,
                                 f"at most {self.settings.max_instances} instances (have {len(self.instances)})")
            for spec in specs if check else ():
                self.check_external(spec)
            fixed = [s.port for s in specs if s.port is not None and not s.external]
            if len(set(fixed)) != len(fixed):
                raise FleetError(FleetErrorCode.PORT_CONFLICT, "two of the new instances ask for one port")
            for port in fixed if check else ():
                self.check_port(port)
            added = []
            for spec in specs:
                instance = Instance(spec, InstanceLog(self.settings.log_dir / f"{spec.name}.log"),
                                    stopped_by_user=stopped, port=spec.port, origin=origin)
                instance.state = InstanceState.STOPPED if stopped else InstanceState.PENDING
                self.instances[spec.name] = instance
                self.membership.ensure(spec.pool)
                added.append(instance)
        if persist:
            try:
                await self._changed()
            except FleetError:
                async with self._lock:
                    for instance in added:
                        self.instances.pop(instance.spec.name, None)
                        instance.log.close()
                raise
        if start and not stopped:
            for instance in added:
                self._launch(instance)
        return added

    async def remove(self, name: str) -> None:
        """Stop and forget an instance (forgotten on disk first)."""
        instance = self.get(name)
        async with instance.lock:
            async with self._lock:
                self.instances.pop(name, None)
            try:
                await self._changed()
            except FleetError:
                async with self._lock:
                    self.instances[name] = instance
                raise
            await self._halt(instance)
            instance.log.close()
        if not any(i.spec.pool == instance.spec.pool for i in self.instances.values()):
            await self.membership.forget(instance.spec.pool)

    async def start(self, name: str) -> Instance:
        """Start a stopped or failed instance."""
        instance = self.get(name)
        async with instance.lock:
            if instance.state in ACTIVE:
                raise FleetError(FleetErrorCode.ALREADY_RUNNING, f"instance {name!r} is {instance.state.value}")
            await self._set_stopped(instance, False)
            instance.recent_restarts.clear()
            self._launch(instance)
        return instance

    async def _set_stopped(self, instance: Instance, stopped: bool) -> None:
        """Record whether a user stopped the instance, saved before anything is done about it."""
        before, instance.stopped_by_user = instance.stopped_by_user, stopped
        try:
            await self._changed()
        except FleetError:
            instance.stopped_by_user = before
            raise

    async def stop(self, name: str) -> Instance:
        """Stop an instance and keep it stopped (across health checks and restarts of the fleet)."""
        instance = self.get(name)
        async with instance.lock:
            if instance.state not in ACTIVE and instance.state != InstanceState.PENDING:
                raise FleetError(FleetErrorCode.NOT_RUNNING, f"instance {name!r} is {instance.state.value}")
            await self._set_stopped(instance, True)
            await self._halt(instance)
        return instance

    async def restart(self, name: str) -> Instance:
        """Stop (if running) and start again, with a fresh restart budget."""
        instance = self.get(name)
        async with instance.lock:
            await self._set_stopped(instance, False)
            await self._halt(instance)
            instance.recent_restarts.clear()
            self._launch(instance)
        return instance

    async def close(self) -> None:
        """Stop every instance (concurrently), keeping their desired state: they come back on the next start."""
        self._closing = True
        await asyncio.gather(*(self._halt(i) for i in self.instances.values()), return_exceptions=True)
        for instance in self.instances.values():
            instance.log.close()
        await self._client.aclose()

    def kill_all(self) -> None:
        """SIGKILL every worker now (a forced shutdown); safe to call from a signal handler."""
        for instance in self.instances.values():
            process = instance.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

    async def wait_settled(self, names: Iterable[str] | None = None, timeout: float | None = None) -> bool:
        """Wait until none of these instances (default: all) is pending or starting; whether that happened
        before ``timeout``."""
        wanted = None if names is None else set(names)
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(i.state in (InstanceState.PENDING, InstanceState.STARTING) for i in self.instances.values()
                  if wanted is None or i.name in wanted):
            if deadline is not None and time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    # ----- one instance's life -----

    def _launch(self, instance: Instance) -> None:
        instance.state = InstanceState.STARTING
        instance.last_error = None
        instance.runner = asyncio.get_running_loop().create_task(self._run(instance), name=f"instance-{instance.name}")

    async def _halt(self, instance: Instance) -> None:
        """Cancel the runner, leave the pool, stop the process."""
        instance.state = InstanceState.STOPPING
        runner, instance.runner = instance.runner, None
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        await self._leave(instance)
        await self._terminate(instance)
        instance.state = InstanceState.STOPPED

    async def _run(self, instance: Instance) -> None:
        backoff = self.settings.backoff_initial
        while True:
            try:
                if instance.spec.external:
                    await self._wait_external(instance)
                else:
                    await self._spawn(instance)
                    await self._wait_ready(instance)
                await self._join(instance)
                reason = await self._watch(instance)
            except StartError as exc:
                reason = str(exc)
            instance.state = InstanceState.UNHEALTHY
            instance.last_error = reason
            await self._leave(instance)
            if instance.ready_at and time.time() - instance.ready_at > self.settings.stable_after:
                backoff = self.settings.backoff_initial
            if instance.spec.external:
                # Not ours to restart: checked again after the same growing back-off, never in a tight loop
                # (a server that answers /health but cannot join its pool would otherwise be hammered).
                log.warning("instance %s (%s) is unhealthy: %s; checking again in %.1fs", instance.name,
                            instance.url, reason, backoff)
                instance.log.note(f"{reason}; checking again in {backoff:.1f}s")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.backoff_max)
                continue
            await self._terminate(instance)
            now = time.monotonic()
            while instance.recent_restarts and now - instance.recent_restarts[0] > self.settings.restart_window:
                instance.recent_restarts.popleft()
            if len(instance.recent_restarts) >= self.settings.max_restarts:
                instance.state = InstanceState.FAILED
                message = (f"instance {instance.name} failed: {reason}; gave up after {self.settings.max_restarts} "
                           f"restarts in {self.settings.restart_window:.0f}s")
                instance.log.note(message)
                log.error("%s\n%s", message, self._tail_text(instance))
                return
            log.warning("instance %s: %s; restarting in %.1fs", instance.name, reason, backoff)
            instance.log.note(f"{reason}; restarting in {backoff:.1f}s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.backoff_max)
            instance.recent_restarts.append(time.monotonic())
            instance.restarts += 1
            instance.state = InstanceState.STARTING

    def _tail_text(self, instance: Instance, lines: int = 20) -> str:
        return "\n".join(f"  | {line}" for line in instance.log.last(lines)) or "  | (no output)"

    async def _spawn(self, instance: Instance) -> None:
        spec = instance.spec
        if spec.port is not None:
            port = spec.port
            deadline = time.monotonic() + 10  # a previous process may still be letting go of it
            while not port_free(self.settings.host, port):
                if time.monotonic() > deadline:
                    raise StartError(f"port {port} is in use by another process")
                await asyncio.sleep(0.2)
        elif instance.port is None or not port_free(self.settings.host, instance.port) or \
                instance.port in self._ports_taken(instance):
            port = self._allocate_port(instance)
        else:
            port = instance.port
        instance.port = port
        place = placement(spec.device, self.settings.gpus)
        cmd = worker_command(spec, self.settings.host, port, place.device, self.settings.data_dir,
                             self.settings.worker_log_level, self.settings.worker_log_format)
        env = worker_env(os.environ, place.env)
        instance.log.note(f"starting on port {port} ({spec.device}): {' '.join(cmd[3:])}")
        instance.info = None
        instance.health_failures = 0
        instance.started_at = time.time()
        instance.ready_at = None
        instance.process = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=env, start_new_session=True, preexec_fn=_die_with_parent)
        asyncio.get_running_loop().create_task(self._pump(instance, instance.process), name=f"log-{instance.name}")

    async def _pump(self, instance: Instance, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                line = await process.stdout.readline()
            except ValueError:  # a line over the stream limit: keep its start
                line = (await process.stdout.read(65536)) + b"\n"
            if not line:
                return
            instance.log.write(line.decode("utf-8", "replace").rstrip("\n"))

    async def _health(self, url: str) -> tuple[bool, str]:
        try:
            r = await self._client.get(f"{url}/health")
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if r.status_code == 200:
            return True, ""
        try:
            detail = str(r.json().get("error", r.text))
        except ValueError:
            detail = r.text
        return False, f"/health answered {r.status_code}: {detail[:200]}"

    async def _wait_for_exit(self, process: asyncio.subprocess.Process, timeout: float) -> bool:
        """Whether the process exited within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), timeout)
        except TimeoutError:
            return False
        return True

    async def _wait_ready(self, instance: Instance) -> None:
        process, url = instance.process, instance.url
        assert process is not None and url is not None
        deadline = time.monotonic() + self.settings.start_timeout
        delay = 0.1
        while True:
            if await self._wait_for_exit(process, delay):
                await asyncio.sleep(0)  # let the log pump take the last lines
                raise StartError(f"the worker exited with code {process.returncode} before it was ready:\n"
                                 f"{self._tail_text(instance)}")
            ok, why = await self._health(url)
            if ok:
                break
            if time.monotonic() > deadline:
                raise StartError(f"not healthy {self.settings.start_timeout:.0f}s after start ({why}):\n"
                                 f"{self._tail_text(instance)}")
            delay = min(delay * 1.5, 1.0)
        await self._read_info(instance)

    async def _wait_external(self, instance: Instance) -> None:
        url = instance.url
        assert url is not None
        while True:
            ok, why = await self._health(url)
            if ok:
                await self._read_info(instance)
                return
            instance.last_error = why
            instance.state = InstanceState.UNHEALTHY  # known, but not reachable yet: not "starting" forever
            await asyncio.sleep(self.settings.health_interval)

    async def _read_info(self, instance: Instance) -> None:
        url = instance.url
        try:
            r = await self._client.get(f"{url}/info")
            r.raise_for_status()
            info = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise StartError(f"/info failed: {exc}") from exc
        model_type = info.get("model_type") or {}
        info.setdefault("task", next(iter(model_type), None))
        instance.info = info
        expected = instance.spec.task
        if expected is not None and info.get("task") != expected:
            raise StartError(f"the model does {info.get('task')!r}, but the instance expects {expected!r}")

    async def _join(self, instance: Instance) -> None:
        url = instance.url
        assert url is not None
        try:
            await self.membership.join(instance.spec.pool, url)
        except ValueError as exc:  # another model than the pool's
            raise StartError(str(exc)) from exc
        instance.in_pool = True
        instance.state = InstanceState.RUNNING
        instance.ready_at = time.time()
        instance.last_error = None
        started = instance.started_at or instance.ready_at
        instance.log.note(f"ready at {url} after {instance.ready_at - started:.1f}s")
        log.info("instance %s ready at %s (%s)", instance.name, url, instance.spec.pool)

    async def _leave(self, instance: Instance) -> None:
        if instance.in_pool and instance.url is not None:
            instance.in_pool = False
            await self.membership.leave(instance.spec.pool, instance.url, self.settings.drain_timeout)

    async def _watch(self, instance: Instance) -> str:
        """Check health until the process exits or fails ``health_failures`` checks in a row; returns why."""
        url = instance.url
        assert url is not None
        failures = 0
        while True:
            process = instance.process
            if process is not None:
                if await self._wait_for_exit(process, self.settings.health_interval):
                    await asyncio.sleep(0)
                    return f"the worker exited with code {process.returncode}"
            else:
                await asyncio.sleep(self.settings.health_interval)
            ok, why = await self._health(url)
            if ok:
                failures = 0
                if instance.state == InstanceState.UNHEALTHY or instance.health_failures:
                    instance.state = InstanceState.RUNNING
                instance.health_failures = 0
                with contextlib.suppress(ValueError):
                    await self.membership.join(instance.spec.pool, url)  # re-admits after a passive ejection
                continue
            failures += 1
            instance.health_failures = failures
            instance.failed_checks += 1
            instance.last_error = why
            if failures == 1 and instance.in_pool:
                # Out of the pool at once: requests waiting on a hung worker are retried on the others now,
                # not after the failed checks, the restart and the drain (a minute or more).
                await self.membership.suspend(instance.spec.pool, url, f"health check failed: {why}")
            if failures >= self.settings.health_failures:
                return f"{failures} health checks failed in a row (last: {why})"

    async def _terminate(self, instance: Instance) -> None:
        """SIGTERM (the worker drains), then SIGKILL after ``stop_timeout``."""
        process, instance.process = instance.process, None
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            if not await self._wait_for_exit(process, self.settings.stop_timeout):
                log.warning("instance %s did not stop in %.0fs: killing it", instance.name,
                            self.settings.stop_timeout)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            instance.log.note(f"stopped (exit code {process.returncode})")
