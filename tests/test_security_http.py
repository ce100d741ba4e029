"""[security] JWT checks wired into the HTTP routes: hook and feedback need a valid client JWT.

The verifier itself is covered exhaustively in test_auth.py; here: two issuers (ES384, RS384)
pass through the real routes, the attack list answers 401 with no detail, the replay cache uses
the store, and discovery stays open (clients read it before they can sign).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask.testing import FlaskClient

from cds_service.app import create_app
from cds_service.tools.scenario_builder import PatientBuilder
from tests.conftest import SERVICE_URL, CardCheckingClient, hook_body, make_settings

PUBLIC_URL = "http://localhost"
EHR_ISSUER = "https://ehr.example.org/cds-client"
SANDBOX_ISSUER = "https://sandbox.example.org"


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    algorithm = (
        jwt.algorithms.ECAlgorithm
        if isinstance(key, ec.EllipticCurvePrivateKey)
        else jwt.algorithms.RSAAlgorithm
    )
    public = json.loads(algorithm.to_jwk(key.public_key()))
    return {**public, "kid": kid, "use": "sig"}


@pytest.fixture
def client(tmp_path: Path, ec_key: Any, rsa_key: Any) -> FlaskClient:
    (tmp_path / "sandbox.jwks.json").write_text(json.dumps({"keys": [_jwk(ec_key, "sandbox-1")]}))
    (tmp_path / "ehr.jwks.json").write_text(json.dumps({"keys": [_jwk(rsa_key, "ehr-1")]}))
    settings = make_settings(
        tmp_path,
        server={"public_url": PUBLIC_URL},
        security={
            "trusted_clients": {
                SANDBOX_ISSUER: {"jwks_file": str(tmp_path / "sandbox.jwks.json")},
                EHR_ISSUER: {"jwks_file": str(tmp_path / "ehr.jwks.json")},
            }
        },
    )
    app = create_app(settings)
    app.test_client_class = CardCheckingClient
    return app.test_client()


def _token(key: Any, alg: str, kid: str, issuer: str, path: str = SERVICE_URL, **changes: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": f"{PUBLIC_URL}{path}",
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }
    claims.update(changes)
    return jwt.encode(
        {k: v for k, v in claims.items() if v is not None},
        key,
        algorithm=alg,
        headers={"kid": kid, "typ": "JWT"},
    )


def _body(now: datetime) -> dict[str, Any]:
    builder = PatientBuilder("cdsh-jwt", now, age=45)
    builder.septic_shock_story(onset_hours=4)
    builder.anc(0.4, hours=2)
    return hook_body(builder)


def test_valid_tokens_from_two_issuers_pass(
    client: FlaskClient, ec_key: Any, rsa_key: Any, now: datetime
) -> None:
    for key, alg, kid, issuer in (
        (ec_key, "ES384", "sandbox-1", SANDBOX_ISSUER),
        (rsa_key, "RS384", "ehr-1", EHR_ISSUER),
    ):
        response = client.post(
            SERVICE_URL, json=_body(now), headers={"Authorization": f"Bearer {_token(key, alg, kid, issuer)}"}
        )
        assert response.status_code == 200, response.data
        card_uuid = response.get_json()["cards"][0]["uuid"]
        feedback_path = f"{SERVICE_URL}/feedback"
        feedback = {
            "feedback": [{"card": card_uuid, "outcome": "accepted", "outcomeTimestamp": now.isoformat()}]
        }
        token = _token(key, alg, kid, issuer, path=feedback_path)
        assert (
            client.post(
                feedback_path, json=feedback, headers={"Authorization": f"Bearer {token}"}
            ).status_code
            == 200
        )


def _attacks(ec_key: Any, rsa_key: Any) -> dict[str, str | None]:
    now = int(time.time())
    valid = _token(ec_key, "ES384", "sandbox-1", SANDBOX_ISSUER)
    header, _payload, signature = valid.split(".")
    forged = jwt.utils.base64url_encode(
        json.dumps(
            {
                "iss": SANDBOX_ISSUER,
                "aud": f"{PUBLIC_URL}{SERVICE_URL}",
                "iat": now,
                "exp": now + 9999,
                "jti": "x",
            }
        ).encode()
    ).decode()
    return {
        "missing header": None,
        "expired": _token(ec_key, "ES384", "sandbox-1", SANDBOX_ISSUER, iat=now - 900, exp=now - 600),
        "not yet valid": _token(ec_key, "ES384", "sandbox-1", SANDBOX_ISSUER, nbf=now + 900),
        "wrong audience": _token(
            ec_key, "ES384", "sandbox-1", SANDBOX_ISSUER, aud="https://elsewhere.example/x"
        ),
        "audience of another route": _token(
            ec_key, "ES384", "sandbox-1", SANDBOX_ISSUER, path=f"{SERVICE_URL}/feedback"
        ),
        "unknown issuer": _token(ec_key, "ES384", "sandbox-1", "https://intruder.example"),
        "key of the other issuer": _token(rsa_key, "RS384", "ehr-1", SANDBOX_ISSUER),
        "unknown kid": _token(ec_key, "ES384", "rotated-away", SANDBOX_ISSUER),
        "tampered payload": f"{header}.{forged}.{signature}",
        "alg none": jwt.encode(
            {
                "iss": SANDBOX_ISSUER,
                "aud": f"{PUBLIC_URL}{SERVICE_URL}",
                "iat": now,
                "exp": now + 300,
                "jti": "n",
            },
            None,
            algorithm="none",
        ),
        "missing jti": _token(ec_key, "ES384", "sandbox-1", SANDBOX_ISSUER, jti=None),
        "garbage": "not.a.jwt",
    }


def test_attacks_get_401_with_no_detail(
    client: FlaskClient, ec_key: Any, rsa_key: Any, now: datetime
) -> None:
    for name, token in _attacks(ec_key, rsa_key).items():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = client.post(SERVICE_URL, json=_body(now), headers=headers)
        assert response.status_code == 401, name
        outcome = response.get_json()
        assert outcome["issue"][0]["diagnostics"] == "unauthorized", name  # the reason goes to the log only
    assert client.post(f"{SERVICE_URL}/feedback", json={"feedback": []}).status_code == 401


def test_replayed_token_is_refused(client: FlaskClient, ec_key: Any, now: datetime) -> None:
    token = _token(ec_key, "ES384", "sandbox-1", SANDBOX_ISSUER)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post(SERVICE_URL, json=_body(now), headers=headers).status_code == 200
    assert client.post(SERVICE_URL, json=_body(now), headers=headers).status_code == 401


def test_discovery_stays_open(client: FlaskClient) -> None:
    assert client.get("/cds-services").status_code == 200


def test_trusted_clients_without_public_url_is_refused_at_start(tmp_path: Path) -> None:
    from cds_service.base.config import ConfigError

    with pytest.raises(ConfigError, match="public_url"):
        make_settings(tmp_path, security={"trusted_clients": {SANDBOX_ISSUER: {"jwks_file": "x.json"}}})


def test_readme_trust_configuration_is_valid() -> None:
    """The README's sandbox / Epic / Oracle Health example is a configuration the service accepts."""
    import re

    import yaml

    from cds_service.base.config import PROJECT_ROOT, load_settings
    from cds_service.protocol.auth import JwtVerifier

    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "trusted_clients:\n    " in b]
    assert len(blocks) == 1
    settings = load_settings(environ={}, overrides=yaml.safe_load(blocks[0]))
    verifier = JwtVerifier(settings.section("security"), lambda key, expires: True)
    assert {"https://sandbox.cds-hooks.org", "https://cds-hooks.cerner.com"} <= set(verifier.issuers)
