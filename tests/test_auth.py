"""JWT verification of CDS clients (cds_service.protocol.auth) against real keys and a real local JWKS server.

Keys are generated with `cryptography`; key sets are published as files and by a small HTTP server on
127.0.0.1, so the jwks_file, jwks_url and jku paths all run for real. A second "capturing" server
stands for an attacker's host: the tests assert it never receives a request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.base.config import ConfigError
from cds_service.protocol.auth import AuthError, JwtVerifier, replay_key, url_under_prefix

NOW = 1_750_000_000.0
AUDIENCE = "https://cds.example.org/cds-services/septic-shock-trials"
FEEDBACK_AUDIENCE = AUDIENCE + "/feedback"

SANDBOX = "https://sandbox.cds-hooks.org"
EPIC = "epic-client-0oa1b2c3d4"  # Epic's iss is the client id
EHR = "https://ehr.example.org/cds-client"
FILE = "https://file-client.example.org"
SINGLE = "https://single-key.example.org"
HOSTONLY = "https://host-only.example.org"

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


# -- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    sandbox: ec.EllipticCurvePrivateKey  # P-384
    epic: rsa.RSAPrivateKey
    ehr: rsa.RSAPrivateKey
    ehr_next: rsa.RSAPrivateKey  # rotation
    file_ec: ec.EllipticCurvePrivateKey  # P-256
    file_rsa: rsa.RSAPrivateKey
    single: ec.EllipticCurvePrivateKey  # P-384, published without kid
    hostonly: ec.EllipticCurvePrivateKey  # P-384
    stranger_ec384: ec.EllipticCurvePrivateKey
    stranger_ec256: ec.EllipticCurvePrivateKey
    stranger_rsa: rsa.RSAPrivateKey


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        sandbox=ec.generate_private_key(ec.SECP384R1()),
        epic=_rsa(),
        ehr=_rsa(),
        ehr_next=_rsa(),
        file_ec=ec.generate_private_key(ec.SECP256R1()),
        file_rsa=_rsa(),
        single=ec.generate_private_key(ec.SECP384R1()),
        hostonly=ec.generate_private_key(ec.SECP384R1()),
        stranger_ec384=ec.generate_private_key(ec.SECP384R1()),
        stranger_ec256=ec.generate_private_key(ec.SECP256R1()),
        stranger_rsa=_rsa(),
    )


def public_jwk(key: Key, kid: str | None = None, alg: str | None = None) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    jwk["use"] = "sig"
    return jwk


def jwks(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(entries)}).encode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


# -- local HTTP servers ------------------------------------------------------------------------


@dataclass
class LocalServer:
    """An HTTP server on 127.0.0.1 serving `routes` and recording every request path."""

    routes: dict[str, tuple[int, bytes, dict[str, str]]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    delay: float = 0.0
    base: str = ""

    def serve(self, path: str, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.routes[path] = (status, body, headers or {"Content-Type": "application/json"})

    def hits(self, path: str) -> int:
        return self.requests.count(path)


def _start(server_state: LocalServer) -> Iterator[LocalServer]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server_state.requests.append(self.path)
            if server_state.delay:
                time.sleep(server_state.delay)
            status, body, headers = server_state.routes.get(self.path, (404, b"{}", {}))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server_state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server_state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def key_server() -> Iterator[LocalServer]:
    yield from _start(LocalServer())


@pytest.fixture
def capture_server() -> Iterator[LocalServer]:
    """The attacker's host: every test using it asserts it received nothing."""
    yield from _start(LocalServer())


# -- the verifier under test ---------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    keys: Keys
    server: LocalServer
    capture: LocalServer
    clock: FakeClock
    seen: dict[str, float]
    security: dict[str, Any]
    verifier: JwtVerifier
    tmp: Path

    @property
    def sandbox_jku(self) -> str:
        return f"{self.server.base}/sandbox/.well-known/jwks.json"

    @property
    def epic_jku(self) -> str:
        return f"{self.server.base}/epic/interconnect/api/epic/2019/Security/Open/PublicKeys/530005/jwks"

    @property
    def ehr_url(self) -> str:
        return f"{self.server.base}/ehr/jwks.json"

    @property
    def hostonly_jku(self) -> str:
        return f"{self.server.base}/hostonly/jwks.json"

    def token(
        self,
        key: Key,
        alg: str,
        iss: str,
        kid: str | None = None,
        jku: str | None = None,
        remove: tuple[str, ...] = (),
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        payload: dict[str, Any] = {
            "iss": iss,
            "aud": AUDIENCE,
            "iat": int(self.clock.now),
            "exp": int(self.clock.now) + 300,
            "jti": str(uuid.uuid4()),
        }
        payload.update(claims)
        for name in remove:
            payload.pop(name, None)
        header: dict[str, Any] = dict(headers or {})
        if kid is not None:
            header["kid"] = kid
        if jku is not None:
            header["jku"] = jku
        return jwt.encode(payload, key, algorithm=alg, headers=header or None)

    def sandbox_token(self, **claims: Any) -> str:
        return self.token(
            self.keys.sandbox, "ES384", SANDBOX, kid="sandbox-1", jku=self.sandbox_jku, **claims
        )

    def ehr_token(self, **claims: Any) -> str:
        return self.token(self.keys.ehr, "RS384", EHR, kid="ehr-1", **claims)

    def file_token(self, **claims: Any) -> str:
        return self.token(self.keys.file_ec, "ES256", FILE, kid="file-ec", **claims)

    def new_verifier(self, **security: Any) -> JwtVerifier:
        session = requests.Session()
        session.trust_env = False
        return JwtVerifier({**self.security, **security}, self.guard, session=session, clock=self.clock)

    def guard(self, key: str, expires_at: float) -> bool:
        if key in self.seen:
            return False
        self.seen[key] = expires_at
        return True


@pytest.fixture
def env(keys: Keys, key_server: LocalServer, capture_server: LocalServer, tmp_path: Path) -> Iterator[Env]:
    base = key_server.base
    key_server.serve("/sandbox/.well-known/jwks.json", jwks(public_jwk(keys.sandbox, "sandbox-1", "ES384")))
    key_server.serve(
        "/epic/interconnect/api/epic/2019/Security/Open/PublicKeys/530005/jwks",
        jwks(public_jwk(keys.epic, "epic-1", "RS384")),
    )
    # No "alg" member: the algorithm must come from the (allow-listed) token header, not RS256 by default.
    key_server.serve("/ehr/jwks.json", jwks(public_jwk(keys.ehr, "ehr-1")))
    key_server.serve("/hostonly/jwks.json", jwks(public_jwk(keys.hostonly, "hostonly-1", "ES384")))

    file_jwks = tmp_path / "file-client-jwks.json"
    file_jwks.write_bytes(
        jwks(public_jwk(keys.file_ec, "file-ec", "ES256"), public_jwk(keys.file_rsa, "file-rsa", "RS256"))
    )
    single_jwks = tmp_path / "single-jwks.json"
    single_jwks.write_bytes(jwks(public_jwk(keys.single)))

    security: dict[str, Any] = {
        "trusted_clients": {
            SANDBOX: {"jku_allow": [f"{base}/sandbox/"]},
            EPIC: {"jku_allow": [f"{base}/epic/"]},
            EHR: {"jwks_url": f"{base}/ehr/jwks.json"},
            FILE: {"jwks_file": str(file_jwks)},
            SINGLE: {"jwks_file": str(single_jwks)},
            HOSTONLY: {"jku_allow": [base]},  # host-only prefix, no trailing slash
        },
        "clock_skew_seconds": 60,
        "jwks_timeout_seconds": 2.0,
        "jwks_cache_seconds": 3600,
    }
    clock = FakeClock(NOW)
    seen: dict[str, float] = {}
    holder: dict[str, Env] = {}
    session = requests.Session()
    session.trust_env = False

    def guard(key: str, expires_at: float) -> bool:
        return holder["env"].guard(key, expires_at)

    verifier = JwtVerifier(security, guard, session=session, clock=clock)
    environment = Env(keys, key_server, capture_server, clock, seen, security, verifier, tmp_path)
    holder["env"] = environment
    yield environment
    session.close()


def bearer(token: str) -> str:
    return f"Bearer {token}"


# -- tokens that must pass ---------------------------------------------------------------------


def _valid_sandbox(e: Env) -> str:
    return e.sandbox_token()


def _valid_ehr_rs384(e: Env) -> str:
    return e.ehr_token()


def _valid_file_es256(e: Env) -> str:
    return e.file_token()


def _valid_file_rs256(e: Env) -> str:
    return e.token(e.keys.file_rsa, "RS256", FILE, kid="file-rsa")


def _valid_epic(e: Env) -> str:
    iat = int(e.clock.now) - 600  # issued ten minutes ago, still inside its 15 minutes
    return e.token(
        e.keys.epic, "RS384", EPIC, kid="epic-1", jku=e.epic_jku, iat=iat, nbf=iat - 300, exp=iat + 900
    )


def _valid_single_key_without_kid(e: Env) -> str:
    return e.token(e.keys.single, "ES384", SINGLE)


def _valid_aud_list(e: Env) -> str:
    return e.ehr_token(aud=["https://other.example.org/", AUDIENCE])


def _valid_expired_within_skew(e: Env) -> str:
    return e.ehr_token(iat=int(NOW) - 330, exp=int(NOW) - 30)


def _valid_iat_nbf_within_skew(e: Env) -> str:
    return e.ehr_token(iat=int(NOW) + 30, nbf=int(NOW) + 30, exp=int(NOW) + 330)


def _valid_hostonly_prefix(e: Env) -> str:
    return e.token(e.keys.hostonly, "ES384", HOSTONLY, kid="hostonly-1", jku=e.hostonly_jku)


def _valid_long_lived(e: Env) -> str:
    return e.ehr_token(exp=int(NOW) + 86_400)  # documented, not refused


VALID: list[tuple[str, Callable[[Env], str]]] = [
    ("sandbox-ES384-jku", _valid_sandbox),
    ("ehr-RS384-jwks_url", _valid_ehr_rs384),
    ("file-ES256", _valid_file_es256),
    ("file-RS256", _valid_file_rs256),
    ("epic-RS384-jku-nbf-15min", _valid_epic),
    ("single-key-no-kid", _valid_single_key_without_kid),
    ("aud-list", _valid_aud_list),
    ("expired-within-skew", _valid_expired_within_skew),
    ("iat-nbf-within-skew", _valid_iat_nbf_within_skew),
    ("host-only-jku-prefix", _valid_hostonly_prefix),
    ("long-lived", _valid_long_lived),
]


@pytest.mark.parametrize("make", [case[1] for case in VALID], ids=[case[0] for case in VALID])
def test_valid_tokens_pass(env: Env, make: Callable[[Env], str]) -> None:
    token = make(env)
    claims = env.verifier.verify(bearer(token), AUDIENCE)
    assert claims["aud"] == AUDIENCE or AUDIENCE in claims["aud"]
    assert replay_key(claims["iss"], claims["jti"]) in env.seen
    assert env.capture.requests == []


def test_scheme_is_case_insensitive(env: Env) -> None:
    assert env.verifier.verify(f"bearer {env.ehr_token()}", AUDIENCE)["iss"] == EHR
    assert env.verifier.verify(f"BEARER  {env.ehr_token()}  ", AUDIENCE)["iss"] == EHR


def test_two_issuers_es384_and_rs384(env: Env) -> None:
    sandbox = env.verifier.verify(bearer(env.sandbox_token()), AUDIENCE)
    ehr = env.verifier.verify(bearer(env.ehr_token()), FEEDBACK_AUDIENCE.removesuffix("/feedback"))
    assert (sandbox["iss"], ehr["iss"]) == (SANDBOX, EHR)
    feedback = env.verifier.verify(bearer(env.sandbox_token(aud=FEEDBACK_AUDIENCE)), FEEDBACK_AUDIENCE)
    assert feedback["aud"] == FEEDBACK_AUDIENCE


def test_replay_guard_gets_namespaced_key_and_expiry_plus_skew(env: Env) -> None:
    token = env.ehr_token(jti="fixed-jti", exp=int(NOW) + 120)
    env.verifier.verify(bearer(token), AUDIENCE)
    assert env.seen == {replay_key(EHR, "fixed-jti"): NOW + 120 + 60}
    # The same jti from another issuer is a different token.
    env.verifier.verify(bearer(env.sandbox_token(jti="fixed-jti")), AUDIENCE)
    assert len(env.seen) == 2


# -- attacks that must fail ------------------------------------------------------------------------

Attack = Callable[[Env], tuple[str | None, str]]


def _expired(e: Env) -> tuple[str | None, str]:
    return bearer(e.ehr_token(iat=int(NOW) - 900, exp=int(NOW) - 61)), AUDIENCE


def _not_yet_valid(e: Env) -> tuple[str | None, str]:
    return bearer(e.ehr_token(nbf=int(NOW) + 120, exp=int(NOW) + 600)), AUDIENCE


def _iat_in_future(e: Env) -> tuple[str | None, str]:
    return bearer(e.ehr_token(iat=int(NOW) + 120, exp=int(NOW) + 600)), AUDIENCE


def _wrong_audience(e: Env) -> tuple[str | None, str]:
    return bearer(e.ehr_token(aud="https://evil.example.org/cds-services/septic-shock-trials")), AUDIENCE


def _service_token_on_feedback(e: Env) -> tuple[str | None, str]:
    return bearer(e.ehr_token()), FEEDBACK_AUDIENCE


def _missing_aud(e: Env) -> tuple[str | None, str]:
    return bearer(e.ehr_token(remove=("aud",))), AUDIENCE


def _unknown_issuer(e: Env) -> tuple[str | None, str]:
    return bearer(e.token(e.keys.stranger_rsa, "RS384", "https://evil.example.org", kid="ehr-1")), AUDIENCE


def _missing_iss(e: Env) -> tuple[str | None, str]:
    return bearer(e.ehr_token(remove=("iss",))), AUDIENCE


def _unknown_kid(e: Env) -> tuple[str | None, str]:
    return bearer(e.token(e.keys.stranger_rsa, "RS384", EHR, kid="not-published")), AUDIENCE


def _other_issuers_key(e: Env) -> tuple[str | None, str]:
    # A key trusted for one issuer must not vouch for another.
    return bearer(e.token(e.keys.ehr, "RS384", FILE, kid="ehr-1")), AUDIENCE


def _stranger_key_known_kid(e: Env) -> tuple[str | None, str]:
    return bearer(e.token(e.keys.stranger_rsa, "RS384", EHR, kid="ehr-1")), AUDIENCE


def _tampered_payload(e: Env) -> tuple[str | None, str]:
    header, payload, signature = e.ehr_token(aud="https://other.example.org/").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["aud"] = AUDIENCE  # re-target the token, keep the original signature
    return bearer(f"{header}.{b64url_json(claims)}.{signature}"), AUDIENCE


def _tampered_header_alg(e: Env) -> tuple[str | None, str]:
    # Same key, different allowed alg in the header: the signature no longer matches.
    header, payload, signature = e.sandbox_token().split(".")
    fields = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    fields["alg"] = "ES256"
    return bearer(f"{b64url_json(fields)}.{payload}.{signature}"), AUDIENCE


def _claims_for(e: Env, iss: str) -> dict[str, Any]:
    now = int(e.clock.now)
    return {"iss": iss, "aud": AUDIENCE, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}


def _alg_none(e: Env) -> tuple[str | None, str]:
    header = b64url_json({"alg": "none", "typ": "JWT", "kid": "ehr-1"})
    return bearer(f"{header}.{b64url_json(_claims_for(e, EHR))}."), AUDIENCE


def _alg_none_capitalised(e: Env) -> tuple[str | None, str]:
    header = b64url_json({"alg": "None", "typ": "JWT"})
    return bearer(f"{header}.{b64url_json(_claims_for(e, SINGLE))}."), AUDIENCE


def _hs256_with_rsa_public_pem(e: Env) -> tuple[str | None, str]:
    # The classic key-confusion attack: HMAC keyed with the issuer's *public* RSA key.
    # PyJWT refuses to sign this, so build it by hand.
    secret = e.keys.file_rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = f"{b64url_json({'alg': 'HS256', 'typ': 'JWT', 'kid': 'file-rsa'})}."
    signing_input += b64url_json(_claims_for(e, FILE))
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return bearer(f"{signing_input}.{b64url(signature)}"), AUDIENCE


def _hs384_plain_secret(e: Env) -> tuple[str | None, str]:
    token = jwt.encode(_claims_for(e, EHR), "a-guessable-shared-secret-" * 3, algorithm="HS384")
    return bearer(token), AUDIENCE


def _ps384(e: Env) -> tuple[str | None, str]:
    return bearer(e.token(e.keys.ehr, "PS384", EHR, kid="ehr-1")), AUDIENCE


def _alg_key_type_mismatch(e: Env) -> tuple[str | None, str]:
    # RS256 header naming an EC key.
    return bearer(e.token(e.keys.stranger_rsa, "RS256", FILE, kid="file-ec")), AUDIENCE


def _alg_curve_mismatch(e: Env) -> tuple[str | None, str]:
    # ES256 header naming the sandbox's P-384 key.
    return bearer(
        e.token(e.keys.stranger_ec256, "ES256", SANDBOX, kid="sandbox-1", jku=e.sandbox_jku)
    ), AUDIENCE


def _replayed_jti(e: Env) -> tuple[str | None, str]:
    token = e.ehr_token()
    e.verifier.verify(bearer(token), AUDIENCE)  # first use is fine
    return bearer(token), AUDIENCE


def _replayed_jti_new_token(e: Env) -> tuple[str | None, str]:
    e.verifier.verify(bearer(e.ehr_token(jti="reused")), AUDIENCE)
    return bearer(e.ehr_token(jti="reused", iat=int(NOW) + 1)), AUDIENCE


def _jku_off_allow_list(e: Env) -> tuple[str | None, str]:
    jku = f"{e.capture.base}/sandbox/.well-known/jwks.json"
    return bearer(e.token(e.keys.sandbox, "ES384", SANDBOX, kid="sandbox-1", jku=jku)), AUDIENCE


def _jku_for_issuer_without_allow_list(e: Env) -> tuple[str | None, str]:
    jku = f"{e.capture.base}/jwks.json"  # the attacker's key set, for a kid the pinned file lacks
    return bearer(e.token(e.keys.stranger_ec256, "ES256", FILE, kid="attacker", jku=jku)), AUDIENCE


def _pinned_kid_other_key_with_jku(e: Env) -> tuple[str | None, str]:
    jku = f"{e.capture.base}/jwks.json"  # the pinned key is used (and fails), the jku never fetched
    return bearer(e.token(e.keys.stranger_ec256, "ES256", FILE, kid="file-ec", jku=jku)), AUDIENCE


def _missing_jti(e: Env) -> tuple[str | None, str]:
    return bearer(e.ehr_token(remove=("jti",))), AUDIENCE


def _empty_jti(e: Env) -> tuple[str | None, str]:
    return bearer(e.ehr_token(jti="")), AUDIENCE


def _huge_jti(e: Env) -> tuple[str | None, str]:
    return bearer(e.ehr_token(jti="x" * 1000)), AUDIENCE


def _missing_exp(e: Env) -> tuple[str | None, str]:
    return bearer(e.ehr_token(remove=("exp",))), AUDIENCE


def _missing_iat(e: Env) -> tuple[str | None, str]:
    return bearer(e.ehr_token(remove=("iat",))), AUDIENCE


def _string_exp(e: Env) -> tuple[str | None, str]:
    return bearer(e.ehr_token(exp="tomorrow")), AUDIENCE


def _crit_header(e: Env) -> tuple[str | None, str]:
    token = e.token(e.keys.ehr, "RS384", EHR, kid="ehr-1", headers={"crit": ["exp"], "exp": 1})
    return bearer(token), AUDIENCE


def _crit_b64_header(e: Env) -> tuple[str | None, str]:
    # An extension PyJWT understands, but CDS Hooks has no use for: refused all the same.
    # (PyJWT drops `"b64": true` when encoding, so sign by hand.)
    header = {"alg": "ES256", "typ": "JWT", "kid": "file-ec", "crit": ["b64"], "b64": True}
    signing_input = f"{b64url_json(header)}.{b64url_json(_claims_for(e, FILE))}"
    signature = jwt.PyJWS().get_algorithm_by_name("ES256").sign(signing_input.encode(), e.keys.file_ec)
    return bearer(f"{signing_input}.{b64url(signature)}"), AUDIENCE


def _missing_authorization(e: Env) -> tuple[str | None, str]:
    return None, AUDIENCE


def _empty_authorization(e: Env) -> tuple[str | None, str]:
    return "", AUDIENCE


def _basic_scheme(e: Env) -> tuple[str | None, str]:
    return "Basic " + base64.b64encode(b"user:password").decode(), AUDIENCE


def _token_without_scheme(e: Env) -> tuple[str | None, str]:
    return e.ehr_token(), AUDIENCE


def _bearer_without_token(e: Env) -> tuple[str | None, str]:
    return "Bearer ", AUDIENCE


def _garbage_token(e: Env) -> tuple[str | None, str]:
    return "Bearer not-a-jwt-at-all", AUDIENCE


def _garbage_segments(e: Env) -> tuple[str | None, str]:
    return "Bearer e30.!!!!.????", AUDIENCE


def _huge_header(e: Env) -> tuple[str | None, str]:
    return "Bearer " + "a" * 20_000, AUDIENCE


ATTACKS: list[tuple[str, Attack, str]] = [
    ("expired", _expired, "expired"),
    ("not-yet-valid", _not_yet_valid, "not yet valid"),
    ("iat-in-future", _iat_in_future, "issued in the future"),
    ("wrong-audience", _wrong_audience, "wrong audience"),
    ("service-token-on-feedback", _service_token_on_feedback, "wrong audience"),
    ("missing-aud", _missing_aud, "missing aud"),
    ("unknown-issuer", _unknown_issuer, "unknown issuer"),
    ("missing-iss", _missing_iss, "missing iss"),
    ("unknown-kid", _unknown_kid, "unknown kid"),
    ("other-issuers-key", _other_issuers_key, "unknown kid"),
    ("stranger-key-known-kid", _stranger_key_known_kid, "bad signature"),
    ("tampered-payload", _tampered_payload, "bad signature"),
    ("tampered-header-alg", _tampered_header_alg, "alg does not match key"),
    ("alg-none", _alg_none, "algorithm not allowed"),
    ("alg-None", _alg_none_capitalised, "algorithm not allowed"),
    ("hs256-rsa-public-pem", _hs256_with_rsa_public_pem, "algorithm not allowed"),
    ("hs384", _hs384_plain_secret, "algorithm not allowed"),
    ("ps384", _ps384, "algorithm not allowed"),
    ("alg-key-type-mismatch", _alg_key_type_mismatch, "alg does not match key"),
    ("alg-curve-mismatch", _alg_curve_mismatch, "alg does not match key"),
    ("replayed-jti", _replayed_jti, "replayed jti"),
    ("replayed-jti-new-token", _replayed_jti_new_token, "replayed jti"),
    ("jku-off-allow-list", _jku_off_allow_list, "jku not allow-listed"),
    ("jku-without-allow-list", _jku_for_issuer_without_allow_list, "jku not allow-listed"),
    ("pinned-kid-other-key-with-jku", _pinned_kid_other_key_with_jku, "bad signature"),
    ("missing-jti", _missing_jti, "missing jti"),
    ("empty-jti", _empty_jti, "missing jti"),
    ("huge-jti", _huge_jti, "jti too long"),
    ("missing-exp", _missing_exp, "missing exp"),
    ("missing-iat", _missing_iat, "missing iat"),
    ("string-exp", _string_exp, "malformed exp"),
    ("crit-unknown-extension", _crit_header, "malformed token"),
    ("crit-b64", _crit_b64_header, "unsupported critical header"),
    ("missing-authorization", _missing_authorization, "missing authorization"),
    ("empty-authorization", _empty_authorization, "missing authorization"),
    ("basic-scheme", _basic_scheme, "not a bearer token"),
    ("no-scheme", _token_without_scheme, "not a bearer token"),
    ("bearer-without-token", _bearer_without_token, "malformed token"),
    ("garbage-token", _garbage_token, "malformed token"),
    ("garbage-segments", _garbage_segments, "malformed token"),
    ("huge-header", _huge_header, "authorization header too large"),
]


@pytest.mark.parametrize(
    ("attack", "reason"), [case[1:] for case in ATTACKS], ids=[case[0] for case in ATTACKS]
)
def test_attacks_are_refused(env: Env, attack: Attack, reason: str) -> None:
    authorization, audience = attack(env)
    with pytest.raises(AuthError) as caught:
        env.verifier.verify(authorization, audience)
    assert caught.value.reason == reason
    assert str(caught.value) == reason
    # Nothing of the token ends up in the reason (it goes to the log).
    if authorization:
        for part in authorization.replace(" ", ".").split("."):
            if len(part) >= 6:
                assert part not in caught.value.reason
    assert env.capture.requests == []


# -- jku allow-list: off-list URLs are never fetched ---------------------------------------------

JKU_TRICKS: list[tuple[str, str, Callable[[Env], str]]] = [
    ("other-host", SANDBOX, lambda e: f"{e.capture.base}/sandbox/.well-known/jwks.json"),
    ("localhost-alias", SANDBOX, lambda e: e.capture.base.replace("127.0.0.1", "localhost") + "/sandbox/x"),
    ("userinfo", HOSTONLY, lambda e: f"{e.server.base}@{e.capture.base.removeprefix('http://')}/jwks.json"),
    ("port-suffix", HOSTONLY, lambda e: f"{e.server.base}0/jwks.json"),
    ("path-traversal", SANDBOX, lambda e: f"{e.server.base}/sandbox/../ehr/jwks.json"),
    ("encoded-traversal", SANDBOX, lambda e: f"{e.server.base}/sandbox/%2e%2e/ehr/jwks.json"),
    ("segment-prefix", SANDBOX, lambda e: f"{e.server.base}/sandbox-evil/jwks.json"),
    ("https-downgrade", SANDBOX, lambda e: e.sandbox_jku.replace("http://", "ftp://")),
    ("backslash", SANDBOX, lambda e: f"{e.server.base}/sandbox/\\\\evil/jwks.json"),
    ("not-a-string", SANDBOX, lambda e: ["http://127.0.0.1/"]),  # type: ignore[return-value,list-item]
]


@pytest.mark.parametrize(
    ("issuer", "make_jku"), [case[1:] for case in JKU_TRICKS], ids=[case[0] for case in JKU_TRICKS]
)
def test_jku_off_allow_list_is_never_fetched(env: Env, issuer: str, make_jku: Callable[[Env], str]) -> None:
    env.capture.serve(
        "/sandbox/.well-known/jwks.json", jwks(public_jwk(env.keys.stranger_ec384, "sandbox-1"))
    )
    jku = make_jku(env)
    token = env.token(env.keys.stranger_ec384, "ES384", issuer, kid="sandbox-1", jku=jku)  # type: ignore[arg-type]
    with pytest.raises(AuthError) as caught:
        env.verifier.verify(bearer(token), AUDIENCE)
    assert caught.value.reason == "jku not allow-listed"
    assert env.capture.requests == []
    assert env.server.requests == []


def test_jku_equal_to_configured_jwks_url_is_allowed(env: Env) -> None:
    token = env.token(env.keys.ehr, "RS384", EHR, kid="ehr-1", jku=env.ehr_url)
    assert env.verifier.verify(bearer(token), AUDIENCE)["iss"] == EHR


@pytest.mark.parametrize(
    ("url", "prefix", "expected"),
    [
        ("https://sandbox.cds-hooks.org/.well-known/jwks.json", "https://sandbox.cds-hooks.org/", True),
        ("https://sandbox.cds-hooks.org/.well-known/jwks.json", "https://sandbox.cds-hooks.org", True),
        ("https://SANDBOX.cds-hooks.org:443/.well-known/jwks.json", "https://sandbox.cds-hooks.org/", True),
        ("https://sandbox.cds-hooks.org.evil.com/jwks.json", "https://sandbox.cds-hooks.org", False),
        ("https://sandbox.cds-hooks.org@evil.com/jwks.json", "https://sandbox.cds-hooks.org", False),
        ("https://sandbox.cds-hooks.org:8443/jwks.json", "https://sandbox.cds-hooks.org", False),
        ("http://sandbox.cds-hooks.org/jwks.json", "https://sandbox.cds-hooks.org", False),
        ("https://fhir.example.org/keysX/jwks", "https://fhir.example.org/keys", False),
        ("https://fhir.example.org/keys/jwks", "https://fhir.example.org/keys", True),
        ("https://fhir.example.org/keys", "https://fhir.example.org/keys", True),
        ("https://fhir.example.org/keys/./../admin", "https://fhir.example.org/keys/", False),
        ("https://fhir.example.org/keys/jwks?x=1", "https://fhir.example.org/keys/", True),
        ("https://fhir.example.org:99999/keys/jwks", "https://fhir.example.org/keys/", False),
        ("https://fhir.example.org/keys/ jwks", "https://fhir.example.org/keys/", False),
        ("", "https://fhir.example.org/", False),
    ],
)
def test_url_under_prefix(url: str, prefix: str, expected: bool) -> None:
    assert url_under_prefix(url, prefix) is expected


# -- key sets: caching, refresh, rotation, failures -------------------------------------------------


def test_remote_key_set_is_cached(env: Env) -> None:
    for _ in range(5):
        env.verifier.verify(bearer(env.ehr_token()), AUDIENCE)
        env.verifier.verify(bearer(env.sandbox_token()), AUDIENCE)
    assert env.server.hits("/ehr/jwks.json") == 1
    assert env.server.hits("/sandbox/.well-known/jwks.json") == 1
    env.clock.now += 3601  # past jwks_cache_seconds
    env.verifier.verify(bearer(env.ehr_token()), AUDIENCE)
    assert env.server.hits("/ehr/jwks.json") == 2


def test_concurrent_first_calls_fetch_the_key_set_once(env: Env) -> None:
    env.server.delay = 0.2
    tokens = [env.ehr_token() for _ in range(12)]
    results: list[str] = []
    errors: list[BaseException] = []

    def call(token: str) -> None:
        try:
            results.append(env.verifier.verify(bearer(token), AUDIENCE)["iss"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(token,)) for token in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [EHR] * 12
    assert env.server.hits("/ehr/jwks.json") == 1


def test_unknown_kid_refreshes_once_and_is_rate_limited(env: Env) -> None:
    env.verifier.verify(bearer(env.ehr_token()), AUDIENCE)
    assert env.server.hits("/ehr/jwks.json") == 1
    env.clock.now += 31
    unknown = [env.token(env.keys.stranger_rsa, "RS384", EHR, kid="unknown") for _ in range(3)]
    for token in unknown:
        with pytest.raises(AuthError, match="unknown kid"):
            env.verifier.verify(bearer(token), AUDIENCE)
    assert env.server.hits("/ehr/jwks.json") == 2  # one refresh, not one per request
    env.clock.now += 31
    with pytest.raises(AuthError, match="unknown kid"):
        env.verifier.verify(bearer(env.token(env.keys.stranger_rsa, "RS384", EHR, kid="unknown")), AUDIENCE)
    assert env.server.hits("/ehr/jwks.json") == 3


def test_key_rotation_new_kid_triggers_one_refresh(env: Env) -> None:
    env.verifier.verify(bearer(env.ehr_token()), AUDIENCE)
    # The client publishes its next key and starts signing with it a while later.
    env.server.serve(
        "/ehr/jwks.json", jwks(public_jwk(env.keys.ehr, "ehr-1"), public_jwk(env.keys.ehr_next, "ehr-2"))
    )
    env.clock.now += 120
    rotated = env.token(env.keys.ehr_next, "RS384", EHR, kid="ehr-2")
    assert env.verifier.verify(bearer(rotated), AUDIENCE)["iss"] == EHR
    assert env.server.hits("/ehr/jwks.json") == 2
    for _ in range(3):
        env.verifier.verify(bearer(env.token(env.keys.ehr_next, "RS384", EHR, kid="ehr-2")), AUDIENCE)
        env.verifier.verify(bearer(env.ehr_token()), AUDIENCE)
    assert env.server.hits("/ehr/jwks.json") == 2


def test_sandbox_key_rotation_through_jku(env: Env) -> None:
    env.verifier.verify(bearer(env.sandbox_token()), AUDIENCE)
    env.server.serve("/sandbox/.well-known/jwks.json", jwks(public_jwk(env.keys.stranger_ec384, "sandbox-2")))
    env.clock.now += 600
    token = env.token(env.keys.stranger_ec384, "ES384", SANDBOX, kid="sandbox-2", jku=env.sandbox_jku)
    assert env.verifier.verify(bearer(token), AUDIENCE)["iss"] == SANDBOX
    assert env.server.hits("/sandbox/.well-known/jwks.json") == 2


def test_a_keyless_caller_cannot_lock_out_the_trusted_client(env: Env) -> None:
    """Naming a trusted issuer costs nothing. Tokens with made-up jku URLs under its prefix, signed with
    any key, cost one failed fetch per made-up URL, and the real client is never refused for it —
    whether its own URL was fetched before the flood or not."""
    for round_ in range(2):
        for index in range(MAX_URLS_FLOOD):
            jku = f"{env.server.base}/sandbox/made-up-{round_}-{index}.json"
            token = env.token(env.keys.stranger_ec384, "ES384", SANDBOX, kid="x", jku=jku)
            with pytest.raises(AuthError, match="jwks unavailable"):
                env.verifier.verify(bearer(token), AUDIENCE)
        # the real client, right after the flood (its URL is new to the verifier in round 0)
        assert env.verifier.verify(bearer(env.sandbox_token()), AUDIENCE)["iss"] == SANDBOX
    made_up = [path for path in env.server.requests if "made-up" in path]
    assert len(made_up) == 2 * MAX_URLS_FLOOD == len(set(made_up))  # each made-up URL fetched once
    assert env.server.hits("/sandbox/.well-known/jwks.json") == 1  # the working key set stayed cached
    # A failed URL (still in the cache: the latest one) is not fetched again within the back-off
    # interval, and is tried again after it. An evicted one costs one more failed fetch, no more.
    last = f"/sandbox/made-up-1-{MAX_URLS_FLOOD - 1}.json"
    again = env.token(env.keys.stranger_ec384, "ES384", SANDBOX, kid="x", jku=f"{env.server.base}{last}")
    with pytest.raises(AuthError, match="jwks unavailable"):
        env.verifier.verify(bearer(again), AUDIENCE)
    assert env.server.hits(last) == 1
    env.clock.now += 31
    with pytest.raises(AuthError, match="jwks unavailable"):
        env.verifier.verify(bearer(again), AUDIENCE)
    assert env.server.hits(last) == 2


#: More made-up URLs than the verifier caches, so that eviction is exercised too.
MAX_URLS_FLOOD = 40


def test_a_pinned_key_with_the_tokens_kid_is_used_before_any_jku(env: Env, tmp_path: Path) -> None:
    """The sandbox (and Epic) always send a jku. With the client's key pinned in jwks_file, its tokens
    are verified offline: the jku is neither checked against jku_allow nor fetched."""
    pinned = tmp_path / "sandbox-pinned.json"
    pinned.write_bytes(jwks(public_jwk(env.keys.sandbox, "sandbox-1", "ES384")))
    verifier = env.new_verifier(trusted_clients={SANDBOX: {"jwks_file": str(pinned)}})
    unreachable = "https://sandbox.cds-hooks.org/.well-known/jwks.json"  # no network here
    token = env.token(env.keys.sandbox, "ES384", SANDBOX, kid="sandbox-1", jku=unreachable)
    assert verifier.verify(bearer(token), AUDIENCE)["iss"] == SANDBOX
    # A token whose kid is not pinned still goes through the jku rules: here, not allow-listed.
    other = env.token(env.keys.stranger_ec384, "ES384", SANDBOX, kid="sandbox-2", jku=unreachable)
    with pytest.raises(AuthError, match="jku not allow-listed"):
        verifier.verify(bearer(other), AUDIENCE)
    # The pinned kid with another key's signature is refused: pinning is not a bypass.
    forged = env.token(env.keys.stranger_ec384, "ES384", SANDBOX, kid="sandbox-1", jku=unreachable)
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify(bearer(forged), AUDIENCE)
    assert env.server.requests == [] and env.capture.requests == []


def test_pinned_and_allow_listed_keys_work_together(env: Env, tmp_path: Path) -> None:
    """Pin today's key and allow the jku too: the pinned key serves offline, a rotated key is fetched."""
    pinned = tmp_path / "sandbox-pinned.json"
    pinned.write_bytes(jwks(public_jwk(env.keys.sandbox, "sandbox-1", "ES384")))
    verifier = env.new_verifier(
        trusted_clients={SANDBOX: {"jwks_file": str(pinned), "jku_allow": [f"{env.server.base}/sandbox/"]}}
    )
    assert verifier.verify(bearer(env.sandbox_token()), AUDIENCE)["iss"] == SANDBOX
    assert env.server.requests == []
    env.server.serve("/sandbox/.well-known/jwks.json", jwks(public_jwk(env.keys.stranger_ec384, "sandbox-2")))
    rotated = env.token(env.keys.stranger_ec384, "ES384", SANDBOX, kid="sandbox-2", jku=env.sandbox_jku)
    assert verifier.verify(bearer(rotated), AUDIENCE)["iss"] == SANDBOX
    assert env.server.requests == ["/sandbox/.well-known/jwks.json"]


def test_unreachable_key_set_fails_closed_without_hammering(env: Env) -> None:
    env.server.serve("/ehr/jwks.json", b"oops", status=500)
    for _ in range(3):
        with pytest.raises(AuthError, match="jwks unavailable"):
            env.verifier.verify(bearer(env.ehr_token()), AUDIENCE)
    assert env.server.hits("/ehr/jwks.json") == 1
    env.server.serve("/ehr/jwks.json", jwks(public_jwk(env.keys.ehr, "ehr-1")))
    env.clock.now += 31
    assert env.verifier.verify(bearer(env.ehr_token()), AUDIENCE)["iss"] == EHR


def test_stale_keys_are_kept_when_a_refresh_fails(env: Env) -> None:
    env.verifier.verify(bearer(env.ehr_token()), AUDIENCE)
    env.server.serve("/ehr/jwks.json", b"{}", status=503)
    env.clock.now += 3601
    assert env.verifier.verify(bearer(env.ehr_token()), AUDIENCE)["iss"] == EHR
    assert env.server.hits("/ehr/jwks.json") == 2


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b"not json"),
        (200, b'{"keys": "nope"}'),
        (200, b'{"keys": []}'),
        (200, json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "ehr-1"}]}).encode()),
        (200, b'{"keys": [' + b'{"kty": "RSA"},' * 40_000 + b"{}]}"),
        (404, b"{}"),
    ],
    ids=["not-json", "keys-not-list", "empty", "symmetric-key-ignored", "too-large", "404"],
)
def test_bad_key_sets_are_refused(env: Env, status: int, body: bytes) -> None:
    env.server.serve("/ehr/jwks.json", body, status=status)
    with pytest.raises(AuthError, match=r"jwks unavailable|unknown kid"):
        env.verifier.verify(bearer(env.ehr_token()), AUDIENCE)


def test_encryption_keys_are_not_used_for_signatures(env: Env) -> None:
    enc = public_jwk(env.keys.ehr, "ehr-1")
    enc["use"] = "enc"
    env.server.serve("/ehr/jwks.json", jwks(enc))
    with pytest.raises(AuthError, match="unknown kid"):
        env.verifier.verify(bearer(env.ehr_token()), AUDIENCE)


def test_redirects_are_not_followed(env: Env) -> None:
    env.capture.serve("/jwks.json", jwks(public_jwk(env.keys.stranger_rsa, "ehr-1")))
    env.server.serve("/ehr/jwks.json", b"", status=302, headers={"Location": f"{env.capture.base}/jwks.json"})
    with pytest.raises(AuthError, match="jwks unavailable"):
        env.verifier.verify(bearer(env.token(env.keys.stranger_rsa, "RS384", EHR, kid="ehr-1")), AUDIENCE)
    assert env.capture.requests == []


def test_slow_key_server_times_out(env: Env) -> None:
    verifier = env.new_verifier(jwks_timeout_seconds=0.3)
    env.server.delay = 1.5
    started = time.monotonic()
    with pytest.raises(AuthError, match="jwks unavailable"):
        verifier.verify(bearer(env.ehr_token()), AUDIENCE)
    assert time.monotonic() - started < 1.2


def test_weak_rsa_keys_are_refused(env: Env) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    env.server.serve("/ehr/jwks.json", jwks(public_jwk(weak, "ehr-1")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)  # PyJWT warns when *signing* it
        token = env.token(weak, "RS384", EHR, kid="ehr-1")
    with pytest.raises(AuthError, match="key too weak"):
        env.verifier.verify(bearer(token), AUDIENCE)


def test_jwks_file_is_reloaded_when_it_changes(env: Env) -> None:
    path = Path(env.security["trusted_clients"][FILE]["jwks_file"])
    rotated = env.token(env.keys.stranger_ec256, "ES256", FILE, kid="file-ec-2")
    with pytest.raises(AuthError, match="unknown kid"):
        env.verifier.verify(bearer(rotated), AUDIENCE)
    path.write_bytes(jwks(public_jwk(env.keys.stranger_ec256, "file-ec-2", "ES256")))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    rotated = env.token(env.keys.stranger_ec256, "ES256", FILE, kid="file-ec-2")
    assert env.verifier.verify(bearer(rotated), AUDIENCE)["iss"] == FILE
    # A broken rewrite keeps the last good keys.
    path.write_text("{ half written")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    rotated = env.token(env.keys.stranger_ec256, "ES256", FILE, kid="file-ec-2")
    assert env.verifier.verify(bearer(rotated), AUDIENCE)["iss"] == FILE


def test_several_keys_and_no_kid_is_refused(env: Env) -> None:
    with pytest.raises(AuthError, match="no kid"):
        env.verifier.verify(bearer(env.token(env.keys.file_ec, "ES256", FILE)), AUDIENCE)


# -- configuration -----------------------------------------------------------------------------


def test_configuration_errors_are_reported_at_start_up(tmp_path: Path) -> None:
    def build(clients: dict[str, Any]) -> JwtVerifier:
        return JwtVerifier({"trusted_clients": clients}, lambda key, exp: True)

    with pytest.raises(ConfigError, match="give jwks_file, jwks_url or jku_allow"):
        build({"https://issuer.example.org": {}})
    with pytest.raises(ConfigError, match="jwks_file"):
        build({"https://issuer.example.org": {"jwks_file": str(tmp_path / "missing.json")}})
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ConfigError, match="not a JWKS document"):
        build({"https://issuer.example.org": {"jwks_file": str(tmp_path / "bad.json")}})
    with pytest.raises(ConfigError, match="jku_allow"):
        build({"https://issuer.example.org": {"jku_allow": ["sandbox.cds-hooks.org"]}})
    verifier = build({"https://issuer.example.org": {"jwks_url": "https://issuer.example.org/jwks"}})
    assert verifier.issuers == {"https://issuer.example.org"}


def test_no_trusted_clients_refuses_everyone(env: Env) -> None:
    verifier = env.new_verifier(trusted_clients={})
    with pytest.raises(AuthError, match="unknown issuer"):
        verifier.verify(bearer(env.ehr_token()), AUDIENCE)


# -- properties ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.none(), st.text(max_size=300), st.text(max_size=300).map(lambda s: "Bearer " + s)))
def test_arbitrary_headers_only_ever_raise_auth_error(env: Env, authorization: str | None) -> None:
    with pytest.raises(AuthError):
        env.verifier.verify(authorization, AUDIENCE)


_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    position=st.floats(min_value=0, max_value=1, exclude_max=True),
    replacement=st.sampled_from(_B64URL_ALPHABET),
)
def test_any_changed_character_breaks_the_token(env: Env, position: float, replacement: str) -> None:
    token = env.file_token()
    segments = token.split(".")
    # Positions inside a segment, excluding its last character (whose low bits may be padding).
    positions = [
        (index, offset) for index, segment in enumerate(segments) for offset in range(len(segment) - 1)
    ]
    index, offset = positions[int(position * len(positions))]
    segment = segments[index]
    if segment[offset] == replacement:
        replacement = "A" if replacement != "A" else "B"
    segments[index] = segment[:offset] + replacement + segment[offset + 1 :]
    with pytest.raises(AuthError):
        env.verifier.verify(bearer(".".join(segments)), AUDIENCE)
