"""Cluster benchmark on network namespaces: throughput with 2 worker hosts against 1, the hit rate shared
across gateways, Redis MGET latency and gateway CPU per request (the inputs of the README's "scaling to N
hosts on paper").

The hosts are those of tests/cluster (tests/cluster/netns.py, prefix ``efcb-``): 2 worker hosts (one
``embedfleet worker --threads 1`` each, the default model), 2 gateway hosts sharing 1 Redis host, and a
client host running tests/cluster/client.py, which keeps ``--concurrency`` requests of ``--batch`` texts
under way over both gateways. Needs root. Takes the bench lock (/tmp/embedfleet-bench.lock) for the whole
run, so other benchmarks do not run beside it.

(a) Throughput on new texts (every input a miss): with worker host w1 only (w2 not started yet; the
    gateways list both, and w2 is down), then with both, the same load for ``--seconds`` each, after a
    short warm-up. Embeddings/s, requests/s, and each gateway's CPU time per request (``/proc/PID/stat``).
(b) Shared hits: ``2 * R`` requests cycling over ``R`` batches (``R`` odd), so the second request of each
    batch goes to the other gateway than the first. The cross-gateway hit rate is the share of those second
    requests answered ``x-cache: hit``: with Redis shared, then (peer) with each gateway on its own
    in-process cache (``memory://``). Also the gateways' CPU per all-hit request (the same batches replayed:
    each gateway's memory tier answers most of them, Redis the rest).
(c) Redis MGET latency from a gateway host: serial MGETs of 1, 8 and 32 keys of 1,552-byte values (a
    384-dimension vector as the cache stores it), p50 and p99 round trip; and Redis's own CPU per call
    (``INFO commandstats``), which bounds the MGETs one Redis core serves per second.

The machine is shared and has 2 cores: the workers, gateways, Redis and the client all run on them, so
(a) cannot reach 2x here; CPU per request does not depend on that and is what the paper scaling uses.
Prints a table and writes JSON to ``--out`` (default benchmarks/results/cluster.json).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster.netns import (  # noqa: E402 - after the path set-up
    Cluster,
    Load,
    Proc,
    gateway_cmd,
    netns_unavailable,
    redis_cmd,
    worker_cmd,
)

HOSTS = {"w1": 11, "w2": 12, "g1": 21, "g2": 22, "redis": 31, "client": 41}
PREFIX = "efcb-"
LOCK = "/tmp/embedfleet-bench.lock"
VALUE_BYTES = 1552
"""A 384-dimension float32 vector with the codec's header."""


@contextmanager
def bench_lock() -> Any:
    """Hold the machine's bench lock for the run."""
    with open(LOCK, "a") as fh:
        print(f"waiting for {LOCK} ...", file=sys.stderr)
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    """The running cluster and the phases measured on it."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.net = Cluster(PREFIX, HOSTS, workdir)
        self.workdir = workdir
        self.cache = ""
        self.workers: dict[str, Proc] = {}
        self.gateways: list[Proc] = []

    def worker_url(self, host: str) -> str:
        return f"http://{self.net.ip(host)}:8081"

    def start_worker(self, host: str) -> Proc:
        proc = self.net.spawn(host, host, worker_cmd(self.net, host, self.args.data_dir), url=self.worker_url(host))
        self.workers[host] = proc
        self.net.wait_healthy([proc])
        return proc

    def start_gateways(self, cache: str) -> None:
        for g in self.gateways:
            g.stop()
        upstreams = [self.worker_url(h) for h in ("w1", "w2")]
        self.gateways = [self.net.spawn(f"{h}-{cache.split(':')[0]}", h, gateway_cmd(self.net, h, upstreams, cache),
                                        url=f"http://{self.net.ip(h)}:8080") for h in ("g1", "g2")]
        self.net.wait_healthy(self.gateways)

    def healthy_workers(self, gateway: Proc) -> int:
        text = self.net.metrics(gateway)
        return sum(1 for line in text.splitlines()
                   if line.startswith("embedfleet_upstream_healthy{") and line.endswith(" 1.0"))

    def wait_pools(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while any(self.healthy_workers(g) != count for g in self.gateways):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateways never saw {count} healthy workers")
            time.sleep(0.2)

    def load(self, prefix: str, seconds: float = 0.0, **options: int) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                                               float]:
        """Run load to its end; summary, records and the gateways' CPU seconds per request."""
        before = sum(cpu_seconds(g.popen.pid) for g in self.gateways)
        args = [f"--gateway={g.url}" for g in self.gateways]
        args += ["--concurrency", str(self.args.concurrency), "--batch", str(self.args.batch), "--prefix", prefix,
                 "--duration", str(seconds or 600)]
        for name, value in options.items():
            args += [f"--{name}", str(value)]
        load = Load(self.net, *args)
        summary = load.finish(timeout=(seconds or 600) + 120)
        cpu = sum(cpu_seconds(g.popen.pid) for g in self.gateways) - before
        if summary["failed"]:
            raise RuntimeError(f"{summary['failed']} requests failed in {prefix}")
        return summary, load.records, cpu / max(1, summary["requests"])

    def throughput(self, name: str) -> dict[str, Any]:
        self.load(f"{name} warm-up", self.args.warmup)
        summary, _, cpu = self.load(name, self.args.seconds)
        inputs = summary["ok"] * self.args.batch
        return {"embeddings_per_s": round(inputs / summary["seconds"], 1),
                "requests_per_s": round(summary["ok"] / summary["seconds"], 1),
                "requests": summary["requests"], "seconds": summary["seconds"],
                "gateway_cpu_ms_per_request": round(cpu * 1000, 3)}

    def shared_hits(self, name: str) -> dict[str, Any]:
        batches = self.args.repeat_batches | 1  # odd: a batch's second request goes to the other gateway
        summary, records, cpu = self.load(name, repeat=batches, requests=2 * batches)
        seen: set[int] = set()
        repeats = hits = 0
        for record in sorted(records, key=lambda r: r["n"]):
            batch = record["n"] % batches
            if batch in seen:
                repeats += 1
                hits += record["cache"] == "hit"
            seen.add(batch)
        hit_cpu = self.hit_cpu(name, batches) if name == "redis" else None
        return {"batches": batches, "requests": summary["requests"], "repeats": repeats,
                "cross_gateway_hit_rate": round(hits / max(1, repeats), 4),
                "gateway_cpu_ms_per_request": round(cpu * 1000, 3),
                **({"gateway_cpu_ms_per_hit_request": hit_cpu} if hit_cpu is not None else {})}

    def hit_cpu(self, name: str, batches: int) -> float:
        """Gateway CPU per request when every request is a hit (the batches just cached, replayed)."""
        _, _, cpu = self.load(name, repeat=batches, requests=4 * batches)
        return round(cpu * 1000, 3)

    def mget(self) -> dict[str, Any]:
        done = subprocess.run(["ip", "netns", "exec", self.net.ns("g1"), sys.executable, __file__, "mget",
                               self.cache], capture_output=True, text=True, timeout=300, env=os.environ)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def run(self) -> dict[str, Any]:
        self.net.create()
        self.net.spawn("redis", "redis", redis_cmd(self.net, "redis", self.workdir))
        self.cache = f"redis://{self.net.ip('redis')}:6379/0"
        self.start_worker("w1")
        self.start_gateways(self.cache)
        self.wait_pools(1)
        one = self.throughput("one worker host")
        self.start_worker("w2")
        self.wait_pools(2)
        two = self.throughput("two worker hosts")
        shared = self.shared_hits("redis")
        self.start_gateways("memory://")
        self.wait_pools(2)
        separate = self.shared_hits("memory")
        return {"throughput": {"one_worker_host": one, "two_worker_hosts": two,
                               "ratio": round(two["embeddings_per_s"] / one["embeddings_per_s"], 3)},
                "hits": {"shared_redis": shared, "separate_memory": separate}, "redis_mget": self.mget()}


def measure_mget(url: str, rounds: int = 2000) -> dict[str, Any]:
    """Serial MGET round trips from this host (run inside a gateway's namespace)."""
    import redis

    client = redis.Redis.from_url(url)
    client.config_resetstat()
    value = os.urandom(VALUE_BYTES)
    keys = [f"efbench:{i}".encode() for i in range(64)]
    client.mset(dict.fromkeys(keys, value))
    out: dict[str, Any] = {}
    for size in (1, 8, 32):
        client.config_resetstat()
        samples = []
        cpu = redis_cpu(client)
        for i in range(rounds):
            start = time.perf_counter()
            client.mget(keys[i % 32: i % 32 + size])
            samples.append(time.perf_counter() - start)
        cpu = redis_cpu(client) - cpu
        samples.sort()
        stats = client.info("commandstats").get("cmdstat_mget", {})
        out[f"mget_{size}"] = {"p50_us": round(statistics.median(samples) * 1e6, 1),
                               "p99_us": round(samples[int(len(samples) * 0.99)] * 1e6, 1),
                               "redis_usec_per_call": float(stats.get("usec_per_call", 0.0)),
                               "redis_process_cpu_us_per_call": round(cpu / rounds * 1e6, 1)}
    client.delete(*keys)
    out["leases_8"] = measure_leases(url, client, rounds // 4)
    return out


def redis_cpu(client: Any) -> float:
    """Redis's own CPU seconds so far (INFO cpu: its command execution, I/O and event loop)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure_leases(url: str, client: Any, rounds: int) -> dict[str, Any]:
    """The miss path's Redis work for a request of 8 new texts, through embedfleet's own RedisLeases: one
    claim (EVALSHA), one publish (the values, then EVAL to drop the leases), serially: round trips and
    Redis's CPU per call."""
    import asyncio

    from embedfleet.cache.redis_store import RedisStore

    async def run() -> tuple[list[float], list[float]]:
        store = RedisStore(url, namespace="efbench:")
        claims, publishes = [], []
        try:
            for i in range(rounds):
                keys = [f"{i}:{j}".encode() for j in range(8)]
                start = time.perf_counter()
                await store.leases.claim(keys, 2.0)
                claims.append(time.perf_counter() - start)
                start = time.perf_counter()
                await store.leases.publish([(k, os.urandom(VALUE_BYTES)) for k in keys], None, keys)
                publishes.append(time.perf_counter() - start)
            await store.delete()
        finally:
            await store.close()
        return claims, publishes

    client.config_resetstat()
    cpu = redis_cpu(client)
    claims, publishes = asyncio.run(run())
    cpu = redis_cpu(client) - cpu
    stats = client.info("commandstats")
    return {"claim_p50_us": round(statistics.median(claims) * 1e6, 1),
            "publish_p50_us": round(statistics.median(publishes) * 1e6, 1),
            "redis_usec_per_claim": float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0)),
            "redis_usec_per_publish": round(sum(float(stats.get(f"cmdstat_{c}", {}).get("usec", 0.0))
                                                for c in ("mset", "eval")) / max(1, len(publishes)), 2),
            "redis_process_cpu_us_per_miss_request": round(cpu / max(1, len(claims)) * 1e6, 1)}


def table(result: dict[str, Any]) -> str:
    t, h, m = result["throughput"], result["hits"], result["redis_mget"]
    rows = [
        ("1 worker host: embeddings/s (req/s)", f"{t['one_worker_host']['embeddings_per_s']} "
                                                f"({t['one_worker_host']['requests_per_s']})"),
        ("2 worker hosts: embeddings/s (req/s)", f"{t['two_worker_hosts']['embeddings_per_s']} "
                                                 f"({t['two_worker_hosts']['requests_per_s']})"),
        ("2 hosts / 1 host", f"{t['ratio']}x"),
        ("gateway CPU per miss request (ms, both gateways)", str(t["two_worker_hosts"]["gateway_cpu_ms_per_request"])),
        ("cross-gateway hit rate, shared Redis", f"{h['shared_redis']['cross_gateway_hit_rate']:.1%}"),
        ("cross-gateway hit rate, separate memory:// caches", f"{h['separate_memory']['cross_gateway_hit_rate']:.1%}"),
        ("gateway CPU per all-hit request (ms)", str(h["shared_redis"].get("gateway_cpu_ms_per_hit_request"))),
    ]
    for size in (1, 8, 32):
        row = m[f"mget_{size}"]
        rows.append((f"Redis MGET {size} keys: p50 / p99 round trip, Redis CPU/call: command / process (us)",
                     f"{row['p50_us']} / {row['p99_us']}, {row['redis_usec_per_call']} / "
                     f"{row['redis_process_cpu_us_per_call']}"))
    lease = m["leases_8"]
    rows.append(("8-text miss: lease claim / publish round trip p50 (us)",
                 f"{lease['claim_p50_us']} / {lease['publish_p50_us']}"))
    rows.append(("8-text miss: Redis CPU per claim / publish (us), process per miss request",
                 f"{lease['redis_usec_per_claim']} / {lease['redis_usec_per_publish']}, "
                 f"{lease['redis_process_cpu_us_per_miss_request']}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", default="run", choices=["run", "mget"])
    parser.add_argument("url", nargs="?", help="mget: the Redis URL")
    parser.add_argument("--seconds", type=float, default=20.0, help="each throughput phase")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat-batches", type=int, default=101)
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "embedfleet-bench-data",
                        help="the workers' exported-graph cache")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cluster.json")
    args = parser.parse_args()
    if args.command == "mget":
        print(json.dumps(measure_mget(args.url)))
        return
    reason = netns_unavailable()
    if reason:
        sys.exit(f"cannot run: {reason}")
    with bench_lock(), tempfile.TemporaryDirectory(prefix="embedfleet-cluster-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            result = bench.run()
        finally:
            bench.net.destroy()
    document = {"benchmark": "cluster", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                    "shared": True},
                "settings": {k: str(v) for k, v in vars(args).items() if k not in ("command", "url")}, **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(table(result))
    print(json.dumps(document))


if __name__ == "__main__":
    main()
