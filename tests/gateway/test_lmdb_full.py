"""Chaos: a real gateway whose LMDB store reaches its size bound under load. Every request still
answers 200 with the right vectors; the refused writes show in /metrics, not as store errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.gateway.support import metric_value, wait_for
from tests.helpers import GatewayProcess, WorkerProcess

pytestmark = pytest.mark.slow

TEXTS = [f"chaos text number {i}: {'word ' * (i % 7)}" for i in range(320)]


def test_lmdb_at_its_bound_under_load_answers_every_request(worker: WorkerProcess, tmp_path: Path) -> None:
    # 128 KiB holds about 80 vectors of 384 floats; a 1-byte memory tier sends every lookup to the store.
    url = f"lmdb://{tmp_path / 'lmdb'}?map_size=32KiB&max_size=128KiB"
    g = GatewayProcess(["--upstream", worker.url, "--cache", url, "--memory-cache-bytes", "1"],
                       tmp_path, tmp_path).start()
    try:
        batches = [TEXTS[i:i + 4] for i in range(0, len(TEXTS), 4)]

        def send(batch: list[str]) -> tuple[int, list[list[float]] | str]:
            r = httpx.post(f"{g.url}/embed", json={"inputs": batch}, timeout=120)
            return r.status_code, r.json() if r.status_code == 200 else r.text

        with ThreadPoolExecutor(8) as pool:
            first = list(pool.map(send, batches))
            again = list(pool.map(send, batches))  # hits where the entry landed, misses where it was dropped
        failed = [(s, body) for s, body in first + again if s != 200]
        assert not failed, failed[:3]
        for (_, a), (_, b) in zip(first, again, strict=True):
            assert np.allclose(np.array(a), np.array(b), atol=1e-6)

        wait_for(lambda: metric_value(g.get("/metrics").text, "embedfleet_cache_writes_dropped_total") > 0,
                 "refused writes counted in /metrics")
        metrics = g.get("/metrics").text
        assert metric_value(metrics, "embedfleet_cache_store_errors_total") == 0
        stats = g.get("/cache/stats").json()
        assert 0 < stats["store"]["entries"] < len(TEXTS)
        assert stats["lookups"]["store_hits"] > 0  # the store still serves what it holds
        assert g.post("/embed", {"inputs": "one more"}).status_code == 200
    finally:
        g.stop()
