"""The gateway's Prometheus figures (``embedfleet_*``): cache tiers, pools and upstreams, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from embedfleet.cache.tiered import TieredCache
from embedfleet.gateway.router import ModelRouter


class GatewayCollector(Collector):
    """Cache and upstream figures of every pool."""

    def __init__(self, router: ModelRouter, cache: TieredCache) -> None:
        self.router = router
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        """The current figures."""
        c = self.cache.counters
        tiers = CounterMetricFamily("embedfleet_cache_lookups", "Unique inputs looked up, by answering tier",
                                    labels=["result"])
        tiers.add_metric(["memory_hit"], c.memory_hits)
        tiers.add_metric(["store_hit"], c.store_hits)
        tiers.add_metric(["miss"], c.misses)
        yield tiers
        yield CounterMetricFamily("embedfleet_cache_store_errors", "Cache store reads or writes that failed",
                                  value=c.store_errors)
        flights = CounterMetricFamily("embedfleet_cache_shared_flights", "Misses another gateway held a lease on: "
                                      "answered by its value (joined) or computed here after all (taken_over)",
                                      labels=["result"])
        flights.add_metric(["joined"], c.flights_joined)
        flights.add_metric(["taken_over"], c.flights_taken_over)
        yield flights
        yield CounterMetricFamily("embedfleet_cache_writes_dropped",
                                  "Cache writes dropped (queue full, store down or at its size bound)",
                                  value=c.writes_dropped)
        hits = CounterMetricFamily("embedfleet_model_cache_hits", "Unique inputs answered from the cache",
                                   labels=["model"])
        misses = CounterMetricFamily("embedfleet_model_cache_misses", "Unique inputs computed", labels=["model"])
        sent = CounterMetricFamily("embedfleet_upstream_inputs", "Inputs sent to upstreams", labels=["model"])
        retries = CounterMetricFamily("embedfleet_upstream_retries", "Calls retried on another replica",
                                      labels=["model"])
        ejections = CounterMetricFamily("embedfleet_upstream_ejections", "Replicas ejected after errors",
                                        labels=["model"])
        mismatches = CounterMetricFamily("embedfleet_upstream_mismatches",
                                         "Replicas kept out of their pool for serving another model", labels=["model"])
        in_flight = GaugeMetricFamily("embedfleet_upstream_in_flight", "Estimated tokens in flight per upstream",
                                      labels=["model", "upstream"])
        healthy = GaugeMetricFamily("embedfleet_upstream_healthy", "1 when the upstream is healthy",
                                    labels=["model", "upstream"])
        ratio = GaugeMetricFamily("embedfleet_chars_per_token", "Characters per token the pool's answers show "
                                  "(the gateway's token estimate for splitting; 4 until workers answer)",
                                  labels=["model"])
        for name, service in self.router.services.items():
            ratio.add_metric([name], service.estimate.chars_per_token)
            hits.add_metric([name], service.hits)
            misses.add_metric([name], service.misses)
            sent.add_metric([name], service.upstream_inputs)
            retries.add_metric([name], service.pool.retried)
            ejections.add_metric([name], service.pool.ejections)
            mismatches.add_metric([name], service.pool.mismatches)
            for u in service.pool.upstreams:
                in_flight.add_metric([name, u.label], u.in_flight)
                healthy.add_metric([name, u.label], 1.0 if u.healthy else 0.0)
        yield from (hits, misses, sent, retries, ejections, mismatches, in_flight, healthy, ratio)
        yield from self.cache.store_latency.collect()
