"""[speed] The hand-written check of ordinary hook requests never accepts what cerberus refuses.

``patient_data/hook_request.py`` accepts an ordinary request with :func:`plainly_valid` and leaves
every other one to cerberus (issue 17). Random requests built around valid ones — each field
missing, null, of another type, empty, with a line break at its end, or just wrong — must never be
plainly valid while cerberus refuses them; the requests the scenarios send are plainly valid (so the
fast path is the one taken); and ``parse_hook_request`` answers every request as cerberus alone would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cerberus import Validator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.base.config import PROJECT_ROOT
from cds_service.base.errors import HookError
from cds_service.patient_data import hook_request
from cds_service.patient_data.hook_request import HOOK_REQUEST_SCHEMA, parse_hook_request, plainly_valid

_CERBERUS = Validator(HOOK_REQUEST_SCHEMA, allow_unknown=True)

VALID: dict[str, Any] = {
    "hook": "patient-view",
    "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
    "fhirServer": "https://ehr.example.org/fhir",
    "fhirAuthorization": {
        "access_token": "some-opaque-token",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "cds-service",
        "patient": "p-1",
    },
    "context": {"userId": "Practitioner/doc-1", "patientId": "p-1", "encounterId": "e.1"},
    "extension": {"x": 1},
}
PATHS = [
    ("hook",),
    ("hookInstance",),
    ("fhirServer",),
    ("fhirAuthorization",),
    ("fhirAuthorization", "access_token"),
    ("fhirAuthorization", "token_type"),
    ("fhirAuthorization", "expires_in"),
    ("fhirAuthorization", "scope"),
    ("fhirAuthorization", "subject"),
    ("fhirAuthorization", "patient"),
    ("context",),
    ("context", "userId"),
    ("context", "patientId"),
    ("context", "encounterId"),
    ("extension",),
]
_MISSING = object()
values = st.one_of(
    st.just(_MISSING),
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.floats(allow_nan=False, max_value=10),
    st.sampled_from(["", " ", "bearer", "Bearer", "patient-view", "p-1\n", "Patient/x", "a b"]),
    st.sampled_from(["http://x", "https://x y", "ftp://x", "Practitioner/", "Device/1", "x" * 65]),
    st.sampled_from(["D1577C69-DFBE-44AD-BA6D-3E05E953B2EA", "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea\n"]),
    st.text(max_size=6),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["userId", "patientId", "a"]), st.text(max_size=4), max_size=2),
)


def _changed(request: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    copy = dict(request)
    if len(path) == 1:
        if value is _MISSING:
            copy.pop(path[0], None)
        else:
            copy[path[0]] = value
        return copy
    inner = copy.get(path[0])
    if isinstance(inner, dict):
        copy[path[0]] = _changed(inner, path[1:], value)
    return copy


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    request = VALID
    for _ in range(draw(st.integers(0, 3))):
        request = _changed(request, draw(st.sampled_from(PATHS)), draw(values))
    return request


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests())
def test_nothing_cerberus_refuses_is_plainly_valid(request: dict[str, Any]) -> None:
    if plainly_valid(request):
        assert _CERBERUS.validate(request), (request, _CERBERUS.errors)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests())
def test_a_request_is_answered_as_cerberus_alone_answers_it(request: dict[str, Any]) -> None:
    def answer(fast: bool) -> Any:
        original = hook_request.plainly_valid
        hook_request.plainly_valid = original if fast else (lambda header: False)  # type: ignore[assignment]
        try:
            return parse_hook_request(request, "patient-view")
        except HookError as exc:
            return (exc.status, exc.diagnostics, exc.expression)
        finally:
            hook_request.plainly_valid = original  # type: ignore[assignment]

    assert answer(fast=True) == answer(fast=False)


def test_the_requests_the_scenarios_send_take_the_fast_path() -> None:
    bodies = sorted((PROJECT_ROOT / "examples").rglob("*request*.json"))
    assert bodies, "examples/ has hook requests"
    for path in bodies:
        body = json.loads(Path(path).read_text())
        if body.get("hook") != "patient-view":
            continue
        header = {key: value for key, value in body.items() if key != "prefetch"}
        assert plainly_valid(header), path
    assert plainly_valid(VALID) and _CERBERUS.validate(VALID)


@pytest.mark.parametrize(
    "path",
    [p for p in PATHS if p not in {("fhirServer",), ("fhirAuthorization",), ("extension",)}],
)
def test_each_required_or_patterned_field_is_checked(path: tuple[str, ...]) -> None:
    """Each field made wrong: the fast check refuses it (then cerberus names it)."""
    plain_text = {"hook", "access_token", "scope", "subject"}
    wrong: Any = -1 if path[-1] == "expires_in" else "" if path[-1] in plain_text else "\n"
    assert not plainly_valid(_changed(VALID, path, wrong)), path
