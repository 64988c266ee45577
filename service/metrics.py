"""Prometheus metrics, one registry per app (several apps may live in one test process).

Under gunicorn (service/gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR) every worker writes its
values to shared files and `/metrics` reports them summed over the workers; gauges say how:
the queue depth is the sum over live workers, readiness the minimum.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("captioner_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("captioner_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("captioner_batch_size", "Images per encoder+decoder batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("captioner_inference_seconds", "Time of one batched encoder+decoder call",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("captioner_queue_depth", "Images waiting for a batch", registry=r,
                                 multiprocess_mode="livesum")
        self.images = Counter("captioner_images", "Images captioned", registry=r)
        self.rejected = Counter("captioner_rejected", "Requests refused: queue_full, deadline or rate_limit",
                                ["reason"], registry=r)
        self.reloads = Counter("captioner_model_reloads", "Model reloads by model and result "
                               "(changed, unchanged, failed)", ["model", "result"], registry=r)
        self.ready = Gauge("captioner_ready", "1 when the model is loaded and warm (in every worker)", registry=r,
                           multiprocess_mode="livemin")

    def observe(self, name: str, value: float) -> None:
        """The micro-batcher's callback."""
        if name == "batch_size":
            self.batch_size.observe(value)
            self.images.inc(value)
        elif name == "inference_s":
            self.inference.observe(value)
        elif name == "queue_depth":
            self.queue_depth.set(value)

    def exposition(self) -> tuple[bytes, str]:
        """-> (the text format, its content type): this process's values, or all workers'."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
