"""docs/deploy.md "Try it with the public CDS Hooks sandbox", followed step by step, acting as the sandbox.

The sandbox is a web page; here the test does what it does, against real pieces on 127.0.0.1:

- the FHIR server is the real one (sekmet, session fixture ``fhir_server``) holding a patient built
  with :class:`PatientBuilder` (septic shock 4 h ago, ANC 0.4 × 10⁹/L 2 h ago: the MSC trial's patient);
- the sandbox's key set is served by a local ``http.server`` thread, and every call is signed with an
  ES384 JWT whose ``jku`` header points at it — the service fetches the keys from there for real;
- the service runs with the guide's configuration (``security.trusted_clients`` with ``jku_allow``,
  ``server.public_url``, ``fhir.allowed_servers``), through the Flask test client.

The sandbox's habits that matter (cds-hooks/sandbox, ``service-exchange.js``): it runs each prefetch
template itself with ``GET {fhirServer}/{query}`` (query values re-encoded with encodeURIComponent),
**leaves out** a key whose query failed, sends ``context.userId`` and ``context.patientId``, and no
``fhirAuthorization`` for an open FHIR server.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from cds_service.app import create_app
from cds_service.tools.fhir_server import FhirTestServer
from cds_service.tools.scenario_builder import PatientBuilder
from tests.conftest import CardCheckingClient, make_settings

PUBLIC_URL = "https://cds.example-hospital.org"  # server.public_url: what the browser calls
SANDBOX_ORIGIN = "https://sandbox.cds-hooks.org"
KID = "sandbox-key-1"
MSC = "NCT01849237"
PATIENT_TOKEN = "{{context.patientId}}"
#: Characters JavaScript's encodeURIComponent leaves as they are.
URI_COMPONENT_SAFE = "-_.!~*'()"

pytestmark = pytest.mark.fhir


# -- the sandbox's key host ------------------------------------------------------------------------


@dataclass
class KeyHost:
    """A local stand-in for the sandbox's own host: serves its JWKS at /.well-known/jwks.json."""

    jwks: bytes = b'{"keys": []}'
    origin: str = ""
    hits: list[str] = field(default_factory=list)

    @property
    def jku(self) -> str:
        return f"{self.origin}/.well-known/jwks.json"


@pytest.fixture
def key_host() -> Iterator[KeyHost]:
    host = KeyHost()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host.hits.append(self.path)
            found = self.path == "/.well-known/jwks.json"
            body = host.jwks if found else b"{}"
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    host.origin = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield host
    finally:
        httpd.shutdown()
        httpd.server_close()


@dataclass
class Sandbox:
    """What the sandbox page holds: its signing key, issuer and key URL, the FHIR server, a patient."""

    key: ec.EllipticCurvePrivateKey
    issuer: str
    jku: str
    fhir_base: str
    patient_id: str
    user_id: str = "Practitioner/sandbox-doc"

    def sign(self, audience: str, **header: Any) -> str:
        """An ES384 JWT as the sandbox makes it: kid + jku header; iss, sub, aud, exp (5 min), iat, jti."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": "48163c5e-88b5-4cb3-92d3-23b800caa927",
            "aud": audience,
            "exp": now + 300,
            "iat": now,
            "jti": str(uuid.uuid4()),
        }
        headers = {"typ": "JWT", "kid": KID, "jku": self.jku, **header}
        return jwt.encode(claims, self.key, algorithm="ES384", headers=headers)

    def fill(self, template: str) -> str:
        """Fill a prefetch template and re-encode its query values like the sandbox (encodeURIComponent)."""
        filled = template.replace(PATIENT_TOKEN, self.patient_id)
        path, _, query = filled.partition("?")
        if not query:
            return path
        pairs = parse_qsl(query, keep_blank_values=True)
        return (
            path + "?" + "&".join(f"{name}={quote(value, safe=URI_COMPONENT_SAFE)}" for name, value in pairs)
        )

    def prefetch(self, templates: dict[str, str], fail: set[str]) -> dict[str, Any]:
        """Run every template against the FHIR server; keys in ``fail`` stand for failed queries: left out."""
        results: dict[str, Any] = {}
        for key, template in templates.items():
            if key in fail:
                continue
            response = requests.get(
                f"{self.fhir_base}/{self.fill(template)}",
                headers={"Accept": "application/json+fhir"},
                timeout=30,
            )
            if response.ok and response.content and response.json():
                results[key] = response.json()
        return results


# -- the guide's configuration ----------------------------------------------------------------------


@pytest.fixture
def sandbox(key_host: KeyHost, fhir_server: FhirTestServer, now: datetime) -> Sandbox:
    key = ec.generate_private_key(ec.SECP384R1())
    public = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    key_host.jwks = json.dumps({"keys": [{**public, "kid": KID, "alg": "ES384", "use": "sig"}]}).encode()
    # The guide's synthetic patient: septic shock 4 h ago (norepinephrine, lactate 4.2), ANC 0.4 2 h ago.
    builder = PatientBuilder(f"sandbox-{uuid.uuid4().hex[:10]}", now, age=52, gender="male")
    builder.septic_shock_story(onset_hours=4)
    builder.anc(0.4, hours=2)
    fhir_server.put_all(builder.all_resources())
    return Sandbox(key, key_host.origin, key_host.jku, fhir_server.base_url, builder.patient_id)


@pytest.fixture
def app(tmp_path: Path, sandbox: Sandbox) -> Iterator[Flask]:
    settings = make_settings(
        tmp_path,
        server={"public_url": PUBLIC_URL},
        # Trust the sandbox: its issuer, and keys only from its own host's JWKS (jku_allow).
        security={"trusted_clients": {sandbox.issuer: {"jku_allow": [sandbox.jku]}}},
        # Send nothing to any FHIR server but the sandbox's (http here: a local test server).
        fhir={"allowed_servers": [sandbox.fhir_base], "allow_http": True},
    )
    application = create_app(settings)
    application.test_client_class = CardCheckingClient
    yield application
    state = application.extensions["cds"]
    if state._client is not None:
        state._client.close()
    if state._store is not None:
        state._store.close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def test_the_sandbox_guide_step_by_step(
    client: FlaskClient, app: Flask, sandbox: Sandbox, key_host: KeyHost, now: datetime
) -> None:
    origin = {"Origin": SANDBOX_ORIGIN}
    assert client.get("/health").get_json()["auth"] == "jwt"

    # Step 1 — discovery: the sandbox GETs ?serviceDiscoveryURL= (it signs it too; discovery is public).
    discovery_url = f"{PUBLIC_URL}/cds-services"
    response = client.get(
        "/cds-services", headers={**origin, "Authorization": f"Bearer {sandbox.sign(discovery_url)}"}
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] in ("*", SANDBOX_ORIGIN)
    (service,) = [s for s in response.get_json()["services"] if s["hook"] == "patient-view"]
    templates: dict[str, str] = service["prefetch"]
    assert templates and all(PATIENT_TOKEN in t for t in templates.values())
    path = f"/cds-services/{service['id']}"

    # Step 2 — the browser's CORS preflight before the signed POST.
    preflight = client.options(
        path,
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200
    assert {"authorization", "content-type"} <= {
        h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")
    }

    # Step 3 — the sandbox runs each prefetch template against ?fhirServiceUrl=; one query "fails"
    # and is left out (partial prefetch): the service must fetch that one itself from fhirServer.
    left_out = "medicationAdministrations"
    assert left_out in templates
    prefetch = sandbox.prefetch(templates, fail={left_out})
    assert left_out not in prefetch and prefetch["patient"]["id"] == sandbox.patient_id
    assert any(
        e["resource"]["code"]["coding"][0]["code"] == "751-8"
        for e in prefetch["observations"].get("entry", [])
    ), "the sandbox-style re-encoded Observation query found the ANC"

    # Step 4 — the hook call, signed with ES384 + jku; aud = public_url + the service path.
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": sandbox.fhir_base,
        "context": {"userId": sandbox.user_id, "patientId": sandbox.patient_id},
        "prefetch": prefetch,
    }
    token = sandbox.sign(f"{PUBLIC_URL}{path}")
    response = client.post(path, json=body, headers={**origin, "Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Access-Control-Allow-Origin"] in ("*", SANDBOX_ORIGIN)
    assert key_host.hits == ["/.well-known/jwks.json"], "keys are fetched from the jku, once"
    cards = [c for c in response.get_json()["cards"] if c["source"]["topic"]["code"] == MSC]
    assert len(cards) == 1, response.get_json()
    card = cards[0]
    assert MSC in card["summary"] and "ANC 0.4" in card["summary"]
    assert card["indicator"] in ("info", "warning")
    assert all("appContext" not in link for link in card.get("links", []) if link.get("type") == "absolute")

    # The left-out key was fetched by the service (MedicationAdministration: the norepinephrine).
    fhir_queries = {
        sample.labels["resource_type"]: sample.value
        for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
        for sample in family.samples
        if sample.name == "cds_fhir_query_seconds_count"
    }
    assert fhir_queries == {"MedicationAdministration": 1.0}

    # The same token again is refused (replay cache); so is a jku off the allow-list, never fetched.
    again = client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
    assert again.status_code == 401
    forged = sandbox.sign(f"{PUBLIC_URL}{path}", jku=f"{key_host.origin}/elsewhere/jwks.json")
    assert client.post(path, json=body, headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    assert key_host.hits == ["/.well-known/jwks.json"]

    # Step 5 — feedback on the card, signed for the feedback URL.
    feedback = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {"reason": {"code": "already-enrolled", "display": "Already enrolled"}},
                "outcomeTimestamp": now.isoformat(),
            }
        ]
    }
    feedback_token = sandbox.sign(f"{PUBLIC_URL}{path}/feedback")
    response = client.post(
        f"{path}/feedback", json=feedback, headers={**origin, "Authorization": f"Bearer {feedback_token}"}
    )
    assert response.status_code == 200
    stored = app.extensions["cds"].store.feedback_for_card(card["uuid"])
    assert [f.outcome for f in stored] == ["overridden"]
    # A feedback token is bound to the feedback URL: the hook's token (new jti) does not fit it.
    wrong = sandbox.sign(f"{PUBLIC_URL}{path}")
    response = client.post(f"{path}/feedback", json=feedback, headers={"Authorization": f"Bearer {wrong}"})
    assert response.status_code == 401
