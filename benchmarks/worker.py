"""Worker throughput benchmark: embeddings per second of every way to run the model, in one run.

What is measured, on the same deterministic synthetic English-like texts (2,000 short ones of about
18 tokens and 500 long ones of about 200; ``--quick`` takes 200 and 50):

(a) sentence-transformers ``encode`` in process, batch 32 and batch 128: the baseline users know;
(b) embedfleet's raw backend in process, batches of 32 in input order, tokenization included:
    onnx fp32, onnx int8 (dynamic quantization) and torch fp32;
(c) one worker process over HTTP (onnx backend, default threads), 8 concurrent keep-alive clients
    posting batches of 32 to ``/embed`` from one shared work list;
(d) two single-thread worker processes (``--threads 1``) with the same 8 clients split 4/4: this
    checks that two one-thread processes together beat one two-thread process;
(e) extra: the torch backend in bf16, in process and as a worker (fast on CPUs with AMX);
(f) peers side by side (issue 12), all through the OpenAI route ``/embeddings`` with the same 8 clients x
    32 texts: sentence-transformers fp32 (the reference of every cosine) and bf16, each in a child process
    of its own; infinity-emb 0.0.78 in fp32 and bf16 over HTTP, from a virtualenv of its own that
    ``peers.py`` builds once outside the repository (or skips with the reason printed); embedfleet workers
    with no backend/dtype flags (the default), ``--dtype float32``, ``--backend openvino --dtype bfloat16``
    and ``--backend onnx``, and the ``embedfleet serve`` default fleet (cache off). A row that cannot start
    (a flag this build does not know, say) is reported skipped with the reason; the others still run.
    Beside them, the ceilings of the default worker's runtime: OpenVINO bf16 and f32 alone in this process,
    texts tokenized beforehand and batched as the worker batches them, one batch on each stream at once.

Every measurement runs one untimed warm-up pass over its texts, then one timed pass
(``time.perf_counter``); the vectors compared below come from the timed pass. The HTTP clients
run in this process, so on a small machine they take a little CPU from the worker they measure.

How to read the ratios (targets in brackets, PASS/FAIL beside them; the exit code ignores them):

- ``worker_http / raw_onnx_fp32`` [>= 0.9]: what HTTP, JSON, queueing and dynamic batching cost
  over calling the backend directly. Near 1.0 means the serving layer is almost free.
- ``worker_http / st_b32`` [>= 1.3 short, >= 1.1 long]: what a user gains by calling the worker
  instead of running sentence-transformers in their own process.
- ``raw_onnx_int8 / st_b32`` [>= 1.6], together with the int8-vs-fp32 cosine [mean >= 0.99]:
  what int8 quantization buys, and what it costs in accuracy.
- ``2x1thread_http / worker_http`` [>= 1.0]: above 1.0, a fleet should run one single-thread
  worker per core rather than one worker with all cores.
- (f), per length: ``ef_worker_default / best peer`` [>= 1.5 short, >= 1.1 long, at min cosine >= 0.9999
  to ``st_fp32``], where the best peer is the faster of ``st_bf16`` and ``infinity_bf16`` in this run;
  ``ef_worker_float32 / st_fp32`` [>= 1.15, at min cosine >= 0.99999]; ``ef_serve_default / best peer``
  [>= 1.4 short]. The min and mean cosine of every row to ``st_fp32`` are reported per length.
  ``ceiling_openvino_* / peer`` bounds what any worker on that runtime can reach, and a worker's share of
  its ceiling (``ef_worker_default / ceiling_openvino_bf16``) is what HTTP, JSON, tokenization and batching
  cost it.
- Cosines are between unit vectors of the same texts: ``raw_onnx_fp32 vs st`` should be ~1.0
  (same model, other runtime); ``worker_http vs raw_onnx_fp32`` checks the worker's output.

Peak memory is the RSS high-water mark: of this process after each in-process stage
(``ru_maxrss``, so it only grows), and of each worker process (``VmHWM``) before it is stopped; in (f),
of each server's process tree (``VmHWM`` of each process: serve's supervisor, gateway and workers) and of
each sentence-transformers child. ``--peers-only`` runs (f) alone (``--quick --peers-only``: a smoke test
of a minute or two); the CPU's model and its AMX / AVX512-BF16 flags are recorded with the figures.

``--device cuda`` measures the torch backend in fp16 instead of onnx for (b) and (c) and skips
int8, (d) and (e). The table goes to stdout, or to stderr with ``--json`` (the JSON document then
goes to stdout); the document is always written to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import importlib.metadata
import multiprocessing
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import numpy as np
import orjson
from peers import INFINITY_VERSION, ensure_infinity_venv, infinity_server, proc_peak_rss_mb, st_child
from rich.console import Console
from rich.table import Table

from embedfleet import __version__
from embedfleet.bench.loadgen import Connection, LoadError, build_requests, run_async
from embedfleet.config import default_data_dir
from embedfleet.engine.backends import create_backend
from embedfleet.engine.backends.base import Backend, Output, PaddedBatch
from embedfleet.engine.model import ModelInfo, inspect
from embedfleet.engine.tokenization import Encoded, Tokenization

T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCH = 32  # inputs per batch: in-process backends and every HTTP request
CLIENTS = 8  # concurrent HTTP clients
HEALTH_TIMEOUT_S = 300.0  # a worker that is not healthy by then has failed
STOP_TIMEOUT_S = 30.0  # SIGTERM, then SIGKILL after this
REQUEST_TIMEOUT_S = 600.0

DESCRIPTIONS = {
    "st_b32": "sentence-transformers encode, batch 32",
    "st_b128": "sentence-transformers encode, batch 128",
    "raw_onnx_fp32": "raw backend in process: onnx fp32",
    "raw_onnx_int8": "raw backend in process: onnx int8",
    "raw_torch_fp32": "raw backend in process: torch fp32",
    "raw_torch_bf16": "raw backend in process: torch bf16",
    "raw_torch_fp16": "raw backend in process: torch fp16",
    "worker_http": f"1 worker (default threads), {CLIENTS} HTTP clients",
    "2x1thread_http": f"2 workers x 1 thread, {CLIENTS} HTTP clients split",
    "worker_http_torch_bf16": f"1 worker, torch bf16, {CLIENTS} HTTP clients",
}

# Synthetic English-like sentences: determiner-adjective-noun-verb-object-place, sometimes with an
# adverb and a subordinate clause. Every word is one token of the BERT vocabulary.
DETERMINERS = ("the", "a", "this", "that", "every", "our", "their", "one")
ADJECTIVES = ("small", "large", "quiet", "busy", "new", "old", "bright", "dark", "early", "late", "simple",
              "careful", "local", "public", "private", "open", "warm", "cold", "short", "long", "green",
              "strong")
NOUNS = ("teacher", "river", "city", "garden", "report", "market", "doctor", "student", "window", "train",
         "village", "letter", "company", "kitchen", "road", "house", "engine", "forest", "table", "music",
         "bridge", "child", "office", "meeting", "storm", "farmer", "library", "system", "question", "plan")
VERBS = ("opened", "followed", "found", "moved", "carried", "watched", "changed", "checked", "closed",
         "built", "visited", "described", "reached", "answered", "joined", "cleaned", "painted", "left",
         "saw", "helped")
PREPOSITIONS = ("near", "behind", "under", "across", "after", "before", "beside", "inside", "around", "over")
ADVERBS = ("slowly", "quickly", "again", "today", "yesterday", "quietly", "early", "together", "alone",
           "twice")
CONJUNCTIONS = ("because", "while", "after", "before", "when", "although")
SENTENCES = {"short": 1, "long": 13}  # ~18 and ~200 tokens with [CLS] and [SEP]
SEEDS = {"short": 1, "long": 2}


def _sentence(rng: np.random.Generator) -> str:
    def pick(words: Sequence[str]) -> str:
        return words[int(rng.integers(len(words)))]

    words = [pick(DETERMINERS).capitalize(), pick(ADJECTIVES), pick(NOUNS), pick(VERBS), pick(DETERMINERS),
             pick(NOUNS), pick(PREPOSITIONS), pick(DETERMINERS), pick(ADJECTIVES), pick(NOUNS)]
    if rng.random() < 0.7:
        words.append(pick(ADVERBS))
    if rng.random() < 0.8:
        words += [pick(CONJUNCTIONS), pick(DETERMINERS), pick(NOUNS), pick(VERBS), pick(ADVERBS)]
    return " ".join(words) + "."


def make_texts(kind: str, count: int) -> list[str]:
    """``count`` texts of ``kind`` (short or long); text i depends only on (kind, i), so a quick run
    uses a prefix of the full run's texts."""
    texts = []
    for i in range(count):
        rng = np.random.default_rng([SEEDS[kind], i])
        texts.append(" ".join(_sentence(rng) for _ in range(SENTENCES[kind])))
    if len(set(texts)) != len(texts):
        raise RuntimeError(f"the {kind} texts are not all different; change the generator")
    return texts


@dataclass(frozen=True)
class TextSet:
    """One set of benchmark texts with its token statistics."""

    name: str
    texts: list[str]
    mean_tokens: float
    min_tokens: int
    max_tokens: int


def text_sets(tok: Tokenization, counts: dict[str, int]) -> list[TextSet]:
    """The short and long texts, token-counted with the model's tokenizer ([CLS] and [SEP] included)."""
    sets = []
    for kind, count in counts.items():
        texts = make_texts(kind, count)
        lengths = np.array([e.length for e in tok.encode(texts, truncate=True)])
        sets.append(TextSet(kind, texts, float(lengths.mean()), int(lengths.min()), int(lengths.max())))
    return sets


def measure(count: int, fn: Callable[[], T]) -> tuple[float, T]:
    """Items per second of ``fn`` over ``count`` items: one warm-up call, then one timed call."""
    fn()
    started = time.perf_counter()
    result = fn()
    return count / (time.perf_counter() - started), result


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float32)."""
    v = np.asarray(vectors, dtype=np.float32)
    scaled: np.ndarray = v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)
    return scaled


def rss_high_water_mb() -> float:
    """This process's peak RSS in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class Results:
    """Everything measured, keyed by variant then text set."""

    rates: dict[str, dict[str, float]] = field(default_factory=dict)
    vectors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    in_process_rss_mb: dict[str, float] = field(default_factory=dict)
    worker_rss_mb: dict[str, list[float | None]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # variant: why it was not measured
    cpu_us: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # variant: set: stage: µs
    served: dict[str, tuple[str, str]] = field(default_factory=dict)  # single-worker variant: (backend, dtype)

    def skip(self, variant: str, reason: str, log: Console) -> None:
        """Record a variant that could not be measured, and say why."""
        self.skipped[variant] = reason
        log.print(f"  {variant:<24} [yellow]skipped[/]: {reason}")

    def add(self, variant: str, text_set: str, rate: float, vectors: np.ndarray) -> None:
        """Record one measurement and the unit vectors of its timed pass."""
        self.rates.setdefault(variant, {})[text_set] = rate
        self.vectors.setdefault(variant, {})[text_set] = unit(vectors)


# --- (a) and (b): in process -------------------------------------------------------------------------


def bench_sentence_transformers(info: ModelInfo, device: str, sets: list[TextSet], results: Results,
                                log: Console) -> None:
    """(a): ``SentenceTransformer.encode`` at batch 32 and 128 (fp16 on CUDA)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(info.path), device=device)
    if device == "cuda":
        model.half()
    for batch in (32, 128):
        variant = f"st_b{batch}"
        for s in sets:
            log.print(f"  {variant:<24} {s.name}")
            encode = functools.partial(model.encode, s.texts, batch_size=batch, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False)
            rate, vectors = measure(len(s.texts), encode)
            results.add(variant, s.name, rate, vectors)
    del model
    gc.collect()
    results.in_process_rss_mb["after sentence-transformers"] = rss_high_water_mb()


def embed_with_backend(backend: Backend, tok: Tokenization, texts: list[str]) -> np.ndarray:
    """Tokenize and embed ``texts`` in batches of ``BATCH``, in input order (no length sorting)."""
    parts = []
    for i in range(0, len(texts), BATCH):
        batch = PaddedBatch.from_encoded(tok.encode(texts[i:i + BATCH], truncate=True))
        parts.append(backend.forward(batch, Output.POOLED))
    return unit(np.concatenate(parts))


def raw_variants(device: str) -> list[tuple[str, dict[str, Any]]]:
    """(b) and (e): the in-process backends measured on ``device``, with ``create_backend`` arguments."""
    if device == "cuda":
        return [("raw_torch_fp16", {"backend": "torch", "dtype": "float16"})]
    return [
        ("raw_onnx_fp32", {"backend": "onnx"}),
        ("raw_onnx_int8", {"backend": "onnx", "quantize": "int8"}),
        ("raw_torch_fp32", {"backend": "torch"}),
        ("raw_torch_bf16", {"backend": "torch", "dtype": "bfloat16"}),
    ]


def bench_raw_backends(info: ModelInfo, tok: Tokenization, device: str, sets: list[TextSet], results: Results,
                       log: Console) -> None:
    """(b) and (e): embedfleet's backends called directly (onnx exports are cached in the data dir)."""
    for variant, kwargs in raw_variants(device):
        log.print(f"  {variant:<24} loading")
        backend = create_backend(info, kwargs["backend"], device, default_data_dir(),
                                 dtype=kwargs.get("dtype"), quantize=kwargs.get("quantize"))
        for s in sets:
            log.print(f"  {variant:<24} {s.name}")
            embed = functools.partial(embed_with_backend, backend, tok, s.texts)
            rate, vectors = measure(len(s.texts), embed)
            results.add(variant, s.name, rate, vectors)
        del backend
        gc.collect()
        results.in_process_rss_mb[f"after {variant}"] = rss_high_water_mb()


# --- (c), (d) and (e): worker processes over HTTP ----------------------------------------------------


@contextlib.contextmanager
def serve_fleet(config: Path, port: int, log_path: Path, what: str, timeout: float = 600.0
                ) -> Iterator[subprocess.Popen[bytes]]:
    """``embedfleet serve --config CONFIG`` on ``port``, its output in ``log_path``: yielded once it prints its
    "ready" line (RuntimeError with the log's tail if it exits or ``timeout`` passes first); SIGTERM on the
    way out, SIGKILL if it has not stopped after 60 s."""
    cmd = [sys.executable, "-m", "embedfleet.cli", "serve", "--config", str(config), "--port", str(port),
           "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while "ready: " not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not get ready:\n{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.25)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it; the worker binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class WorkerProcess:
    """A running ``embedfleet worker`` subprocess (see :func:`worker_process`)."""

    proc: subprocess.Popen[bytes]
    url: str
    log: IO[bytes]  # its stdout and stderr

    def wait_healthy(self) -> None:
        """Poll /health until it answers 200; fail if the process exits or the deadline passes."""
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        with httpx.Client(base_url=self.url, timeout=5.0) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker {self.url} exited with {self.proc.returncode}:\n"
                                       f"{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/health").status_code == 200:
                        return
                time.sleep(0.25)
        raise TimeoutError(f"worker {self.url} not healthy after {HEALTH_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the worker's output."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]

    def peak_rss_mb(self) -> float | None:
        """The process's RSS high-water mark (``VmHWM``) in MiB; None where /proc is not available."""
        return proc_peak_rss_mb(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def worker_process(worker_args: Sequence[str]) -> Iterator[WorkerProcess]:
    """Start a worker on a free loopback port, wait until it is healthy, and stop it on the way out."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "embedfleet.cli", "worker", "--model", "default", "--host", "127.0.0.1",
           "--port", str(port), "--data-dir", str(default_data_dir()), "--log-level", "warning",
           *worker_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the bundled model only: never reach the network
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty worker can never block on it
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        worker = WorkerProcess(proc, url, log)
        try:
            worker.wait_healthy()
            yield worker
        finally:
            worker.stop()


async def _http_pass(connections: list[Connection], requests: list[list[bytes]]) -> list[bytes]:
    """Every batch posted once (connection k sends ``requests[k]``'s copy, built for its URL); each
    connection takes the next unsent batch when its last answer is back. The answers, as bytes."""
    answers: list[bytes] = [b""] * len(requests[0])
    todo = iter(range(len(answers)))  # shared by the connections: one event loop, so no lock is needed

    async def client_loop(connection: Connection, own: list[bytes]) -> None:
        for i in todo:
            status, _, body = await connection.request(own[i])
            if status != 200:
                raise RuntimeError(f"batch {i}: HTTP {status}: {body[:300].decode(errors='replace')}")
            answers[i] = body

    await asyncio.gather(*(client_loop(c, own) for c, own in zip(connections, requests, strict=True)))
    return answers


def _tei_body(texts: list[str]) -> bytes:
    return orjson.dumps({"inputs": texts, "truncate": True})


def _tei_vectors(answer: bytes) -> np.ndarray:
    return np.asarray(orjson.loads(answer), dtype=np.float32)


def _openai_body(texts: list[str]) -> bytes:
    return orjson.dumps({"input": texts, "model": "default", "encoding_format": "float"})


def _openai_vectors(answer: bytes) -> np.ndarray:
    data = sorted(orjson.loads(answer)["data"], key=lambda item: item["index"])
    return np.asarray([item["embedding"] for item in data], dtype=np.float32)


@dataclass(frozen=True)
class Api:
    """How the load generator speaks to a server: the route, a request body of texts, the vectors of an answer."""

    route: str
    body: Callable[[list[str]], bytes]
    vectors: Callable[[bytes], np.ndarray]


TEI = Api("/embed", _tei_body, _tei_vectors)
OPENAI = Api("/embeddings", _openai_body, _openai_vectors)  # served by embedfleet and infinity-emb alike


def http_rate(urls: Sequence[str], texts: list[str], clients: int = CLIENTS, api: Api = TEI
              ) -> tuple[float, np.ndarray]:
    """Embeddings/s of ``clients`` keep-alive connections (connection k talks to ``urls[k % len(urls)]``)
    posting batches of ``BATCH`` to ``api``'s route (TEI's ``/embed`` by default): one warm-up pass, then
    one timed pass. The answers of the timed pass are parsed after it (the load generator shares the
    machine with the servers it measures)."""
    bodies = [api.body(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)]
    per_url = {url: build_requests(url, api.route, bodies) for url in urls}

    async def run() -> tuple[float, list[bytes]]:
        targets = [urls[k % len(urls)] for k in range(clients)]
        connections = [Connection.to(url) for url in targets]
        requests = [per_url[url] for url in targets]
        try:
            await asyncio.wait_for(_http_pass(connections, requests), REQUEST_TIMEOUT_S)
            started = time.perf_counter()
            answers = await asyncio.wait_for(_http_pass(connections, requests), REQUEST_TIMEOUT_S)
            return len(texts) / (time.perf_counter() - started), answers
        finally:
            for connection in connections:
                connection.close()

    rate, answers = run_async(run())
    return rate, np.concatenate([api.vectors(a) for a in answers])


def bench_workers(variant: str, worker_args: list[list[str]], sets: list[TextSet], results: Results,
                  log: Console) -> None:
    """Start one worker per entry of ``worker_args``, measure them together, record their peak RSS."""
    log.print(f"  {variant:<24} starting {len(worker_args)} worker(s)")
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(worker_process(args)) for args in worker_args]
        for s in sets:
            log.print(f"  {variant:<24} {s.name}")
            rate, vectors = http_rate([w.url for w in workers], s.texts)
            results.add(variant, s.name, rate, vectors)
        results.worker_rss_mb[variant] = [w.peak_rss_mb() for w in workers]


# --- (f): peers side by side, through the OpenAI route -----------------------------------------------


REFERENCE = "st_fp32"  # every side-by-side row's vectors are compared with this one's
BEST_PEER = ("st_bf16", "infinity_bf16")  # the best peer configuration: the faster of these in the run
# Our rows: worker flags, or (a dict) the [fleet] keys of an embedfleet serve fleet ({}: its defaults).
OUR_ROWS: tuple[tuple[str, list[str] | dict[str, int]], ...] = (
    ("ef_worker_default", []),
    ("ef_worker_float32", ["--dtype", "float32"]),
    ("ef_worker_openvino_bf16", ["--backend", "openvino", "--dtype", "bfloat16"]),
    ("ef_worker_onnx", ["--backend", "onnx"]),
    ("ef_serve_default", {}),
    ("ef_serve_one_worker", {"replicas": 1, "threads": os.cpu_count() or 1}),
)
PEER_VARIANTS = ("st_fp32", "st_bf16", "infinity_fp32", "infinity_bf16", "ceiling_openvino_bf16",
                 "ceiling_openvino_f32", *(name for name, _ in OUR_ROWS))
DESCRIPTIONS.update({
    "st_fp32": "peer: sentence-transformers fp32, in process, batch 32",
    "st_bf16": "peer: sentence-transformers bf16, in process, batch 32",
    "infinity_fp32": f"peer: infinity-emb {INFINITY_VERSION} --dtype float32, HTTP",
    "infinity_bf16": f"peer: infinity-emb {INFINITY_VERSION} --dtype bfloat16, HTTP",
    "ceiling_openvino_bf16": "ceiling: OpenVINO bf16 alone, in process, pre-tokenized, every stream busy",
    "ceiling_openvino_f32": "ceiling: OpenVINO f32 alone, in process, pre-tokenized, every stream busy",
    "ef_worker_default": "embedfleet worker, no backend/dtype flags, HTTP",
    "ef_worker_float32": "embedfleet worker --dtype float32, HTTP",
    "ef_worker_openvino_bf16": "embedfleet worker --backend openvino --dtype bfloat16, HTTP",
    "ef_worker_onnx": "embedfleet worker --backend onnx, HTTP",
    "ef_serve_default": "embedfleet serve, default fleet (cache none), HTTP",
    "ef_serve_one_worker": "embedfleet serve, one worker using every core (cache none), HTTP",
})


def _short_reason(exc: BaseException) -> str:
    """One line of an exception for the report: its message's first line and its output's last one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"[:400]


def tree_peak_rss_mb(pid: int) -> list[float | None]:
    """The RSS high-water marks (MiB) of ``pid`` and of its descendants, in that order."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # the fields after the command name, which is in parentheses and may hold spaces
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    order, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        order.append(current)
        todo += sorted(children.get(current, []))
    return [proc_peak_rss_mb(p) for p in order]


def bench_st_peers(info: ModelInfo, sets: list[TextSet], results: Results, log: Console) -> None:
    """sentence-transformers fp32 and bf16 at batch 32, each in a child process of its own (so each has a
    peak RSS of its own, and neither inherits this process's heap)."""
    texts = {s.name: s.texts for s in sets}
    context = multiprocessing.get_context("spawn")
    for variant, dtype in (("st_fp32", "float32"), ("st_bf16", "bfloat16")):
        log.print(f"  {variant:<24} short and long, in a child process")
        try:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                out = pool.submit(st_child, str(info.path), dtype, texts, BATCH).result()
        except Exception as exc:  # whatever failed in the child (it may raise anything), the row is skipped
            results.skip(variant, f"sentence-transformers {dtype} failed: {_short_reason(exc)}", log)
            continue
        for s in sets:
            results.add(variant, s.name, out["rates"][s.name], out["vectors"][s.name])
        results.worker_rss_mb[variant] = [out["peak_rss_mb"]]


def _cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process, or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tokenize_seconds(tok: Tokenization, texts: list[str]) -> float:
    """CPU seconds of this process to tokenize ``texts`` in batches of ``BATCH``, as a worker does."""
    before = time.process_time()
    for i in range(0, len(texts), BATCH):
        tok.encode(texts[i:i + BATCH], truncate=True)
    return time.process_time() - before


def _measure_http_row(variant: str, url: str, pids: Callable[[], list[float | None]], sets: list[TextSet],
                      results: Results, log: Console, started: float, pid: int | None = None,
                      tok: Tokenization | None = None) -> None:
    """One HTTP row. With the ``pid`` of a single worker, also its CPU per embedding by stage: the event loop
    (its main thread: HTTP, validation, JSON), tokenization (the same texts tokenized here), and inference
    (the rest: the runtime's threads and their callers)."""
    log.print(f"  {variant:<24} ready after {time.monotonic() - started:.0f} s")
    if pid is not None:
        info = httpx.get(f"{url}/info", timeout=30).json()
        results.served[variant] = (info["backend"], info["model_dtype"])
    for s in sets:
        log.print(f"  {variant:<24} {s.name}")
        if pid is not None:
            cpu, loop_cpu = _cpu_seconds(pid), _cpu_seconds(pid, pid)
        rate, vectors = http_rate([url], s.texts, api=OPENAI)
        results.add(variant, s.name, rate, vectors)
        if pid is not None and tok is not None:
            count = 2 * len(s.texts)  # http_rate's warm-up and timed passes
            cpu, loop_cpu = _cpu_seconds(pid) - cpu, _cpu_seconds(pid, pid) - loop_cpu
            tokenize = 2 * _tokenize_seconds(tok, s.texts)  # an estimate: the same texts, tokenized here
            inference = cpu - loop_cpu - tokenize
            results.cpu_us[variant] = results.cpu_us.get(variant, {}) | {s.name: {
                stage: round(seconds / count * 1e6, 1) for stage, seconds in
                (("event loop", loop_cpu), ("tokenization", tokenize), ("inference and the rest", inference))}}
    results.worker_rss_mb[variant] = pids()


def bench_infinity(info: ModelInfo, sets: list[TextSet], results: Results, root: Path, log: Console) -> None:
    """infinity-emb over HTTP in fp32 and bf16, from its own virtualenv (built on first use)."""
    command = ensure_infinity_venv(lambda line: log.print(f"  {line}"))
    for variant, dtype in (("infinity_fp32", "float32"), ("infinity_bf16", "bfloat16")):
        if isinstance(command, str):
            results.skip(variant, command, log)
            continue
        log.print(f"  {variant:<24} starting")
        started = time.monotonic()
        try:
            with infinity_server(command, info.path, dtype, free_port(), root / f"{variant}.log") as server:
                _measure_http_row(variant, server.url, lambda: tree_peak_rss_mb(server.proc.pid), sets, results,
                                  log, started)
        except (RuntimeError, TimeoutError, OSError, LoadError, KeyError, ValueError) as exc:
            results.skip(variant, _short_reason(exc), log)


def _default_fleet_config(root: Path, fleet: dict[str, int]) -> Path:
    """``embedfleet serve``'s defaults (no instances declared: the default model, its default workers) but
    for the ``fleet`` keys, with the cache off so that every text is computed, and its state in ``root``."""
    low = 30000 + (free_port() % 300) * 64
    path = root / "embedfleet.toml"
    path.write_text("\n".join([
        "[fleet]", f'state_dir = "{root / "state"}"', f'port_range = "{low}-{low + 63}"',
        *(f"{key} = {value}" for key, value in fleet.items()), "[gateway]", 'cache = "none"', ""]))
    return path


def bench_our_rows(info: ModelInfo, sets: list[TextSet], results: Results, root: Path, log: Console) -> None:
    """The embedfleet rows of (f): workers with the flags of ``OUR_ROWS``, and the default fleet."""
    tok = Tokenization(info.path, info.max_input_length)
    for variant, flags in OUR_ROWS:
        log.print(f"  {variant:<24} starting")
        started = time.monotonic()
        try:
            if isinstance(flags, dict):
                folder = root / variant
                folder.mkdir()
                port = free_port()
                with serve_fleet(_default_fleet_config(folder, flags), port, folder / "serve.log", "embedfleet serve",
                                 HEALTH_TIMEOUT_S) as proc:
                    _measure_http_row(variant, f"http://127.0.0.1:{port}", lambda: tree_peak_rss_mb(proc.pid),
                                      sets, results, log, started)
            else:
                with worker_process(flags) as worker:
                    _measure_http_row(variant, worker.url, lambda: tree_peak_rss_mb(worker.proc.pid), sets,
                                      results, log, started, worker.proc.pid, tok)
        except (RuntimeError, TimeoutError, OSError, LoadError, KeyError, ValueError) as exc:
            results.skip(variant, _short_reason(exc), log)


CEILINGS = (("ceiling_openvino_bf16", "bfloat16"), ("ceiling_openvino_f32", "float32"))


def _all(pool: concurrent.futures.Executor, forward: Callable[[PaddedBatch], np.ndarray],
         batches: list[PaddedBatch]) -> list[np.ndarray]:
    return list(pool.map(forward, batches))


def ceiling_batches(encoded: list[Encoded], budget: int | None) -> list[PaddedBatch]:
    """Inputs in input order, cut into batches as the worker's batcher would size them: at most ``BATCH``
    inputs and ``budget`` padded tokens (the backend's preferred batch size) each."""
    batches: list[PaddedBatch] = []
    start = 0
    while start < len(encoded):
        end, width = start + 1, encoded[start].length
        while end < len(encoded) and end - start < BATCH:
            wider = max(width, encoded[end].length)
            if budget is not None and wider * (end - start + 1) > budget:
                break
            end, width = end + 1, wider
        batches.append(PaddedBatch.from_encoded(encoded[start:end]))
        start = end
    return batches


def bench_ceilings(info: ModelInfo, sets: list[TextSet], results: Results, log: Console) -> None:
    """What the hardware gives the default worker's runtime: OpenVINO alone in this process, the texts
    tokenized beforehand (untimed) and cut in input order into batches the size the worker's batcher makes
    (:func:`ceiling_batches`), one batch on each of its streams at once (as the worker runs them). No HTTP,
    JSON, tokenization or dynamic batching: a worker's share of this row is what serving costs. The worker
    sorts waiting inputs by length, so on mixed lengths it can pad less than this row, and pass it."""
    from embedfleet.engine.backends.openvino_backend import OpenVinoBackend, available

    tok = Tokenization(info.path, info.max_input_length)
    for variant, dtype in CEILINGS:
        if not available():
            results.skip(variant, "openvino is not installed", log)
            continue
        backend = OpenVinoBackend(info, default_data_dir(), dtype=dtype)
        for s in sets:
            log.print(f"  {variant:<24} {s.name} ({backend.streams} streams)")
            batches = ceiling_batches(tok.encode(s.texts, truncate=True), backend.preferred_batch_tokens)
            forward = functools.partial(backend.forward, output=Output.POOLED)
            with concurrent.futures.ThreadPoolExecutor(backend.streams) as pool:
                rate, parts = measure(len(s.texts), functools.partial(_all, pool, forward, batches))
            results.add(variant, s.name, rate, np.concatenate(parts))
        del backend
        gc.collect()


def bench_side_by_side(info: ModelInfo, sets: list[TextSet], results: Results, skip_infinity: bool,
                       log: Console) -> None:
    """(f): the peers and our rows, same texts, same load (``CLIENTS`` clients x ``BATCH`` texts), and the
    ceilings of our runtime."""
    bench_st_peers(info, sets, results, log)
    bench_ceilings(info, sets, results, log)
    with tempfile.TemporaryDirectory(prefix="embedfleet-bench-") as tmp:
        root = Path(tmp)
        if skip_infinity:
            for variant in ("infinity_fp32", "infinity_bf16"):
                results.skip(variant, "--skip-infinity", log)
        else:
            bench_infinity(info, sets, results, root, log)
        bench_our_rows(info, sets, results, root, log)


def ceiling_of(results: Results) -> dict[str, str]:
    """The ceiling row of each single-worker row that runs what a ceiling measures (its /info said so)."""
    by_dtype = {dtype: variant for variant, dtype in CEILINGS}
    return {variant: by_dtype[dtype] for variant, (backend, dtype) in results.served.items()
            if backend == "openvino" and dtype in by_dtype}


def side_by_side_checks(results: Results, sets: list[TextSet]) -> tuple[list[Check], list[Check]]:
    """(f)'s ratios and cosines, with the issue's targets: the default worker against the best peer, the
    float32 worker against sentence-transformers fp32, the default fleet against the best peer."""
    r, v = results.rates, results.vectors
    ratios: list[Check] = []
    cosines: list[Check] = []
    for s in sets:
        peers = [p for p in BEST_PEER if s.name in r.get(p, {})]
        if peers:
            best = max(peers, key=lambda p: r[p][s.name])
            wanted: list[tuple[str, float | None]] = [
                ("ef_worker_default", 1.5 if s.name == "short" else 1.1),
                ("ef_serve_default", 1.4 if s.name == "short" else None),
                ("ef_worker_openvino_bf16", None),
                ("ef_worker_onnx", None),
            ]
            ratios += [Check(f"{s.name}: {num} / best peer ({best})", r[num][s.name] / r[best][s.name], target)
                       for num, target in wanted if s.name in r.get(num, {})]
        for num, den, target in (("ef_worker_float32", "st_fp32", 1.15), ("infinity_bf16", "st_bf16", None),
                                 ("infinity_fp32", "st_fp32", None), ("ceiling_openvino_bf16", "st_bf16", None),
                                 ("ceiling_openvino_f32", "st_fp32", None),
                                 *((worker, ceiling, None) for worker, ceiling in ceiling_of(results).items())):
            if s.name in r.get(num, {}) and s.name in r.get(den, {}):
                ratios.append(Check(f"{s.name}: {num} / {den}", r[num][s.name] / r[den][s.name], target))
        if s.name not in v.get(REFERENCE, {}):
            continue
        reference = v[REFERENCE][s.name]
        min_targets = {"ef_worker_default": 0.9999, "ef_worker_float32": 0.99999}
        for variant in PEER_VARIANTS:
            if variant == REFERENCE or s.name not in v.get(variant, {}):
                continue
            c = (v[variant][s.name] * reference).sum(axis=1)
            cosines += [Check(f"{s.name}: {variant} vs {REFERENCE}: min", float(c.min()), min_targets.get(variant)),
                        Check(f"{s.name}: {variant} vs {REFERENCE}: mean", float(c.mean()))]
    return ratios, cosines


# --- ratios, cosines and the report ------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A derived number, with the minimum it should reach (None: informational)."""

    name: str
    value: float
    target: float | None = None

    @property
    def passed(self) -> bool | None:
        """Whether the value reaches the target; None without a target."""
        return None if self.target is None else bool(self.value >= self.target)

    def as_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {"name": self.name, "value": round(self.value, 5), "target": self.target, "pass": self.passed}


def ratio_checks(results: Results, sets: list[TextSet], raw_key: str) -> list[Check]:
    """The throughput ratios of the issue, with their targets."""
    r = results.rates
    checks = []
    for s in sets:
        wanted: list[tuple[str, str, float | None]] = [
            ("worker_http", raw_key, 0.9),
            ("worker_http", "st_b32", 1.3 if s.name == "short" else 1.1),
            ("raw_onnx_int8", "st_b32", 1.6),
            ("2x1thread_http", "worker_http", 1.0),
            ("worker_http_torch_bf16", "st_b32", None),
        ]
        checks += [Check(f"{s.name}: {num} / {den}", r[num][s.name] / r[den][s.name], target)
                   for num, den, target in wanted if num in r and den in r]
    return checks


def cosine_checks(results: Results, sets: list[TextSet], raw_key: str) -> list[Check]:
    """Cosines between unit vectors of the same texts, over the short and long texts together."""
    v = results.vectors

    def cos(a: str, b: str) -> np.ndarray | None:
        if a not in v or b not in v:
            return None
        return np.concatenate([(v[a][s.name] * v[b][s.name]).sum(axis=1) for s in sets])

    checks = []
    if (c := cos("raw_onnx_int8", "raw_onnx_fp32")) is not None:
        # The target is on the mean, as in tests/engine/test_backends.py (which also wants min >= 0.98).
        checks += [Check("raw_onnx_int8 vs raw_onnx_fp32: mean", float(c.mean()), 0.99),
                   Check("raw_onnx_int8 vs raw_onnx_fp32: min", float(c.min()))]
    for a, b in ((raw_key, "st_b32"), ("worker_http", raw_key), ("raw_torch_bf16", "raw_torch_fp32")):
        if (c := cos(a, b)) is not None:
            checks.append(Check(f"{a} vs {b}: min", float(c.min())))
    return checks


CPU_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni")


def cpu_model_and_flags() -> tuple[str | None, dict[str, bool]]:
    """The CPU's model name (as ``lscpu`` prints it) and whether it has the flags that decide the precision
    (AMX, AVX512-BF16)."""
    cpu_model = platform.processor() or None
    flags: set[str] = set()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True,
                               env={**os.environ, "LC_ALL": "C"}).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                cpu_model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu_model is None:
                cpu_model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return cpu_model, {flag: flag in flags for flag in CPU_FLAGS}


def machine_facts(device: str, with_st: bool) -> dict[str, Any]:
    """CPU, platform and library versions."""
    import onnxruntime
    import torch

    cpu_model, cpu_flags = cpu_model_and_flags()
    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "cpu_flags": cpu_flags,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "embedfleet": __version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": _version_of("openvino"),
        "infinity_emb": INFINITY_VERSION,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }
    if with_st:
        import sentence_transformers

        facts["sentence_transformers"] = sentence_transformers.__version__
    return facts


def _version_of(package: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(package)
    return None


def build_document(args: argparse.Namespace, sets: list[TextSet], results: Results, ratios: list[Check],
                   cosines: list[Check], worker_backend: str) -> dict[str, Any]:
    """The JSON document."""
    side_ratios, side_cosines = side_by_side_checks(results, sets)
    return {
        "benchmark": "worker",
        "quick": args.quick,
        "machine": machine_facts(args.device, not args.skip_st),
        "settings": {"batch_size": BATCH, "http_clients": CLIENTS, "worker_backend": worker_backend,
                     "timing": "one warm-up pass, then one timed pass (time.perf_counter)"},
        "texts": {s.name: {"count": len(s.texts), "mean_tokens": round(s.mean_tokens, 1),
                           "min_tokens": s.min_tokens, "max_tokens": s.max_tokens} for s in sets},
        "embeddings_per_s": {s.name: {variant: round(by_set[s.name], 1)
                                      for variant, by_set in results.rates.items()} for s in sets},
        "ratios": [c.as_json() for c in ratios],
        "cosine": [c.as_json() for c in cosines],
        "side_by_side": {
            "variants": [v for v in PEER_VARIANTS if v in results.rates or v in results.skipped],
            "reference": REFERENCE,
            "best_peer_of": list(BEST_PEER),
            "http_route": OPENAI.route,
            "ratios": [c.as_json() for c in side_ratios],
            "cosine": [c.as_json() for c in side_cosines],
            "worker_cpu_us_per_embedding": results.cpu_us,
        },
        "skipped": dict(results.skipped),
        "peak_rss_mb": {
            "in_process": {k: round(v, 1) for k, v in results.in_process_rss_mb.items()},
            "workers": {k: [None if x is None else round(x, 1) for x in v]
                        for k, v in results.worker_rss_mb.items()},
        },
    }


def _verdict(passed: bool | None) -> str:
    return "" if passed is None else ("[green]PASS[/]" if passed else "[red]FAIL[/]")


def _check_table(title: str, first: str, checks: list[dict[str, Any]], number: str) -> Table:
    table = Table(title=title)
    table.add_column(first)
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_column("")
    for c in checks:
        target = "" if c["target"] is None else ">= " + number.format(c["target"])
        table.add_row(c["name"], number.format(c["value"]), target, _verdict(c["pass"]))
    return table


def print_report(doc: dict[str, Any], console: Console) -> None:
    """Rich tables: throughput, ratios, cosines and peak memory."""
    m = doc["machine"]
    texts = doc["texts"]
    device = f"{m['device']} ({m['gpu']})" if m["gpu"] else m["device"]
    console.print(f"[bold]embedfleet worker benchmark[/]{' (quick run)' if doc['quick'] else ''} on "
                  f"{m['cpu_model']} ({m['cpus_usable']} CPUs usable), device {device}; torch {m['torch']}, "
                  f"onnxruntime {m['onnxruntime']}, openvino {m['openvino']}")
    flags = ", ".join(f"{flag} {'yes' if has else 'no'}" for flag, has in m["cpu_flags"].items())
    console.print(f"  CPU flags: {flags}")
    for name, t in texts.items():
        console.print(f"  {name} texts: {t['count']}, tokens per text mean {t['mean_tokens']:.1f} "
                      f"(min {t['min_tokens']}, max {t['max_tokens']})")

    rates = Table(title="embeddings/s (higher is better)")
    rates.add_column("variant")
    rates.add_column("what")
    for name, t in texts.items():
        rates.add_column(f"{name}\n{t['count']} x ~{t['mean_tokens']:.0f} tok", justify="right")
    variants = list(dict.fromkeys(v for by_variant in doc["embeddings_per_s"].values() for v in by_variant))
    for variant in variants:
        cells = [doc["embeddings_per_s"][name].get(variant) for name in texts]
        values = ["-" if c is None else f"{c:,.1f}" for c in cells]
        rates.add_row(variant, DESCRIPTIONS.get(variant, ""), *values)
    for variant in (v for v in doc["skipped"] if v not in variants):  # (a row that failed midway has its cells)
        rates.add_row(variant, DESCRIPTIONS.get(variant, ""), *["[yellow]skipped[/]"] * len(texts))
    console.print(rates)

    if doc["ratios"]:
        console.print(_check_table("ratios (throughput)", "ratio", doc["ratios"], "{:.2f}x"))
    if doc["cosine"]:
        console.print(_check_table("cosine similarity (short + long texts)", "pair", doc["cosine"], "{:.5f}"))
    side = doc["side_by_side"]
    if side["ratios"]:
        console.print(_check_table(f"(f) side by side: ratios (best peer: the faster of {' and '.join(BEST_PEER)})",
                                   "ratio", side["ratios"], "{:.2f}x"))
    if side["cosine"]:
        console.print(_check_table(f"(f) side by side: cosine to {side['reference']}, per length", "pair",
                                   side["cosine"], "{:.6f}"))
    if doc["skipped"]:
        skipped = Table(title="skipped (not measured)")
        skipped.add_column("variant")
        skipped.add_column("why")
        for variant, reason in doc["skipped"].items():
            skipped.add_row(variant, reason)
        console.print(skipped)

    stages = doc["side_by_side"]["worker_cpu_us_per_embedding"]
    if stages:
        table = Table(title="(f) worker CPU per embedding by stage (µs)")
        table.add_column("variant")
        table.add_column("texts")
        names = list(next(iter(next(iter(stages.values())).values())))
        for name in names:
            table.add_column(name, justify="right")
        for variant, by_set in stages.items():
            for text_set, us in by_set.items():
                table.add_row(variant, text_set, *(f"{us[n]:,.0f} ({us[n] / sum(us.values()):.0%})" for n in names))
        console.print(table)

    memory = Table(title="peak RSS (MiB)")
    memory.add_column("process")
    memory.add_column("high-water mark", justify="right")
    for stage, mb in doc["peak_rss_mb"]["in_process"].items():
        memory.add_row(f"this process, {stage}", f"{mb:,.0f}")
    for variant, mbs in doc["peak_rss_mb"]["workers"].items():
        each = " + ".join("?" if x is None else f"{x:,.0f}" for x in mbs)
        memory.add_row(f"process(es) of {variant}", each)
    console.print(memory)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write atomically (a ``.tmp`` sibling, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    tmp.replace(path)


def publish(doc: dict[str, Any], out: Path, as_json: bool, log: Console) -> None:
    """Write the JSON document, say where, and with ``--json`` also print it to stdout."""
    write_json(out, doc)
    log.print(f"wrote {out}")
    if as_json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 short and 50 long texts (a smoke test)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: torch fp16 instead of onnx, no int8 and no single-thread workers")
    parser.add_argument("--skip-st", action="store_true", help="do not measure sentence-transformers in (a)")
    parser.add_argument("--peers-only", action="store_true",
                        help="only (f): the peers and embedfleet's rows side by side, over the OpenAI route")
    parser.add_argument("--skip-peers", action="store_true", help="do not run (f)")
    parser.add_argument("--skip-infinity", action="store_true",
                        help="in (f), do not build or run infinity-emb (its rows are reported skipped)")
    parser.add_argument("--json", action="store_true",
                        help="print the JSON document to stdout (the tables go to stderr)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the JSON document (default: benchmarks/results/worker.json; "
                             "worker-peers.json with --peers-only; -quick before .json with --quick)")
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement and report."""
    args = parse_args(argv)
    run_started = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything used here is local; never reach the network
    # SIGTERM unwinds like Ctrl-C, so the context managers stop the worker processes on the way out.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.peers_only and (args.skip_peers or args.device == "cuda"):
        log_error = Console(stderr=True)
        log_error.print("[red]--peers-only runs (f), which is CPU only: not with --skip-peers or --device cuda[/]")
        return 2
    stem = "worker-peers" if args.peers_only else "worker"
    out: Path = args.out or RESULTS_DIR / f"{stem}{'-quick' if args.quick else ''}.json"
    log = Console(stderr=True)
    report = Console(stderr=args.json)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            log.print("[red]--device cuda, but torch sees no CUDA device[/]")
            return 2

    info = inspect("default")
    tok = Tokenization(info.path, info.max_input_length)
    counts = {"short": 200, "long": 50} if args.quick else {"short": 2000, "long": 500}
    sets = text_sets(tok, counts)
    results = Results()
    cuda = args.device == "cuda"
    raw_key = "raw_torch_fp16" if cuda else "raw_onnx_fp32"
    worker_backend = ["--device", "cuda", "--backend", "torch", "--dtype", "float16"] if cuda else \
        ["--device", "cpu", "--backend", "onnx"]

    if not args.peers_only:
        if not args.skip_st:
            log.print("[bold](a)[/] sentence-transformers in process")
            bench_sentence_transformers(info, args.device, sets, results, log)
        log.print("[bold](b)[/] raw backends in process")
        bench_raw_backends(info, tok, args.device, sets, results, log)
        log.print("[bold](c)[/] one worker over HTTP")
        bench_workers("worker_http", [worker_backend], sets, results, log)
        if not cuda:
            log.print("[bold](d)[/] two single-thread workers over HTTP")
            bench_workers("2x1thread_http", [[*worker_backend, "--threads", "1"]] * 2, sets, results, log)
            log.print("[bold](e)[/] one torch bf16 worker over HTTP")
            bf16 = ["--device", "cpu", "--backend", "torch", "--dtype", "bfloat16"]
            bench_workers("worker_http_torch_bf16", [bf16], sets, results, log)
    if not cuda and not args.skip_peers:
        log.print(f"[bold](f)[/] peers side by side ({CLIENTS} clients x {BATCH} texts, {OPENAI.route})")
        bench_side_by_side(info, sets, results, args.skip_infinity, log)

    doc = build_document(args, sets, results, ratio_checks(results, sets, raw_key),
                         cosine_checks(results, sets, raw_key), "torch fp16" if cuda else "onnx fp32")
    doc["wall_s"] = round(time.monotonic() - run_started, 1)
    log.print(f"the run took {doc['wall_s']:.0f} s")
    print_report(doc, report)
    publish(doc, out, args.json, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
