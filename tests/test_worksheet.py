"""The screening worksheet in process: settings, PKCE, the id_token checks, sessions sealed in the
store, the page's content for every eligible scenario patient, security headers, and a clear page
for every failure (fault servers stand in for a broken EHR). The launch against a real SMART
authorization server is in test_worksheet_launcher.py; the browser test in test_worksheet_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.app import create_app
from cds_service.base.config import ConfigError, load_settings
from cds_service.base.logs import configure_logging
from cds_service.clinical.evaluation import ELIGIBLE
from cds_service.patient_data.gather import RawPatientData
from cds_service.screening import Screener
from cds_service.store import open_store
from cds_service.tools.scenarios import all_scenarios
from cds_service.worksheet.page import trial_sheet
from cds_service.worksheet.sessions import LaunchProblem, Sealer, SessionProblem, Sessions
from cds_service.worksheet.smart import (
    SmartClient,
    SmartError,
    SmartServer,
    code_challenge,
    scopes,
)
from tests.conftest import make_settings
from tests.fault_server import FaultServer, refused_url

CLIENT_ID = "worksheet-test"
KEY = Fernet.generate_key().decode()


def worksheet_settings(tmp_path: Path, public_url: str, issuers: list[str], **worksheet: Any) -> Any:
    """Settings with the worksheet on (store in tmp_path, http allowed for the local test servers)."""
    return make_settings(
        tmp_path,
        fhir={"allow_http": True},
        screening={"timezone": "Europe/Paris"},
        worksheet={
            "enabled": True,
            "public_url": public_url,
            "client_id": CLIENT_ID,
            "token_keys": [KEY],
            "issuers": issuers,
            **worksheet,
        },
    )


def title(html: str) -> str:
    found = re.search(r"<h1>(.*?)</h1>", html, re.S)
    return found.group(1).strip() if found else ""


# -- settings ------------------------------------------------------------------------------------


def test_the_worksheet_is_off_by_default_and_its_routes_do_not_exist() -> None:
    settings = load_settings(environ={})
    assert settings.section("worksheet")["enabled"] is False
    client = create_app(settings).test_client()
    assert client.get("/worksheet/launch").status_code == 404


@pytest.mark.parametrize(
    ("worksheet", "message"),
    [
        ({"client_id": ""}, "worksheet.client_id"),
        ({"token_keys": []}, "worksheet.token_keys"),
        ({"issuers": []}, "worksheet.issuers"),
        ({"public_url": ""}, "worksheet.public_url"),
        ({"public_url": "http://cds.example.org"}, "https is required off loopback"),
        ({"token_keys": ["c2hvcnQ="]}, "not a Fernet key"),
        ({"scope_version": "v3"}, "scope_version"),
        ({"cookie_samesite": "None", "public_url": "http://127.0.0.1:8080"}, "cookie_samesite None"),
    ],
)
def test_switching_the_worksheet_on_needs_its_settings(worksheet: dict[str, Any], message: str) -> None:
    base = {
        "enabled": True,
        "public_url": "https://cds.example.org",
        "client_id": "x",
        "token_keys": [KEY],
        "issuers": ["https://ehr.example.org/fhir"],
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={}, overrides={"worksheet": {**base, **worksheet}})
    assert message in str(caught.value)
    assert "c2hvcnQ=" not in str(caught.value)  # a bad key is never echoed


def test_environment_overrides_reach_the_worksheet_settings() -> None:
    settings = load_settings(
        environ={
            "CDS_WORKSHEET_ENABLED": "true",
            "CDS_WORKSHEET_PUBLIC_URL": "https://cds.example.org",
            "CDS_WORKSHEET_CLIENT_ID": "abc",
            "CDS_WORKSHEET_TOKEN_KEYS": f"{KEY},{Fernet.generate_key().decode()}",
            "CDS_WORKSHEET_ISSUERS": "https://ehr.example.org/fhir",
            "CDS_WORKSHEET_IDLE_MINUTES": "15",
        }
    )
    section = settings.section("worksheet")
    assert section["enabled"] and len(section["token_keys"]) == 2 and section["idle_minutes"] == 15
    assert settings.worksheet_url == "https://cds.example.org"


# -- PKCE and scopes -----------------------------------------------------------------------------


def test_pkce_s256_matches_rfc_7636_appendix_b() -> None:
    assert code_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == (
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )


def test_scopes_are_smart_v2_by_default_v1_by_setting() -> None:
    types = ["Patient", "Observation", "Observation", "Condition"]
    assert scopes(types, "v2", standalone=False) == (
        "launch openid fhirUser patient/Patient.rs patient/Observation.rs patient/Condition.rs"
    )
    assert scopes(types, "v1", standalone=True) == (
        "launch/patient openid fhirUser patient/Patient.read patient/Observation.read patient/Condition.read"
    )


# -- the id_token ----------------------------------------------------------------------------------


class Issuer:
    """A fake OpenID issuer: its JWKS on a fault server, and id_tokens signed as asked."""

    def __init__(self, server: FaultServer) -> None:
        self.server = server
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP384R1())
        self.other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.publish(("rsa-1", self.rsa), ("ec-1", self.ec))
        self.smart_server = SmartServer(
            iss=server.base_url,
            issuer=server.base_url,
            authorization_endpoint=server.url("authorize"),
            token_endpoint=server.url("token"),
            jwks_uri=server.url("keys"),
        )

    def publish(self, *keys: tuple[str, Any]) -> None:
        published = []
        for kid, key in keys:
            jwk = json.loads(
                (
                    jwt.algorithms.RSAAlgorithm
                    if isinstance(key, rsa.RSAPrivateKey)
                    else jwt.algorithms.ECAlgorithm
                ).to_jwk(key.public_key())
            )
            published.append({**jwk, "kid": kid, "use": "sig"})
        self.server.json("keys", {"keys": published})

    def token(self, *, key: Any = None, kid: str = "rsa-1", alg: str = "RS256", **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": self.server.base_url,
            "aud": CLIENT_ID,
            "sub": "abc",
            "iat": now,
            "exp": now + 300,
            "nonce": "n-1",
            "fhirUser": "Practitioner/doc-1",
            **claims,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key or self.rsa, algorithm=alg, headers={"kid": kid})


@pytest.fixture
def issuer(fault_server: FaultServer) -> Issuer:
    return Issuer(fault_server)


def smart_client(issuers: list[str]) -> SmartClient:
    from cds_service.patient_data.fhir_client import FhirClient

    section = load_settings(environ={}).section("worksheet") | {
        "client_id": CLIENT_ID,
        "auth_timeout_seconds": 1.0,
    }
    fhir = FhirClient({"allowed_servers": issuers, "allow_http": True})
    return SmartClient(section, fhir, "http://127.0.0.1:9/worksheet/callback", ["Patient", "Observation"])


def test_a_valid_id_token_gives_the_user(issuer: Issuer) -> None:
    client = smart_client([issuer.server.base_url])
    assert client.verify_id_token(issuer.smart_server, issuer.token(), "n-1") == "Practitioner/doc-1"
    ec_token = issuer.token(
        key=issuer.ec, kid="ec-1", alg="ES384", fhirUser="https://ehr.example/fhir/Practitioner/x"
    )
    assert (
        client.verify_id_token(issuer.smart_server, ec_token, "n-1")
        == "https://ehr.example/fhir/Practitioner/x"
    )


def _forged(issuer: Issuer, case: str) -> str:
    if case == "alg none":
        header = base64.urlsafe_b64encode(b'{"alg":"none","kid":"rsa-1"}').rstrip(b"=").decode()
        body = base64.urlsafe_b64encode(json.dumps({"iss": issuer.server.base_url}).encode()).rstrip(b"=")
        return f"{header}.{body.decode()}."
    if case == "HS256 with the public key as secret":
        return jwt.encode({"iss": issuer.server.base_url, "aud": CLIENT_ID}, "secret", algorithm="HS256",
                          headers={"kid": "rsa-1"})  # fmt: skip
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong issuer", "another issuer"),
        ("wrong audience", "another client"),
        ("expired", "expired"),
        ("wrong nonce", "nonce"),
        ("no nonce", "nonce"),
        ("no fhirUser", "fhirUser"),
        ("signed by another key", "does not verify"),
        ("unknown kid", "no key"),
        ("several audiences, azp not ours", "azp"),
        ("no exp", "does not verify"),
        ("alg none", "not accepted"),
        ("HS256 with the public key as secret", "not accepted"),
        ("not a JWT", "not a JWT"),
    ],
)
def test_every_bad_id_token_is_refused(issuer: Issuer, case: str, expected: str) -> None:
    tokens = {
        "wrong issuer": lambda: issuer.token(iss="https://evil.example/fhir"),
        "wrong audience": lambda: issuer.token(aud="someone-else"),
        "expired": lambda: issuer.token(exp=int(time.time()) - 600, iat=int(time.time()) - 900),
        "wrong nonce": lambda: issuer.token(nonce="n-2"),
        "no nonce": lambda: issuer.token(nonce=None),
        "no fhirUser": lambda: issuer.token(fhirUser=None),
        "signed by another key": lambda: issuer.token(key=issuer.other),
        "unknown kid": lambda: issuer.token(kid="rsa-9"),
        "several audiences, azp not ours": lambda: issuer.token(aud=[CLIENT_ID, "other"], azp="other"),
        "no exp": lambda: issuer.token(exp=None),
        "alg none": lambda: _forged(issuer, "alg none"),
        "HS256 with the public key as secret": lambda: _forged(issuer, case),
        "not a JWT": lambda: "not-a-jwt",
    }
    with pytest.raises(SmartError) as caught:
        smart_client([issuer.server.base_url]).verify_id_token(issuer.smart_server, tokens[case](), "n-1")
    assert caught.value.kind == "identity"
    assert expected in caught.value.detail


def test_a_rotated_key_is_fetched_once_for_an_unknown_kid(issuer: Issuer) -> None:
    client = smart_client([issuer.server.base_url])
    assert client.verify_id_token(issuer.smart_server, issuer.token(), "n-1")
    issuer.publish(("rsa-2", issuer.other))  # the server rotates to a new key
    token = issuer.token(key=issuer.other, kid="rsa-2")
    fetches = sum(1 for r in issuer.server.requests if r.path.endswith("/keys"))
    assert client.verify_id_token(issuer.smart_server, token, "n-1") == "Practitioner/doc-1"
    assert sum(1 for r in issuer.server.requests if r.path.endswith("/keys")) == fetches + 1


# -- discovery ---------------------------------------------------------------------------------------


def smart_configuration(server: FaultServer, **overrides: Any) -> dict[str, Any]:
    document = {
        "issuer": server.base_url,
        "jwks_uri": server.url("keys"),
        "authorization_endpoint": server.url("authorize"),
        "token_endpoint": server.url("token"),
        "code_challenge_methods_supported": ["S256"],
        "capabilities": ["launch-ehr", "client-public", "sso-openid-connect", "permission-v2"],
    }
    return {**document, **overrides}


@pytest.mark.parametrize(
    ("document", "kind", "detail"),
    [
        ({"code_challenge_methods_supported": ["plain"]}, "bad_server", "PKCE S256"),
        ({"token_endpoint": None}, "bad_server", "token_endpoint"),
        ({"authorization_endpoint": "ftp://x/authorize"}, "bad_server", "authorization_endpoint"),
    ],
)
def test_an_unusable_discovery_document_is_refused(
    fault_server: FaultServer, document: dict[str, Any], kind: str, detail: str
) -> None:
    fault_server.json(".well-known/smart-configuration", smart_configuration(fault_server, **document))
    with pytest.raises(SmartError) as caught:
        smart_client([fault_server.base_url]).discover(fault_server.base_url)
    assert (caught.value.kind, detail in caught.value.detail) == (kind, True)


def test_discovery_falls_back_to_the_openid_configuration_for_the_issuer(fault_server: FaultServer) -> None:
    fault_server.json(
        ".well-known/smart-configuration", smart_configuration(fault_server, issuer=None, jwks_uri=None)
    )
    fault_server.json(
        ".well-known/openid-configuration",
        {"issuer": "https://idp.example/", "jwks_uri": "https://idp.example/k"},
    )
    client = smart_client([fault_server.base_url])
    client.allow_http = True
    server = client.discover(fault_server.base_url)
    assert (server.issuer, server.jwks_uri) == ("https://idp.example/", "https://idp.example/k")


# -- sessions ---------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sessions(tmp_path: Path) -> Sessions:
    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    return Sessions(lambda: store, Sealer([KEY]), idle_seconds=1800, max_seconds=8 * 3600, clock=Clock())


SESSION_FIELDS = {
    "iss": "https://ehr.example/fhir",
    "patient_id": "patient-secret-id",
    "user": "Practitioner/doc-1",
    "access_token": "access-token-secret-value",
    "token_expires_at": time.time() + 24 * 3600,
    "scope": "launch openid",
    "trial": None,
    "need_patient_banner": True,
}


def _raw_store_bytes(path: Path) -> bytes:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA wal_checkpoint(FULL)")
    connection.close()
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def test_a_session_keeps_its_token_sealed_in_the_store_and_the_cookie_holds_only_an_id(
    sessions: Sessions, tmp_path: Path
) -> None:
    cookie, _ = sessions.create(dict(SESSION_FIELDS))
    assert len(cookie) >= 43 and "access-token" not in cookie
    raw = _raw_store_bytes(tmp_path / "store.sqlite3")
    assert b"access-token-secret-value" not in raw and b"patient-secret-id" not in raw
    assert cookie.encode() not in raw  # only its SHA-256 is kept
    assert hashlib.sha256(cookie.encode()).hexdigest().encode() in raw
    loaded = sessions.load(cookie)
    assert (loaded.access_token, loaded.patient_id, loaded.user) == (
        "access-token-secret-value",
        "patient-secret-id",
        "Practitioner/doc-1",
    )
    assert "secret" not in repr(loaded)


@pytest.mark.parametrize(
    ("advance", "reason"),
    [(31 * 60, "idle"), (None, "expired"), ("token", "token_expired")],
)
def test_a_session_ends_idle_after_30_min_at_8_h_or_with_the_token_and_is_deleted(
    sessions: Sessions, advance: Any, reason: str
) -> None:
    clock: Clock = sessions.clock  # type: ignore[assignment]
    fields = dict(SESSION_FIELDS)
    if advance == "token":
        fields["token_expires_at"] = clock.now + 60
    cookie, session = sessions.create(fields)
    if advance is None:  # active every 20 min, for more than 8 hours
        for _ in range(25):
            clock.now += 20 * 60
            sessions.load(cookie) if clock.now < session.created_at + 8 * 3600 else None
    elif advance == "token":
        clock.now += 120
    else:
        clock.now += advance
    with pytest.raises(SessionProblem) as caught:
        sessions.load(cookie)
    assert caught.value.reason == reason
    assert sessions.store.get_worksheet_session(session.id_hash) is None  # the tokens are gone


def test_an_active_session_stays_open(sessions: Sessions) -> None:
    clock: Clock = sessions.clock  # type: ignore[assignment]
    cookie, _ = sessions.create(dict(SESSION_FIELDS))
    for _ in range(5):
        clock.now += 25 * 60
        assert sessions.load(cookie).user == "Practitioner/doc-1"


def test_keys_rotate_and_a_session_sealed_with_a_dropped_key_ends(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    old = Sessions(lambda: store, Sealer([KEY]), 1800, 8 * 3600)
    cookie, _ = old.create(dict(SESSION_FIELDS))
    new_key = Fernet.generate_key().decode()
    rotated = Sessions(lambda: store, Sealer([new_key, KEY]), 1800, 8 * 3600)
    assert rotated.load(cookie).user == "Practitioner/doc-1"
    dropped = Sessions(lambda: store, Sealer([new_key]), 1800, 8 * 3600)
    with pytest.raises(SessionProblem) as caught:
        dropped.load(cookie)
    assert caught.value.reason == "unreadable"


def test_a_launch_is_accepted_once_in_the_browser_that_started_it_within_10_minutes(
    sessions: Sessions,
) -> None:
    clock: Clock = sessions.clock  # type: ignore[assignment]
    state, binding = sessions.begin_launch({"verifier": "v"})
    with pytest.raises(LaunchProblem):
        sessions.finish_launch(state, "another-browser")
    state, binding = sessions.begin_launch({"verifier": "v"})
    assert sessions.finish_launch(state, binding)["verifier"] == "v"
    with pytest.raises(LaunchProblem):
        sessions.finish_launch(state, binding)  # used
    state, binding = sessions.begin_launch({"verifier": "v"})
    clock.now += 601
    with pytest.raises(LaunchProblem):
        sessions.finish_launch(state, binding)
    with pytest.raises(LaunchProblem):
        sessions.finish_launch("", binding)


# -- the page's content ---------------------------------------------------------------------------


def _eligible_cases() -> list[tuple[str, str]]:
    at = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    return [
        (s.name, trial)
        for s in all_scenarios(at)
        for trial, status in s.expected.items()
        if status == ELIGIBLE
    ]


@pytest.mark.parametrize(("scenario_name", "trial_id"), _eligible_cases())
def test_an_eligible_patients_worksheet_lists_every_criterion_with_evidence_or_a_to_confirm_mark(
    screener: Screener, scenario_name: str, trial_id: str
) -> None:
    at = datetime.now(UTC).replace(microsecond=0)
    scenario = next(s for s in all_scenarios(at) if s.name == scenario_name)
    resources = [entry["resource"] for entry in scenario.bundle()["entry"]]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    data = RawPatientData(patient, {"all": [r for r in resources if r is not patient]})
    result = next(
        r
        for r in screener.screen(scenario.patient_id, data, at.timestamp()).results
        if r.trial.id == trial_id
    )
    assert result.status == ELIGIBLE
    sheet = trial_sheet(result, "Europe/Paris")
    assert [c.id for c in sheet.criteria] == [c.id for c in result.trial.criteria]  # none missing, file order
    for line in sheet.criteria:
        assert line.evidence or line.to_confirm, f"{trial_id} {line.id}: shown without evidence"
        assert line.result in {"met", "not_met", "to_confirm"}, line  # eligible: nothing unknown
    assert [item.id for item in sheet.checklist] == [c.id for c in sheet.criteria if c.to_confirm]
    assert sheet.decidable and sheet.window.startswith("Opened")


# -- the app: headers, cookies, failures ----------------------------------------------------------


@pytest.fixture
def ehr(fault_server: FaultServer) -> FaultServer:
    """A fake EHR on a fault server: discovery, a JWKS; the tests program the rest."""
    fault_server.json(".well-known/smart-configuration", smart_configuration(fault_server))
    Issuer(fault_server)  # publishes /keys
    return fault_server


_SCREENERS: dict[str, Screener] = {}


def worksheet_screener(tmp_path: Path) -> Screener:
    """Knowledge loaded once for these tests (with the worksheet's card link and the Paris zone)."""
    if not _SCREENERS:
        _SCREENERS["one"] = Screener(worksheet_settings(tmp_path, "http://127.0.0.1:5000", ["http://x/fhir"]))
    return _SCREENERS["one"]


def make_app(tmp_path: Path, ehr: FaultServer, public_url: str = "http://127.0.0.1:5000", **ws: Any) -> Flask:
    settings = worksheet_settings(tmp_path, public_url, [ehr.base_url], **ws)
    return create_app(settings, screener=worksheet_screener(tmp_path))


def start_launch(client: FlaskClient, ehr: FaultServer, **params: str) -> dict[str, str]:
    query = {"iss": ehr.base_url, "launch": "xyz", **params}
    response = client.get("/worksheet/launch", query_string=query)
    assert response.status_code == 302, response.text
    target = urlsplit(response.headers["Location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == ehr.url("authorize")
    return {key: values[0] for key, values in parse_qs(target.query).items()}


def test_the_launch_sends_a_smart_v2_authorization_request_with_pkce(
    tmp_path: Path, ehr: FaultServer
) -> None:
    client = make_app(tmp_path, ehr).test_client()
    params = start_launch(client, ehr)
    assert params["response_type"] == "code" and params["client_id"] == CLIENT_ID
    assert params["redirect_uri"] == "http://127.0.0.1:5000/worksheet/callback"
    assert params["aud"] == ehr.base_url and params["launch"] == "xyz"
    assert params["code_challenge_method"] == "S256" and len(params["code_challenge"]) == 43
    assert params["state"] and params["nonce"] and params["state"] != params["nonce"]
    assert "patient/Observation.rs" in params["scope"].split() and "launch" in params["scope"].split()
    assert {"openid", "fhirUser"} <= set(params["scope"].split())


def test_a_standalone_launch_uses_the_configured_iss_and_asks_for_a_patient(
    tmp_path: Path, ehr: FaultServer
) -> None:
    client = make_app(tmp_path, ehr, standalone_iss=ehr.base_url).test_client()
    response = client.get("/worksheet/launch")
    params = parse_qs(urlsplit(response.headers["Location"]).query)
    assert "launch" not in params and "launch/patient" in params["scope"][0].split()


def test_cookies_are_httponly_samesite_and_secure_off_loopback(tmp_path: Path, ehr: FaultServer) -> None:
    loopback = (
        make_app(tmp_path / "a", ehr)
        .test_client()
        .get("/worksheet/launch", query_string={"iss": ehr.base_url, "launch": "x"})
    )
    cookie = loopback.headers["Set-Cookie"]
    assert cookie.startswith("worksheet-launch=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # http on loopback during development
    public = (
        make_app(tmp_path / "b", ehr, public_url="https://cds.example.org")
        .test_client()
        .get("/worksheet/launch", query_string={"iss": ehr.base_url, "launch": "x"})
    )
    cookie = public.headers["Set-Cookie"]
    assert cookie.startswith("__Host-worksheet-launch=") and "Secure" in cookie and "Path=/" in cookie


def test_pages_are_never_cached_and_have_a_strict_csp(tmp_path: Path, ehr: FaultServer) -> None:
    client = make_app(tmp_path, ehr).test_client()
    for response in (
        client.get("/worksheet/"),
        client.get("/worksheet/launch"),
        client.get("/worksheet/no-such-page"),
        client.get("/worksheet/static/worksheet.css"),
    ):
        assert response.headers["Cache-Control"] == "no-store"
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp and "unsafe" not in csp
        assert "frame-ancestors 'none'" in csp and response.headers["X-Frame-Options"] == "DENY"
        assert "Access-Control-Allow-Origin" not in response.headers
    html = client.get("/worksheet/").text
    assert "<script" not in html and "style=" not in html


def test_frame_ancestors_is_a_setting(tmp_path: Path, ehr: FaultServer) -> None:
    client = make_app(tmp_path, ehr, frame_ancestors=["https://ehr.example.org"]).test_client()
    csp = client.get("/worksheet/").headers["Content-Security-Policy"]
    assert "frame-ancestors https://ehr.example.org" in csp


@pytest.mark.parametrize(
    ("query", "status", "heading"),
    [
        ({}, 400, "This link cannot start the worksheet"),
        ({"launch": "x"}, 400, "This link cannot start the worksheet"),
        ({"iss": "https://evil.example/fhir", "launch": "x"}, 403, "not one the worksheet is set up for"),
        ({"iss": "EHR", "launch": ""}, 400, "This link cannot start the worksheet"),
        ({"iss": "EHR", "launch": "x" * 5000}, 400, "This link cannot start the worksheet"),
    ],
)
def test_a_bad_launch_gets_a_clear_page(
    tmp_path: Path, ehr: FaultServer, query: dict[str, str], status: int, heading: str
) -> None:
    query = {k: (ehr.base_url if v == "EHR" else v) for k, v in query.items()}
    response = make_app(tmp_path, ehr).test_client().get("/worksheet/launch", query_string=query)
    assert response.status_code == status and heading in title(response.text).replace("&#39;", "'")


def test_discovery_down_gets_a_clear_page(tmp_path: Path, fault_server: FaultServer) -> None:
    fault_server.status(".well-known/smart-configuration", 503)
    client = make_app(tmp_path, fault_server).test_client()
    response = client.get("/worksheet/launch", query_string={"iss": fault_server.base_url, "launch": "x"})
    assert response.status_code == 502 and "did not answer" in title(response.text)


@pytest.mark.parametrize("failure", ["refused", "hangs", "500", "invalid_grant"])
def test_the_token_endpoint_down_or_refusing_gets_a_clear_page(
    tmp_path: Path, ehr: FaultServer, failure: str
) -> None:
    if failure == "refused":
        ehr.json(
            ".well-known/smart-configuration", smart_configuration(ehr, token_endpoint=refused_url("/token"))
        )
    elif failure == "hangs":
        ehr.slow("token", 3.0)
    elif failure == "500":
        ehr.status("token", 500)
    else:
        ehr.json("token", {"error": "invalid_grant", "error_description": "code expired"}, status=400)
    client = make_app(tmp_path, ehr, auth_timeout_seconds=0.5).test_client()
    params = start_launch(client, ehr)
    started = time.monotonic()
    response = client.get("/worksheet/callback", query_string={"code": "c", "state": params["state"]})
    assert time.monotonic() - started < 2.5
    expected = (403, "refused to complete") if failure == "invalid_grant" else (502, "did not answer")
    assert (response.status_code, expected[1] in title(response.text).replace("&#39;", "'")) == (
        expected[0],
        True,
    )
    assert "worksheet-session" not in response.headers.get("Set-Cookie", "")


def test_a_wrong_or_replayed_state_gets_a_clear_page(tmp_path: Path, ehr: FaultServer) -> None:
    client = make_app(tmp_path, ehr).test_client()
    params = start_launch(client, ehr)
    response = client.get("/worksheet/callback", query_string={"code": "c", "state": params["state"] + "x"})
    assert response.status_code == 400 and title(response.text) == "This sign-in could not be completed"
    # The state was not consumed by the wrong one; another browser (no launch cookie) cannot use it.
    other = make_app(tmp_path, ehr).test_client()
    response = other.get("/worksheet/callback", query_string={"code": "c", "state": params["state"]})
    assert response.status_code == 400


def test_a_denied_authorization_gets_a_clear_page(tmp_path: Path, ehr: FaultServer) -> None:
    client = make_app(tmp_path, ehr).test_client()
    params = start_launch(client, ehr)
    response = client.get(
        "/worksheet/callback",
        query_string={
            "error": "access_denied",
            "error_description": "<b>User said no</b>",
            "state": params["state"],
        },
    )
    assert response.status_code == 403 and title(response.text) == "The EHR did not authorize the worksheet"
    assert "access_denied: &lt;b&gt;User said no&lt;/b&gt;" in response.text  # shown, escaped


def open_session(app: Flask, client: FlaskClient, iss: str, **fields: Any) -> str:
    """A session as the callback makes it (for tests of the pages behind it)."""
    ws = app.extensions["worksheet"]
    values = dict(SESSION_FIELDS) | {"iss": iss} | fields
    cookie, _ = ws.sessions.create(values)
    client.set_cookie(ws.cookies.session, cookie, domain="localhost")
    return cookie


@pytest.mark.parametrize(
    ("failure", "status", "heading"),
    [
        ("slow", 504, "too slow"),
        ("401", 403, "refused the worksheet"),
        ("500", 502, "could not be read"),
    ],
)
def test_the_fhir_server_slow_or_failing_gets_a_clear_page(
    tmp_path: Path, ehr: FaultServer, failure: str, status: int, heading: str
) -> None:
    app = make_app(tmp_path, ehr, fhir_deadline_seconds=0.5)
    client = app.test_client()
    open_session(app, client, ehr.base_url)
    if failure == "slow":
        ehr.slow("Observation", 3.0)
    else:
        ehr.status("Observation", int(failure))
    started = time.monotonic()
    response = client.get("/worksheet/")
    assert time.monotonic() - started < 2.0
    assert response.status_code == status and heading in title(response.text).replace("&#39;", "'")


def test_an_expired_session_gets_a_clear_page_and_its_cookie_is_cleared(
    tmp_path: Path, ehr: FaultServer
) -> None:
    app = make_app(tmp_path, ehr)
    client = app.test_client()
    cookie = open_session(app, client, ehr.base_url)
    ws = app.extensions["worksheet"]
    ws.sessions.clock = lambda: time.time() + 31 * 60
    response = client.get("/worksheet/")
    assert response.status_code == 401 and title(response.text) == "Your worksheet session has ended"
    assert "30 minutes without activity" in response.text
    assert "worksheet-session=;" in response.headers["Set-Cookie"]
    assert ws.sessions.store.get_worksheet_session(hashlib.sha256(cookie.encode()).hexdigest()) is None


def test_posts_need_the_csrf_token_and_nothing_is_recorded_without_it(
    tmp_path: Path, ehr: FaultServer
) -> None:
    app = make_app(tmp_path, ehr)
    client = app.test_client()
    open_session(app, client, ehr.base_url)
    for form in ({}, {"csrf_token": "wrong"}):
        response = client.post("/worksheet/trials/NCT05184296/record", data={**form, "decision": "referred"})
        assert response.status_code == 403 and title(response.text) == "This form cannot be accepted"
    assert app.extensions["cds"].store.screening_log() == []
    assert client.post("/worksheet/end").status_code == 403


def test_the_user_can_end_the_session_and_its_tokens_are_deleted(tmp_path: Path, ehr: FaultServer) -> None:
    app = make_app(tmp_path, ehr)
    client = app.test_client()
    cookie = open_session(app, client, ehr.base_url)
    ws = app.extensions["worksheet"]
    csrf = ws.sessions.load(cookie).csrf
    response = client.post("/worksheet/end", data={"csrf_token": csrf})
    assert response.status_code == 200 and title(response.text) == "Session ended"
    assert ws.sessions.store.get_worksheet_session(hashlib.sha256(cookie.encode()).hexdigest()) is None
    assert client.get("/worksheet/").status_code == 401


def test_nothing_secret_reaches_the_log(tmp_path: Path, ehr: FaultServer) -> None:
    """Every record rendered by the production JSON formatter (extra fields included)."""
    issuer = Issuer(ehr)
    app = make_app(tmp_path, ehr, fhir_deadline_seconds=0.5)
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)  # after create_app, which configures logging itself
    try:
        _launch_and_page(app, ehr, issuer)
    finally:
        configure_logging("INFO")
    text = stream.getvalue()
    assert "worksheet session started" in text and '"user_type":"Patient"' in text.replace(" ", "")
    for secret in (
        "the-code-value",
        "at-secret-value",
        SESSION_FIELDS["access_token"],
        "patient-secret-id",
        KEY,
    ):
        assert secret not in text


def _launch_and_page(app: Flask, ehr: FaultServer, issuer: Issuer) -> None:
    """A refused code, a launch by a patient user (a patient-facing launch), a page whose FHIR server
    refuses the token."""
    client = app.test_client()
    params = start_launch(client, ehr)
    client.get("/worksheet/callback", query_string={"code": "the-code-value", "state": params["state"]})
    other = start_launch(client, ehr)
    id_token = issuer.token(nonce=other["nonce"], fhirUser="Patient/patient-secret-id")
    answer = {"access_token": "at-secret-value", "token_type": "Bearer", "patient": "patient-secret-id"}
    ehr.json("token", answer | {"id_token": id_token})
    done = client.get("/worksheet/callback", query_string={"code": "c", "state": other["state"]})
    assert done.status_code == 303
    open_session(app, client, ehr.base_url)
    ehr.status("Observation", 401)
    assert client.get("/worksheet/").status_code == 403


@pytest.mark.parametrize(
    ("app_context", "lands_on"),
    [
        ('{"trial":"NCT03788837"}', "/worksheet/trials/NCT03788837"),  # what the card sends
        ("NCT01849237", "/worksheet/trials/NCT01849237"),  # a bare NCT id
        ('{"trial":"NCT99999999"}', "/worksheet/"),  # not screened here: the overview
        (None, "/worksheet/"),  # no appContext (Oracle Health, the SMART launcher)
    ],
)
def test_the_callback_opens_the_trial_named_by_app_context(
    tmp_path: Path, ehr: FaultServer, app_context: str | None, lands_on: str
) -> None:
    issuer = Issuer(ehr)
    client = make_app(tmp_path, ehr).test_client()
    params = start_launch(client, ehr)
    answer = {
        "access_token": "at-1",
        "token_type": "Bearer",
        "expires_in": 3600,
        "scope": params["scope"],
        "patient": "p-1",
        "id_token": issuer.token(nonce=params["nonce"]),
        "need_patient_banner": False,
    }
    if app_context is not None:
        answer["appContext"] = app_context
    ehr.json("token", answer)
    response = client.get("/worksheet/callback", query_string={"code": "c", "state": params["state"]})
    assert response.status_code == 303 and urlsplit(response.headers["Location"]).path == lands_on
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("worksheet-session=") and "HttpOnly" in cookie and "at-1" not in cookie
    (token,) = [r for r in ehr.requests if r.path.endswith("/token")]
    assert token.method == "POST" and token.header("Authorization") is None  # a public client


def test_a_confidential_client_sends_its_secret_with_http_basic(tmp_path: Path, ehr: FaultServer) -> None:
    issuer = Issuer(ehr)
    client = make_app(tmp_path, ehr, client_secret="s3cret").test_client()
    params = start_launch(client, ehr)
    ehr.json(
        "token",
        {
            "access_token": "a",
            "token_type": "bearer",
            "patient": "p",
            "id_token": issuer.token(nonce=params["nonce"]),
        },
    )
    client.get("/worksheet/callback", query_string={"code": "c", "state": params["state"]})
    (token,) = [r for r in ehr.requests if r.path.endswith("/token")]
    expected = base64.b64encode(f"{CLIENT_ID}:s3cret".encode()).decode()
    assert token.header("Authorization") == f"Basic {expected}"


def test_with_the_worksheet_on_every_card_links_to_it_and_the_site_link_stays(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        screening={"site_link_url": "https://intranet.example.org/protocols/{trial_id}"},
        worksheet={
            "enabled": True,
            "public_url": "https://cds.example.org",
            "client_id": CLIENT_ID,
            "token_keys": [KEY],
            "issuers": ["https://ehr.example.org/fhir"],
        },
    )
    screener = Screener(settings)
    at = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    scenario = next(s for s in all_scenarios(at) if s.name == "ecmo-eligible")
    resources = [entry["resource"] for entry in scenario.bundle()["entry"]]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    outcome = screener.screen(
        scenario.patient_id, RawPatientData(patient, {"all": resources}), at.timestamp()
    )
    cards = screener.cards(outcome)
    assert cards
    for result, card in cards:
        worksheet_links = [link for link in card["links"] if link["type"] == "smart" and "appContext" in link]
        assert worksheet_links == [
            {
                "label": "Open the screening worksheet",
                "url": "https://cds.example.org/worksheet/launch",
                "type": "smart",
                "appContext": json.dumps({"trial": result.trial.id}, separators=(",", ":")),
            }
        ]
        site = [link for link in card["links"] if link["url"].startswith("https://intranet.example.org/")]
        assert site == [
            {
                "label": "Site screening protocol",
                "url": f"https://intranet.example.org/protocols/{result.trial.id}",
                "type": "smart",
            }
        ]
        if result.to_confirm:  # the checklist's count in the card, the list in the worksheet
            assert f"**To confirm ({len(result.to_confirm)})** in the screening worksheet." in card["detail"]
            assert "☐" not in card["detail"]


_junk = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from(["/worksheet/launch", "/worksheet/callback", "/worksheet/", "/worksheet/trials/x"]),
    params=st.dictionaries(
        st.sampled_from(["iss", "launch", "state", "code", "error", "error_description"]), _junk
    ),
    form=st.dictionaries(st.sampled_from(["decision", "reason", "confirmed", "csrf_token"]), _junk),
    with_session=st.booleans(),
    with_csrf=st.booleans(),
)
def test_no_input_gives_a_500(
    tmp_path: Path,
    fault_server: FaultServer,
    route: str,
    params: dict[str, str],
    form: dict[str, str],
    with_session: bool,
    with_csrf: bool,
) -> None:
    app = _FUZZ_APPS.get("app") or _FUZZ_APPS.setdefault("app", make_app(tmp_path, fault_server))
    client = app.test_client()
    if with_session:
        cookie = open_session(app, client, fault_server.base_url)
        if with_csrf:
            form["csrf_token"] = app.extensions["worksheet"].sessions.load(cookie).csrf
    for response in (
        client.get(route, query_string=params),
        client.post("/worksheet/trials/NCT05184296/record", data=form),
        client.post("/worksheet/end", data=form),
    ):
        assert response.status_code < 500, response.text
        assert response.headers["Content-Type"].startswith("text/html")


_FUZZ_APPS: dict[str, Flask] = {}
