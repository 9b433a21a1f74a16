"""Dynamic batching: inputs from many requests share forward passes.

Each input waits in one queue. When an inference stream is free, the batcher takes the oldest
waiting input (so nothing starves) and adds the waiting inputs closest to it in length (so little
compute goes to padding) while the batch stays within ``max_batch_tokens`` padded tokens and
``max_batch_requests`` inputs. Forward passes run on dedicated threads, one per stream the backend
offers (:attr:`Backend.streams`), so the event loop keeps serving /health and /metrics while a long
batch runs, and the next batch is formed from everything that arrived meanwhile. When several streams
are free at once, the waiting inputs are shared out between them, so that one request alone on an idle
worker still uses every stream.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from embedfleet.engine import errors
from embedfleet.engine.backends.base import Backend, Output, PaddedBatch
from embedfleet.engine.metrics import EngineMetrics
from embedfleet.engine.tokenization import Encoded

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RowResult:
    """One input's output, with the time it waited and the time its batch took."""

    value: np.ndarray
    queue_time: float
    inference_time: float


@dataclass(slots=True, order=True)
class _Waiting:
    length: int
    seq: int
    item: Encoded = field(compare=False)
    output: Output = field(compare=False)
    future: asyncio.Future[RowResult] = field(compare=False)
    enqueued: float = field(compare=False)


class Batcher:
    """Queues inputs and runs them through the backend in token-bounded batches."""

    def __init__(self, backend: Backend, max_batch_tokens: int, max_batch_requests: int,
                 metrics: EngineMetrics) -> None:
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.metrics = metrics
        self._waiting: list[_Waiting] = []  # in arrival order
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self.streams = max(1, backend.streams)
        self._executor = ThreadPoolExecutor(max_workers=self.streams, thread_name_prefix="inference")
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.failed_in_a_row = 0

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def close(self) -> None:
        """Stop the loop; waiting inputs fail as Unhealthy."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        for w in self._waiting:
            if not w.future.done():
                w.future.set_exception(errors.unhealthy("the worker is shutting down"))
        self._waiting.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch running."""
        return not self._running and not self._waiting

    @property
    def queue_size(self) -> int:
        """Inputs waiting for a batch."""
        return len(self._waiting)

    async def submit(self, items: Sequence[Encoded], output: Output) -> list[RowResult]:
        """Queue the inputs of one request and wait for all their results, in order."""
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures: list[asyncio.Future[RowResult]] = []
        for item in items:
            fut: asyncio.Future[RowResult] = loop.create_future()
            self._waiting.append(_Waiting(item.length, next(self._seq), item, output, fut, now))
            futures.append(fut)
        self.metrics.queue_size.set(len(self._waiting))
        self._wake.set()
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:
                f.cancel()  # a cancelled input is dropped when the next batch forms
            raise

    def _take(self, free_streams: int = 1) -> list[_Waiting]:
        """Remove and return the next batch: the oldest input plus its nearest neighbours in length. With
        ``free_streams`` streams free, it takes at most its share of the inputs like the oldest."""
        self._waiting = [w for w in self._waiting if not w.future.done()]
        if not self._waiting:
            return []
        oldest = self._waiting[0]
        same = sorted(w for w in self._waiting if w.output is oldest.output)
        limit = min(self.max_batch_requests, math.ceil(len(same) / max(1, free_streams)))
        pos = bisect.bisect_left(same, oldest)
        lo, hi = pos, pos + 1  # the batch is same[lo:hi]
        width = oldest.length
        while hi - lo < limit:
            left = same[lo - 1] if lo > 0 else None
            right = same[hi] if hi < len(same) else None
            # Take the neighbour whose length is closer to the oldest input's.
            if left is not None and (right is None or oldest.length - left.length <= right.length - oldest.length):
                if width * (hi - lo + 1) > self.max_batch_tokens:
                    break
                lo -= 1
            elif right is not None:
                if right.length * (hi - lo + 1) > self.max_batch_tokens:
                    break
                width = right.length
                hi += 1
            else:
                break
        chosen = same[lo:hi]
        taken = {id(w) for w in chosen}
        self._waiting = [w for w in self._waiting if id(w) not in taken]
        return chosen

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self._running) < self.streams and (batch := self._take(self.streams - len(self._running))):
                self.metrics.queue_size.set(len(self._waiting))
                task = asyncio.get_running_loop().create_task(self._run(batch))
                self._running.add(task)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()  # a stream is free: form the next batch

    async def _run(self, batch: list[_Waiting]) -> None:
        """One batch on one stream; its results (or its error) go to the inputs' futures."""
        output = batch[0].output
        started = time.perf_counter()
        try:
            padded, values = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._forward, [w.item for w in batch], output
            )
        except asyncio.CancelledError:
            _fail(batch, errors.unhealthy("the worker is shutting down"))
            raise
        except Exception as exc:
            log.exception("batch of %d failed", len(batch))
            self.metrics.batch_inference_failure.labels(output.value).inc()
            self.failed_in_a_row += 1
            _fail(batch, exc if isinstance(exc, errors.EngineError) else errors.backend(f"inference failed: {exc}"))
            return
        elapsed = time.perf_counter() - started
        for row, w in enumerate(batch):
            if not w.future.done():
                value = values[row, : w.length] if output is Output.TOKENS else values[row]
                w.future.set_result(RowResult(value, started - w.enqueued, elapsed))
        self.failed_in_a_row = 0
        m = self.metrics
        m.batch_next_size.observe(len(batch))
        m.batch_next_tokens.observe(padded)
        m.batch_inference_duration.labels(output.value).observe(elapsed)
        m.batch_inference_success.labels(output.value).inc()

    def _forward(self, items: list[Encoded], output: Output) -> tuple[int, np.ndarray]:
        padded = PaddedBatch.from_encoded(items)
        values = self.backend.forward(padded, output)
        if values.shape[0] != len(items):  # no input may wait for ever on a row that never comes
            raise errors.backend(f"inference returned {values.shape[0]} rows for a batch of {len(items)}")
        return padded.padded_tokens, values


def _fail(batch: list[_Waiting], err: BaseException) -> None:
    """Fail the inputs of ``batch`` still waiting."""
    for w in batch:
        if not w.future.done():
            w.future.set_exception(err)
