"""The store cannot hold up a hook: the silence check and the card write each get
``store.hook_timeout_seconds`` (200 ms by default); a slower or unreachable store still gets an answer
with cards, the log says so, and a slow write completes after the answer. Connect timeouts stay below
the hook deadline, and the background work is bounded."""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from cds_service.app import create_app
from cds_service.base.config import DEFAULTS
from cds_service.service import StoreGate
from cds_service.store import PG_CONNECT_TIMEOUT_SECONDS
from cds_service.tools.scenario_builder import PatientBuilder
from tests.conftest import SERVICE_URL, CardCheckingClient, hook_body, make_settings

MSC = "NCT01849237"


def msc_patient(now: datetime) -> PatientBuilder:
    builder = PatientBuilder(f"gate-{uuid.uuid4().hex[:10]}", now, age=45, gender="male")
    builder.septic_shock_story(onset_hours=4)
    builder.anc(0.4, hours=2)
    return builder


@pytest.fixture
def silent_database() -> Iterator[str]:
    """A TCP port that accepts connections and never says a word: libpq waits for its greeting."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"postgresql://postgres@127.0.0.1:{listener.getsockname()[1]}/silent"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


def test_the_default_wait_and_the_connect_timeout_fit_in_the_hook_deadline() -> None:
    assert DEFAULTS["store"]["hook_timeout_seconds"] == 0.2
    assert DEFAULTS["fhir"]["deadline_seconds"] > PG_CONNECT_TIMEOUT_SECONDS


def test_a_hanging_database_does_not_hold_up_the_answer(
    tmp_path: Path, silent_database: str, now: datetime, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings(tmp_path, store={"url": silent_database, "hook_timeout_seconds": 0.2}))
    app.test_client_class = CardCheckingClient
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="cds_service.service"):
        for _ in range(3):  # every call, not just the first: nothing waits for the connect timeout
            started = time.monotonic()
            response = client.post(SERVICE_URL, json=hook_body(msc_patient(now)))
            elapsed = time.monotonic() - started
            assert response.status_code == 200
            assert MSC in {card["source"]["topic"]["code"] for card in response.get_json()["cards"]}
            # two waits of 0.2 s (silence check, card write) plus the screening; the connect timeout is 2 s
            assert elapsed < 1.5, elapsed
    assert "cards shown without the silence check" in caplog.text
    assert "store slow" in caplog.text


def test_a_slow_card_write_completes_after_the_answer(
    tmp_path: Path, now: datetime, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, store={"hook_timeout_seconds": 0.2})
    app = create_app(settings)
    app.test_client_class = CardCheckingClient
    client = app.test_client()
    state = app.extensions["cds"]
    client.post(SERVICE_URL, json=hook_body(msc_patient(now)))  # opens the store, runs the first purge
    state.store_gate.drain()
    # Another process holds SQLite's write lock for a while (a long export, a backup …).
    blocker = sqlite3.connect(tmp_path / "store.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with caplog.at_level(logging.WARNING, logger="cds_service.service"):
            started = time.monotonic()
            response = client.post(SERVICE_URL, json=hook_body(msc_patient(now)))
            assert time.monotonic() - started < 1.5
        assert response.status_code == 200
        card_uuid = next(
            c["uuid"] for c in response.get_json()["cards"] if c["source"]["topic"]["code"] == MSC
        )
        assert "store slow: answering before recording" in caplog.text
        time.sleep(0.3)
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    state.store_gate.drain()
    card = state.store.get_card(card_uuid)
    assert card is not None and card.trial_id == MSC  # recorded in the background once the lock went
    state.store.close()


def test_background_store_work_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    gate = StoreGate(threads=1, max_backlog=2)
    release = threading.Event()
    ran: list[int] = []

    def work(n: int) -> int:
        release.wait(5)
        ran.append(n)
        return n

    with caplog.at_level(logging.WARNING, logger="cds_service.service"):
        assert gate.call("first", lambda: work(1), 0.05) == (False, None)
        assert gate.call("second", lambda: work(2), None) == (False, None)
        assert gate.call("third", lambda: work(3), 0.05) == (False, None)  # backlog full: not started
    assert "store backlog full: third skipped" in caplog.text
    release.set()
    gate.drain()
    assert sorted(ran) == [1, 2]
    assert gate.call("fourth", lambda: work(4), 1.0) == (True, 4)


def test_a_failing_store_call_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    gate = StoreGate()

    def broken() -> None:
        raise RuntimeError("disk full")

    with caplog.at_level(logging.ERROR, logger="cds_service.service"):
        assert gate.call("recording 1 issued card(s)", broken, 1.0) == (False, None)
    assert "store unavailable: recording 1 issued card(s) failed" in caplog.text
