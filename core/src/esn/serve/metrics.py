"""The service's Prometheus metrics (``GET /metrics``, text exposition format), one registry per app."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no *_created series: creation timestamps of every counter are noise here

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (served at ``/metrics``)."""
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("esn_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("esn_request_seconds", "time from request to response, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("esn_queue_depth", "conversions waiting for a batch", registry=r)
        self.rows_in_flight = Gauge("esn_rows_in_flight", "rows of the batch being generated now", registry=r)
        # One bucket per size: the count of batches of each size is the difference of adjacent buckets.
        self.batch_size = Histogram("esn_batch_size", "rows per batched generate",
                                    buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.batch_seconds = Histogram("esn_batch_seconds", "time of one batched generate",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("esn_queue_seconds", "time a conversion waited for its batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.conversions = Counter("esn_conversions", "conversions by outcome (ok, a 4xx/5xx error code, "
                                   "timeout, disconnected)", ["outcome"], registry=r)

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
