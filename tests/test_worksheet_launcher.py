"""The screening worksheet against a real SMART authorization server: the SMART Health IT launcher
(``../shared/vendor/smart-launcher-v2``, installed by ``make test``) in front of the test FHIR server
loaded with scenario patients. No browser: an HTTP client follows the redirects, as the launcher
shows no screen for a launch code with one patient, one provider and the skip flags set.

- An EHR launch goes from the launch URL to the rendered worksheet of an eligible patient, whose
  criteria are all shown, with their evidence or a "to confirm" mark.
- The launcher's simulated errors (an invalid scope, an unknown client, a bad redirect URI, a token
  refused) and a wrong ``state`` give their clear pages; so does a FHIR server too slow
  behind the launcher.
- A confidential client, SMART v1 scopes and a standalone launch work too.

In CI these tests run, never skip (tests/worksheet_fixtures.py).
"""

from __future__ import annotations

import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pytest
import requests
from flask import Flask

from cds_service.app import create_app
from cds_service.knowledge.trials import Trial
from tests.fault_server import Behaviour, FaultServer
from tests.smart_launcher import PROVIDER_STANDALONE, SmartLauncher
from tests.worksheet_fixtures import (
    WORKSHEET_CLIENT_ID,
    WORKSHEET_PATIENTS,
    WORKSHEET_PROVIDER,
    ServedWorksheet,
    launch_code,
    worksheet_test_settings,
)

pytestmark = pytest.mark.fhir


class WorksheetPage(HTMLParser):
    """The parts of a worksheet page the tests read: h1, each trial's status and criteria rows."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.h1 = ""
        self.user = ""
        self.trials: dict[str, dict[str, Any]] = {}
        self._trial: str | None = None
        self._row: dict[str, Any] | None = None
        self._cell = ""
        self._in: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        self._in.append(tag)
        if tag == "section" and "trial" in classes:
            self._trial = attributes["id"]
            self.trials[self._trial or ""] = {"status": None, "criteria": {}}
        elif (
            tag == "span"
            and self._trial
            and "status-word" in classes
            and self.trials[self._trial]["status"] is None
        ):
            self.trials[self._trial]["status"] = next(
                c[len("status-") :] for c in classes if c.startswith("status-") and c != "status-word"
            )
        elif tag == "tr" and "criterion" in classes and self._trial:
            result = next(c[len("result-") :] for c in classes if c.startswith("result-"))
            self._row = {"result": result, "evidence": "", "label": ""}
            self.trials[self._trial]["criteria"][attributes["data-criterion"]] = self._row
        elif tag == "td" and self._row is not None:
            self._cell = "result" if "result" in classes else "evidence" if "evidence" in classes else ""

    def handle_endtag(self, tag: str) -> None:
        if self._in:
            self._in.pop()
        if tag == "tr":
            self._row = None
        if tag == "td":
            self._cell = ""
        if tag == "section":
            self._trial = None

    def handle_data(self, data: str) -> None:
        if self._in and self._in[-1] == "h1":
            self.h1 += data
        if (
            self._in
            and self._in[-1] == "strong"
            and not self._trial
            and not self.user
            and "Practitioner" in data
        ):
            self.user = data.strip()
        if self._row is not None and self._cell == "evidence":
            self._row["evidence"] += data
        if self._row is not None and self._cell == "result":
            self._row["label"] += data


def follow(url: str, session: requests.Session | None = None) -> requests.Response:
    """An HTTP client following the launch's redirects (app → launcher → app)."""
    return (session or requests.Session()).get(url, timeout=60)


def heading(response: requests.Response) -> str:
    return WorksheetPage(response.text).h1.strip()


def test_an_ehr_launch_renders_the_worksheet_of_an_eligible_patient(
    worksheet_served: ServedWorksheet, worksheet_patients: dict[str, str]
) -> None:
    screened = {t.id: t for t in worksheet_served.app.extensions["cds"].screener.trials}
    patient = worksheet_patients["ecmo-eligible"]
    response = follow(worksheet_served.launch_url(patient))
    assert response.status_code == 200, response.text[:2000]
    # The launcher does not pass appContext: the worksheet opens on its overview of every trial.
    assert urlsplit(response.url).path == "/worksheet/"
    assert [urlsplit(r.headers["Location"]).path for r in response.history][-1] == "/worksheet/"
    page = WorksheetPage(response.text)
    assert page.h1.strip() == "Screening worksheet: every trial"
    assert page.user == f"Practitioner/{WORKSHEET_PROVIDER}"  # the id_token's fhirUser
    assert set(page.trials) == set(screened)
    ecmo = page.trials["NCT05184296"]
    assert ecmo["status"] == "eligible"
    assert_every_criterion_shown(screened["NCT05184296"], ecmo)
    # The values that decided: VIS and MAP runs, LVEF, with local times and their records.
    evidence = " ".join(c["evidence"] for c in ecmo["criteria"].values())
    assert "VIS > 120 for 7.5 h" in evidence and "LVEF 25%" in evidence and "record: Observation/" in evidence
    assert "MAP < 65 mmHg" in evidence and "today" in evidence
    assert "Europe/Paris" in response.text and f"{patient} Scenario" in response.text  # patient banner
    assert response.headers["Cache-Control"] == "no-store"


def assert_every_criterion_shown(trial: Trial, shown: dict[str, Any]) -> None:
    """Every criterion of the trial file, in its order, each with evidence or a 'to confirm' mark."""
    assert list(shown["criteria"]) == [c.id for c in trial.criteria]
    for criterion_id, row in shown["criteria"].items():
        assert row["result"] in ("met", "not_met", "to_confirm"), (criterion_id, row)
        if row["result"] == "to_confirm":
            assert row["label"].strip() == "To confirm at the bedside", criterion_id
            assert "Bedside checklist: " in row["evidence"], criterion_id
        else:
            assert row["evidence"].strip() and "No evidence recorded" not in row["evidence"], criterion_id


@pytest.mark.parametrize("scenario", sorted(WORKSHEET_PATIENTS))
def test_each_trials_eligible_patient_shows_every_criterion(
    worksheet_served: ServedWorksheet, worksheet_patients: dict[str, str], scenario: str
) -> None:
    trial_id = WORKSHEET_PATIENTS[scenario]
    trial = next(t for t in worksheet_served.app.extensions["cds"].screener.trials if t.id == trial_id)
    session = requests.Session()
    assert follow(worksheet_served.launch_url(worksheet_patients[scenario]), session).status_code == 200
    response = session.get(f"{worksheet_served.url}/worksheet/trials/{trial_id}", timeout=60)
    page = WorksheetPage(response.text)
    assert list(page.trials) == [trial_id] and page.trials[trial_id]["status"] == "eligible"
    assert_every_criterion_shown(trial, page.trials[trial_id])


@pytest.mark.parametrize(
    ("auth_error", "status", "title", "detail"),
    [
        ("auth_invalid_scope", 403, "The EHR did not authorize the worksheet", "invalid_scope"),
        ("auth_invalid_client_id", 403, "The EHR did not authorize the worksheet", "invalid_client"),
        ("auth_invalid_redirect_uri", 403, "The EHR did not authorize the worksheet", "invalid_request"),
        ("token_invalid_token", 403, "The EHR refused to complete the sign-in", "HTTP 401"),
        # Not here: request_invalid_token / request_expired_token. This launcher version puts them in
        # the token answer's `sim_error` only, and its FHIR proxy checks them in backend-service tokens
        # only, so FHIR never refuses; test_worksheet.py covers a FHIR 401 with a fault server.
    ],
)
def test_the_launchers_simulated_errors_give_clear_pages(
    worksheet_served: ServedWorksheet,
    worksheet_patients: dict[str, str],
    auth_error: str,
    status: int,
    title: str,
    detail: str,
) -> None:
    response = follow(worksheet_served.launch_url(worksheet_patients["msc-eligible"], auth_error=auth_error))
    assert response.status_code == status, response.text[:1000]
    assert heading(response) == title
    assert detail in response.text
    assert "Traceback" not in response.text and response.headers["Content-Type"].startswith("text/html")


def test_a_wrong_state_gives_a_clear_page(
    worksheet_served: ServedWorksheet, worksheet_patients: dict[str, str]
) -> None:
    session = requests.Session()
    first = session.get(
        worksheet_served.launch_url(worksheet_patients["msc-eligible"]), allow_redirects=False
    )
    authorize = session.get(first.headers["Location"], allow_redirects=False, timeout=30)
    callback = urlsplit(authorize.headers["Location"])
    query = parse_qs(callback.query)
    assert set(query) == {"code", "state"}
    wrong = urlunsplit(
        callback._replace(query=urlencode({"code": query["code"][0], "state": "forged-state"}))
    )
    response = session.get(wrong, timeout=30)
    assert response.status_code == 400 and heading(response) == "This sign-in could not be completed"
    # The right state still works once, then never again (codes and states are single-use here).
    right = urlunsplit(callback)
    assert session.get(right, timeout=60).status_code == 200
    replay = requests.Session()
    replay.cookies.update(session.cookies)
    assert replay.get(right, timeout=30).status_code == 400


# -- other ways to launch, through the app in process -------------------------------------------------


def launch_in_process(app: Flask, iss: str, launch: str | None) -> tuple[Any, Any]:
    """Drive a launch with the app's test client and the real launcher in between; (client, last)."""
    client = app.test_client()
    query = {"iss": iss} | ({"launch": launch} if launch is not None else {})
    first = client.get("/worksheet/launch", query_string=query)
    assert first.status_code == 302, first.text
    authorize = requests.get(first.headers["Location"], allow_redirects=False, timeout=30)
    assert authorize.status_code in (302, 303), authorize.text
    back = urlsplit(authorize.headers["Location"])
    return client, client.get(back.path, query_string=back.query)


def in_process_app(tmp_path: Path, launcher: SmartLauncher, **worksheet: Any) -> Flask:
    from tests.test_worksheet import worksheet_screener

    settings = worksheet_test_settings(
        tmp_path, "http://127.0.0.1:5000", [f"{launcher.url}/v/r4/"], **worksheet
    )
    return create_app(settings, screener=worksheet_screener(tmp_path))


def test_a_confidential_client_authenticates_with_its_secret(
    smart_launcher: SmartLauncher, worksheet_patients: dict[str, str], tmp_path: Path
) -> None:
    patient = worksheet_patients["imicro-eligible"]
    code = launch_code(
        patient, WORKSHEET_PROVIDER, client_type=1, client_id=WORKSHEET_CLIENT_ID, client_secret="s3cret"
    )
    wrong = in_process_app(tmp_path / "wrong", smart_launcher, client_secret="not-it")
    _, response = launch_in_process(wrong, smart_launcher.fhir_url, code)
    assert response.status_code == 403 and "refused to complete" in response.text
    right = in_process_app(tmp_path / "right", smart_launcher, client_secret="s3cret")
    client, response = launch_in_process(right, smart_launcher.fhir_url, code)
    assert response.status_code == 303 and response.headers["Location"].endswith("/worksheet/")
    assert WorksheetPage(client.get("/worksheet/").text).trials["NCT03788837"]["status"] == "eligible"


def test_smart_v1_scopes_are_a_setting(
    smart_launcher: SmartLauncher, worksheet_patients: dict[str, str], tmp_path: Path
) -> None:
    app = in_process_app(tmp_path, smart_launcher, scope_version="v1")
    client = app.test_client()
    first = client.get(
        "/worksheet/launch",
        query_string={"iss": smart_launcher.fhir_url, "launch": launch_code("x", WORKSHEET_PROVIDER)},
    )
    scope = parse_qs(urlsplit(first.headers["Location"]).query)["scope"][0].split()
    assert "patient/Observation.read" in scope and not any(s.endswith(".rs") for s in scope)
    code = launch_code(worksheet_patients["msc-eligible"], WORKSHEET_PROVIDER)
    client, response = launch_in_process(app, smart_launcher.fhir_url, code)
    assert response.status_code == 303
    assert client.get("/worksheet/").status_code == 200


def test_a_standalone_launch_gets_its_patient_from_the_authorization_server(
    smart_launcher: SmartLauncher, worksheet_patients: dict[str, str], tmp_path: Path
) -> None:
    # The launcher's patient picker needs its built UI; a launch code naming one patient stands in for
    # the user's pick (the authorization server, not the app, chooses the patient either way).
    sim = launch_code(worksheet_patients["msc-eligible"], WORKSHEET_PROVIDER, launch_type=PROVIDER_STANDALONE)
    iss = smart_launcher.sim_fhir_url(sim)
    app = in_process_app(tmp_path, smart_launcher, standalone_iss=iss)
    client = app.test_client()
    first = client.get("/worksheet/launch")  # no iss, no launch: the configured standalone server
    params = parse_qs(urlsplit(first.headers["Location"]).query)
    assert "launch" not in params and "launch/patient" in params["scope"][0].split()
    client, response = launch_in_process(app, iss, None)
    assert response.status_code == 303
    page = WorksheetPage(client.get("/worksheet/").text)
    assert page.trials["NCT01849237"]["status"] == "eligible"


def test_a_fhir_server_too_slow_behind_the_launcher_gives_a_clear_page(
    smart_launcher: SmartLauncher, fault_server: FaultServer, tmp_path: Path
) -> None:
    # One connection per request: node (the launcher) reusing a kept-alive socket of Python's test
    # server now and then meets it closed ("socket hang up", then the launcher's own 500).
    close = {"Connection": "close"}
    fault_server.set(None, Behaviour(headers=close))
    fault_server.set("Observation", Behaviour(delay=5.0, headers=close))
    fault_server.set("Condition", Behaviour(delay=5.0, headers=close))
    # The launch code's fhir_server puts the slow server behind the launcher's FHIR proxy.
    sim = launch_code("slow-patient", WORKSHEET_PROVIDER, fhir_server=fault_server.base_url)
    iss = smart_launcher.sim_fhir_url(sim)
    app = in_process_app(tmp_path, smart_launcher, fhir_deadline_seconds=1.0)
    client, response = launch_in_process(app, iss, sim)
    assert response.status_code == 303
    started = time.monotonic()
    page = client.get("/worksheet/")
    assert time.monotonic() - started < 3.0
    assert page.status_code == 504 and "too slow" in page.text
