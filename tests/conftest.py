"""Shared fixtures: the app on a temporary store, a client that checks every card it sees, and
the real servers (FHIR, PostgreSQL) started by session fixtures in their own modules.

Skips: a test that needs infrastructure calls ``needs_infrastructure`` (``tests/infrastructure.py``):
it skips on a developer's machine and fails in CI. The hooks at the end of this file also turn any
other skip into a failure when ``CI`` is set, and end every run with one line counting the skips.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_service.app import create_app
from cds_service.base.config import Settings, load_settings
from cds_service.screening import Screener
from cds_service.tools.card_rules import response_problems, screening_extension_problems
from cds_service.tools.scenario_builder import PatientBuilder
from tests.fhir_server import *  # noqa: F403
from tests.infrastructure import SHARED_DIR, SKIPS, in_ci, needs_infrastructure
from tests.pg_server import *  # noqa: F403
from tests.worksheet_fixtures import *  # noqa: F403

T = TypeVar("T")

__all__ = ["SHARED_DIR", "in_ci", "needs_infrastructure"]  # the skip policy, for every test module

SERVICE_URL = "/cds-services/septic-shock-trial-screening"

#: Every hook response body seen by the suite's clients, checked against the CDS Hooks card rules.
CARDS_SEEN: list[dict[str, Any]] = []


class CardCheckingClient(FlaskClient):
    """A test client that validates every hook response it receives against the card rules and the
    ``extension.screening`` contract."""

    def open(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        response = super().open(*args, **kwargs)
        if response.status_code == 200 and response.is_json:
            body = response.get_json()
            if isinstance(body, dict) and "cards" in body:
                problems = response_problems(body)
                assert not problems, f"cards break the CDS Hooks rules: {problems}"
                for card in body["cards"]:
                    broken = screening_extension_problems(card)
                    assert not broken, f"extension.screening breaks its contract: {broken}"
                CARDS_SEEN.extend(body["cards"])
        return response


def make_settings(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    # A generous store wait: tests read the store right after a hook, on a machine shared with other
    # suites. The 200 ms default and what happens beyond it are tested in test_store_in_hook_path.py.
    overrides: dict[str, Any] = {
        "store": {"url": f"sqlite:///{tmp_path / 'store.sqlite3'}", "hook_timeout_seconds": 5.0}
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_settings(environ={}, overrides=overrides)


@pytest.fixture(scope="session")
def screener() -> Screener:
    """Knowledge loaded once for the session (read-only)."""
    return Screener(load_settings(environ={}))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, fhir={"allow_http": True})


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    application = create_app(settings)
    application.test_client_class = CardCheckingClient
    yield application
    state = application.extensions["cds"]
    if state._store is not None:
        state._store.close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


_TEMPLATES: dict[str, str] = {}


def _default_templates() -> dict[str, str]:
    """The shipped configuration's prefetch templates (what an EHR registers from discovery)."""
    if not _TEMPLATES:
        _TEMPLATES.update(Screener(load_settings(environ={})).plan.templates())
    return _TEMPLATES


def hook_body(
    builder: PatientBuilder | None = None,
    *,
    patient_id: str | None = None,
    prefetch: bool = True,
    fhir_server: str | None = None,
    token: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A patient-view request, with the builder's data as prefetch (the service's template keys)."""
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {
            "userId": "Practitioner/icu-doc-1",
            "patientId": patient_id or (builder.patient_id if builder else "p1"),
        },
    }
    if fhir_server:
        body["fhirServer"] = fhir_server
    if token:
        body["fhirAuthorization"] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "cds-service",
        }
    if prefetch and builder is not None:
        body["prefetch"] = builder.prefetch(_default_templates())
    body.update(extra)
    return body


# -- skips: counted, and failures in CI ----------------------------------------------------------------


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """In CI a skip (any: skip, skipif, importorskip, a fixture's skip) is reported as a failure."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        SKIPS.append(f"{item.nodeid}: {reason}")
        if in_ci():
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, where no test may skip: {reason}"


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A whole module skipped at collection counts too (and fails the run in CI: see below)."""
    if report.skipped:
        SKIPS.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if SKIPS and in_ci() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def skip_summary(skips: list[str], ci: bool) -> str:
    """The last line of every run: how many tests skipped (zero is what CI accepts)."""
    if not skips:
        return "skips: 0" + (" (CI accepts none)" if ci else "")
    verdict = "CI accepts none: FAILED" if ci else "in CI each would be a failure"
    return f"skips: {len(skips)} ({verdict}) — " + "; ".join(skips)


def pytest_unconfigure(config: pytest.Config) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and not hasattr(config, "workerinput"):
        reporter.write_line(skip_summary(SKIPS, in_ci()))


def at_once(action: Callable[[], T], times: int) -> tuple[list[T], list[BaseException]]:
    """``action`` run ``times`` times at once, each on its own thread (concurrent hooks): what the
    calls returned and what they raised, for the test to assert on."""
    results: list[T] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(action())
        except BaseException as error:  # reported to the caller
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors
