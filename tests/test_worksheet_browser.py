"""The screening worksheet in a real browser: Debian's Chromium driven by Playwright for Python
(``make test`` installs both; Playwright's own browser download is never used), launched from the
SMART Health IT launcher in front of the test FHIR server, with the service over real HTTP.

- A clinician, with the keyboard only, ticks a bedside checklist item and records "referred". Then:
  the screening log has the row, its user is the launcher's practitioner (the id_token's
  fhirUser), and the next hook for that patient is silent for that trial (and only that one).
- axe-core (npm, ``tests/npm``) finds no serious or critical violation on the worksheet's pages.
- The pages hold under their strict Content-Security-Policy (no violation reported) and print
  without the buttons.
- Screenshots of one eligible patient per trial go to ``test-artifacts/worksheet/`` (git-ignored);
  ``CDS_DOC_SCREENSHOTS=1`` also refreshes the ones docs/worksheet.md shows (``docs/worksheet/``).

In CI (``CI`` set) this test runs, never skips: missing Chromium, Playwright, node or the launcher
fail it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import pytest
import requests

from cds_service.base.config import PROJECT_ROOT
from cds_service.store import export_screening_csv
from cds_service.tools.fhir_server import FhirTestServer
from tests.conftest import SERVICE_URL, hook_body
from tests.infrastructure import needs_infrastructure
from tests.worksheet_fixtures import WORKSHEET_PATIENTS, WORKSHEET_PROVIDER, ServedWorksheet

try:  # the dev extra installs it; missing, the worksheet_browser fixture fails in CI, skips elsewhere
    from playwright.sync_api import Browser, ConsoleMessage, Page
except ImportError:  # pragma: no cover
    Browser = ConsoleMessage = Page = Any  # type: ignore[assignment,misc]

pytestmark = pytest.mark.fhir

AXE = PROJECT_ROOT / ".cache" / "test-npm" / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "worksheet"
DOC_SCREENSHOTS = PROJECT_ROOT / "docs" / "worksheet"
ECMO, IMICRO = "NCT05184296", "NCT03788837"


@pytest.fixture(scope="module")
def axe_source() -> str:
    needs_infrastructure(f"axe-core at {AXE}", AXE.is_file(), "run `make npm-tools` (npm ci of tests/npm)")
    return AXE.read_text(encoding="utf-8")


class Tab:
    """A browser tab on the worksheet that remembers what the console said (CSP violations)."""

    def __init__(self, browser: Browser) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
        self.page: Page = self.context.new_page()
        self.console: list[str] = []
        self.page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.console.append(message.text)

    def close(self) -> None:
        self.context.close()


def accessibility_problems(page: Page, axe_source: str) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page (WCAG 2.x A/AA and best practice)."""
    page.evaluate(axe_source)  # run by the DevTools protocol: not blocked by the page's CSP
    results = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]}
        for v in results["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    if os.environ.get("CDS_DOC_SCREENSHOTS") == "1":
        DOC_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOC_SCREENSHOTS / f"{name}.png"), full_page=True)


def hook(served: ServedWorksheet, fhir: FhirTestServer, patient_id: str) -> dict[str, dict[str, Any]]:
    """The cards of a patient-view hook (fetch mode: the service reads the FHIR server), by trial."""
    body = hook_body(patient_id=patient_id, prefetch=False, fhir_server=fhir.base_url)
    response = requests.post(f"{served.url}{SERVICE_URL}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return {card["extension"]["screening"]["trial"]: card for card in response.json()["cards"]}


def test_a_referral_recorded_in_chromium_is_logged_with_the_user_and_silences_that_trials_cards(
    worksheet_browser: Browser,
    axe_source: str,
    worksheet_served: ServedWorksheet,
    worksheet_patients: dict[str, str],
    fhir_server: FhirTestServer,
) -> None:
    patient = worksheet_patients["ecmo-eligible"]
    before = hook(worksheet_served, fhir_server, patient)
    assert {ECMO, IMICRO} <= set(before)
    # The card links to the worksheet (SMART, appContext naming the trial) and carries the count only.
    link = next(link for link in before[ECMO]["links"] if link["label"] == "Open the screening worksheet")
    assert link == {
        "label": "Open the screening worksheet",
        "url": f"{worksheet_served.url}/worksheet/launch",
        "type": "smart",
        "appContext": json.dumps({"trial": ECMO}, separators=(",", ":")),
    }
    assert "in the screening worksheet" in before[ECMO]["detail"] and "☐" not in before[ECMO]["detail"]

    tab = Tab(worksheet_browser)
    try:
        page = tab.page
        page.goto(worksheet_served.launch_url(patient))
        page.wait_for_url("**/worksheet/")
        assert page.locator("h1").inner_text() == "Screening worksheet: every trial"
        assert accessibility_problems(page, axe_source) == []
        page.get_by_role("link", name=f"ECMO-RESCUE ({ECMO})").click()
        page.wait_for_url(f"**/worksheet/trials/{ECMO}")
        assert accessibility_problems(page, axe_source) == []

        # Keyboard only: tick a checklist item with Space, record the referral with Enter.
        item = page.get_by_label(
            "Informed consent from the patient or the person with decisional responsibility"
        )
        item.focus()
        page.keyboard.press("Space")
        assert item.is_checked()
        page.get_by_role("button", name="Referred to the research team").focus()
        page.keyboard.press("Enter")
        page.wait_for_url(f"**/worksheet/trials/{ECMO}?recorded=referred")
        assert page.get_by_role("status").inner_text() == "Recorded: Referred to the research team."
        assert page.get_by_label("Informed consent from the patient", exact=False).is_checked()  # kept
        assert f"by Practitioner/{WORKSHEET_PROVIDER}: Referred to the research team" in page.inner_text(
            ".last-record"
        )
        assert accessibility_problems(page, axe_source) == []

        # Printing drops the controls; the criteria and the checklist stay.
        page.emulate_media(media="print")
        assert not page.locator(".buttons").first.is_visible()
        assert page.locator("table.criteria").first.is_visible()
        page.emulate_media(media="screen")
        assert tab.console == [], tab.console  # no CSP violation, no error
    finally:
        tab.close()

    # 1. The screening log has the row: who, when, what, and the checklist item confirmed.
    store = worksheet_served.app.extensions["cds"].store
    rows = [
        r for r in store.screening_log(trial_id=ECMO) if r.patient_id == patient and r.source == "worksheet"
    ]
    assert len(rows) == 1
    row = rows[0]
    assert (row.outcome, row.reason, row.status) == ("accepted", "Referred to the research team", "eligible")
    # 2. The user is the launcher's practitioner.
    assert row.recorded_by == f"Practitioner/{WORKSHEET_PROVIDER}"
    assert row.checklist_confirmed == ["informed_consent"]
    screener = worksheet_served.app.extensions["cds"].screener
    trial = next(t for t in screener.trials if t.id == ECMO)
    assert (row.trial_version, row.mappings_version) == (trial.version, screener.knowledge.version)
    exported = io.StringIO(newline="")
    export_screening_csv([row], exported)
    line = next(csv.DictReader(io.StringIO(exported.getvalue())))
    assert (line["source"], line["recorded_by"], line["checklist_confirmed"], line["outcome"]) == (
        "worksheet",
        f"Practitioner/{WORKSHEET_PROVIDER}",
        "informed_consent",
        "accepted",
    )
    # 3. The next hook is silent for that trial, and only that one.
    after = hook(worksheet_served, fhir_server, patient)
    assert ECMO not in after and IMICRO in after


@pytest.mark.parametrize("scenario", sorted(WORKSHEET_PATIENTS))
def test_each_trials_worksheet_is_accessible_and_kept_as_a_screenshot(
    worksheet_browser: Browser,
    axe_source: str,
    worksheet_served: ServedWorksheet,
    worksheet_patients: dict[str, str],
    scenario: str,
) -> None:
    trial_id = WORKSHEET_PATIENTS[scenario]
    tab = Tab(worksheet_browser)
    try:
        page = tab.page
        page.goto(worksheet_served.launch_url(worksheet_patients[scenario]))
        page.wait_for_url("**/worksheet/")
        page.goto(f"{worksheet_served.url}/worksheet/trials/{trial_id}")
        assert "Eligible" in page.locator("section.trial h2").first.inner_text()
        assert accessibility_problems(page, axe_source) == []
        screenshot(page, f"{trial_id}-{scenario}")
        assert tab.console == [], tab.console
    finally:
        tab.close()


def test_an_error_page_is_accessible(
    worksheet_browser: Browser, axe_source: str, worksheet_served: ServedWorksheet
) -> None:
    tab = Tab(worksheet_browser)
    try:
        response = tab.page.goto(f"{worksheet_served.url}/worksheet/")
        assert response is not None and response.status == 401
        assert tab.page.locator("h1").inner_text() == "No worksheet session"
        assert accessibility_problems(tab.page, axe_source) == []
    finally:
        tab.close()
