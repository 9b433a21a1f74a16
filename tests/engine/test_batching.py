"""Batch formation: token and request budgets, length grouping, no starvation, rows never mixed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from embedfleet.engine.backends import create_backend
from embedfleet.engine.backends.base import Output
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
