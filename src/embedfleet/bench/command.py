"""``embedfleet bench URL``: settings in, load out, results printed and written."""

from __future__ import annotations

import importlib.util
import math
import secrets
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from embedfleet import __version__
from embedfleet.bench.loadgen import Endpoint, run_async
from embedfleet.bench.modes import MODES, Channel, GrpcTls, Mode, Target, parse_target
from embedfleet.bench.report import compare_table, document, plot, ratios, results_table
from embedfleet.bench.runner import Shape, drive, open_channels, prime
from embedfleet.bench.stats import RunStats
from embedfleet.bench.texts import TextError, TextMix, read_texts
from embedfleet.config import BenchSettings

DEFAULT_TEXTS = 10_000


class BenchError(Exception):
    """Settings that cannot make a run (a bad URL, an unreadable file)."""


def tls_context(settings: BenchSettings) -> ssl.SSLContext:
    """The client's TLS context from ``--cacert``, ``--cert``/``--key`` and ``--insecure``."""
    try:
        context = ssl.create_default_context(cafile=str(settings.cacert) if settings.cacert else None)
        if settings.cert is not None:
            context.load_cert_chain(str(settings.cert), str(settings.key) if settings.key else None)
    except (OSError, ssl.SSLError) as exc:
        raise BenchError(f"TLS files: {exc}") from exc
    if settings.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def grpc_tls(settings: BenchSettings) -> GrpcTls:
    """The PEM files of a grpcs:// client (``--cacert``, ``--cert``/``--key``; a ``--cert`` without ``--key``
    holds the key too)."""
    if settings.insecure:
        raise BenchError("--insecure is not available for grpcs:// (gRPC always verifies): give --cacert")
    try:
        root = settings.cacert.read_bytes() if settings.cacert else None
        chain = settings.cert.read_bytes() if settings.cert else None
        key = settings.key.read_bytes() if settings.key else chain
    except OSError as exc:
        raise BenchError(f"TLS files: {exc}") from exc
    return GrpcTls(root, key, chain)


@dataclass
class Side:
    """One target of the run: its mode, texts, clients and what it measured."""

    name: str
    mode: Mode
    mix: TextMix
    channels: list[Channel] = field(default_factory=list)
    stats: RunStats | None = None

    def add(self, run: RunStats) -> None:
        """Merge one round."""
        self.stats = run if self.stats is None else self.stats.merge(run)


class LiveProgress:
    """The progress bar: requests done (or seconds run) and the live throughput, refreshed ~4 times a second."""

    def __init__(self, console: Console, total: float, by_time: bool, enabled: bool) -> None:
        self.by_time = by_time
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[figures]}"),
                            TimeElapsedColumn(), console=console, auto_refresh=False, disable=not enabled)
        self.task: TaskID = self.bar.add_task("", total=total, figures="")
        self.done = 0.0  # requests (or seconds) of the rounds finished before this one
        self.window: tuple[float, int, int] = (0.0, 0, 0)

    def start_round(self, name: str) -> None:
        """A new round against ``name``."""
        self.window = (0.0, 0, 0)
        self.bar.update(self.task, description=name)

    def end_round(self, stats: RunStats) -> None:
        """Count a finished round."""
        self.done += stats.duration_s if self.by_time else stats.successful + stats.failed

    def __call__(self, stats: RunStats, elapsed: float) -> None:
        """Show the run so far: throughput over the last interval."""
        then, requests, texts = self.window
        now_requests, now_texts = stats.successful, texts + sum(stats.texts[requests:])
        span = elapsed - then
        if span > 0:
            figures = (f"{(now_requests - requests) / span:,.0f} req/s  {(now_texts - texts) / span:,.0f} emb/s"
                       + (f"  [red]{stats.failed:,} failed[/]" if stats.failed else ""))
            self.window = (elapsed, now_requests, now_texts)
            progress = elapsed if self.by_time else stats.successful + stats.failed
            self.bar.update(self.task, completed=self.done + progress, figures=figures)
            self.bar.refresh()


async def _run(settings: BenchSettings, sides: list[Side], shape: Shape, rounds: int, live: LiveProgress,
               ) -> None:
    for side in sides:
        side.channels = [side.mode.channel() for _ in range(settings.concurrency)]
        await open_channels(side.channels)
        primed = await prime(side.channels, side.mix.priming())
        if primed.failed:
            live.bar.console.print(f"[yellow]{side.name}: {primed.failed} of the hot-set requests failed: "
                                   f"{dict(primed.errors)}[/]")
        if settings.warmup > 0:
            warm = Shape(settings.concurrency, duration=settings.warmup, rate=settings.rate)
            await drive(side.channels, side.mix, warm)
    try:
        for r in range(rounds):
            for side in reversed(sides) if r % 2 else sides:
                live.start_round(side.name)
                run = await drive(side.channels, side.mix, shape, live)
                live.end_round(run)
                side.add(run)
    finally:
        for side in sides:
            for channel in side.channels:
                await channel.close()


def run_bench(settings: BenchSettings, url: str, console: Console) -> int:
    """Run the benchmark the settings describe against ``url`` (and ``--compare``); print and write the results.
    Exit code: 0, or 1 when no request succeeded."""
    mode_class = MODES[settings.mode]
    urls = [url] + ([settings.compare] if settings.compare else [])
    try:
        endpoints = [Endpoint.parse(u, mode_class.schemes) for u in urls]
    except ValueError as exc:
        raise BenchError(f"--mode {settings.mode}: {exc}") from None
    tls_flags = settings.cacert or settings.cert or settings.insecure
    if tls_flags and not any(e.secure for e in endpoints):
        raise BenchError("--cacert, --cert and --insecure need an https:// or grpcs:// URL")
    if settings.target and any(not e.scheme.startswith("grpc") for e in endpoints):
        raise BenchError("--target needs a grpc:// or grpcs:// URL (over HTTP, --model sends X-Model)")
    tls = tls_context(settings) if any(e.scheme == "https" for e in endpoints) else None
    tls_grpc = grpc_tls(settings) if any(e.scheme == "grpcs" for e in endpoints) else None
    pick = parse_target(settings.target) if settings.target else None
    compression = None if settings.arrow_compression == "none" else settings.arrow_compression
    try:
        texts = read_texts(settings.texts, settings.column) if settings.texts else None
    except TextError as exc:
        raise BenchError(str(exc)) from None
    if settings.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib: pip install 'embedfleet[bench]'")
    run_id = secrets.token_hex(3)
    sides = []
    for i, endpoint in enumerate(endpoints):
        mode = mode_class(Target(endpoint, tls if endpoint.scheme == "https" else None, settings.api_key,
                                 settings.model, settings.encoding, settings.timeout,
                                 tls_grpc if endpoint.scheme == "grpcs" else None, pick, compression))
        mix = TextMix(mode.prepare, settings.batch_size, texts=texts, text_tokens=settings.text_tokens,
                      hit_ratio=settings.hit_ratio, hot_count=settings.hot_texts, run_id=f"{run_id}{i}")
        sides.append(Side("A" if len(endpoints) > 1 and i == 0 else "B" if i else "target", mode, mix))
    if len(sides) == 1:
        sides[0].name = str(endpoints[0])

    rounds = settings.rounds if settings.compare else 1
    num_texts = settings.num_texts or (None if settings.duration else DEFAULT_TEXTS)
    requests = None if num_texts is None else max(1, math.ceil(num_texts / settings.batch_size / rounds))
    duration = None if settings.duration is None else settings.duration / rounds
    shape = Shape(settings.concurrency, requests, duration, settings.rate)
    total = (requests or 0) * rounds * len(sides) if requests else (duration or 0) * rounds * len(sides)
    err = Console(stderr=True)
    live = LiveProgress(err, total, requests is None, settings.progress)
    started = time.time()
    with live.bar:
        run_async(_run(settings, sides, shape, rounds, live))

    results = {side.name: side.stats or RunStats() for side in sides}
    title = (f"embedfleet bench: --mode {settings.mode}" + (f" --target {settings.target}" if settings.target else "")
             + f", batch {settings.batch_size}, concurrency "
             f"{settings.concurrency}" + (f", rate {settings.rate:g}/s (open loop)" if settings.rate else "")
             + (f", hit ratio {settings.hit_ratio:g}" if settings.hit_ratio is not None else ""))
    if len(sides) == 2:
        console.print(f"A = {endpoints[0]}\nB = {endpoints[1]}  ({rounds} alternating rounds each)")
        console.print(compare_table(["A", "B"], list(results.values()), title))
    else:
        console.print(results_table("value", results[sides[0].name], title))

    ours = {"version": __version__, "started_at": round(started, 3), "concurrency": settings.concurrency,
            "rate": settings.rate, "hit_ratio_requested": settings.hit_ratio, "warmup_secs": settings.warmup,
            "encoding": settings.encoding if settings.mode == "openai" else None, "model": settings.model,
            "target": settings.target,
            "arrow_compression": compression if settings.mode == "arrow" else None,
            "texts_file": str(settings.texts) if settings.texts else None,
            "text_tokens": None if settings.texts else settings.text_tokens}
    docs = [document(settings.mode, settings.batch_size, results[side.name], url=str(endpoint), **ours)
            for side, endpoint in zip(sides, endpoints, strict=True)]
    doc: dict[str, Any] = docs[0]
    if len(docs) == 2:
        doc["compare"] = {**docs[1], "ratios_b_over_a": ratios(*results.values())}
    if settings.json_file is not None:
        settings.json_file.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    if settings.plot is not None:
        plot(settings.plot, {str(e): results[s.name] for s, e in zip(sides, endpoints, strict=True)})
    return 0 if all(r.successful for r in results.values()) else 1
