"""Worker throughput benchmark: embeddings per second, peers side by side in one run.

Measured on the same synthetic texts (2,000 short of ~18 tokens, 500 long of ~200 tokens):

(a) sentence-transformers ``encode`` in process (batch 32 and 128): the baseline users know;
(b) the raw backend in process (tokenization included, batches of 32): onnx fp32, onnx int8, torch;
(c) the worker over HTTP: 8 concurrent clients sending batches of 32 to one process;
(d) two single-thread worker processes sharing the same 8 clients (what the fleet runs per core).

Read the ratios, not the absolute numbers: "worker / raw" is the cost of HTTP, queueing and
batching; "worker / st" is what a user gains over running sentence-transformers themselves.
``--device cuda`` measures the torch backend in fp16 instead of onnx (no int8 there).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from embedfleet.config import default_data_dir
from embedfleet.engine.backends import create_backend
from embedfleet.engine.backends.base import Output, PaddedBatch
from embedfleet.engine.model import inspect
from embedfleet.engine.tokenization import Tokenization

WORDS = [
    "retrieval", "embedding", "vector", "search", "index", "query", "document", "passage", "semantic", "ranking",
    "model", "server", "batch", "token", "cache", "gateway", "replica", "latency", "throughput", "cluster",
    "shard", "memory", "accelerator", "pipeline",
]


def make_texts(n: int, words: int, seed: int) -> list[str]:
    """Deterministic English-like texts, each different."""
    rng = np.random.default_rng(seed)
    return [f"{i}: " + " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), words)) for i in range(n)]


def rate(n: int, fn: Callable[[], object]) -> float:
    """Items per second of ``fn`` over ``n`` items, after one warm-up call."""
    fn()
    started = time.perf_counter()
    fn()
    return n / (time.perf_counter() - started)


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Worker:
    """One ``embedfleet worker`` subprocess."""

    def __init__(self, args: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "embedfleet.cli", "worker", "--port", str(self.port), "--log-level", "warning",
               "--max-client-batch-size", "128", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("worker did not become healthy")

    def peak_rss_mb(self) -> float:
        """VmHWM of the process."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def http_rate(urls: list[str], texts: list[str], clients: int = 8, batch: int = 32) -> float:
    """Embeddings/s with ``clients`` concurrent clients sending batches, spread over ``urls``."""
    batches = [texts[i:i + batch] for i in range(0, len(texts), batch)]

    async def run() -> None:
        queue: asyncio.Queue[list[str]] = asyncio.Queue()
        for b in batches:
            queue.put_nowait(b)

        async def client(k: int) -> None:
            async with httpx.AsyncClient(base_url=urls[k % len(urls)], timeout=600) as http:
                while not queue.empty():
                    body = queue.get_nowait()
                    r = await http.post("/embed", content=orjson.dumps({"inputs": body, "truncate": True}),
                                        headers={"content-type": "application/json"})
                    r.raise_for_status()

        await asyncio.gather(*(client(k) for k in range(clients)))

    return rate(len(texts), lambda: asyncio.run(run()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 short / 50 long texts (smoke test)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--skip-st", action="store_true", help="skip sentence-transformers")
    parser.add_argument("--json", action="store_true", help="also print the JSON document")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "worker.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    n_short, n_long = (200, 50) if args.quick else (2000, 500)
    sets = {"short": make_texts(n_short, 14, 1), "long": make_texts(n_long, 170, 2)}
    info = inspect("default")
    tok = Tokenization(info.path, info.max_input_length)
    mean_tokens = {k: float(np.mean([e.length for e in tok.encode(v, truncate=True)])) for k, v in sets.items()}
    cache = default_data_dir()
    cuda = args.device == "cuda"
    main_backend = "torch" if cuda else "onnx"
    results: dict[str, dict[str, float]] = {k: {} for k in sets}
    vectors: dict[str, dict[str, np.ndarray]] = {k: {} for k in sets}

    if not args.skip_st:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(info.path), device=args.device)
        if cuda:
            st = st.half()
        for name, texts in sets.items():
            for bs in (32, 128):
                results[name][f"st_b{bs}"] = rate(len(texts), lambda t=texts, b=bs: st.encode(t, batch_size=b))
            vectors[name]["st"] = np.asarray(st.encode(texts, batch_size=32, normalize_embeddings=True))
        del st

    raw_variants: list[tuple[str, dict[str, Any]]] = (
        [("raw_torch_fp16", {"backend": "torch", "dtype": "float16"})] if cuda else
        [("raw_onnx_fp32", {"backend": "onnx"}), ("raw_onnx_int8", {"backend": "onnx", "quantize": "int8"}),
         ("raw_torch_fp32", {"backend": "torch"})])
    for label, kw in raw_variants:
        backend = create_backend(info, kw["backend"], args.device, cache, dtype=kw.get("dtype"),
                                 quantize=kw.get("quantize"))
        for name, texts in sets.items():
            def run(t: list[str] = texts, b: Any = backend) -> np.ndarray:
                out = [b.forward(PaddedBatch.from_encoded(tok.encode(t[i:i + 32], truncate=True)), Output.POOLED)
                       for i in range(0, len(t), 32)]
                v = np.concatenate(out)
                return v / np.linalg.norm(v, axis=1, keepdims=True)  # type: ignore[no-any-return]

            results[name][label] = rate(len(texts), run)
            vectors[name][label] = run()
    inprocess_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    peaks: dict[str, float] = {}
    device_args = ["--device", args.device, "--backend", main_backend]
    one = Worker(device_args)
    try:
        for name, texts in sets.items():
            results[name]["worker_http"] = http_rate([one.url], texts)
        peaks["worker_http"] = one.peak_rss_mb()
    finally:
        one.stop()
    if not cuda:
        pair = [Worker([*device_args, "--threads", "1"]) for _ in range(2)]
        try:
            for name, texts in sets.items():
                results[name]["2x1thread_http"] = http_rate([w.url for w in pair], texts)
            peaks["2x1thread_http"] = sum(w.peak_rss_mb() for w in pair)
        finally:
            for w in pair:
                w.stop()

    raw_key = "raw_torch_fp16" if cuda else "raw_onnx_fp32"
    ratios: list[tuple[str, float, float | None]] = []
    for name in sets:
        r = results[name]
        ratios.append((f"{name}: worker_http / {raw_key}", r["worker_http"] / r[raw_key], 0.9))
        if "st_b32" in r:
            ratios.append((f"{name}: worker_http / st_b32", r["worker_http"] / r["st_b32"],
                           1.3 if name == "short" else 1.1))
            if "raw_onnx_int8" in r:
                ratios.append((f"{name}: raw_onnx_int8 / st_b32", r["raw_onnx_int8"] / r["st_b32"], 1.6))
        if "2x1thread_http" in r:
            ratios.append((f"{name}: 2x1thread_http / worker_http", r["2x1thread_http"] / r["worker_http"], None))
    cosines: dict[str, float] = {}
    for name in sets:
        v = vectors[name]
        if "raw_onnx_int8" in v:
            c = (v["raw_onnx_int8"] * v["raw_onnx_fp32"]).sum(axis=1)
            cosines[f"{name}: int8 vs fp32 mean"] = float(c.mean())
            cosines[f"{name}: int8 vs fp32 min"] = float(c.min())
        if "st" in v:
            c = (v[raw_key] * v["st"]).sum(axis=1)
            cosines[f"{name}: {raw_key} vs st min"] = float(c.min())

    import onnxruntime
    import torch

    doc = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "device": args.device,
                    "gpu": torch.cuda.get_device_name() if cuda else None},
        "texts": {k: {"count": len(v), "mean_tokens": round(mean_tokens[k], 1)} for k, v in sets.items()},
        "embeddings_per_s": {k: {m: round(x, 1) for m, x in v.items()} for k, v in results.items()},
        "ratios": [{"ratio": n, "value": round(v, 3), "target": t, "pass": None if t is None else v >= t}
                   for n, v, t in ratios],
        "cosine": {k: round(v, 5) for k, v in cosines.items()},
        "peak_rss_mb": {"in_process": round(inprocess_peak_mb, 1), **{k: round(v, 1) for k, v in peaks.items()}},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    print_tables(doc)
    if args.json:
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


def print_tables(doc: dict[str, Any]) -> None:
    """Rich tables of throughput, ratios and accuracy."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    texts = doc["texts"]
    t = Table(title=f"embeddings/s ({doc['machine']['cpus']} CPUs, device {doc['machine']['device']})")
    t.add_column("variant")
    for name, meta in texts.items():
        t.add_column(f"{name} ({meta['count']} x ~{meta['mean_tokens']:.0f} tok)", justify="right")
    variants = list(next(iter(doc["embeddings_per_s"].values())))
    for v in variants:
        t.add_row(v, *(f"{doc['embeddings_per_s'][n].get(v, float('nan')):.1f}" for n in texts))
    console.print(t)
    r = Table(title="ratios")
    for col in ("ratio", "value", "target", "pass"):
        r.add_column(col)
    for row in doc["ratios"]:
        r.add_row(row["ratio"], f"{row['value']:.2f}x", "" if row["target"] is None else f">= {row['target']}x",
                  "" if row["pass"] is None else ("PASS" if row["pass"] else "FAIL"))
    console.print(r)
    console.print({"cosine": doc["cosine"], "peak_rss_mb": doc["peak_rss_mb"]})


if __name__ == "__main__":
    main()
