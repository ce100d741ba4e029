"""The public CDS Hooks sandbox, trusted offline with its public key pinned.

The sandbox signs every call with an ES384 JWT whose ``jku`` is on its public host, unreachable
here. Tokens are signed exactly as the vendored sandbox build signs them (its key, ``kid``, ``jku``
and claims, read from ``app.bundle.js`` by :mod:`cds_service.tools.sandbox_client`), and the
service is configured with docs/security.md's "sandbox-offline" block, the key file pointing at the
build's ``.well-known/jwks.json``.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask.testing import FlaskClient

from cds_service.app import create_app
from cds_service.base.config import PROJECT_ROOT
from cds_service.tools.sandbox_client import SANDBOX_BUILD, SandboxBuildError, SandboxSigner
from cds_service.tools.scenario_builder import PatientBuilder
from tests.conftest import SERVICE_URL, CardCheckingClient, hook_body, make_settings
from tests.infrastructure import needs_infrastructure

PUBLIC_URL = "https://cds.example-hospital.org"
MSC = "NCT01849237"


@pytest.fixture(scope="module")
def signer() -> SandboxSigner:
    try:
        return SandboxSigner.from_build(SANDBOX_BUILD)
    except SandboxBuildError as exc:
        needs_infrastructure(
            "the vendored CDS Hooks sandbox build", False, f"{exc}: put ../shared beside the checkout"
        )
        raise


def documented_offline_configuration() -> dict[str, Any]:
    doc = (PROJECT_ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if b.startswith("# sandbox-offline")]
    assert len(blocks) == 1, "docs/security.md: the sandbox-offline block"
    return yaml.safe_load(blocks[0])


@pytest.fixture
def client(tmp_path: Path, signer: SandboxSigner) -> FlaskClient:
    configuration = documented_offline_configuration()
    entry = configuration["security"]["trusted_clients"][signer.issuer]
    assert set(entry) == {"jwks_file"}, "the documented offline configuration pins the key and nothing else"
    entry["jwks_file"] = str(signer.jwks_path)  # the documented file, as this machine has it
    settings = make_settings(tmp_path, **configuration)
    assert settings.section("server")["public_url"] == PUBLIC_URL
    app = create_app(settings)
    app.test_client_class = CardCheckingClient
    return app.test_client()


def msc_patient(now: datetime) -> PatientBuilder:
    builder = PatientBuilder(f"sbx-{uuid.uuid4().hex[:8]}", now, age=45, gender="male")
    builder.septic_shock_story(onset_hours=4)
    builder.anc(0.4, hours=2)
    return builder


def test_the_sandbox_build_signs_with_the_key_it_publishes(signer: SandboxSigner) -> None:
    assert signer.alg == "ES384" and signer.issuer == "https://sandbox.cds-hooks.org"
    assert signer.jku.startswith("https://sandbox.cds-hooks.org/")
    assert signer.kid in signer.published_kids()


def test_sandbox_tokens_are_accepted_offline_with_the_key_pinned(
    client: FlaskClient, signer: SandboxSigner, now: datetime
) -> None:
    token = signer.token(PUBLIC_URL + SERVICE_URL)
    response = client.post(
        SERVICE_URL, json=hook_body(msc_patient(now)), headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.data
    card = next(c for c in response.get_json()["cards"] if c["source"]["topic"]["code"] == MSC)
    feedback_path = f"{SERVICE_URL}/feedback"
    feedback = {
        "feedback": [{"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": now.isoformat()}]
    }
    answer = client.post(
        feedback_path,
        json=feedback,
        headers={"Authorization": f"Bearer {signer.token(PUBLIC_URL + feedback_path)}"},
    )
    assert answer.status_code == 200
    # The same token again is a replay; a token for another audience is refused.
    again = client.post(
        SERVICE_URL, json=hook_body(msc_patient(now)), headers={"Authorization": f"Bearer {token}"}
    )
    assert again.status_code == 401
    assert again.headers["WWW-Authenticate"] == "Bearer"
    wrong = signer.token("https://elsewhere.example.org" + SERVICE_URL)
    assert client.post(SERVICE_URL, json={}, headers={"Authorization": f"Bearer {wrong}"}).status_code == 401


def test_without_the_pin_the_sandbox_cannot_be_trusted_offline(
    tmp_path: Path, signer: SandboxSigner, now: datetime
) -> None:
    """The jku-only configuration needs the sandbox's host: with a jku it may not fetch, 401."""
    settings = make_settings(
        tmp_path,
        server={"public_url": PUBLIC_URL},
        security={"trusted_clients": {signer.issuer: {"jku_allow": ["https://sandbox.cds-hooks.org/keys/"]}}},
    )
    client = create_app(settings).test_client()
    token = signer.token(PUBLIC_URL + SERVICE_URL)
    response = client.post(
        SERVICE_URL, json=hook_body(msc_patient(now)), headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 401
