"""Prometheus ``/metrics``: every listed series with the right counts, in one process and summed over
gunicorn workers (``cds-service serve --workers 2`` started for real in a subprocess).

Series: hook calls by service and status, hook latency, FHIR query latency and failures by resource
type, cards issued by trial and status, feedback by outcome.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from cds_service.app import create_app
from cds_service.base.metrics import MAX_SERVICE_LABELS
from cds_service.clinical.evaluation import CARD_STATUSES
from cds_service.patient_data.fhir_client import FhirClient
from cds_service.tools.fhir_server import FhirTestServer, die_with_parent, free_port
from cds_service.tools.scenario_builder import PatientBuilder
from tests.conftest import SERVICE_URL, CardCheckingClient, hook_body, make_settings
from tests.fault_server import FaultServer

SERVICE = "septic-shock-trial-screening"
MSC = "NCT01849237"
REPO_ROOT = Path(__file__).resolve().parent.parent

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition: (sample name, labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels (0 when absent: a series that was never touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include these."""
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= set(lbls))


def neutropenic_septic_shock(now: datetime) -> PatientBuilder:
    """The MSC trial's patient: sepsis, norepinephrine since 4 h, lactate 4.2, ANC 0.4 × 10⁹/L 2 h ago."""
    builder = PatientBuilder(f"metrics-{uuid.uuid4().hex[:10]}", now, age=45, gender="male")
    builder.septic_shock_story(onset_hours=4)
    builder.anc(0.4, hours=2)
    return builder


def card_counts(responses: list[dict[str, Any]]) -> Counter[str]:
    return Counter(card["source"]["topic"]["code"] for body in responses for card in body["cards"])


# -- one process, Flask test client ------------------------------------------------------------------


@pytest.fixture
def metrics_client(tmp_path: Path) -> Iterator[FlaskClient]:
    app = create_app(make_settings(tmp_path, fhir={"allow_http": True}))
    app.test_client_class = CardCheckingClient
    yield app.test_client()
    state = app.extensions["cds"]
    if state._client is not None:
        state._client.close()
    if state._store is not None:
        state._store.close()


@pytest.mark.fhir
def test_metrics_count_hooks_fhir_queries_cards_and_feedback(
    metrics_client: FlaskClient, fhir_server: FhirTestServer, fault_server: FaultServer, now: datetime
) -> None:
    client = metrics_client
    before = client.get("/metrics")
    assert before.status_code == 200
    assert before.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert (
        value(parse(before.get_data(as_text=True)), "cds_hook_calls_total", service=SERVICE, status="200")
        == 0
    )

    builder = neutropenic_septic_shock(now)
    fhir_server.put_all(builder.all_resources())
    responses: list[dict[str, Any]] = []

    # 1. Complete prefetch: no FHIR query.
    first = client.post(SERVICE_URL, json=hook_body(builder))
    assert first.status_code == 200
    responses.append(first.get_json())
    # 2. The observations prefetch is missing: the service queries the real FHIR server (one page).
    body = hook_body(builder, fhir_server=fhir_server.base_url)
    del body["prefetch"]["observations"]
    second = client.post(SERVICE_URL, json=body)
    assert second.status_code == 200
    responses.append(second.get_json())
    # 3. Same, but the FHIR server fails: one failed Observation query, 412.
    fault_server.status("Observation", 500)
    body = hook_body(builder, fhir_server=fault_server.base_url)
    del body["prefetch"]["observations"]
    assert client.post(SERVICE_URL, json=body).status_code == 412
    # 4. No prefetch and no fhirServer: 412 without any query. 5. An invalid body: 400.
    assert client.post(SERVICE_URL, json=hook_body(None, patient_id="nobody")).status_code == 412
    assert client.post(SERVICE_URL, json={}).status_code == 400

    msc_cards = [
        card for body in responses for card in body["cards"] if card["source"]["topic"]["code"] == MSC
    ]
    assert len(msc_cards) == 2
    accepted = {"card": msc_cards[0]["uuid"], "outcome": "accepted", "outcomeTimestamp": now.isoformat()}
    overridden = {"card": msc_cards[1]["uuid"], "outcome": "overridden", "outcomeTimestamp": now.isoformat()}
    for feedback in ([accepted], [accepted], [overridden]):  # the accepted one is sent twice (a retry)
        assert client.post(f"{SERVICE_URL}/feedback", json={"feedback": feedback}).status_code == 200

    after = parse(client.get("/metrics").get_data(as_text=True))
    # Hook calls by service and status, and the latency histogram.
    assert value(after, "cds_hook_calls_total", service=SERVICE, status="200") == 2
    assert value(after, "cds_hook_calls_total", service=SERVICE, status="412") == 2
    assert value(after, "cds_hook_calls_total", service=SERVICE, status="400") == 1
    assert value(after, "cds_hook_latency_seconds_count", service=SERVICE) == 5
    assert value(after, "cds_hook_latency_seconds_bucket", service=SERVICE, le="+Inf") == 5
    assert value(after, "cds_hook_latency_seconds_sum", service=SERVICE) > 0
    # FHIR queries: exactly the two Observation requests, one failed.
    assert value(after, "cds_fhir_query_seconds_count", resource_type="Observation") == 2
    assert value(after, "cds_fhir_query_failures_total", resource_type="Observation") == 1
    assert total(after, "cds_fhir_query_seconds_count") == 2
    assert total(after, "cds_fhir_query_failures_total") == 1
    # Cards by trial and status: what the responses held.
    for trial, count in card_counts(responses).items():
        assert total(after, "cds_cards_issued_total", trial=trial) == count, trial
    assert total(after, "cds_cards_issued_total") == sum(card_counts(responses).values())
    statuses = {dict(labels)["status"] for (name, labels) in after if name == "cds_cards_issued_total"}
    assert statuses and statuses <= set(CARD_STATUSES)
    # Feedback by outcome; the repeat is counted apart.
    assert value(after, "cds_feedback_total", outcome="accepted", repeat="no") == 1
    assert value(after, "cds_feedback_total", outcome="accepted", repeat="yes") == 1
    assert value(after, "cds_feedback_total", outcome="overridden", repeat="no") == 1


def test_callers_cannot_grow_the_number_of_series(metrics_client: FlaskClient) -> None:
    for index in range(MAX_SERVICE_LABELS + 10):
        assert metrics_client.post(f"/cds-services/made-up-{index}", json={}).status_code == 404
    samples = parse(metrics_client.get("/metrics").get_data(as_text=True))
    services = {dict(labels)["service"] for (name, labels) in samples if name == "cds_hook_calls_total"}
    # The route labels every id it does not serve as "unknown": one series, whatever callers send.
    assert services == {"unknown"}
    assert value(samples, "cds_hook_calls_total", service="unknown", status="404") == MAX_SERVICE_LABELS + 10


def test_fhir_client_reports_each_request_and_survives_a_broken_callback(fault_server: FaultServer) -> None:
    seen: list[tuple[str, float, bool]] = []
    fault_server.status("Condition", 503)
    fault_server.json("Patient/1", {"resourceType": "Patient", "id": "1"})
    with FhirClient({"allow_http": True}, on_query=lambda *args: seen.append(args)) as client:
        client.search_many(fault_server.base_url, None, {"a": "Observation?patient=1"}, time.monotonic() + 5)
        client.read(fault_server.base_url, None, "Patient/1", time.monotonic() + 5)
        with pytest.raises(Exception, match="HTTP 503"):
            client.search_many(
                fault_server.base_url, None, {"c": "Condition?patient=1"}, time.monotonic() + 5
            )
    assert [(kind, ok) for kind, _, ok in seen] == [
        ("Observation", True),
        ("Patient", True),
        ("Condition", False),
    ]
    assert all(0 <= seconds < 5 for _, seconds, _ in seen)

    def broken(*_: Any) -> None:
        raise RuntimeError("metrics backend down")

    with FhirClient({"allow_http": True}, on_query=broken) as client:
        result = client.search_many(
            fault_server.base_url, None, {"a": "Observation?patient=1"}, time.monotonic() + 5
        )
    assert result == {"a": []}


# -- gunicorn with two workers, for real ------------------------------------------------------------


def _cds_service_command() -> list[str]:
    script = Path(sys.executable).parent / "cds-service"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cds_service.cli"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``cds-service serve --port <free> --workers 2`` in a subprocess; yields (base URL, its TMPDIR)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("CDS_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(
        {
            "TMPDIR": str(temp),  # where `serve` creates its metrics directory: the test can look inside
            "CDS_STORE_URL": f"sqlite:///{tmp_path / 'store.sqlite3'}",
            "CDS_LOGGING_LEVEL": "WARNING",
        }
    )
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*_cds_service_command(), "serve", "--port", str(port), "--workers", "2"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"cds-service serve exited early:\n{log_path.read_text(errors='replace')[-3000:]}"
                )
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"cds-service serve did not answer:\n{log_path.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.1)
        yield base, temp
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
    # A clean stop removed the metrics directory `serve` created.
    assert not list(temp.glob("cds-metrics-*")), "the metrics directory was left behind"


def _worker_pids(temp: Path) -> set[str]:
    return {
        match.group(1)
        for path in temp.glob("cds-metrics-*/counter_*.db")
        if (match := re.match(r"counter_(\d+)\.db$", path.name))
    }


def test_gunicorn_workers_metrics_are_summed(served: tuple[str, Path], now: datetime) -> None:
    base, temp = served
    builder = neutropenic_septic_shock(now)
    session = requests.Session()

    def call(_: int) -> dict[str, Any]:
        response = requests.post(f"{base}{SERVICE_URL}", json=hook_body(builder), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    responses: list[dict[str, Any]] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        # Concurrent calls until both workers have answered some (each worker writes its own file).
        for _ in range(20):
            responses += pool.map(call, range(12))
            if len(_worker_pids(temp)) >= 2:
                break
    assert len(_worker_pids(temp)) == 2, "the calls never reached both workers"
    bad = requests.post(f"{base}{SERVICE_URL}", json={}, timeout=10)
    assert bad.status_code == 400
    msc_uuid = next(c["uuid"] for c in responses[0]["cards"] if c["source"]["topic"]["code"] == MSC)
    feedback = {"feedback": [{"card": msc_uuid, "outcome": "accepted", "outcomeTimestamp": now.isoformat()}]}
    assert requests.post(f"{base}{SERVICE_URL}/feedback", json=feedback, timeout=10).status_code == 200

    # Scrape several times: whichever worker answers, the totals are the same (summed over workers).
    scrapes = [session.get(f"{base}/metrics", timeout=10) for _ in range(4)]
    for scrape in scrapes:
        assert scrape.status_code == 200
        assert scrape.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        samples = parse(scrape.text)
        assert value(samples, "cds_hook_calls_total", service=SERVICE, status="200") == len(responses)
        assert value(samples, "cds_hook_calls_total", service=SERVICE, status="400") == 1
        assert value(samples, "cds_hook_latency_seconds_count", service=SERVICE) == len(responses) + 1
        for trial, count in card_counts(responses).items():
            assert total(samples, "cds_cards_issued_total", trial=trial) == count
        assert value(samples, "cds_feedback_total", outcome="accepted", repeat="no") == 1


def test_made_up_resource_types_cannot_grow_the_metrics(
    metrics_client: FlaskClient, fault_server: FaultServer, now: datetime
) -> None:
    """A prefetch Bundle with a next link whose entries carry a made-up resourceType, 100 times (300 in
    `make probe`): the page does not grow with them (each made-up type was one new series before)."""
    client = metrics_client
    fault_server.bundle(None, [])
    builder = neutropenic_septic_shock(now)
    before = client.get("/metrics").get_data()
    for index in range(100):
        body = hook_body(builder, fhir_server=fault_server.base_url)
        body["prefetch"]["observations"] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": {"resourceType": f"MadeUp{index}", "id": "x"}}],
            "link": [{"relation": "next", "url": fault_server.url(f"MadeUp{index}?page=2")}],
        }
        assert client.post(SERVICE_URL, json=body).status_code == 200
    after = client.get("/metrics").get_data()
    assert b"MadeUp" not in after
    assert len(after) - len(before) < 20 * 1024, len(after) - len(before)
    types = {
        dict(labels)["resource_type"]
        for (name, labels) in parse(after.decode())
        if name.startswith("cds_fhir_query_seconds")
    }
    assert types <= {"Patient", "Observation", "MedicationAdministration", "Condition", "other"}
    assert "Observation" in types  # the next pages are counted as what the service asked for
