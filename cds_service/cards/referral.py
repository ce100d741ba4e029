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

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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


def validated(resource: dict[str, Any]) -> dict[str, Any]:
    """``resource`` validated as FHIR R4 (R4B models) and returned as plain JSON; else InvalidResource."""
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
    return resource


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
