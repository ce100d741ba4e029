"""[data] Prefetch in every shape, the FHIR fallback against the real server, faults and token safety.

The clinical story throughout: a 45-year-old man in septic shock for 4 h with an ANC of
0.4 × 10⁹/L — eligible for the MSC trial (NCT01849237) when the service can see his data, and
"possibly eligible" (not "not eligible") when it cannot see the neutrophil count.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from cds_service.app import create_app
from cds_service.tools.scenario_builder import PatientBuilder
from tests.conftest import SERVICE_URL, CardCheckingClient, hook_body, make_settings
from tests.fault_server import FaultServer, refused_url

MSC = "NCT01849237"


def _patient(now: datetime, patient_id: str) -> PatientBuilder:
    builder = PatientBuilder(patient_id, now, age=45, gender="male")
    builder.septic_shock_story(onset_hours=4)
    builder.anc(0.4, hours=2)
    builder.bp_panel(82, 44, hours=1)
    return builder


def _app(tmp_path: Path, **fhir: Any) -> Flask:
    app = create_app(make_settings(tmp_path, fhir={"allow_http": True, **fhir}))
    app.test_client_class = CardCheckingClient
    return app


def _msc_card(response: Any) -> dict[str, Any] | None:
    assert response.status_code == 200, response.data
    cards = [c for c in response.get_json()["cards"] if c["source"]["topic"]["code"] == MSC]
    assert len(cards) <= 1
    return cards[0] if cards else None


def _summaries(response: Any) -> list[str]:
    return sorted(c["summary"] for c in response.get_json()["cards"])


@pytest.fixture
def loaded_patient(fhir_server: Any, now: datetime, request: pytest.FixtureRequest) -> PatientBuilder:
    builder = _patient(now, f"cdsh-data-{request.node.name[-40:].replace('_', '-')}"[:64])
    fhir_server.post_transaction(builder.transaction())
    yield builder
    fhir_server.delete_patient_everything(builder.patient_id)


def test_same_cards_with_full_prefetch_and_with_none(
    tmp_path: Path, fhir_server: Any, loaded_patient: PatientBuilder
) -> None:
    client = _app(tmp_path).test_client()
    with_prefetch = client.post(SERVICE_URL, json=hook_body(loaded_patient))
    without = client.post(
        SERVICE_URL, json=hook_body(loaded_patient, prefetch=False, fhir_server=fhir_server.base_url)
    )
    assert _msc_card(with_prefetch) is not None
    assert _summaries(with_prefetch) == _summaries(without)


def test_missing_prefetch_keys_are_fetched(
    tmp_path: Path, fhir_server: Any, loaded_patient: PatientBuilder
) -> None:
    body = hook_body(loaded_patient, fhir_server=fhir_server.base_url)
    del body["prefetch"]["observations"]  # the client's query failed: the sandbox leaves the key out
    del body["prefetch"]["patient"]
    card = _msc_card(_app(tmp_path).test_client().post(SERVICE_URL, json=body))
    assert card is not None and "ANC 0.4" in card["summary"]


def test_operation_outcome_in_prefetch_is_treated_as_missing(
    tmp_path: Path, fhir_server: Any, loaded_patient: PatientBuilder
) -> None:
    body = hook_body(loaded_patient, fhir_server=fhir_server.base_url)
    body["prefetch"]["observations"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "timeout"}],
    }
    card = _msc_card(_app(tmp_path).test_client().post(SERVICE_URL, json=body))
    assert card is not None and card["extension"]["screening"]["status"] == "eligible"


def test_null_prefetch_means_no_data_and_is_not_fetched(
    tmp_path: Path, fhir_server: Any, loaded_patient: PatientBuilder
) -> None:
    body = hook_body(loaded_patient, fhir_server=fhir_server.base_url)
    body["prefetch"]["observations"] = None  # the client looked: nothing. Lactate and ANC unseen.
    card = _msc_card(_app(tmp_path).test_client().post(SERVICE_URL, json=body))
    # Without any Observation the neutrophil count is unknown: "possibly", never "not eligible".
    assert card is not None and card["extension"]["screening"]["status"] == "possibly_eligible"


def test_bundle_without_entry_is_no_data(tmp_path: Path, now: datetime) -> None:
    builder = _patient(now, "cdsh-empty-bundle")
    body = hook_body(builder)
    body["prefetch"]["observations"] = {"resourceType": "Bundle", "type": "searchset", "total": 0}
    card = _msc_card(_app(tmp_path).test_client().post(SERVICE_URL, json=body))
    assert card is not None and card["extension"]["screening"]["status"] == "possibly_eligible"


def test_paginated_prefetch_bundle_is_followed_through_fhir_server(
    tmp_path: Path, fhir_server: Any, loaded_patient: PatientBuilder
) -> None:
    app = _app(tmp_path)
    template = app.extensions["cds"].screener.plan.templates()["observations"]
    query = template.replace("{{context.patientId}}", loaded_patient.patient_id).replace(
        "_count=1000", "_count=1"
    )
    first_page = requests.get(
        f"{fhir_server.base_url}/{query}", headers={"Accept": "application/fhir+json"}, timeout=5
    ).json()
    assert any(link["relation"] == "next" for link in first_page["link"])
    body = hook_body(loaded_patient, fhir_server=fhir_server.base_url)
    body["prefetch"]["observations"] = first_page
    card = _msc_card(app.test_client().post(SERVICE_URL, json=body))
    assert card is not None and "ANC 0.4" in card["summary"]


def test_no_prefetch_and_no_fhir_server_is_412(tmp_path: Path, now: datetime) -> None:
    response = (
        _app(tmp_path).test_client().post(SERVICE_URL, json=hook_body(_patient(now, "p"), prefetch=False))
    )
    assert response.status_code == 412
    assert response.get_json()["resourceType"] == "OperationOutcome"


DEADLINE = 1.0


@pytest.mark.parametrize(
    "fault", ["slow", "http500", "http401", "malformed", "next_loop", "refused", "operation_outcome"]
)
def test_misbehaving_fhir_server_gets_412_within_the_deadline(
    tmp_path: Path, now: datetime, fault_server: FaultServer, fault: str
) -> None:
    base_url = fault_server.base_url
    if fault == "slow":
        fault_server.slow(None, 5.0)
    elif fault == "http500":
        fault_server.status(None, 500)
    elif fault == "http401":
        fault_server.status(None, 401)
    elif fault == "malformed":
        fault_server.malformed(None)
    elif fault == "next_loop":
        fault_server.loop(None)
    elif fault == "operation_outcome":
        fault_server.operation_outcome(None)
    else:
        base_url = refused_url()
    client = _app(tmp_path, deadline_seconds=DEADLINE).test_client()
    started = time.monotonic()
    response = client.post(
        SERVICE_URL,
        json=hook_body(
            _patient(now, "cdsh-fault"), prefetch=False, fhir_server=base_url, token="secret-access-token"
        ),
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 412, response.data
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert elapsed <= DEADLINE + 0.5, f"{fault}: answered after {elapsed:.2f} s"
    assert "secret-access-token" not in response.get_data(as_text=True)


def test_token_is_never_sent_outside_the_allow_list(
    tmp_path: Path, now: datetime, fhir_server: Any, fault_server: FaultServer
) -> None:
    fault_server.bundle(None, [])
    client = _app(tmp_path, allowed_servers=[fhir_server.base_url]).test_client()
    body = hook_body(
        _patient(now, "cdsh-capture"),
        prefetch=False,
        fhir_server=fault_server.base_url,
        token="secret-access-token",
    )
    response = client.post(SERVICE_URL, json=body)
    assert response.status_code == 412
    assert fault_server.requests == []  # not even a request without the token
    # Positive control: the same capturing server, once allow-listed, does receive the bearer token.
    allowed = _app(tmp_path / "allowed", allowed_servers=[fault_server.base_url]).test_client()
    allowed.post(SERVICE_URL, json=body)
    seen = {r.header("Authorization") for r in fault_server.requests}
    assert seen == {"Bearer secret-access-token"}


def test_plain_http_fhir_server_refused_unless_allowed(
    tmp_path: Path, now: datetime, fault_server: FaultServer
) -> None:
    fault_server.bundle(None, [])
    client = _app(tmp_path, allow_http=False).test_client()
    response = client.post(
        SERVICE_URL,
        json=hook_body(_patient(now, "cdsh-http"), prefetch=False, fhir_server=fault_server.base_url),
    )
    assert response.status_code == 412
    assert fault_server.requests == []


def test_open_mode_412_says_only_the_category(
    tmp_path: Path, now: datetime, fault_server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Any caller may use an open service: its 412 must not tell "connection failed" from "HTTP 404"
    from "timed out", or it maps which local ports answer HTTP. The details go to the log."""
    fault_server.status("Observation", 404)
    fault_server.slow("Condition", 5.0)
    client = _app(tmp_path, deadline_seconds=DEADLINE).test_client()
    texts = set()
    with caplog.at_level(logging.WARNING):
        for base_url in (fault_server.base_url, refused_url()):
            for prefetch_missing in ("observations", "conditions"):
                body = hook_body(_patient(now, "cdsh-probe"), fhir_server=base_url)
                del body["prefetch"][prefetch_missing]
                response = client.post(SERVICE_URL, json=body)
                assert response.status_code == 412
                texts.add(response.get_json()["issue"][0]["diagnostics"])
    assert texts == {
        "patient data needed for screening could not be obtained: the FHIR server could not be read in time"
    }
    assert "HTTP 404" in caplog.text and "connection failed" in caplog.text and "deadline" in caplog.text
    # A request that needs no server keeps its own (harmless) explanation.
    response = client.post(SERVICE_URL, json=hook_body(_patient(now, "p"), prefetch=False))
    assert "no prefetch and no fhirServer" in response.get_json()["issue"][0]["diagnostics"]
