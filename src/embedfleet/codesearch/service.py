"""The embedding service code search uses when no ``--url`` is given: ``embedfleet serve`` started as a
subprocess on a free loopback port, with the default (or given) model, an optional reranker, and the
gateway's LMDB cache under the code-search data dir (so re-embedding an unchanged chunk is a cache hit,
across runs). It is stopped (SIGTERM, then SIGKILL) when the command ends."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from embedfleet.codesearch.errors import CodeSearchError
from embedfleet.config import CodesearchSettings, usable_cpus

START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 20.0
RERANKER_POOL = "reranker"


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _toml(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


class LocalService:
    """``with LocalService(settings) as url: ...``: a gateway and its workers for the block's duration."""

    def __init__(self, settings: CodesearchSettings, with_reranker: bool = False) -> None:
        self.settings = settings
        self.with_reranker = with_reranker and settings.reranker is not None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    def _config(self, folder: Path) -> Path:
        s = self.settings
        lines = ["[fleet]", f"state_dir = {_toml(folder / 'state')}", "",
                 "[[fleet.instances]]", 'name = "embed"', f"model = {_toml(s.model or 'default')}",
                 f"replicas = {s.replicas or usable_cpus()}", "threads = 1", ""]
        if self.with_reranker:
            lines += ["[[fleet.instances]]", 'name = "rerank"', f"model = {_toml(s.reranker)}",
                      f'served_name = "{RERANKER_POOL}"', 'task = "reranker"', "threads = 1", ""]
        lines += ["[gateway]", f"cache = {_toml('lmdb://' + str(s.data_dir / 'cache'))}"]
        path = folder / "embedfleet.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def start(self) -> str:
        """Start and wait until the gateway is healthy; returns its URL."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="embedfleet-codesearch-")
        folder = Path(self._tmp.name)
        config = self._config(folder)
        self.log_path = folder / "serve.log"
        cmd = [sys.executable, "-m", "embedfleet.cli", "serve", "--config", str(config), "--host", "127.0.0.1",
               "--port", str(self.port)]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                self.stop()
                raise CodeSearchError(f"the local embedding service exited ({self._proc.returncode}):\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise CodeSearchError(f"the local embedding service was not ready after {START_TIMEOUT_S:.0f}s")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; remove the temporary folder."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=STOP_TIMEOUT_S)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
