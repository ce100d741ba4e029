"""Fast extraction: FHIR resource dicts → normalised facts in canonical units.

Bulk resources (Observations, MedicationAdministrations, Conditions) are read as the plain dicts
orjson produced, touching only the fields criteria use: full pydantic validation of 20 000
Observations costs seconds (see infrastructure.md), this path costs a few ms per thousand.
The Patient — one small resource — is validated with fhir.resources (R4B models).
A malformed resource is skipped and counted, never a crash; ``entered-in-error`` records and
cancelled / not-done administrations are ignored.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from datetime import date
from typing import Any

from fhir.resources.R4B.patient import Patient
from pydantic import ValidationError

from .facts import AdministrationFact, ConditionFact, ObservationFact, PatientFacts, UnusableValue, parse_time
from .knowledge import UCUM, Knowledge

_IGNORED_OBSERVATION_STATUS = frozenset({"entered-in-error", "cancelled"})
_IGNORED_ADMINISTRATION_STATUS = frozenset({"entered-in-error", "not-done", "cancelled"})
_IGNORED_VERIFICATION = frozenset({"entered-in-error", "refuted"})


class _Extractor:
    """One patient's extraction; keeps per-call caches of unit conversions."""

    def __init__(self, knowledge: Knowledge, facts: PatientFacts):
        self.k = knowledge
        self.facts = facts
        self._conversion_cache: dict[tuple[str, str], tuple[float, str] | None] = {}

    # -- values -----------------------------------------------------------------------------------
    def _convert(self, input_name: str, unit: str) -> tuple[float, str] | None:
        key = (input_name, unit)
        cached = self._conversion_cache.get(key, False)
        if cached is not False:
            return cached  # type: ignore[return-value]
        conversion = self.k.conversion(input_name, unit)
        result = None
        if conversion is not None:
            result = (conversion.factor, "" if conversion.factor == 1.0 else unit)
        self._conversion_cache[key] = result
        return result

    def _quantity_fact(
        self, input_name: str, holder: dict[str, Any], time: float, ref: str, code: str, note: str = ""
    ) -> ObservationFact | None:
        item = self.k.inputs[input_name]
        if item.value_type == "coded":
            return self._coded_fact(input_name, holder, time, ref, code)
        quantity = holder.get("valueQuantity")
        if not isinstance(quantity, dict):
            if "valueInteger" in holder and isinstance(holder["valueInteger"], int):
                quantity = {"value": holder["valueInteger"], "code": item.canonical_unit}
            else:
                if "dataAbsentReason" not in holder:
                    self.facts.unusable.append(UnusableValue(input_name, ref, code, "no numeric value"))
                return None
        value = quantity.get("value")
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.facts.unusable.append(UnusableValue(input_name, ref, code, "no numeric value"))
            return None
        unit = quantity.get("code") if quantity.get("system") == UCUM and quantity.get("code") else None
        unit = unit or quantity.get("unit") or quantity.get("code") or ""
        converted = self._convert(input_name, unit)
        if converted is None:
            self.facts.unusable.append(UnusableValue(input_name, ref, code, f"unknown unit {unit!r}"))
            return None
        factor, charted_unit = converted
        if charted_unit:
            conversion_note = f"converted from {value:g} {charted_unit}"
            note = f"{note}; {conversion_note}" if note else conversion_note
        return ObservationFact(input_name, time, float(value) * factor, item.canonical_unit, ref, code, note)

    def _coded_fact(
        self, input_name: str, holder: dict[str, Any], time: float, ref: str, code: str
    ) -> ObservationFact | None:
        index = self.k.coded_value_index.get(input_name, {})
        tokens: list[str] = []
        concept = holder.get("valueCodeableConcept")
        if isinstance(concept, dict):
            for coding in concept.get("coding") or ():
                if isinstance(coding, dict):
                    tokens.append(f"{coding.get('system')}|{coding.get('code')}")
                    tokens.append(str(coding.get("code", "")))
            tokens.append(str(concept.get("text", "")))
        if isinstance(holder.get("valueString"), str):
            tokens.append(holder["valueString"])
        if isinstance(holder.get("valueBoolean"), bool):
            tokens.append("positive" if holder["valueBoolean"] else "negative")
        for token in tokens:
            label = index.get(token.strip().lower())
            if label:
                return ObservationFact(input_name, time, label, "", ref, code, "")
        self.facts.unusable.append(UnusableValue(input_name, ref, code, "coded value not recognised"))
        return None

    # -- resources --------------------------------------------------------------------------------
    def observation(self, resource: dict[str, Any]) -> None:
        if resource.get("status") in _IGNORED_OBSERVATION_STATUS:
            return
        time = parse_time(
            resource.get("effectiveDateTime")
            or resource.get("effectiveInstant")
            or (resource.get("effectivePeriod") or {}).get("start")
            or resource.get("issued")
        )
        codings = (resource.get("code") or {}).get("coding")
        if time is None or not isinstance(codings, list):
            self.facts.skipped["Observation"] += 1
            return
        ref = f"Observation/{resource.get('id', '?')}"
        observation_codes = self.k.observation_codes
        for coding in codings:
            key = f"{coding.get('system')}|{coding.get('code')}"
            item = observation_codes.get(key)
            if item is not None:
                fact = self._quantity_fact(item.name, resource, time, ref, key)
                if fact is not None:
                    self._add(fact)
                return
            panel = self.k.panels.get(key)
            if panel is not None:
                self._panel(panel, resource, time, ref)
                return
        for coding in codings:
            self.facts.unknown_codes[f"Observation {coding.get('system')}|{coding.get('code')}"] += 1

    def _panel(self, panel: Any, resource: dict[str, Any], time: float, ref: str) -> None:
        found: dict[str, ObservationFact] = {}
        for component in resource.get("component") or ():
            for coding in (component.get("code") or {}).get("coding") or ():
                key = f"{coding.get('system')}|{coding.get('code')}"
                item = self.k.observation_codes.get(key)
                if item is not None:
                    fact = self._quantity_fact(
                        item.name, component, time, ref, key, f"component of {panel.code}"
                    )
                    if fact is not None:
                        found[item.name] = fact
                        self._add(fact)
                    break
        if (
            panel.mean_into
            and panel.mean_into not in found
            and panel.systolic in found
            and panel.diastolic in found
        ):
            systolic, diastolic = found[panel.systolic].value, found[panel.diastolic].value
            mean = (float(systolic) + 2 * float(diastolic)) / 3
            note = f"derived (S + 2D)/3 from panel {panel.code}: S {systolic:g}, D {diastolic:g}"
            self._add(
                ObservationFact(
                    panel.mean_into,
                    time,
                    mean,
                    self.k.inputs[panel.mean_into].canonical_unit,
                    ref,
                    panel.key,
                    note,
                )
            )

    def _add(self, fact: ObservationFact) -> None:
        series = self.facts.observations.get(fact.input)
        if series is None:
            self.facts.observations[fact.input] = [fact]
        else:
            series.append(fact)

    def administration(self, resource: dict[str, Any]) -> None:
        status = resource.get("status", "")
        if status in _IGNORED_ADMINISTRATION_STATUS:
            return
        ref = f"MedicationAdministration/{resource.get('id', '?')}"
        drug, code, matched_by = self._drug(resource)
        if drug is None:
            return
        period = resource.get("effectivePeriod")
        if isinstance(period, dict):
            start, end = parse_time(period.get("start")), parse_time(period.get("end"))
        else:
            start = end = parse_time(resource.get("effectiveDateTime"))
        if start is None:
            self.facts.skipped["MedicationAdministration"] += 1
            return
        rate, rate_unit = _rate(resource.get("dosage"))
        self.facts.administrations.append(
            AdministrationFact(drug.name, start, end, rate, rate_unit, ref, code, matched_by, status)
        )

    def _drug(self, resource: dict[str, Any]) -> tuple[Any, str, str]:
        concept = resource.get("medicationCodeableConcept")
        if not isinstance(concept, dict):
            reference = (resource.get("medicationReference") or {}).get("reference", "")
            contained = {c.get("id"): c for c in resource.get("contained") or () if isinstance(c, dict)}
            concept = (contained.get(reference[1:]) or {}).get("code") if reference.startswith("#") else None
            if not isinstance(concept, dict):
                self.facts.unknown_codes["MedicationAdministration medicationReference (not resolvable)"] += 1
                return None, "", ""
        codings = [c for c in concept.get("coding") or () if isinstance(c, dict)]
        for coding in codings:
            drug = self.k.drug_for(str(coding.get("system")), str(coding.get("code")))
            if drug is not None:
                return drug, f"{coding.get('system')}|{coding.get('code')}", "code"
        texts = [concept.get("text")] + [c.get("display") for c in codings]
        for text in texts:
            if isinstance(text, str) and (drug := self.k.drug_for_text(text)) is not None:
                first = codings[0] if codings else {}
                code = f"{first.get('system')}|{first.get('code')}" if codings else f"text:{text}"
                self.facts.unknown_codes[
                    f"MedicationAdministration {code} (matched {drug.name} by text)"
                ] += 1
                return drug, code, "text"
        for coding in codings or [{"system": None, "code": concept.get("text")}]:
            self.facts.unknown_codes[
                f"MedicationAdministration {coding.get('system')}|{coding.get('code')}"
            ] += 1
        return None, "", ""

    def condition(self, resource: dict[str, Any]) -> None:
        verification = _status_code(resource.get("verificationStatus"))
        if verification in _IGNORED_VERIFICATION:
            return
        codings = [c for c in (resource.get("code") or {}).get("coding") or () if isinstance(c, dict)]
        if not codings:
            self.facts.skipped["Condition"] += 1
            return
        value_sets: set[str] = set()
        matched_code = ""
        for coding in codings:
            found = self.k.condition_value_sets(str(coding.get("system")), str(coding.get("code")))
            if found:
                value_sets |= found
                matched_code = matched_code or f"{coding.get('system')}|{coding.get('code')}"
        if not value_sets:
            for coding in codings:
                self.facts.unknown_codes[f"Condition {coding.get('system')}|{coding.get('code')}"] += 1
            return
        onset = parse_time(resource.get("onsetDateTime") or (resource.get("onsetPeriod") or {}).get("start"))
        self.facts.conditions.append(
            ConditionFact(
                frozenset(value_sets),
                onset,
                parse_time(resource.get("recordedDate")),
                _status_code(resource.get("clinicalStatus")) or "active",
                verification or "",
                f"Condition/{resource.get('id', '?')}",
                matched_code,
            )
        )


def _status_code(concept: Any) -> str:
    if isinstance(concept, dict):
        for coding in concept.get("coding") or ():
            if isinstance(coding, dict) and coding.get("code"):
                return str(coding["code"])
    return ""


def _unit_of(quantity: dict[str, Any]) -> str:
    if quantity.get("system") == UCUM and quantity.get("code"):
        return str(quantity["code"])
    return str(quantity.get("unit") or quantity.get("code") or "")


def _rate(dosage: Any) -> tuple[float | None, str]:
    """Infusion rate from ``dosage.rateQuantity`` or ``dosage.rateRatio`` (e.g. 8 ug / 1 min)."""
    if not isinstance(dosage, dict):
        return None, ""
    quantity = dosage.get("rateQuantity")
    if isinstance(quantity, dict) and isinstance(quantity.get("value"), int | float):
        return float(quantity["value"]), _unit_of(quantity)
    ratio = dosage.get("rateRatio")
    if isinstance(ratio, dict):
        numerator, denominator = ratio.get("numerator") or {}, ratio.get("denominator") or {}
        num, den = numerator.get("value"), denominator.get("value", 1)
        if isinstance(num, int | float) and isinstance(den, int | float) and den:
            return float(num) / float(den), f"{_unit_of(numerator)}/{_unit_of(denominator)}"
    return None, ""


def read_patient(resource: dict[str, Any] | None, facts: PatientFacts) -> None:
    """Validate the Patient with fhir.resources (small: full validation is cheap) and keep what we use."""
    if not isinstance(resource, dict):
        return
    try:
        patient = Patient.model_validate(resource)
    except (ValidationError, ValueError, TypeError):
        facts.skipped["Patient"] += 1
        # Keep going with what can be read safely: a broken name must not hide the birth date.
        birth = resource.get("birthDate")
        try:
            facts.birth_date = (
                date.fromisoformat(birth) if isinstance(birth, str) and len(birth) == 10 else None
            )
        except ValueError:
            facts.birth_date = None
        gender = resource.get("gender")
        facts.gender = gender if isinstance(gender, str) else None
        return
    birth_date = patient.birthDate
    facts.birth_date = birth_date if isinstance(birth_date, date) else None
    facts.gender = patient.gender


def extract(
    patient_id: str, patient: dict[str, Any] | None, resources: Iterable[Any], knowledge: Knowledge
) -> PatientFacts:
    """Turn a patient's resources into normalised facts. Unknown resource types are ignored."""
    facts = PatientFacts(patient_id=patient_id)
    read_patient(patient, facts)
    extractor = _Extractor(knowledge, facts)
    handlers = {
        "Observation": extractor.observation,
        "MedicationAdministration": extractor.administration,
        "Condition": extractor.condition,
    }
    gc_was_enabled = gc.isenabled()
    gc.disable()  # many small tuples: the cyclic collector only costs time here
    try:
        for resource in resources:
            if not isinstance(resource, dict):
                facts.skipped["not a resource"] += 1
                continue
            kind = resource.get("resourceType")
            handler = handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                continue
            try:
                handler(resource)
            except (AttributeError, TypeError, ValueError, KeyError):
                facts.skipped[str(resource.get("resourceType"))] += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    for series in facts.observations.values():
        series.sort(key=_by_time)
    facts.administrations.sort(key=_by_start)
    return facts


def _by_time(fact: ObservationFact) -> float:
    return fact.time


def _by_start(fact: AdministrationFact) -> float:
    return fact.start
