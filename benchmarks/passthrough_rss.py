"""What one large forwarded answer costs the gateway: a 64 KB ``/embed_all`` request (a vector per token).

Starts a real worker (the default model) and a gateway in front of it, sends the request through the
gateway once, and prints the gateway's resident memory before, its peak (VmHWM) and after, and the
answer's size. Run: ``python benchmarks/passthrough_rss.py`` (``PYTHONPATH`` picks the code measured).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx

from tests.helpers import GatewayProcess, WorkerProcess


def _memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def main() -> None:
    """Measure and print."""
    root = Path(tempfile.mkdtemp(prefix="passthrough-rss-"))
    texts = [("lorem ipsum dolor sit amet " * 80)[:2000] for _ in range(32)]  # 32 x 2 KB: 64 KB of JSON
    with WorkerProcess(["--model", "default"], Path.home() / ".cache" / "embedfleet", root / "w") as worker:
        gateway = GatewayProcess(["--upstream", worker.url, "--cache", "memory://"], root, root / "g").start()
        try:
            assert gateway.proc is not None
            httpx.post(f"{gateway.url}/embed_all", json={"inputs": ["warm up"]}, timeout=60).raise_for_status()
            time.sleep(1.0)  # let the process settle before the baseline (a measurement, not synchronisation)
            before = _memory(gateway.proc.pid)
            size = 0
            with httpx.stream("POST", f"{gateway.url}/embed_all", json={"inputs": texts}, timeout=300) as r:
                r.raise_for_status()
                for chunk in r.iter_bytes():
                    size += len(chunk)
            after = _memory(gateway.proc.pid)
            print(f"answer: {size / 2**20:.1f} MiB of JSON for a {len(str(texts)) / 1024:.0f} KiB request")
            print(f"gateway RSS before: {before['VmRSS']:.1f} MiB, peak: {after['VmHWM']:.1f} MiB "
                  f"(+{after['VmHWM'] - before['VmRSS']:.1f}; peak before {before['VmHWM']:.1f}), "
                  f"after: {after['VmRSS']:.1f} MiB")
        finally:
            gateway.stop()


if __name__ == "__main__":
    main()
