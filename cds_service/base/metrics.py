"""Prometheus metrics (prometheus-client), exposed at ``/metrics``.

Series (all on the service's own registry, so tests can build several apps side by side):

==================================  =======================  =========================================
series                              labels                   meaning
==================================  =======================  =========================================
``cds_hook_calls_total``            service, status          hook calls by HTTP status (200, 400, 412…)
``cds_hook_latency_seconds``        service                  hook service time (histogram)
``cds_fhir_query_seconds``          resource_type            each FHIR request the service makes itself
``cds_fhir_query_failures_total``   resource_type            FHIR requests that failed (HTTP, timeout…)
``cds_cards_issued_total``          trial, status            cards returned, by trial and eligibility
``cds_feedback_total``              outcome, repeat          feedback items; ``repeat="yes"`` = resent
==================================  =======================  =========================================

Every label value comes from a fixed set, never from what a caller or a FHIR server sends:
``service`` from the service ids (else ``unknown``), ``resource_type`` from the resource types the
service asks for (``FhirClient(resource_types=...)``, else ``other``), ``trial`` from the configured
trials. As a second line, each label keeps at most :data:`MAX_SERVICE_LABELS` values per process.

Multiprocess mode (gunicorn with several workers): every worker writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` adds them up, whichever worker answers the scrape.
prometheus-client chooses between in-memory and file-backed values from that environment variable
*when it is imported*; :func:`enable_multiprocess` sets the variable and refreshes that choice, so it
works even when prometheus-client was imported before (``cds-service serve`` calls it before the
app is built and the workers are forked).
"""

from __future__ import annotations

import glob
import os
import tempfile
import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

#: The classic text format 0.0.4: every Prometheus version reads it (our names need no 1.0.0 escaping).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The ``service`` label comes from the URL, which any caller chooses (a 404, or a 401 before the id is
#: checked): after this many distinct values in one process, further ones are counted as ``other``, so
#: that nobody can grow the number of series without bound.
MAX_SERVICE_LABELS = 16
OTHER_SERVICE = "other"


def multiprocess_enabled() -> bool:
    """True when values are file-backed (shared by every process using the same directory)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def enable_multiprocess(directory: str | None = None, *, wipe: bool = False) -> str:
    """Switch prometheus-client to multiprocess mode; returns the metrics directory.

    ``directory`` defaults to ``$PROMETHEUS_MULTIPROC_DIR``, else a new temporary directory. Call it
    in the parent process before any metric value exists and before forking workers. ``wipe=True``
    removes ``*.db`` files left by an earlier run in that directory (prometheus-client's rule: the
    directory must be emptied between runs, or old counts are added to the new ones).
    """
    path = directory or os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="cds-metrics-")
    os.makedirs(path, exist_ok=True)
    if wipe:
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
    os.environ[MULTIPROC_ENV] = path
    if not multiprocess_enabled():
        # prometheus-client read the environment when it was imported; read it again. Metric objects
        # look `values.ValueClass` up each time they create a value, so existing metrics follow.
        values.ValueClass = values.get_value_class()
    return path


def mark_process_dead(pid: int) -> None:
    """gunicorn ``child_exit`` hook: drop a dead worker's live-gauge files (no-op for counters)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


class Metrics:
    """The service's counters and histograms, on their own registry (tests create several apps)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()
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

    def _service_label(self, service: str) -> str:
        return self._bounded("service", service)

    def _bounded(self, label: str, value: str) -> str:
        """``value``, or ``other`` once this label has :data:`MAX_SERVICE_LABELS` values in this process."""
        seen = self._seen.setdefault(label, set())
        if value in seen:
            return value
        with self._lock:
            if len(seen) >= MAX_SERVICE_LABELS or len(value) > 64:
                return OTHER_SERVICE
            seen.add(value)
        return value

    def hook_call(self, service: str, status: int, seconds: float) -> None:
        service = self._service_label(service)
        self.hook_calls.labels(service, str(status)).inc()
        self.hook_latency.labels(service).observe(seconds)

    def fhir_query(self, resource_type: str, seconds: float, ok: bool) -> None:
        """``FhirClient(on_query=...)`` callback: one call per HTTP request to a FHIR server."""
        resource_type = self._bounded("resource_type", resource_type)
        self.fhir_queries.labels(resource_type).observe(seconds)
        if not ok:
            self.fhir_failures.labels(resource_type).inc()

    def card_issued(self, trial: str, status: str) -> None:
        self.cards.labels(trial, status).inc()

    def feedback(self, outcome: str, new: bool) -> None:
        self.feedback_total.labels(outcome, "no" if new else "yes").inc()

    def exposition(self) -> tuple[bytes, str]:
        if os.environ.get(MULTIPROC_ENV) and multiprocess_enabled():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE
        return generate_latest(self.registry), CONTENT_TYPE
