"""A worker of ``embedfleet serve`` that hangs under load (SIGSTOP: alive, port open, answers nothing).

Its first failed health check takes it out of the pool at once and fails its calls under way over to the
other replica, so no request fails or waits out the gateway's call deadline. After SIGCONT it passes a check,
joins again and takes load. The supervisor is set never to restart it here (that path is
``test_restarts.py``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.fleet.procs import one_worker_config
from tests.gateway.support import HangDrill, metric_value, wait_for
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

        drill = HangDrill(fleet.url, victim_url, victim["pid"], CLIENT_TIMEOUT_S)
        try:
            codes = drill.load_then_stop()
            assert Counter(codes) == {200: 40}, fleet.log()[-3000:]
            assert fleet.metric("embedfleet_upstream_retries_total") >= 1  # its calls went to the other one
            assert gateway_metric("embedfleet_upstream_healthy") == 0
            assert fleet.instance("embed-0")["health_failures"] >= 1
            assert Counter(drill.load("while hung")) == {200: 16}
            drill.resume()
            wait_for(lambda: gateway_metric("embedfleet_upstream_healthy") == 1, "the worker back in its pool",
                     timeout=60)
            after = fleet.instance("embed-0")
            assert after["pid"] == victim["pid"] and after["state"] == "running" and after["restarts"] == 0
            # Let it finish what it read while stopped (calls the gateway gave up on), then count from there.
            wait_for(lambda: metric_value(httpx.get(f"{victim_url}/metrics").text, "te_request_in_flight") == 0,
                     "the worker idle", timeout=60)
            before = metric_value(httpx.get(f"{victim_url}/metrics").text, "te_request_count_total", method="embed")
            assert Counter(drill.load("back again")) == {200: 16}
            served = metric_value(httpx.get(f"{victim_url}/metrics").text, "te_request_count_total", method="embed")
            assert served > before  # it takes load again
        finally:
            drill.resume()
