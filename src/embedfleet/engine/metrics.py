"""Prometheus metrics of an inference replica, named as text-embeddings-inference names them.

Each engine owns its registry (no process-global state), so tests and several models in one
process never mix their counts. Counters carry the ``_total`` suffix that the Prometheus text
format gives every counter (``te_request_count`` is scraped as ``te_request_count_total``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# The *_created series double the exposition for no use to a scraper.
disable_created_metrics()  # type: ignore[no-untyped-call]

_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)


class EngineMetrics:
    """The te_* metric set."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.request_count = Counter("te_request_count", "Requests received", ["method"], registry=r)
        self.request_success = Counter("te_request_success", "Requests answered", ["method"], registry=r)
        self.request_failure = Counter("te_request_failure", "Requests failed", ["err"], registry=r)
        self.request_duration = Histogram("te_request_duration", "Request duration (s)", ["method"],
                                          buckets=_DURATION_BUCKETS, registry=r)
        self.tokenization_duration = Histogram("te_request_tokenization_duration", "Tokenization time (s)",
                                               buckets=_DURATION_BUCKETS, registry=r)
        self.queue_duration = Histogram("te_request_queue_duration", "Time in queue (s)",
                                        buckets=_DURATION_BUCKETS, registry=r)
        self.inference_duration = Histogram("te_request_inference_duration", "Inference time (s)",
                                            buckets=_DURATION_BUCKETS, registry=r)
        self.input_length = Histogram("te_request_input_length", "Input length (tokens)",
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self.embed_count = Counter("te_embed_count", "Inputs sent to the model", ["method"], registry=r)
        self.embed_success = Counter("te_embed_success", "Inputs computed", ["method"], registry=r)
        self.queue_size = Gauge("te_queue_size", "Inputs waiting for a batch", registry=r)
        self.batch_next_size = Histogram("te_batch_next_size", "Inputs in each formed batch",
                                         buckets=_SIZE_BUCKETS, registry=r)
        self.batch_next_tokens = Histogram("te_batch_next_tokens", "Padded tokens in each formed batch",
                                           buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_inference_duration = Histogram("te_batch_inference_duration", "Batch inference time (s)",
                                                  ["method"], buckets=_DURATION_BUCKETS, registry=r)
        self.batch_inference_success = Counter("te_batch_inference_success", "Batches computed", ["method"],
                                               registry=r)
        self.batch_inference_failure = Counter("te_batch_inference_failure", "Batches failed", ["method"],
                                               registry=r)
        self.in_flight = Gauge("te_request_in_flight", "Requests admitted and not yet answered", registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
