"""Build FHIR R4 patient Bundles for clinical stories, with times relative to an evaluation time.

Used by the shipped scenario patients (``cds_service.tools.scenarios``), the tests, the benchmark and the
integration harness. Resource ids are derived from the patient id, so a scenario loads with PUT
(idempotent) and its clean-up deletes exactly what it loaded.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote

LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
UCUM = "http://unitsofmeasure.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


def _codes_of(resource: dict[str, Any]) -> set[str]:
    concept = resource.get("code") or resource.get("medicationCodeableConcept") or {}
    return {f"{c.get('system')}|{c.get('code')}" for c in concept.get("coding") or ()}


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PatientBuilder:
    """Accumulates one patient's resources; ``hours`` arguments are hours *before* the evaluation time."""

    def __init__(
        self,
        patient_id: str,
        at: datetime,
        *,
        age: int | None = 60,
        gender: str | None = "male",
        birth_date: date | None = None,
    ):
        self.patient_id = patient_id
        self.at = at
        self.resources: list[dict[str, Any]] = []
        self._counter = 0
        self._last_administration: dict[str, Any] = {}
        self._pending_contained: dict[str, Any] = {}
        patient: dict[str, Any] = {
            "resourceType": "Patient",
            "id": patient_id,
            "active": True,
            "name": [{"family": "Scenario", "given": [patient_id]}],
        }
        if birth_date is None and age is not None:
            # Half a year past the birthday, so the age is unambiguous whatever the evaluation date.
            birth_date = (at - timedelta(days=age * 365.25 + 182)).date()
        if birth_date is not None:
            patient["birthDate"] = birth_date.isoformat()
        if gender is not None:
            patient["gender"] = gender
        self.patient = patient

    def _id(self, kind: str) -> str:
        self._counter += 1
        return f"{self.patient_id}-{kind}-{self._counter}"

    def time(self, hours: float) -> str:
        return iso(self.at - timedelta(hours=hours))

    # -- observations -----------------------------------------------------------------------------
    def observation(
        self,
        code: str,
        value: float | None,
        unit: str,
        hours: float,
        *,
        system: str = LOINC,
        display: str = "",
        category: str = "laboratory",
        status: str = "final",
        ucum: bool = True,
        value_codeable: tuple[str, str] | None = None,
        time_zone: str | None = None,
        comparator: str | None = None,
    ) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "id": self._id("obs"),
            "status": status,
            "category": [{"coding": [{"system": OBS_CATEGORY, "code": category}]}],
            "code": {"coding": [{"system": system, "code": code, "display": display or code}]},
            "subject": {"reference": f"Patient/{self.patient_id}"},
            "effectiveDateTime": self._timestamp(hours, time_zone),
        }
        if value_codeable is not None:
            resource["valueCodeableConcept"] = {
                "coding": [{"system": value_codeable[0], "code": value_codeable[1]}]
            }
        elif value is not None:
            quantity: dict[str, Any] = {"value": value, "unit": unit}
            if comparator:
                quantity["comparator"] = comparator
            if ucum:
                quantity.update({"system": UCUM, "code": unit})
            resource["valueQuantity"] = quantity
        self.resources.append(resource)
        return resource

    def _timestamp(self, hours: float, time_zone: str | None) -> str:
        moment = self.at - timedelta(hours=hours)
        if time_zone is None:
            return iso(moment)
        sign = 1 if time_zone[0] == "+" else -1
        offset = timedelta(hours=int(time_zone[1:3]), minutes=int(time_zone[4:6])) * sign
        local = moment.astimezone(timezone(offset))
        return local.strftime("%Y-%m-%dT%H:%M:%S") + time_zone

    def bp_panel(self, systolic: float, diastolic: float, hours: float, mean: float | None = None) -> None:
        components = [
            {
                "code": {
                    "coding": [{"system": LOINC, "code": "8480-6", "display": "Systolic blood pressure"}]
                },
                "valueQuantity": {"value": systolic, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
            },
            {
                "code": {
                    "coding": [{"system": LOINC, "code": "8462-4", "display": "Diastolic blood pressure"}]
                },
                "valueQuantity": {"value": diastolic, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
            },
        ]
        if mean is not None:
            components.append(
                {
                    "code": {"coding": [{"system": LOINC, "code": "8478-0"}]},
                    "valueQuantity": {"value": mean, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
                }
            )
        self.resources.append(
            {
                "resourceType": "Observation",
                "id": self._id("bp"),
                "status": "final",
                "category": [{"coding": [{"system": OBS_CATEGORY, "code": "vital-signs"}]}],
                "code": {"coding": [{"system": LOINC, "code": "85354-9", "display": "Blood pressure panel"}]},
                "subject": {"reference": f"Patient/{self.patient_id}"},
                "effectiveDateTime": self.time(hours),
                "component": components,
            }
        )

    def weight(self, kg: float, hours: float = 48, unit: str = "kg", code: str = "29463-7") -> None:
        self.observation(code, kg, unit, hours, display="Body weight", category="vital-signs")

    def map(self, mmhg: float, hours: float) -> None:
        self.observation(
            "8478-0", mmhg, "mm[Hg]", hours, display="Mean blood pressure", category="vital-signs"
        )

    def lactate(self, mmol: float, hours: float, *, mg_dl: bool = False) -> None:
        if mg_dl:
            self.observation(
                "14118-4", round(mmol * 9.01, 1), "mg/dL", hours, display="Lactate [Mass/volume]"
            )
        else:
            self.observation("2524-7", mmol, "mmol/L", hours, display="Lactate [Moles/volume]")

    def anc(self, value: float, hours: float, unit: str = "10*3/uL") -> None:
        self.observation("751-8", value, unit, hours, display="Neutrophils [#/volume] in Blood")

    # -- medications and conditions ---------------------------------------------------------------
    def infusion(
        self,
        code: str,
        display: str,
        rate: float | None,
        unit: str,
        start: float,
        end: float | None = None,
        *,
        status: str | None = None,
        text_only: bool = False,
        dose: tuple[float, str] | None = None,
        medication: str | None = None,
    ) -> None:
        """A vasoactive infusion from ``start`` hours ago to ``end`` hours ago (None: still running).

        ``rate`` / ``unit`` go to ``dosage.rateQuantity`` (a dose rate, or a pump rate in mL/h);
        ``dose`` to ``dosage.dose`` (e.g. (0.2, "ug/kg/min")); ``medication`` names a Medication by
        reference ("#id" contained, or "Medication/id") instead of ``medicationCodeableConcept``."""
        period: dict[str, str] = {"start": self.time(start)}
        if end is not None:
            period["end"] = self.time(end)
        concept: dict[str, Any] = {"text": display}
        if not text_only:
            concept["coding"] = [{"system": RXNORM, "code": code, "display": display}]
        resource: dict[str, Any] = {
            "resourceType": "MedicationAdministration",
            "id": self._id("med"),
            "status": status or ("in-progress" if end is None else "completed"),
            "subject": {"reference": f"Patient/{self.patient_id}"},
            "effectivePeriod": period,
        }
        if medication is None:
            resource["medicationCodeableConcept"] = concept
        else:
            resource["medicationReference"] = {"reference": medication, "display": display}
        if rate is not None or dose is not None:
            dosage: dict[str, Any] = {"route": {"text": "intravenous"}}
            if dose is not None:
                dosage["dose"] = {"value": dose[0], "unit": dose[1], "system": UCUM, "code": dose[1]}
            if rate is not None:
                dosage["rateQuantity"] = {"value": rate, "unit": unit, "system": UCUM, "code": unit}
            resource["dosage"] = dosage
        self.resources.append(resource)
        self._last_administration = resource

    def medication(
        self,
        code: str,
        display: str,
        amount: tuple[float, str] | None,
        volume_ml: float = 250,
        *,
        contained: bool = False,
    ) -> str:
        """A Medication (a bag: ``amount`` of the drug in ``volume_ml`` mL); returns the reference to
        use. ``contained``: put it inside the next administration (call before :meth:`infusion`,
        then :meth:`contain`); otherwise it is a resource of its own in the Bundle."""
        medication: dict[str, Any] = {
            "resourceType": "Medication",
            "id": self._id("bag") if not contained else f"bag{self._counter + 1}",
            "code": {"coding": [{"system": RXNORM, "code": code, "display": display}], "text": display},
        }
        if contained:
            self._counter += 1
        if amount is not None:
            medication["ingredient"] = [
                {
                    "itemCodeableConcept": {"coding": [{"system": RXNORM, "code": code, "display": display}]},
                    "isActive": True,
                    "strength": {
                        "numerator": {
                            "value": amount[0],
                            "unit": amount[1],
                            "system": UCUM,
                            "code": amount[1],
                        },
                        "denominator": {"value": volume_ml, "unit": "mL", "system": UCUM, "code": "mL"},
                    },
                }
            ]
        if contained:
            self._pending_contained = medication
            return f"#{medication['id']}"
        self.resources.append(medication)
        return f"Medication/{medication['id']}"

    def contain(self) -> None:
        """Put the Medication made with ``contained=True`` inside the last administration."""
        self._last_administration["contained"] = [self._pending_contained]

    def norepinephrine(
        self,
        rate: float,
        unit: str,
        start: float,
        end: float | None = None,
        *,
        code: str = "7512",
        display: str = "norepinephrine",
    ) -> None:
        self.infusion(code, display, rate, unit, start, end)

    def condition(
        self,
        system: str,
        code: str,
        display: str,
        onset_hours: float | None,
        clinical_status: str | None = "active",
        verification: str | None = "confirmed",
    ) -> None:
        """A Condition; ``None`` statuses leave the element out (common in real charts)."""
        resource: dict[str, Any] = {"resourceType": "Condition", "id": self._id("cond")}
        if clinical_status is not None:
            resource["clinicalStatus"] = {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": clinical_status,
                    }
                ]
            }
        if verification is not None:
            resource["verificationStatus"] = {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                        "code": verification,
                    }
                ]
            }
        resource["code"] = {"coding": [{"system": system, "code": code, "display": display}]}
        resource["subject"] = {"reference": f"Patient/{self.patient_id}"}
        if onset_hours is not None:
            resource["onsetDateTime"] = self.time(onset_hours)
        self.resources.append(resource)

    def septic_shock_story(
        self,
        onset_hours: float,
        *,
        weight: float | None = 80.0,
        rate: float = 0.3,
        unit: str = "ug/kg/min",
        lactate: float = 4.2,
    ) -> None:
        """Sepsis diagnosed, norepinephrine started ``onset_hours`` ago with a high lactate around it."""
        if weight is not None:
            self.weight(weight, hours=onset_hours + 20)
        self.condition(ICD10CM, "A41.9", "Sepsis, unspecified organism", onset_hours + 3)
        self.lactate(lactate, hours=onset_hours + 0.5)
        self.norepinephrine(rate, unit, start=onset_hours)

    # -- output -----------------------------------------------------------------------------------
    def all_resources(self) -> list[dict[str, Any]]:
        return [self.patient, *self.resources]

    def transaction(self) -> dict[str, Any]:
        """A transaction Bundle of PUTs: loading twice changes nothing."""
        return {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": f"{r['resourceType']}/{r['id']}",
                    "resource": r,
                    "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
                }
                for r in self.all_resources()
            ],
        }

    def prefetch(self, templates: dict[str, str]) -> dict[str, Any]:
        """Fill each prefetch template from this patient's resources, as a CDS client would.

        Supports what the service's templates use: a Patient read, and type searches restricted by
        ``code=system|code,...`` (matched on ``Observation.code`` / ``medicationCodeableConcept``).
        """
        filled: dict[str, Any] = {}
        for key, template in templates.items():
            resource_type, _, query = template.partition("?")
            if resource_type.startswith("Patient/"):
                filled[key] = self.patient
                continue
            params = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
            codes = set(unquote(params["code"]).split(",")) if "code" in params else None
            matches = [
                r
                for r in self.resources
                if r["resourceType"] == resource_type and (codes is None or _codes_of(r) & codes)
            ]
            if "_sort" in params and "_count" in params:  # "the latest N"
                matches = sorted(matches, key=lambda r: r.get("effectiveDateTime", ""), reverse=True)
                matches = matches[: int(params["_count"])]
            entries = [{"resource": r, "search": {"mode": "match"}} for r in matches]
            if params.get("_include") == "MedicationAdministration:medication":
                named = {(r.get("medicationReference") or {}).get("reference") for r in matches}
                entries += [
                    {"resource": r, "search": {"mode": "include"}}
                    for r in self.resources
                    if r["resourceType"] == "Medication" and f"Medication/{r['id']}" in named
                ]
            filled[key] = {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(matches),
                "entry": entries,
            }
        return filled

    def searchset(self, resource_type: str) -> dict[str, Any]:
        entries = [
            {"resource": r, "search": {"mode": "match"}}
            for r in self.resources
            if r["resourceType"] == resource_type
        ]
        return {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
