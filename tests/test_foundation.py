"""The thin slice end to end: discovery, the hook, errors, feedback — the MSC trial NCT01849237."""

from __future__ import annotations

import uuid
from datetime import datetime

from flask.testing import FlaskClient

from cds_service.tools.scenario_builder import PatientBuilder
from tests.conftest import SERVICE_URL, hook_body


def neutropenic_septic_shock(now: datetime, anc: float = 0.4) -> PatientBuilder:
    """45-year-old man, sepsis, norepinephrine started 4 h ago with lactate 4.2, ANC 0.4 × 10⁹/L."""
    builder = PatientBuilder("msc-eligible", now, age=45, gender="male")
    builder.septic_shock_story(onset_hours=4)
    builder.anc(anc, hours=2)
    return builder


def test_discovery_lists_the_patient_view_service_with_prefetch(client: FlaskClient) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    (service,) = response.get_json()["services"]
    assert service["hook"] == "patient-view"
    assert service["id"] == "septic-shock-trial-screening"
    prefetch = service["prefetch"]
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    # Observations are restricted to the LOINC codes the criteria use: ANC and lactate are there,
    # heart rate (used by no shipped criterion) is not.
    assert "751-8" in prefetch["observations"] and "2524-7" in prefetch["observations"]
    assert "8867-4" not in prefetch["observations"]
    for template in prefetch.values():
        tokens = {part.split("}}")[0] for part in template.split("{{")[1:]}
        assert tokens <= {"context.patientId"}, template


def test_cors_preflight_and_headers_on_every_route(client: FlaskClient) -> None:
    for path in ("/cds-services", SERVICE_URL, f"{SERVICE_URL}/feedback"):
        response = client.options(
            path,
            headers={
                "Origin": "https://sandbox.cds-hooks.org",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert response.status_code == 200, path
        allowed = response.headers["Access-Control-Allow-Headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed
        assert response.headers["Access-Control-Allow-Origin"] in ("*", "https://sandbox.cds-hooks.org")
    posted = client.post(SERVICE_URL, json={}, headers={"Origin": "https://sandbox.cds-hooks.org"})
    assert posted.headers["Access-Control-Allow-Origin"]


def test_eligible_neutropenic_patient_gets_the_nct01849237_card(client: FlaskClient, now: datetime) -> None:
    response = client.post(SERVICE_URL, json=hook_body(neutropenic_septic_shock(now)))
    assert response.status_code == 200
    cards = [c for c in response.get_json()["cards"] if c["source"]["topic"]["code"] == "NCT01849237"]
    assert len(cards) == 1
    card = cards[0]
    assert "NCT01849237" in card["summary"]
    assert "ANC 0.4" in card["summary"]
    assert card["source"]["url"] == "https://clinicaltrials.gov/study/NCT01849237"
    assert card["indicator"] in ("info", "warning")
    assert card["extension"]["screening"]["status"] == "eligible"
    assert "To confirm (2)" in card["detail"] and "signed consent" in card["detail"].lower()


def test_normal_neutrophil_count_gives_no_msc_card(client: FlaskClient, now: datetime) -> None:
    response = client.post(SERVICE_URL, json=hook_body(neutropenic_septic_shock(now, anc=5.2)))
    assert response.status_code == 200
    assert all(c["source"]["topic"]["code"] != "NCT01849237" for c in response.get_json()["cards"])


def test_missing_neutrophil_count_is_possibly_eligible_and_says_what_to_measure(
    client: FlaskClient, now: datetime
) -> None:
    builder = PatientBuilder("msc-no-anc", now, age=50, gender="male")
    builder.septic_shock_story(onset_hours=3)
    response = client.post(SERVICE_URL, json=hook_body(builder))
    (card,) = [c for c in response.get_json()["cards"] if c["source"]["topic"]["code"] == "NCT01849237"]
    assert card["extension"]["screening"]["status"] == "possibly_eligible"
    assert "possibly eligible" in card["summary"] and "needs neutrophil count" in card["summary"]
    assert "neutrophil count (last 24 h): none charted" in card["detail"]


def test_bad_inputs_get_operation_outcomes(client: FlaskClient, now: datetime) -> None:
    good = hook_body(neutropenic_septic_shock(now))
    cases = [
        (b"{not json", 400),
        (b"[]", 400),
        ({**good, "hook": "order-select"}, 400),
        ({**good, "hookInstance": "not-a-uuid"}, 400),
        ({**good, "context": {"userId": "Practitioner/1"}}, 400),
        ({**good, "fhirServer": "not a url"}, 400),
        ({**good, "fhirAuthorization": {"access_token": "x"}}, 400),
        ({**good, "prefetch": "nope"}, 400),
        ({k: v for k, v in good.items() if k != "prefetch"}, 412),
    ]
    for body, status in cases:
        if isinstance(body, bytes):
            response = client.post(SERVICE_URL, data=body, content_type="application/json")
        else:
            response = client.post(SERVICE_URL, json=body)
        assert response.status_code == status, (
            body if isinstance(body, bytes) else list(body),
            response.data,
        )
        outcome = response.get_json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["diagnostics"]
        assert "Traceback" not in outcome["issue"][0]["diagnostics"]
    missing_field = client.post(
        SERVICE_URL, json={**good, "context": {"userId": "Practitioner/1"}}
    ).get_json()
    assert "context.patientId" in missing_field["issue"][0]["expression"]
    assert client.post("/cds-services/nope", json=good).status_code == 404


def test_body_over_the_limit_is_413(tmp_path, now: datetime) -> None:
    from cds_service.app import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings(tmp_path, server={"max_body_bytes": 2048}))
    body = hook_body(neutropenic_septic_shock(now))
    response = app.test_client().post(SERVICE_URL, json=body)
    assert response.status_code == 413
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_feedback_is_stored_idempotently(client: FlaskClient, app, now: datetime) -> None:
    response = client.post(SERVICE_URL, json=hook_body(neutropenic_septic_shock(now)))
    card_uuid = response.get_json()["cards"][0]["uuid"]
    feedback = {
        "feedback": [
            {
                "card": card_uuid,
                "outcome": "overridden",
                "outcomeTimestamp": now.isoformat(),
                "overrideReason": {
                    "reason": {"code": "declined", "display": "Declined"},
                    "userComment": "family declined",
                },
            }
        ]
    }
    for _ in range(2):  # clients retry: the same feedback twice is stored once
        assert client.post(f"{SERVICE_URL}/feedback", json=feedback).status_code == 200
    store = app.extensions["cds"].store
    stored = store.feedback_for_card(card_uuid)
    assert len(stored) == 1 and stored[0].outcome == "overridden"
    unknown = {
        "feedback": [{"card": str(uuid.uuid4()), "outcome": "accepted", "outcomeTimestamp": now.isoformat()}]
    }
    assert client.post(f"{SERVICE_URL}/feedback", json=unknown).status_code == 200
    for garbage in (
        {"feedback": "x"},
        {"feedback": [{"card": "x"}]},
        [],
        {"feedback": [{"card": card_uuid, "outcome": "maybe", "outcomeTimestamp": now.isoformat()}]},
    ):
        response = client.post(f"{SERVICE_URL}/feedback", json=garbage)
        assert response.status_code == 400
        assert response.get_json()["resourceType"] == "OperationOutcome"


def test_health(client: FlaskClient) -> None:
    body = client.get("/health").get_json()
    assert body["status"] == "ok" and "NCT01849237" in body["trials"]


def test_readme_configuration_block_lists_every_setting_with_its_default() -> None:
    """The README's configuration reference cannot drift from config.DEFAULTS."""
    import re

    import yaml

    from cds_service.base.config import DEFAULTS, PROJECT_ROOT

    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if b.startswith("server:\n  host")]
    assert yaml.safe_load(block) == DEFAULTS
