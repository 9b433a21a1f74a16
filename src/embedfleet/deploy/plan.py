"""What a deployment runs, derived from the settings ``embedfleet serve`` reads.

The instances are planned by the fleet's own :func:`embedfleet.fleet.plan.declared` (so ``replicas``,
``devices`` and ``[[fleet.instances]]`` mean what they mean to ``serve``), for the target host's GPUs
rather than this machine's; each becomes one worker container. The gateway's settings become
``EMBEDFLEET_GATEWAY_*`` variables (a Compose ``environment``, a Kubernetes ConfigMap), its secrets
(API and admin keys) go apart, and its cache URL is pointed at the stack's own store.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from embedfleet.config import ConfigError, FleetSettings, GatewaySettings, load_config_table, settings_flags
from embedfleet.fleet.plan import declared
from embedfleet.fleet.supervisor import instance_options

WORKER_PORT = 8081
"""The port every worker container listens on (each has its own address)."""
REDIS_PORT = 6379
QDRANT_PORT = 6333
DATA_DIR = "/var/lib/embedfleet"
"""Where the images keep their data: the volumes are mounted under it."""
HF_HOME = f"{DATA_DIR}/huggingface"
WORKER_DATA = f"{DATA_DIR}/data"
LMDB_DIR = f"{DATA_DIR}/cache"
QDRANT_LOCAL_DIR = f"{DATA_DIR}/qdrant"
SECRET_SETTINGS = ("api_key", "admin_key")
"""Gateway settings that are secrets: never written into a ConfigMap or the compose file."""
IMAGE = "embedfleet"
"""The image name; the tags are ``cpu`` and ``cuda`` (see ``docker/Dockerfile.*``)."""

CacheKind = Literal["redis", "qdrant", "qdrant-local", "lmdb", "memory", "none"]


class DeployError(ValueError):
    """The configuration cannot be deployed as asked."""


def dns_label(text: str) -> str:
    """A Kubernetes/Compose-safe name: lowercase letters, digits and '-', at most 63 characters."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:63].rstrip("-") or "x"


@dataclass(frozen=True)
class Worker:
    """One worker container."""

    name: str
    """The instance name (``default-0``)."""
    pool: str
    """The gateway pool (the model name clients use)."""
    model: str
    gpu: str | None
    """The host's GPU id it is pinned to; None on the CPU."""
    args: list[str]
    """``embedfleet worker`` arguments."""

    @property
    def service(self) -> str:
        """Its Compose service name."""
        return dns_label(f"worker-{self.name}")

    @property
    def local_model(self) -> str | None:
        """The model folder on the host, when the model is one (it must be mounted into the container)."""
        return self.model if self.model.startswith("/") else None


@dataclass(frozen=True)
class Cache:
    """The gateway's cache in the deployment."""

    kind: CacheKind
    url: str
    """The URL the gateway uses inside the stack."""


@dataclass
class Plan:
    """Everything a generator needs."""

    fleet: FleetSettings
    gateway: GatewaySettings
    workers: list[Worker]
    gateway_env: dict[str, str]
    """``EMBEDFLEET_GATEWAY_*`` settings from the config (no upstream, cache, host, port or secret)."""
    secrets: dict[str, str]
    """The secret settings the config gives, as ``EMBEDFLEET_GATEWAY_*`` variables."""
    notes: list[str] = field(default_factory=list)
    """What the user must know (printed by the command)."""

    @property
    def pools(self) -> dict[str, list[Worker]]:
        """Workers by pool, in configuration order."""
        pools: dict[str, list[Worker]] = {}
        for w in self.workers:
            pools.setdefault(w.pool, []).append(w)
        return pools

    @property
    def gpu(self) -> bool:
        """Whether any worker runs on a GPU (the CUDA image)."""
        return any(w.gpu is not None for w in self.workers)

    def image(self, gpu: bool) -> str:
        """The image of a worker (or, with gpu=False, of the gateway)."""
        return f"{IMAGE}:{'cuda' if gpu else 'cpu'}"

    def cache(self, redis_host: str = "redis", qdrant_host: str = "qdrant", shared: bool = False) -> Cache:
        """The gateway's cache: the configured kind, served by the stack's own store. ``shared``: every gateway
        replica must see the same entries (Kubernetes), so a per-host store (LMDB, local Qdrant) becomes Redis."""
        url = self.gateway.cache
        scheme, _, rest = url.partition("://")
        if url in ("none", "memory", "memory://"):
            return Cache("none" if url == "none" else "memory", url)
        if scheme in ("redis", "rediss") or (shared and scheme in ("lmdb", "qdrant+local")):
            db = urlsplit(url).path.strip("/") if scheme.startswith("redis") else ""
            return Cache("redis", f"redis://{redis_host}:{REDIS_PORT}/{db or 0}")
        if scheme in ("qdrant", "qdrants"):
            return Cache("qdrant", f"qdrant://{qdrant_host}:{QDRANT_PORT}")
        if scheme == "qdrant+local":
            return Cache("qdrant-local", f"qdrant+local://{QDRANT_LOCAL_DIR}")
        if scheme == "lmdb":
            query = rest.partition("?")[2]
            return Cache("lmdb", f"lmdb://{LMDB_DIR}" + (f"?{query}" if query else ""))
        raise DeployError(f"cache {url!r} cannot be deployed (lmdb://, redis://, qdrant://, memory:// or none)")

    def upstreams(self, address: dict[str, str] | None = None) -> list[str]:
        """The gateway's ``--upstream`` values: ``POOL=URL`` per worker, or per pool where ``address`` gives
        one URL for a whole pool (a DNS name)."""
        if address is not None:
            return [f"{pool}={address[pool]}" for pool in self.pools]
        return [f"{w.pool}=http://{w.service}:{WORKER_PORT}" for w in self.workers]

    def gateway_settings_env(self, upstreams: list[str], cache: Cache) -> dict[str, str]:
        """The gateway's whole non-secret configuration as environment variables."""
        env = dict(self.gateway_env)
        env[GatewaySettings.env_name("host")] = "0.0.0.0"
        env[GatewaySettings.env_name("port")] = str(self.gateway.port)
        env[GatewaySettings.env_name("upstream")] = json.dumps(upstreams)
        env[GatewaySettings.env_name("cache")] = cache.url
        return env

    @property
    def health_path(self) -> str:
        """The route every health check calls."""
        return "/health"

    @property
    def scheme(self) -> str:
        """The gateway's scheme (HTTPS when the config gives it a certificate)."""
        return "https" if self.gateway.tls_cert else "http"


def env_value(value: Any) -> str:
    """A setting as an environment variable holds it: lists as JSON (pydantic-settings reads them so)."""
    if isinstance(value, list | tuple | dict):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def make_plan(fleet: FleetSettings, gateway: GatewaySettings, config: Path | None, gpus: int,
              cpus: int | None = None, workers: bool = True) -> Plan:
    """The plan for a target host with ``gpus`` GPUs (and ``cpus`` cores: the default of CPU replicas);
    without ``workers``, the gateway's part alone."""
    try:
        specs = declared(fleet, [str(i) for i in range(gpus)], cpus) if workers else []
    except ConfigError as exc:
        raise DeployError(f"{exc} (deploy plans for target hosts with --gpus {gpus} GPU(s))") from None
    planned: list[Worker] = []
    notes: list[str] = []
    for spec in specs:
        if spec.model is None:
            notes.append(f"instance {spec.name} is an external server ({spec.url}): not deployed")
            continue
        gpu = None if spec.device == "cpu" else spec.device.partition(":")[2] or "0"
        values: dict[str, Any] = {**instance_options(spec), "model": spec.model,
                                  "served_model_name": spec.served_name, "host": "0.0.0.0",
                                  "port": WORKER_PORT, "device": "cpu" if gpu is None else "cuda:0",
                                  "data_dir": WORKER_DATA, "log_level": fleet.log_level,
                                  "log_format": fleet.log_format, "exit_on_load_failure": True}
        worker = Worker(spec.name, spec.pool, spec.model, gpu, ["worker", *settings_flags(values)])
        if worker.local_model:
            notes.append(f"instance {spec.name}: model folder {spec.model} is mounted read-only from the host "
                         "(Compose); in Kubernetes, put it in the image or on a volume at that path")
        planned.append(worker)
    if workers and not planned:
        raise DeployError("the configuration declares no worker to deploy")
    table = load_config_table(config, GatewaySettings.table)
    fixed = {"upstream", "cache", "host", "port", *SECRET_SETTINGS}
    env = {GatewaySettings.env_name(k): env_value(getattr(gateway, k)) for k in table if k not in fixed}
    secrets = {GatewaySettings.env_name(k): env_value(getattr(gateway, k)) for k in SECRET_SETTINGS
               if getattr(gateway, k)}
    for name in ("api_key_file", "tls_cert", "tls_key", "tls_client_ca"):
        if getattr(gateway, name) is not None:
            notes.append(f"[gateway] {name} = {getattr(gateway, name)}: mount that file into the gateway "
                         "container at the same path")
    if table.get("upstream"):
        notes.append("[gateway] upstream is replaced by the deployed workers")
    return Plan(fleet, gateway, planned, env, secrets, notes)
