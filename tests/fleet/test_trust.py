"""The fleet's trust model: /admin is never open to the network by accident, external instances point
only where they are allowed (at a server's root), and an external server that answers /health but cannot
join its pool is checked again after a growing back-off, not in a tight loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import ValidationError

from embedfleet.config import ConfigError, FleetSettings, GatewaySettings
from embedfleet.fleet.errors import FleetError, FleetErrorCode
from embedfleet.fleet.serve import check_exposure
from embedfleet.fleet.spec import InstanceRequest, InstanceSpec
from embedfleet.fleet.supervisor import Supervisor, SupervisorSettings
from tests.helpers import ServeProcess


def test_admin_without_keys_is_never_exposed_by_accident(tmp_path: Path) -> None:
    fleet = FleetSettings(state_dir=tmp_path)
    with pytest.raises(ConfigError, match="admin key"):
        check_exposure(fleet, GatewaySettings(host="0.0.0.0", cache="memory://"))
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(fleet, GatewaySettings(host=host, cache="memory://"))
    check_exposure(fleet, GatewaySettings(host="0.0.0.0", cache="memory://", admin_key="k"))
    check_exposure(fleet, GatewaySettings(host="0.0.0.0", cache="memory://", api_key=["k"]))  # /admin: 403
    check_exposure(FleetSettings(state_dir=tmp_path, allow_open_admin=True),
                   GatewaySettings(host="0.0.0.0", cache="memory://"))


class _NoPools:
    def ensure(self, name: str) -> None:
        pass


def test_external_instances_point_only_at_allowed_hosts_and_server_roots(tmp_path: Path) -> None:
    for bad in ("http://tei.internal:8080/base", "http://user:pw@tei.internal:8080", "ftp://tei.internal"):
        with pytest.raises(ValidationError):
            InstanceRequest(name="x", url=bad)
    assert InstanceRequest(name="x", url="http://tei.internal:8080/").url == "http://tei.internal:8080"
    fleet = FleetSettings(state_dir=tmp_path, external_hosts=["tei.internal:8080", "Other.Internal"])
    supervisor = Supervisor(SupervisorSettings.of(fleet, gpus=[]), _NoPools())  # type: ignore[arg-type]
    supervisor.check_external(InstanceSpec(name="a", url="http://tei.internal:8080"))
    supervisor.check_external(InstanceSpec(name="b", url="https://other.internal:9000"))
    with pytest.raises(FleetError) as refused:
        supervisor.check_external(InstanceSpec(name="c", url="http://elsewhere:8080"))
    assert refused.value.code is FleetErrorCode.VALIDATION_ERROR
    with pytest.raises(FleetError):
        supervisor.check_external(InstanceSpec(name="d", url="http://tei.internal:9999"))


class _HealthyButBroken(BaseHTTPRequestHandler):
    """Answers /health, fails /info: an instance that can never join its pool. Counts the calls."""

    calls: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.calls.append(self.path)
        self.send_response(200 if self.path == "/health" else 500)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def broken_server() -> Iterator[str]:
    _HealthyButBroken.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HealthyButBroken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_an_external_server_that_cannot_join_is_not_hammered(tmp_path: Path, data_dir: Path,
                                                              broken_server: str) -> None:
    config = tmp_path / "embedfleet.toml"
    config.write_text(f"""
[fleet]
state_dir = "{tmp_path / 'state'}"
health_interval = 0.1
external_hosts = ["127.0.0.1"]

[[fleet.instances]]
name = "broken"
url = "{broken_server}"

[gateway]
cache = "memory://"
""")
    proc = ServeProcess(["--config", str(config)], data_dir, tmp_path / "log")
    proc.start(wait=False)
    try:
        deadline = time.monotonic() + 60
        while not any(c == "/info" for c in _HealthyButBroken.calls):
            assert time.monotonic() < deadline and proc.proc is not None and proc.proc.poll() is None, proc.log()
            time.sleep(0.1)
        first = time.monotonic()
        while time.monotonic() - first < 4.0:  # a tight loop makes hundreds of calls a second
            time.sleep(0.2)
        infos = _HealthyButBroken.calls.count("/info")
        assert 2 <= infos <= 5, (infos, len(_HealthyButBroken.calls))  # back-off 1, 2, 4 s...
        described = proc.instance("broken")
        assert described["state"] == "unhealthy" and "/info failed" in described["last_error"]
        denied = proc.admin("POST", "/instances", json={"name": "far", "url": "http://127.0.0.2:8080"})
        assert denied.status_code == 422 and denied.json()["code"] == "VALIDATION_ERROR"
        based = proc.admin("POST", "/instances", json={"name": "based", "url": f"{broken_server}/tei"})
        assert based.status_code == 422 and based.json()["code"] == "VALIDATION_ERROR"
    finally:
        proc.stop()
