"""Stretch: a card's worksheet link, end to end from the public CDS Hooks sandbox.

The built sandbox (``../shared/vendor/cds-hooks-sandbox/build/``) runs in Debian's Chromium with the
SMART launcher's FHIR base as its FHIR server; the service checks the sandbox's real ES384 tokens
with its key pinned (docs/security.md, "sandbox-offline"). What this shows (docs/worksheet.md):

1. With the launcher's own FHIR base the sandbox reads the patient, runs the prefetch through the
   launcher's FHIR proxy, calls the service and renders the card with its "Open the screening
   worksheet" button — but the button cannot launch: the sandbox first asks the FHIR server for a
   launch context (``POST …/_services/smart/Launch``), which the launcher does not have (404).
2. With that one piece added in front of the launcher (``tests/ehr_launch_context.py``, standing in
   for an EHR's launch-context service, which also returns the card's ``appContext`` in the token
   answer as CDS Hooks 2.0 says an EHR does), the button opens the worksheet in a new tab, signed in
   as the launcher's practitioner, on the trial the card was about.

In CI this test runs, never skips.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from cds_service.app import create_app
from cds_service.tools.fhir_server import free_port
from tests.browser import sandbox_trusted_client, served_sandbox
from tests.ehr_launch_context import LaunchContextProxy
from tests.smart_launcher import SmartLauncher
from tests.worksheet_fixtures import WORKSHEET_PROVIDER, worksheet_test_settings

try:
    from playwright.sync_api import Browser
except ImportError:  # pragma: no cover - the browser fixture reports it
    Browser = Any  # type: ignore[assignment,misc]

pytestmark = pytest.mark.fhir

IMICRO = "NCT03788837"
SERVICE_ID = "septic-shock-trial-screening"


@pytest.fixture(scope="module")
def sandbox_url() -> Iterator[str]:
    with served_sandbox() as url:
        yield url


@pytest.fixture(scope="module")
def launch_context(smart_launcher: SmartLauncher) -> Iterator[LaunchContextProxy]:
    proxy = LaunchContextProxy(smart_launcher, WORKSHEET_PROVIDER)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def service(
    smart_launcher: SmartLauncher,
    launch_context: LaunchContextProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Flask]]:
    """The service over HTTP, trusting both the launcher and the launch-context proxy as issuers, and
    the sandbox's hook calls with its public key pinned (docs/security.md's "sandbox-offline")."""
    trusted_clients = sandbox_trusted_client()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = worksheet_test_settings(
        tmp_path_factory.mktemp("worksheet-sandbox"),
        url,
        [f"{smart_launcher.url}/v/r4/", f"{launch_context.origin}/v/r4/"],
        trusted_clients=trusted_clients,
    )
    app = create_app(settings)
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield url, app
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        state = app.extensions["cds"]
        if state._store is not None:
            state._store.close()


def open_sandbox(
    browser: Browser, sandbox_url: str, service_url: str, fhir: str, patient: str
) -> tuple[Any, Any]:
    """The sandbox on the patient (its localStorage keys, then its URL); waits for the card and for
    its SMART link's launch-context request. Returns (page, that request's response)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(
        f"localStorage.setItem('PERSISTED_fhirServer', {json.dumps(fhir)});"
        f"localStorage.setItem('PERSISTED_patientId', {json.dumps(patient)});"
        "localStorage.setItem('PERSISTED_hook', 'patient-view');"
    )
    page = context.new_page()
    with page.expect_response(
        lambda r: r.url.endswith("/_services/smart/Launch") and r.request.method == "POST", timeout=60_000
    ) as launch:
        page.goto(
            f"{sandbox_url}/index.html?serviceDiscoveryURL={service_url}/cds-services&hook=patient-view"
        )
    page.locator(".MuiCard-root").first.wait_for()
    return page, launch.value


def test_the_sandboxs_smart_link_needs_a_launch_context_the_launcher_lacks(
    worksheet_browser: Browser,
    sandbox_url: str,
    service: tuple[str, Flask],
    smart_launcher: SmartLauncher,
    worksheet_patients: dict[str, str],
) -> None:
    page, launch = open_sandbox(
        worksheet_browser,
        sandbox_url,
        service[0],
        smart_launcher.fhir_url,
        worksheet_patients["imicro-eligible"],
    )
    try:
        assert launch.status == 404  # the launcher's FHIR proxy has no launch-context service
        card = page.locator(".MuiCard-root").filter(has_text=IMICRO).first
        assert card.get_by_role("button", name="Open the screening worksheet").is_visible()
    finally:
        page.context.close()


def test_a_cards_worksheet_link_opens_the_worksheet_on_its_trial_from_the_sandbox(
    worksheet_browser: Browser,
    sandbox_url: str,
    service: tuple[str, Flask],
    launch_context: LaunchContextProxy,
    worksheet_patients: dict[str, str],
    tmp_path: Path,
) -> None:
    patient = worksheet_patients["imicro-eligible"]
    page, launch = open_sandbox(worksheet_browser, sandbox_url, service[0], launch_context.fhir_url, patient)
    try:
        assert launch.status == 200
        sent = launch_context.requests[-1]
        assert sent["launchUrl"] == f"{service[0]}/worksheet/launch"
        assert sent["parameters"]["patient"] == patient
        assert json.loads(sent["parameters"]["appContext"]) == {"trial": IMICRO}  # the card's appContext
        card = page.locator(".MuiCard-root").filter(has_text=IMICRO).first
        with page.context.expect_page() as opened:
            card.get_by_role("button", name="Open the screening worksheet").click()
        worksheet = opened.value
        worksheet.wait_for_url(f"**/worksheet/trials/{IMICRO}", timeout=60_000)
        assert worksheet.locator("h1").inner_text() == f"I-MICRO ({IMICRO}): screening worksheet"
        assert f"Practitioner/{WORKSHEET_PROVIDER}" in worksheet.locator(".user-bar").inner_text()
        assert "Eligible" in worksheet.locator("section.trial h2").first.inner_text()
    finally:
        page.context.close()
