"""Batch formation: token and request budgets, length grouping, no starvation, rows never mixed."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from embedfleet.engine import errors
from embedfleet.engine.backends import create_backend
from embedfleet.engine.backends.base import Backend, Output, PaddedBatch
from embedfleet.engine.batching import Batcher
from embedfleet.engine.metrics import EngineMetrics
from embedfleet.engine.model import inspect
from embedfleet.engine.tokenization import Encoded


def _item(length: int) -> Encoded:
    return Encoded(ids=np.arange(1, length + 1, dtype=np.int64), type_ids=np.zeros(length, dtype=np.int64),
                   characters=length)


@pytest.fixture(scope="module")
def backend(data_dir: Path) -> object:
    return create_backend(inspect("default"), "onnx", "cpu", data_dir)


def _queue(batcher: Batcher, lengths: list[int]) -> None:
    """Fill the queue without running it (the loop is not started)."""
    loop = asyncio.new_event_loop()
    from embedfleet.engine.batching import _Waiting

    for seq, n in enumerate(lengths):
        batcher._waiting.append(_Waiting(n, seq, _item(n), Output.POOLED, loop.create_future(), 0.0))


def test_batches_respect_token_and_request_budgets(backend: object) -> None:
    batcher = Batcher(backend, max_batch_tokens=100, max_batch_requests=4, metrics=EngineMetrics())  # type: ignore[arg-type]
    _queue(batcher, [10, 50, 12, 11, 48, 9, 13, 10, 49])
    seen = []
    while batch := batcher._take():
        width = max(w.length for w in batch)
        assert width * len(batch) <= 100
        assert len(batch) <= 4
        seen.extend(w.seq for w in batch)
    assert sorted(seen) == list(range(9))


def test_oldest_goes_first_with_neighbours_in_length(backend: object) -> None:
    batcher = Batcher(backend, max_batch_tokens=10_000, max_batch_requests=3, metrics=EngineMetrics())  # type: ignore[arg-type]
    _queue(batcher, [100, 5, 98, 6, 101, 7])
    first = batcher._take()
    assert first[0].seq == 0 or 0 in [w.seq for w in first]
    assert sorted(w.length for w in first) == [98, 100, 101]  # long ones together, not with the short ones
    second = batcher._take()
    assert sorted(w.length for w in second) == [5, 6, 7]


def test_concurrent_submissions_get_their_own_rows(backend: object) -> None:
    async def main() -> None:
        batcher = Batcher(backend, max_batch_tokens=2048, max_batch_requests=16, metrics=EngineMetrics())  # type: ignore[arg-type]
        batcher.start()
        lengths = [3 + (i * 7) % 40 for i in range(40)]
        solo = [(await batcher.submit([_item(n)], Output.POOLED))[0].value for n in lengths]
        together = await asyncio.gather(*(batcher.submit([_item(n)], Output.POOLED) for n in lengths))
        await batcher.close()
        for a, b in zip(solo, together, strict=True):
            assert np.abs(a - b[0].value).max() < 1e-4

    asyncio.run(main())


def test_free_streams_share_the_waiting_inputs(backend: object) -> None:
    batcher = Batcher(backend, max_batch_tokens=10_000, max_batch_requests=32, metrics=EngineMetrics())  # type: ignore[arg-type]
    _queue(batcher, [10] * 20)
    assert len(batcher._take(free_streams=2)) == 10  # half for each of two free streams
    assert len(batcher._take(free_streams=1)) == 10  # the rest, to the last free one
    _queue(batcher, [10] * 100)
    assert len(batcher._take(free_streams=2)) == 32  # never above max_batch_requests


class _Overlap(Backend):
    """The real OpenVINO backend, counting how many of its forward passes run at once."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.name, self.device, self.dtype = inner, inner.name, inner.device, inner.dtype
        self.info, self.streams = inner.info, inner.streams
        self.lock = threading.Lock()
        self.now = self.most = 0
        self.sizes: list[int] = []

    def forward(self, batch: PaddedBatch, output: Output) -> np.ndarray:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.sizes.append(int(batch.input_ids.shape[0]))
        try:
            return self.inner.forward(batch, output)
        finally:
            with self.lock:
                self.now -= 1


def test_batches_run_on_every_stream_at_once(data_dir: Path) -> None:
    from embedfleet.engine.backends.openvino_backend import OpenVinoBackend

    info = inspect("default")
    ov = OpenVinoBackend(info, data_dir, threads=2)  # default: one single-thread stream per thread
    assert ov.streams == 2 and OpenVinoBackend(info, data_dir, threads=2, streams=1).streams == 1
    counted = _Overlap(ov)

    async def main() -> None:
        batcher = Batcher(counted, max_batch_tokens=2048, max_batch_requests=32, metrics=EngineMetrics())
        batcher.start()
        lengths = [3 + (i * 7) % 40 for i in range(32)]
        solo = [(await batcher.submit([_item(n)], Output.POOLED))[0].value for n in lengths]
        counted.sizes.clear()
        alone = await batcher.submit([_item(n) for n in lengths], Output.POOLED)  # one request, idle worker
        assert sorted(counted.sizes) == [16, 16]  # shared out between the two free streams
        for _ in range(3):
            together = await asyncio.gather(*(batcher.submit([_item(n)], Output.POOLED) for n in lengths))
        await batcher.close()
        for a, b, c in zip(solo, alone, together, strict=True):
            assert np.abs(a - b.value).max() < 1e-4 and np.abs(a - c[0].value).max() < 1e-4

    asyncio.run(main())
    assert counted.most == 2  # two batches ran at the same time, never more


class _DropsARow(_Overlap):
    """The real backend, answering one row short: a broken runtime the batcher must not wait on for ever."""

    def forward(self, batch: PaddedBatch, output: Output) -> np.ndarray:
        return super().forward(batch, output)[1:]


def test_a_batch_answered_short_fails_its_inputs_instead_of_hanging(backend: Backend) -> None:
    async def main() -> None:
        batcher = Batcher(_DropsARow(backend), max_batch_tokens=2048, max_batch_requests=16, metrics=EngineMetrics())
        batcher.start()
        with pytest.raises(errors.EngineError, match="returned 2 rows for a batch of 3"):
            await asyncio.wait_for(batcher.submit([_item(4), _item(5), _item(6)], Output.POOLED), 60)
        assert batcher.failed_in_a_row == 1
        with pytest.raises(errors.EngineError):  # the batcher still runs: the next batch fails the same way
            await asyncio.wait_for(batcher.submit([_item(4)], Output.POOLED), 60)
        assert batcher.failed_in_a_row == 2
        await batcher.close()

    asyncio.run(main())
