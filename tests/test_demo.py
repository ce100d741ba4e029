"""`make demo` (cds_service/tools/demo.py): what it configures and prints. Running it for real, with
Ctrl-C, is tests/test_quick_start.py; bad ports and a taken port are tests/test_cli_errors.py."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from cds_service.base.config import load_settings
from cds_service.patient_data.fhir_client import FhirClient, ServerNotAllowed
from cds_service.patient_data.hook_request import parse_hook_request
from cds_service.tools.demo import DEMO_PATIENT, DemoAddresses, demo_hook_request, demo_settings, sandbox_url
from cds_service.tools.scenarios import all_scenarios


def test_defaults_are_the_addresses_the_harness_and_docs_use() -> None:
    addresses = DemoAddresses()
    assert addresses.service == "http://127.0.0.1:8080"
    assert addresses.fhir == "http://127.0.0.1:8090/fhir"
    makefile = (Path(__file__).parent.parent / "Makefile").read_text(encoding="utf-8")
    assert "PORT ?= 8080" in makefile and "FHIR_PORT ?= 8090" in makefile
    assert "SERVICE ?= http://127.0.0.1:$(PORT)" in makefile
    assert "FHIR ?= http://127.0.0.1:$(FHIR_PORT)/fhir" in makefile


def test_the_service_may_read_only_the_demo_fhir_server_over_plain_http(tmp_path: Path) -> None:
    addresses = DemoAddresses(18080, 18090)
    config = tmp_path / "config.yaml"
    config.write_text(demo_settings(addresses, tmp_path, workers=2), encoding="utf-8")
    settings = load_settings(config, environ={})
    assert settings.section("server")["host"] == "127.0.0.1" and settings.section("server")["port"] == 18080
    fhir = settings.section("fhir")
    assert fhir["allowed_servers"] == ["http://127.0.0.1:18090/fhir"] and fhir["allow_http"] is True
    assert settings.section("store")["url"] == f"sqlite:///{tmp_path / 'store.sqlite3'}"  # fresh store
    assert yaml.safe_load(config.read_text())["security"]["trusted_clients"] == {}
    client = FhirClient(fhir)
    client.check_server("http://127.0.0.1:18090/fhir")
    for other in ("http://127.0.0.1:8090/fhir", "http://example.org/fhir", "https://example.org/fhir"):
        with pytest.raises(ServerNotAllowed):
            client.check_server(other)


def test_the_printed_request_is_a_valid_hook_call_for_a_scenario_patient() -> None:
    body = demo_hook_request(DemoAddresses())
    request = parse_hook_request(body, "patient-view")
    assert request.patient_id == DEMO_PATIENT and request.fhir_server == "http://127.0.0.1:8090/fhir"
    assert "prefetch" not in body  # the service fetches: the demo shows the FHIR path
    scenario = {s.patient_id: s for s in all_scenarios(datetime.now(UTC))}[DEMO_PATIENT]
    assert scenario.expected["NCT01849237"] == "eligible"


def test_the_sandbox_url_names_discovery_fhir_server_patient_and_hook() -> None:
    url = sandbox_url(DemoAddresses())
    parts = urlsplit(url)
    assert parts.netloc == "sandbox.cds-hooks.org"
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query == {
        "serviceDiscoveryURL": "http://127.0.0.1:8080/cds-services",
        "fhirServiceUrl": "http://127.0.0.1:8090/fhir",
        "patientId": DEMO_PATIENT,
        "hook": "patient-view",
    }
