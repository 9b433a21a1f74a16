"""``embedfleet serve`` for real: a gateway, two default-model workers and a tiny reranker, on 127.0.0.1.

The tests share one fleet and run in file order: the last ones restart it (gracefully, then with -9).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.fleet.loadgen import Load
from tests.fleet.procs import assert_gone
from tests.helpers import ServeProcess, free_port

pytestmark = pytest.mark.slow

ERROR_KEYS = {"error", "code", "timestamp"}
GRPC_PORT = free_port()


def _config(tmp: Path, reranker: Path, low: int, grpc_port: int) -> Path:
    path = tmp / "embedfleet.toml"
    path.write_text(f"""
[fleet]
state_dir = "{tmp / 'state'}"
port_range = "{low}-{low + 40}"
health_interval = 0.5
health_failures = 2
max_restarts = 2
max_instances = 8
stop_timeout = 10

[[fleet.instances]]
name = "embed"
model = "default"
replicas = 2
threads = 1

[[fleet.instances]]
name = "rerank"
model = "{reranker}"
served_name = "reranker"
task = "reranker"
threads = 1
backend = "torch"

[gateway]
cache = "lmdb://{tmp / 'cache'}"
grpc_port = {grpc_port}
""")
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path],
          data_dir: Path) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("fleet")
    config = _config(tmp, tiny_models["reranker"], 21000 + free_port() % 20000, GRPC_PORT)
    proc = ServeProcess(["--config", str(config)], data_dir, tmp / "log",
                        env={"EMBEDFLEET_FLEET_DATA_DIR": str(data_dir)})
    with proc:
        yield proc


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert set(body) == ERROR_KEYS and body["code"] == code, body
    return body


def test_serve_is_ready_embeds_hits_and_reranks(fleet: ServeProcess) -> None:
    instances = {i["name"]: i for i in fleet.admin("GET", "/instances").json()["instances"]}
    assert set(instances) == {"embed-0", "embed-1", "rerank"}
    assert {i["state"] for i in instances.values()} == {"running"}
    assert instances["rerank"]["task"] == "reranker" and instances["embed-0"]["dimension"] == 384
    assert len({i["port"] for i in instances.values()}) == 3 and all(i["pid"] for i in instances.values())
    deadline = time.monotonic() + 10  # the line follows the last instance's readiness
    while "ready: http://127.0.0.1:" not in fleet.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "ready: http://127.0.0.1:" in fleet.log() and "3/3 instance(s) running" in fleet.log()

    body = {"inputs": ["fleet test one", "fleet test two"]}
    first = fleet.post("/embed", body)
    second = fleet.post("/embed", body)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    assert second.headers["x-cache"] == "hit" and second.json() == first.json()
    ranked = fleet.post("/rerank", {"query": "q", "texts": ["a", "b"]})
    assert ranked.status_code == 200 and len(ranked.json()) == 2
    models = {m["id"] for m in fleet.get("/v1/models").json()["data"]}
    assert models == {"default", "reranker"}
    assert fleet.metric("embedfleet_instances", state="running") == 3
    assert fleet.metric("embedfleet_instance_up", instance="rerank") == 1


def test_grpc_targets_name_the_fleets_instances(fleet: ServeProcess, grpc_stubs: SimpleNamespace) -> None:
    """A multiplexer Target names an instance (by name or index), whose pool serves the request."""
    import grpc

    mx, tei = grpc_stubs.mx, grpc_stubs.tei
    assert f"gRPC on 127.0.0.1:{GRPC_PORT}" in fleet.log()
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        m = grpc_stubs.mx_grpc.TeiMultiplexerStub(channel)
        assert m.Info(mx.InfoRequest(target=mx.Target(instance_name="rerank"))).model_type == tei.MODEL_TYPE_RERANKER
        names = [i["name"] for i in fleet.admin("GET", "/instances").json()["instances"]]
        for i, name in enumerate(names):
            by_index = m.Info(mx.InfoRequest(target=mx.Target(instance_index=i)))
            assert by_index.model_type == (tei.MODEL_TYPE_RERANKER if name == "rerank" else tei.MODEL_TYPE_EMBEDDING)
        one = m.Embed(mx.EmbedRequest(target=mx.Target(instance_name="embed-1"), request=tei.EmbedRequest(inputs="x")))
        assert len(one.embeddings) == 384
        with pytest.raises(grpc.RpcError) as info:
            m.Info(mx.InfoRequest(target=mx.Target(instance_name="nope")))
        err: Any = info.value
        assert err.code() == grpc.StatusCode.NOT_FOUND and "embed-0 (default)" in err.details()


def test_admin_api_error_codes(fleet: ServeProcess) -> None:
    _error(fleet.admin("GET", "/instances/nope"), 404, "INSTANCE_NOT_FOUND")
    _error(fleet.admin("POST", "/instances/nope/stop"), 404, "INSTANCE_NOT_FOUND")
    _error(fleet.admin("POST", "/instances", json={"name": "embed-0", "model": "default"}), 409, "INSTANCE_EXISTS")
    _error(fleet.admin("POST", "/instances", json={"name": "p", "model": "default", "port": fleet.port}),
           409, "PORT_CONFLICT")
    taken = fleet.instance("embed-0")["port"]
    _error(fleet.admin("POST", "/instances", json={"name": "p", "model": "default", "port": taken}),
           409, "PORT_CONFLICT")
    _error(fleet.admin("POST", "/instances/embed-0/start"), 409, "ALREADY_RUNNING")
    _error(fleet.admin("POST", "/instances", json={"name": "many", "model": "default", "replicas": 6}),
           422, "MAX_INSTANCES_REACHED")
    _error(fleet.admin("POST", "/instances", json={"name": "g", "model": "default", "device": "cuda:0"}),
           422, "INVALID_DEVICE")
    _error(fleet.admin("POST", "/instances", json={"name": "g", "model": "default", "gpu_id": 3}),
           422, "INVALID_DEVICE")
    for bad in ({"name": "../etc", "model": "default"}, {"name": "a/b", "model": "default"},
                {"name": "x"}, {"name": "x", "model": "default", "replicas": 0}, {"model": "default"}, [1]):
        _error(fleet.admin("POST", "/instances", json=bad), 422, "VALIDATION_ERROR")
    _error(fleet.admin("POST", "/instances", content=b"{not json"), 422, "VALIDATION_ERROR")
    _error(fleet.admin("GET", "/models/nope%2Fmissing"), 404, "MODEL_NOT_FOUND")
    assert fleet.admin("GET", "/models/default").json()["state"] in ("downloaded", "verified")
    assert fleet.admin("GET", "/instances").status_code == 200  # nothing above changed the fleet
    assert len(fleet.admin("GET", "/instances").json()["instances"]) == 3


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedfleet.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_cli_clients(fleet: ServeProcess) -> None:
    status = _cli("status", "--url", fleet.url)
    assert status.returncode == 0, status.stderr
    assert "embed-0" in status.stdout and "running" in status.stdout and "reranker" in status.stdout
    logs = _cli("instances", "logs", "embed-0", "--tail", "5", "--url", fleet.url)
    assert logs.returncode == 0 and len(logs.stdout.splitlines()) == 5
    models = _cli("models", "ls", "--url", fleet.url)
    assert models.returncode == 0 and "default" in models.stdout
    missing = _cli("instances", "stop", "nope", "--url", fleet.url)
    assert missing.returncode == 2 and "INSTANCE_NOT_FOUND" in missing.stderr
    down = _cli("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 2 and "cannot reach" in down.stderr


def test_external_instance_lifecycle(fleet: ServeProcess) -> None:
    """A TEI-compatible server registered by URL is routed to, stopped, started and deleted, never spawned."""
    rerank_url = fleet.instance("rerank")["url"]
    r = fleet.admin("POST", "/instances?wait=true", json={"name": "ext", "url": rerank_url,
                                                          "served_name": "reranker-ext"})
    assert r.status_code == 201, r.text
    ext = r.json()["instances"][0]
    assert ext["state"] == "running" and ext["external"] and ext["pid"] is None
    routed = fleet.post("/rerank", {"query": "q", "texts": ["a"]}, headers={"x-model": "reranker-ext"})
    assert routed.status_code == 200
    assert fleet.admin("POST", "/instances/ext/stop").json()["state"] == "stopped"
    _error(fleet.admin("POST", "/instances/ext/stop"), 409, "NOT_RUNNING")
    assert fleet.post("/rerank", {"query": "q", "texts": ["a"]}, headers={"x-model": "reranker-ext"}).status_code \
        == 503
    assert fleet.admin("POST", "/instances/ext/start?wait=true").json()["state"] == "running"
    assert fleet.admin("DELETE", "/instances/ext").status_code == 200
    _error(fleet.admin("GET", "/instances/ext"), 404, "INSTANCE_NOT_FOUND")
    gone = fleet.post("/rerank", {"query": "q", "texts": ["a"]}, headers={"x-model": "reranker-ext"})
    assert gone.status_code == 404


def test_kill_9_worker_under_load_is_restarted_without_failed_requests(fleet: ServeProcess) -> None:
    before = fleet.instance("embed-0")
    with Load(fleet.url, "kill") as load:
        load.wait_for(20)
        os.kill(before["pid"], signal.SIGKILL)
        after = fleet.wait_instance("embed-0", lambda i: i["state"] == "running" and i["restarts"] == 1
                                    and i["pid"] != before["pid"])
        load.wait_for(20)  # and the load keeps flowing after it
    load.outcomes.assert_all_ok(at_least=40)  # every request sent got its 3 vectors: none failed, none vanished
    assert after["pid"] and fleet.metric("embedfleet_instance_restarts_total", instance="embed-0") == 1
    assert fleet.instance("embed-1")["restarts"] == 0


def test_a_worker_that_keeps_crashing_ends_failed(fleet: ServeProcess, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    r = fleet.admin("POST", "/instances", json={"name": "broken", "model": str(broken)})
    assert r.status_code == 201 and r.json()["instances"][0]["state"] == "starting"
    failed = fleet.wait_instance("broken", lambda i: i["state"] == "failed", timeout=180)
    assert failed["restarts"] == 2 and failed["pid"] is None
    assert "exited with code 3" in failed["last_error"]
    lines = fleet.admin("GET", "/instances/broken/logs?tail=200").json()["lines"]
    assert any("model failed to load" in line for line in lines)
    assert any("gave up after 2 restarts" in line for line in lines)
    listed = {m["id"]: m for m in fleet.admin("GET", "/models").json()["models"]}
    assert listed[str(broken)]["source"] == "local"  # an instance's model is listed in the registry
    assert fleet.admin("DELETE", "/instances/broken").status_code == 200


def test_stopped_instance_stays_stopped_across_checks_and_restarts(fleet: ServeProcess) -> None:
    with Load(fleet.url, "stop") as load:  # a replica stopped under load is drained first: nothing fails
        load.wait_for(20)
        stopped = fleet.admin("POST", "/instances/embed-1/stop").json()
        load.wait_for(20)
    load.outcomes.assert_all_ok(at_least=40)
    assert stopped["state"] == "stopped" and stopped["stopped_by_user"] and stopped["pid"] is None
    deadline = time.monotonic() + 3  # six health-check intervals: nothing may start it again
    while time.monotonic() < deadline:
        assert fleet.instance("embed-1")["state"] == "stopped"
        time.sleep(0.25)
    assert fleet.post("/embed", {"inputs": "still served by embed-0"}).status_code == 200

    fleet.stop()  # SIGTERM: graceful
    assert fleet.proc is not None and fleet.proc.returncode == 0, fleet.log()[-3000:]
    fleet.start()
    assert fleet.instance("embed-1")["state"] == "stopped"
    fleet.wait_instance("embed-0", lambda i: i["state"] == "running")


def test_kill_9_serve_then_start_again_brings_back_the_same_instances(fleet: ServeProcess) -> None:
    added = fleet.admin("POST", "/instances?wait=true", json={"name": "extra", "model": "default", "threads": 1})
    assert added.status_code == 201 and added.json()["instances"][0]["state"] == "running", added.text
    pids = [fleet.instance(n)["pid"] for n in ("embed-0", "extra", "rerank")]
    fleet.kill()
    assert_gone(pids)  # the workers die with the fleet (no orphans holding ports)
    fleet.start()
    for name in ("embed-0", "rerank", "extra"):
        fleet.wait_instance(name, lambda i: i["state"] not in ("pending", "starting"))
    states = {i["name"]: i["state"] for i in fleet.admin("GET", "/instances").json()["instances"]}
    assert states == {"embed-0": "running", "embed-1": "stopped", "rerank": "running", "extra": "running"}
    assert fleet.post("/embed", {"inputs": "fleet test one"}).headers["x-cache"] == "hit"  # LMDB survived

