"""Prometheus metrics of one server: its own registry, so several servers in a process never mix."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROUTES = ("/predict", "/embed", "/health", "/metrics", "/", "/openapi.json")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Requests, errors by kind, latency and batch-size histograms, and readiness."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bigtransfer_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.errors = Counter("bigtransfer_errors", "Requests refused or failed, by kind of error", ["kind"],
                              registry=r)
        self.latency = Histogram("bigtransfer_request_seconds", "Seconds from a request's arrival to its answer",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("bigtransfer_batch_size", "Images in each batch the model ran",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("bigtransfer_images", "Images the model ran, by endpoint", ["kind"], registry=r)
        self.in_progress = Gauge("bigtransfer_requests_in_progress", "Requests admitted and not yet answered",
                                 registry=r)
        self.ready = Gauge("bigtransfer_ready", "1 once the model is loaded and warmed up", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def route_label(path: str) -> str:
    """A bounded set of labels: unknown paths must not grow the metrics without limit."""
    if path in ROUTES:
        return path
    return "/static" if path.startswith("/static/") else "other"


class MetricsMiddleware:
    """Counts every answered request by route and status, and observes its latency (pure ASGI)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            route = route_label(scope["path"])
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
