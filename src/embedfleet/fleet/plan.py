"""What the fleet should run: the instances the configuration declares, merged with the persisted state.

Declared instances are reconciled at every start: the config's definition wins, a user's "stopped"
flag is kept, and a declared instance removed from the config is dropped. Instances added through
the admin API are kept as they are until deleted through it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationError

from embedfleet.config import ConfigError, FleetSettings, usable_cpus
from embedfleet.fleet.devices import DeviceError, parse_device, spread
from embedfleet.fleet.spec import InstanceRequest, InstanceSpec

log = logging.getLogger("embedfleet.fleet")


class DeclaredInstance(InstanceRequest):
    """A ``[[fleet.instances]]`` table: a ``POST /admin/instances`` body, plus ``devices`` to spread replicas."""

    devices: list[str] | None = Field(default=None, description="devices the replicas go to, round-robin")


def default_name(model: str) -> str:
    """An instance name from a model spec: ``BAAI/bge-small-en-v1.5`` -> ``bge-small-en-v1.5``."""
    base = model.rstrip("/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._") or "model"
    return base.replace("..", ".")[:50]


def request_devices(request: InstanceRequest, gpus: list[str], devices: list[str] | None = None) -> list[str]:
    """The (normalised) device of each replica a request asks for. Default: the first GPU, else the CPU."""
    if devices:
        chosen = [parse_device(d, gpus) for d in devices]
    elif request.gpu_id is not None:
        chosen = [parse_device(str(request.gpu_id), gpus)]
    elif request.device is not None:
        chosen = [parse_device(request.device, gpus)]
    else:
        chosen = ["cuda:0" if gpus else "cpu"]
    return spread(request.replicas, chosen)


def declared(settings: FleetSettings, gpus: list[str], cpus: int | None = None) -> list[InstanceSpec]:
    """The instances the configuration asks for; ConfigError if it is invalid."""
    cpus = cpus or usable_cpus()
    try:
        if settings.instances:
            specs: list[InstanceSpec] = []
            for table in settings.instances:
                request = DeclaredInstance.model_validate(table)
                devices = request_devices(request, gpus, request.devices)
                specs += request.specs(devices)
        else:
            devices = [parse_device(d, gpus) for d in settings.devices] if settings.devices else \
                [f"cuda:{i}" for i in range(len(gpus))] or ["cpu"]
            on_cpu = all(d == "cpu" for d in devices)
            replicas = settings.replicas or (cpus if on_cpu else len(devices))
            threads = settings.threads or (max(1, cpus // replicas) if on_cpu else None)
            plain = InstanceRequest.model_validate({"name": default_name(settings.model), "model": settings.model,
                                                    "replicas": replicas, "threads": threads,
                                                    "backend": settings.backend})
            specs = plain.specs(spread(replicas, devices))
    except (ValidationError, DeviceError) as exc:
        raise ConfigError(f"invalid fleet instances: {exc}") from exc
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"instance names declared twice: {', '.join(duplicates)}")
    return specs


@dataclass
class Desired:
    """One instance to bring up at start."""

    spec: InstanceSpec
    stopped: bool
    origin: str


def reconcile(saved: list[dict[str, Any]], config: list[InstanceSpec]) -> list[Desired]:
    """Merge the persisted instances with the declared ones (see the module's docstring)."""
    previous: dict[str, tuple[bool, str]] = {}
    kept: list[Desired] = []
    for entry in saved:
        try:
            spec = InstanceSpec.model_validate(entry["spec"])
        except (KeyError, TypeError, ValidationError) as exc:
            log.warning("ignoring an invalid instance in the saved state: %s", exc)
            continue
        stopped, origin = bool(entry.get("stopped", False)), str(entry.get("origin", "api"))
        previous[spec.name] = (stopped, origin)
        if origin != "config" and spec.name not in {s.name for s in config}:
            kept.append(Desired(spec, stopped, origin))
        elif origin == "config" and spec.name not in {s.name for s in config}:
            log.info("instance %s is no longer in the configuration: removed", spec.name)
    declared_now = [Desired(s, previous.get(s.name, (False, "config"))[0], "config") for s in config]
    return declared_now + kept
