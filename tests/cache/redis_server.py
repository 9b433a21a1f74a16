"""A real ``redis-server`` for tests: free loopback port, no persistence, waited for with a deadline.

Reusable by any test that needs Redis (the cache store's, the gateway's)::

    with RedisServer() as server:
        store = RedisStore(server.url)
        ...
        server.kill()    # SIGKILL: Redis is gone, as after a crash
        server.start()   # the same port again, empty (nothing is persisted)

Tests that use it should carry ``@needs_redis_server`` so they skip, with a reason, where
``redis-server`` is not installed (CI installs it).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import pytest

from tests.helpers import free_port

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0

needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not on PATH (install the redis-server package; CI does)")


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis server answers PING on host:port (a raw RESP exchange, no client library)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    return False
                reply += chunk
            return reply == b"+PONG\r\n"
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, restartable on the same port; always cleaned up.

    The port and the working directory (``--dir``, also holding the log and a unix socket) are fixed
    for the object's life, so ``kill()`` then ``start()`` brings Redis back where clients expect it.
    Nothing is persisted: a restarted server is empty.
    """

    host = "127.0.0.1"

    def __init__(self, port: int | None = None, extra_args: list[str] | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not on PATH")
        self.port = port if port is not None else free_port()
        self.extra_args = list(extra_args or [])
        self.dir = Path(tempfile.mkdtemp(prefix="embedfleet-redis-"))
        self.log_path = self.dir / "redis.log"
        self.unix_socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """``unix://DIR/redis.sock?db=0``: the same server over its unix socket."""
        return f"unix://{self.unix_socket}?db=0"

    @property
    def running(self) -> bool:
        """Whether the process is alive (not whether it answers)."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT_S) -> RedisServer:
        """Start (a no-op when running) and block until PING answers, or fail with the log."""
        if self.running:
            return self
        assert REDIS_SERVER is not None
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
               "--dir", str(self.dir), "--unixsocket", str(self.unix_socket), "--unixsocketperm", "700",
               "--daemonize", "no", "--logfile", "", *self.extra_args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
            if ping(self.host, self.port):
                return self
            time.sleep(0.01)  # poll interval only: readiness is the PING reply
        self.kill()
        raise TimeoutError(f"redis-server did not answer PING within {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL and reap: Redis vanishes without closing anything cleanly."""
        self._signal_and_reap(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it lingers) and reap."""
        self._signal_and_reap(signal.SIGTERM)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, but nothing answers (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def _signal_and_reap(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig != signal.SIGKILL:
                self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.proc = None

    def log(self) -> str:
        """What the server printed, across restarts."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        """Stop the server and remove its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
