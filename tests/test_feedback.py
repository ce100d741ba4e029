"""Feedback that stops nagging: an override silences that trial's card for that patient (unless the
status rises to eligible), an accepted referral is recorded, retries are harmless, unknown cards are
accepted — and no feedback is lost under concurrent clients, on SQLite and on PostgreSQL."""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from cds_service.app import create_app
from cds_service.base.config import PROJECT_ROOT
from cds_service.store import open_store
from cds_service.tools.card_rules import response_problems
from cds_service.tools.scenario_builder import PatientBuilder
from tests.conftest import SERVICE_URL, CardCheckingClient, hook_body, make_settings

MSC = "NCT01849237"
CLONE = "NCT09999901"  # a second trial with the same criteria: its cards must not be silenced
FEEDBACK_URL = f"{SERVICE_URL}/feedback"


def patient(now: datetime, *, anc: float | None = 0.4, onset_hours: float = 4) -> PatientBuilder:
    builder = PatientBuilder(f"fb-{uuid.uuid4().hex[:10]}", now, age=45, gender="male")
    builder.septic_shock_story(onset_hours=onset_hours)
    if anc is not None:
        builder.anc(anc, hours=2)
    return builder


def two_trial_data(tmp_path: Path) -> Path:
    """A data folder with the MSC trial and a copy of it under another NCT id."""
    data = tmp_path / "data"
    shutil.copytree(PROJECT_ROOT / "mappings", data / "mappings")
    shutil.copytree(PROJECT_ROOT / "cards", data / "cards")
    (data / "trials").mkdir()
    (msc,) = (PROJECT_ROOT / "trials").glob(f"{MSC}*.yaml")
    text = msc.read_text(encoding="utf-8")
    (data / "trials" / msc.name).write_text(text, encoding="utf-8")
    clone = text.replace(f"id: {MSC}", f"id: {CLONE}").replace(
        "short_name: MSC-Neutropenia", "short_name: MSC-Clone"
    )
    (data / "trials" / f"{CLONE}-clone.yaml").write_text(clone, encoding="utf-8")
    return data


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    """The service screening MSC and its clone (overrides the conftest app)."""
    application = create_app(make_settings(tmp_path, data={"dir": str(two_trial_data(tmp_path))}))
    application.test_client_class = CardCheckingClient
    yield application
    application.extensions["cds"].store.close()


def cards_by_trial(client: FlaskClient, builder: PatientBuilder) -> dict[str, dict[str, Any]]:
    response = client.post(SERVICE_URL, json=hook_body(builder))
    assert response.status_code == 200
    return {card["source"]["topic"]["code"]: card for card in response.get_json()["cards"]}


def send(client: FlaskClient, *items: dict[str, Any]) -> None:
    response = client.post(FEEDBACK_URL, json={"feedback": list(items)})
    assert response.status_code == 200, response.data


def override(
    card: dict[str, Any], code: str = "declined", when: datetime | None = None, **extra: Any
) -> dict[str, Any]:
    reason = next(r for r in card["overrideReasons"] if r["code"] == code)
    return {
        "card": card["uuid"],
        "outcome": "overridden",
        "overrideReason": {"reason": reason, **extra},
        "outcomeTimestamp": (when or datetime.now().astimezone()).isoformat(),
    }


def accept(card: dict[str, Any], *suggestions: str, when: datetime | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "card": card["uuid"],
        "outcome": "accepted",
        "outcomeTimestamp": (when or datetime.now().astimezone()).isoformat(),
    }
    if suggestions:
        item["acceptedSuggestions"] = [{"id": s} for s in suggestions]
    return item


# -- silencing ------------------------------------------------------------------------------------------


def test_override_silences_that_trial_for_that_patient_only(
    client: FlaskClient, app: Flask, now: datetime
) -> None:
    first, second = patient(now), patient(now)
    cards = cards_by_trial(client, first)
    assert set(cards) == {MSC, CLONE}
    send(client, override(cards[MSC], userComment="family prefers no research"))

    again = cards_by_trial(client, first)
    assert MSC not in again  # the same patient, the same trial: silent
    assert CLONE in again  # another trial: unaffected
    assert set(cards_by_trial(client, second)) == {MSC, CLONE}  # another patient: unaffected

    rows = app.extensions["cds"].store.screening_log(trial_id=MSC)
    overridden = [r for r in rows if r.card_uuid == cards[MSC]["uuid"]]
    assert overridden[0].outcome == "overridden"
    assert overridden[0].reason == "Declined by patient or family (family prefers no research)"


def test_a_status_rising_to_eligible_brings_the_card_back(client: FlaskClient, now: datetime) -> None:
    builder = patient(now, anc=None)
    possible = cards_by_trial(client, builder)[MSC]
    assert possible["extension"]["screening"]["status"] == "possibly_eligible"
    send(client, override(possible, "not-appropriate"))
    assert MSC not in cards_by_trial(client, builder)  # same data: silent

    builder.anc(0.4, hours=1)  # the missing neutrophil count arrives: now eligible
    eligible = cards_by_trial(client, builder)[MSC]
    assert eligible["extension"]["screening"]["status"] == "eligible" and "ANC 0.4" in eligible["summary"]
    assert MSC in cards_by_trial(client, builder)  # and it stays until the clinician acts on it

    send(client, override(eligible, "already-screened"))
    assert MSC not in cards_by_trial(client, builder)


def test_an_eligible_card_overridden_stays_silent(client: FlaskClient, now: datetime) -> None:
    builder = patient(now)
    send(client, override(cards_by_trial(client, builder)[MSC], "other-trial"))
    for _ in range(3):
        assert MSC not in cards_by_trial(client, builder)


def test_the_silence_lasts_the_configured_period(tmp_path: Path, now: datetime) -> None:
    app = create_app(make_settings(tmp_path, screening={"override_silence_hours": 2}))
    app.test_client_class = CardCheckingClient
    client = app.test_client()
    try:
        old, recent = patient(now), patient(now)
        send(client, override(cards_by_trial(client, old)[MSC], when=now - timedelta(hours=3)))
        send(client, override(cards_by_trial(client, recent)[MSC], when=now - timedelta(hours=1)))
        assert MSC in cards_by_trial(client, old)  # overridden 3 h ago: the 2 h are over
        assert MSC not in cards_by_trial(client, recent)
    finally:
        app.extensions["cds"].store.close()


def test_a_zero_silence_period_never_silences(tmp_path: Path, now: datetime) -> None:
    app = create_app(make_settings(tmp_path, screening={"override_silence_hours": 0}))
    app.test_client_class = CardCheckingClient
    client = app.test_client()
    try:
        builder = patient(now)
        send(client, override(cards_by_trial(client, builder)[MSC]))
        assert MSC in cards_by_trial(client, builder)
    finally:
        app.extensions["cds"].store.close()


# -- acceptance -----------------------------------------------------------------------------------------


def test_an_accepted_referral_is_recorded_and_stops_the_card(
    client: FlaskClient, app: Flask, now: datetime
) -> None:
    builder = patient(now)
    card = cards_by_trial(client, builder)[MSC]
    (suggestion,) = card["suggestions"]
    send(client, accept(card, suggestion["uuid"]))

    store = app.extensions["cds"].store
    (stored,) = store.feedback_for_card(card["uuid"])
    assert stored.outcome == "accepted" and stored.accepted_suggestions == [suggestion["uuid"]]
    assert stored.reason_code == "referral"
    (row,) = [r for r in store.screening_log() if r.card_uuid == card["uuid"]]
    assert (row.outcome, row.reason) == ("accepted", "Referred to the research team")

    cards = cards_by_trial(client, builder)
    assert MSC not in cards  # referred: no more nagging …
    assert CLONE in cards  # … about this trial only


def test_an_acceptance_without_the_referral_does_not_silence(
    client: FlaskClient, app: Flask, now: datetime
) -> None:
    builder = patient(now)
    card = cards_by_trial(client, builder)[MSC]
    send(client, accept(card))  # e.g. a client that reports a link click as "accepted"
    send(client, accept(card, str(uuid.uuid4()), when=now + timedelta(seconds=1)))  # not our suggestion
    assert MSC in cards_by_trial(client, builder)
    assert all(f.reason_code is None for f in app.extensions["cds"].store.feedback_for_card(card["uuid"]))


# -- retries and unknown cards ---------------------------------------------------------------------------


def test_repeated_feedback_is_stored_once(client: FlaskClient, app: Flask, now: datetime) -> None:
    card = cards_by_trial(client, patient(now))[MSC]
    item = override(card, "declined", when=now)
    send(client, item, item)  # twice in one message
    send(client, item)  # and retried
    send(client, {**item, "card": item["card"].upper()})  # a client that upper-cases uuids
    assert len(app.extensions["cds"].store.feedback_for_card(card["uuid"])) == 1


def test_feedback_for_an_unknown_card_is_accepted_and_logged(
    client: FlaskClient, app: Flask, now: datetime, caplog: pytest.LogCaptureFixture
) -> None:
    unknown = str(uuid.uuid4())
    with caplog.at_level(logging.INFO, logger="cds_service.service"):
        send(client, {"card": unknown, "outcome": "overridden", "outcomeTimestamp": now.isoformat()})
        send(client, {"card": unknown, "outcome": "overridden", "outcomeTimestamp": now.isoformat()})
    assert [r.getMessage() for r in caplog.records].count("feedback for an unknown card accepted") == 2
    assert len(app.extensions["cds"].store.feedback_for_card(unknown)) == 1
    assert all(r.card_uuid != unknown for r in app.extensions["cds"].store.screening_log())


# -- concurrency, through HTTP ----------------------------------------------------------------------------

CLIENTS = 8
MESSAGES = 1000


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'concurrent.sqlite3'}"
    return str(request.getfixturevalue("pg_fresh_url"))


@pytest.fixture
def served(tmp_path: Path, store_url: str) -> Iterator[str]:
    """The app on a real threaded HTTP server (werkzeug) on a free port; yields its base URL."""
    app = create_app(make_settings(tmp_path, store={"url": store_url}))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        app.extensions["cds"].store.close()


def test_concurrent_clients_lose_no_feedback(served: str, store_url: str, now: datetime) -> None:
    with requests.Session() as session:
        cards: list[str] = []
        for _ in range(10):
            response = session.post(f"{served}{SERVICE_URL}", json=hook_body(patient(now)), timeout=30)
            assert response.status_code == 200
            assert response_problems(response.json()) == []
            cards.extend(card["uuid"] for card in response.json()["cards"])
    base = now - timedelta(hours=1)
    messages = [
        {
            "feedback": [
                {
                    "card": cards[i % len(cards)],
                    "outcome": "overridden" if i % 2 else "accepted",
                    "outcomeTimestamp": (base + timedelta(milliseconds=i)).isoformat(),
                    **({"overrideReason": {"userComment": f"comment {i}"}} if i % 2 else {}),
                }
            ]
        }
        for i in range(MESSAGES)
    ]

    def post_all(batch: list[dict[str, Any]]) -> list[int]:
        with requests.Session() as session:
            return [session.post(f"{served}{FEEDBACK_URL}", json=m, timeout=60).status_code for m in batch]

    with ThreadPoolExecutor(CLIENTS) as pool:
        statuses = [
            s for part in pool.map(post_all, [messages[k::CLIENTS] for k in range(CLIENTS)]) for s in part
        ]
        # clients retry: the same messages again, concurrently, change nothing
        statuses += [
            s for part in pool.map(post_all, [messages[k:200:CLIENTS] for k in range(CLIENTS)]) for s in part
        ]
    assert statuses == [200] * len(statuses) and len(statuses) == MESSAGES + 200

    with open_store(store_url) as store:
        stored = [f for card in cards for f in store.feedback_for_card(card)]
        assert len(stored) == MESSAGES
        assert {f.user_comment for f in stored if f.outcome == "overridden"} == {
            f"comment {i}" for i in range(1, MESSAGES, 2)
        }
        log = store.screening_log()
        assert {row.card_uuid for row in log} == set(cards)
        assert all(row.outcome is not None for row in log)


def test_cards_still_reach_the_clinician_when_the_store_is_down(
    tmp_path: Path, now: datetime, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings(tmp_path, store={"url": "postgresql://postgres@127.0.0.1:1/nowhere"}))
    app.test_client_class = CardCheckingClient
    client = app.test_client()
    with caplog.at_level(logging.ERROR, logger="cds_service.service"):
        card = cards_by_trial(client, patient(now))[MSC]
    assert "store unavailable" in caplog.text
    # feedback cannot be stored: 500, so that the client retries later
    response = client.post(FEEDBACK_URL, json={"feedback": [override(card)]})
    assert response.status_code == 500
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_silencing_and_referrals_work_on_either_store(tmp_path: Path, store_url: str, now: datetime) -> None:
    app = create_app(make_settings(tmp_path, store={"url": store_url}))
    app.test_client_class = CardCheckingClient
    client = app.test_client()
    try:
        overridden, referred, other = patient(now), patient(now), patient(now)
        send(client, override(cards_by_trial(client, overridden)[MSC]))
        card = cards_by_trial(client, referred)[MSC]
        send(client, accept(card, card["suggestions"][0]["uuid"]))
        assert MSC not in cards_by_trial(client, overridden)
        assert MSC not in cards_by_trial(client, referred)
        assert MSC in cards_by_trial(client, other)
        outcomes = {
            row.patient_id: row.outcome for row in app.extensions["cds"].store.screening_log(trial_id=MSC)
        }
        assert outcomes[overridden.patient_id] == "overridden" and outcomes[referred.patient_id] == "accepted"
    finally:
        app.extensions["cds"].store.close()


# -- one message, one transaction ---------------------------------------------------------------------


def test_a_feedback_message_is_stored_all_or_nothing(client: FlaskClient, app: Flask, now: datetime) -> None:
    """The database refuses the second item of a message: the first is not kept either, the client
    gets an error and retries the whole message, which then lands whole."""
    card = cards_by_trial(client, patient(now))[MSC]
    store = app.extensions["cds"].store
    store._write(
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON card_feedback WHEN NEW.user_comment = 'boom' "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END",
        (),
    )
    first = override(card, "declined", when=now)
    second = override(card, "not-appropriate", when=now + timedelta(seconds=1), userComment="boom")
    response = client.post(FEEDBACK_URL, json={"feedback": [first, second]})
    assert response.status_code == 500 and response.get_json()["resourceType"] == "OperationOutcome"
    assert store.feedback_for_card(card["uuid"]) == []
    store._write("DROP TRIGGER refuse_boom", ())
    send(client, first, second)
    assert [f.reason_code for f in store.feedback_for_card(card["uuid"])] == ["declined", "not-appropriate"]


def test_feedback_text_with_nul_characters_is_refused(client: FlaskClient, now: datetime) -> None:
    """PostgreSQL cannot store NUL in text: refuse it up front (400) instead of failing on write."""
    card = cards_by_trial(client, patient(now))[MSC]
    response = client.post(
        FEEDBACK_URL, json={"feedback": [override(card, "declined", when=now, userComment="a\x00b")]}
    )
    assert response.status_code == 400
    assert "userComment" in response.get_json()["issue"][0]["diagnostics"]


def test_the_empty_feedback_answer_claims_no_media_type(client: FlaskClient, now: datetime) -> None:
    card = cards_by_trial(client, patient(now))[MSC]
    response = client.post(FEEDBACK_URL, json={"feedback": [override(card, when=now)]})
    assert response.status_code == 200 and response.data == b""
    assert "Content-Type" not in response.headers
