"""``embedfleet deploy compose``: a docker-compose.yml for one host.

One worker service per planned instance (one per GPU, pinned with ``device_ids``, or one per CPU
replica: ``[fleet] replicas`` is the one setting that changes how many), the gateway, the shared cache
the config asks for (Redis or Qdrant), Prometheus and Grafana with the dashboard provisioned.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from embedfleet.deploy import files, monitoring
from embedfleet.deploy.plan import (
    HF_HOME,
    LMDB_DIR,
    QDRANT_LOCAL_DIR,
    QDRANT_PORT,
    REDIS_PORT,
    WORKER_DATA,
    WORKER_PORT,
    Plan,
    Worker,
)

HEALTH_INTERVAL = "10s"
WORKER_START_PERIOD = "600s"
"""A worker's first start may download a model and export it to ONNX."""
RESTART = "unless-stopped"
REDIS_IMAGE = "redis:7-alpine"
QDRANT_IMAGE = "qdrant/qdrant:v1.12.4"
PROMETHEUS_IMAGE = "prom/prometheus:v2.55.1"
GRAFANA_IMAGE = "grafana/grafana:11.3.0"
SECRETS_FILE = "gateway-secrets.env"


def healthcheck(url: str, start_period: str = "30s") -> dict[str, Any]:
    """A Compose healthcheck calling ``url`` from inside the container."""
    return {"test": ["CMD", "python", "-m", "embedfleet.deploy.healthcheck", url], "interval": HEALTH_INTERVAL,
            "timeout": "6s", "retries": 3, "start_period": start_period}


def _build(plan: Plan, gpu: bool, out: Path) -> dict[str, Any]:
    """Where the image comes from: built from this source checkout when there is one."""
    root = files.source_root()
    if root is None:
        return {"image": plan.image(gpu)}
    dockerfile = files.DOCKERFILES["cuda" if gpu else "cpu"].relative_to(root)
    return {"image": plan.image(gpu), "build": {"context": os.path.relpath(root, out.resolve()),
                                                "dockerfile": str(dockerfile)}}


def _worker(plan: Plan, w: Worker, out: Path) -> dict[str, Any]:
    service: dict[str, Any] = {
        **_build(plan, w.gpu is not None, out),
        "command": w.args,
        "environment": {"HF_HOME": HF_HOME, "EMBEDFLEET_HEALTH_URL": f"http://127.0.0.1:{WORKER_PORT}/health"},
        "volumes": [f"hf-cache:{HF_HOME}", f"fleet-data:{WORKER_DATA}"]
        + ([f"{w.local_model}:{w.local_model}:ro"] if w.local_model else []),
        "expose": [str(WORKER_PORT)],
        "healthcheck": healthcheck(f"http://127.0.0.1:{WORKER_PORT}/health", WORKER_START_PERIOD),
        "restart": RESTART,
    }
    if w.gpu is not None:
        service["deploy"] = {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "device_ids": [w.gpu], "capabilities": ["gpu"]}]}}}
    return service


def render(plan: Plan, out: Path) -> dict[str, str]:
    """The files, by path relative to ``out``."""
    cache = plan.cache()
    port = plan.gateway.port
    health = f"{plan.scheme}://127.0.0.1:{port}/health"
    services: dict[str, Any] = {w.service: _worker(plan, w, out) for w in plan.workers}
    volumes: dict[str, Any] = {"hf-cache": {}, "fleet-data": {}}
    # The gateway admits workers as they turn healthy: one that never does must not hold the gateway back.
    depends: dict[str, Any] = {w.service: {"condition": "service_started"} for w in plan.workers}
    if cache.kind == "redis":
        services["redis"] = {"image": REDIS_IMAGE, "command": ["redis-server", "--appendonly", "yes"],
                             "volumes": ["redis-data:/data"], "expose": [str(REDIS_PORT)],
                             "healthcheck": {"test": ["CMD", "redis-cli", "ping"], "interval": HEALTH_INTERVAL,
                                             "timeout": "5s", "retries": 3},
                             "restart": RESTART}
        volumes["redis-data"] = {}
        depends["redis"] = {"condition": "service_healthy"}
    elif cache.kind == "qdrant":
        services["qdrant"] = {"image": QDRANT_IMAGE, "volumes": ["qdrant-data:/qdrant/storage"],
                              "expose": [str(QDRANT_PORT)], "restart": RESTART}
        volumes["qdrant-data"] = {}
        depends["qdrant"] = {"condition": "service_started"}
    gateway_volumes = []
    if cache.kind == "lmdb":
        gateway_volumes.append(f"lmdb-cache:{LMDB_DIR}")
        volumes["lmdb-cache"] = {}
    elif cache.kind == "qdrant-local":
        gateway_volumes.append(f"qdrant-data:{QDRANT_LOCAL_DIR}")
        volumes["qdrant-data"] = {}
    gateway: dict[str, Any] = {
        **_build(plan, False, out),
        "command": ["gateway"],
        "environment": {**plan.gateway_settings_env(plan.upstreams(), cache), "EMBEDFLEET_HEALTH_URL": health},
        "ports": [f"{port}:{port}"],
        "depends_on": depends,
        "healthcheck": healthcheck(health),
        "restart": RESTART,
    }
    if gateway_volumes:
        gateway["volumes"] = gateway_volumes
    if plan.secrets:
        gateway["env_file"] = [SECRETS_FILE]
    services["gateway"] = gateway
    services["prometheus"] = {"image": PROMETHEUS_IMAGE, "volumes": [
        "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro", "prometheus-data:/prometheus"],
        "ports": ["9090:9090"], "restart": RESTART}
    services["grafana"] = {"image": GRAFANA_IMAGE, "volumes": [
        "./grafana/provisioning:/etc/grafana/provisioning:ro", "./grafana/dashboards:/var/lib/grafana/dashboards:ro",
        "grafana-data:/var/lib/grafana"], "ports": ["3000:3000"], "depends_on": ["prometheus"], "restart": RESTART}
    volumes.update({"prometheus-data": {}, "grafana-data": {}})
    compose = {"services": services, "volumes": volumes}
    scrape = monitoring.prometheus_static(plan, f"gateway:{port}", [f"{w.service}:{WORKER_PORT}" for w in plan.workers])
    result = {
        "docker-compose.yml": files.to_yaml(compose),
        "prometheus/prometheus.yml": files.to_yaml(scrape),
        "grafana/provisioning/datasources/prometheus.yml": files.to_yaml(
            monitoring.grafana_datasource("http://prometheus:9090")),
        "grafana/provisioning/dashboards/embedfleet.yml": files.to_yaml(
            monitoring.grafana_dashboards("/var/lib/grafana/dashboards")),
        "grafana/dashboards/embedfleet.json": files.to_json(files.dashboard()),
        **files.dockerfiles(),
    }
    if plan.secrets:
        result[SECRETS_FILE] = "".join(f"{k}={v}\n" for k, v in plan.secrets.items())
    return result
