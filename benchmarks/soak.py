"""Soak: minutes of mixed load through ``embedfleet serve``, counting every outcome and watching memory.

A real ``embedfleet serve`` on 127.0.0.1 runs 2 replicas of the default model (one single-thread onnx
worker per core, the CPU default) behind its gateway, with an LMDB cache and a small in-process tier
(``MEMORY_CACHE_BYTES``), so the tier is full early on and later growth would be a leak, not the cache
filling. ``CLIENTS`` keep-alive connections of the lean load generator (``bench.loadgen.Connection``) send, at
``--rate`` requests/s in all, a mix drawn with a fixed seed:

- ``hit``: 8 texts of a warm set (cached before the timed run): 200;
- ``miss``: 4 texts never sent before: 200, computed by the workers;
- ``empty``: ``{"inputs": []}``: 400 ``Empty``;
- ``malformed``: a truncated JSON body: 422 ``Validation``.

Halfway through, one instance is restarted through the admin API (``POST /admin/instances/NAME/restart``):
its replica leaves the pool drained and comes back, and no request may fail for it. A request fails when
its status is not the one its kind expects, or when it gets no answer at all; 5xx are counted apart and
must be 0. Every ``SAMPLE_S`` seconds the RSS of the serve process (the gateway) and of each worker is read
from ``/proc/PID/status``. A process is *flat* when, after the warm-up (the first ``WARMUP`` of its
life in the run), its largest sample is within 10% of its smallest. For the gateway, what is judged is its
anonymous memory (``RssAnon``): its total RSS also counts the pages of the LMDB cache file it maps, which
grow with the entries written (some 3 KB a new text) and which the kernel reclaims as page cache; the
total is reported beside it.

The table goes to stdout; the JSON document (with every RSS sample) to ``--out`` (default
``benchmarks/results/soak.json``, ``soak-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.table import Table
from worker import _exit_on_sigterm, free_port, make_texts, publish, serve_fleet

from embedfleet.bench.loadgen import Connection, LoadError, build_requests, run_async

RESULTS_DIR = Path(__file__).resolve().parent / "results"
READY_TIMEOUT_S = 600.0
REPLICAS = 2
CLIENTS = 4
SAMPLE_S = 5.0
WARMUP = 0.2
GATEWAY_TOTAL = "gateway (with the mapped LMDB file; not judged)"
"""The gateway's total RSS: reported, but its flatness is judged on its anonymous memory alone."""
FLAT = 0.10
MEMORY_CACHE_BYTES = 16 * 1024 * 1024
WARM_TEXTS = 256
MIX = {"hit": 0.55, "miss": 0.25, "empty": 0.10, "malformed": 0.10}
EXPECTED = {"hit": 200, "miss": 200, "empty": 400, "malformed": 422}


@dataclass
class Serve:
    """One running ``embedfleet serve``."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        """What the serve process printed."""
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def serve(root: Path) -> Iterator[Serve]:
    """Start ``embedfleet serve`` (2 single-thread workers, LMDB cache), wait for "ready", stop it (SIGTERM)."""
    port = free_port()
    low = 30000 + (port % 300) * 64
    config = root / "embedfleet.toml"
    config.write_text("\n".join([
        "[fleet]", f'state_dir = "{root / "state"}"', f'port_range = "{low}-{low + 63}"',
        "[[fleet.instances]]", 'name = "soak"', 'model = "default"', f"replicas = {REPLICAS}", 'device = "cpu"',
        'backend = "onnx"', "threads = 1",
        "[gateway]", f'cache = "lmdb://{root / "cache"}"', f"memory_cache_bytes = {MEMORY_CACHE_BYTES}", ""]))
    log_path = root / "serve.log"
    with serve_fleet(config, port, log_path, "serve", READY_TIMEOUT_S) as proc:
        yield Serve(proc, f"http://127.0.0.1:{port}", log_path)


def rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    """A process's resident set (``RssAnon``: its heap part, without mapped files such as LMDB's), in MiB
    (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Tally:
    """Every request's outcome."""

    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    failed: int = 0
    server_errors: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, kind: str, outcome: int | str, seconds: float) -> None:
        """Count one outcome: a status, or the name of the error that left the request unanswered."""
        self.by_kind.setdefault(kind, Counter())[str(outcome)] += 1
        if outcome != EXPECTED[kind]:
            self.failed += 1
        if isinstance(outcome, int) and outcome >= 500:
            self.server_errors += 1
        if kind in ("hit", "miss"):
            self.latencies.append(seconds)

    @property
    def by_status(self) -> dict[str, int]:
        """Requests by status (or error name), every kind together."""
        total: Counter[str] = Counter()
        for counts in self.by_kind.values():
            total.update(counts)
        return dict(sorted(total.items()))


class Soak:
    """The load, the restart and the RSS samples of one run against ``url``."""

    def __init__(self, url: str, serve_pid: int, seconds: float, rate: float) -> None:
        self.url = url
        self.serve_pid = serve_pid
        self.seconds = seconds
        self.rate = rate
        self.tally = Tally()
        self.rng = random.Random(11)
        self.warm = make_texts("short", WARM_TEXTS)
        self.fresh = 0
        self.samples: list[dict[str, Any]] = []
        self.restart: dict[str, Any] = {}
        self.gateway_metrics: dict[str, float] = {}
        bad = build_requests(url, "/embed", [b'{"inputs": []}', b'{"inputs": ["a truncated bod'])
        self.bad = {"empty": bad[0], "malformed": bad[1]}

    def _request(self, kind: str) -> bytes:
        if kind == "hit":
            body = {"inputs": self.rng.sample(self.warm, 8)}
        elif kind == "miss":
            texts = [f"soak {self.fresh + i}: " + self.rng.choice(self.warm) for i in range(4)]
            self.fresh += 4
            body = {"inputs": texts}
        else:
            return self.bad[kind]
        return build_requests(self.url, "/embed", [orjson.dumps(body)])[0]

    async def _client(self, started: float, index: int) -> None:
        connection = Connection.to(self.url)
        interval = CLIENTS / self.rate
        due = started + index * interval / CLIENTS
        kinds, weights = list(MIX), list(MIX.values())
        while (now := time.monotonic()) < started + self.seconds:
            if due > now:
                await asyncio.sleep(due - now)
            due += interval
            kind = self.rng.choices(kinds, weights)[0]
            sent = time.monotonic()
            try:
                status, _, _ = await connection.request(self._request(kind))
                outcome: int | str = status
            except LoadError as exc:
                outcome = str(exc).split(":", 1)[0]
            self.tally.add(kind, outcome, time.monotonic() - sent)
        connection.close()

    async def _instances(self, client: httpx.AsyncClient) -> list[dict[str, Any]]:
        return list((await client.get("/admin/instances")).json()["instances"])

    async def _sampler(self, client: httpx.AsyncClient, started: float) -> None:
        while (now := time.monotonic()) < started + self.seconds:
            sample: dict[str, Any] = {"t": round(now - started, 1), "gateway": rss_mib(self.serve_pid),
                                      "gateway_anon": rss_mib(self.serve_pid, "RssAnon"), "workers": {}}
            for instance in await self._instances(client):
                pid = instance.get("pid")
                sample["workers"][instance["name"]] = {"pid": pid, "rss_mib": rss_mib(pid) if pid else None}
            self.samples.append(sample)
            await asyncio.sleep(SAMPLE_S)

    async def _restart_midway(self, client: httpx.AsyncClient, started: float) -> None:
        await asyncio.sleep(max(0.0, started + self.seconds / 2 - time.monotonic()))
        name = (await self._instances(client))[0]["name"]
        at = time.monotonic()
        r = await client.post(f"/admin/instances/{name}/restart", params={"wait": "true"}, timeout=600)
        self.restart = {"instance": name, "at_s": round(at - started, 1), "status": r.status_code,
                        "state": r.json().get("state"), "took_s": round(time.monotonic() - at, 2)}

    async def run(self) -> None:
        """Warm the cache, then the timed load, the restart and the sampling, all at once."""
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            for i in range(0, WARM_TEXTS, 32):
                r = await client.post("/embed", json={"inputs": self.warm[i:i + 32]})
                r.raise_for_status()
            started = time.monotonic()
            await asyncio.gather(self._sampler(client, started), self._restart_midway(client, started),
                                 *(self._client(started, i) for i in range(CLIENTS)))
            metrics = (await client.get("/metrics")).text
        from prometheus_client.parser import text_string_to_metric_families

        wanted = {"embedfleet_upstream_retries_total", "embedfleet_upstream_ejections_total",
                  "embedfleet_cache_writes_dropped_total"}
        self.gateway_metrics = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples
                                if s.name in wanted}


def flatness(series: list[tuple[float, float]]) -> dict[str, Any]:
    """Whether one process's RSS, after the warm-up of its life in the run, stays within ``FLAT``."""
    if len(series) < 2:
        return {"samples": len(series), "flat": None}
    first, last = series[0][0], series[-1][0]
    after = [rss for t, rss in series if t >= first + WARMUP * (last - first)]
    low, high = min(after), max(after)
    return {"samples": len(series), "from_s": series[0][0], "to_s": series[-1][0], "warm_start_mib": round(after[0], 1),
            "min_mib": round(low, 1), "max_mib": round(high, 1), "end_mib": round(after[-1], 1),
            "spread": round(high / low - 1, 4), "flat": high <= (1 + FLAT) * low}


def processes(samples: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """RSS series per process: the gateway, and each worker process (a restarted instance is a new one)."""
    series: dict[str, list[tuple[float, float]]] = {GATEWAY_TOTAL: [], "gateway, anonymous only": []}
    for s in samples:
        if s["gateway"] is not None:
            series[GATEWAY_TOTAL].append((s["t"], s["gateway"]))
        if s.get("gateway_anon") is not None:
            series["gateway, anonymous only"].append((s["t"], s["gateway_anon"]))
        for name, w in s["workers"].items():
            if w["rss_mib"] is not None:
                series.setdefault(f"worker {name} (pid {w['pid']})", []).append((s["t"], w["rss_mib"]))
    return series


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the timed load (default 10)")
    parser.add_argument("--quick", action="store_true", help="1 minute")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s, every client together")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", action="store_true", help="also print the JSON document to stdout")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak and report; exit 1 when a request failed, a 5xx was answered or a process grew."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    minutes = 1.0 if args.quick else args.minutes
    out: Path = args.out or RESULTS_DIR / ("soak-quick.json" if args.quick else "soak.json")
    log = Console(stderr=True)
    report = Console(stderr=args.json, width=140)
    with tempfile.TemporaryDirectory(prefix="embedfleet-soak-") as tmp, serve(Path(tmp)) as fleet:
        log.print(f"serve ready at {fleet.url}; {minutes:g} min of mixed load at {args.rate:g} requests/s")
        soak = Soak(fleet.url, fleet.proc.pid, minutes * 60, args.rate)
        run_async(soak.run())
    tally = soak.tally
    latencies = sorted(tally.latencies)
    rss = {name: {**flatness(series), "series": series} for name, series in processes(soak.samples).items()}
    total = sum(tally.by_status.values())
    doc = {
        "benchmark": "soak", "date": time.strftime("%Y-%m-%d"), "minutes": minutes, "rate": args.rate,
        "clients": CLIENTS, "replicas": REPLICAS, "mix": MIX, "expected": EXPECTED,
        "memory_cache_bytes": MEMORY_CACHE_BYTES, "requests": total, "failed": tally.failed,
        "server_errors_5xx": tally.server_errors, "by_status": tally.by_status,
        "by_kind": {k: dict(v) for k, v in sorted(tally.by_kind.items())},
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
        "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2) if latencies else None,
        "restart": soak.restart, "gateway_metrics": soak.gateway_metrics, "warmup": WARMUP, "flat_within": FLAT,
        "rss": rss, "judged": [name for name in rss if name != GATEWAY_TOTAL],
        "all_flat": all(p["flat"] is not False for name, p in rss.items() if name != GATEWAY_TOTAL),
    }
    outcomes = Table(title=f"soak: {minutes:g} min, {total:,} requests, restart of {soak.restart.get('instance')} "
                           f"at {soak.restart.get('at_s')} s ({soak.restart.get('status')}, "
                           f"{soak.restart.get('took_s')} s)")
    outcomes.add_column("kind")
    outcomes.add_column("expected", justify="right")
    outcomes.add_column("outcomes")
    for kind, counts in doc["by_kind"].items():
        outcomes.add_row(kind, str(EXPECTED[kind]), ", ".join(f"{k}: {v:,}" for k, v in sorted(counts.items())))
    outcomes.add_row("[b]all[/]", "", f"5xx: {tally.server_errors}, failed: {tally.failed}, "
                                      f"p50/p99 (hit+miss) {doc['p50_ms']}/{doc['p99_ms']} ms")
    report.print(outcomes)
    memory = Table(title=f"RSS (MiB), flat = max within {FLAT:.0%} of min after the first {WARMUP:.0%} of each "
                         "process's life in the run")
    for column in ("process", "samples", "after warm-up", "min", "max", "end", "spread", "flat"):
        memory.add_column(column, justify="left" if column == "process" else "right")
    for name, p in rss.items():
        if p["flat"] is None:
            memory.add_row(name, str(p["samples"]), "", "", "", "", "", "-")
            continue
        memory.add_row(name, str(p["samples"]), f"{p['warm_start_mib']}", f"{p['min_mib']}", f"{p['max_mib']}",
                       f"{p['end_mib']}", f"{p['spread']:+.1%}", "yes" if p["flat"] else "[red]NO[/]")
    report.print(memory)
    report.print(f"5xx: {tally.server_errors} (must be 0); failed: {tally.failed}; "
                 f"RSS flat within {FLAT:.0%} after warm-up: {'yes' if doc['all_flat'] else 'NO'}")
    publish(doc, out, args.json, log)
    return 0 if tally.failed == 0 and tally.server_errors == 0 and doc["all_flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
