"""Store schema versions: a new store runs every migration, a store made by the previous release
(0.1.0, before schema versions existed) is upgraded in place with its rows kept, on SQLite and on
PostgreSQL, and the upgraded schema is the same as a new one. Also retention (old cards, feedback and
patient ids are purged) and atomic multi-statement writes.

The previous release's store module is kept verbatim in ``tests/previous_release/store_0_1_0.py``
(``git show c2a24de:cds_service/store.py``): the old schema is made by the old code itself.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cds_service.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Feedback,
    IssuedCard,
    Store,
    open_store,
)

PREVIOUS_RELEASE = Path(__file__).parent / "previous_release" / "store_0_1_0.py"
NOW = time.time()
DAY = 86400.0
T1 = "NCT00000001"


def previous_release() -> ModuleType:
    """The 0.1.0 store module, imported from its file under a name of its own."""
    name = "previous_release_store_0_1_0"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PREVIOUS_RELEASE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite3'}"
    return str(request.getfixturevalue("pg_fresh_url"))


def schema_of(store: Store) -> dict[str, Any]:
    """Tables with their columns, and indexes, as the database describes them."""
    if store.kind == "sqlite":
        tables = [r[0] for r in store._read("SELECT name FROM sqlite_master WHERE type = 'table'")]
        columns = {
            table: sorted(tuple(row[1:]) for row in store._read(f"PRAGMA table_info({table})"))
            for table in tables
            if not table.startswith("sqlite_")
        }
        indexes = {
            name: sql for name, sql in store._read("SELECT name, sql FROM sqlite_master WHERE type = 'index'")
        }
        return {"columns": columns, "indexes": indexes}
    rows = store._read(
        "SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity "
        "FROM information_schema.columns WHERE table_schema = current_schema()"
    )
    columns: dict[str, list[tuple[Any, ...]]] = {}
    for table, *column in rows:
        columns.setdefault(table, []).append(tuple(column))
    indexes = dict(
        store._read("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()")
    )
    return {"columns": {t: sorted(c) for t, c in columns.items()}, "indexes": indexes}


def fill_previous_release_store(url: str) -> dict[str, Any]:
    """A 0.1.0 store with cards, feedback and jti rows written by the 0.1.0 code; what it holds."""
    old = previous_release()
    store = old.open_store(url)
    try:
        cards = [
            old.IssuedCard(
                card_uuid=str(uuid.uuid4()),
                patient_id=f"patient-{index}",
                trial_id=T1,
                hook_instance=str(uuid.uuid4()),
                issued_at=NOW - 3600 * index,
                status="eligible" if index % 2 else "possibly_eligible",
                criteria_unmet=[],
                criteria_unknown=["lactate"] if index % 2 else [],
                criteria_to_confirm=["consent"],
            )
            for index in range(5)
        ]
        for card in cards:
            store.log_screening(card)
        store.record_feedback(
            old.Feedback(
                card_uuid=cards[1].card_uuid,
                outcome="overridden",
                outcome_timestamp=NOW - 60,
                received_at=NOW - 59,
                reason_code="declined",
                reason_display="Declined by patient or family",
                user_comment="family wants to wait",
            )
        )
        assert store.remember_jti("https://ehr.example.org", "jti-before-upgrade", NOW + 300)
        log = [
            (row.card_uuid, row.patient_id, row.status, row.outcome, row.reason)
            for row in store.screening_log()
        ]
    finally:
        store.close()
    return {"cards": cards, "log": log}


# -- versions and migrations ---------------------------------------------------------------------------


def test_migrations_are_numbered_one_to_n_and_described() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert len(MIGRATIONS) == SCHEMA_VERSION
    assert all(m.description.strip() for m in MIGRATIONS)


def test_a_new_store_runs_every_migration(store_url: str) -> None:
    with open_store(store_url) as store:
        assert store.schema_version == SCHEMA_VERSION
        applied = [row[0] for row in store._read("SELECT version FROM schema_migrations ORDER BY version")]
        assert applied == [m.version for m in MIGRATIONS]
    with open_store(store_url) as store:  # reopening applies nothing twice
        assert store._read("SELECT COUNT(*) FROM schema_migrations")[0][0] == len(MIGRATIONS)


def test_a_previous_release_store_is_upgraded_in_place_with_its_rows(store_url: str, tmp_path: Path) -> None:
    before = fill_previous_release_store(store_url)
    with open_store(store_url) as store:
        assert store.schema_version == SCHEMA_VERSION
        log = [
            (row.card_uuid, row.patient_id, row.status, row.outcome, row.reason)
            for row in store.screening_log()
        ]
        assert log == before["log"] and len(log) == 5
        overridden = before["cards"][1]
        (stored,) = store.feedback_for_card(overridden.card_uuid)
        assert (stored.outcome, stored.reason_code, stored.user_comment) == (
            "overridden",
            "declined",
            "family wants to wait",
        )
        # What the rows mean is kept too: the override still silences, the jti is still a replay.
        silencing = store.last_override_or_referral(overridden.patient_id, T1, NOW - 3600)
        assert silencing is not None and silencing.card_uuid == overridden.card_uuid
        assert store.remember_jti("https://ehr.example.org", "jti-before-upgrade", NOW + 300) is False
        # And the upgraded store takes new rows.
        new_card = IssuedCard(str(uuid.uuid4()), "patient-new", T1, str(uuid.uuid4()), NOW, "eligible")
        store.record_cards([new_card])
        assert store.get_card(new_card.card_uuid) == new_card
        upgraded = schema_of(store)
    fresh_url = (
        f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
        if store_url.startswith("sqlite")
        else store_url.rsplit("/", 1)[0] + "/" + _new_database(store_url)
    )
    with open_store(fresh_url) as fresh:
        assert schema_of(fresh) == upgraded


def _new_database(url: str) -> str:
    """A second empty database on the same PostgreSQL server (dropped with the server at the end)."""
    import psycopg

    name = f"cds_fresh_{uuid.uuid4().hex[:12]}"
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def _open_and_count(url: str, barrier: Any, results: Any) -> None:
    try:
        barrier.wait(timeout=60)
        with open_store(url) as store:
            results.put((store.schema_version, None))
    except BaseException as exc:
        results.put((0, repr(exc)))
        raise


def test_instances_starting_at_once_upgrade_once(store_url: str) -> None:
    fill_previous_release_store(store_url)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    results = context.Queue()
    workers = [context.Process(target=_open_and_count, args=(store_url, barrier, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert outcomes == [(SCHEMA_VERSION, None)] * 4
    with open_store(store_url) as store:
        versions = [row[0] for row in store._read("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == [m.version for m in MIGRATIONS]
        assert len(store.screening_log()) == 5


def test_a_store_from_a_newer_release_still_opens(store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Migrations are additive, so an older instance keeps running during a rolling upgrade."""
    with open_store(store_url) as store:
        store._write(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
            (SCHEMA_VERSION + 1, "from a newer release", NOW),
        )
    with caplog.at_level(logging.WARNING, logger="cds_service.store"), open_store(store_url) as store:
        assert store.schema_version == SCHEMA_VERSION + 1
        store.record_cards([IssuedCard(str(uuid.uuid4()), "p", T1, str(uuid.uuid4()), NOW, "eligible")])
    assert "newer than this release knows" in caplog.text


def test_a_failing_migration_leaves_the_store_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    fill_previous_release_store(url)
    import cds_service.store as store_module

    broken = store_module.Migration(
        SCHEMA_VERSION + 1, "broken", lambda d: ["CREATE TABLE extra (x INTEGER)", "NOT SQL AT ALL"]
    )
    monkeypatch.setattr(store_module, "MIGRATIONS", (*MIGRATIONS, broken))
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(sqlite3.OperationalError):
        open_store(url)
    monkeypatch.undo()
    conn = sqlite3.connect(tmp_path / "store.sqlite3")
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "extra" not in tables and "schema_migrations" not in tables  # all rolled back
        assert conn.execute("SELECT COUNT(*) FROM issued_card").fetchone()[0] == 5
    finally:
        conn.close()


# -- retention ------------------------------------------------------------------------------------------


def _card(issued_at: float, patient: str = "p1") -> IssuedCard:
    return IssuedCard(str(uuid.uuid4()), patient, T1, str(uuid.uuid4()), issued_at, "eligible")


def _feedback(card: IssuedCard, received_at: float) -> Feedback:
    return Feedback(card.card_uuid, "overridden", received_at, received_at)


def test_retention_purges_old_cards_feedback_and_patient_ids(store_url: str) -> None:
    with open_store(store_url) as store:
        old, recent = _card(NOW - 400 * DAY, "old-patient"), _card(NOW - 10 * DAY, "recent-patient")
        store.record_cards([old, recent])
        store.record_feedback_items(
            [
                _feedback(old, NOW - 399 * DAY),
                _feedback(old, NOW - 20 * DAY),  # recent feedback on an old card goes with the card
                _feedback(recent, NOW - 9 * DAY),
                Feedback(str(uuid.uuid4()), "accepted", NOW - 500 * DAY, NOW - 500 * DAY),  # unknown card
            ]
        )
        assert store.purge_before(NOW - 365 * DAY) == (1, 3)
        assert [row.patient_id for row in store.screening_log()] == ["recent-patient"]
        assert store.get_card(old.card_uuid) is None and store.feedback_for_card(old.card_uuid) == []
        assert len(store.feedback_for_card(recent.card_uuid)) == 1
        patients = store._read("SELECT patient_id FROM issued_card")
        assert patients == [("recent-patient",)]


def test_retention_purge_runs_at_most_once_an_hour(store_url: str) -> None:
    with open_store(store_url) as store:
        store.record_cards([_card(NOW - 40 * DAY)])
        assert store.purge_if_due(30, now=NOW) is True
        assert store.screening_log() == []
        store.record_cards([_card(NOW - 40 * DAY)])
        assert store.purge_if_due(30, now=NOW + 60) is False  # within the hour: not again
        assert len(store.screening_log()) == 1
        assert store.purge_if_due(30, now=NOW + 3601) is True
        assert store.screening_log() == []


def test_the_service_applies_store_retention_days_when_it_answers_hooks(tmp_path: Path) -> None:
    """The setting reaches the store: a worker's first hook purges what is older than retention_days."""
    from datetime import UTC, datetime

    from cds_service.app import create_app
    from cds_service.tools.scenario_builder import PatientBuilder
    from tests.conftest import SERVICE_URL, hook_body, make_settings

    settings = make_settings(tmp_path, store={"retention_days": 30})
    url = settings.section("store")["url"]
    with open_store(url) as store:
        store.record_cards([_card(NOW - 40 * DAY, "old-patient"), _card(NOW - 20 * DAY, "kept-patient")])
    app = create_app(settings)
    state = app.extensions["cds"]
    try:
        builder = PatientBuilder("retention-patient", datetime.now(UTC), age=45, gender="male")
        assert app.test_client().post(SERVICE_URL, json=hook_body(builder)).status_code == 200
        state.store_gate.drain()
        patients = {row.patient_id for row in state.store.screening_log()}
    finally:
        state.store.close()
    assert "old-patient" not in patients
    assert "kept-patient" in patients


# -- atomic writes -------------------------------------------------------------------------------------


def test_several_statements_are_stored_all_or_none(store_url: str) -> None:
    with open_store(store_url) as store:
        card = _card(NOW)
        store.record_cards([card])
        good = _feedback(card, NOW)
        bad = Feedback(card.card_uuid, "overridden", NOW + 1, NOW + 1)
        # The database refuses the second row (its CHECK constraint): the first is not kept either.
        bad_params = (
            bad.card_uuid,
            "not-an-outcome",
            bad.outcome_timestamp,
            bad.received_at,
            None,
            None,
            None,
            "[]",
        )
        from cds_service.store import _INSERT_FEEDBACK, _feedback_params

        with pytest.raises(Exception, match=r"(?i)check"):
            store._write_all([(_INSERT_FEEDBACK, _feedback_params(good)), (_INSERT_FEEDBACK, bad_params)])
        assert store.feedback_for_card(card.card_uuid) == []
        assert store.record_feedback_items([good, bad]) == [True, True]
        assert len(store.feedback_for_card(card.card_uuid)) == 2
