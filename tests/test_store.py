"""The store behaves the same on SQLite and PostgreSQL: cards, idempotent feedback, override
silencing, the jti replay cache, the screening log and its CSV export — and no write is lost when
several processes or threads write at once."""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cds_service.store import (
    CSV_COLUMNS,
    Feedback,
    IssuedCard,
    PostgresStore,
    ScreeningLogRow,
    SqliteStore,
    Store,
    export_screening_csv,
    open_store,
)

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]
NOW = 1_750_000_000.0  # fixed "now" for reproducible windows
HOUR = 3600.0
T1 = "NCT00000001"
T2 = "NCT00000002"

WRITERS = 8
MESSAGES = 1000
PER_WRITER = MESSAGES // WRITERS
RESENT = 25  # each writer also re-sends this many of its neighbour's messages (client retries)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite3'}"
    return str(request.getfixturevalue("pg_fresh_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = open_store(store_url)
    try:
        yield opened
    finally:
        opened.close()


def card(
    card_uuid: str | None = None,
    patient: str = "p1",
    trial: str = T1,
    issued_at: float = NOW,
    status: str = "eligible",
    **lists: list[str],
) -> IssuedCard:
    return IssuedCard(
        card_uuid=card_uuid or str(uuid.uuid4()),
        patient_id=patient,
        trial_id=trial,
        hook_instance=str(uuid.uuid4()),
        issued_at=issued_at,
        status=status,
        criteria_unmet=lists.get("unmet", []),
        criteria_unknown=lists.get("unknown", []),
        criteria_to_confirm=lists.get("confirm", []),
    )


def feedback(
    card_uuid: str,
    outcome: str = "overridden",
    at: float = NOW,
    reason: tuple[str, str] | None = ("not-now", "Not appropriate now"),
    comment: str | None = None,
) -> Feedback:
    return Feedback(
        card_uuid=card_uuid,
        outcome=outcome,
        outcome_timestamp=at,
        received_at=at + 1,
        reason_code=reason[0] if reason and outcome == "overridden" else None,
        reason_display=reason[1] if reason and outcome == "overridden" else None,
        user_comment=comment,
        accepted_suggestions=["enroll-referral"] if outcome == "accepted" else [],
    )


def count(store: Store, table: str) -> int:
    return int(store._read(f"SELECT COUNT(*) FROM {table}")[0][0])


# ------------------------------------------------------------------------------------------ opening


def test_open_store_relative_sqlite_path_creates_parent_and_uses_wal(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///var/nested/cds.sqlite3")
    try:
        assert isinstance(store, SqliteStore)
        assert store.path == tmp_path / "var" / "nested" / "cds.sqlite3"
        store.record_card(card("c1"))
        monkeypatch.chdir("/")  # the path was resolved at open time
        assert store.get_card("c1") is not None
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "var" / "nested" / "cds.sqlite3") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("url", ["mysql://x", "sqlite://relative", "sqlite:///:memory:", "", "var/x.sqlite3"])
def test_open_store_rejects_unknown_urls(url: str) -> None:
    with pytest.raises(ValueError, match="store url"):
        open_store(url)


def test_store_kind(store: Store, store_url: str) -> None:
    expected = SqliteStore if store_url.startswith("sqlite") else PostgresStore
    assert isinstance(store, expected)
    assert "password" not in repr(store)


def test_reopening_an_existing_store_keeps_its_data(store_url: str) -> None:
    first = open_store(store_url)
    first.record_card(card("keep"))
    first.close()
    second = open_store(store_url)
    try:
        assert second.get_card("keep") is not None
    finally:
        second.close()


def test_store_is_usable_after_close(store: Store) -> None:
    store.record_card(card("before"))
    store.close()
    store.record_card(card("after"))
    assert store.get_card("before") is not None
    assert store.get_card("after") is not None


# ------------------------------------------------------------------------------------------- cards


def test_card_round_trip(store: Store) -> None:
    issued = card(
        "c-1",
        status="possibly_eligible",
        issued_at=NOW + 0.123456,
        unmet=["age ≥ 18"],
        unknown=["lactate > 2 mmol/L", "MAP ≥ 65; on vasopressors"],
        confirm=["consent"],
    )
    store.record_card(issued)
    assert store.get_card("c-1") == issued
    assert store.get_card("unknown") is None


def test_recording_a_card_twice_keeps_the_first(store: Store) -> None:
    first = card("c-1", status="possibly_eligible")
    store.record_card(first)
    store.record_card(card("c-1", status="eligible"))
    store.log_screening(first)
    assert store.get_card("c-1") == first
    assert len(store.screening_log()) == 1


# ---------------------------------------------------------------------------------------- feedback


def test_feedback_is_idempotent(store: Store) -> None:
    store.record_card(card("c-1"))
    fb = feedback("c-1", comment="family declined")
    assert store.record_feedback(fb) is True
    assert store.record_feedback(fb) is False
    assert store.record_feedback(Feedback(**{**fb.__dict__, "received_at": NOW + 99})) is False
    assert store.feedback_for_card("c-1") == [fb]
    # A different outcome or outcome time is a different entry.
    assert store.record_feedback(feedback("c-1", outcome="accepted")) is True
    assert store.record_feedback(feedback("c-1", at=NOW + 60)) is True
    assert count(store, "card_feedback") == 3


def test_feedback_round_trips_all_fields(store: Store) -> None:
    accepted = feedback("c-1", outcome="accepted", comment="paged the team")
    store.record_feedback(accepted)
    assert store.feedback_for_card("c-1") == [accepted]
    assert accepted.accepted_suggestions == ["enroll-referral"]


def test_feedback_rejects_an_unknown_outcome(store: Store) -> None:
    with pytest.raises(ValueError, match="outcome"):
        store.record_feedback(feedback("c-1", outcome="ignored"))
    assert count(store, "card_feedback") == 0


def test_feedback_for_an_unknown_card_is_kept_but_not_in_the_log(store: Store) -> None:
    assert store.record_feedback(feedback("never-issued")) is True
    assert store.screening_log() == []
    assert store.last_override("p1", T1, since=0) is None


# ----------------------------------------------------------------------------------- last_override


def test_last_override_is_scoped_to_patient_and_trial(store: Store) -> None:
    store.record_card(card("p1-t1", patient="p1", trial=T1, status="possibly_eligible", issued_at=NOW - 200))
    store.record_card(card("p1-t2", patient="p1", trial=T2, issued_at=NOW - 200))
    store.record_card(card("p2-t1", patient="p2", trial=T1, issued_at=NOW - 200))
    store.record_feedback(feedback("p1-t1", at=NOW - 100, comment="on ECMO"))

    found = store.last_override("p1", T1, since=NOW - 24 * HOUR)
    assert found is not None
    assert (found.card_uuid, found.status, found.time) == ("p1-t1", "possibly_eligible", NOW - 100)
    assert (found.reason_code, found.reason_display, found.user_comment) == (
        "not-now",
        "Not appropriate now",
        "on ECMO",
    )
    assert found.reason == "Not appropriate now (on ECMO)"
    assert store.last_override("p2", T1, since=NOW - 24 * HOUR) is None
    assert store.last_override("p1", T2, since=NOW - 24 * HOUR) is None


def test_last_override_ignores_old_overrides_and_acceptances(store: Store) -> None:
    store.record_card(card("old", issued_at=NOW - 50 * HOUR))
    store.record_feedback(feedback("old", at=NOW - 48 * HOUR))
    store.record_card(card("acc", issued_at=NOW - 2 * HOUR))
    store.record_feedback(feedback("acc", outcome="accepted", at=NOW - HOUR))
    assert store.last_override("p1", T1, since=NOW - 24 * HOUR) is None
    assert store.last_override("p1", T1, since=NOW - 48 * HOUR) is not None  # boundary is inclusive


def test_last_override_returns_the_most_recent(store: Store) -> None:
    store.record_card(card("first", status="possibly_eligible", issued_at=NOW - 3 * HOUR))
    store.record_card(card("second", status="eligible", issued_at=NOW - 2 * HOUR))
    store.record_feedback(feedback("second", at=NOW - HOUR, reason=("other", "Other")))
    store.record_feedback(feedback("first", at=NOW - 2.5 * HOUR))
    found = store.last_override("p1", T1, since=NOW - 24 * HOUR)
    assert found is not None
    assert (found.card_uuid, found.status, found.reason) == ("second", "eligible", "Other")


def test_the_silence_look_ups_cost_the_same_however_often_the_chart_was_opened(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every hook looks up the last override or referral for each trial shown, and every chart-open
    records a card per trial shown, kept for the retention period: after 2 000 opens of one chart the
    look-ups must do the same work as after 2 (counted in SQLite's virtual-machine steps). They read
    the feedback of the silence window, not the patient's cards."""
    steps = 0

    def tick() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    connect = SqliteStore._connect

    def counting(self: SqliteStore) -> sqlite3.Connection:
        conn = connect(self)
        conn.set_progress_handler(tick, 10)
        return conn

    monkeypatch.setattr(SqliteStore, "_connect", counting)
    store = SqliteStore(tmp_path / "store.sqlite3")
    try:
        # Feedback within the window (another patient's override, this patient's acceptance without
        # a referral) and an override of this patient's card before it.
        store.record_cards(
            [card("other", patient="p2"), card("accepted"), card("old", issued_at=NOW - 30 * HOUR)]
        )
        store.record_feedback(feedback("other", at=NOW - HOUR))
        store.record_feedback(feedback("accepted", outcome="accepted", at=NOW - HOUR))
        store.record_feedback(feedback("old", at=NOW - 26 * HOUR))
        since = NOW - 24 * HOUR

        def look_ups() -> int:
            nonlocal steps
            steps = 0
            assert store.last_override("p1", T1, since) is None
            assert store.last_override_or_referral("p1", T1, since) is None
            return steps

        few = look_ups()
        store.record_cards([card(issued_at=NOW - i) for i in range(2000)])
        many = look_ups()
        assert many <= few + 2, (few, many)
        # What they find does not change.
        store.record_feedback(feedback("old", at=NOW - 2 * HOUR))
        found = store.last_override_or_referral("p1", T1, since)
        assert found is not None and found.card_uuid == "old"
    finally:
        store.close()


# --------------------------------------------------------------------------------------------- jti


def test_remember_jti_detects_replays(store: Store) -> None:
    exp = time.time() + 300
    assert store.remember_jti("https://ehr.example", "jti-1", exp) is True
    assert store.remember_jti("https://ehr.example", "jti-1", exp) is False
    assert store.remember_jti("https://ehr.example", "jti-1", exp + 10) is False
    assert store.remember_jti("https://other.example", "jti-1", exp) is True
    assert store.remember_jti("https://ehr.example", "jti-2", exp) is True


def test_expired_jti_rows_are_purged_and_can_be_reused(store: Store) -> None:
    long_ago = time.time() - 7 * 24 * HOUR
    assert store.remember_jti("iss", "stale", long_ago) is True
    assert store.remember_jti("iss", "live", time.time() + 300) is True
    # An expired row no longer blocks (its token is rejected on `exp` anyway) …
    assert store.remember_jti("iss", "stale", time.time() + 300) is True
    assert store.remember_jti("iss", "stale", time.time() + 300) is False
    # … and purging removes only expired rows.
    assert store.remember_jti("iss", "gone", long_ago) is True
    assert store.purge_expired_jti() == 1
    assert count(store, "jwt_jti") == 2


def test_remember_jti_purges_now_and_then(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import cds_service.store as store_module

    monkeypatch.setattr(store_module, "JTI_PURGE_EVERY", 3)
    for index in range(5):
        store.remember_jti("iss", f"old-{index}", time.time() - 7 * 24 * HOUR)
    assert count(store, "jwt_jti") < 5


# ------------------------------------------------------------------------------------ screening log


def _seed_log(store: Store) -> None:
    store.record_card(card("a", patient="p1", trial=T1, issued_at=NOW - 3 * HOUR, unmet=["x"]))
    store.record_card(card("b", patient="p2", trial=T2, issued_at=NOW - 2 * HOUR, status="upcoming"))
    store.record_card(card("c", patient="p3", trial=T1, issued_at=NOW - HOUR, status="possibly_eligible"))
    # Card a: accepted, then overridden later (and a retry of the first message): latest wins.
    store.record_feedback(feedback("a", outcome="accepted", at=NOW - 170 * 60))
    store.record_feedback(feedback("a", at=NOW - 160 * 60, comment="changed mind"))
    store.record_feedback(feedback("a", outcome="accepted", at=NOW - 170 * 60))
    store.record_feedback(feedback("b", outcome="accepted", at=NOW - 100 * 60))


def test_screening_log_joins_the_latest_outcome(store: Store) -> None:
    _seed_log(store)
    rows = store.screening_log()
    assert [row.card_uuid for row in rows] == ["a", "b", "c"]
    a, b, c = rows
    assert a == ScreeningLogRow(
        time=NOW - 3 * HOUR,
        patient_id="p1",
        trial_id=T1,
        status="eligible",
        criteria_unmet=["x"],
        criteria_unknown=[],
        criteria_to_confirm=[],
        card_uuid="a",
        outcome="overridden",
        reason="Not appropriate now (changed mind)",
        outcome_time=NOW - 160 * 60,
    )
    assert (b.outcome, b.reason, b.outcome_time) == ("accepted", None, NOW - 100 * 60)
    assert (c.outcome, c.reason, c.outcome_time) == (None, None, None)


def test_screening_log_filters(store: Store) -> None:
    _seed_log(store)
    assert [r.card_uuid for r in store.screening_log(since=NOW - 2 * HOUR)] == ["b", "c"]
    assert [r.card_uuid for r in store.screening_log(trial_id=T1)] == ["a", "c"]
    assert [r.card_uuid for r in store.screening_log(since=NOW - 2 * HOUR, trial_id=T1)] == ["c"]
    assert store.screening_log(since=NOW) == []
    assert store.screening_log(trial_id="NCT99999999") == []


def test_screening_log_csv_round_trip(store: Store) -> None:
    _seed_log(store)
    store.record_card(card("d", patient="p4", issued_at=NOW, unknown=["lactate", "MAP"], confirm=["consent"]))
    buffer = io.StringIO(newline="")
    assert export_screening_csv(store.screening_log(), buffer) == 4
    buffer.seek(0)
    reader = csv.DictReader(buffer)
    assert tuple(reader.fieldnames or ()) == CSV_COLUMNS == (
        "time", "patient_id", "trial", "status", "criteria_unmet", "criteria_unknown",
        "criteria_to_confirm", "card_uuid", "outcome", "reason", "outcome_time", "source", "recorded_by",
        "checklist_confirmed", "trial_version", "mappings_version",
    )  # fmt: skip
    rows = {row["card_uuid"]: row for row in reader}
    assert rows["a"] == {
        "time": "2025-06-15T12:06:40Z",
        "patient_id": "p1",
        "trial": T1,
        "status": "eligible",
        "criteria_unmet": "x",
        "criteria_unknown": "",
        "criteria_to_confirm": "",
        "card_uuid": "a",
        "outcome": "overridden",
        "reason": "Not appropriate now (changed mind)",
        "outcome_time": "2025-06-15T12:26:40Z",
        "source": "hook",
        "recorded_by": "",
        "checklist_confirmed": "",
        "trial_version": "",
        "mappings_version": "",
    }
    assert rows["d"]["criteria_unknown"] == "lactate; MAP"
    assert rows["d"]["criteria_to_confirm"] == "consent"
    assert (rows["d"]["outcome"], rows["d"]["reason"], rows["d"]["outcome_time"]) == ("", "", "")


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)


@settings(max_examples=150, deadline=None)
@given(
    patient=_text,
    items=st.lists(_text, max_size=4),
    reason=st.none() | _text,
    outcome=st.sampled_from([None, "accepted", "overridden"]),
    stamp=st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False),
)
def test_csv_export_survives_any_text(
    patient: str, items: list[str], reason: str | None, outcome: str | None, stamp: float
) -> None:
    row = ScreeningLogRow(
        time=stamp,
        patient_id=patient,
        trial_id=T1,
        status="eligible",
        criteria_unmet=items,
        criteria_unknown=[],
        criteria_to_confirm=items[::-1],
        card_uuid="u",
        outcome=outcome,
        reason=reason,
        outcome_time=stamp if outcome else None,
    )
    buffer = io.StringIO(newline="")
    export_screening_csv([row], buffer)
    buffer.seek(0)
    (parsed,) = list(csv.DictReader(buffer))
    assert parsed["patient_id"] == patient
    assert parsed["criteria_unmet"] == "; ".join(items)
    assert parsed["criteria_to_confirm"] == "; ".join(items[::-1])
    expected_reason = reason or ""
    if expected_reason[:1] in ("=", "+", "-", "@", "\t", "\r"):
        expected_reason = "'" + expected_reason  # never a spreadsheet formula
    assert parsed["reason"] == expected_reason
    assert parsed["time"].endswith("Z") and len(parsed["time"]) == 20
    assert bool(parsed["outcome_time"]) == bool(outcome)


# ------------------------------------------------------------------------------------- concurrency


def _message(index: int) -> Feedback:
    """Message ``index`` of the 1 000: 40 cards, alternating outcomes, a unique outcome time each."""
    return feedback(
        f"card-{index % 40}",
        outcome="accepted" if index % 3 == 0 else "overridden",
        at=NOW + index,
        comment=f"message {index}",
    )


def _writer_batch(writer: int) -> list[Feedback]:
    own = [_message(writer * PER_WRITER + k) for k in range(PER_WRITER)]
    neighbour = (writer + 1) % WRITERS
    resent = [_message(neighbour * PER_WRITER + k) for k in range(RESENT)]
    return own[:60] + resent + own[60:]  # retries race with the neighbour's first sends


def _post_batch(store: Store, writer: int) -> int:
    return sum(store.record_feedback(fb) for fb in _writer_batch(writer))


def _process_writer(store_or_url: Store | str, writer: int, barrier: Any, results: Any) -> None:
    try:
        store = open_store(store_or_url) if isinstance(store_or_url, str) else store_or_url
        barrier.wait(timeout=60)
        results.put((writer, _post_batch(store, writer), None))
        store.close()
    except BaseException as exc:
        results.put((writer, 0, repr(exc)))
        raise


def _seed_cards(store: Store) -> None:
    for index in range(40):
        store.record_card(card(f"card-{index}", patient=f"p{index % 7}", trial=T1 if index % 2 else T2))


def _check_all_feedback_arrived(store: Store, new_counts: list[int]) -> None:
    assert sum(new_counts) == MESSAGES  # every message reported new exactly once, retries False
    assert count(store, "card_feedback") == MESSAGES
    total = sum(len(store.feedback_for_card(f"card-{index}")) for index in range(40))
    assert total == MESSAGES
    comments = {fb.user_comment for index in range(40) for fb in store.feedback_for_card(f"card-{index}")}
    assert comments == {f"message {index}" for index in range(MESSAGES)}
    assert len(store.screening_log()) == 40
    assert all(row.outcome is not None for row in store.screening_log())


@pytest.mark.parametrize("inherit", [True, False], ids=["inherited-store", "own-store"])
def test_concurrent_processes_lose_no_feedback(store: Store, store_url: str, inherit: bool) -> None:
    """8 forked worker processes (like gunicorn workers) post 1 000 feedback messages plus retries."""
    _seed_cards(store)  # the parent uses its connection right before forking
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(WRITERS)
    results = context.Queue()
    target = store if inherit else store_url
    workers = [
        context.Process(target=_process_writer, args=(target, writer, barrier, results))
        for writer in range(WRITERS)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=180) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    errors = [error for _, _, error in outcomes if error]
    assert not errors
    # The parent's own store (and connection) still works after the children used theirs.
    _check_all_feedback_arrived(store, [new for _, new, _ in outcomes])


def test_concurrent_threads_lose_no_feedback(store: Store) -> None:
    """8 threads sharing one store post 1 000 feedback messages plus retries."""
    _seed_cards(store)
    barrier = threading.Barrier(WRITERS)
    new_counts = [0] * WRITERS
    errors: list[BaseException] = []

    def run(writer: int) -> None:
        try:
            barrier.wait(timeout=60)
            new_counts[writer] = _post_batch(store, writer)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(writer,)) for writer in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors
    _check_all_feedback_arrived(store, new_counts)


def _open_and_record(url: str, writer: int, barrier: Any, results: Any) -> None:
    try:
        barrier.wait(timeout=60)
        store = open_store(url)
        store.record_card(card(f"boot-{writer}"))
        assert store.remember_jti("iss", "shared-jti", time.time() + 300) in (True, False)
        store.close()
        results.put((writer, None))
    except BaseException as exc:
        results.put((writer, repr(exc)))
        raise


def test_processes_starting_at_once_create_the_schema_safely(store_url: str) -> None:
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(WRITERS)
    results = context.Queue()
    workers = [
        context.Process(target=_open_and_record, args=(store_url, writer, barrier, results))
        for writer in range(WRITERS)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert [error for _, error in outcomes if error] == []
    store = open_store(store_url)
    try:
        assert len(store.screening_log()) == WRITERS
        assert count(store, "jwt_jti") == 1
    finally:
        store.close()


def test_threads_get_their_own_connections(store: Store) -> None:
    seen: list[Any] = []
    barrier = threading.Barrier(4)

    def grab() -> None:
        with store._connection() as holder:
            seen.append(holder.raw)
        barrier.wait(timeout=30)  # all alive at once: no connection can be recycled

    threads = [threading.Thread(target=grab) for _ in range(3)]
    for thread in threads:
        thread.start()
    with store._connection() as holder:
        seen.append(holder.raw)
    barrier.wait(timeout=30)
    for thread in threads:
        thread.join()
    assert len({id(raw) for raw in seen}) == 4


@pytest.mark.postgres
def test_postgres_store_reconnects_after_losing_its_connection(pg_fresh_url: str) -> None:
    import psycopg

    store = open_store(pg_fresh_url)
    try:
        store.record_card(card("before"))
        (pid,) = store._read("SELECT pg_backend_pid()")[0]
        with psycopg.connect(pg_fresh_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        store.record_card(card("after"))
        assert store.get_card("after") is not None
        assert store._read("SELECT pg_backend_pid()")[0][0] != pid
    finally:
        store.close()


def test_fork_does_not_share_sqlite_connections(tmp_path: Any) -> None:
    """A child never reuses the parent's SQLite connection; the parent's idle one is closed pre-fork."""
    store = open_store(f"sqlite:///{tmp_path / 'fork.sqlite3'}")
    try:
        store.record_card(card("parent"))
        with store._connection() as holder:
            parent_conn = holder
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                with store._connection() as holder:
                    code = 0 if holder is not parent_conn else 2
                store.record_card(card("child"))
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert parent_conn.closed  # it was idle at fork time
        assert store.get_card("child") is not None
    finally:
        store.close()
