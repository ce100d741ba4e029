"""Validate a CDS Hooks 2.0 ``patient-view`` request with cerberus.

An ordinary request is accepted by a hand-written check of the same schema first
(:func:`plainly_valid`, issue 17); cerberus decides every other one and names what is wrong.

The prefetch *content* is not run through cerberus: it can be tens of megabytes and cerberus
copies what it validates. Its shape is read, key by key, by ``gather.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..base.datafiles import ValidatorPool, dotted_errors
from ..base.errors import HookError

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
FHIR_ID = r"^[A-Za-z0-9\-\.]{1,64}$"

HOOK_REQUEST_SCHEMA: dict[str, Any] = {
    "hook": {"type": "string", "required": True, "empty": False},
    "hookInstance": {"type": "string", "required": True, "regex": UUID_PATTERN},
    "fhirServer": {"type": "string", "regex": r"^https?://[^\s]+$"},
    "fhirAuthorization": {
        "type": "dict",
        "dependencies": "fhirServer",
        "schema": {
            "access_token": {"type": "string", "required": True, "empty": False},
            "token_type": {"type": "string", "required": True, "allowed": ["Bearer", "bearer"]},
            "expires_in": {"type": "integer", "required": True, "min": 0},
            "scope": {"type": "string", "required": True, "empty": False},
            "subject": {"type": "string", "required": True, "empty": False},
            "patient": {"type": "string", "regex": FHIR_ID},
        },
        "allow_unknown": True,
    },
    "context": {
        "type": "dict",
        "required": True,
        "schema": {
            "userId": {
                "type": "string",
                "required": True,
                "regex": r"^(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-\.]{1,64}$",
            },
            "patientId": {"type": "string", "required": True, "regex": FHIR_ID},
            "encounterId": {"type": "string", "regex": FHIR_ID},
        },
        "allow_unknown": True,
    },
    "extension": {"type": "dict"},
}


#: The hook request's validators (see ValidatorPool: built once, lent to one thread at a time).
_VALIDATORS = ValidatorPool(HOOK_REQUEST_SCHEMA, allow_unknown=True)


_CONTEXT = HOOK_REQUEST_SCHEMA["context"]["schema"]
_AUTHORIZATION = HOOK_REQUEST_SCHEMA["fhirAuthorization"]["schema"]
#: The schema's patterns, matched in full (cerberus lets ``$`` match before a final line break).
_HOOK_INSTANCE = re.compile(HOOK_REQUEST_SCHEMA["hookInstance"]["regex"])
_FHIR_SERVER = re.compile(HOOK_REQUEST_SCHEMA["fhirServer"]["regex"])
_USER_ID = re.compile(_CONTEXT["userId"]["regex"])
_PATIENT_ID = re.compile(_CONTEXT["patientId"]["regex"])
_ENCOUNTER_ID = re.compile(_CONTEXT["encounterId"]["regex"])
_TOKEN_PATIENT = re.compile(_AUTHORIZATION["patient"]["regex"])
_TOKEN_TYPES = frozenset(_AUTHORIZATION["token_type"]["allowed"])


def _plain_text(value: Any) -> bool:
    return type(value) is str and value != ""


def _matches(pattern: re.Pattern[str], value: Any) -> bool:
    return type(value) is str and pattern.fullmatch(value) is not None


def plainly_valid(header: dict[str, Any]) -> bool:
    """True only for a request that :data:`HOOK_REQUEST_SCHEMA` accepts, checked by hand: cerberus
    costs about a millisecond per request (issue 17). Anything out of the ordinary — a field of
    another type, a null, a missing field — gets False, and cerberus then decides and names the
    problem. ``tests/test_hook_request_fast_path.py`` checks that nothing cerberus refuses passes."""
    context = header.get("context")
    if not (
        _plain_text(header.get("hook"))
        and _matches(_HOOK_INSTANCE, header.get("hookInstance"))
        and type(context) is dict
        and _matches(_USER_ID, context.get("userId"))
        and _matches(_PATIENT_ID, context.get("patientId"))
        and ("encounterId" not in context or _matches(_ENCOUNTER_ID, context["encounterId"]))
        and ("extension" not in header or type(header["extension"]) is dict)
        and ("fhirServer" not in header or _matches(_FHIR_SERVER, header["fhirServer"]))
    ):
        return False
    if "fhirAuthorization" not in header:
        return True
    token = header["fhirAuthorization"]
    return (
        type(token) is dict
        and "fhirServer" in header
        and _plain_text(token.get("access_token"))
        and type(token.get("token_type")) is str
        and token["token_type"] in _TOKEN_TYPES
        and type(token.get("expires_in")) is int
        and token["expires_in"] >= 0
        and _plain_text(token.get("scope"))
        and _plain_text(token.get("subject"))
        and ("patient" not in token or _matches(_TOKEN_PATIENT, token["patient"]))
    )


@dataclass(frozen=True)
class HookRequest:
    hook: str
    hook_instance: str
    patient_id: str
    user_id: str
    encounter_id: str | None
    fhir_server: str | None
    access_token: str | None
    prefetch: dict[str, Any] | None

    def __repr__(self) -> str:  # never print the token or the patient id by accident
        return f"HookRequest(hook={self.hook!r}, hook_instance={self.hook_instance!r})"


def parse_hook_request(body: Any, expected_hook: str) -> HookRequest:
    """Validate a decoded JSON body; raise HookError(400) naming each bad field."""
    if not isinstance(body, dict):
        raise HookError(400, "the request body must be a JSON object")
    prefetch = body.get("prefetch")
    if "prefetch" in body and prefetch is not None and not isinstance(prefetch, dict):
        raise HookError(400, "prefetch: must be an object", ["prefetch"])
    header = {key: value for key, value in body.items() if key != "prefetch"}
    problems = None
    if not plainly_valid(header):
        with _VALIDATORS.lend() as validator:
            problems = None if validator.validate(header) else dotted_errors(validator.errors)
    if problems is not None:
        text = "; ".join(f"{path}: {message}" for path, message in problems)
        raise HookError(400, f"invalid hook request: {text}", sorted({path for path, _ in problems}))
    if body["hook"] != expected_hook:
        raise HookError(400, f"hook: this service answers {expected_hook!r}, not {body['hook']!r}", ["hook"])
    authorization = body.get("fhirAuthorization") or {}
    context = body["context"]
    return HookRequest(
        hook=body["hook"],
        hook_instance=body["hookInstance"],
        patient_id=context["patientId"],
        user_id=context["userId"],
        encounter_id=context.get("encounterId"),
        fhir_server=body.get("fhirServer", "").rstrip("/") or None,
        access_token=authorization.get("access_token"),
        prefetch=prefetch,
    )
