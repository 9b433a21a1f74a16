"""A worker of ``embedfleet serve`` that hangs under load (SIGSTOP: alive, port open, answers nothing).

Its first failed health check takes it out of the pool at once and fails its calls under way over to the
other replica, so no request fails or waits out the gateway's call deadline. After SIGCONT it passes a check,
joins again and takes load. The supervisor is set never to restart it here (that path is
``test_restarts.py``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.fleet.procs import one_worker_config
from tests.gateway.support import metric_value, wait_for
from tests.helpers import ServeProcess

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT_S = 20.0
"""What a client waits at most: well below the gateway's 60 s call deadline, well above a health check (0.5 s
apart, 5 s timeout), so only a call cut over to the other replica succeeds in time."""


def test_a_hung_worker_loses_no_request_and_rejoins_after_sigcont(tmp_path: Path, data_dir: Path) -> None:
    config = one_worker_config(tmp_path, data_dir, health_interval=0.5, health_failures=1000)
    config.write_text(config.read_text().replace('threads = 1\n', 'threads = 1\nreplicas = 2\n'
                                                                  'max_client_batch_size = 8\n'))
    with ServeProcess(["--config", str(config)], data_dir, tmp_path / "log") as fleet:
        victim = fleet.instance("embed-0")
        assert victim["state"] == "running" and victim["pid"]
        victim_url = victim["url"]

        def gateway_metric(name: str) -> float:
            return fleet.metric(name, upstream=victim_url)

        async def victim_busy(client: httpx.AsyncClient) -> bool:
            gateway_side = metric_value((await client.get("/metrics")).text, "embedfleet_upstream_in_flight",
                                        upstream=victim_url)
            worker_side = metric_value((await client.get(f"{victim_url}/metrics")).text, "te_request_in_flight")
            return gateway_side > 0 and worker_side > 0

        async def one(client: httpx.AsyncClient, tag: str, i: int) -> int | str:
            texts = [f"{tag} {i} {j} " + "some words " * 20 for j in range(16)]  # 2 calls of 8 each
            try:
                return (await client.post("/embed", json={"inputs": texts})).status_code
            except httpx.HTTPError as exc:  # a client timeout is an outcome too
                return type(exc).__name__

        async def load_then_stop() -> list[int | str]:
            async with httpx.AsyncClient(base_url=fleet.url, timeout=CLIENT_TIMEOUT_S) as client:
                burst = [asyncio.create_task(one(client, "hang", i)) for i in range(40)]
                deadline = time.monotonic() + 60
                while not await victim_busy(client):
                    assert time.monotonic() < deadline and not all(t.done() for t in burst), "victim never busy"
                    await asyncio.sleep(0.05)
                os.kill(victim["pid"], signal.SIGSTOP)
                return await asyncio.gather(*burst)

        async def load(tag: str) -> list[int | str]:
            async with httpx.AsyncClient(base_url=fleet.url, timeout=120) as client:
                return await asyncio.gather(*(one(client, tag, i) for i in range(16)))

        stopped = True
        try:
            codes = asyncio.run(load_then_stop())
            assert Counter(codes) == {200: 40}, fleet.log()[-3000:]
            assert fleet.metric("embedfleet_upstream_retries_total") >= 1  # its calls went to the other one
            assert gateway_metric("embedfleet_upstream_healthy") == 0
            assert fleet.instance("embed-0")["health_failures"] >= 1
            assert Counter(asyncio.run(load("while hung"))) == {200: 16}
            os.kill(victim["pid"], signal.SIGCONT)
            stopped = False
            wait_for(lambda: gateway_metric("embedfleet_upstream_healthy") == 1, "the worker back in its pool",
                     timeout=60)
            after = fleet.instance("embed-0")
            assert after["pid"] == victim["pid"] and after["state"] == "running" and after["restarts"] == 0
            # Let it finish what it read while stopped (calls the gateway gave up on), then count from there.
            wait_for(lambda: metric_value(httpx.get(f"{victim_url}/metrics").text, "te_request_in_flight") == 0,
                     "the worker idle", timeout=60)
            before = metric_value(httpx.get(f"{victim_url}/metrics").text, "te_request_count_total", method="embed")
            assert Counter(asyncio.run(load("back again"))) == {200: 16}
            served = metric_value(httpx.get(f"{victim_url}/metrics").text, "te_request_count_total", method="embed")
            assert served > before  # it takes load again
        finally:
            if stopped:
                os.kill(victim["pid"], signal.SIGCONT)
