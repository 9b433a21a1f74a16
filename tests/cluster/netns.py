"""Hosts on one machine: network namespaces joined by veth pairs to a bridge, and processes started in them.

A :class:`Cluster` makes one namespace per host plus one for the bridge (``PREFIX + "br"``), so nothing
it makes lives in the root namespace: every host's ``eth0`` is one end of a veth pair whose other end is
a port of the bridge, and the only addresses are the hosts' own, from 198.18.0.0/24 (within
198.18.0.0/15, the range reserved for network benchmarks). No namespace has a route out, so traffic
never leaves them. Processes run as ``ip netns exec NS ...`` (``ip`` execs the command, so the PID is the
process's own) and inherit the environment (``PYTHONPATH`` included). :meth:`Cluster.destroy` stops
every process and deletes every namespace; :meth:`Cluster.create` first removes what a crashed run with
the same prefix left behind (processes found in its namespaces, then the namespaces).

Used by tests/cluster and benchmarks/cluster.py (with different prefixes, so neither removes the other's).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUBNET_PREFIX = "198.18.0."
PREFIX_LEN = 24
CLIENT_SCRIPT = Path(__file__).with_name("client.py")
STOP_TIMEOUT_S = 15.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"efprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Proc:
    """A process started in a host's namespace."""

    name: str
    host: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    def log(self) -> str:
        """What it printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would, and reap."""
        if self.running:
            self.popen.kill()
        self.popen.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if not self.running:
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Cluster:
    """Namespaces ``prefix + host`` on a bridge in ``prefix + "br"``; hosts map names to the last octet."""

    prefix: str
    hosts: dict[str, int]
    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def ns(self, host: str) -> str:
        """A host's namespace."""
        return self.prefix + host

    def ip(self, host: str) -> str:
        """A host's address."""
        return f"{SUBNET_PREFIX}{self.hosts[host]}"

    @property
    def bridge_ns(self) -> str:
        """The bridge's namespace."""
        return self.prefix + "br"

    def _ours(self) -> list[str]:
        listed = _ip("netns", "list", check=False).stdout.split("\n")
        return [line.split()[0] for line in listed if line.strip() and line.split()[0].startswith(self.prefix)]

    def _remove(self, namespaces: list[str]) -> None:
        for ns in namespaces:
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)  # left over from a run of ours with this prefix
            _ip("netns", "del", ns, check=False)

    def create(self) -> Cluster:
        """Remove leftovers with this prefix, then make the bridge and the hosts."""
        self._remove(self._ours())
        self.workdir.mkdir(parents=True, exist_ok=True)
        br = self.bridge_ns
        _ip("netns", "add", br)
        _ip("-n", br, "link", "set", "lo", "up")
        _ip("-n", br, "link", "add", "name", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for host in self.hosts:
            ns = self.ns(host)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # Made inside the bridge's namespace with its peer inside the host's: never in the root one.
            _ip("-n", br, "link", "add", "name", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", br, "link", "set", "dev", host, "master", "br0")
            _ip("-n", br, "link", "set", "dev", host, "up")
            _ip("-n", ns, "addr", "add", f"{self.ip(host)}/{PREFIX_LEN}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        return self

    def destroy(self) -> None:
        """Stop every process, then delete every namespace with this prefix."""
        for proc in self.procs:
            with contextlib.suppress(Exception):  # keep going: the namespaces must go whatever happens
                proc.stop()
        self._remove(self._ours())

    def cut(self, host: str) -> None:
        """Pull the host's cable: its bridge port goes down; packets to and from it are dropped (peers'
        connections hang, they are not refused)."""
        _ip("-n", self.bridge_ns, "link", "set", "dev", host, "down")

    def plug(self, host: str) -> None:
        """Put the host's cable back."""
        _ip("-n", self.bridge_ns, "link", "set", "dev", host, "up")

    def spawn(self, name: str, host: str, cmd: list[str], url: str = "", **popen: Any) -> Proc:
        """Start ``cmd`` in the host's namespace, its output to ``workdir/name.log``."""
        log_path = self.workdir / f"{name}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **popen.pop("env", {})}
        with open(log_path, "ab") as log:
            popen.setdefault("stdout", log)
            popen.setdefault("stderr", subprocess.STDOUT)
            process = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *cmd], env=env,
                                       stdin=subprocess.DEVNULL, **popen)
        proc = Proc(name, host, process, log_path, url)
        self.procs.append(proc)
        return proc

    def client(self, *args: str, timeout: float = 120.0) -> Any:
        """Run tests/cluster/client.py with ``args`` on the ``client`` host; its JSON answer."""
        done = subprocess.run(["ip", "netns", "exec", self.ns("client"), sys.executable, str(CLIENT_SCRIPT), *args],
                              capture_output=True, text=True, timeout=timeout, env=os.environ)
        if done.returncode != 0:
            raise RuntimeError(f"client {args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
        return json.loads(done.stdout)

    def wait_healthy(self, procs: list[Proc], timeout: float = 240.0) -> None:
        """Block until each process answers /health 200 from the client host (fail with its log otherwise)."""
        deadline = time.monotonic() + timeout
        for proc in procs:
            while True:
                if not proc.running:
                    raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()[-4000:]}")
                if self.client("get", f"{proc.url}/health", "--timeout", "2")["status"] == 200:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{proc.name} not healthy after {timeout}s:\n{proc.log()[-4000:]}")
                time.sleep(0.2)  # poll interval only: readiness is the /health answer

    def metrics(self, proc: Proc) -> str:
        """A process's /metrics text, read from the client host."""
        answer = self.client("get", f"{proc.url}/metrics")
        assert answer["status"] == 200, answer
        text: str = answer["body"]
        return text


def worker_cmd(cluster: Cluster, host: str, data_dir: Path, port: int = 8081, *extra: str) -> list[str]:
    """``embedfleet worker`` with the default model, one thread, on the host's address."""
    return [sys.executable, "-m", "embedfleet.cli", "worker", "--host", cluster.ip(host), "--port", str(port),
            "--model", "default", "--threads", "1", "--data-dir", str(data_dir), *extra]


def gateway_cmd(cluster: Cluster, host: str, upstreams: list[str], cache: str, port: int = 8080,
                *extra: str) -> list[str]:
    """``embedfleet gateway`` on the host's address."""
    cmd = [sys.executable, "-m", "embedfleet.cli", "gateway", "--host", cluster.ip(host), "--port", str(port),
           "--cache", cache]
    for url in upstreams:
        cmd += ["--upstream", url]
    return [*cmd, *extra]


def redis_cmd(cluster: Cluster, host: str, workdir: Path, port: int = 6379) -> list[str]:
    """``redis-server`` on the host's address, nothing persisted."""
    return [shutil.which("redis-server") or "redis-server", "--bind", cluster.ip(host), "--port", str(port),
            "--save", "", "--appendonly", "no", "--protected-mode", "no", "--dir", str(workdir),
            "--daemonize", "no", "--logfile", ""]


class Load:
    """``client.py load`` running on the client host: its per-request records as they come, and its summary."""

    def __init__(self, cluster: Cluster, *args: str) -> None:
        self.records: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self._proc = subprocess.Popen(["ip", "netns", "exec", cluster.ns("client"), sys.executable,
                                       str(CLIENT_SCRIPT), "load", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=os.environ, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            record = json.loads(line)
            if "summary" in record:
                self.summary = record["summary"]
            else:
                self.records.append(record)

    @property
    def done(self) -> int:
        """Requests completed so far."""
        return len(self.records)

    def wait(self, count: int, timeout: float = 120.0) -> None:
        """Block until ``count`` requests have completed in all."""
        deadline = time.monotonic() + timeout
        while len(self.records) < count:
            if self._proc.poll() is not None and not self._reader.is_alive():
                raise RuntimeError(f"load ended early: {self._stderr()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.records)} of {count} requests completed in {timeout}s")
            time.sleep(0.05)  # poll interval only

    def stop(self, timeout: float = 120.0) -> dict[str, Any]:
        """SIGTERM (the requests under way finish), then the summary."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        return self.finish(timeout)

    def finish(self, timeout: float = 300.0) -> dict[str, Any]:
        """Wait for the load to end by itself; the summary."""
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=STOP_TIMEOUT_S)
        self._reader.join(timeout=STOP_TIMEOUT_S)
        if self.summary is None:
            raise RuntimeError(f"load printed no summary: {self._stderr()}")
        return self.summary

    def _stderr(self) -> str:
        return self._proc.stderr.read()[-2000:] if self._proc.stderr is not None and self._proc.poll() is not None \
            else ""
