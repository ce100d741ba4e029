"""Prometheus metrics (prometheus-client), exposed at ``/metrics``.

Under gunicorn with several workers set ``PROMETHEUS_MULTIPROC_DIR`` (``cds-service serve`` does)
so every worker's counts are aggregated.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The service's counters and histograms, on their own registry (tests create several apps)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.hook_calls = Counter(
            "cds_hook_calls_total",
            "Hook calls by service and HTTP status",
            ["service", "status"],
            registry=self.registry,
        )
        self.hook_latency = Histogram(
            "cds_hook_latency_seconds",
            "Hook service time",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.fhir_queries = Histogram(
            "cds_fhir_query_seconds",
            "FHIR query latency by resource type",
            ["resource_type"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.fhir_failures = Counter(
            "cds_fhir_query_failures_total",
            "Failed FHIR queries by resource type",
            ["resource_type"],
            registry=self.registry,
        )
        self.cards = Counter(
            "cds_cards_issued_total",
            "Cards issued by trial and eligibility status",
            ["trial", "status"],
            registry=self.registry,
        )
        self.feedback_total = Counter(
            "cds_feedback_total",
            "Feedback received by outcome (repeats counted apart)",
            ["outcome", "repeat"],
            registry=self.registry,
        )

    def hook_call(self, service: str, status: int, seconds: float) -> None:
        self.hook_calls.labels(service, str(status)).inc()
        self.hook_latency.labels(service).observe(seconds)

    def fhir_query(self, resource_type: str, seconds: float, ok: bool) -> None:
        self.fhir_queries.labels(resource_type).observe(seconds)
        if not ok:
            self.fhir_failures.labels(resource_type).inc()

    def card_issued(self, trial: str, status: str) -> None:
        self.cards.labels(trial, status).inc()

    def feedback(self, outcome: str, new: bool) -> None:
        self.feedback_total.labels(outcome, "no" if new else "yes").inc()

    def exposition(self) -> tuple[bytes, str]:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
