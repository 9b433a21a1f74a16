"""The gateway settings `embedfleet deploy k8s` renders into its ConfigMap are what a real gateway reads: a
gateway started with nothing but those variables (the workers' DNS name pointed at this machine) serves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from embedfleet.cli import app
from tests.helpers import GatewayProcess, WorkerProcess

pytestmark = pytest.mark.slow


def test_configmap_settings_start_a_gateway(worker: WorkerProcess, data_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "embedfleet.toml"
    config.write_text('[fleet]\nreplicas = 1\n[gateway]\ncache = "memory://"\nmax_client_batch_size = 64\n'
                      'upstream_dns_interval = 0.5\n')
    out = tmp_path / "k8s"
    result = CliRunner().invoke(app, ["deploy", "k8s", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    config_map = next(d for d in yaml.safe_load_all((out / "gateway.yaml").read_text()) if d["kind"] == "ConfigMap")
    env = dict(config_map["data"])
    upstreams = json.loads(env["EMBEDFLEET_GATEWAY_UPSTREAM"])
    assert upstreams == ["default=dns+http://embedfleet-workers-default:8081"]
    env["EMBEDFLEET_GATEWAY_UPSTREAM"] = json.dumps([f"default=dns+http://127.0.0.1:{worker.port}"])
    gateway = GatewayProcess(["--config", os.devnull], data_dir, tmp_path / "gateway", env=env)
    with gateway:
        info = gateway.get("/info").json()
        assert info["upstreams"] == [{"url": worker.url, "healthy": True, "kept_out": None}]
        assert info["max_client_batch_size"] == 64  # the config's setting, through the ConfigMap
        r = gateway.post("/embed", {"inputs": ["rendered settings"]})
        assert r.status_code == 200 and len(r.json()[0]) == 384
