"""Prometheus metrics of one app instance (its own registry, so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
            "Searches by whether a concept adapter was applied",
            ["personalized"],
            registry=self.registry,
        )
        self.index_rebuilds = Gauge(
            "polar_index_rebuilds",
            "Per-user indexes this process built from the database",
            registry=self.registry,
        )
        self.index_cache_bytes = Gauge(
            "polar_index_cache_bytes",
            "Approximate memory held by this process's cached per-user indexes",
            registry=self.registry,
        )
        self.index_evictions = Gauge(
            "polar_index_evictions",
            "Per-user indexes dropped from memory to stay within POLAR_SEARCH__INDEX_CACHE_MB",
            registry=self.registry,
        )
        self.model_info = Gauge(
            "polar_model_info",
            "The model serving this process (value 1); demo=1 when it is the fallback demo model",
            ["model", "demo"],
            registry=self.registry,
        )
