"""Gateway benchmark: what the caching gateway costs and gains, against the worker and a typical caching proxy.

Every number comes from one run on this machine: real ``embedfleet worker`` and ``embedfleet gateway``
processes (``--cache memory://``) on 127.0.0.1, and the reference proxy of ``benchmarks/reference_proxy.py``.
The texts are the worker benchmark's deterministic short English-like sentences (~18 tokens); each text is
used once per cache, so a "fresh" text has never been seen by any process.

The load generator runs in this process: ``CLIENTS`` (8) keep-alive HTTP/1.1 connections (``bench.loadgen.Connection``:
asyncio streams writing pre-built requests and reading ``Content-Length`` bodies), on one event loop (uvloop
when installed), share one list of pre-serialised requests; each connection sends the next request as soon
as its last answer is back (a closed loop). Every server of a comparison (worker, gateway, reference proxy)
is measured with this same client in the same run. A run stops after a number of requests or a time limit,
whichever comes first. Each request's latency is taken with ``time.perf_counter`` around the request and
its answer; embeddings/s and requests/s count answered requests over the wall
time of the run. Hit runs are preceded by an untimed warm-up with the same bodies. A/B comparisons are
measured in alternating rounds (A B, B A, A B, ...) and each side's rounds are summed, so a slow spell
of a neighbour on the machine hits both sides alike. The CPU time of every server process under test
(``/proc/PID/stat``) and of this process is recorded per request: it does not depend on what else runs on
the machine, so it tells where the time goes even when wall-clock figures are noisy.

(a) All hits, requests of 1 and of 32 texts: a corpus (4,096 texts; 512 with ``--quick``) is sent once
    through the gateway to fill its cache, then the same requests are replayed (``x-cache: hit``). The
    same requests sent to the worker directly (``worker_1``, ``worker_32``; it computes every time) are
    the speed-up baseline; those runs are the cold runs of (c). ``*_serial`` rows send single-text hits
    over one connection, one at a time: the latency of one request with nothing queued.
(b) 50% hits: 32-text requests, every other text from the warm corpus and the rest fresh
    (``x-cache: partial``); ideally about twice the worker's embeddings/s.
(c) Cold misses: the same fresh texts sent to the worker directly and through the gateway, in
    alternating rounds, 1 and 32 texts per request; then two workers with ``--threads 1`` behind one
    gateway against one of them behind another gateway, again on fresh texts.
(d) The reference proxy (one uvicorn process, FastAPI with a pydantic ``List[List[float]]`` response model,
    SHA-256 -> UUID point ids, qdrant-client in-memory local mode, Cosine collection), filled with the
    same corpus, then given the same all-hit load as (a).
Plus all hits through the gateway's ``/v1/embeddings`` with ``encoding_format: base64`` (and with floats,
for comparison), 32 texts per request.

Agreement: before the hit runs, the same 32 texts are fetched from the worker, the gateway (hits), the
gateway's base64 route and the reference proxy, and the largest absolute difference to the worker's
vectors is reported (the gateway should be exact; Qdrant's Cosine collection re-normalises).

How to read the targets (PASS/FAIL beside them; the exit code ignores them):

- ``gateway_hit_32 / ref_hit_32`` embeddings/s [>= 3x]: the gateway's hit path against the common stack.
- ``gateway_hit_1 / ref_hit_1`` requests/s [>= 2.5x] and ``gateway_hit_1`` p50 [<= 2 ms]: per-request
  overhead. p50 is taken under the 8-connection closed loop, so it is at least 8 / requests-per-second;
  the ``gateway_hit_1_serial`` row gives the unloaded latency.
- ``gateway_hit_32_b64`` [>= 100,000 embeddings/s]: the fastest path, with no float formatting.
- cold-miss overhead [<= 5%]: ``worker_32 / gateway_cold_32 - 1``, i.e. how much longer the same cold
  texts take through the gateway than from the worker directly (``_1``: the same for single texts,
  informational). Within a few percent of 0, the noise of this shared machine dominates.
- ``gateway_2x1thread_cold_32 / gateway_1x1thread_cold_32`` [>= 1.8x]: how the gateway spreads misses over
  replicas. On a 2-core machine the load generator and the gateway share the two cores with the two
  workers, so 2x is out of reach here by construction.

The load generator shares the machine with the servers (2 cores here). It used to be httpx, which costs
about half a millisecond of CPU per request: a server that needed less than that was measured at the
client's speed, and the gateway and the reference proxy looked alike. The lean client needs some 15 to 60
microseconds a request (more for larger answers); no process is pinned to a core, for any server alike, and
with the client on one core and the single-process server under test on the other, neither waits for the
other's CPU. The ``client busy`` column is the load generator's share of one core during a run; at 90% and more
the run measured the client, not the server, and a throughput ratio between two such servers says little.
The ``server CPU per request, reference proxy / gateway`` ratios compare the servers' own CPU cost for the
same answers, independent of the client and of other load on the machine: read them beside the
throughput targets. The table goes to stdout, or to stderr with ``--json`` (the JSON document then goes to
stdout); the document is always written to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from rich.console import Console
from rich.table import Table
from worker import (
    BATCH,
    CLIENTS,
    Check,
    WorkerProcess,
    _exit_on_sigterm,
    free_port,
    make_texts,
    publish,
    worker_process,
)

from embedfleet.bench.loadgen import Connection, LoadError, build_requests, header_value, run_async

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REFERENCE_PROXY = BENCH_DIR / "reference_proxy.py"
REQUEST_TIMEOUT_S = 120.0
MAX_ERRORS = 50  # a run stops after this many failed requests
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
WORKER_ARGS = ["--device", "cpu", "--backend", "onnx", "--max-client-batch-size", str(BATCH), "--auto-truncate"]
JSON = {"content-type": "application/json"}

DESCRIPTIONS = {
    "gateway_fill_32": "(a) filling the gateway's cache (cold)",
    "ref_fill_32": "(d) filling the reference proxy (cold)",
    "gateway_hit_1": "(a) gateway, all hits",
    "ref_hit_1": "(d) reference proxy, all hits",
    "gateway_hit_32": "(a) gateway, all hits",
    "ref_hit_32": "(d) reference proxy, all hits",
    "gateway_hit_1_serial": "(a) gateway, all hits, 1 connection",
    "ref_hit_1_serial": "(d) reference proxy, all hits, 1 connection",
    "gateway_hit_32_b64": "gateway /v1/embeddings base64, all hits",
    "gateway_hit_32_openai": "gateway /v1/embeddings floats, all hits",
    "gateway_mix50_32": "(b) gateway, 50% hits",
    "worker_1": "(a/c) worker directly (computes)",
    "gateway_cold_1": "(c) gateway, cold misses",
    "worker_32": "(a/c) worker directly (computes)",
    "gateway_cold_32": "(c) gateway, cold misses",
    "gateway_1x1thread_cold_32": "(c) gateway -> 1 worker --threads 1, cold",
    "gateway_2x1thread_cold_32": "(c) gateway -> 2 workers --threads 1, cold",
}


# --- plan ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """A run stops after ``requests`` answered requests or ``seconds``, whichever comes first."""

    requests: int
    seconds: float


@dataclass(frozen=True)
class Plan:
    """How much of everything: per round for the alternating A/B comparisons."""

    corpus: int  # texts warmed into each cache
    rounds: int  # alternating rounds of every A/B comparison
    hit_1: Bounds
    hit_32: Bounds
    serial: Bounds
    openai: Bounds
    warmup: Bounds  # untimed, before each hit run
    mix_32: int  # 50%-hit requests (16 fresh texts each)
    cold_1: int  # fresh single-text requests per round and side
    cold_32: int  # fresh 32-text requests per round and side
    replicas_32: int  # fresh 32-text requests per round and side, single-thread replicas
    cold_seconds: float  # time limit of the runs bounded by fresh texts

    def fresh_texts(self) -> int:
        """Texts to generate: the corpus and every fresh text of every run."""
        return (self.corpus + self.mix_32 * BATCH // 2
                + self.rounds * (self.cold_1 + self.cold_32 * BATCH + self.replicas_32 * BATCH))


FULL = Plan(corpus=4096, rounds=3, hit_1=Bounds(20_000, 4.0), hit_32=Bounds(8_000, 4.0), serial=Bounds(3_000, 2.0),
            openai=Bounds(8_000, 4.0), warmup=Bounds(400, 0.5), mix_32=128, cold_1=400, cold_32=48,
            replicas_32=40, cold_seconds=60.0)
QUICK = Plan(corpus=512, rounds=1, hit_1=Bounds(4_000, 1.5), hit_32=Bounds(1_500, 1.5), serial=Bounds(500, 0.5),
             openai=Bounds(1_500, 1.5), warmup=Bounds(100, 0.3), mix_32=16, cold_1=80, cold_32=8, replicas_32=8,
             cold_seconds=30.0)


class TextPool:
    """Unique texts handed out once each: a text taken from here was never sent anywhere before."""

    def __init__(self, count: int) -> None:
        self.texts = make_texts("short", count)
        self.used = 0

    def take(self, count: int) -> list[str]:
        """The next ``count`` unused texts."""
        if self.used + count > len(self.texts):
            raise RuntimeError(f"text pool exhausted ({len(self.texts)} texts); Plan.fresh_texts is wrong")
        self.used += count
        return self.texts[self.used - count:self.used]


def embed_bodies(texts: Sequence[str], per_request: int) -> list[bytes]:
    """TEI ``/embed`` bodies of ``per_request`` texts each (no ``truncate``: the workers auto-truncate)."""
    return [orjson.dumps({"inputs": list(texts[i:i + per_request])}) for i in range(0, len(texts), per_request)]


def openai_bodies(texts: Sequence[str], per_request: int, encoding: str) -> list[bytes]:
    """OpenAI ``/v1/embeddings`` bodies of ``per_request`` texts each."""
    return [orjson.dumps({"input": list(texts[i:i + per_request]), "encoding_format": encoding})
            for i in range(0, len(texts), per_request)]


def mixed_bodies(warm: Sequence[str], fresh: Sequence[str]) -> list[bytes]:
    """32-text bodies alternating a warm text and a fresh one (half hits, half misses)."""
    half = BATCH // 2
    bodies = []
    for r in range(len(fresh) // half):
        cached = [warm[(r * half + j) % len(warm)] for j in range(half)]
        texts = [t for pair in zip(cached, fresh[r * half:(r + 1) * half], strict=True) for t in pair]
        bodies.append(orjson.dumps({"inputs": texts}))
    return bodies


# --- processes ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def server_process(cmd: Sequence[str], port: int) -> Iterator[WorkerProcess]:
    """Start a server command listening on ``port``, wait for its /health, stop it on the way out."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty server never blocks on it
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        server = WorkerProcess(proc, f"http://127.0.0.1:{port}", log)
        try:
            server.wait_healthy()
            yield server
        finally:
            server.stop()


def gateway_process(upstreams: Sequence[str]) -> contextlib.AbstractContextManager[WorkerProcess]:
    """``embedfleet gateway`` with the memory cache in front of ``upstreams``."""
    port = free_port()
    cmd = [sys.executable, "-m", "embedfleet.cli", "gateway", *(a for u in upstreams for a in ("--upstream", u)),
           "--cache", "memory://", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return server_process(cmd, port)


def reference_process(upstream: str) -> contextlib.AbstractContextManager[WorkerProcess]:
    """The reference proxy (``benchmarks/reference_proxy.py``) in front of ``upstream``."""
    port = free_port()
    return server_process([sys.executable, str(REFERENCE_PROXY), "--port", str(port), "--upstream", upstream], port)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (0 where /proc is not available)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after the command name: field 3 (state) is fields[0]
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# --- the load generator -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One load to put on one server."""

    name: str
    url: str
    path: str
    bodies: Sequence[bytes]
    texts_per_request: int
    bounds: Bounds
    processes: dict[str, int]  # role -> pid of the server processes whose CPU time is recorded
    cycle: bool = False  # replay the bodies (hits); otherwise each body is sent at most once
    warmup: Bounds | None = None  # untimed pass over the same bodies first
    connections: int = CLIENTS
    expect: str | None = None  # the x-cache every answer should carry (a warning otherwise)


@dataclass
class Run:
    """What one load (or several rounds of it, merged) measured."""

    name: str
    texts_per_request: int
    connections: int
    requests: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    cache: Counter[str] = field(default_factory=Counter)
    cpu_s: dict[str, float] = field(default_factory=dict)
    client_cpu_s: float = 0.0
    rounds: int = 0
    first_error: str | None = None

    def error(self, message: str) -> None:
        """Count a failed request."""
        self.errors += 1
        self.first_error = self.first_error or message

    def merge(self, other: Run) -> Run:
        """Both runs as one: counts, times and CPU summed, latencies pooled."""
        cpu = {k: self.cpu_s.get(k, 0.0) + other.cpu_s.get(k, 0.0) for k in {**self.cpu_s, **other.cpu_s}}
        return Run(self.name, self.texts_per_request, self.connections, self.requests + other.requests,
                   self.errors + other.errors, self.elapsed_s + other.elapsed_s,
                   self.latencies_s + other.latencies_s, self.cache + other.cache, cpu,
                   self.client_cpu_s + other.client_cpu_s, self.rounds + other.rounds,
                   self.first_error or other.first_error)

    @property
    def requests_per_s(self) -> float:
        """Answered requests per second of wall time."""
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def embeddings_per_s(self) -> float:
        """Embeddings of answered requests per second of wall time."""
        return self.requests_per_s * self.texts_per_request

    def latency_ms(self, percentile: float) -> float:
        """A latency percentile in milliseconds (nan without answers)."""
        return float(np.percentile(self.latencies_s, percentile) * 1000) if self.latencies_s else float("nan")

    def server_cpu_ms(self, role: str) -> float | None:
        """CPU milliseconds per answered request of one server role (None if not recorded)."""
        return self.cpu_s[role] * 1000 / self.requests if role in self.cpu_s and self.requests else None

    def cpu_ms_per_request(self) -> dict[str, float]:
        """CPU milliseconds per answered request, by server role and for ``client`` (this process)."""
        n = max(self.requests, 1)
        return {**{k: v * 1000 / n for k, v in self.cpu_s.items()}, "client": self.client_cpu_s * 1000 / n}

    def as_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "texts_per_request": self.texts_per_request, "connections": self.connections, "rounds": self.rounds,
            "requests": self.requests, "errors": self.errors, "first_error": self.first_error,
            "seconds": round(self.elapsed_s, 3), "embeddings_per_s": round(self.embeddings_per_s, 1),
            "requests_per_s": round(self.requests_per_s, 1), "p50_ms": round(self.latency_ms(50), 3),
            "p99_ms": round(self.latency_ms(99), 3), "x_cache": dict(self.cache),
            "cpu_ms_per_request": {k: round(v, 4) for k, v in self.cpu_ms_per_request().items()},
            "client_busy": round(self.client_cpu_s / self.elapsed_s, 3) if self.elapsed_s else None,
        }


async def _drive(connections: list[Connection], load: Load, requests: list[bytes], bounds: Bounds,
                 run: Run) -> None:
    """Send requests of ``load`` on every connection until the bounds are reached; record into ``run``."""
    total = bounds.requests if load.cycle else min(bounds.requests, len(requests))
    todo = iter(range(total))  # shared by the connections: one event loop, so no lock is needed
    cpu_before = {role: process_cpu_s(pid) for role, pid in load.processes.items()}
    client_before = time.process_time()
    started = time.perf_counter()
    deadline = started + bounds.seconds
    latencies = run.latencies_s
    cache = run.cache

    async def client_loop(connection: Connection) -> None:
        for i in todo:
            if time.perf_counter() >= deadline or run.errors >= MAX_ERRORS:
                return
            sent = time.perf_counter()
            try:
                status, head, body = await connection.request(requests[i % len(requests)])
            except LoadError as exc:
                run.error(str(exc))
                continue
            latency = time.perf_counter() - sent
            if status != 200:
                run.error(f"{status}: {body[:300].decode(errors='replace')}")
                continue
            run.requests += 1
            latencies.append(latency)
            cache[header_value(head, b"x-cache") or "none"] += 1

    # A watchdog for the whole run rather than a timer per request: the load generator stays lean.
    await asyncio.wait_for(asyncio.gather(*(client_loop(c) for c in connections)),
                           bounds.seconds + REQUEST_TIMEOUT_S)
    run.elapsed_s += time.perf_counter() - started
    run.client_cpu_s += time.process_time() - client_before
    for role, pid in load.processes.items():
        run.cpu_s[role] = run.cpu_s.get(role, 0.0) + process_cpu_s(pid) - cpu_before[role]
    run.rounds += 1


def run_load(load: Load) -> Run:
    """One load: ``load.connections`` keep-alive connections, an optional untimed warm-up, then the timed run."""

    async def go() -> Run:
        connections = [Connection.to(load.url) for _ in range(load.connections)]
        requests = build_requests(load.url, load.path, load.bodies)
        try:
            for connection in connections:
                await connection.open()
            if load.warmup is not None:
                await _drive(connections, load, requests, load.warmup,
                             Run(load.name, load.texts_per_request, load.connections))
            run = Run(load.name, load.texts_per_request, load.connections)
            await _drive(connections, load, requests, load.bounds, run)
            return run
        finally:
            for connection in connections:
                connection.close()

    return run_async(go())


class Recorder:
    """Runs loads, alternating the sides of a comparison round by round, and keeps the merged runs."""

    def __init__(self, log: Console) -> None:
        self.runs: dict[str, Run] = {}
        self.log = log

    def one(self, load: Load) -> Run:
        """Run one load and merge it into its name's record."""
        run = run_load(load)
        self.log.print(f"    {load.name:<26} {run.requests:>6} requests {run.embeddings_per_s:>10,.0f} emb/s "
                       f"{run.requests_per_s:>8,.0f} req/s  p50 {run.latency_ms(50):7.2f} ms  "
                       f"x-cache {dict(run.cache)}" + (f"  [red]{run.errors} errors: {run.first_error}[/]"
                                                       if run.errors else ""))
        if load.expect is not None and set(run.cache) - {load.expect}:
            self.log.print(f"    [red]{load.name}: expected x-cache {load.expect} on every answer, got "
                           f"{dict(run.cache)}[/]")
        self.runs[load.name] = self.runs[load.name].merge(run) if load.name in self.runs else run
        return run

    def alternate(self, rounds: int, loads: Callable[[int], list[Load]]) -> None:
        """``rounds`` rounds of the loads ``loads(round)`` returns, in reverse order every other round."""
        for r in range(rounds):
            batch = loads(r)
            for load in reversed(batch) if r % 2 else batch:
                self.one(load)


# --- the stages ---------------------------------------------------------------------------------------


def post_vectors(http: httpx.Client, url: str, path: str, body: dict[str, Any]) -> tuple[np.ndarray, str | None]:
    """Vectors from /embed or /v1/embeddings (floats or base64), and the x-cache header."""
    response = http.post(f"{url}{path}", content=orjson.dumps(body), headers=JSON)
    response.raise_for_status()
    doc = orjson.loads(response.content)
    if isinstance(doc, dict):
        rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") if isinstance(d["embedding"], str)
                else np.asarray(d["embedding"], dtype=np.float32) for d in doc["data"]]
        return np.stack(rows), response.headers.get("x-cache")
    return np.asarray(doc, dtype=np.float32), response.headers.get("x-cache")


def agreement(worker_url: str, gateway_url: str, reference_url: str, texts: list[str]) -> dict[str, Any]:
    """Largest absolute difference to the worker's vectors of the same (cached) texts, per path."""
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
        direct, _ = post_vectors(http, worker_url, "/embed", {"inputs": texts})
        paths = {
            "gateway /embed": post_vectors(http, gateway_url, "/embed", {"inputs": texts}),
            "gateway /v1/embeddings base64": post_vectors(http, gateway_url, "/v1/embeddings",
                                                          {"input": texts, "encoding_format": "base64"}),
            "reference proxy /embed": post_vectors(http, reference_url, "/embed", {"inputs": texts}),
        }
    return {name: {"max_abs_diff": float(np.abs(v - direct).max()), "x_cache": cache}
            for name, (v, cache) in paths.items()}


def stage_one_worker(plan: Plan, pool: TextPool, rec: Recorder, extra: dict[str, Any]) -> None:
    """(a), (b), (d), base64 and the cold-miss overhead: one worker, one gateway, one reference proxy."""
    log = rec.log
    log.print("  starting a worker (default threads), the gateway and the reference proxy")
    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(worker_process(WORKER_ARGS))
        gateway = stack.enter_context(gateway_process([worker.url]))
        reference = stack.enter_context(reference_process(worker.url))
        gw = {"gateway": gateway.proc.pid, "worker": worker.proc.pid}
        ref = {"proxy": reference.proc.pid, "worker": worker.proc.pid}
        direct = {"worker": worker.proc.pid}

        corpus = pool.take(plan.corpus)
        singles, batches = embed_bodies(corpus, 1), embed_bodies(corpus, BATCH)
        log.print(f"  filling both caches with {len(corpus):,} texts")
        rec.one(Load("gateway_fill_32", gateway.url, "/embed", batches, BATCH, Bounds(len(batches), 600.0), gw,
                     expect="miss"))
        rec.one(Load("ref_fill_32", reference.url, "/embed", batches, BATCH, Bounds(len(batches), 600.0), ref))
        extra["agreement"] = agreement(worker.url, gateway.url, reference.url, corpus[:BATCH])

        log.print("  (a) + (d) all hits, gateway vs reference proxy, alternating")
        for name, bodies, n, bounds in (("hit_1", singles, 1, plan.hit_1), ("hit_32", batches, BATCH, plan.hit_32)):
            def hits(_: int, name: str = name, bodies: list[bytes] = bodies, n: int = n,
                     bounds: Bounds = bounds) -> list[Load]:
                return [Load(f"gateway_{name}", gateway.url, "/embed", bodies, n, bounds, gw, cycle=True,
                             warmup=plan.warmup, expect="hit"),
                        Load(f"ref_{name}", reference.url, "/embed", bodies, n, bounds, ref, cycle=True,
                             warmup=plan.warmup)]

            rec.alternate(plan.rounds, hits)
        rec.alternate(plan.rounds, lambda _: [
            Load("gateway_hit_1_serial", gateway.url, "/embed", singles, 1, plan.serial, gw, cycle=True,
                 warmup=plan.warmup, connections=1, expect="hit"),
            Load("ref_hit_1_serial", reference.url, "/embed", singles, 1, plan.serial, ref, cycle=True,
                 warmup=plan.warmup, connections=1)])

        log.print("  /v1/embeddings all hits, base64 and floats")
        for encoding, suffix in (("base64", "b64"), ("float", "openai")):
            rec.one(Load(f"gateway_hit_32_{suffix}", gateway.url, "/v1/embeddings",
                         openai_bodies(corpus, BATCH, encoding), BATCH, plan.openai, gw, cycle=True,
                         warmup=plan.warmup, expect="hit"))

        log.print("  (b) 50% hits")
        mixed = mixed_bodies(corpus, pool.take(plan.mix_32 * BATCH // 2))
        rec.one(Load("gateway_mix50_32", gateway.url, "/embed", mixed, BATCH, Bounds(len(mixed), plan.cold_seconds),
                     gw, expect="partial"))

        log.print("  (c) cold misses, worker directly vs through the gateway, alternating (same fresh texts)")
        for n, requests in ((1, plan.cold_1), (BATCH, plan.cold_32)):
            def cold(_: int, n: int = n, requests: int = requests) -> list[Load]:
                bodies = embed_bodies(pool.take(n * requests), n)
                bounds = Bounds(len(bodies), plan.cold_seconds)
                return [Load(f"worker_{n}", worker.url, "/embed", bodies, n, bounds, direct),
                        Load(f"gateway_cold_{n}", gateway.url, "/embed", bodies, n, bounds, gw, expect="miss")]

            rec.alternate(plan.rounds, cold)
        extra["peak_rss_mb"] = {"worker": worker.peak_rss_mb(), "gateway": gateway.peak_rss_mb(),
                                "reference_proxy": reference.peak_rss_mb()}


def stage_replicas(plan: Plan, pool: TextPool, rec: Recorder) -> None:
    """(c) two single-thread replicas behind one gateway vs one of them behind another."""
    rec.log.print("  starting two workers with --threads 1 and two gateways (one replica, both replicas)")
    with contextlib.ExitStack() as stack:
        first, second = (stack.enter_context(worker_process([*WORKER_ARGS, "--threads", "1"])) for _ in range(2))
        one = stack.enter_context(gateway_process([first.url]))
        two = stack.enter_context(gateway_process([first.url, second.url]))
        workers = {"worker": first.proc.pid, "worker2": second.proc.pid}

        def loads(_: int) -> list[Load]:
            # The same fresh texts on both sides: each gateway has its own cache, and workers keep none.
            bodies = embed_bodies(pool.take(BATCH * plan.replicas_32), BATCH)
            bounds = Bounds(len(bodies), plan.cold_seconds)
            return [Load("gateway_1x1thread_cold_32", one.url, "/embed", bodies, BATCH, bounds,
                         {"gateway": one.proc.pid, **workers}, expect="miss"),
                    Load("gateway_2x1thread_cold_32", two.url, "/embed", bodies, BATCH, bounds,
                         {"gateway": two.proc.pid, **workers}, expect="miss")]

        rec.log.print("  (c) cold misses, 1 vs 2 single-thread replicas, alternating")
        rec.alternate(plan.rounds, loads)


# --- targets and the report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target(Check):
    """A derived number with a minimum (or, ``at_most``, a maximum) and how to print it."""

    at_most: bool = False
    fmt: str = "{:.2f}x"

    @property
    def passed(self) -> bool | None:
        """Whether the value is on the right side of the target; None without a target."""
        if self.target is None:
            return None
        return bool(self.value <= self.target) if self.at_most else bool(self.value >= self.target)

    def as_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {**super().as_json(), "comparison": "<=" if self.at_most else ">=", "format": self.fmt}


def derived(runs: dict[str, Run]) -> tuple[list[Target], list[Target]]:
    """The issue's targets, and informational ratios, from whatever runs exist."""
    def eps(name: str) -> float | None:
        return runs[name].embeddings_per_s if name in runs and runs[name].requests else None

    def rps(name: str) -> float | None:
        return runs[name].requests_per_s if name in runs and runs[name].requests else None

    def ratio(num: float | None, den: float | None) -> float | None:
        return num / den if num is not None and den else None

    def cpu(name: str, role: str) -> float | None:
        return runs[name].server_cpu_ms(role) if name in runs else None

    def overhead(name: str) -> float | None:
        r = ratio(eps(f"worker_{name}"), eps(f"gateway_cold_{name}"))
        return None if r is None else r - 1

    targets = [
        ("all hits, 32 texts/request: gateway / reference proxy, embeddings/s",
         ratio(eps("gateway_hit_32"), eps("ref_hit_32")), 3.0, False, "{:.2f}x"),
        ("all hits, 1 text/request: gateway / reference proxy, requests/s",
         ratio(rps("gateway_hit_1"), rps("ref_hit_1")), 2.5, False, "{:.2f}x"),
        ("all hits, 1 text/request: gateway p50 latency, 8 connections",
         runs["gateway_hit_1"].latency_ms(50) if "gateway_hit_1" in runs else None, 2.0, True, "{:.2f} ms"),
        ("all hits, base64, 32 texts/request: gateway embeddings/s", eps("gateway_hit_32_b64"), 100_000.0, False,
         "{:,.0f}"),
        ("cold misses, 32 texts/request: gateway overhead vs worker directly", overhead("32"), 0.05, True,
         "{:+.1%}"),
        ("cold misses: 2 single-thread replicas / 1, through the gateway",
         ratio(eps("gateway_2x1thread_cold_32"), eps("gateway_1x1thread_cold_32")), 1.8, False, "{:.2f}x"),
    ]
    info = [
        ("all hits, 1 text/request: reference proxy p50 latency, 8 connections",
         runs["ref_hit_1"].latency_ms(50) if "ref_hit_1" in runs else None, "{:.2f} ms"),
        ("all hits, 1 text/request, 1 connection: gateway p50 latency",
         runs["gateway_hit_1_serial"].latency_ms(50) if "gateway_hit_1_serial" in runs else None, "{:.2f} ms"),
        ("all hits, 1 text/request, 1 connection: reference proxy p50 latency",
         runs["ref_hit_1_serial"].latency_ms(50) if "ref_hit_1_serial" in runs else None, "{:.2f} ms"),
        ("all hits, 32 texts/request: gateway / worker directly, embeddings/s",
         ratio(eps("gateway_hit_32"), eps("worker_32")), "{:.1f}x"),
        ("all hits, 1 text/request: gateway / worker directly, requests/s",
         ratio(rps("gateway_hit_1"), rps("worker_1")), "{:.1f}x"),
        ("all hits, 32 texts/request: base64 / float /v1/embeddings, embeddings/s",
         ratio(eps("gateway_hit_32_b64"), eps("gateway_hit_32_openai")), "{:.2f}x"),
        ("50% hits, 32 texts/request: gateway / worker directly, embeddings/s",
         ratio(eps("gateway_mix50_32"), eps("worker_32")), "{:.2f}x"),
        ("cold misses, 1 text/request: gateway overhead vs worker directly", overhead("1"), "{:+.1%}"),
        ("cold cache fill, 32 texts/request: gateway / reference proxy, embeddings/s",
         ratio(eps("gateway_fill_32"), eps("ref_fill_32")), "{:.2f}x"),
        *((f"all hits, {n} text{'s' if n > 1 else ''}/request: server CPU per request, reference proxy / gateway",
           ratio(cpu(f"ref_hit_{n}", "proxy"), cpu(f"gateway_hit_{n}", "gateway")), "{:.2f}x") for n in (1, BATCH)),
    ]
    return ([Target(name, value, target, at_most=at_most, fmt=fmt)
             for name, value, target, at_most, fmt in targets if value is not None],
            [Target(name, value, fmt=fmt) for name, value, fmt in info if value is not None])


def machine_facts() -> dict[str, Any]:
    """CPU, platform and the versions of what is measured."""
    cpu_model = platform.processor() or None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("embedfleet", "fastapi", "starlette", "uvicorn", "pydantic", "httpx", "orjson", "qdrant-client",
                    "uvloop", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {"cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_model": cpu_model, "platform": platform.platform(), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None, "versions": versions}


def build_document(args: argparse.Namespace, plan: Plan, runs: dict[str, Run], extra: dict[str, Any],
                   machine: dict[str, Any]) -> dict[str, Any]:
    """The JSON document."""
    targets, info = derived(runs)
    return {
        "benchmark": "gateway",
        "quick": args.quick,
        "machine": machine,
        "settings": {"connections": CLIENTS, "worker_args": WORKER_ARGS, "gateway_cache": "memory://",
                     "texts": "worker benchmark's short texts (~18 tokens)", "plan": _plan_json(plan),
                     "timing": "closed loop; hit runs after an untimed warm-up; A/B runs in alternating rounds"},
        "runs": {name: {"what": DESCRIPTIONS.get(name, ""), **run.as_json()} for name, run in runs.items()},
        "targets": [t.as_json() for t in targets],
        "ratios": [t.as_json() for t in info],
        **extra,
    }


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {k: (vars(v) if isinstance(v, Bounds) else v) for k, v in vars(plan).items()}


def _verdict(passed: bool | None) -> str:
    return "" if passed is None else ("[green]PASS[/]" if passed else "[red]FAIL[/]")


def _fmt_cpu(cpu: dict[str, float]) -> str:
    return "  ".join(f"{role} {ms:.2f}" for role, ms in cpu.items() if role != "client" and ms >= 0.005) or "-"


def _fmt_busy(busy: float | None) -> str:
    if busy is None:
        return "-"
    return f"[bold red]{busy:.0%}[/]" if busy >= 0.9 else f"{busy:.0%}"


def print_report(doc: dict[str, Any], console: Console) -> None:
    """Rich tables: every run side by side, the targets, the other ratios, agreement and memory."""
    m = doc["machine"]
    console.print(f"[bold]embedfleet gateway benchmark[/]{' (quick run)' if doc['quick'] else ''} on "
                  f"{m['cpu_model']} ({m['cpus_usable']} CPUs usable); {CLIENTS} keep-alive connections unless "
                  f"noted; load average at start {m['load_average_at_start']}")
    runs = Table(title="load runs (CPU: milliseconds per answered request; client busy: share of one core used by "
                       "the load generator, >= 90% means the run measured the client)")
    for column, justify in (("run", "left"), ("what", "left"), ("texts/req", "right"), ("conns", "right"),
                            ("requests", "right"), ("emb/s", "right"), ("req/s", "right"), ("p50 ms", "right"),
                            ("p99 ms", "right"), ("x-cache", "left"), ("server CPU", "left"),
                            ("client CPU", "right"), ("client busy", "right")):
        runs.add_column(column, justify=justify)  # type: ignore[arg-type]
    for name, r in doc["runs"].items():
        cache = ", ".join(f"{k} {v}" for k, v in r["x_cache"].items() if k != "none") or "-"
        errors = f" [red]{r['errors']} errors[/]" if r["errors"] else ""
        runs.add_row(name, r["what"], str(r["texts_per_request"]), str(r["connections"]), f"{r['requests']:,}{errors}",
                     f"{r['embeddings_per_s']:,.0f}", f"{r['requests_per_s']:,.0f}", f"{r['p50_ms']:.2f}",
                     f"{r['p99_ms']:.2f}", cache, _fmt_cpu(r["cpu_ms_per_request"]),
                     f"{r['cpu_ms_per_request']['client']:.2f}", _fmt_busy(r["client_busy"]))
    console.print(runs)

    def check_table(title: str, checks: list[dict[str, Any]]) -> Table:
        table = Table(title=title)
        for column, justify in (("measure", "left"), ("value", "right"), ("target", "right"), ("", "left")):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for c in checks:
            fmt = c["format"]
            target = "" if c["target"] is None else f"{c['comparison']} {fmt.format(c['target'])}"
            table.add_row(c["name"], fmt.format(c["value"]), target, _verdict(c["pass"]))
        return table

    console.print(check_table("the issue's targets", doc["targets"]))
    console.print(check_table("other ratios", doc["ratios"]))
    if "agreement" in doc:
        console.print("agreement with the worker's vectors (32 cached texts): " + "; ".join(
            f"{name} max |diff| {a['max_abs_diff']:.2g} (x-cache {a['x_cache']})"
            for name, a in doc["agreement"].items()))
    if "peak_rss_mb" in doc:
        console.print("peak RSS (MiB): " + ", ".join(
            f"{name} {mb:,.0f}" for name, mb in doc["peak_rss_mb"].items() if mb is not None))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small corpus, one round, short runs (a smoke test)")
    parser.add_argument("--json", action="store_true",
                        help="print the JSON document to stdout (the tables go to stderr)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the JSON document (default: benchmarks/results/gateway.json, "
                             "or gateway-quick.json with --quick)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement and report."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything used here is local; never reach the network
    # SIGTERM unwinds like Ctrl-C, so the context managers stop the server processes on the way out.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    out: Path = args.out or RESULTS_DIR / ("gateway-quick.json" if args.quick else "gateway.json")
    log = Console(stderr=True)
    stream = sys.stderr if args.json else sys.stdout
    report = Console(stderr=args.json, width=None if stream.isatty() else 220)
    plan = QUICK if args.quick else FULL
    machine = machine_facts()
    pool = TextPool(plan.fresh_texts())
    rec = Recorder(log)
    extra: dict[str, Any] = {}

    log.print("[bold]one worker[/]: all hits (a, d), base64, 50% hits (b), cold-miss overhead (c)")
    stage_one_worker(plan, pool, rec, extra)
    log.print("[bold]single-thread replicas[/] (c)")
    stage_replicas(plan, pool, rec)

    doc = build_document(args, plan, rec.runs, extra, machine)
    print_report(doc, report)
    publish(doc, out, args.json, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
