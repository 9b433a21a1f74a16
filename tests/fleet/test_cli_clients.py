"""The CLI clients and the admin API's restart and verify, against one running ``embedfleet serve``.

Each CLI command runs as ``python -m embedfleet.cli ... --url URL``: it must exit 0, its output must name
what it acted on, and the effect must show through the admin API. The fleet serves the default model
with one single-thread worker; the tests run in file order but each leaves the fleet as it found it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.fleet.procs import assert_gone, one_worker_config
from tests.helpers import ServeProcess

pytestmark = pytest.mark.slow


def _config(tmp: Path, data_dir: Path) -> Path:
    return one_worker_config(tmp, data_dir, health_interval=0.5, stop_timeout=10)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("cli-fleet")
    # An empty Hugging Face cache of its own: the registry lists only what the tests add.
    proc = ServeProcess(["--config", str(_config(tmp, data_dir))], data_dir, tmp / "log",
                        env={"HF_HOME": str(tmp / "hf")})
    with proc:
        yield proc


def cli(fleet: ServeProcess, *args: str) -> str:
    """Run ``embedfleet ARGS --url URL``; assert exit code 0; its standard output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDFLEET_")}
    done = subprocess.run([sys.executable, "-m", "embedfleet.cli", *args, "--url", fleet.url], capture_output=True,
                          text=True, timeout=600, env={**env, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, f"embedfleet {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


def row(output: str, first: str) -> str:
    """The table row whose first cell is ``first``."""
    rows = [line for line in output.splitlines() if line.strip("│┃ ").startswith(f"{first} ")]
    assert len(rows) == 1, f"no single row for {first!r} in:\n{output}"
    return rows[0]


def model(fleet: ServeProcess, model_id: str) -> dict[str, Any]:
    """One model's record from the admin API."""
    r = fleet.admin("GET", f"/models/{quote(model_id, safe='')}")
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def test_cli_instances_add_ls_stop_start_restart_logs_rm(fleet: ServeProcess) -> None:
    listed = cli(fleet, "instances", "ls")
    assert "running" in row(listed, "embed") and "default" in row(listed, "embed")

    added = cli(fleet, "instances", "add", "extra", "--model", "default", "--threads", "1")  # waits
    assert "running" in row(added, "extra")
    extra = fleet.instance("extra")
    assert extra["state"] == "running" and extra["pid"] and extra["spec"]["threads"] == 1
    assert f" {extra['pid']} " in row(cli(fleet, "instances", "ls"), "extra")

    stopped = cli(fleet, "instances", "stop", "extra")
    assert "stopped" in row(stopped, "extra")
    now = fleet.instance("extra")
    assert now["state"] == "stopped" and now["stopped_by_user"] and now["pid"] is None
    assert_gone([extra["pid"]])

    started = cli(fleet, "instances", "start", "extra")
    assert "running" in row(started, "extra")
    now = fleet.instance("extra")
    assert now["state"] == "running" and not now["stopped_by_user"] and now["pid"] not in (None, extra["pid"])
    assert f" {now['pid']} " in row(started, "extra")

    restarted = cli(fleet, "instances", "restart", "extra")
    assert "running" in row(restarted, "extra")
    after = fleet.instance("extra")
    assert after["state"] == "running" and after["pid"] not in (None, now["pid"])
    assert_gone([now["pid"]])

    logs = cli(fleet, "instances", "logs", "extra", "--tail", "3").splitlines()
    assert len(logs) == 3, logs
    everything = fleet.admin("GET", "/instances/extra/logs?tail=1000").json()["lines"]
    assert any(everything[k:k + 3] == logs for k in range(len(everything))), logs  # the instance's own lines
    assert any(f"ready at {after['url']}" in line for line in everything[-20:])

    removed = cli(fleet, "instances", "rm", "extra")
    assert "removed extra" in removed
    assert fleet.admin("GET", "/instances/extra").json()["code"] == "INSTANCE_NOT_FOUND"
    assert_gone([after["pid"]])
    assert "extra" not in cli(fleet, "instances", "ls")


def test_admin_restart_gives_a_new_worker(fleet: ServeProcess) -> None:
    before = fleet.instance("embed")
    r = fleet.admin("POST", "/instances/embed/restart?wait=true")
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["state"] == "running" and after["pid"] not in (None, before["pid"])
    assert after["restarts"] == before["restarts"]  # a user's restart is not a crash
    assert fleet.instance("embed")["pid"] == after["pid"]
    assert_gone([before["pid"]])
    assert fleet.post("/embed", {"inputs": "served by the new worker"}).status_code == 200


def test_cli_models_ls_add_verify(fleet: ServeProcess, tiny_models: dict[str, Path]) -> None:
    listed = cli(fleet, "models", "ls")
    assert "packaged" in row(listed, "default")

    hub = cli(fleet, "models", "add", "test-org/not-here")
    assert "available" in row(hub, "test-org/not-here") and "registered" in row(hub, "test-org/not-here")
    assert model(fleet, "test-org/not-here")["state"] == "available"

    folder = str(tiny_models["reranker"].resolve())
    added = cli(fleet, "models", "add", folder)
    assert "downloaded" in row(added, folder) and "local" in row(added, folder)
    assert model(fleet, folder)["state"] == "downloaded"

    verified = cli(fleet, "models", "verify", folder)  # waits for the outcome
    assert "verified" in row(verified, folder) and "reranker" in row(verified, folder)
    record = model(fleet, folder)
    assert (record["state"], record["task"], record["dimension"], record["max_input_length"]) == \
        ("verified", "reranker", 1, 128)

    listed = cli(fleet, "models", "ls")
    assert "verified" in row(listed, folder) and "available" in row(listed, "test-org/not-here")


def test_admin_verify_in_the_background(fleet: ServeProcess) -> None:
    r = fleet.admin("POST", "/models/default/verify")
    assert r.status_code == 202 and r.json()["state"] == "verifying", r.text
    deadline = time.monotonic() + 300
    record = model(fleet, "default")
    while record["state"] == "verifying":
        assert time.monotonic() < deadline, record
        time.sleep(0.1)
        record = model(fleet, "default")
    assert record["state"] == "verified" and record["error"] is None, record
    assert (record["task"], record["dimension"], record["max_input_length"], record["pooling"]) == \
        ("embedding", 384, 256, "mean")
    assert record["sha"] and len(record["sha"]) == 40
    assert "verified" in row(cli(fleet, "models", "ls"), "default")
