"""Prometheus metrics of one app instance.

One API process (the default): each app has its own registry, so tests can build many apps in
one process. Several API processes (`POLAR_WORKERS` > 1, app/multiworker.py): the supervisor
gives its processes one `PROMETHEUS_MULTIPROC_DIR`, prometheus_client keeps every value in a
file there, and `/metrics` on any process answers the sum over all of them (prometheus_client's
multi-process mode), so a scrape that lands on one process still counts every request.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The directory the API processes share their metrics through, when there is one."""
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "polar_http_requests_total",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "polar_http_request_seconds",
            "HTTP request latency by route template",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.searches = Counter(
            "polar_searches_total",
            "Searches (GET and POST /search) by whether a concept adapter was applied",
            ["personalized"],
            registry=self.registry,
        )
        # Gauges of per-process state: with several processes, summed over the live ones
        # (rebuilds and evictions also count processes that ended: they happened).
        self.index_rebuilds = Gauge(
            "polar_index_rebuilds",
            "Per-user indexes the API processes built from the database",
            registry=self.registry,
            multiprocess_mode="sum",
        )
        self.index_cache_bytes = Gauge(
            "polar_index_cache_bytes",
            "Approximate memory held by the API processes' cached per-user indexes",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.index_evictions = Gauge(
            "polar_index_evictions",
            "Per-user indexes dropped from memory to stay within POLAR_SEARCH__INDEX_CACHE_MB",
            registry=self.registry,
            multiprocess_mode="sum",
        )
        self.model_info = Gauge(
            "polar_model_info",
            "The model serving the API (value 1); demo=1 when it is the fallback demo model",
            ["model", "demo"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )

    def exposition(self) -> bytes:
        """The text a scrape gets: this app's values, or every API process's summed."""
        shared = multiprocess_dir()
        if shared is None:
            return bytes(generate_latest(self.registry))
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=shared)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(registry))
