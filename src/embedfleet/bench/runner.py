"""The load loops: ``concurrency`` clients on one event loop, closed (send when the last answer is back) or open
(requests on a fixed schedule, latency counted from the scheduled time).

Open loop: request ``i`` is due at ``start + i / rate``. A free client takes the next due request, waits for
its time if it is early and sends it; if every client is busy when a request falls due, it waits for a
free client, and that wait is part of its latency. So a server slower than the rate shows latencies that
grow with the queue, not the flattering service time a closed loop reports (coordinated omission).
``concurrency`` bounds the requests in flight; a due request is never dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from embedfleet.bench.loadgen import LoadError
from embedfleet.bench.modes import Channel
from embedfleet.bench.stats import RunStats
from embedfleet.bench.texts import TextMix

PROGRESS_S = 0.25
WATCHDOG_S = 0.1


@dataclass(frozen=True)
class Shape:
    """How much load, and how: a run ends after ``requests`` or ``duration`` seconds, whichever comes first."""

    concurrency: int
    requests: int | None = None
    duration: float | None = None
    rate: float | None = None  # requests/s, open loop; None: closed loop


Progress = Callable[[RunStats, float], None]
"""Called about four times a second with the run so far and the seconds since it started."""


async def open_channels(channels: Sequence[Channel]) -> None:
    """Open every channel (a failure leaves it closed: its first request tries again and counts the error)."""
    for channel in channels:
        try:
            await channel.open()
        except LoadError:
            await channel.close()


async def drive(channels: Sequence[Channel], mix: TextMix, shape: Shape, progress: Progress | None = None,
                ) -> RunStats:
    """Run the load on ``channels`` (one client each) and return what it measured."""
    stats = RunStats(rounds=1)
    latencies, finished, texts = stats.latencies_s, stats.finished_s, stats.texts
    x_cache, errors = stats.x_cache, stats.errors
    total = shape.requests if shape.requests is not None else 1 << 62
    clock = time.perf_counter
    cpu_before = time.process_time()
    start = clock()
    deadline = start + shape.duration if shape.duration is not None else float("inf")
    interval = 1.0 / shape.rate if shape.rate else 0.0
    issued = 0

    def failed(key: str, count: int) -> None:
        errors[key] += 1
        stats.failed_texts += count

    async def client(channel: Channel) -> None:
        nonlocal issued
        while issued < total:
            if interval:
                due = start + issued * interval
                if due >= deadline:
                    return
                issued += 1
                request, count = mix.take()
                wait = due - clock()
                if wait > 0:
                    await asyncio.sleep(wait)
                sent = due
            else:
                if clock() >= deadline:
                    return
                issued += 1
                request, count = mix.take()
                sent = clock()
            try:
                reply = await channel.send(request)
            except LoadError as exc:
                failed(f"transport: {str(exc).split(':', 1)[0]}", count)
                continue
            done = clock()
            if not reply.ok:
                failed(reply.error, count)
                continue
            latencies.append(done - sent)
            finished.append(done - start)
            texts.append(count)
            if reply.cache is not None:
                x_cache[reply.cache] += 1
                stats.cache_hits += reply.hits
                stats.cache_misses += reply.misses

    async def report() -> None:
        assert progress is not None
        while True:
            await asyncio.sleep(PROGRESS_S)
            progress(stats, clock() - start)

    tasks = [asyncio.create_task(watchdog(channels))]
    if progress is not None:
        tasks.append(asyncio.create_task(report()))
    try:
        await asyncio.gather(*(client(c) for c in channels))
    finally:
        for task in tasks:
            task.cancel()
    stats.duration_s = clock() - start
    stats.client_cpu_s = time.process_time() - cpu_before
    if progress is not None:
        progress(stats, stats.duration_s)
    return stats


async def watchdog(channels: Sequence[Channel]) -> None:
    """Abort overdue requests, checking every ``WATCHDOG_S``: one timer for all, none per request."""
    while True:
        await asyncio.sleep(WATCHDOG_S)
        now = time.perf_counter()
        for channel in channels:
            channel.expire(now)


async def prime(channels: Sequence[Channel], requests: Sequence[object]) -> RunStats:
    """Send ``requests`` once each over the channels (untimed: to fill a cache before a run)."""
    todo = iter(requests)
    stats = RunStats()

    async def client(channel: Channel) -> None:
        for request in todo:
            try:
                reply = await channel.send(request)
            except LoadError as exc:
                stats.errors[f"transport: {exc}"] += 1
                continue
            if not reply.ok:
                stats.errors[reply.error] += 1

    guard = asyncio.create_task(watchdog(channels))
    try:
        await asyncio.gather(*(client(c) for c in channels))
    finally:
        guard.cancel()
    return stats
