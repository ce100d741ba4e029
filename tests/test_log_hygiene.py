"""[security] No token, JWT or patient identifier in the application log, over the full scenario suite.

Every shipped scenario runs through the hook with prefetch and, against the real FHIR server,
without it (so the FHIR client's own logging is exercised), with a bearer token for the FHIR server
and a client JWT; feedback is posted for every card; one call fails with 401 and one with 412.
Every log record is captured and rendered by the production JSON formatter.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cds_service.app import create_app
from cds_service.base.logs import configure_logging
from cds_service.tools.scenarios import all_scenarios
from tests.conftest import SERVICE_URL, CardCheckingClient, hook_body, make_settings

PUBLIC_URL = "http://localhost"
ISSUER = "https://ehr.example.org/cds-client"
FHIR_TOKEN = "fhir-access-token-7c1e5b0d"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    yield stream
    configure_logging("INFO")


def _signer(tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    key = ec.generate_private_key(ec.SECP384R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "client.jwks.json"
    jwks.write_text(json.dumps({"keys": [{**public, "kid": "k1", "use": "sig"}]}))
    security = {"trusted_clients": {ISSUER: {"jwks_file": str(jwks)}}}
    return key, security


def _jwt(key: Any, path: str) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": f"{PUBLIC_URL}{path}",
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, key, algorithm="ES384", headers={"kid": "k1"})


def test_no_secret_or_patient_identifier_is_logged(
    tmp_path: Path, fhir_server: Any, captured: io.StringIO
) -> None:
    key, security = _signer(tmp_path)
    settings = make_settings(
        tmp_path, server={"public_url": PUBLIC_URL}, security=security, fhir={"allow_http": True}
    )
    app = create_app(settings)
    configure_logging("DEBUG", stream=captured)  # create_app configured logging again: capture all
    app.test_client_class = CardCheckingClient
    client = app.test_client()
    now = datetime.now(UTC).replace(microsecond=0)
    scenarios = all_scenarios(now)
    sent_jwts: list[str] = []

    def post(path: str, body: Any) -> Any:
        token = _jwt(key, path)
        sent_jwts.append(token)
        return client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})

    cards = 0
    for scenario in scenarios:
        fhir_server.post_transaction(scenario.bundle())
        try:
            for prefetch in (True, False):
                body = hook_body(
                    scenario.builder, prefetch=prefetch, fhir_server=fhir_server.base_url, token=FHIR_TOKEN
                )
                response = post(SERVICE_URL, body)
                assert response.status_code == 200, (scenario.name, response.data)
                for card in response.get_json()["cards"]:
                    cards += 1
                    feedback = {
                        "feedback": [
                            {
                                "card": card["uuid"],
                                "outcome": "overridden",
                                "outcomeTimestamp": now.isoformat(),
                                "overrideReason": {"userComment": "family declined"},
                            }
                        ]
                    }
                    assert post(f"{SERVICE_URL}/feedback", feedback).status_code == 200
        finally:
            fhir_server.delete_patient_everything(scenario.builder.patient_id)
    assert cards > 0
    # A failing call of each kind, which log their reasons.
    unauthorized = client.post(
        SERVICE_URL, json=hook_body(scenarios[0].builder), headers={"Authorization": "Bearer not.a.valid-jwt"}
    )
    assert unauthorized.status_code == 401
    unreachable = hook_body(
        scenarios[0].builder, prefetch=False, fhir_server="http://127.0.0.1:9/fhir", token=FHIR_TOKEN
    )
    assert post(SERVICE_URL, unreachable).status_code == 412

    log = captured.getvalue()
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert len(records) > 2 * len(scenarios), "the scenario run should have logged"
    assert any(r.get("hook_instance") for r in records), "records carry the hookInstance correlation id"
    assert FHIR_TOKEN not in log
    for token in sent_jwts:
        for segment in token.split("."):
            assert segment not in log
    for scenario in scenarios:
        assert scenario.builder.patient_id not in log, scenario.name
