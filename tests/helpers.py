"""Test helpers: a real worker process on a free loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import trustme

START_TIMEOUT_S = 240.0


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM a process that still runs, then SIGKILL it if it has not exited after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA's files: a server certificate for 127.0.0.1 with its key, the CA certificate, and a client
    certificate (``client``: its key and chain in one PEM file; ``client_cert``: the same as trustme's object)."""

    ca: trustme.CA
    cert: Path
    key: Path
    ca_file: Path
    client: Path
    client_cert: trustme.LeafCert

    @classmethod
    def make(cls, folder: Path, client_name: str = "client@example.test") -> TlsFiles:
        """Issue the certificates and write them into ``folder``."""
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1")
        files = cls(ca, folder / "cert.pem", folder / "key.pem", folder / "ca.pem", folder / "client.pem",
                    ca.issue_cert(client_name))
        server.private_key_and_cert_chain_pem.write_to_path(str(files.cert))
        server.private_key_pem.write_to_path(str(files.key))
        ca.cert_pem.write_to_path(str(files.ca_file))
        files.client_cert.private_key_and_cert_chain_pem.write_to_path(str(files.client))
        return files

    @property
    def server_args(self) -> list[str]:
        """A gateway's flags for HTTPS that asks clients for a certificate of this CA (mTLS)."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-client-ca", str(self.ca_file)]


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class WorkerProcess:
    """``embedfleet worker`` (or another command) in a subprocess, waited for with a deadline, always stopped."""

    command = "worker"

    def __init__(self, args: list[str], data_dir: Path, log_dir: Path, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.args = args
        self.data_dir = data_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.command}.log"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.verify: object = True  # httpx's verify= for HTTPS servers
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> WorkerProcess:
        """Start; with ``wait``, block until /health is 200 (fail with the log if it never is)."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **self.env}
        cmd = [sys.executable, "-m", "embedfleet.cli", self.command, "--host", "127.0.0.1", "--port", str(self.port),
               *self._extra_args(), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_healthy()
        return self

    def _extra_args(self) -> list[str]:
        return ["--data-dir", str(self.data_dir)]

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        """Poll /health until 200, the process dies, or the deadline passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2, verify=self.verify).status_code == 200:  # type: ignore[arg-type]
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"worker not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        """What the worker printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def post(self, route: str, body: Any, **kwargs: Any) -> httpx.Response:
        """POST JSON to the worker."""
        return httpx.post(f"{self.url}{route}", json=body, timeout=60, **kwargs)

    def request_delete(self, route: str = "/cache") -> int:
        """DELETE a route; returns the status."""
        return httpx.delete(f"{self.url}{route}", timeout=30).status_code

    def get(self, route: str) -> httpx.Response:
        """GET from the worker."""
        return httpx.get(f"{self.url}{route}", timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class GatewayProcess(WorkerProcess):
    """``embedfleet gateway`` in a subprocess; ``args`` carry --upstream and --cache."""

    command = "gateway"

    def _extra_args(self) -> list[str]:
        return ["--health-interval", "0.2"]


def load_openapi() -> dict[str, Any]:
    """TEI's OpenAPI document (copied into tests/data)."""
    spec: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "tei-openapi.json").read_text())
    return spec


def validate_schema(instance: Any, schema_name: str) -> None:
    """Validate a response body against one of TEI's component schemas (OpenAPI 3.0 rules)."""
    from openapi_schema_validator import OAS30Validator

    spec = load_openapi()
    schema = dict(spec["components"]["schemas"][schema_name])
    schema["components"] = spec["components"]
    OAS30Validator(schema).validate(instance)


class ServeProcess(WorkerProcess):
    """``embedfleet serve`` in a subprocess; its settings come from a TOML config in ``args``."""

    command = "serve"

    def _extra_args(self) -> list[str]:
        return []

    def start(self, wait: bool = True) -> ServeProcess:
        """Start; with ``wait``, block until the fleet prints its "ready" line (every instance settled)."""
        seen = self.log().count("ready: ")
        super().start(wait)
        deadline = time.monotonic() + START_TIMEOUT_S
        while wait and self.log().count("ready: ") <= seen:
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve never got ready (exit code {self.proc.poll()}):\n{self.log()[-4000:]}")
            time.sleep(0.1)
        return self

    def admin(self, method: str, route: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        """Call the admin API."""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, f"{self.url}/admin{route}", headers=headers, timeout=120, **kwargs)

    def instance(self, name: str) -> dict[str, Any]:
        """One instance's description."""
        r = self.admin("GET", f"/instances/{name}")
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    def wait_instance(self, name: str, predicate: Any, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Poll an instance until ``predicate(description)`` holds; fail with the serve log if it never does."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.instance(name)
            if predicate(last):
                return last
            time.sleep(0.1)
        raise TimeoutError(f"instance {name} never got there; last: {last}\n{self.log()[-4000:]}")
