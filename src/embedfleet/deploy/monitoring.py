"""Prometheus scrape configs and Grafana provisioning for the generated stacks."""

from __future__ import annotations

from typing import Any

from embedfleet.deploy.plan import Plan

SCRAPE_INTERVAL = "15s"
DATASOURCE_UID = "prometheus"
"""The Prometheus data source's uid, which the dashboard's panels name."""
GATEWAY_JOB = "embedfleet-gateway"
WORKERS_JOB = "embedfleet-workers"


def prometheus_static(plan: Plan, gateway: str, workers: list[str]) -> dict[str, Any]:
    """A scrape config with fixed targets (Compose: service names)."""
    return {"global": {"scrape_interval": SCRAPE_INTERVAL},
            "scrape_configs": [
                {"job_name": GATEWAY_JOB, "scheme": plan.scheme, "tls_config": {"insecure_skip_verify": True},
                 "static_configs": [{"targets": [gateway]}]},
                {"job_name": WORKERS_JOB, "static_configs": [{"targets": workers}]}]}


def prometheus_dns(plan: Plan, gateway: tuple[str, int], workers: list[tuple[str, int]]) -> dict[str, Any]:
    """A scrape config that finds every replica by DNS (Kubernetes headless Services: one A record per pod)."""
    def dns(names: list[tuple[str, int]]) -> list[dict[str, Any]]:
        return [{"names": [name], "type": "A", "port": port} for name, port in names]

    return {"global": {"scrape_interval": SCRAPE_INTERVAL},
            "scrape_configs": [
                {"job_name": GATEWAY_JOB, "scheme": plan.scheme, "tls_config": {"insecure_skip_verify": True},
                 "dns_sd_configs": dns([gateway])},
                {"job_name": WORKERS_JOB, "dns_sd_configs": dns(workers)}]}


def grafana_datasource(prometheus_url: str) -> dict[str, Any]:
    """Grafana's data source provisioning file."""
    return {"apiVersion": 1, "datasources": [{"name": "Prometheus", "type": "prometheus", "uid": DATASOURCE_UID,
                                              "access": "proxy", "url": prometheus_url, "isDefault": True}]}


def grafana_dashboards(folder: str) -> dict[str, Any]:
    """Grafana's dashboard provider: the JSON files in ``folder``."""
    return {"apiVersion": 1, "providers": [{"name": "embedfleet", "type": "file", "disableDeletion": False,
                                            "options": {"path": folder}}]}
