"""The generated nginx.conf for real: in front of two real gateways (sharing one worker), it carries traffic,
and when one gateway is killed mid-load, nginx retries the requests that were on it on the other: no
request fails.

The config is generated for two gateway hosts and then rewritten to this machine: their addresses to
the gateways' loopback ports, the listen address to a free loopback port, the pid file into tmp.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from embedfleet.cli import app
from embedfleet.deploy.healthcheck import healthy
from tests.gateway.support import wait_for
from tests.helpers import GatewayProcess, WorkerProcess, free_port, stop_process

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("nginx") is None,
                                 reason="nginx is not on PATH (`make debian-packages` installs it; CI does)")]

CLIENTS = 4


@pytest.fixture
def nginx_conf(tmp_path: Path) -> Path:
    config = tmp_path / "embedfleet.toml"
    config.write_text("[gateway]\nport = 8080\n")
    out = tmp_path / "nginx"
    result = CliRunner().invoke(app, ["deploy", "nginx", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "nginx.conf"


class Nginx:
    """nginx in the foreground on a config, stopped at the end."""

    def __init__(self, conf: Path, prefix: Path) -> None:
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        self.log = prefix / "nginx.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                                         stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def gateways(worker: WorkerProcess, data_dir: Path, tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    started = [GatewayProcess(["--upstream", worker.url, "--cache", "memory://"], data_dir, tmp_path / f"g{i}")
               for i in range(2)]
    try:
        for g in started:
            g.start(wait=False)
        for g in started:
            g.wait_healthy()
        yield started
    finally:
        for g in started:
            g.stop()


def test_nginx_balances_and_fails_over(nginx_conf: Path, gateways: list[GatewayProcess], tmp_path: Path) -> None:
    port = free_port()
    text = nginx_conf.read_text()
    assert "server gateway-1:8080 " in text and "server gateway-2:8080 " in text and "listen 80;" in text
    text = text.replace("gateway-1:8080", f"127.0.0.1:{gateways[0].port}")
    text = text.replace("gateway-2:8080", f"127.0.0.1:{gateways[1].port}")
    text = text.replace("listen 80;", f"listen 127.0.0.1:{port};")
    text = re.sub(r"^pid .*;$", f"pid {tmp_path / 'nginx.pid'};", text, flags=re.M)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    nginx = Nginx(conf, tmp_path / "prefix")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(f"{url}/health", timeout=1), "nginx answers /health", timeout=30)
        assert all(healthy(f"{g.url}/health") for g in gateways)

        failures: list[str] = []
        cut_mid_answer: list[str] = []
        done = 0
        lock = threading.Lock()
        stop = threading.Event()

        def client(n: int) -> None:
            nonlocal done
            with httpx.Client(base_url=url, timeout=60) as c:
                i = 0
                while not stop.is_set():
                    i += 1
                    body = {"inputs": [f"nginx client {n} text {i} {time.monotonic()}"]}
                    problem = ""
                    for attempt in range(2):
                        try:
                            r = c.post("/embed", json=body)
                            ok = r.status_code == 200 and len(r.json()[0]) == 384
                            problem = "" if ok else f"{r.status_code} {r.text[:200]}"
                        except httpx.RemoteProtocolError as exc:
                            # An answer the killed gateway had begun to send: nginx has passed its first bytes on
                            # and cannot retry it, so the client does (embedding is idempotent), once.
                            problem = repr(exc)
                            if attempt == 0:
                                with lock:
                                    cut_mid_answer.append(problem)
                                continue
                        except httpx.HTTPError as exc:
                            problem = repr(exc)
                        break
                    with lock:
                        done += 1
                        if problem:
                            failures.append(problem)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: done >= 40, "40 requests through nginx", timeout=60)
            served = [g.metric("embedfleet_request_duration_seconds_count", route="/embed") for g in gateways]
            assert all(s > 0 for s in served), served  # least_conn spread the load over both
            gateways[0].kill()  # SIGKILL mid-load: requests on it are cut
            killed_at = done
            wait_for(lambda: done >= killed_at + 60, "60 more requests after the kill", timeout=120)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=90)
        assert failures == []
        assert len(cut_mid_answer) <= CLIENTS  # at most the answers under way on the killed gateway
        # nginx saw the killed gateway fail requests (cut in flight, or refused) and passed them on.
        cut = [line for line in nginx.log.read_text().splitlines() if "[error]" in line
               and f"127.0.0.1:{gateways[0].port}" in line]
        assert cut, "nginx never saw the killed gateway fail"
        assert not healthy(f"{gateways[0].url}/health", timeout=1)
        assert gateways[1].metric("embedfleet_request_duration_seconds_count", route="/embed") > served[1] + 50
        assert nginx.proc.poll() is None
    finally:
        nginx.stop()
