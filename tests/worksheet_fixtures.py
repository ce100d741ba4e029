"""Session fixtures of the screening worksheet's integration tests (``tests/conftest.py`` star-imports
this module): the SMART launcher in front of the test FHIR server, the scenario patients it serves,
and the service over real HTTP with the worksheet on.

In CI (``CI`` set) a missing node or launcher install fails these tests; elsewhere they skip with
the reason (``tests/infrastructure.py``; ``make test`` installs everything).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from flask import Flask
from werkzeug.serving import make_server

from cds_service.app import create_app
from cds_service.base.config import Settings, load_settings
from cds_service.tools.fhir_server import FhirTestServer, free_port
from cds_service.tools.scenarios import all_scenarios
from tests.browser import Browser, chromium
from tests.infrastructure import needs_infrastructure
from tests.smart_launcher import LAUNCHER_DIR, SmartLauncher, launch_code

__all__ = [
    "WORKSHEET_CLIENT_ID",
    "WORKSHEET_PATIENTS",
    "WORKSHEET_PROVIDER",
    "ServedWorksheet",
    "launch_code",
    "smart_launcher",
    "worksheet_browser",
    "worksheet_patients",
    "worksheet_served",
    "worksheet_test_settings",
]

WORKSHEET_CLIENT_ID = "screening-worksheet"
#: The launcher's practitioner (the user of every launch), loaded into the FHIR server too.
WORKSHEET_PROVIDER = "ws-icu-doc"
#: One eligible patient per trial (scenario name → the trial it is eligible for), loaded under
#: their own ids ("ws-…") so that other tests loading the same scenarios do not disturb them.
WORKSHEET_PATIENTS = {
    "ecmo-eligible": "NCT05184296",
    "imicro-eligible": "NCT03788837",
    "msc-eligible": "NCT01849237",
}


def worksheet_test_settings(
    store_dir: Path,
    public_url: str,
    issuers: list[str],
    *,
    trusted_clients: dict[str, Any] | None = None,
    **worksheet: Any,
) -> Settings:
    """The service with the worksheet on, for the tests (http allowed on loopback). Open CDS mode,
    unless ``trusted_clients`` is given: then the hooks' JWTs are checked, with ``public_url`` as
    their audience."""
    overrides: dict[str, Any] = {
        "store": {"url": f"sqlite:///{store_dir / 'store.sqlite3'}", "hook_timeout_seconds": 5.0},
        "fhir": {"allow_http": True},
        "screening": {"timezone": "Europe/Paris"},
        "worksheet": {
            "enabled": True,
            "public_url": public_url,
            "client_id": WORKSHEET_CLIENT_ID,
            "token_keys": [Fernet.generate_key().decode()],
            "issuers": issuers,
            **worksheet,
        },
    }
    if trusted_clients is not None:
        overrides["server"] = {"public_url": public_url}
        overrides["security"] = {"trusted_clients": trusted_clients}
    return load_settings(environ={}, overrides=overrides)


@pytest.fixture(scope="module")
def worksheet_browser() -> Iterator[Browser]:
    """Debian's Chromium, per module (tests/browser.py)."""
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="session")
def smart_launcher(fhir_server: FhirTestServer) -> Iterator[SmartLauncher]:
    """The SMART Health IT launcher in front of the test FHIR server, for the whole session."""
    needs_infrastructure("Node.js", shutil.which("node") is not None, "install node (the machine's Node.js)")
    needs_infrastructure(
        "the SMART Health IT launcher",
        SmartLauncher.installed(),
        f"run `make npm-tools` (npm ci of ../shared/vendor/smart-launcher-v2 into {LAUNCHER_DIR})",
    )
    launcher = SmartLauncher(fhir_server.base_url)
    atexit.register(launcher.stop)
    try:
        launcher.start()
        yield launcher
    finally:
        launcher.stop()
        with contextlib.suppress(Exception):
            atexit.unregister(launcher.stop)


def _renamed(bundle: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    return json.loads(json.dumps(bundle).replace(old, new))


@pytest.fixture(scope="session")
def worksheet_patients(fhir_server: FhirTestServer) -> Iterator[dict[str, str]]:
    """The eligible scenario patients (times relative to now) and the practitioner, in the FHIR
    server; scenario name → patient id."""
    now = datetime.now(UTC).replace(microsecond=0)
    ids: dict[str, str] = {}
    for scenario in all_scenarios(now):
        if scenario.name in WORKSHEET_PATIENTS:
            new_id = scenario.patient_id.replace("cdsh-", "ws-", 1)
            fhir_server.post_transaction(_renamed(scenario.bundle(), scenario.patient_id, new_id))
            ids[scenario.name] = new_id
    fhir_server.put(
        {
            "resourceType": "Practitioner",
            "id": WORKSHEET_PROVIDER,
            "name": [{"family": "Okafor", "given": ["Ada"], "prefix": ["Dr"]}],
        }
    )
    yield ids
    for patient_id in ids.values():
        with contextlib.suppress(Exception):
            fhir_server.delete_patient_everything(patient_id)


@dataclass
class ServedWorksheet:
    url: str
    app: Flask
    launcher: SmartLauncher

    def launch_url(self, patient_id: str, **code: Any) -> str:
        """The URL an EHR opens for an EHR launch of the worksheet (the launcher's code format)."""
        launch = launch_code(patient_id, WORKSHEET_PROVIDER, **code)
        return f"{self.url}/worksheet/launch?iss={self.launcher.fhir_url}&launch={launch}"


@pytest.fixture(scope="session")
def worksheet_served(
    smart_launcher: SmartLauncher,
    worksheet_patients: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServedWorksheet]:
    """The service over real HTTP (werkzeug, threaded) with the worksheet on, trusting the launcher."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = worksheet_test_settings(
        tmp_path_factory.mktemp("worksheet-served"), url, [f"{smart_launcher.url}/v/r4/"]
    )
    app = create_app(settings)
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="worksheet-test-service", daemon=True)
    thread.start()
    try:
        yield ServedWorksheet(url, app, smart_launcher)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        state = app.extensions["cds"]
        if state._store is not None:
            state._store.close()
