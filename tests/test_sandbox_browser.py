"""The cards in a real CDS client: the public CDS Hooks sandbox in Debian's Chromium.

The built sandbox (``../shared/vendor/cds-hooks-sandbox/build/``, see ``../shared/vendor/README.md``)
is served statically on 127.0.0.1 and driven with Playwright for Python, using ``/usr/bin/chromium``
(``make test`` installs Debian's ``chromium`` with apt; Playwright's own browser download is never
used). The sandbox is pointed at the real test FHIR server (sekmet), loaded with scenario patients,
and at the service served over HTTP. It calls discovery, runs the prefetch templates against the FHIR
server itself, calls the hook and renders the cards; a click on the suggestion posts feedback.

The sandbox signs its calls with a key whose ``jku`` is on its public host, unreachable here: the
service trusts it with the build's public key pinned (docs/security.md, "sandbox-offline"), so the
cards show only when the sandbox's real tokens verify.

For one eligible patient of each trial, and one possibly eligible: the cards render with their
summary, the suggestion button and the links, in the service's one order, each no taller than a
side panel should scroll; for the eligible ones a click on the suggestion posts feedback that the
service records as a referral. Every card is kept as a screenshot in ``test-artifacts/sandbox/``
(git-ignored). ``CDS_DOC_SCREENSHOTS=1`` also refreshes the ones docs/cards.md shows (``docs/cards/``).
In CI (``CI`` set) this test runs, never skips: missing Chromium, Playwright or the sandbox fail it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from cds_service.app import create_app
from cds_service.base.config import PROJECT_ROOT
from cds_service.cards.render import STATUS_ORDER
from cds_service.tools.fhir_server import FhirTestServer, free_port
from cds_service.tools.scenarios import ECMO, IMICRO, MSC, Scenario, all_scenarios
from tests.browser import chromium, sandbox_trusted_client, served_sandbox
from tests.conftest import make_settings

try:  # the dev extra installs it; missing, the browser fixture fails in CI and skips elsewhere
    from playwright.sync_api import Browser, Page
except ImportError:  # pragma: no cover - tests/browser.py reports it
    Browser = Page = Any  # type: ignore[assignment,misc]

pytestmark = pytest.mark.fhir

ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "sandbox"
DOC_SCREENSHOTS = PROJECT_ROOT / "docs" / "cards"
SERVICE_ID = "septic-shock-trial-screening"
#: The patients shown: one eligible and one possibly eligible for each trial.
PATIENTS = {
    "ecmo-eligible": (ECMO, "eligible"),
    "imicro-eligible": (IMICRO, "eligible"),
    "msc-eligible": (MSC, "eligible"),
    "ecmo-lvef-missing": (ECMO, "possibly_eligible"),
    "imicro-refill-normal-mottling-missing": (IMICRO, "possibly_eligible"),
    "msc-anc-missing": (MSC, "possibly_eligible"),
}
#: A card a clinician reads in a side panel, at the sandbox's width (its 4 200 px ECMO card was the bug).
MAX_CARD_HEIGHT_PX = 1000


@pytest.fixture(scope="module")
def patients(fhir_server: FhirTestServer) -> Iterator[dict[str, Scenario]]:
    now = datetime.now(UTC).replace(microsecond=0)
    chosen = {s.name: s for s in all_scenarios(now) if s.name in PATIENTS}
    for scenario in chosen.values():
        fhir_server.post_transaction(scenario.bundle())
    yield chosen
    for scenario in chosen.values():
        fhir_server.delete_patient_everything(scenario.patient_id)


@dataclass
class Service:
    url: str
    app: Flask


@pytest.fixture(scope="module")
def service(fhir_server: FhirTestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service over real HTTP (werkzeug, threaded) on a free 127.0.0.1 port, trusting the sandbox
    offline as docs/security.md says: its public key pinned (the jku's host is unreachable here), so
    every call the sandbox makes is a verified ES384 JWT. Times in a zone with an offset, as a site
    would set it."""
    trusted_clients = sandbox_trusted_client()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = make_settings(
        tmp_path_factory.mktemp("sandbox-browser"),
        server={"public_url": url},
        security={"trusted_clients": trusted_clients},
        fhir={"allow_http": True, "allowed_servers": [fhir_server.base_url]},
        screening={"timezone": "Europe/Paris"},
    )
    app = create_app(settings)
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="sandbox-test-service", daemon=True)
    thread.start()
    try:
        yield Service(url, app)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        state = app.extensions["cds"]
        if state._store is not None:
            state._store.close()


@pytest.fixture(scope="module")
def sandbox_url() -> Iterator[str]:
    with served_sandbox() as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


# -- driving the sandbox ---------------------------------------------------------------------------


@dataclass
class Rendered:
    """What the sandbox showed for one patient, beside what the service answered it."""

    page: Page
    response: dict[str, Any]  # the hook's JSON, as the sandbox received it
    cards: list[Any]  # the card elements, in the order on screen


def open_patient(
    browser: Browser, sandbox_url: str, service: Service, fhir: str, patient_id: str
) -> Rendered:
    """Point the sandbox at the FHIR server and the patient, open it with the service's discovery URL,
    and wait for the cards (../shared/vendor/README.md: the localStorage keys, then the URL)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    # The sandbox reads these keys at start-up: set them before its scripts run (one page load).
    context.add_init_script(
        f"localStorage.setItem('PERSISTED_fhirServer', {json.dumps(fhir)});"
        f"localStorage.setItem('PERSISTED_patientId', {json.dumps(patient_id)});"
        "localStorage.setItem('PERSISTED_hook', 'patient-view');"
    )
    page = context.new_page()
    hook_url = f"{service.url}/cds-services/{SERVICE_ID}"
    with page.expect_response(
        lambda r: r.url == hook_url and r.request.method == "POST", timeout=60_000
    ) as hook:
        page.goto(
            f"{sandbox_url}/index.html?serviceDiscoveryURL={service.url}/cds-services&hook=patient-view"
        )
    assert hook.value.status == 200, hook.value.text()
    body = hook.value.json()
    count = len(body["cards"])
    page.wait_for_function(
        "n => document.querySelectorAll('.MuiCard-root').length >= n", arg=count, timeout=30_000
    )
    return Rendered(page, body, page.query_selector_all(".MuiCard-root"))


def shoot(element: Any, name: str, *, in_docs: bool = False) -> Path:
    """A screenshot of one card in test-artifacts/; with CDS_DOC_SCREENSHOTS=1 the ones docs/cards.md
    shows (``in_docs``) are copied to docs/cards/ as well."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    element.screenshot(path=str(path))
    if in_docs and os.environ.get("CDS_DOC_SCREENSHOTS") == "1":
        DOC_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOC_SCREENSHOTS / path.name)
    return path


@pytest.mark.parametrize("name", list(PATIENTS))
def test_the_sandbox_renders_the_cards_in_order_and_records_the_suggestion_click(
    browser: Browser,
    sandbox_url: str,
    service: Service,
    fhir_server: FhirTestServer,
    patients: dict[str, Scenario],
    name: str,
) -> None:
    trial, status = PATIENTS[name]
    scenario = patients[name]
    shown = open_patient(browser, sandbox_url, service, fhir_server.base_url, scenario.patient_id)
    try:
        cards = shown.response["cards"]
        screenings = [c["extension"]["screening"] for c in cards]
        # The trial's card says what the scenario expects, in its machine-readable result.
        assert [s["status"] for s in screenings if s["trial"] == trial] == [status]
        # Every card the service sent is on screen, in the service's order — the one order.
        assert len(shown.cards) == len(cards)
        trials = {t.id: t for t in service.app.extensions["cds"].screener.trials}
        keys = [
            (
                STATUS_ORDER[s["status"]],
                not trials[s["trial"]].recruiting,
                s["window"]["closes"] or "~",
                s["trial"],
            )
            for s in screenings
        ]
        assert keys == sorted(keys), keys
        for card, element in zip(cards, shown.cards, strict=True):
            text = element.inner_text()
            where = (name, card["extension"]["screening"]["trial"])
            assert " ".join(card["summary"].split()) in " ".join(text.split()), (where, text)
            suggestion = element.query_selector_all("button.MuiButton-contained")
            assert [b.inner_text().strip() for b in suggestion] == ["Refer to the research team"], where
            link_buttons = [
                b.inner_text().strip() for b in element.query_selector_all("button.MuiButton-text")
            ]
            assert [link["label"] for link in card["links"]] == link_buttons[: len(card["links"])], where
            box = element.bounding_box()
            assert box is not None and box["height"] <= MAX_CARD_HEIGHT_PX, (where, box)
            shown_trial = card["extension"]["screening"]["trial"]
            shoot(element, f"{name}--{shown_trial}", in_docs=shown_trial == trial)
        shown.page.screenshot(path=str(ARTIFACTS / f"{name}--page.png"), full_page=True)
        if name == "ecmo-eligible":
            # The example: the recruiting trial's eligible card above the completed trial's.
            assert [s["trial"] for s in screenings] == [ECMO, IMICRO]
            assert [c["suggestions"][0]["isRecommended"] for c in cards] == [True, False]
        if status == "eligible":
            (index,) = [i for i, s in enumerate(screenings) if s["trial"] == trial]
            assert_click_records_the_referral(shown, service, cards[index], shown.cards[index], scenario)
    finally:
        shown.page.context.close()


def assert_click_records_the_referral(
    shown: Rendered, service: Service, card: dict[str, Any], element: Any, scenario: Scenario
) -> None:
    """Clicking the suggestion makes the sandbox post feedback, which the service records."""
    feedback_url = f"{service.url}/cds-services/{SERVICE_ID}/feedback"
    with shown.page.expect_response(lambda r: r.url == feedback_url and r.request.method == "POST") as posted:
        element.query_selector("button.MuiButton-contained").click()
    assert posted.value.status == 200
    sent = json.loads(posted.value.request.post_data or "{}")
    assert [(f["card"], f["outcome"]) for f in sent["feedback"]] == [(card["uuid"], "accepted")]
    store = service.app.extensions["cds"].store
    assert [f.outcome for f in store.feedback_for_card(card["uuid"])] == ["accepted"]
    trial = card["extension"]["screening"]["trial"]
    (row,) = [r for r in store.screening_log(trial_id=trial) if r.card_uuid == card["uuid"]]
    assert row.outcome == "accepted" and row.reason == "Referred to the research team"
    assert row.patient_id == scenario.patient_id
