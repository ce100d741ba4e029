"""[knowledge] Extraction: FHIR resources → facts in canonical units, and what is refused.

Every expected number is worked out by hand in the comments. The evaluation time is fixed
(2025-03-01 12:00 UTC) so the times can be checked against the clock on the wall.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cds_service.base.config import PROJECT_ROOT
from cds_service.base.facts import PatientFacts, parse_time
from cds_service.knowledge.mappings import Knowledge, load_knowledge
from cds_service.patient_data.extract import extract
from cds_service.tools.scenario_builder import LOINC, RXNORM, SNOMED, UCUM, PatientBuilder

AT = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
T = AT.timestamp()
HOUR = 3600.0


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return load_knowledge(PROJECT_ROOT)


def facts_of(builder: PatientBuilder, knowledge: Knowledge, *extra: Any) -> PatientFacts:
    return extract(builder.patient_id, builder.patient, [*builder.resources, *extra], knowledge)


def observation(code: str, when: str, *, system: str = LOINC, **fields: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"obs-{code}-{when}",
        "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "effectiveDateTime": when,
        **fields,
    }


def quantity(value: float, unit: str, **extra: Any) -> dict[str, Any]:
    return {"valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit, **extra}}


# -- units ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unit", "expected", "note"),
    [
        # 400 cells/µL × 10⁶ µL/L = 4 × 10⁸/L = 0.4 × 10⁹/L
        (400, "/uL", 0.4, "converted from 400 /uL"),
        # 10³/µL = 10⁹/L: the same number
        (0.4, "10*3/uL", 0.4, ""),
        (0.4, "10*9/L", 0.4, ""),
        # "K/uL" is the usual analyser spelling of 10³/µL
        (0.4, "K/uL", 0.4, ""),
        # French labs: 400 /mm³ = 400 /µL = 0.4 × 10⁹/L
        (400, "/mm3", 0.4, "converted from 400 /mm3"),
    ],
)
def test_neutrophil_count_in_every_unit_becomes_10e9_per_litre(
    knowledge: Knowledge, value: float, unit: str, expected: float, note: str
) -> None:
    builder = PatientBuilder("anc", AT)
    builder.anc(value, hours=2, unit=unit)
    (fact,) = facts_of(builder, knowledge).series("absolute_neutrophil_count")
    assert fact.value == pytest.approx(expected)
    assert fact.unit == "10*9/L"
    assert fact.note == note
    assert fact.time == T - 2 * HOUR


def test_neutrophil_percentage_is_unusable_not_read_as_a_count(knowledge: Knowledge) -> None:
    # 65 % neutrophils is a differential, not a count: taken as 65 × 10⁹/L it would rule the
    # patient out of the MSC trial (ANC ≤ 1). It must be refused and reported.
    builder = PatientBuilder("anc-pct", AT)
    builder.anc(65, hours=2, unit="%")
    facts = facts_of(builder, knowledge)
    assert facts.series("absolute_neutrophil_count") == []
    (unusable,) = facts.unusable
    assert unusable.input == "absolute_neutrophil_count"
    assert "'%'" in unusable.reason


def test_lactate_in_mg_per_dl_is_divided_by_9_01(knowledge: Knowledge) -> None:
    builder = PatientBuilder("lac", AT)
    builder.observation("14118-4", 36.0, "mg/dL", hours=3)  # 36 / 9.01 = 3.9956 mmol/L
    builder.observation("2524-7", 18.02, "mg/dL", hours=2)  # a molar code charted in mg/dL: 2.0 mmol/L
    builder.observation("32693-4", 4.2, "mmol/L", hours=1)
    values = [(f.time, f.value, f.note) for f in facts_of(builder, knowledge).series("lactate")]
    assert values[0][1] == pytest.approx(3.9956, abs=1e-4)
    assert values[0][2] == "converted from 36 mg/dL"
    # 18.02 mg/dL is exactly the Sepsis-3 threshold (18 mg/dL ≈ 2 mmol/L): it must not come out a
    # hair above 2.0, or "lactate > 2" would be met by rounding.
    assert values[1][1] == 2.0
    assert values[2][1:] == (4.2, "")
    assert [t for t, _, _ in values] == [T - 3 * HOUR, T - 2 * HOUR, T - 1 * HOUR]


def test_unknown_unit_is_reported_unusable_and_not_used(knowledge: Knowledge) -> None:
    builder = PatientBuilder("kpa", AT)
    builder.observation("8478-0", 8.5, "kPa", hours=1)
    builder.map(58, hours=2)
    facts = facts_of(builder, knowledge)
    assert [f.value for f in facts.series("mean_arterial_pressure")] == [58]
    (unusable,) = facts.unusable
    assert unusable.resource.startswith("Observation/kpa-obs-")
    assert unusable.code == "http://loinc.org|8478-0"
    assert "kPa" in unusable.reason


def test_weight_in_pounds_and_grams_is_converted_to_kg(knowledge: Knowledge) -> None:
    builder = PatientBuilder("w", AT)
    builder.weight(176, hours=30, unit="[lb_av]")  # 176 × 0.45359237 = 79.832 kg
    builder.weight(79500, hours=10, unit="g")  # 79 500 g = 79.5 kg
    values = [f.value for f in facts_of(builder, knowledge).series("body_weight")]
    assert values == [pytest.approx(79.832257), pytest.approx(79.5)]


def test_integer_without_unit_is_only_read_for_scores(knowledge: Knowledge) -> None:
    # A bare 25 000 for platelets could be /µL (severe thrombocytopenia) or 10⁹/L: not guessed.
    platelets = observation("777-3", "2025-03-01T10:00:00Z", valueInteger=25000)
    mottling = observation(
        "mottling-score", "2025-03-01T10:00:00Z", system="urn:cds-service:site-codes", valueInteger=3
    )
    facts = facts_of(PatientBuilder("int", AT), knowledge, platelets, mottling)
    assert facts.series("platelets") == []
    assert [u.reason for u in facts.unusable] == ["integer value without a unit"]
    assert [f.value for f in facts.series("mottling_score")] == [3.0]


def test_censored_value_keeps_its_comparator_in_the_note(knowledge: Knowledge) -> None:
    anc = observation("751-8", "2025-03-01T10:00:00Z", **quantity(0.1, "10*3/uL", comparator="<"))
    (fact,) = facts_of(PatientBuilder("cens", AT), knowledge, anc).series("absolute_neutrophil_count")
    assert fact.value == 0.1
    assert "charted as <0.1" in fact.note


# -- blood-pressure panel -------------------------------------------------------------------------


def test_map_is_derived_from_panel_without_a_mean(knowledge: Knowledge) -> None:
    builder = PatientBuilder("bp", AT)
    builder.bp_panel(90, 45, hours=1)  # (S + 2D) / 3 = (90 + 90) / 3 = 60 mmHg
    facts = facts_of(builder, knowledge)
    (mean,) = facts.series("mean_arterial_pressure")
    assert mean.value == 60.0
    assert mean.code == "http://loinc.org|85354-9"
    assert mean.note.startswith("derived (S + 2D)/3 from panel 85354-9")
    assert [f.value for f in facts.series("systolic_blood_pressure")] == [90]
    assert [f.value for f in facts.series("diastolic_blood_pressure")] == [45]


def test_map_is_not_derived_when_the_panel_carries_a_mean(knowledge: Knowledge) -> None:
    builder = PatientBuilder("bp-mean", AT)
    # The arterial line's mean (62) is the measured value; (S + 2D)/3 would give 66.7.
    builder.bp_panel(110, 45, hours=1, mean=62)
    (mean,) = facts_of(builder, knowledge).series("mean_arterial_pressure")
    assert mean.value == 62
    assert mean.code == "http://loinc.org|8478-0"


def test_a_charted_map_replaces_the_panel_estimate_of_the_same_reading(knowledge: Knowledge) -> None:
    builder = PatientBuilder("bp-two", AT)
    builder.bp_panel(110, 45, hours=2)  # derived 66.7 at 10:00 — a separate MAP 62 charted at 10:00
    builder.map(62, hours=2)
    builder.bp_panel(96, 48, hours=1)  # derived (96 + 96)/3 = 64 at 11:00, nothing charted then
    means = [
        (f.time, round(float(f.value), 1))
        for f in facts_of(builder, knowledge).series("mean_arterial_pressure")
    ]
    assert means == [(T - 2 * HOUR, 62.0), (T - 1 * HOUR, 64.0)]


def test_panel_with_a_malformed_component_is_skipped_whole(knowledge: Knowledge) -> None:
    builder = PatientBuilder("bp-bad", AT)
    builder.bp_panel(90, 45, hours=1)
    builder.resources[-1]["component"].append("not a component")
    facts = facts_of(builder, knowledge)
    assert facts.observations == {}
    assert facts.skipped["Observation"] == 1


# -- times ----------------------------------------------------------------------------------------


def test_timestamps_with_offsets_other_than_z_are_placed_correctly(knowledge: Knowledge) -> None:
    builder = PatientBuilder("tz", AT)
    # 09:30 in UTC+02:00 and 02:30 in UTC−05:00 are both 07:30 UTC, 4.5 h before 12:00 UTC.
    builder.observation("2524-7", 3.1, "mmol/L", hours=4.5, time_zone="+02:00")
    builder.observation("2524-7", 3.3, "mmol/L", hours=4.5, time_zone="-05:00")
    assert builder.resources[0]["effectiveDateTime"] == "2025-03-01T09:30:00+02:00"
    assert builder.resources[1]["effectiveDateTime"] == "2025-03-01T02:30:00-05:00"
    times = {f.time for f in facts_of(builder, knowledge).series("lactate")}
    assert times == {datetime(2025, 3, 1, 7, 30, tzinfo=UTC).timestamp()}


def test_parse_time_dates_partial_dates_and_missing_offsets() -> None:
    assert parse_time("2025-03-01") == datetime(2025, 3, 1, tzinfo=UTC).timestamp()
    assert parse_time("2025-03") == datetime(2025, 3, 1, tzinfo=UTC).timestamp()
    assert parse_time("2025") == datetime(2025, 1, 1, tzinfo=UTC).timestamp()
    # A time of day with no offset is invalid FHIR and could be off by up to 14 h: not guessed.
    assert parse_time("2025-03-01T10:00:00") is None
    assert parse_time("yesterday") is None


def test_observation_timed_without_offset_is_skipped_and_counted(knowledge: Knowledge) -> None:
    lactate = observation("2524-7", "2025-03-01T10:00:00", **quantity(4.0, "mmol/L"))
    facts = facts_of(PatientBuilder("naive", AT), knowledge, lactate)
    assert facts.series("lactate") == []
    assert facts.skipped["Observation"] == 1


# -- what is ignored, skipped or counted ----------------------------------------------------------


def test_entered_in_error_records_are_ignored(knowledge: Knowledge) -> None:
    builder = PatientBuilder("eie", AT)
    builder.lactate(9.0, hours=1)
    builder.resources[-1]["status"] = "entered-in-error"
    builder.lactate(2.5, hours=2)
    builder.norepinephrine(0.5, "ug/kg/min", start=3)
    builder.resources[-1]["status"] = "entered-in-error"
    builder.condition(SNOMED, "76571007", "Septic shock", onset_hours=3, verification="entered-in-error")
    builder.condition(SNOMED, "91302008", "Sepsis", onset_hours=5, verification="refuted")
    facts = facts_of(builder, knowledge)
    assert [f.value for f in facts.series("lactate")] == [2.5]
    assert facts.administrations == []
    assert facts.conditions == []
    assert not facts.unknown_codes and not facts.skipped


def test_malformed_resources_are_skipped_and_counted(knowledge: Knowledge) -> None:
    no_time = {"resourceType": "Observation", "id": "x1", "status": "final", "code": {"coding": []}}
    code_is_text = {**observation("2524-7", "2025-03-01T10:00:00Z"), "code": "lactate"}
    no_start = {
        "resourceType": "MedicationAdministration",
        "id": "m1",
        "status": "in-progress",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "7512"}]},
        "effectivePeriod": {"end": "2025-03-01T10:00:00Z"},
    }
    no_code = {"resourceType": "Condition", "id": "c1", "code": {"text": "sepsis"}}
    good = observation("2524-7", "2025-03-01T10:00:00Z", **quantity(3.0, "mmol/L"))
    facts = facts_of(
        PatientBuilder("bad", AT), knowledge, no_time, code_is_text, no_start, no_code, "junk", good
    )
    assert facts.skipped == {
        "Observation": 2,
        "MedicationAdministration": 1,
        "Condition": 1,
        "not a resource": 1,
    }
    assert [f.value for f in facts.series("lactate")] == [3.0]  # the good one still counts


def test_unknown_codes_are_counted_by_resource_type_never_guessed(knowledge: Knowledge) -> None:
    builder = PatientBuilder("unk", AT)
    builder.observation("2345-7", 6.1, "mmol/L", hours=1)  # glucose: no input uses it
    builder.observation("2345-7", 7.4, "mmol/L", hours=2)
    builder.infusion("8782", "propofol", 30, "ug/kg/min", start=5)  # not a vasoactive drug
    builder.condition(SNOMED, "38341003", "Hypertensive disorder", onset_hours=1000)
    facts = facts_of(builder, knowledge)
    assert facts.unknown_codes == {
        "Observation http://loinc.org|2345-7": 2,
        f"MedicationAdministration {RXNORM}|8782": 1,
        f"Condition {SNOMED}|38341003": 1,
    }
    assert facts.observations == {} and facts.administrations == [] and facts.conditions == []


def test_drug_matched_by_text_is_used_and_reported_as_such(knowledge: Knowledge) -> None:
    builder = PatientBuilder("txt", AT)
    builder.infusion("LEVO8-250", "Levophed 8 mg in 250 mL", 12, "ug/min", start=3)
    builder.resources[-1]["medicationCodeableConcept"]["coding"][0]["system"] = "urn:oid:1.2.3.4"
    builder.infusion("", "noradrenaline 0.1 mcg/kg/min", 0.1, "ug/kg/min", start=1, text_only=True)
    facts = facts_of(builder, knowledge)
    assert [(a.drug, a.matched_by) for a in facts.administrations] == [
        ("norepinephrine", "text"),
        ("norepinephrine", "text"),
    ]
    assert facts.unknown_codes == {
        "MedicationAdministration urn:oid:1.2.3.4|LEVO8-250 (matched norepinephrine by text)": 1,
        "MedicationAdministration text:noradrenaline 0.1 mcg/kg/min (matched norepinephrine by text)": 1,
    }


def test_epinephrine_text_does_not_match_inside_norepinephrine(knowledge: Knowledge) -> None:
    # Word boundaries: "norepinephrine" must not be read as epinephrine (VIS coefficient 100 both,
    # but epinephrine is an inotrope too and the evidence would name the wrong drug).
    assert knowledge.drug_for_text("Norepinephrine bitartrate 4 mg/4 mL").name == "norepinephrine"
    assert knowledge.drug_for_text("EPINEPHrine 1 mg/mL").name == "epinephrine"
    assert knowledge.drug_for_text("noradrenaline").name == "norepinephrine"
    assert knowledge.drug_for_text("dexmedetomidine") is None


def test_salt_code_and_rate_ratio_are_read(knowledge: Knowledge) -> None:
    # Norepinephrine bitartrate (RxNorm 242969, synthetic data) charted as a rate ratio 8 ug / 1 min.
    record = {
        "resourceType": "MedicationAdministration",
        "id": "ratio",
        "status": "in-progress",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "242969"}]},
        "effectivePeriod": {"start": "2025-03-01T08:00:00Z"},
        "dosage": {
            "rateRatio": {
                "numerator": {"value": 8, "system": UCUM, "code": "ug"},
                "denominator": {"value": 1, "system": UCUM, "code": "min"},
            }
        },
    }
    (fact,) = facts_of(PatientBuilder("ratio", AT), knowledge, record).administrations
    assert (fact.drug, fact.rate, fact.rate_unit, fact.matched_by, fact.end) == (
        "norepinephrine",
        8.0,
        "ug/min",
        "code",
        None,
    )
    assert fact.start == T - 4 * HOUR


def test_bolus_is_flagged(knowledge: Knowledge) -> None:
    push = {
        "resourceType": "MedicationAdministration",
        "id": "push",
        "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "3992"}]},
        "effectiveDateTime": "2025-03-01T11:00:00Z",
        "dosage": {"dose": {"value": 1, "unit": "mg", "system": UCUM, "code": "mg"}},
    }
    (fact,) = facts_of(PatientBuilder("push", AT), knowledge, push).administrations
    assert fact.bolus and fact.start == fact.end == T - HOUR


def test_who_icd10_and_icd10cm_match_by_prefix_with_or_without_dots(knowledge: Knowledge) -> None:
    builder = PatientBuilder("icd", AT)
    builder.condition("http://hl7.org/fhir/sid/icd-10-cm", "I21.4", "NSTEMI", onset_hours=30)
    builder.condition("http://hl7.org/fhir/sid/icd-10", "A419", "Sepsis, unspecified", onset_hours=8)
    builder.condition("http://hl7.org/fhir/sid/icd-10-cm", "Z21", "Asymptomatic HIV status", onset_hours=1e4)
    facts = facts_of(builder, knowledge)
    assert [set(c.value_sets) for c in facts.conditions] == [
        {"acute_myocardial_infarction"},
        {"sepsis"},
        {"hiv_aids"},
    ]
    # Z21 is not AIDS (asymptomatic HIV): its row only suggests the value set, so it asks, never excludes.
    assert [set(c.suggests) for c in facts.conditions] == [set(), set(), {"hiv_aids"}]
    assert not facts.unknown_codes
