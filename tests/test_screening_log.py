"""The screening log for the research team: every card issued and every feedback outcome, exported by
``cds-service screening-log`` as CSV that Python's csv module reads back, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from cds_service.app import create_app
from cds_service.base.config import PROJECT_ROOT
from cds_service.cli import main
from cds_service.store import CSV_COLUMNS, IssuedCard, open_store
from cds_service.tools.scenario_builder import PatientBuilder
from tests.conftest import SERVICE_URL, CardCheckingClient, hook_body, make_settings

MSC = "NCT01849237"
DOC = PROJECT_ROOT / "docs" / "cards.md"


def export(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, *args: str):
    """Run ``cds-service screening-log`` on ``url``; returns (header, rows as dicts, stderr)."""
    monkeypatch.setenv("CDS_STORE_URL", url)
    monkeypatch.delenv("CDS_CONFIG", raising=False)
    assert main(["screening-log", *args]) == 0
    captured = capsys.readouterr()
    reader = csv.DictReader(io.StringIO(captured.out, newline=""))
    rows = list(reader)
    return reader.fieldnames, rows, captured.err


def issue_msc_card(client: FlaskClient, builder: PatientBuilder) -> dict[str, Any]:
    cards = client.post(SERVICE_URL, json=hook_body(builder)).get_json()["cards"]
    (card,) = [c for c in cards if c["source"]["topic"]["code"] == MSC]
    return card


def patient(now: datetime, anc: float | None = 0.4) -> PatientBuilder:
    builder = PatientBuilder(f"log-{uuid.uuid4().hex[:8]}", now, age=45, gender="male")
    builder.septic_shock_story(onset_hours=4)
    if anc is not None:
        builder.anc(anc, hours=2)
    return builder


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'log.sqlite3'}"
    return str(request.getfixturevalue("pg_fresh_url"))


def test_cards_and_feedback_round_trip_through_the_csv_export(
    tmp_path: Path,
    store_url: str,
    now: datetime,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = create_app(make_settings(tmp_path, store={"url": store_url}))
    app.test_client_class = CardCheckingClient
    client = app.test_client()
    eligible, possible, silent = patient(now), patient(now, anc=None), patient(now)
    try:
        referred = issue_msc_card(client, eligible)
        declined = issue_msc_card(client, possible)
        untouched = issue_msc_card(client, silent)
        comment = '=HYPERLINK("x"), family said "no",\nsee notes'  # commas, quotes, a line break, a formula
        feedback = [
            {
                "card": referred["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": referred["suggestions"][0]["uuid"]}],
                "outcomeTimestamp": now.isoformat(),
            },
            {
                "card": declined["uuid"],
                "outcome": "overridden",
                "overrideReason": {"reason": declined["overrideReasons"][0], "userComment": comment},
                "outcomeTimestamp": (now + timedelta(minutes=5)).isoformat(),
            },
        ]
        assert client.post(f"{SERVICE_URL}/feedback", json={"feedback": feedback}).status_code == 200
    finally:
        app.extensions["cds"].store.close()

    header, rows, err = export(monkeypatch, capsys, store_url)
    assert header == list(CSV_COLUMNS)
    assert "patient identifiers" in err
    by_card = {row["card_uuid"]: row for row in rows}
    assert set(by_card) >= {referred["uuid"], declined["uuid"], untouched["uuid"]}

    row = by_card[referred["uuid"]]
    assert row["patient_id"] == eligible.patient_id and row["trial"] == MSC and row["status"] == "eligible"
    assert (row["outcome"], row["reason"]) == ("accepted", "Referred to the research team")
    assert row["criteria_unknown"] == "" and "informed_consent" in row["criteria_to_confirm"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["time"])
    assert row["outcome_time"] == now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    row = by_card[declined["uuid"]]
    assert (row["patient_id"], row["status"]) == (possible.patient_id, "possibly_eligible")
    assert row["criteria_unknown"] == "severe_neutropenia"
    assert row["outcome"] == "overridden"
    # the reason and the free-text comment come back whole through the csv module
    assert row["reason"] == f"Declined by patient or family ({comment})"

    row = by_card[untouched["uuid"]]
    assert (row["outcome"], row["reason"], row["outcome_time"]) == ("", "", "")


def test_since_and_trial_filters(
    tmp_path: Path, now: datetime, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'filters.sqlite3'}"
    base = now.timestamp()
    with open_store(url) as store:
        for index, (trial, hours_ago) in enumerate(
            [(MSC, 30), ("NCT05184296", 20), (MSC, 2), ("NCT03788837", 1)]
        ):
            store.log_screening(
                IssuedCard(
                    f"card-{index}", f"patient-{index}", trial, "hook", base - hours_ago * 3600, "eligible"
                )
            )
    since = (now - timedelta(hours=24)).isoformat()
    assert [r["card_uuid"] for r in export(monkeypatch, capsys, url)[1]] == [f"card-{i}" for i in range(4)]
    assert [r["card_uuid"] for r in export(monkeypatch, capsys, url, "--since", since)[1]] == [
        "card-1",
        "card-2",
        "card-3",
    ]
    assert [r["card_uuid"] for r in export(monkeypatch, capsys, url, "--trial", MSC)[1]] == [
        "card-0",
        "card-2",
    ]
    both = export(monkeypatch, capsys, url, "--since", since, "--trial", MSC, "--trial", "NCT03788837")[1]
    assert [r["card_uuid"] for r in both] == ["card-2", "card-3"]
    recent = (now - timedelta(minutes=30)).isoformat()
    header, rows, _ = export(monkeypatch, capsys, url, "--since", recent, "--trial", "NCT05184296")
    assert header == list(CSV_COLUMNS) and rows == []  # a known trial with no rows: the header only
    # A trial that is neither a trial file nor in the log is a mistake, not an empty log.
    monkeypatch.setenv("CDS_STORE_URL", url)
    assert main(["screening-log", "--trial", "NCT00000000"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "NCT00000000: no such trial" in err


def test_since_needs_a_time_zone(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["screening-log", "--since", "2026-01-01T00:00"])
    assert "time zone" in capsys.readouterr().err


def test_the_documentation_lists_every_column_and_says_where_the_identifiers_are() -> None:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Screening log", 1)[1]
    for column in CSV_COLUMNS:
        assert f"| `{column}` |" in section, column
    assert "patient identifiers" in section
    assert "var/cds-service.sqlite3" in section and "store.url" in section
