"""The integration harness (cds_service.tools.harness) against the service served over real HTTP and the real
FHIR server (sekmet): shipped scenarios in both modes, a deliberately broken trial file, JWT signing,
JUnit XML, clean-up, and the id safety rules."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from werkzeug.serving import make_server

from cds_service import cli
from cds_service.app import create_app
from cds_service.base.config import PROJECT_ROOT, Settings
from cds_service.protocol.auth import AuthError, JwtVerifier
from cds_service.tools.fhir_server import FhirTestServer
from cds_service.tools.harness import (
    HARNESS_TAG,
    JWT_LIFETIME_SECONDS,
    Harness,
    HarnessError,
    HarnessOptions,
    HarnessReport,
    HarnessScenario,
    JwtSigner,
    fill_template,
    new_run_id,
    run_harness,
    service_base,
)
from cds_service.tools.scenario_builder import PatientBuilder
from cds_service.tools.scenarios import all_scenarios
from tests.conftest import make_settings

MSC = "NCT01849237"
ISSUER = "https://harness.test.example.org"


# -- serving the app over HTTP -------------------------------------------------------------------------


@contextlib.contextmanager
def served(settings: Settings | Callable[[str], Settings]) -> Iterator[str]:
    """The service on a free 127.0.0.1 port (werkzeug, threaded); yields its base URL.

    ``settings`` may be a function of the base URL (for ``server.public_url``): the port is bound
    first, then the app is built, so there is no window in which another process can take the port.
    """
    apps: list[Flask] = []

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        return apps[0](environ, start_response)

    server = make_server("127.0.0.1", 0, wsgi, threaded=True)
    url = f"http://127.0.0.1:{server.port}"
    try:
        apps.append(create_app(settings(url) if callable(settings) else settings))
    except BaseException:
        server.server_close()
        raise
    thread = threading.Thread(target=server.serve_forever, name="harness-test-service", daemon=True)
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        state = apps[0].extensions["cds"]
        if state._store is not None:
            state._store.close()


@pytest.fixture
def service_url(tmp_path: Path) -> Iterator[str]:
    with served(make_settings(tmp_path, fhir={"allow_http": True})) as url:
        yield url


# -- in-test scenarios (the NCT01849237 thin slice) -----------------------------------------------------


def msc_scenarios(now: datetime) -> list[HarnessScenario]:
    def scenario(name: str, story: str, status: str, builder: PatientBuilder) -> HarnessScenario:
        return HarnessScenario(name, story, {MSC: status}, builder.transaction(), "test")

    eligible = PatientBuilder("cdsh-test-msc-eligible", now, age=45)
    eligible.septic_shock_story(onset_hours=4)
    eligible.anc(0.4, hours=2)
    normal = PatientBuilder("cdsh-test-msc-normal-anc", now, age=45)
    normal.septic_shock_story(onset_hours=4)
    normal.anc(5.2, hours=2)
    unknown = PatientBuilder("cdsh-test-msc-no-anc", now, age=50)
    unknown.septic_shock_story(onset_hours=3)
    late = PatientBuilder("cdsh-test-msc-late", now, age=45)
    late.septic_shock_story(onset_hours=14)
    late.anc(0.4, hours=2)
    return [
        scenario("msc-eligible", "septic shock 4 h ago, ANC 0.4", "eligible", eligible),
        scenario("msc-normal-anc", "septic shock 4 h ago, ANC 5.2", "not_eligible", normal),
        scenario("msc-no-anc", "septic shock 3 h ago, no ANC", "possibly_eligible", unknown),
        scenario("msc-window-closed", "septic shock 14 h ago, ANC 0.4", "window_closed", late),
    ]


def options(service: str, fhir: FhirTestServer, **extra: Any) -> HarnessOptions:
    return HarnessOptions(service=service, fhir=fhir.base_url, timeout=30, **extra)


def run(opts: HarnessOptions, scenarios: list[HarnessScenario] | None = None) -> tuple[HarnessReport, str]:
    out = io.StringIO()
    report = run_harness(opts, scenarios, out=out)
    return report, out.getvalue()


def junit_cases(path: Path) -> list[ET.Element]:
    root = ET.parse(path).getroot()  # raises on invalid XML
    assert root.tag == "testsuites"
    return list(root.iter("testcase"))


def assert_cleaned(fhir: FhirTestServer, scenarios: list[HarnessScenario], run_id: str) -> None:
    """Nothing the run loaded (every id with ``-<run_id>``) is left on the FHIR server."""
    assert run_id
    for scenario in scenarios:
        for resource in scenario.with_run_id(run_id).resources():
            ref = f"{resource['resourceType']}/{resource['id']}"
            status = fhir.session.get(fhir.url(ref), timeout=10).status_code
            assert status in (404, 410), f"{ref} left on the FHIR server (HTTP {status})"


# -- acceptance: shipped scenarios, both modes ---------------------------------------------------------


@pytest.mark.fhir
def test_shipped_scenarios_pass_in_both_modes(
    service_url: str, fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    junit = tmp_path / "harness.xml"
    report, output = run(options(service_url, fhir_server, mode="both", junit=str(junit)))
    assert report.exit_code == 0, output
    shipped = all_scenarios(datetime.now(UTC))
    checks = sum(len(s.expected) for s in shipped)
    cases = junit_cases(junit)
    assert len(cases) == checks * 2
    assert {c.get("classname").split(".")[1] for c in cases} == {"prefetch", "fetch"}
    assert not [c for c in cases if c.find("failure") is not None]
    assert "all passed" in output
    for scenario in shipped:
        status = fhir_server.session.get(
            fhir_server.url(f"Patient/{scenario.builder.patient_id}-{report.run_id}"), timeout=10
        )
        assert status.status_code in (404, 410), "the harness must delete what it loaded"


@pytest.mark.fhir
def test_cli_with_a_directory_of_site_scenario_files(
    service_url: str, fhir_server: FhirTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Site files written long ago (evaluatedAt) are shifted to now before loading."""
    written = datetime(2026, 1, 15, 8, 30, tzinfo=UTC)
    folder = tmp_path / "site-scenarios"
    folder.mkdir()
    chosen = all_scenarios(written)[:3]
    for scenario in chosen:
        document = {
            "name": scenario.name,
            "story": scenario.story,
            "evaluatedAt": written.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "expected": scenario.expected,
            "bundle": scenario.bundle(),
        }
        (folder / f"{scenario.name}.json").write_text(json.dumps(document), encoding="utf-8")
    junit = tmp_path / "site.xml"
    code = cli.main(
        [
            "harness",
            "--service",
            f"{service_url}/cds-services",
            "--fhir",
            fhir_server.base_url,
            "--scenarios",
            str(folder),
            "--mode",
            "both",
            "--junit",
            str(junit),
        ]
    )
    output = capsys.readouterr().out
    assert code == 0, output
    assert len(junit_cases(junit)) == 2 * sum(len(s.expected) for s in chosen)


# -- in-test scenarios: the mechanics -----------------------------------------------------------------


@pytest.mark.fhir
def test_in_test_scenarios_pass_both_modes_with_junit_and_clean_up(
    service_url: str, fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    scenarios = msc_scenarios(datetime.now(UTC).replace(microsecond=0))
    junit = tmp_path / "junit.xml"
    # With a FHIR access token (sekmet ignores it): sent as fhirAuthorization, never printed.
    opts = options(service_url, fhir_server, junit=str(junit), token="harness-secret-access-token")
    report, output = run(opts, scenarios)
    assert report.exit_code == 0, output
    assert "harness-secret" not in output and b"harness-secret" not in junit.read_bytes()
    cases = junit_cases(junit)
    assert len(cases) == len(scenarios) * 2  # one trial each × prefetch and fetch
    names = {(c.get("classname"), c.get("name")) for c in cases}
    assert ("cds-harness.fetch.msc-eligible", f"{MSC} expected eligible [fetch]") in names
    assert all(float(c.get("time")) > 0 for c in cases)
    table = output.splitlines()
    assert table[0].split() == ["scenario", "trial", "mode", "expected", "got", "latency", "result"]
    # "got" is what the card's extension.screening says, not the card's text.
    assert any(
        line.split()[:5] == ["msc-eligible", MSC, "prefetch", "eligible", "eligible"] for line in table
    )
    assert any(
        line.split()[:5] == ["msc-no-anc", MSC, "fetch", "possibly_eligible", "possibly_eligible"]
        for line in table
    )
    assert any(
        line.split()[:6] == ["msc-normal-anc", MSC, "fetch", "not_eligible", "no", "card"] for line in table
    )
    assert_cleaned(fhir_server, scenarios, report.run_id)


@pytest.mark.fhir
def test_broken_trial_file_fails_naming_the_scenario(fhir_server: FhirTestServer, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for folder in ("mappings", "trials", "cards"):
        shutil.copytree(PROJECT_ROOT / folder, data / folder)
    (trial,) = (data / "trials").glob(f"{MSC}*.yaml")
    text = trial.read_text(encoding="utf-8")
    broken = text.replace('op: "<=", threshold: 1.0,', 'op: "<=", threshold: 0.01,')
    assert broken != text, "the ANC threshold line moved: update this test"
    trial.write_text(broken, encoding="utf-8")
    settings = make_settings(tmp_path, fhir={"allow_http": True}, data={"dir": str(data)})
    junit = tmp_path / "broken.xml"
    with served(settings) as url:
        report, output = run(options(url, fhir_server, junit=str(junit)))  # the shipped scenarios
    assert report.exit_code == 1, output
    failing = report.failing_scenarios
    # Every scenario that expects an MSC card on a charted ANC above 0.01 loses it, and only MSC checks fail.
    expected_eligible = {
        s.name for s in all_scenarios(datetime.now(UTC)) if s.expected.get(MSC) == "eligible"
    }
    # An ANC charted as "< 0.1" cannot be compared with "≤ 0.01": unknown, so it keeps a (possibly
    # eligible) card — it does not lose it like the others.
    expected_eligible.discard("msc-anc-censored-low")
    assert "msc-eligible" in expected_eligible and expected_eligible <= set(failing)
    assert {c.trial for c in report.failures} == {MSC}
    for name in failing:
        assert f"FAIL {name} / {MSC}" in output
        assert name in output.splitlines()[-1]  # the summary line names it
    assert f"expected a {MSC} card (eligible), got no card" in output
    failed_cases = [c for c in junit_cases(junit) if c.find("failure") is not None]
    assert {c.get("classname").split(".", 2)[2] for c in failed_cases} == set(failing)
    assert all(MSC in c.get("name") for c in failed_cases)


# -- JWT ----------------------------------------------------------------------------------------------


def secured_service(tmp_path: Path, jwks: dict[str, Any]) -> contextlib.AbstractContextManager[str]:
    """The service requiring a JWT from ISSUER (keys in a jwks_file); public_url = its own address."""
    jwks_file = tmp_path / "harness-jwks.json"
    jwks_file.write_text(json.dumps(jwks), encoding="utf-8")
    return served(
        lambda url: make_settings(
            tmp_path,
            fhir={"allow_http": True},
            server={"public_url": url},
            security={"trusted_clients": {ISSUER: {"jwks_file": str(jwks_file)}}},
        )
    )


@pytest.mark.fhir
def test_jwt_signed_calls_pass_and_unsigned_ones_get_401(
    fhir_server: FhirTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An EC P-384 private JWK with its own kid (→ ES384), and an RSA PEM whose public JWKS the
    # harness prints itself (--print-jwks; kid = the key's RFC 7638 thumbprint → RS384).
    ec_key = ec.generate_private_key(ec.SECP384R1())
    ec_jwk = jwt.algorithms.ECAlgorithm.to_jwk(ec_key, as_dict=True) | {"kid": "harness-ec-1"}
    ec_file = tmp_path / "ec-key.json"
    ec_file.write_text(json.dumps(ec_jwk), encoding="utf-8")
    rsa_file = tmp_path / "rsa-key.pem"
    rsa_file.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert cli.main(["harness", "--jwt-key", str(rsa_file), "--print-jwks"]) == 0
    rsa_jwks = json.loads(capsys.readouterr().out)
    assert rsa_jwks["keys"][0]["alg"] == "RS384" and "d" not in rsa_jwks["keys"][0]
    ec_public = {k: v for k, v in ec_jwk.items() if k != "d"}
    scenarios = msc_scenarios(datetime.now(UTC).replace(microsecond=0))[:2]
    run_ids = []
    with secured_service(tmp_path, {"keys": [ec_public, *rsa_jwks["keys"]]}) as url:
        for key_file in (ec_file, rsa_file):
            report, output = run(
                options(url, fhir_server, jwt_key=str(key_file), jwt_issuer=ISSUER), scenarios
            )
            assert report.exit_code == 0, output
            run_ids.append(report.run_id)
        unsigned, output = run(options(url, fhir_server, mode="prefetch"), scenarios)
        run_ids.append(unsigned.run_id)
        assert unsigned.exit_code == 1
        assert {c.got for c in unsigned.cases} == {"HTTP 401"}
        assert set(unsigned.failing_scenarios) == {s.name for s in scenarios}
        # A token for another audience (wrong public_url) is refused too, with a hint.
        wrong = options(url.replace("127.0.0.1", "localhost"), fhir_server, jwt_key=str(ec_file))
        wrong.jwt_issuer = ISSUER
        report, output = run(wrong, scenarios)
        assert report.exit_code == 1 and "server.public_url" in output
        run_ids.append(report.run_id)
    for run_id in run_ids:
        assert_cleaned(fhir_server, scenarios, run_id)


def test_signer_claims_and_headers_verify_with_the_services_verifier(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = tmp_path / "key.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    signer = JwtSigner.from_file(pem, ISSUER, kid="k-7", jku="https://harness.test.example.org/jwks.json")
    audience = "https://cds.example.org/base/cds-services/septic-shock-trial-screening"
    token = signer.token(audience)
    header = jwt.get_unverified_header(token)
    assert header == {
        "alg": "ES384",
        "typ": "JWT",
        "kid": "k-7",
        "jku": "https://harness.test.example.org/jwks.json",
    }
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims) == {"iss", "aud", "iat", "exp", "jti"}
    assert claims["aud"] == audience and claims["iss"] == ISSUER
    assert 0 < claims["exp"] - claims["iat"] <= JWT_LIFETIME_SECONDS <= 300
    assert signer.token(audience) != token  # a fresh jti per call
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(signer.jwks()), encoding="utf-8")
    seen: set[str] = set()

    def guard(key: str, expires: float) -> bool:
        if key in seen:
            return False
        seen.add(key)
        return True

    security = {"trusted_clients": {ISSUER: {"jwks_file": str(jwks_file)}}}
    verifier = JwtVerifier(security, guard)
    unsigned_jku = JwtSigner(key, ISSUER, kid="k-7")
    assert verifier.verify(f"Bearer {unsigned_jku.token(audience)}", audience)["iss"] == ISSUER
    with pytest.raises(AuthError):
        verifier.verify(f"Bearer {unsigned_jku.token(audience)}", audience + "/feedback")
    with pytest.raises(Exception, match="P-384 or P-256"):
        JwtSigner(ec.generate_private_key(ec.SECP521R1()), ISSUER)


# -- the CDS client's side ----------------------------------------------------------------------------


def test_prefetch_tokens_are_filled_like_a_cds_client() -> None:
    context = {"userId": "Practitioner/dr-1", "patientId": "cdsh-p1"}
    assert fill_template("Patient/{{context.patientId}}", context) == "Patient/cdsh-p1"
    assert fill_template("Practitioner/{{userPractitionerId}}", context) == "Practitioner/dr-1"
    assert fill_template("Observation?patient={{ context.patientId }}&code=1", context) == (
        "Observation?patient=cdsh-p1&code=1"
    )
    assert fill_template("Encounter/{{context.encounterId}}", context) is None  # not in context
    assert fill_template("PractitionerRole/{{userPractitionerRoleId}}", context) is None
    assert fill_template("Observation?date=ge{{today() - 1 days}}", context) is None  # 3.0 ballot only
    assert service_base("https://cds.example.org/x/cds-services/") == "https://cds.example.org/x"


@pytest.mark.fhir
def test_failing_prefetch_keys_are_left_out(fhir_server: FhirTestServer, service_url: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    builder = PatientBuilder("cdsh-test-prefetch", now)
    fhir_server.post_transaction(builder.transaction())
    try:
        harness = Harness(options(service_url, fhir_server))
        notes: list[str] = []
        prefetch = harness.prefetch(
            {
                "patient": "Patient/{{context.patientId}}",
                "conditions": "Condition?patient={{context.patientId}}",
                "encounter": "Encounter/{{context.encounterId}}",
                "missing": "Patient/{{context.patientId}}-nobody",
                "badDate": "Observation?patient={{context.patientId}}&date=garbage",
            },
            {"userId": "Practitioner/x", "patientId": builder.patient_id},
            notes,
        )
        harness.close()
        assert prefetch["patient"]["id"] == builder.patient_id
        assert prefetch["conditions"]["resourceType"] == "Bundle"
        assert set(prefetch) == {"patient", "conditions"}
        assert len(notes) == 3
    finally:
        fhir_server.delete_patient_everything(builder.patient_id)


# -- id safety ----------------------------------------------------------------------------------------


@pytest.mark.fhir
def test_ids_without_the_prefix_and_foreign_patients_are_refused(
    fhir_server: FhirTestServer, service_url: str
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    real = PatientBuilder("real-patient-42", now)
    report, _ = run(
        options(service_url, fhir_server),
        [HarnessScenario("real", "", {MSC: "eligible"}, real.transaction(), "test")],
    )
    assert report.exit_code == 2 and "must start with 'cdsh-'" in report.error
    assert fhir_server.session.get(fhir_server.url("Patient/real-patient-42"), timeout=10).status_code == 404
    # A cdsh- patient that exists on the server but was not loaded by the harness is never touched
    # (the run's own id, given here, is the only way to collide with it).
    foreign = {"resourceType": "Patient", "id": "cdsh-test-foreign-run1", "gender": "female"}
    fhir_server.put(foreign)
    try:
        builder = PatientBuilder("cdsh-test-foreign", now)
        report, _ = run(
            options(service_url, fhir_server, run_id="run1"),
            [HarnessScenario("foreign", "", {MSC: "eligible"}, builder.transaction(), "test")],
        )
        assert report.exit_code == 2 and "refusing to overwrite" in report.error
        stored = fhir_server.get("Patient/cdsh-test-foreign-run1")
        assert stored["gender"] == "female" and "tag" not in stored.get("meta", {})
    finally:
        fhir_server.delete_patient_everything("cdsh-test-foreign-run1")


@pytest.mark.fhir
def test_keep_leaves_tagged_data_and_a_rerun_reuses_it(fhir_server: FhirTestServer, service_url: str) -> None:
    scenarios = msc_scenarios(datetime.now(UTC).replace(microsecond=0))[:1]
    report, output = run(options(service_url, fhir_server, mode="prefetch", keep=True), scenarios)
    assert report.exit_code == 0, output
    assert f"--run-id {report.run_id}" in output
    patient = fhir_server.get(f"Patient/{scenarios[0].patient_id}-{report.run_id}")
    assert HARNESS_TAG["code"] in [t["code"] for t in patient["meta"]["tag"]]
    assert "HTEST" in [s["code"] for s in patient["meta"]["security"]]
    kept = report.run_id
    report, output = run(options(service_url, fhir_server, mode="fetch", run_id=kept), scenarios)
    assert report.exit_code == 0, output  # the same ids: overwritten, then cleaned
    assert_cleaned(fhir_server, scenarios, kept)


# -- a fresh patient id per run: earlier feedback cannot interfere ------------------------------------


def test_run_id_renames_every_resource_and_reference() -> None:
    (scenario, *_) = msc_scenarios(datetime.now(UTC).replace(microsecond=0))
    renamed = scenario.with_run_id("ab12cd")
    assert renamed.patient_id == "cdsh-test-msc-eligible-ab12cd"
    originals = {f"{r['resourceType']}/{r['id']}" for r in scenario.resources()}
    text = json.dumps(renamed.bundle)
    for ref in originals:
        assert f'"{ref}"' not in text, f"{ref} kept its old id somewhere"
    references = [r["subject"]["reference"] for r in renamed.resources() if "subject" in r]
    assert references and set(references) == {"Patient/cdsh-test-msc-eligible-ab12cd"}
    urls = [e["request"]["url"] for e in renamed.bundle["entry"]]
    assert urls == [f"{r['resourceType']}/{r['id']}" for r in renamed.resources()]
    assert scenario.patient_id == "cdsh-test-msc-eligible"  # the original is untouched
    long_id = HarnessScenario(
        "long", "", {MSC: "eligible"}, PatientBuilder("cdsh-" + "x" * 55, datetime.now(UTC)).transaction()
    )
    with pytest.raises(HarnessError, match="64 characters"):
        long_id.with_run_id("ab12cd")


def test_each_run_gets_a_fresh_run_id() -> None:
    ids = {new_run_id() for _ in range(50)}
    assert len(ids) == 50 and all(re.fullmatch(r"[a-z0-9]{6}", i) for i in ids)
    report = HarnessReport(run_id="zz9")
    assert "harness run zz9:" in report.render()


@pytest.mark.fhir
def test_an_override_stored_for_an_earlier_run_cannot_silence_the_next_one(
    fhir_server: FhirTestServer, service_url: str
) -> None:
    """The deployment silences an overridden card for 24 h per patient and trial. A clinician (or
    an earlier run) overrides the MSC card of a harness patient; the next run still passes, because
    its patients are new — while re-using the silenced run's ids fails, which shows the silence."""
    scenarios = msc_scenarios(datetime.now(UTC).replace(microsecond=0))[:1]  # msc-eligible
    first, output = run(options(service_url, fhir_server, mode="prefetch", keep=True), scenarios)
    assert first.exit_code == 0, output
    patient_id = f"{scenarios[0].patient_id}-{first.run_id}"
    hook = f"{service_url}/cds-services/septic-shock-trial-screening"
    call = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": fhir_server.base_url,
        "context": {"userId": "Practitioner/x", "patientId": patient_id},
    }
    (card,) = [c for c in requests.post(hook, json=call, timeout=30).json()["cards"] if MSC in json.dumps(c)]
    feedback = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "outcomeTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "overrideReason": {"reason": {"code": "declined", "display": "Declined"}},
            }
        ]
    }
    assert requests.post(f"{hook}/feedback", json=feedback, timeout=30).status_code == 200
    second, output = run(options(service_url, fhir_server, mode="fetch"), scenarios)
    assert second.exit_code == 0, output
    assert second.run_id != first.run_id
    silenced, output = run(options(service_url, fhir_server, mode="fetch", run_id=first.run_id), scenarios)
    assert silenced.exit_code == 1 and "got no card" in output, output  # the override silenced it
    assert_cleaned(fhir_server, scenarios, first.run_id)


# -- the checks, without servers -----------------------------------------------------------------------


def test_card_rules_topic_and_skips_are_checked_per_trial(tmp_path: Path) -> None:
    from cds_service.tools.harness import CallResult

    builder = PatientBuilder("cdsh-unit", datetime.now(UTC))
    other = "NCT00000001"
    scenario = HarnessScenario(
        "unit",
        "a story",
        {MSC: "eligible", other: "not_eligible", "NCT00000002": "eligible"},
        builder.transaction(),
    )

    def card(
        code: str | None, summary: str = "Trial card", status: str | None = "eligible"
    ) -> dict[str, Any]:
        source: dict[str, Any] = {"label": "Screening"}
        if code:
            source["topic"] = {"code": code}
        result: dict[str, Any] = {"summary": summary, "indicator": "info", "source": source}
        if status:
            criteria = [
                {"id": "severe_neutropenia", "kind": "inclusion", "result": "met", "evidence": []},
                {"id": "pregnancy", "kind": "exclusion", "result": "not_met", "evidence": []},
            ]
            window = {"opens": "2026-01-01T00:00:00Z", "closes": None}
            screening = {"trial": code, "status": status, "window": window, "criteria": criteria}
            result["extension"] = {"screening": screening}
        return result

    good = CallResult("prefetch", 200, 0.05, {"cards": [card(MSC)]})
    cases = Harness.check(scenario, good, {MSC, other})
    assert [(c.trial, c.got, c.passed, bool(c.skipped)) for c in cases] == [
        (MSC, "eligible", True, False),
        (other, "no card", True, False),
        ("NCT00000002", "no card", True, True),  # not screened by this deployment: skipped
    ]
    bad = CallResult(
        "fetch", 200, 0.05, {"cards": [card(MSC, "x" * 150), card(other), card(other), card(None)]}
    )
    cases = {c.trial: c for c in Harness.check(scenario, bad, None)}
    assert any("summary: 150 characters" in p for p in cases[MSC].problems)
    assert any("no source.topic.code" in p for p in cases[MSC].problems)  # fails every check of the call
    assert cases[other].got == "2 cards"
    assert "expected no NCT00000001 card (not_eligible), got a card" in cases[other].problems
    assert "expected a NCT00000002 card (eligible), got no card" in cases["NCT00000002"].problems
    refused = CallResult("fetch", 412, 0.01, None, "HTTP 412: patient data \x01 unavailable")
    report = HarnessReport(cases=Harness.check(scenario, refused, None))
    assert {c.got for c in report.cases} == {"HTTP 412"} and report.exit_code == 1
    path = tmp_path / "unit.xml"
    path.write_bytes(report.junit_xml())
    assert len(junit_cases(path)) == 3  # valid XML even with a control character in the diagnostics
    assert HarnessReport(cases=Harness.check(scenario, good, set())).exit_code == 1  # nothing checked
    # Hidden by the deployment (screening.show_not_recruiting: false): skipped, not failed.
    hidden = {c.trial: c for c in Harness.check(scenario, good, {MSC, other, "NCT00000002"}, {"NCT00000002"})}
    assert hidden["NCT00000002"].skipped and hidden[MSC].passed

    # The outcome is read from extension.screening: its status, its shape and the criteria named.
    def msc_case(response_card: dict[str, Any], criteria: dict[str, str] | None = None) -> Any:
        one = HarnessScenario("one", "a story", {MSC: "eligible"}, builder.transaction())
        if criteria:
            one.expected_criteria = {MSC: criteria}
        (case,) = Harness.check(one, CallResult("prefetch", 200, 0.05, {"cards": [response_card]}), None)
        return case

    possible = msc_case(card(MSC, status="possibly_eligible"))
    assert possible.got == "possibly_eligible" and not possible.passed
    assert "extension.screening.status: expected eligible, got possibly_eligible" in possible.problems
    bare = msc_case(card(MSC, status=None))
    assert bare.got == "card without extension" and "extension.screening: missing" in bare.problems
    wrong_trial = card(MSC)
    wrong_trial["extension"]["screening"]["trial"] = other
    assert any("differs from source.topic.code" in p for p in msc_case(wrong_trial).problems)
    extra = card(MSC)
    extra["extension"]["screening"]["eligible"] = True
    assert any("keys must be exactly" in p for p in msc_case(extra).problems)
    assert msc_case(card(MSC), {"severe_neutropenia": "met", "pregnancy": "not_met"}).passed
    unmet = msc_case(card(MSC), {"severe_neutropenia": "unknown", "consent": "to_confirm"})
    assert "extension.screening criterion severe_neutropenia: expected unknown, got met" in unmet.problems
    assert "extension.screening criterion consent: expected to_confirm, got absent" in unmet.problems
