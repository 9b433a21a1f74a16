"""Scaling benchmark: throughput of 1 vs N replicas of one model, cold misses, through ``embedfleet serve``.

Every fleet is a real ``embedfleet serve`` (gateway + supervised workers, ``cache = "none"`` so every
text is computed) on 127.0.0.1, all started before the first measurement and measured in alternating
rounds (A B C, C B A, ...) with fresh texts each round, so a slow spell of the shared machine hits
every fleet alike. The load generator is the worker benchmark's (``bench.loadgen.Connection``): ``CLIENTS`` (8)
keep-alive connections in this process, each posting the next batch of ``BATCH`` (32) texts when its
last answer is back; answers are parsed after the timed pass. Each round also measures one client alone
(one batch at a time, as an indexing script sends them): there the gateway spreads each batch over the
idle replicas.

Each round also measures the ceiling: the replica's model alone (in process, texts tokenized and cut into
length-sorted batches of 32 beforehand, untimed), in 1 process and in N processes at once. That ratio is
what N replicas could give on this machine if tokenizing, HTTP, the gateway and the load generator cost
nothing; the fleet's ratio is read against it (``the fleet reaches X% of it``).

On CPU (the default) the fleets are:
- ``1x1thread``: one worker with ``--threads 1``;
- ``Nx1thread``: N (default: the number of cores) single-thread workers, what ``embedfleet serve`` runs
  on a CPU machine by default;
- ``1xNthread``: one worker with N threads (the alternative to one worker per core).
With ``--device cuda`` the replicas share GPU 0 (``devices = ["0"]``, torch fp16), and the fleets
are 1 and N replicas on that GPU.

Target: ``Nx1thread / 1x1thread`` >= 1.8x for N = 2. On this 2-core machine the load generator, the
gateway and the workers' HTTP threads share the two cores with the inference threads, so the ratio is a
floor of what separate cores give. The table goes to stdout; the JSON document to ``--out`` (default
benchmarks/results/scaling-DEVICE.json).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table
from worker import BATCH, CLIENTS, _exit_on_sigterm, free_port, http_rate, make_texts, publish, serve_fleet

from embedfleet.config import default_data_dir
from embedfleet.engine.backends import create_backend
from embedfleet.engine.backends.base import Output, PaddedBatch
from embedfleet.engine.model import inspect
from embedfleet.engine.tokenization import Tokenization

RESULTS_DIR = Path(__file__).resolve().parent / "results"
READY_TIMEOUT_S = 600.0
TARGET = 1.8


@dataclass
class Fleet:
    """One running ``embedfleet serve``."""

    name: str
    replicas: int
    threads: int | None
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        """What the serve process printed."""
        return self.log_path.read_text(errors="replace")


def _config(root: Path, replicas: int, threads: int | None, device: str, port_low: int) -> Path:
    instance = ['name = "bench"', 'model = "default"', f"replicas = {replicas}"]
    if device == "cuda":
        instance += ['devices = ["0"]', 'backend = "torch"', 'dtype = "float16"']
    else:
        instance += ['device = "cpu"', 'backend = "onnx"']
    if threads is not None:
        instance.append(f"threads = {threads}")
    path = root / "embedfleet.toml"
    path.write_text("\n".join([
        "[fleet]", f'state_dir = "{root / "state"}"', f'port_range = "{port_low}-{port_low + 63}"',
        "[[fleet.instances]]", *instance, "[gateway]", 'cache = "none"', ""]))
    return path


@contextlib.contextmanager
def fleet(name: str, replicas: int, threads: int | None, device: str, root: Path) -> Iterator[Fleet]:
    """Start ``embedfleet serve``, wait for its "ready" line, stop it (SIGTERM) on the way out."""
    folder = root / name
    folder.mkdir()
    port = free_port()
    config = _config(folder, replicas, threads, device, 30000 + (port % 300) * 64)
    log_path = folder / "serve.log"
    with serve_fleet(config, port, log_path, f"fleet {name}", READY_TIMEOUT_S) as proc:
        running = Fleet(name, replicas, threads, proc, f"http://127.0.0.1:{port}", log_path)
        instances = httpx.get(f"{running.url}/admin/instances", timeout=10).json()["instances"]
        if [i["state"] for i in instances] != ["running"] * replicas:
            raise RuntimeError(f"fleet {name}: {[(i['name'], i['state']) for i in instances]}")
        yield running


def _raw_replica(pipe: Pipe, device: str) -> None:
    """A child process: the model a replica runs, in process. Sent texts, it tokenizes them and cuts them
    into length-sorted batches of ``BATCH`` (as a worker's batcher does), answers "prepared", then on
    "go" runs the model over the batches and answers the seconds that took; None ends it."""
    info = inspect("default")
    tok = Tokenization(info.path, info.max_input_length)
    if device == "cuda":
        backend = create_backend(info, "torch", "cuda", default_data_dir(), dtype="float16")
    else:
        backend = create_backend(info, "onnx", "cpu", default_data_dir(), threads=1)
    pipe.send("loaded")
    while (texts := pipe.recv()) is not None:
        encoded = sorted(tok.encode(texts, truncate=True), key=lambda e: e.length)
        batches = [PaddedBatch.from_encoded(encoded[i:i + BATCH]) for i in range(0, len(encoded), BATCH)]
        pipe.send("prepared")
        pipe.recv()
        started = time.perf_counter()
        for batch in batches:
            backend.forward(batch, Output.POOLED)
        pipe.send(time.perf_counter() - started)


class RawReplicas:
    """N processes running the replica's model in process: the ceiling of what N replicas can give on
    this machine, with no tokenizer, gateway, HTTP or load generator sharing the CPUs (or the GPU).
    ``rate(k, texts)``: the embeddings/s of k of them running the model over ``texts`` each, at once."""

    def __init__(self, n: int, device: str) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process holding sockets and threads
        self.pipes: list[Pipe] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for _ in range(n):
            ours, theirs = context.Pipe()
            proc = context.Process(target=_raw_replica, args=(theirs, device), daemon=True)
            proc.start()
            self.pipes.append(ours)
            self.procs.append(proc)
        for pipe, proc in zip(self.pipes, self.procs, strict=True):
            if not pipe.poll(READY_TIMEOUT_S) or pipe.recv() != "loaded":
                raise RuntimeError(f"raw replica {proc.pid} did not load its model")

    def rate(self, k: int, texts: list[str]) -> float:
        """Embeddings/s of ``k`` processes running the model over ``texts`` each, started together."""
        for pipe in self.pipes[:k]:
            pipe.send(texts)
        for pipe in self.pipes[:k]:
            pipe.recv()  # "prepared": tokenized, so the timed part is the model alone, in every process at once
        for pipe in self.pipes[:k]:
            pipe.send("go")
        elapsed = [pipe.recv() for pipe in self.pipes[:k]]
        return k * len(texts) / max(elapsed)

    def close(self) -> None:
        """Stop the processes."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--replicas", type=int, default=None,
                        help="N (default: the number of CPU cores, or 2 on a GPU)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per fleet")
    parser.add_argument("--texts", type=int, default=1024, help="fresh texts per fleet and round")
    parser.add_argument("--quick", action="store_true", help="1 round of 256 texts (a smoke test)")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the fleets, measure them in alternating rounds, report."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.quick:
        args.rounds, args.texts = 1, 256
    cores = os.cpu_count() or 1
    n = args.replicas or (2 if args.device == "cuda" else cores)
    if args.device == "cuda":
        plans = [("1x", 1, None), (f"{n}x", n, None)]
    else:
        plans = [("1x1thread", 1, 1), (f"{n}x1thread", n, 1), (f"1x{n}thread", 1, n)]
    log = Console(stderr=True)
    texts = make_texts("short", args.texts * args.rounds * len(plans) + BATCH * CLIENTS)
    warm, fresh = texts[:BATCH * CLIENTS], iter(range(BATCH * CLIENTS, len(texts), args.texts))
    loads = (CLIENTS, 1)
    rates: dict[tuple[str, int], list[float]] = {(name, c): [] for name, _, _ in plans for c in loads}
    raw_rates: dict[int, list[float]] = {1: [], n: []}
    with tempfile.TemporaryDirectory(prefix="embedfleet-scaling-") as tmp, contextlib.ExitStack() as stack:
        log.print(f"starting {n} raw replica process(es) (the model in process, no HTTP)")
        raw = RawReplicas(n, args.device)
        stack.callback(raw.close)
        raw.rate(n, warm)
        fleets = []
        for name, replicas, threads in plans:
            log.print(f"starting fleet {name} ({replicas} worker(s), threads={threads or 'auto'})")
            fleets.append(stack.enter_context(fleet(name, replicas, threads, args.device, Path(tmp))))
        for f in fleets:  # one untimed pass each: connections, first batches
            http_rate([f.url], warm)
        for r in range(args.rounds):
            order = fleets if r % 2 == 0 else fleets[::-1]
            for f in order:
                start = next(fresh)
                for clients in loads:
                    # http_rate runs an untimed pass, then a timed one over the same texts: with the cache
                    # off both compute, so the timed pass is cold.
                    count = args.texts if clients > 1 else args.texts // 2
                    rate, _ = http_rate([f.url], texts[start:start + count], clients)
                    rates[f.name, clients].append(rate)
                    log.print(f"  round {r + 1}: {f.name:<12} {clients} connection(s) {rate:8.1f} embeddings/s")
            # The ceiling, in the same round: the replicas' backend alone, 1 and n processes at once.
            for k in (1, n) if r % 2 == 0 else (n, 1):
                rate = raw.rate(k, texts[start:start + args.texts])
                raw_rates[k].append(rate)
                log.print(f"  round {r + 1}: raw x{k:<9} {'':>15} {rate:8.1f} embeddings/s")

    mean = {key: sum(v) / len(v) for key, v in rates.items()}
    base = plans[0][0]
    scaled = plans[1][0]
    ratio = mean[scaled, CLIENTS] / mean[base, CLIENTS]
    table = Table(title=f"scaling through embedfleet serve ({args.device}, cold misses, {BATCH} texts/request)")
    for column in ("fleet", "workers", "threads", f"emb/s, {CLIENTS} conn.", "ratio", "emb/s, 1 conn.", "ratio "):
        table.add_column(column, justify="left" if column == "fleet" else "right")
    for name, replicas, threads in plans:
        table.add_row(name, str(replicas), str(threads or "auto"),
                      *(cell for c in loads for cell in (f"{mean[name, c]:,.1f}",
                                                         f"{mean[name, c] / mean[base, c]:.2f}x")))
    console = Console()
    console.print(table)
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    console.print(f"{scaled} / {base}, {CLIENTS} connections: {ratio:.2f}x (target >= {TARGET}x): {verdict}")
    console.print(f"{scaled} / {base}, 1 connection: {mean[scaled, 1] / mean[base, 1]:.2f}x")
    raw_mean = {k: sum(v) / len(v) for k, v in raw_rates.items()}
    ceiling = raw_mean[n] / raw_mean[1]
    console.print(f"ceiling: the model alone in {n} processes / 1 process (no tokenizer, HTTP, gateway or client): "
                  f"{ceiling:.2f}x ({raw_mean[n]:,.1f} vs {raw_mean[1]:,.1f} embeddings/s); "
                  f"the fleet reaches {ratio / ceiling:.0%} of it")
    doc: dict[str, Any] = {
        "benchmark": "scaling", "device": args.device, "rounds": args.rounds, "texts_per_round": args.texts,
        "batch": BATCH, "clients": CLIENTS, "machine": {"cores": cores, "platform": platform.platform()},
        "fleets": [{"name": name, "replicas": r, "threads": t, "embeddings_per_s": mean[name, CLIENTS],
                    "rounds": rates[name, CLIENTS], "one_connection": {"embeddings_per_s": mean[name, 1],
                                                                       "rounds": rates[name, 1]}}
                   for name, r, t in plans],
        "ratio": {"measure": f"{scaled} / {base}, {CLIENTS} connections", "value": ratio, "target": TARGET,
                  "passed": ratio >= TARGET},
        "ratio_one_connection": {"measure": f"{scaled} / {base}, 1 connection",
                                 "value": mean[scaled, 1] / mean[base, 1]},
        "raw_ceiling": {"measure": f"the replica's model alone, {n} processes / 1", "value": ceiling,
                        "embeddings_per_s": {str(k): v for k, v in raw_mean.items()},
                        "rounds": {str(k): v for k, v in raw_rates.items()},
                        "fleet_share": ratio / ceiling},
    }
    out: Path = args.out or RESULTS_DIR / ("scaling-quick.json" if args.quick else f"scaling-{args.device}.json")
    publish(doc, out, False, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
