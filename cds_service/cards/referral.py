"""The card's "Refer to the research team" suggestion: FHIR R4 resources the EHR can store.

Accepting the suggestion asks the EHR to create, as configured in ``screening.referral_resources``:

- a **ServiceRequest** — a referral (``intent: order``, category SNOMED CT 3457005 *Patient
  referral*) from the clinician in the hook context to the research team, naming the trial, due
  before the enrollment window closes;
- a **ResearchSubject** with status ``candidate`` pointing at the trial's ResearchStudy by its
  ClinicalTrials.gov identifier.

Every resource is validated with fhir.resources (R4B models, which accept R4 JSON) plus the
required-binding codes fhir.resources leaves unchecked, and put in the card as a plain JSON dict.
Both carry the card uuid as an identifier, so the research team can trace a referral back to its
row in the screening log. The suggestion uuid is derived from the card uuid
(:func:`referral_suggestion_uuid`): feedback naming it is recognised as a referral without storing
anything more.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from fhir.resources.R4B.researchsubject import ResearchSubject
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import BaseModel, ValidationError

from ..clinical.evaluation import ELIGIBLE
from ..knowledge.trials import Trial

CLINICALTRIALS_SYSTEM = "https://clinicaltrials.gov"
SNOMED = "http://snomed.info/sct"
PATIENT_REFERRAL = {"system": SNOMED, "code": "3457005", "display": "Patient referral"}
REFERRAL_TEXT = "Referral to research team for trial screening"
#: Identifier system for ``urn:uuid:`` values (RFC 3986 URIs).
URI_SYSTEM = "urn:ietf:rfc:3986"
#: Namespace of the derived suggestion uuids; never change it (feedback of old cards would not match).
SUGGESTION_NAMESPACE = uuid.UUID("6f2b0a3e-64a1-4c55-9a49-0c1f3de2b7a5")
REQUESTER_TYPES = ("Practitioner/", "PractitionerRole/")
RESOURCE_MODELS: dict[str, type[BaseModel]] = {
    "ServiceRequest": ServiceRequest,
    "ResearchSubject": ResearchSubject,
}


class InvalidResource(ValueError):
    """A resource the service built does not validate: a bug or a bad configuration value."""


def referral_suggestion_uuid(card_uuid: str) -> str:
    """The uuid of a card's referral suggestion (stable: feedback's ``acceptedSuggestions`` echo it)."""
    return str(uuid.uuid5(SUGGESTION_NAMESPACE, f"{card_uuid}/refer-to-research-team"))


def fhir_instant(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _unbound_codes(model: BaseModel, path: str = "") -> Iterable[str]:
    """Codes outside their required value set: fhir.resources lists them but does not check them."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name, None)
        if value is None:
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        allowed = extra.get("enum_values")
        where = f"{path}.{info.alias or name}" if path else (info.alias or name)
        if allowed and isinstance(value, str) and value not in allowed:
            yield f"{where}: {value!r} not one of {', '.join(allowed)}"
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            if isinstance(item, BaseModel):
                yield from _unbound_codes(item, f"{where}[{index}]" if isinstance(value, list) else where)


#: Where a referral resource holds a value that changes with every card: the card uuid, the
#: patient, the requester, the note (text), and the enrollment window's times (dateTime).
_PER_CARD_TEXT: tuple[tuple[str | int, ...], ...] = (
    ("identifier", 0, "value"),
    ("subject", "reference"),
    ("individual", "reference"),
    ("requester", "reference"),
    ("note", 0, "text"),
)
_PER_CARD_TIME: tuple[tuple[str | int, ...], ...] = (
    ("occurrencePeriod", "start"),
    ("occurrencePeriod", "end"),
)
#: Text every FHIR string, markdown and reference accepts: not empty, no control characters but
#: tab and line breaks, no whitespace at either end (stricter than fhir.resources).
_PLAIN_TEXT = re.compile(r"[^\s\x00-\x1f\x7f](?:[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*[^\s\x00-\x1f\x7f])?")
#: The instants :func:`fhir_instant` writes (a valid calendar date is checked as well).
_PLAIN_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_PLACEHOLDER_TEXT = "per-card text"
_PLACEHOLDER_TIME = "2000-01-01T00:00:00Z"
#: Shapes of referral resources that validated (see :func:`validated`); bounded: trials × statuses
#: × configuration, a few dozen, unless something unforeseen varies — then it is simply cleared.
_VALID_SHAPES: set[bytes] = set()
_VALID_SHAPES_MAX = 1024


def _with_value(node: Any, path: tuple[str | int, ...], value: str) -> Any:
    """``node`` with the value at ``path`` replaced, copying only the containers on the way."""
    key, rest = path[0], path[1:]
    copy: Any = list(node) if isinstance(node, list) else dict(node)
    copy[key] = _with_value(node[key], rest, value) if rest else value
    return copy


def _at(node: Any, path: tuple[str | int, ...]) -> Any:
    for key in path:
        if isinstance(node, dict) and isinstance(key, str) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and len(node) == 1:
            node = node[key]  # only a one-item list: the value's place is then unambiguous
        else:
            return _ABSENT
    return node


_ABSENT = object()


def _plain_instant(value: Any) -> bool:
    if not isinstance(value, str) or not _PLAIN_INSTANT.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value[:-1] + "+00:00")
    except ValueError:
        return False
    return True


def _shape(resource: dict[str, Any]) -> bytes | None:
    """The resource with each per-card value replaced by a placeholder, as sorted JSON bytes; None
    when a per-card value is not plainly valid (then only a full validation can say)."""
    shape: Any = resource
    for paths, plain, placeholder in (
        (_PER_CARD_TEXT, lambda v: isinstance(v, str) and _PLAIN_TEXT.fullmatch(v), _PLACEHOLDER_TEXT),
        (_PER_CARD_TIME, _plain_instant, _PLACEHOLDER_TIME),
    ):
        for path in paths:
            value = _at(shape, path)
            if value is _ABSENT:
                continue
            if not plain(value):
                return None
            shape = _with_value(shape, path, placeholder)
    try:
        return orjson.dumps(shape, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None


def validated(resource: dict[str, Any]) -> dict[str, Any]:
    """``resource`` validated as FHIR R4 (R4B models) and returned as plain JSON; else InvalidResource.

    Fully validating two resources per card was the card's largest fixed cost (issue 17). A resource
    whose *shape* — everything but its per-card values (uuid, patient, requester, note, window
    times) — has validated before, and whose per-card values are each plainly valid text or
    instants (:data:`_PLAIN_TEXT`, :data:`_PLAIN_INSTANT`: stricter than FHIR's string, markdown
    and dateTime), validates the same way, field by field: it is not validated again.
    ``tests/test_referral_shapes.py`` checks that both ways accept and refuse the same resources.
    """
    shape = _shape(resource)
    if shape is not None and shape in _VALID_SHAPES:
        return resource
    _validate_fully(resource)
    if shape is not None:
        if len(_VALID_SHAPES) >= _VALID_SHAPES_MAX:
            _VALID_SHAPES.clear()
        _VALID_SHAPES.add(shape)
    return resource


def _validate_fully(resource: dict[str, Any]) -> None:
    kind = resource.get("resourceType")
    model_class = RESOURCE_MODELS.get(str(kind))
    if model_class is None:
        raise InvalidResource(f"no validator for resourceType {kind!r}")
    try:
        model = model_class.model_validate(resource)
    except ValidationError as exc:
        raise InvalidResource(f"{kind} does not validate: {exc}") from exc
    problems = list(_unbound_codes(model))
    if problems:
        raise InvalidResource(f"{kind} does not validate: {'; '.join(problems)}")
    # The JSON we built is exactly what validated; dumping the model again would only cost time.


@dataclass(frozen=True)
class ReferralRequest:
    """What the referral says: who, which trial, how urgent, and the screening that prompted it."""

    card_uuid: str
    patient_id: str
    trial: Trial
    status: str
    screened_at: float
    window_opens_at: float | None = None
    window_closes_at: float | None = None
    closing_soon: bool = False
    user_id: str | None = None
    to_confirm: tuple[str, ...] = ()
    needs_data: tuple[str, ...] = ()

    @property
    def recommended(self) -> bool:
        """Eligible for a trial that is recruiting: the only referral a client should pre-select."""
        return self.status == ELIGIBLE and self.trial.recruiting


STATUS_WORDS = {
    "eligible": "eligible on every criterion computable from the chart",
    "possibly_eligible": "possibly eligible (some criteria lack data)",
    "upcoming": "possibly eligible; the enrollment window has not opened yet",
}


def _study_reference(trial: Trial) -> dict[str, Any]:
    return {
        "identifier": {"system": CLINICALTRIALS_SYSTEM, "value": trial.id},
        "display": f"{trial.short_name} ({trial.id})",
    }


def _card_identifier(card_uuid: str) -> list[dict[str, str]]:
    return [{"system": URI_SYSTEM, "value": f"urn:uuid:{card_uuid}"}]


def _note(request: ReferralRequest) -> str:
    trial = request.trial
    parts = [
        f"Screened {fhir_instant(request.screened_at)} by the septic-shock trial screening service: "
        f"{STATUS_WORDS.get(request.status, request.status)} for {trial.short_name} ({trial.id}, "
        f"{trial.registry_url})."
    ]
    if request.window_closes_at is not None:
        parts.append(f"Enrollment window closes {fhir_instant(request.window_closes_at)}.")
    if request.needs_data:
        parts.append(f"Needs data: {'; '.join(request.needs_data)}.")
    if request.to_confirm:
        parts.append(f"To confirm: {'; '.join(request.to_confirm)}.")
    parts.append(f"Screening-log card {request.card_uuid}.")
    return " ".join(parts)


def service_request(request: ReferralRequest, screening: dict[str, Any]) -> dict[str, Any]:
    """A ServiceRequest referring the patient to the research team for this trial (validated)."""
    trial = request.trial
    performer: dict[str, str] = {"display": screening["research_team_display"]}
    if screening.get("research_team_reference"):
        performer["reference"] = screening["research_team_reference"]
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "identifier": _card_identifier(request.card_uuid),
        "status": "active",
        "intent": "order",
        "category": [{"coding": [PATIENT_REFERRAL]}],
        "priority": "urgent" if request.recommended and request.closing_soon else "routine",
        "code": {"text": REFERRAL_TEXT},
        "subject": {"reference": f"Patient/{request.patient_id}"},
        "performer": [performer],
        "reasonCode": [
            {
                "coding": [{"system": CLINICALTRIALS_SYSTEM, "code": trial.id, "display": trial.short_name}],
                "text": f"Possible candidate for {trial.short_name} ({trial.id})",
            }
        ],
        "note": [{"text": _note(request)}],
    }
    if request.window_closes_at is not None:
        period = {"end": fhir_instant(request.window_closes_at)}
        if request.window_opens_at is not None and request.window_opens_at > request.screened_at:
            period["start"] = fhir_instant(request.window_opens_at)
        resource["occurrencePeriod"] = period
    if request.user_id and request.user_id.startswith(REQUESTER_TYPES):
        resource["requester"] = {"reference": request.user_id}
    return validated(resource)


def research_subject(request: ReferralRequest) -> dict[str, Any]:
    """A ResearchSubject (status ``candidate``) linking the patient to the trial's ResearchStudy."""
    return validated(
        {
            "resourceType": "ResearchSubject",
            "identifier": _card_identifier(request.card_uuid),
            "status": "candidate",
            "study": _study_reference(request.trial),
            "individual": {"reference": f"Patient/{request.patient_id}"},
        }
    )


def referral_actions(request: ReferralRequest, screening: dict[str, Any]) -> list[dict[str, Any]]:
    """The suggestion's ``create`` actions, one per configured resource type."""
    team = screening["research_team_display"]
    trial = request.trial
    actions: list[dict[str, Any]] = []
    for kind in screening["referral_resources"]:
        if kind == "ServiceRequest":
            actions.append(
                {
                    "type": "create",
                    "description": f"Refer the patient to the {team} for {trial.short_name} "
                    f"({trial.id}) screening (ServiceRequest)",
                    "resource": service_request(request, screening),
                }
            )
        elif kind == "ResearchSubject":
            actions.append(
                {
                    "type": "create",
                    "description": f"Record the patient as a candidate for {trial.short_name} "
                    f"({trial.id}) (ResearchSubject)",
                    "resource": research_subject(request),
                }
            )
    return actions


def referral_suggestion(request: ReferralRequest, screening: dict[str, Any], label: str) -> dict[str, Any]:
    """The card's one suggestion; recommended only when the patient is eligible for a recruiting trial
    (a completed trial, or one whose registry status is unknown, is never pushed)."""
    return {
        "label": label,
        "uuid": referral_suggestion_uuid(request.card_uuid),
        "isRecommended": request.recommended,
        "actions": referral_actions(request, screening),
    }
