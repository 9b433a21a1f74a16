"""What a run measured: per-request latencies and completion times, errors, and the cache's report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RunStats:
    """One run (or several rounds of one target, merged).

    ``finished_s`` are completion times in seconds from the start of the round they belong to, offset by the
    durations of the rounds before it, so a merged run reads as one timeline.
    """

    latencies_s: list[float] = field(default_factory=list)
    finished_s: list[float] = field(default_factory=list)
    texts: list[int] = field(default_factory=list)  # texts of each successful request
    errors: Counter[str] = field(default_factory=Counter)  # "STATUS CODE", "GRPC_CODE" or "transport: WHAT"
    failed_texts: int = 0
    x_cache: Counter[str] = field(default_factory=Counter)  # X-Cache values of successful answers
    cache_hits: int = 0
    cache_misses: int = 0
    duration_s: float = 0.0
    rounds: int = 0
    client_cpu_s: float = 0.0  # CPU time of this process during the run

    def client_busy(self) -> float | None:
        """The share of one core the load generator used: near 1, it measured itself, not the target."""
        return self.client_cpu_s / self.duration_s if self.duration_s > 0 else None

    @property
    def successful(self) -> int:
        """Requests answered with success (HTTP 200, gRPC OK)."""
        return len(self.latencies_s)

    @property
    def failed(self) -> int:
        """Requests that failed (an error status, a transport error, a timeout)."""
        return sum(self.errors.values())

    @property
    def successful_texts(self) -> int:
        """Texts embedded by successful requests."""
        return sum(self.texts)

    def requests_per_s(self) -> float:
        """Successful requests per second of the run."""
        return self.successful / self.duration_s if self.duration_s > 0 else 0.0

    def embeddings_per_s(self) -> float:
        """Embeddings of successful requests per second of the run."""
        return self.successful_texts / self.duration_s if self.duration_s > 0 else 0.0

    def latency_ms(self, percentile: float) -> float:
        """A latency percentile in milliseconds (nan without successes); 100 is the maximum."""
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_s), percentile) * 1000)

    def hit_ratio(self) -> float | None:
        """Texts the target's cache answered over the texts it reported on (None: no X-Cache counts)."""
        counted = self.cache_hits + self.cache_misses
        return self.cache_hits / counted if counted else None

    def merge(self, other: RunStats) -> RunStats:
        """Both runs as one, ``other``'s timeline after this one's."""
        return RunStats(
            self.latencies_s + other.latencies_s,
            self.finished_s + [t + self.duration_s for t in other.finished_s],
            self.texts + other.texts, self.errors + other.errors, self.failed_texts + other.failed_texts,
            self.x_cache + other.x_cache, self.cache_hits + other.cache_hits,
            self.cache_misses + other.cache_misses, self.duration_s + other.duration_s, self.rounds + other.rounds,
            self.client_cpu_s + other.client_cpu_s)

    def timeline(self, bins: int = 50) -> tuple[np.ndarray, np.ndarray]:
        """Throughput over time: the start of each interval (s) and the embeddings/s completed in it."""
        if not self.finished_s or self.duration_s <= 0:
            return np.zeros(0), np.zeros(0)
        width = max(self.duration_s / bins, 0.05)
        edges = np.arange(0.0, self.duration_s + width, width)
        counts, _ = np.histogram(np.asarray(self.finished_s), bins=edges, weights=np.asarray(self.texts))
        return edges[:-1], counts / width

    def summary(self) -> dict[str, Any]:
        """The figures, JSON-ready."""
        def ms(p: float) -> float | None:
            value = self.latency_ms(p)
            return None if np.isnan(value) else round(value, 3)

        ratio = self.hit_ratio()
        return {
            "requests_per_sec": round(self.requests_per_s(), 2),
            "embeddings_per_sec": round(self.embeddings_per_s(), 2),
            "latency_ms": {**{f"p{p}": ms(p) for p in PERCENTILES}, "max": ms(100),
                           "mean": round(float(np.mean(self.latencies_s)) * 1000, 3) if self.latencies_s else None},
            "errors": dict(self.errors.most_common()),
            "x_cache": dict(self.x_cache),
            "cache_hit_ratio": None if ratio is None else round(ratio, 4),
            "cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
            "rounds": self.rounds,
            "client_busy": None if (busy := self.client_busy()) is None else round(busy, 3),
        }
