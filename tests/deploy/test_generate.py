"""``embedfleet deploy``: the files it writes, checked by the tools that read them.

``docker-compose config -q`` (Debian's docker-compose validates without a Docker engine), Kubernetes'
JSON schemas through kubernetes-validate (a current Kubernetes version, strict: unknown fields fail),
and ``nginx -t``. The tools come from `make debian-packages`; a test whose tool is missing is skipped
with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from embedfleet.cli import app

KUBERNETES_VERSION = "1.35.0"
"""A current Kubernetes release that kubernetes-validate ships the schemas of."""
DOCKER_COMPOSE = shutil.which("docker-compose")
NGINX = shutil.which("nginx")
needs_compose = pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose is not on PATH "
                                   "(`make debian-packages` installs it; CI does)")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not on PATH (`make debian-packages` installs it)")

CONFIGS = {
    # The default: CPU workers of the default model, LMDB cache, no keys.
    "cpu-lmdb": "[fleet]\nreplicas = 3\nthreads = 2\n[gateway]\ncache = \"lmdb:///srv/cache?max_size=8GiB\"\n",
    # GPUs, Redis, keys, a gateway limit.
    "gpu-redis": ("[fleet]\ndevices = [\"0\", \"1\"]\n[gateway]\ncache = \"redis://10.0.0.5:6379/2\"\nport = 9000\n"
                  "api_key = [\"secret-key\"]\nadmin_key = \"secret-admin\"\npayload_limit = 4000000\n"
                  "max_client_batch_size = 512\nupstream_timeout = 30\n"),
    # Two models (an embedder on two GPUs and a reranker on the CPU), Qdrant.
    "instances-qdrant": ("[[fleet.instances]]\nname = \"embed\"\nmodel = \"BAAI/bge-small-en-v1.5\"\nreplicas = 2\n"
                         "devices = [\"0\", \"1\"]\n[[fleet.instances]]\nname = \"rerank\"\n"
                         "model = \"/models/reranker\"\nserved_name = \"reranker\"\ndevice = \"cpu\"\nthreads = 4\n"
                         "[gateway]\ncache = \"qdrant://qdrant.internal:6333\"\n"),
}


GPUS = {"cpu-lmdb": "0", "gpu-redis": "2", "instances-qdrant": "2"}
"""GPUs of the target hosts."""


def pool(command: list[str]) -> str:
    """A worker's pool: its served name, else its model."""
    flag = "--served-model-name" if "--served-model-name" in command else "--model"
    return command[command.index(flag) + 1]


def deploy(tmp_path: Path, kind: str, config: str, *args: str) -> tuple[Path, str]:
    """Run ``embedfleet deploy KIND`` on a config; the output folder and what it printed."""
    source = tmp_path / f"{kind}.toml"
    source.write_text(config)
    out = tmp_path / kind
    result = CliRunner().invoke(app, ["deploy", kind, "--config", str(source), "--out", str(out), *args],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return out, result.output


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param, CONFIGS[request.param]


@needs_compose
def test_compose_files_validate(tmp_path: Path, case: tuple[str, str]) -> None:
    name, config = case
    out, printed = deploy(tmp_path, "compose", config, "--gpus", GPUS[name])
    assert f"wrote {out / 'docker-compose.yml'}" in printed
    check = subprocess.run([DOCKER_COMPOSE or "docker-compose", "config", "-q"], cwd=out, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    compose = yaml.safe_load((out / "docker-compose.yml").read_text())
    services = compose["services"]
    workers = {k: v for k, v in services.items() if k.startswith("worker-")}
    gateway = services["gateway"]
    for service in [*workers.values(), gateway]:
        assert service["restart"] == "unless-stopped"
        assert service["healthcheck"]["test"][-1].endswith("/health")
    env = gateway["environment"]
    upstreams = json.loads(env["EMBEDFLEET_GATEWAY_UPSTREAM"])
    assert sorted(upstreams) == sorted(f"{pool(w['command'])}=http://{k}:8081" for k, w in workers.items())
    assert {"hf-cache", "fleet-data"} <= set(compose["volumes"])
    provisioning = out / "grafana" / "provisioning"
    assert (out / "grafana" / "dashboards" / "embedfleet.json").is_file()
    assert yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    scrape = yaml.safe_load((out / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][1]["static_configs"][0]["targets"] == [f"{k}:8081" for k in workers]
    assert (out / "docker" / "Dockerfile.cpu").is_file()
    if name == "cpu-lmdb":  # [fleet] replicas: one service per CPU replica
        assert len(workers) == 3 and all("deploy" not in w for w in workers.values())
        assert env["EMBEDFLEET_GATEWAY_CACHE"] == "lmdb:///var/lib/embedfleet/cache?max_size=8GiB"
        assert "lmdb-cache" in compose["volumes"] and "redis" not in services
        assert gateway["ports"] == ["8080:8080"]
    if name == "gpu-redis":  # one per GPU, pinned; secrets apart from the compose file
        assert [w["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for w in workers.values()] \
            == [["0"], ["1"]]
        assert env["EMBEDFLEET_GATEWAY_CACHE"] == "redis://redis:6379/2" and "redis" in services
        assert gateway["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert gateway["ports"] == ["9000:9000"] and env["EMBEDFLEET_GATEWAY_PAYLOAD_LIMIT"] == "4000000"
        assert "secret-key" not in (out / "docker-compose.yml").read_text()
        secrets = out / "gateway-secrets.env"
        assert "secret-key" in secrets.read_text() and secrets.stat().st_mode & 0o077 == 0
    if name == "instances-qdrant":
        assert env["EMBEDFLEET_GATEWAY_CACHE"] == "qdrant://qdrant:6333" and "qdrant" in services
        rerank = workers["worker-rerank"]
        assert "/models/reranker:/models/reranker:ro" in rerank["volumes"] and "deploy" not in rerank
        assert "mounted read-only" in printed


def test_replicas_flag_is_the_one_setting(tmp_path: Path) -> None:
    out, _ = deploy(tmp_path, "compose", CONFIGS["cpu-lmdb"], "--replicas", "5")
    services = yaml.safe_load((out / "docker-compose.yml").read_text())["services"]
    assert sorted(k for k in services if k.startswith("worker-")) == [f"worker-default-{i}" for i in range(5)]


def test_k8s_manifests_validate(tmp_path: Path, case: tuple[str, str]) -> None:
    import kubernetes_validate

    name, config = case
    out, printed = deploy(tmp_path, "k8s", config, "--gpus", GPUS[name])
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    resources = [d for f in kustomization["resources"] for d in load_all(out / f)]
    assert sorted(kustomization["resources"]) == sorted(p.name for p in out.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")
    for resource in resources:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    kinds = {(r["kind"], r["metadata"]["name"]) for r in resources}
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"):
        assert (kind, "embedfleet-gateway") in kinds
    config_map = next(r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] ==
                      "embedfleet-gateway")["data"]
    assert "secret-key" not in json.dumps(resources) and "secret-admin" not in json.dumps(resources)  # a Secret
    gateway = next(r for r in resources if r["kind"] == "Deployment" and r["metadata"]["name"] ==
                   "embedfleet-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "embedfleet-gateway-secrets", "optional": True}} in gateway["envFrom"]
    workers = [r for r in resources if r["kind"] == "Deployment" and "workers" in r["metadata"]["name"]]
    headless = {r["metadata"]["name"] for r in resources if r["kind"] == "Service" and
                r["spec"].get("clusterIP") == "None"}
    assert {w["metadata"]["name"] for w in workers} == headless
    upstreams = json.loads(config_map["EMBEDFLEET_GATEWAY_UPSTREAM"])
    assert all("=dns+http://embedfleet-workers-" in u for u in upstreams) and len(upstreams) == len(workers)
    for w in workers:
        container = w["spec"]["template"]["spec"]["containers"][0]
        assert {"readinessProbe", "livenessProbe", "startupProbe"} <= set(container)
        assert any(m["mountPath"] == "/var/lib/embedfleet/huggingface" for m in container["volumeMounts"])
    monitoring = {r["metadata"]["name"]: r for r in resources if r["metadata"]["name"].startswith("embedfleet-")
                  and r["kind"] == "ConfigMap"}
    assert json.loads(monitoring["embedfleet-grafana-dashboard"]["data"]["embedfleet.json"])["panels"]
    assert "dns_sd_configs" in monitoring["embedfleet-prometheus"]["data"]["prometheus.yml"]
    if name == "gpu-redis":
        (embed,) = workers
        assert embed["spec"]["replicas"] == 2
        assert embed["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
        assert config_map["EMBEDFLEET_GATEWAY_CACHE"] == "redis://embedfleet-redis:6379/2"
        assert "kubectl create secret generic embedfleet-gateway-secrets" in printed
    if name == "cpu-lmdb":  # LMDB is per pod: gateway replicas share Redis instead
        assert config_map["EMBEDFLEET_GATEWAY_CACHE"] == "redis://embedfleet-redis:6379/0"
        assert workers[0]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "2"
    if name == "instances-qdrant":
        assert sorted(w["metadata"]["name"] for w in workers) == ["embedfleet-workers-baai-bge-small-en-v1-5",
                                                                  "embedfleet-workers-reranker"]
        assert config_map["EMBEDFLEET_GATEWAY_CACHE"] == "qdrant://qdrant.internal:6333"  # not deployed: as given
        assert "Qdrant is not deployed" in printed


@needs_nginx
def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    out, _ = deploy(tmp_path, "nginx", CONFIGS["gpu-redis"], "--gateway", "127.0.0.1",
                          "--gateway", "127.0.0.2:9100", "--listen", "127.0.0.1:18080")
    conf = (out / "nginx.conf").read_text()
    assert "server 127.0.0.1:9000 " in conf and "server 127.0.0.2:9100 " in conf  # the gateway's port by default
    for directive in ("least_conn;", "keepalive 64;", "client_max_body_size 4000000;",
                      "proxy_next_upstream error timeout http_502 http_503 non_idempotent;",
                      "max_conns=1024", 'proxy_set_header Connection "";'):
        assert directive in conf
    # The read timeout allows the gateway's slowest valid request: its timeout, twice, plus a full batch of
    # 512 inputs of 512 tokens at 250 tokens a second.
    assert "proxy_read_timeout 1109s;" in conf
    (tmp_path / "logs").mkdir()
    check = subprocess.run([NGINX or "nginx", "-t", "-p", str(tmp_path), "-c", str(out / "nginx.conf")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and "test is successful" in check.stderr, check.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "eighty"], "--listen"), (["--gateway", "a b"], "--gateway")])
def test_nginx_rejects_bad_addresses(tmp_path: Path, args: list[str], message: str) -> None:
    source = tmp_path / "c.toml"
    source.write_text("")
    result = CliRunner().invoke(app, ["deploy", "nginx", "--config", str(source), "--out", str(tmp_path / "o"),
                                      *args])
    assert result.exit_code == 2 and message in result.output


def test_bad_configs_are_clear_errors(tmp_path: Path) -> None:
    source = tmp_path / "c.toml"
    source.write_text("[fleet]\ndevices = [\"3\"]\n")
    result = CliRunner().invoke(app, ["deploy", "compose", "--config", str(source), "--out", str(tmp_path / "o"),
                                      "--gpus", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "does not exist" in result.output
    source.write_text("[gateway]\ncache = \"nosuch://x\"\n")
    result = CliRunner().invoke(app, ["deploy", "k8s", "--config", str(source), "--out", str(tmp_path / "o")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "cannot be deployed" in result.output
