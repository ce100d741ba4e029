"""The garbage-collector pause of a hook (protocol/api.py, ``GcPause``) under threads: the collector
is process-wide, so it stays paused while any hook is in flight, comes back (as it was) when the last
one is done, still runs during a pause that never ends, and a hold that is never released cannot keep
it off for good."""

from __future__ import annotations

import gc
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

from cds_service.app import create_app
from cds_service.protocol import api
from cds_service.protocol.api import GcPause
from cds_service.tools.scenario_builder import PatientBuilder
from tests.conftest import SERVICE_URL, hook_body, make_settings


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_overlapping_hooks_keep_it_paused_until_the_last_is_done() -> None:
    pause = GcPause()
    first = pause.hold()
    assert not gc.isenabled()
    second = pause.hold()
    first.release()
    assert not gc.isenabled(), "the second hook is still decoding: the collector stays off"
    first.release()  # releasing twice changes nothing
    assert pause.active == 1 and not gc.isenabled()
    second.release()
    assert gc.isenabled() and pause.active == 0


def test_the_collectors_earlier_setting_is_restored() -> None:
    pause = GcPause()
    gc.disable()  # someone (a benchmark, a debugger) turned it off before
    held = pause.hold()
    held.release()
    assert not gc.isenabled()


def test_a_pause_that_never_ends_still_collects(monkeypatch: pytest.MonkeyPatch) -> None:
    pause = GcPause()
    monkeypatch.setattr(GcPause, "MAX_PAUSE_SECONDS", 0.05)
    collections: list[int] = []
    monkeypatch.setattr(api.gc, "collect", lambda *args: collections.append(1) or 0)
    holds = [pause.hold()]
    for _ in range(6):  # hooks overlapping without a gap for longer than the limit
        time.sleep(0.03)
        holds.append(pause.hold())
        holds.pop(0).release()
        assert not gc.isenabled()
    assert len(collections) >= 1
    holds[0].release()
    assert gc.isenabled()


def test_a_hold_never_released_is_dropped_once_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    pause = GcPause()
    forgotten = pause.hold()
    forgotten.items.append(object())
    monkeypatch.setattr(GcPause, "STALE_SECONDS", 0.01)
    time.sleep(0.02)
    later = pause.hold()
    assert forgotten.items == [] and pause.active == 1
    later.release()
    assert gc.isenabled()


def test_concurrent_hooks_over_http_leave_the_collector_as_it_was(tmp_path: Path, now: datetime) -> None:
    """A threaded server answering hooks at once (as gunicorn gthread does)."""
    app = create_app(make_settings(tmp_path))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}{SERVICE_URL}"
    statuses: list[int] = []

    def call() -> None:
        builder = PatientBuilder(f"gc-{uuid.uuid4().hex[:8]}", now, age=50)
        builder.septic_shock_story(onset_hours=4)
        with requests.Session() as session:
            for _ in range(3):
                statuses.append(session.post(url, json=hook_body(builder), timeout=60).status_code)

    try:
        callers = [threading.Thread(target=call) for _ in range(6)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(timeout=120)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        app.extensions["cds"].store.close()
    assert statuses == [200] * 18
    assert api.GC_PAUSE.active == 0
    assert gc.isenabled()
