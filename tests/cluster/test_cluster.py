"""A multi-host cluster on network namespaces: 2 worker hosts (1 worker each), 2 gateway hosts sharing
1 Redis host, and 1 client host that load-balances over both gateways (tests/cluster/client.py, which
retries a failed request once on the other gateway). Real processes, real TCP between hosts, bounded load.

One cluster serves the whole module (see tests/cluster/netns.py for how it is made and always removed).
Needs root and ``ip netns`` (CI runs as root); skipped with the reason otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cache.redis_server import REDIS_SERVER
from tests.cluster.netns import Cluster, Load, Proc, gateway_cmd, netns_unavailable, redis_cmd, worker_cmd
from tests.gateway.support import metric_value

UNAVAILABLE = netns_unavailable() or (None if REDIS_SERVER else "redis-server is not on PATH")
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.skipif(UNAVAILABLE is not None,
                                                                       reason=UNAVAILABLE or "")]

HOSTS = {"w1": 11, "w2": 12, "g1": 21, "g2": 22, "redis": 31, "client": 41}
PREFIX = "efct-"
"""Namespaces of this test (benchmarks/cluster.py uses another prefix)."""
CONCURRENCY = 4
"""Requests under way at once: the load is bounded."""


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds (each check is a request from the client host)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.1)


@dataclass
class Hosts:
    """The running cluster."""

    net: Cluster
    workers: list[Proc]
    gateways: list[Proc]
    redis: Proc
    logs: Path

    def metric(self, proc: Proc, name: str, **labels: str) -> float:
        """One figure from a process's /metrics."""
        return metric_value(self.net.metrics(proc), name, **labels)

    def worker_healthy_on(self, gateway: Proc, worker: Proc) -> bool:
        """Whether ``gateway`` has ``worker`` in its pool now."""
        return self.metric(gateway, "embedfleet_upstream_healthy", upstream=worker.url) == 1.0

    def embed(self, gateway: Proc, text: str) -> str:
        """POST one text; its X-Cache."""
        answer = self.net.client("post", f"{gateway.url}/embed", f'{{"inputs": "{text}"}}')
        assert answer["status"] == 200, answer
        cache: str = answer["headers"]["x-cache"]
        return cache

    def load(self, prefix: str, duration: float = 300.0, **options: int) -> Load:
        """Start bounded load over both gateways (new texts unless ``repeat``)."""
        args = [f"--gateway={g.url}" for g in self.gateways]
        args += ["--concurrency", str(CONCURRENCY), "--batch", "4", "--prefix", prefix, "--duration", str(duration)]
        for name, value in options.items():
            args += [f"--{name}", str(value)]
        return Load(self.net, *args)

    def restart_gateway(self, index: int) -> None:
        """Bring a killed gateway back with the same command."""
        old = self.gateways[index]
        if old.running:
            return
        new = self.net.spawn(old.name, old.host, list(old.popen.args[4:]), url=old.url)  # type: ignore[index]
        self.gateways[index] = new
        self.net.wait_healthy([new])


@pytest.fixture(scope="module")
def hosts(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    """Make the namespaces, start Redis, the workers and the gateways; remove everything afterwards."""
    logs = tmp_path_factory.mktemp("cluster")
    net = Cluster(PREFIX, HOSTS, logs)
    try:
        net.create()
        redis = net.spawn("redis", "redis", redis_cmd(net, "redis", logs))
        workers = [net.spawn(name, name, worker_cmd(net, name, data_dir), url=f"http://{net.ip(name)}:8081")
                   for name in ("w1", "w2")]
        cache = f"redis://{net.ip('redis')}:6379/0"
        # A 1-byte memory tier: every hit is a hit in the shared store.
        gateways = [net.spawn(name, name, gateway_cmd(net, name, [w.url for w in workers], cache, 8080,
                                                      "--memory-cache-bytes", "1"),
                              url=f"http://{net.ip(name)}:8080") for name in ("g1", "g2")]
        net.wait_healthy([*workers, *gateways])
        running = Hosts(net, workers, gateways, redis, logs)
        for g in gateways:
            for w in workers:
                wait_for(lambda g=g, w=w: running.worker_healthy_on(g, w), f"{w.name} in {g.name}'s pool")
        yield running
    finally:
        net.destroy()


@pytest.fixture
def cluster(hosts: Hosts) -> Hosts:
    """The module's cluster, whole: every link up and both gateways running (a test may have killed one)."""
    for host in HOSTS:
        hosts.net.plug(host)
    hosts.restart_gateway(0)
    hosts.restart_gateway(1)
    return hosts


def test_a_text_embedded_through_gateway_1_is_a_hit_on_gateway_2(cluster: Hosts) -> None:
    hosts = cluster
    g1, g2 = hosts.gateways
    computed = hosts.metric(g2, "embedfleet_upstream_inputs_total")
    assert hosts.embed(g1, "embedded on gateway one") == "miss"
    wait_for(lambda: hosts.embed(g2, "embedded on gateway one") == "hit", "a hit on gateway 2")
    assert hosts.metric(g2, "embedfleet_cache_lookups_total", result="store_hit") >= 1
    assert hosts.metric(g2, "embedfleet_upstream_inputs_total") == computed  # gateway 2 computed nothing


def test_cutting_a_worker_link_mid_load_fails_no_request(cluster: Hosts) -> None:
    hosts = cluster
    w1, w2 = hosts.workers
    load = hosts.load("link cut")
    try:
        load.wait(20)
        hosts.net.cut("w1")  # its connections now hang: nothing refuses them
        for g in hosts.gateways:
            wait_for(lambda g=g: not hosts.worker_healthy_on(g, w1), f"{g.name} ejects w1")
        cut_at = load.done
        load.wait(cut_at + 20)  # w2 carries the load alone
        hosts.net.plug("w1")
        for g in hosts.gateways:
            wait_for(lambda g=g: hosts.worker_healthy_on(g, w1), f"w1 back in {g.name}'s pool")
        before = hosts.metric(w1, "te_embed_count_total")
        wait_for(lambda: hosts.metric(w1, "te_embed_count_total") > before, "w1 computing again")
    finally:
        summary = load.stop()
    assert summary["requests"] >= 40
    assert summary["failed"] == 0 and summary["retried"] == 0, summary  # the gateways absorbed the cut
    assert hosts.metric(w2, "te_embed_count_total") > 0


def test_redis_unreachable_means_misses_then_hits_resume(cluster: Hosts) -> None:
    hosts = cluster
    g1, g2 = hosts.gateways
    errors = [hosts.metric(g, "embedfleet_cache_store_errors_total") for g in hosts.gateways]
    load = hosts.load("redis outage")
    try:
        load.wait(10)
        hosts.net.cut("redis")
        for g, before in zip(hosts.gateways, errors, strict=True):
            wait_for(lambda g=g, before=before: hosts.metric(g, "embedfleet_cache_store_errors_total") > before,
                     f"{g.name} finds Redis unreachable")
        load.wait(load.done + 20)
        during = load.records[-10:]
        hosts.net.plug("redis")
    finally:
        summary = load.stop()
    assert summary["failed"] == 0 and summary["retried"] == 0, summary
    assert all(r["cache"] == "miss" for r in during)
    assert hosts.embed(g1, "after the outage") == "miss"
    wait_for(lambda: hosts.embed(g2, "after the outage") == "hit", "hits through Redis again")


def test_killing_gateway_1_mid_load_fails_only_its_requests_in_flight(cluster: Hosts) -> None:
    hosts = cluster
    g1 = hosts.gateways[0]
    load = hosts.load("gateway kill", repeat=50)
    try:
        load.wait(20)
        g1.kill()  # SIGKILL: its connections drop mid-request
        killed_at = load.done
        load.wait(killed_at + 40)
    finally:
        summary = load.stop()
    assert summary["failed"] == 0, summary  # every request retried on gateway 2 succeeded
    after = load.records[killed_at:]
    dropped = [r for r in load.records if (r["first_error"] or "").startswith("dropped")]
    assert len(dropped) <= CONCURRENCY, dropped  # only what was under way on gateway 1 when it died
    assert all(r["served"] == 1 for r in load.records if r["retried"])
    assert all(r["first"] == 0 for r in load.records if r["retried"])
    assert sum(r["served"] == 1 for r in after) == len(after)  # gateway 2 carried everything after
