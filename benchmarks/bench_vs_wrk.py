"""``embedfleet bench`` against ``wrk`` and the gateway benchmark's own loop, on the same load, in one run.

The question: is ``embedfleet bench`` ever the bottleneck? One worker (the default model) behind one
``embedfleet gateway --cache memory://`` on 127.0.0.1; ``HOT`` (256) short texts are put in its cache, and
then three load generators send the same single-text all-hit ``POST /embed`` requests (the gateway
benchmark's ``gateway_hit_1`` load: 8 keep-alive connections, closed loop, the bodies in turn), each for
``SECONDS`` per round, in alternating rounds (A B C, C B A, ...) so a slow spell of the shared machine hits
each alike:

- ``loadgen``: the gateway benchmark's loop (``benchmarks/gateway.py`` ``run_load``), which measured the
  README's single-text all-hit figure;
- ``embedfleet bench``: the command as a user runs it, in its own process (``--texts`` with the same texts,
  ``--hit-ratio 1``, so every request is one of them);
- ``wrk`` (Debian package ``wrk``; one thread, ``benchmarks/wrk_post.lua`` posts the bodies in turn).

Reported per generator: requests/s over the summed rounds, p50/p99 latency, the gateway's CPU per request
(``/proc``; the same work whoever asks), and for ``embedfleet bench`` its own ``client_busy`` (the share of
one core its process used while timed). Targets: ``embedfleet bench / wrk`` requests/s within 10%, and
``embedfleet bench`` at least the gateway benchmark's loop. The JSON document goes to
``benchmarks/results/bench_vs_wrk.json`` (``-quick`` with ``--quick``). Run it under
``flock /tmp/embedfleet-bench.lock``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
from gateway import (
    WORKER_ARGS,
    Bounds,
    Load,
    embed_bodies,
    gateway_process,
    machine_facts,
    process_cpu_s,
    run_load,
)
from rich.console import Console
from rich.table import Table
from worker import _exit_on_sigterm, make_texts, publish, worker_process

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
WRK_SCRIPT = BENCH_DIR / "wrk_post.lua"
HOT = 256
CONNECTIONS = 8
GENERATORS = ("loadgen", "embedfleet bench", "wrk")
README_FIGURE = 13_892  # gateway_hit_1 requests/s in the README (gateway benchmark, 2026-12-01)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_loadgen(url: str, bodies: list[bytes], seconds: float, gateway_pid: int) -> dict[str, Any]:
    """One round of the gateway benchmark's loop."""
    load = Load("loadgen", url, "/embed", bodies, 1, Bounds(10**9, seconds), {"gateway": gateway_pid}, cycle=True,
                warmup=Bounds(2_000, 0.5), connections=CONNECTIONS, expect="hit")
    run = run_load(load)
    return {"requests": run.requests, "errors": run.errors, "seconds": run.elapsed_s,
            "latencies_ms": [x * 1000 for x in run.latencies_s], "gateway_cpu_s": run.cpu_s["gateway"],
            "client_busy": run.client_cpu_s / run.elapsed_s if run.elapsed_s else None}


def run_embedfleet_bench(url: str, texts_file: Path, seconds: float, out: Path) -> dict[str, Any]:
    """One round of ``embedfleet bench`` in its own process."""
    cmd = [sys.executable, "-m", "embedfleet.cli", "bench", url, "--mode", "http", "--texts", str(texts_file),
           "--hit-ratio", "1", "--hot-texts", str(HOT), "--batch-size", "1", "--concurrency", str(CONNECTIONS),
           "--duration", str(seconds), "--warmup", "0.5", "--no-progress", "--json", str(out), "--config", os.devnull]
    # The gateway's CPU is not reported for it: from outside, its timed part cannot be told from its priming
    # and warm-up.
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    doc = orjson.loads(out.read_bytes())
    assert doc["x_cache"] == {"hit": doc["successful"]}, doc["x_cache"]
    return {"requests": doc["successful"], "errors": doc["failed"], "seconds": doc["total_duration_secs"],
            "p50_ms": doc["latency_ms"]["p50"], "p99_ms": doc["latency_ms"]["p99"],
            "gateway_cpu_s": None, "client_busy": doc["client_busy"]}


def run_wrk(url: str, bodies_file: Path, seconds: float, gateway_pid: int) -> dict[str, Any]:
    """One round of wrk (one thread, ``CONNECTIONS`` connections)."""
    cpu = process_cpu_s(gateway_pid)
    before = _children_cpu_s()
    result = subprocess.run(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{round(seconds)}s", "--timeout", "10s",
                             "-s", str(WRK_SCRIPT), f"{url}/embed", "--", str(bodies_file)],
                            check=True, capture_output=True, text=True)
    client_cpu = _children_cpu_s() - before
    summary = orjson.loads(result.stdout.strip().splitlines()[-1])
    elapsed = summary["duration_us"] / 1e6
    return {"requests": summary["requests"] - summary["non_2xx"], "errors": summary["non_2xx"]
            + summary["socket_errors"], "seconds": elapsed, "p50_ms": summary["p50_us"] / 1000,
            "p99_ms": summary["p99_us"] / 1000, "gateway_cpu_s": process_cpu_s(gateway_pid) - cpu,
            "client_busy": client_cpu / elapsed if elapsed else None}


def merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds of one generator as one run (latency percentiles: the median over rounds)."""
    import numpy as np

    requests = sum(r["requests"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    if "latencies_ms" in rounds[0]:
        pooled = np.concatenate([r["latencies_ms"] for r in rounds])
        p50, p99 = float(np.percentile(pooled, 50)), float(np.percentile(pooled, 99))
    else:
        p50 = float(np.median([r["p50_ms"] for r in rounds]))
        p99 = float(np.median([r["p99_ms"] for r in rounds]))
    cpu = [r["gateway_cpu_s"] for r in rounds if r["gateway_cpu_s"] is not None]
    busy = [r["client_busy"] for r in rounds if r["client_busy"] is not None]
    return {"rounds": len(rounds), "requests": requests, "errors": sum(r["errors"] for r in rounds),
            "seconds": round(seconds, 3), "requests_per_s": round(requests / seconds, 1), "p50_ms": round(p50, 3),
            "p99_ms": round(p99, 3),
            "gateway_cpu_ms_per_request": round(sum(cpu) * 1000 / requests, 4) if cpu and requests else None,
            "client_busy": round(sum(busy) / len(busy), 3) if busy else None,
            "per_round_requests_per_s": [round(r["requests"] / r["seconds"], 1) for r in rounds]}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of 2 s each (a smoke test)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per generator and round (default 3)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 6)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    seconds = args.seconds or (2.0 if args.quick else 3.0)
    rounds = args.rounds or (1 if args.quick else 6)
    out: Path = args.out or RESULTS_DIR / ("bench_vs_wrk-quick.json" if args.quick else "bench_vs_wrk.json")
    log = Console(stderr=True)
    machine = machine_facts()
    texts = make_texts("short", HOT)
    bodies = embed_bodies(texts, 1)
    results: dict[str, list[dict[str, Any]]] = {g: [] for g in GENERATORS}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        texts_file, bodies_file = tmp / "texts.txt", tmp / "bodies.jsonl"
        texts_file.write_text("\n".join(texts) + "\n")
        bodies_file.write_bytes(b"\n".join(bodies) + b"\n")
        worker = stack.enter_context(worker_process(WORKER_ARGS))
        gateway = stack.enter_context(gateway_process([worker.url]))
        pid = gateway.proc.pid
        log.print(f"  filling the gateway's cache with {HOT} texts")
        with httpx.Client(timeout=120) as http:
            for i in range(0, HOT, 32):
                http.post(f"{gateway.url}/embed", json={"inputs": texts[i:i + 32]}).raise_for_status()
        runners = {
            "loadgen": lambda: run_loadgen(gateway.url, bodies, seconds, pid),
            "embedfleet bench": lambda: run_embedfleet_bench(gateway.url, texts_file, seconds, tmp / "b.json"),
            "wrk": lambda: run_wrk(gateway.url, bodies_file, seconds, pid),
        }
        for r in range(rounds):
            for name in (reversed(GENERATORS) if r % 2 else GENERATORS):
                result = runners[name]()
                results[name].append(result)
                log.print(f"    round {r + 1} {name:<17} {result['requests'] / result['seconds']:>9,.0f} req/s "
                          f"({result['errors']} errors)")
    merged = {name: merge(rs) for name, rs in results.items()}
    bench_rate = merged["embedfleet bench"]["requests_per_s"]
    checks = [
        {"name": "embedfleet bench / wrk, requests/s", "value": round(bench_rate / merged["wrk"]["requests_per_s"], 3),
         "target": "within 0.90x-1.10x"},
        {"name": "embedfleet bench / gateway benchmark loop, requests/s",
         "value": round(bench_rate / merged["loadgen"]["requests_per_s"], 3), "target": ">= ~1x (same client code)"},
        {"name": f"embedfleet bench / README figure ({README_FIGURE:,} req/s, another day)",
         "value": round(bench_rate / README_FIGURE, 3), "target": ">= 1x on a machine as idle as then"},
    ]
    checks[0]["pass"] = 0.9 <= checks[0]["value"] <= 1.1
    doc = {"benchmark": "bench_vs_wrk", "quick": args.quick, "machine": machine,
           "settings": {"connections": CONNECTIONS, "seconds_per_round": seconds, "rounds": rounds, "hot_texts": HOT,
                        "load": "single-text POST /embed, all hits (gateway --cache memory://), closed loop",
                        "wrk": "wrk -t1 -c8 with benchmarks/wrk_post.lua"},
           "generators": merged, "checks": checks}
    table = Table(title=f"single-text all-hit POST /embed on the gateway, {CONNECTIONS} connections, {rounds} "
                        f"alternating rounds of {seconds:g} s (shared 2-core machine)")
    for column in ("generator", "req/s", "per round", "p50 ms", "p99 ms", "gateway CPU ms/req", "client busy"):
        table.add_column(column, justify="left" if column == "generator" else "right")
    for name, m in merged.items():
        per_round = ", ".join(f"{x:,.0f}" for x in m["per_round_requests_per_s"])
        table.add_row(name, f"{m['requests_per_s']:,.0f}", per_round,
                      f"{m['p50_ms']:.2f}", f"{m['p99_ms']:.2f}",
                      "-" if m["gateway_cpu_ms_per_request"] is None else f"{m['gateway_cpu_ms_per_request']:.3f}",
                      "-" if m["client_busy"] is None else f"{m['client_busy']:.0%}")
    report = Console()
    report.print(table)
    for c in checks:
        verdict = "" if "pass" not in c else (" [green]PASS[/]" if c["pass"] else " [red]FAIL[/]")
        report.print(f"{c['name']}: {c['value']:.3f}x ({c['target']}){verdict}")
    publish(doc, out, False, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
