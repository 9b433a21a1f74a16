"""A worker kept observably busy: one long batch in its inference thread, seen from outside through /metrics.

The worker runs the default model on the CPU with a batch budget large enough that one request of
:data:`LONG_INPUTS` full-length inputs is a single batch taking seconds. Whether that batch is in the
inference thread is read from the worker's own TEI metrics, never guessed from elapsed time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

LONG_INPUTS = 64
"""Inputs in one long request; each is cut to the model's 256 tokens, so the batch has 64 x 256 padded tokens."""

LONG_BATCH_ARGS = ("--model", "default", "--device", "cpu", "--max-batch-tokens", str(LONG_INPUTS * 256),
                   "--max-batch-requests", str(LONG_INPUTS), "--max-client-batch-size", str(LONG_INPUTS),
                   "--streams", "1")
"""Worker settings under which one long request is one batch (about 2 s on 2 busy cores): one stream, as
free streams would share the request's inputs out."""

POLL_S = 0.05
DEADLINE_S = 120.0


def long_body(tag: str) -> dict[str, Any]:
    """A request of :data:`LONG_INPUTS` inputs, each longer than the model's maximum (truncated to it)."""
    return {"inputs": [" ".join(f"{tag}{i}x{j}" for j in range(300)) for i in range(LONG_INPUTS)], "truncate": True}


@dataclass(frozen=True)
class Progress:
    """What /metrics says about the work under way."""

    tokenized: float  # requests whose tokenization finished
    batches: float  # batches that finished (any task)
    queued: float  # inputs waiting for a batch
    in_flight: float  # requests admitted and not yet answered


async def progress(client: httpx.AsyncClient) -> Progress:
    """Read the worker's /metrics once."""
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return Progress(tokenized=totals.get("te_request_tokenization_duration_count", 0.0),
                    batches=totals.get("te_batch_inference_success_total", 0.0),
                    queued=totals.get("te_queue_size", 0.0),
                    in_flight=totals.get("te_request_in_flight", 0.0))


def batch_running(before: Progress, now: Progress) -> bool:
    """True when a request sent after ``before`` was tokenized, all its inputs left the queue and no batch has
    finished since: the batcher takes a batch off the queue and hands it to the inference thread in one
    event-loop step, so its batch is in that thread."""
    return now.tokenized > before.tokenized and now.queued == 0 and now.batches == before.batches


async def wait_for(client: httpx.AsyncClient, condition: Any, task: asyncio.Future[Any] | None = None,
                   deadline_s: float = DEADLINE_S) -> Progress | None:
    """Poll /metrics until ``condition(progress)`` holds; None if ``task`` finished first (the moment was missed)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        now = await progress(client)
        if condition(now):
            return now
        if task is not None and task.done():
            return None
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"/metrics never showed the state waited for within {deadline_s} s")
