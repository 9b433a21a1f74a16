"""``embedfleet serve`` start-up and admin security, with external instances only (no model to load)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServeProcess, free_port

pytestmark = pytest.mark.slow


def _serve(tmp: Path, data_dir: Path, gateway: str = "") -> ServeProcess:
    dead = f"http://127.0.0.1:{free_port()}"  # nobody listens: the instance stays unhealthy
    config = tmp / "embedfleet.toml"
    config.write_text(f"""
[fleet]
state_dir = "{tmp / 'state'}"
health_interval = 0.2

[[fleet.instances]]
name = "remote"
url = "{dead}"
served_name = "remote-model"

[gateway]
cache = "memory://"
{gateway}
""")
    return ServeProcess(["--config", str(config)], data_dir, tmp / "log")


def _first_answer(proc: ServeProcess, key: str | None = None) -> httpx.Response:
    """GET /admin/instances once the service listens (with a deadline)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return proc.admin("GET", "/instances", key=key)
        except httpx.TransportError:
            assert proc.proc is not None and proc.proc.poll() is None, proc.log()
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def test_corrupt_state_file_is_moved_aside_and_the_service_starts(tmp_path: Path, data_dir: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text('{"instances": [ {"spec": ')  # torn write
    proc = _serve(tmp_path, data_dir)
    proc.start(wait=False)
    try:
        assert _first_answer(proc).status_code == 200
        remote = proc.instance("remote")
        assert remote["state"] == "unhealthy" and remote["external"] and "ConnectError" in remote["last_error"]
        aside = list(state.glob("state.json.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_text().startswith('{"instances"')
        assert "moved aside" in proc.log() or "corrupt" in proc.log()
        assert (state / "state.json").exists()  # a new, valid one
        r = proc.post("/embed", {"inputs": "x"}, headers={"x-model": "remote-model"})
        assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy"
    finally:
        proc.stop()
    assert proc.proc is not None and proc.proc.returncode == 0


def test_a_second_serve_on_the_same_state_is_refused(tmp_path: Path, data_dir: Path) -> None:
    first = _serve(tmp_path, data_dir)
    first.start(wait=False)
    try:
        assert _first_answer(first).status_code == 200
        second = _serve(tmp_path, data_dir)
        second.log_path = tmp_path / "second.log"
        second.start(wait=False)
        assert second.proc is not None and second.proc.wait(timeout=60) == 2
        assert "state" in second.log() and "lock" in second.log()
    finally:
        first.stop()


def test_admin_routes_need_the_admin_key_when_keys_are_configured(tmp_path: Path, data_dir: Path) -> None:
    proc = _serve(tmp_path, data_dir, gateway='api_key = ["user-key"]\nadmin_key = "admin-key"')
    proc.start(wait=False)
    try:
        assert _first_answer(proc, key="admin-key").status_code == 200
        for key, status, code in ((None, 401, "UNAUTHORIZED"), ("user-key", 401, "UNAUTHORIZED"),
                                  ("wrong", 401, "UNAUTHORIZED")):
            r = proc.admin("GET", "/instances", key=key)
            assert r.status_code == status and r.json()["code"] == code and "timestamp" in r.json()
        assert proc.admin("POST", "/instances/remote/stop", key="user-key").status_code == 401
        assert proc.admin("POST", "/instances/remote/stop", key="admin-key").json()["state"] == "stopped"
    finally:
        proc.stop()


def test_admin_routes_are_forbidden_with_api_keys_but_no_admin_key(tmp_path: Path, data_dir: Path) -> None:
    proc = _serve(tmp_path, data_dir, gateway='api_key = ["user-key"]')
    proc.start(wait=False)
    try:
        r = _first_answer(proc, key="user-key")
        assert r.status_code == 403 and r.json()["code"] == "FORBIDDEN"
    finally:
        proc.stop()


def test_every_admin_error_has_the_admin_shape(tmp_path: Path, data_dir: Path) -> None:
    proc = _serve(tmp_path, data_dir, gateway='admin_key = "admin-key"\npayload_limit = 2000')
    proc.start(wait=False)
    try:
        assert _first_answer(proc, key="admin-key").status_code == 200
        cases = [
            (proc.admin("GET", "/nothing-here", key="admin-key"), 404, "NOT_FOUND"),  # FastAPI's own 404
            (proc.admin("PUT", "/instances", key="admin-key"), 405, "METHOD_NOT_ALLOWED"),
            (proc.admin("GET", "/instances/remote/logs?tail=5000", key="admin-key"), 422, "VALIDATION_ERROR"),
            (proc.admin("POST", "/instances?timeout=0", key="admin-key", json={"name": "x", "model": "m"}), 422,
             "VALIDATION_ERROR"),
            (proc.admin("POST", "/instances", key="admin-key", json={"name": "x" * 5000}), 413, "PAYLOAD_TOO_LARGE"),
            (proc.admin("GET", "/instances/nobody", key="admin-key"), 404, "INSTANCE_NOT_FOUND"),
            (proc.admin("GET", "/instances"), 401, "UNAUTHORIZED"),
        ]
        for r, status, code in cases:
            assert r.status_code == status, (code, r.text)
            assert set(r.json()) == {"error", "code", "timestamp"} and r.json()["code"] == code, r.text
        # Embedding routes need no key here (no API keys), and keep TEI's shape.
        r = proc.post("/nothing-here", {})
        assert r.status_code == 404 and r.json()["error_type"] == "NotFound"
    finally:
        proc.stop()


def test_admin_is_open_without_any_key(tmp_path: Path, data_dir: Path) -> None:
    proc = _serve(tmp_path, data_dir)
    proc.start(wait=False)
    try:
        assert _first_answer(proc).status_code == 200
        assert httpx.delete(f"{proc.url}/cache", timeout=30).status_code == 200  # the gateway's admin route too
    finally:
        proc.stop()
