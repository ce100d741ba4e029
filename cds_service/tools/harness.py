"""Integration test harness: point it at any deployment of this service and a FHIR server.

``cds-service harness --service URL --fhir URL`` does, over HTTP only, what a CDS client does:

1. loads the scenario patients (the shipped ones from :mod:`cds_service.tools.scenarios`, or a directory of a
   site's own scenario files) into the FHIR server — every id starts with ``cdsh-`` and ends with this
   run's id (fresh per run, so feedback a deployment stored for an earlier run cannot silence a card,
   and two runs cannot touch each other's patients), every resource is tagged as harness test data,
   and an existing patient the harness did not load is never overwritten;
2. reads the service's discovery document, fills each prefetch template against the FHIR server
   (a key that fails is left out), signs the call with a JWT when a key is given, and calls the hook
   with prefetch, without it, or both;
3. checks every card against the CDS Hooks card rules and every outcome against the scenario's
   expectation per trial — read from the card's machine-readable ``extension.screening`` (status,
   window, criteria), never from its English text — prints a table, writes JUnit XML on request and
   exits non-zero on any mismatch;
4. deletes what it loaded (unless ``--keep``).

The scenario file format and every option are documented in ``docs/harness.md``.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import re
import secrets
import string
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import requests

from .card_rules import CRITERION_RESULTS, card_problems, expectation_problems, outcome_of, response_problems

#: Every resource id the harness loads starts with this (unless ``--allow-any-ids``).
ID_PREFIX = "cdsh-"
#: Marks resources as loaded by the harness (ownership: only tagged resources are overwritten/deleted).
HARNESS_TAG = {
    "system": "urn:cds-service:harness",
    "code": "scenario",
    "display": "Loaded by cds-service harness",
}
#: HL7 security label "test health data": tells every downstream system this is not a real patient.
TEST_DATA_LABEL = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
    "code": "HTEST",
    "display": "test health data",
}
CARD_EXPECTED = ("eligible", "possibly_eligible", "upcoming")
NO_CARD_EXPECTED = ("not_eligible", "window_closed")
STATUSES = CARD_EXPECTED + NO_CARD_EXPECTED
MODES = ("prefetch", "fetch")
JWT_LIFETIME_SECONDS = 300  # exp - iat: CDS Hooks client tokens are short-lived (at most 5 minutes)
FHIR_JSON = "application/fhir+json"
USER_AGENT = "cds-service-harness"
_TOKEN = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_NCT = re.compile(r"^NCT\d{8}$")
#: A run id: appended to every resource id the harness loads (``cdsh-msc-eligible-k3x9q2``).
RUN_ID = re.compile(r"^[a-z0-9]{1,12}$")
RUN_ID_LENGTH = 6
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


class HarnessError(Exception):
    """The harness cannot run (bad options, unreachable service, a FHIR load that failed): exit 2."""


# -- scenarios ----------------------------------------------------------------------------------------


@dataclass
class HarnessScenario:
    """One patient to load and the outcome expected for each trial; times already relative to now."""

    name: str
    story: str
    expected: dict[str, str]
    bundle: dict[str, Any]  # transaction Bundle
    source: str = "shipped"
    #: NCT id → criterion id → result expected in the card's ``extension.screening.criteria``.
    expected_criteria: dict[str, dict[str, str]] = field(default_factory=dict)

    def resources(self) -> list[dict[str, Any]]:
        return [
            entry["resource"]
            for entry in self.bundle.get("entry") or []
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict)
        ]

    @property
    def patient_id(self) -> str:
        patients = [r for r in self.resources() if r.get("resourceType") == "Patient"]
        if len(patients) != 1 or not isinstance(patients[0].get("id"), str):
            raise HarnessError(
                f"scenario {self.name!r} ({self.source}): the bundle must hold exactly one Patient with an id"
            )
        return str(patients[0]["id"])

    def validate(self, allow_any_ids: bool = False) -> None:
        where = f"scenario {self.name!r} ({self.source})"
        if not self.name:
            raise HarnessError(f"{self.source}: a scenario needs a name")
        if self.bundle.get("resourceType") != "Bundle":
            raise HarnessError(f"{where}: `bundle` must be a FHIR Bundle")
        if not self.expected:
            raise HarnessError(f"{where}: `expected` names no trial")
        for trial, status in self.expected.items():
            if not _NCT.match(str(trial)):
                raise HarnessError(f"{where}: expected: {trial!r} is not an NCT id (NCT + 8 digits)")
            if status not in STATUSES:
                raise HarnessError(
                    f"{where}: expected[{trial}]: {status!r} is not one of {', '.join(STATUSES)}"
                )
        for trial, results in self.expected_criteria.items():
            if self.expected.get(trial) not in CARD_EXPECTED:
                raise HarnessError(
                    f"{where}: expectedCriteria[{trial}]: only for a trial expected to give a card"
                )
            for criterion, result in results.items():
                if result not in CRITERION_RESULTS:
                    raise HarnessError(
                        f"{where}: expectedCriteria[{trial}][{criterion}]: {result!r} is not one of "
                        f"{', '.join(CRITERION_RESULTS)}"
                    )
        self.patient_id  # noqa: B018 - raises when there is not exactly one Patient
        for resource in self.resources():
            rid = resource.get("id")
            if not isinstance(resource.get("resourceType"), str) or not isinstance(rid, str) or not rid:
                raise HarnessError(
                    f"{where}: every resource needs a resourceType and an id (loaded with PUT)"
                )
            if not allow_any_ids and not rid.startswith(ID_PREFIX):
                raise HarnessError(
                    f"{where}: {resource['resourceType']}/{rid}: ids must start with {ID_PREFIX!r} so that "
                    "they cannot collide with real patients (or pass --allow-any-ids)"
                )

    def with_run_id(self, run_id: str) -> HarnessScenario:
        """The same scenario with ``-<run_id>`` after every resource id, references rewritten to match.

        A deployment keys override silencing and the screening log by patient id: a fresh id per run
        means feedback stored for an earlier run (or by a clinician trying the demo) cannot silence
        this run's cards, and concurrent runs against one FHIR server never share a resource."""
        resources = self.resources()
        renamed = {
            f"{r['resourceType']}/{r['id']}": f"{r['resourceType']}/{r['id']}-{run_id}"
            for r in resources
            if isinstance(r.get("resourceType"), str) and isinstance(r.get("id"), str)
        }

        def rewrite(node: Any) -> Any:
            if isinstance(node, list):
                return [rewrite(item) for item in node]
            if not isinstance(node, dict):
                return node
            return {
                key: renamed.get(value, value)
                if key == "reference" and isinstance(value, str)
                else rewrite(value)
                for key, value in node.items()
            }

        entries = []
        for resource in resources:
            copied = rewrite(resource)
            ref = renamed.get(f"{resource.get('resourceType')}/{resource.get('id')}")
            if ref is not None:
                copied["id"] = ref.split("/", 1)[1]
                if not _FHIR_ID.match(copied["id"]):
                    raise HarnessError(
                        f"scenario {self.name!r} ({self.source}): {ref}: with the run id the id is longer "
                        "than FHIR's 64 characters; shorten it"
                    )
            entries.append(
                {"fullUrl": ref, "resource": copied, "request": {"method": "PUT", "url": ref}}
                if ref
                else {"resource": copied}
            )
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        return HarnessScenario(self.name, self.story, dict(self.expected), bundle, self.source)


def new_run_id() -> str:
    """Six random lowercase letters and digits (36⁶ ≈ 2 billion: runs do not collide)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(RUN_ID_LENGTH))


def shipped_scenarios(now: datetime) -> list[HarnessScenario]:
    """The shipped scenario patients (:func:`.scenarios.all_scenarios`), generated at ``now``."""
    try:
        from .scenarios import all_scenarios
    except ImportError as exc:  # pragma: no cover - a broken installation
        raise HarnessError(f"the shipped scenarios cannot be loaded: {exc}") from None

    return [
        HarnessScenario(
            s.name,
            s.story,
            dict(s.expected),
            s.bundle(),
            "shipped",
            {k: dict(v) for k, v in s.expected_criteria.items()},
        )
        for s in all_scenarios(now)
    ]


def _scenario_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise HarnessError(f"--scenarios {path}: no such file or directory")
    files = sorted(p for p in path.glob("*.json") if p.is_file())
    if not files:
        raise HarnessError(f"--scenarios {path}: no *.json scenario files in it")
    return files


def file_scenarios(path: Path, now: datetime) -> list[HarnessScenario]:
    """A site's scenario files, every FHIR dateTime shifted by (now - evaluatedAt)."""
    from .scenarios import ScenarioFileError, load_scenario_file, shift_bundle_times

    scenarios = []
    for file in _scenario_files(path):
        try:
            loaded = load_scenario_file(file)
        except (ScenarioFileError, OSError) as exc:
            raise HarnessError(str(exc)) from None
        shift = (now - loaded.evaluated_at).total_seconds()
        bundle = shift_bundle_times(loaded.bundle, shift)
        scenarios.append(
            HarnessScenario(
                loaded.name,
                loaded.story,
                dict(loaded.expected),
                bundle,
                str(file),
                {k: dict(v) for k, v in loaded.expected_criteria.items()},
            )
        )
    return scenarios


# -- JWT signing --------------------------------------------------------------------------------------


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class JwtSigner:
    """Signs one short-lived CDS Hooks client JWT per call (ES384/ES256/RS384 by key type)."""

    def __init__(self, key: Any, issuer: str, kid: str | None = None, jku: str | None = None):
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        if isinstance(key, ec.EllipticCurvePrivateKey):
            curves = {"secp384r1": "ES384", "secp256r1": "ES256"}
            if key.curve.name not in curves:
                raise HarnessError(f"--jwt-key: EC curve {key.curve.name} is not usable (P-384 or P-256)")
            self.alg = curves[key.curve.name]
        elif isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 2048:
                raise HarnessError("--jwt-key: RSA keys must have at least 2048 bits")
            self.alg = "RS384"
        else:
            raise HarnessError("--jwt-key: not an EC or RSA private key")
        if not issuer:
            raise HarnessError("--jwt-issuer is required with --jwt-key")
        self.key = key
        self.issuer = issuer
        self.jku = jku
        self.kid = kid or self.thumbprint()

    @classmethod
    def from_file(
        cls, path: str | Path, issuer: str, kid: str | None = None, jku: str | None = None
    ) -> JwtSigner:
        """A PEM private key (PKCS#8 or traditional), a private JWK, or a JWKS holding one private key."""
        from cryptography.hazmat.primitives import serialization

        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise HarnessError(f"--jwt-key {path}: {exc.strerror}") from None
        if data.lstrip().startswith(b"{"):
            import jwt

            try:
                document = json.loads(data)
                jwks = document.get("keys") if isinstance(document, dict) else None
                if isinstance(jwks, list):
                    private = [k for k in jwks if isinstance(k, dict) and "d" in k]
                    if len(private) != 1:
                        raise HarnessError(f"--jwt-key {path}: the JWKS must hold exactly one private key")
                    document = private[0]
                if not isinstance(document, dict) or "d" not in document:
                    raise HarnessError(f"--jwt-key {path}: not a private JWK (no `d`)")
                key = jwt.PyJWK(document).key
            except (ValueError, jwt.PyJWTError) as exc:
                raise HarnessError(f"--jwt-key {path}: not a usable JWK ({exc})") from None
            return cls(key, issuer, kid or document.get("kid"), jku)
        password = os.environ.get("CDS_HARNESS_JWT_KEY_PASSWORD")
        try:
            key = serialization.load_pem_private_key(data, password.encode() if password else None)
        except (ValueError, TypeError) as exc:
            raise HarnessError(f"--jwt-key {path}: not a PEM private key ({exc})") from None
        return cls(key, issuer, kid, jku)

    def public_jwk(self) -> dict[str, Any]:
        from cryptography.hazmat.primitives.asymmetric import ec

        numbers = self.key.public_key().public_numbers()
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            size = (self.key.curve.key_size + 7) // 8
            crv = "P-384" if self.alg == "ES384" else "P-256"

            def coordinate(value: int) -> str:
                return base64.urlsafe_b64encode(value.to_bytes(size, "big")).rstrip(b"=").decode()

            return {"kty": "EC", "crv": crv, "x": coordinate(numbers.x), "y": coordinate(numbers.y)}
        return {"kty": "RSA", "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}

    def thumbprint(self) -> str:
        """RFC 7638 JWK thumbprint (SHA-256): the default ``kid`` for a PEM key."""
        canonical = json.dumps(self.public_jwk(), sort_keys=True, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()

    def jwks(self) -> dict[str, Any]:
        """The public key set to give the service (``security.trusted_clients[iss].jwks_file``)."""
        return {"keys": [{**self.public_jwk(), "kid": self.kid, "alg": self.alg, "use": "sig"}]}

    def token(self, audience: str, now: float | None = None) -> str:
        import jwt

        issued = int(now if now is not None else time.time())
        claims = {
            "iss": self.issuer,
            "aud": audience,
            "iat": issued,
            "exp": issued + JWT_LIFETIME_SECONDS,
            "jti": str(uuid.uuid4()),
        }
        headers: dict[str, Any] = {"typ": "JWT", "kid": self.kid}
        if self.jku:
            headers["jku"] = self.jku
        return jwt.encode(claims, self.key, algorithm=self.alg, headers=headers)


# -- the FHIR side: loading and clean-up --------------------------------------------------------------


def _session(ca_bundle: str | None) -> requests.Session:
    session = requests.Session()
    session.headers.update({"User-Agent": USER_AGENT})
    if ca_bundle:
        session.verify = ca_bundle
    return session


def _diagnostics(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        texts = [
            str(issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code"))
            for issue in body.get("issue") or []
            if isinstance(issue, dict)
        ]
        return "; ".join(texts)[:300]
    return ""


def _topic_code(card: Any) -> str | None:
    """``source.topic.code`` of a card, None when the card has none (or is malformed)."""
    source = card.get("source") if isinstance(card, dict) else None
    topic = source.get("topic") if isinstance(source, dict) else None
    code = topic.get("code") if isinstance(topic, dict) else None
    return code if isinstance(code, str) and code else None


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    """Text safe for XML 1.0 (a server's diagnostics may hold control characters)."""
    return _XML_INVALID.sub("?", text)


def _is_ours(resource: dict[str, Any]) -> bool:
    tags = (resource.get("meta") or {}).get("tag") or []
    return any(
        isinstance(t, dict)
        and t.get("system") == HARNESS_TAG["system"]
        and t.get("code") == HARNESS_TAG["code"]
        for t in tags
    )


def _tagged(resource: dict[str, Any]) -> dict[str, Any]:
    resource = copy.deepcopy(resource)
    meta = resource.setdefault("meta", {})
    for key, coding in (("tag", HARNESS_TAG), ("security", TEST_DATA_LABEL)):
        codings = meta.setdefault(key, [])
        if not any(c.get("system") == coding["system"] and c.get("code") == coding["code"] for c in codings):
            codings.append(dict(coding))
    for key in ("versionId", "lastUpdated"):
        meta.pop(key, None)
    return resource


class FhirLoader:
    """Loads scenario patients with PUT (idempotent) and deletes exactly what it loaded."""

    def __init__(
        self,
        base: str,
        session: requests.Session,
        timeout: float,
        token: str | None = None,
        allow_any_ids: bool = False,
    ):
        self.base = base.rstrip("/")
        self.session = session
        self.timeout = timeout
        self.headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.allow_any_ids = allow_any_ids
        self.loaded: list[str] = []  # "Type/id", in load order

    def _request(self, method: str, path: str, body: Any = None) -> requests.Response:
        url = f"{self.base}/{path}" if path else self.base
        try:
            return self.session.request(
                method, url, json=body, headers=self.headers, timeout=self.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise HarnessError(
                f"FHIR server {self.base}: {method} {path or '/'} failed: {type(exc).__name__}"
            ) from None

    def check_not_foreign(self, scenario: HarnessScenario) -> None:
        """Refuse to overwrite a patient that exists on the server and was not loaded by the harness."""
        patient_id = scenario.patient_id
        response = self._request("GET", f"Patient/{patient_id}")
        if response.status_code in (404, 410):
            return
        if response.status_code != 200:
            raise HarnessError(
                f"FHIR server: reading Patient/{patient_id} → HTTP {response.status_code} "
                f"{_diagnostics(response)}"
            )
        try:
            existing = response.json()
        except ValueError:
            existing = {}
        if not isinstance(existing, dict) or not _is_ours(existing):
            raise HarnessError(
                f"scenario {scenario.name!r}: Patient/{patient_id} already exists on the FHIR server and was "
                "not loaded by the harness: refusing to overwrite it"
            )
        self._remove_leftovers(scenario)

    def _remove_leftovers(self, scenario: HarnessScenario) -> None:
        """Delete harness resources of an earlier run (``--keep``) that the scenario no longer has."""
        response = self._request("GET", f"Patient/{scenario.patient_id}/$everything")
        if response.status_code != 200:
            return  # $everything is optional: PUT still overwrites every resource we load
        try:
            entries = response.json().get("entry") or []
        except (ValueError, AttributeError):
            return
        wanted = {f"{r['resourceType']}/{r['id']}" for r in scenario.resources()}
        stale = []
        for entry in entries:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or not _is_ours(resource):
                continue
            ref = f"{resource.get('resourceType')}/{resource.get('id')}"
            if ref not in wanted:
                stale.append(ref)
        self._delete(stale)

    def load(self, scenario: HarnessScenario) -> None:
        scenario.validate(self.allow_any_ids)
        self.check_not_foreign(scenario)
        resources = [_tagged(r) for r in scenario.resources()]
        refs = [f"{r['resourceType']}/{r['id']}" for r in resources]
        self.loaded.extend(ref for ref in refs if ref not in self.loaded)
        transaction = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"fullUrl": f"{self.base}/{ref}", "resource": r, "request": {"method": "PUT", "url": ref}}
                for ref, r in zip(refs, resources, strict=True)
            ],
        }
        response = self._request("POST", "", transaction)
        if response.status_code in (200, 201):
            return
        if response.status_code not in (404, 405, 501):
            raise HarnessError(
                f"scenario {scenario.name!r}: loading into the FHIR server failed: "
                f"HTTP {response.status_code} {_diagnostics(response)}"
            )
        for ref, resource in zip(refs, resources, strict=True):  # no transactions: one PUT each
            answer = self._request("PUT", ref, resource)
            if answer.status_code not in (200, 201):
                raise HarnessError(
                    f"scenario {scenario.name!r}: PUT {ref} → HTTP {answer.status_code} "
                    f"{_diagnostics(answer)}"
                )

    def _delete(self, refs: Sequence[str]) -> list[str]:
        """Delete ``refs`` (dependants first: reverse order); returns the ones that could not be deleted."""
        if not refs:
            return []
        ordered = list(reversed(refs))
        transaction = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"request": {"method": "DELETE", "url": ref}} for ref in ordered],
        }
        try:
            if self._request("POST", "", transaction).status_code in (200, 201):
                return []
        except HarnessError:
            pass
        failed = []
        for ref in ordered:
            try:
                status = self._request("DELETE", ref).status_code
            except HarnessError:
                status = 0
            if status not in (200, 202, 204, 404, 410):
                failed.append(ref)
        return failed

    def cleanup(self) -> list[str]:
        """Delete everything loaded; returns what could not be deleted (reported, not raised)."""
        failed = self._delete(self.loaded)
        self.loaded = []
        return failed


# -- the CDS client side ------------------------------------------------------------------------------


def user_tokens(user_id: str) -> dict[str, str]:
    """The 2.0 prefetch tokens derived from ``context.userId`` (e.g. ``Practitioner/123``)."""
    kind, _, ident = user_id.partition("/")
    names = {
        "Practitioner": "userPractitionerId",
        "PractitionerRole": "userPractitionerRoleId",
        "Patient": "userPatientId",
        "RelatedPerson": "userRelatedPersonId",
    }
    return {names[kind]: ident} if kind in names and ident else {}


def fill_template(template: str, context: dict[str, str]) -> str | None:
    """A prefetch template with its tokens replaced; None when a token cannot be filled."""
    values = {f"context.{key}": value for key, value in context.items()}
    values.update(user_tokens(context.get("userId", "")))
    missing = False

    def replace(match: re.Match[str]) -> str:
        nonlocal missing
        value = values.get(match.group(1))
        if value is None:
            missing = True
            return ""
        return value

    filled = _TOKEN.sub(replace, template)
    return None if missing else filled


@dataclass
class CallResult:
    mode: str
    status: int | None  # HTTP status; None when the call did not complete
    latency: float
    body: Any = None
    error: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class CaseResult:
    """One check: a scenario × trial × mode."""

    scenario: str
    trial: str
    mode: str
    expected: str
    got: str
    latency: float
    problems: list[str] = field(default_factory=list)
    skipped: str = ""
    story: str = ""
    source: str = ""

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass
class HarnessReport:
    cases: list[CaseResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cleanup_failed: list[str] = field(default_factory=list)
    error: str = ""  # set when the harness could not run at all
    run_id: str = ""  # appended to every resource id loaded (see HarnessScenario.with_run_id)

    @property
    def failures(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.passed and not c.skipped]

    @property
    def checked(self) -> int:
        return len([c for c in self.cases if not c.skipped])

    @property
    def exit_code(self) -> int:
        """0 = every check passed, 1 = a check failed (or nothing could be checked), 2 = harness error."""
        if self.error:
            return 2
        return 1 if self.failures or not self.checked else 0

    @property
    def failing_scenarios(self) -> list[str]:
        return sorted({c.scenario for c in self.failures})

    def table(self) -> str:
        header = ("scenario", "trial", "mode", "expected", "got", "latency", "result")
        rows = [
            (
                c.scenario,
                c.trial,
                c.mode,
                c.expected,
                c.got,
                f"{c.latency * 1000:.0f} ms",
                "SKIP" if c.skipped else ("PASS" if c.passed else "FAIL"),
            )
            for c in self.cases
        ]
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

        def line(row: Sequence[str]) -> str:
            return "  ".join(
                str(value).ljust(width) for value, width in zip(row, widths, strict=True)
            ).rstrip()

        return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])

    def render(self) -> str:
        parts = []
        if self.cases:
            parts.append(self.table())
        for case in self.failures:
            parts.append(
                f"FAIL {case.scenario} / {case.trial} / {case.mode} ({case.source}):\n"
                + "\n".join(f"  - {p}" for p in case.problems)
            )
        for case in self.cases:
            if case.skipped:
                parts.append(f"SKIP {case.scenario} / {case.trial} / {case.mode}: {case.skipped}")
        parts.extend(f"note: {n}" for n in self.notes)
        if self.cleanup_failed:
            parts.append("clean-up: could not delete " + ", ".join(self.cleanup_failed))
        if self.error:
            parts.append(f"harness error: {self.error}")
        summary = f"harness: {self.checked} checks, {len(self.failures)} failed"
        if self.run_id:
            summary = f"harness run {self.run_id}: " + summary.removeprefix("harness: ")
        if self.failing_scenarios:
            summary += " — failing scenarios: " + ", ".join(self.failing_scenarios)
        elif not self.error and self.checked:
            summary += " — all passed"
        elif not self.error:
            summary += " — nothing was checked"
        parts.append(summary)
        return "\n\n".join(parts) + "\n"

    def junit_xml(self) -> bytes:
        """JUnit XML: one testsuite per mode, one testcase per scenario × trial × mode."""
        root = ET.Element("testsuites", name="cds-service harness")
        total_time = 0.0
        for mode in dict.fromkeys(c.mode for c in self.cases):
            cases = [c for c in self.cases if c.mode == mode]
            suite = ET.SubElement(
                root,
                "testsuite",
                name=f"cds-harness.{mode}",
                tests=str(len(cases)),
                failures=str(len([c for c in cases if not c.passed and not c.skipped])),
                errors="0",
                skipped=str(len([c for c in cases if c.skipped])),
                time=f"{sum(c.latency for c in cases):.3f}",
            )
            for case in cases:
                total_time += case.latency
                element = ET.SubElement(
                    suite,
                    "testcase",
                    classname=f"cds-harness.{mode}.{case.scenario}",
                    name=f"{case.trial} expected {case.expected} [{mode}]",
                    time=f"{case.latency:.3f}",
                )
                if case.skipped:
                    ET.SubElement(element, "skipped", message=_xml_text(case.skipped))
                elif case.problems:
                    failure = ET.SubElement(
                        element, "failure", message=_xml_text(case.problems[0]), type="mismatch"
                    )
                    lines = [*case.problems, "", f"scenario: {case.scenario} ({case.source})"]
                    failure.text = _xml_text("\n".join([*lines, f"story: {case.story}"]))
        root.set("tests", str(len(self.cases)))
        root.set("failures", str(len(self.failures)))
        root.set("errors", "1" if self.error else "0")
        root.set("skipped", str(len([c for c in self.cases if c.skipped])))
        root.set("time", f"{total_time:.3f}")
        if self.error:
            ET.SubElement(root, "system-err").text = _xml_text(self.error)
        ET.indent(root)
        return ET.tostring(root, encoding="utf-8", xml_declaration=True)


@dataclass
class HarnessOptions:
    service: str
    fhir: str
    scenarios: str | None = None
    mode: str = "both"
    junit: str | None = None
    token: str | None = None  # FHIR access token: the harness's own FHIR calls + fhirAuthorization
    jwt_key: str | None = None
    jwt_issuer: str | None = None
    jwt_kid: str | None = None
    jwt_jku: str | None = None
    service_id: str | None = None
    user_id: str = "Practitioner/cdsh-harness-user"
    timeout: float = 30.0
    keep: bool = False
    allow_any_ids: bool = False
    ca_bundle: str | None = None
    run_id: str | None = None  # None: a fresh one (new_run_id)

    @property
    def modes(self) -> tuple[str, ...]:
        if self.mode == "both":
            return MODES
        if self.mode not in MODES:
            raise HarnessError(f"--mode {self.mode!r}: prefetch, fetch or both")
        return (self.mode,)


def service_base(url: str) -> str:
    """The base URL of the service (where ``/cds-services`` lives), from either form of ``--service``."""
    base = url.strip().rstrip("/")
    if base.endswith("/cds-services"):
        base = base[: -len("/cds-services")]
    if not re.match(r"^https?://[^/]+", base):
        raise HarnessError(f"--service {url!r}: expected an http(s) URL")
    return base


class Harness:
    """A CDS client for one deployment: discovery, prefetch, signed hook calls, checks."""

    def __init__(self, options: HarnessOptions, signer: JwtSigner | None = None):
        self.options = options
        self.base = service_base(options.service)
        self.fhir = options.fhir.rstrip("/")
        if not re.match(r"^https?://[^/]+", self.fhir):
            raise HarnessError(f"--fhir {options.fhir!r}: expected an http(s) URL")
        self.signer = signer
        self.timeout = options.timeout
        self.service_session = _session(options.ca_bundle)
        self.fhir_session = _session(options.ca_bundle)
        self.fhir_headers = {"Accept": FHIR_JSON}
        if options.token:
            self.fhir_headers["Authorization"] = f"Bearer {options.token}"

    def close(self) -> None:
        self.service_session.close()
        self.fhir_session.close()

    # -- discovery ----------------------------------------------------------------------------------
    def discover(self) -> dict[str, Any]:
        url = f"{self.base}/cds-services"
        try:
            response = self.service_session.get(
                url, headers={"Accept": "application/json"}, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise HarnessError(f"discovery {url}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise HarnessError(f"discovery {url}: HTTP {response.status_code}")
        try:
            services = response.json()["services"]
        except (ValueError, KeyError, TypeError):
            services = None
        if not isinstance(services, list):
            raise HarnessError(f"discovery {url}: not a CDS Hooks discovery document")
        candidates = [s for s in services if isinstance(s, dict) and s.get("hook") == "patient-view"]
        if self.options.service_id:
            candidates = [s for s in candidates if s.get("id") == self.options.service_id]
        if not candidates:
            wanted = f" with id {self.options.service_id!r}" if self.options.service_id else ""
            raise HarnessError(f"discovery {url}: no patient-view service{wanted}")
        if len(candidates) > 1:
            ids = ", ".join(str(s.get("id")) for s in candidates)
            raise HarnessError(
                f"discovery {url}: several patient-view services ({ids}): choose one with --service-id"
            )
        return candidates[0]

    def health(self) -> dict[str, Any]:
        try:
            response = self.service_session.get(f"{self.base}/health", timeout=self.timeout)
            body = response.json() if response.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return {}
        return body if isinstance(body, dict) else {}

    def screened_trials(self) -> set[str] | None:
        """The trials this deployment screens (``/health``); None when it does not say."""
        trials = self.health().get("trials")
        return {str(t) for t in trials} if isinstance(trials, list) else None

    def hidden_trials(self) -> set[str]:
        """Trials whose cards this deployment hides (``/health`` ``cards_hidden``: not recruiting)."""
        hidden = self.health().get("cards_hidden")
        return {str(t) for t in hidden} if isinstance(hidden, list) else set()

    # -- one hook call ------------------------------------------------------------------------------
    def prefetch(
        self, templates: dict[str, str], context: dict[str, str], notes: list[str]
    ) -> dict[str, Any]:
        """Each template run against the FHIR server the way a CDS client does; failing keys left out."""
        prefetch: dict[str, Any] = {}
        for key, template in templates.items():
            query = fill_template(template, context)
            if query is None:
                notes.append(f"prefetch {key}: a token cannot be filled, key left out")
                continue
            try:
                response = self.fhir_session.get(
                    f"{self.fhir}/{query.lstrip('/')}",
                    headers=self.fhir_headers,
                    timeout=self.timeout,
                    allow_redirects=False,
                )
                body = response.json() if response.status_code == 200 else None
            except (requests.RequestException, ValueError) as exc:
                notes.append(f"prefetch {key}: {type(exc).__name__}, key left out")
                continue
            if not isinstance(body, dict) or "resourceType" not in body:
                notes.append(f"prefetch {key}: HTTP {response.status_code}, key left out")
                continue
            prefetch[key] = body
        return prefetch

    def call(self, service: dict[str, Any], patient_id: str, mode: str) -> CallResult:
        url = f"{self.base}/cds-services/{service['id']}"
        context = {"userId": self.options.user_id, "patientId": patient_id}
        notes: list[str] = []
        body: dict[str, Any] = {
            "hook": "patient-view",
            "hookInstance": str(uuid.uuid4()),
            "fhirServer": self.fhir,
            "context": context,
        }
        if self.options.token:
            body["fhirAuthorization"] = {
                "access_token": self.options.token,
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "patient/Patient.read patient/Observation.read "
                "patient/MedicationAdministration.read patient/Condition.read",
                "subject": "cds-service-harness",
                "patient": patient_id,
            }
        if mode == "prefetch":
            templates = service.get("prefetch")
            templates = templates if isinstance(templates, dict) else {}
            body["prefetch"] = self.prefetch(
                {k: v for k, v in templates.items() if isinstance(v, str)}, context, notes
            )
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.signer is not None:
            headers["Authorization"] = f"Bearer {self.signer.token(url)}"
        started = time.perf_counter()
        try:
            response = self.service_session.post(
                url, data=json.dumps(body), headers=headers, timeout=self.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            return CallResult(
                mode, None, time.perf_counter() - started, error=type(exc).__name__, notes=notes
            )
        latency = time.perf_counter() - started
        try:
            payload = response.json()
        except ValueError:
            payload = None
        error = ""
        if response.status_code != 200:
            error = f"HTTP {response.status_code}"
            detail = _diagnostics(response)
            if detail:
                error += f": {detail}"
            if response.status_code == 401:
                error += (
                    " (the service refused the client: without --jwt-key it needs a JWT; with one, check "
                    "that its trusted_clients has the issuer and key and that server.public_url is "
                    f"{self.base})"
                )
        return CallResult(mode, response.status_code, latency, payload, error, notes)

    # -- checking -----------------------------------------------------------------------------------
    @staticmethod
    def check(
        scenario: HarnessScenario,
        result: CallResult,
        screened: set[str] | None,
        hidden: frozenset[str] | set[str] = frozenset(),
    ) -> list[CaseResult]:
        cases: list[CaseResult] = []
        by_trial: dict[str, list[int]] = {}
        general: list[str] = []
        card_issues: dict[int, list[str]] = {}
        if result.status == 200:
            general += [p for p in response_problems(result.body) if not p.startswith("cards[")]
            cards = result.body.get("cards") if isinstance(result.body, dict) else None
            for index, card in enumerate(cards if isinstance(cards, list) else []):
                card_issues[index] = card_problems(card)
                code = _topic_code(card)
                if code is None:
                    general.append(
                        f"cards[{index}]: no source.topic.code: the card cannot be tied to a trial"
                    )
                    general += [f"cards[{index}].{p}" for p in card_issues[index]]
                    continue
                by_trial.setdefault(code, []).append(index)
        else:
            general.append(result.error or "the call failed")
        cards = result.body.get("cards") if result.status == 200 and isinstance(result.body, dict) else []
        for trial, expected in scenario.expected.items():
            indexes = by_trial.get(trial, [])
            problems = list(general)
            if result.status != 200:
                got = result.error.split(":")[0] if result.error else "error"
            else:
                trial_cards = [cards[i] for i in indexes]
                got = outcome_of(trial_cards)
                # The outcome is read from extension.screening: status and criteria, not the text.
                problems += expectation_problems(
                    trial, expected, trial_cards, scenario.expected_criteria.get(trial)
                )
                for index in indexes:
                    problems += [f"cards[{index}] ({trial}).{p}" for p in card_issues.get(index, [])]
            skipped = ""
            if screened is not None and trial not in screened:
                skipped = f"{trial} is not screened by this deployment"
            elif trial in hidden:
                skipped = f"{trial} cards are hidden by this deployment (screening.show_not_recruiting)"
            cases.append(
                CaseResult(
                    scenario.name,
                    trial,
                    result.mode,
                    expected,
                    got,
                    result.latency,
                    problems if not skipped else [],
                    skipped,
                    scenario.story,
                    scenario.source,
                )
            )
        return cases

    def run(self, scenarios: Sequence[HarnessScenario], report: HarnessReport) -> None:
        service = self.discover()
        screened = self.screened_trials()
        hidden = self.hidden_trials()
        unchecked: set[str] = set()
        for scenario in scenarios:
            for mode in self.options.modes:
                result = self.call(service, scenario.patient_id, mode)
                report.cases += self.check(scenario, result, screened, hidden)
                report.notes += [f"{scenario.name} [{mode}]: {n}" for n in dict.fromkeys(result.notes)]
                if result.status == 200 and isinstance(result.body, dict):
                    cards = result.body.get("cards")
                    for card in cards if isinstance(cards, list) else []:
                        code = _topic_code(card)
                        if code is not None and code not in scenario.expected:
                            unchecked.add(f"{scenario.name}: {code}")
        if unchecked:
            report.notes.append(
                "cards for trials the scenario has no expectation for (not checked): "
                + ", ".join(sorted(unchecked))
            )


def load_signer(options: HarnessOptions) -> JwtSigner | None:
    if options.jwt_key is None:
        if options.jwt_issuer or options.jwt_jku or options.jwt_kid:
            raise HarnessError("--jwt-issuer, --jwt-kid and --jwt-jku need --jwt-key")
        return None
    if not options.jwt_issuer:
        raise HarnessError("--jwt-key needs --jwt-issuer (the `iss` the service trusts)")
    return JwtSigner.from_file(options.jwt_key, options.jwt_issuer, options.jwt_kid, options.jwt_jku)


def run_harness(
    options: HarnessOptions,
    scenarios: Iterable[HarnessScenario] | None = None,
    out: TextIO | None = None,
) -> HarnessReport:
    """Load, call, check, clean up. Never raises for a harness problem: it is in ``report.error``.

    ``scenarios`` replaces the shipped ones / ``options.scenarios`` (used by tests and scripts).
    """
    out = out if out is not None else sys.stdout
    report = HarnessReport()
    loader: FhirLoader | None = None
    harness: Harness | None = None
    try:
        signer = load_signer(options)
        harness = Harness(options, signer)
        now = datetime.now(UTC).replace(microsecond=0)
        if scenarios is not None:
            chosen = list(scenarios)
        elif options.scenarios:
            chosen = file_scenarios(Path(options.scenarios), now)
        else:
            chosen = shipped_scenarios(now)
        if not chosen:
            raise HarnessError("no scenarios to run")
        names = [s.name for s in chosen]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise HarnessError(f"duplicate scenario names: {', '.join(duplicates)}")
        patients = [s.patient_id for s in chosen]
        if len(set(patients)) != len(patients):
            raise HarnessError("two scenarios use the same patient id")
        for scenario in chosen:
            scenario.validate(options.allow_any_ids)
        report.run_id = options.run_id or new_run_id()
        if not RUN_ID.match(report.run_id):
            raise HarnessError(f"--run-id {report.run_id!r}: 1 to 12 lowercase letters and digits")
        chosen = [scenario.with_run_id(report.run_id) for scenario in chosen]
        loader = FhirLoader(
            harness.fhir, harness.fhir_session, options.timeout, options.token, options.allow_any_ids
        )
        for scenario in chosen:
            loader.load(scenario)
        harness.run(chosen, report)
    except HarnessError as exc:
        report.error = str(exc)
    finally:
        if loader is not None:
            if options.keep:
                report.notes.append(
                    f"--keep: {len(loader.loaded)} resources left on {loader.base}, every id ending in "
                    f"-{report.run_id} (`--run-id {report.run_id}` reloads them)"
                )
            else:
                report.cleanup_failed = loader.cleanup()
        if harness is not None:
            harness.close()
    out.write(report.render())
    if options.junit:
        Path(options.junit).write_bytes(report.junit_xml())
    return report


# -- command line -------------------------------------------------------------------------------------


def cmd_harness(args: argparse.Namespace) -> int:
    if args.print_jwks:
        if not args.jwt_key:
            print("cds-service harness: --print-jwks needs --jwt-key", file=sys.stderr)
            return 2
        try:
            signer = JwtSigner.from_file(args.jwt_key, args.jwt_issuer or "-", args.jwt_kid, args.jwt_jku)
        except HarnessError as exc:
            print(f"cds-service harness: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(signer.jwks(), indent=2))
        return 0
    if not args.service or not args.fhir:
        print("cds-service harness: --service and --fhir are required", file=sys.stderr)
        return 2
    options = HarnessOptions(
        service=args.service,
        fhir=args.fhir,
        scenarios=args.scenarios,
        mode=args.mode,
        junit=args.junit,
        token=args.token or os.environ.get("CDS_HARNESS_FHIR_TOKEN") or None,
        jwt_key=args.jwt_key,
        jwt_issuer=args.jwt_issuer,
        jwt_kid=args.jwt_kid,
        jwt_jku=args.jwt_jku,
        service_id=args.service_id,
        user_id=args.user_id,
        timeout=args.timeout,
        keep=args.keep,
        allow_any_ids=args.allow_any_ids,
        ca_bundle=args.ca_bundle,
        run_id=args.run_id,
    )
    report = run_harness(options)
    if report.error:
        print(f"cds-service harness: {report.error}", file=sys.stderr)
    return report.exit_code


def register(subparsers: Any) -> None:
    """Add ``cds-service harness`` to the command line."""
    parser = subparsers.add_parser(
        "harness",
        help="integration test: load scenario patients into a FHIR server, call a deployment, check cards",
        description="Load the scenario patients into --fhir, call the patient-view service at --service "
        "like a CDS client, check every card and outcome, clean up. Exit 0 = all passed, 1 = a mismatch, "
        "2 = the harness could not run. See docs/harness.md.",
    )
    parser.add_argument("--service", help="base URL of the deployment (where /cds-services is served)")
    parser.add_argument("--fhir", help="FHIR R4 base URL to load the scenario patients into")
    parser.add_argument(
        "--scenarios",
        help="a directory of *.json scenario files (or one file); default: the shipped scenarios",
    )
    parser.add_argument("--mode", choices=("prefetch", "fetch", "both"), default="both", help="default: both")
    parser.add_argument("--junit", help="write a JUnit XML report to this file")
    parser.add_argument(
        "--token",
        help="FHIR access token: used for the harness's FHIR calls and sent as fhirAuthorization "
        "(or $CDS_HARNESS_FHIR_TOKEN)",
    )
    parser.add_argument("--jwt-key", help="private key (PEM, JWK or one-key JWKS) to sign each call with")
    parser.add_argument("--jwt-issuer", help="`iss` of the JWT (a trusted client of the service)")
    parser.add_argument(
        "--jwt-kid", help="`kid` header (default: the key file's kid or the key's thumbprint)"
    )
    parser.add_argument("--jwt-jku", help="`jku` header: URL of the JWKS holding the public key")
    parser.add_argument(
        "--print-jwks", action="store_true", help="print the public JWKS of --jwt-key and exit"
    )
    parser.add_argument(
        "--service-id", help="the service to call when discovery lists several patient-view ones"
    )
    parser.add_argument("--user-id", default="Practitioner/cdsh-harness-user", help="context.userId")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request (default 30)")
    parser.add_argument("--keep", action="store_true", help="leave the scenario patients on the FHIR server")
    parser.add_argument(
        "--run-id",
        help="the suffix of every loaded id (default: a fresh random one per run); reuse a --keep run's "
        "to reload its patients",
    )
    parser.add_argument(
        "--allow-any-ids", action="store_true", help=f"load resource ids that do not start with {ID_PREFIX!r}"
    )
    parser.add_argument("--ca-bundle", help="CA certificates to verify https servers with")
    parser.set_defaults(func=cmd_harness)
