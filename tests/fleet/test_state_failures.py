"""When the fleet's state cannot be saved (a full disk, a read-only folder), admin changes fail with a
JSON error and a stable code, and nothing changes: what the API says, what runs and what a restarted
fleet restores never disagree. The state file is made unwritable by putting a directory in its place,
which stops root too (tests and CI run as root, for whom permissions are no obstacle)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.helpers import ServeProcess, free_port

pytestmark = pytest.mark.slow


def _serve(tmp: Path, data_dir: Path) -> ServeProcess:
    config = tmp / "embedfleet.toml"
    config.write_text(f"""
[fleet]
state_dir = "{tmp / 'state'}"
health_interval = 0.2

[[fleet.instances]]  # declared, so no default workers are started
name = "remote"
url = "http://127.0.0.1:{free_port()}"

[gateway]
cache = "memory://"
""")
    return ServeProcess(["--config", str(config)], data_dir, tmp / "log")


def _answering(proc: ServeProcess) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if proc.admin("GET", "/instances").status_code == 200:
                return
        except Exception:  # not listening yet
            assert proc.proc is not None and proc.proc.poll() is None, proc.log()
        assert time.monotonic() < deadline, proc.log()
        time.sleep(0.1)


def _names(proc: ServeProcess) -> set[str]:
    return {i["name"] for i in proc.admin("GET", "/instances").json()["instances"]}


def test_a_change_that_cannot_be_saved_is_not_made(tmp_path: Path, data_dir: Path) -> None:
    state = tmp_path / "state" / "state.json"
    external = {"url": f"http://127.0.0.1:{free_port()}"}  # nobody listens: it stays unhealthy
    proc = _serve(tmp_path, data_dir)
    proc.start(wait=False)
    try:
        _answering(proc)
        assert proc.admin("POST", "/instances", json={"name": "kept", **external}).status_code == 201
        saved = state.with_name("saved.json")
        state.rename(saved)
        state.mkdir()  # every save now fails
        for method, route, body in (("POST", "/instances", {"name": "never", **external}),
                                    ("DELETE", "/instances/kept", None),
                                    ("POST", "/instances/kept/stop", None)):
            r = proc.admin(method, route, json=body)
            assert r.status_code == 507, (route, r.text)
            assert r.json()["code"] == "STATE_NOT_SAVED" and "timestamp" in r.json()
        assert _names(proc) == {"remote", "kept"}
        assert proc.instance("kept")["state"] != "stopped"
        state.rmdir()
        saved.rename(state)  # what was saved last
    finally:
        proc.stop()
    proc.start(wait=False)  # the saved state: "kept" and nothing else
    try:
        _answering(proc)
        assert _names(proc) == {"remote", "kept"}
        assert proc.admin("DELETE", "/instances/kept").status_code == 200
    finally:
        proc.stop()
    proc.start(wait=False)
    try:
        _answering(proc)
        assert _names(proc) == {"remote"}
    finally:
        proc.stop()
    shutil.rmtree(tmp_path / "state", ignore_errors=True)
