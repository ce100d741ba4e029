"""[performance] The extraction fast path gives exactly the facts the general path gives.

``_Extractor._simple_quantity`` handles the common case (a UCUM quantity needing no conversion)
without the general ``_quantity_fact``; memos cache times, code look-ups, unknown-code keys, drug
texts and derived-mean notes. Here both ways run over odd and ordinary data and must agree on every
fact, count and note.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cds_service.base.config import PROJECT_ROOT
from cds_service.base.facts import PatientFacts
from cds_service.knowledge.mappings import Knowledge, load_knowledge
from cds_service.patient_data import extract as extract_module
from cds_service.patient_data.extract import extract
from cds_service.tools.icu_generator import icu_patient
from cds_service.tools.scenario_builder import LOINC, UCUM, PatientBuilder

AT = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return load_knowledge(PROJECT_ROOT)


def both_ways(
    monkeypatch: pytest.MonkeyPatch, resources: list[Any], knowledge: Knowledge
) -> tuple[PatientFacts, PatientFacts]:
    fast = extract("p", None, resources, knowledge)
    monkeypatch.setattr(extract_module._Extractor, "fast_path", False)
    general = extract("p", None, resources, knowledge)
    monkeypatch.undo()
    return fast, general


def obs(n: int, code: str, value: dict[str, Any] | None, when: str = "2025-03-01T10:00:00Z", **extra: Any):
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"o{n}",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": when,
        **extra,
    }
    if value is not None:
        resource["valueQuantity"] = value
    return resource


def odd_observations() -> list[Any]:
    q = [
        {"value": 0.4, "unit": "10*3/uL", "system": UCUM, "code": "10*3/uL"},
        {"value": 400, "unit": "/uL", "system": UCUM, "code": "/uL"},  # converted: general path
        {"value": 0.4, "unit": "K/uL"},  # no UCUM system
        {"value": 0.4, "system": "http://example.org/units", "code": "10*3/uL"},
        {"value": 0.4, "system": UCUM, "code": ""},
        {"value": 0.4, "system": UCUM, "code": 7},
        {"value": True, "system": UCUM, "code": "10*3/uL"},
        {"value": "0.4", "system": UCUM, "code": "10*3/uL"},
        {"value": 0.1, "comparator": "<", "system": UCUM, "code": "10*3/uL"},
        {"value": 3, "system": UCUM, "code": "%"},  # unit not accepted for ANC
        {"value": 12, "system": UCUM, "code": "furlong"},
        {"system": UCUM, "code": "10*3/uL"},
    ]
    resources: list[Any] = [obs(i, "751-8", v) for i, v in enumerate(q)]
    resources += [
        obs(100, "2524-7", {"value": 4, "system": UCUM, "code": "mmol/L"}),
        obs(101, "14118-4", {"value": 36, "system": UCUM, "code": "mg/dL"}),
        obs(102, "29463-7", {"value": 176, "system": UCUM, "code": "[lb_av]"}),
        obs(103, "8478-0", {"value": 0.0, "system": UCUM, "code": "mm[Hg]"}),
        obs(104, "8478-0", {"value": -0.0, "system": UCUM, "code": "mm[Hg]"}),
        obs(105, "8478-0", None, valueInteger=61),
        obs(106, "8478-0", None, dataAbsentReason={"text": "error"}),
        obs(107, "8867-4", {"value": 98, "unit": "beats/min", "system": UCUM, "code": "/min"}),
        obs(108, "8867-4", {"value": 98, "system": UCUM, "code": "/min"}, when="2025-03-01T10:00:00+02:00"),
        obs(109, "8867-4", {"value": 98, "system": UCUM, "code": "/min"}, when="2025-03-01T10:00:00"),
        obs(110, "8867-4", {"value": 98, "system": UCUM, "code": "/min"}, when=None),
        obs(111, "8867-4", {"value": 98, "system": UCUM, "code": "/min"}, status="entered-in-error"),
        obs(112, "59408-5", {"value": 94, "system": UCUM, "code": "%"}),
        obs(113, "59408-5", {"value": 94, "system": UCUM, "code": "%"}),
        obs(114, "2106-3", None, valueCodeableConcept={"text": "positive"}),
        obs(115, "2106-3", None, valueCodeableConcept={"text": "maybe"}),
        "not a resource",
        {
            "resourceType": "Observation",
            "id": "weird",
            "code": {"coding": [{"system": ["x"], "code": "1"}]},
            "effectiveDateTime": "2025-03-01T10:00:00Z",
            "valueQuantity": {"value": 1},
        },
        {
            "resourceType": "Observation",
            "id": "weird2",
            "code": {"coding": ["not a coding"]},
            "effectiveDateTime": "2025-03-01T10:00:00Z",
        },
        {
            "resourceType": "Observation",
            "id": "two-codes",
            "code": {
                "coding": [
                    {"system": "http://example.org", "code": "hr"},
                    {"system": LOINC, "code": "8867-4"},
                ]
            },
            "effectiveDateTime": "2025-03-01T10:05:00Z",
            "valueQuantity": {"value": 90, "system": UCUM, "code": "/min"},
        },
    ]
    builder = PatientBuilder("odd", AT)
    builder.bp_panel(100, 50, hours=2)
    builder.bp_panel(100, 50, hours=3)  # same S/D: the memoised note
    builder.bp_panel(0, 0, hours=4)
    builder.bp_panel(104, 62, hours=5, mean=75)
    builder.bp_panel(104, 62, hours=5.01)
    builder.map(76, hours=5.01)  # a charted mean for the same reading
    builder.infusion("99999", "Levophed 4 mg in 250 mL", 8, "ug/min", start=3)  # by text
    builder.infusion("99999", "Levophed 4 mg in 250 mL", 9, "ug/min", start=2)
    builder.infusion("88888", "propofol", 30, "ug/kg/min", start=2)
    builder.infusion("7512", "norepinephrine", 0.1, "ug/kg/min", start=1)
    panel = builder.resources[0]
    panel_broken = {**panel, "id": "broken", "component": [*panel["component"], "junk"]}
    return [*resources, *builder.resources, panel_broken]


def test_fast_path_and_general_path_agree_on_odd_data(
    monkeypatch: pytest.MonkeyPatch, knowledge: Knowledge
) -> None:
    fast, general = both_ways(monkeypatch, odd_observations(), knowledge)
    assert fast == general
    assert list(fast.observations) == list(general.observations)  # same insertion order
    assert list(fast.unknown_codes) == list(general.unknown_codes)
    assert fast.observations["absolute_neutrophil_count"]  # the data did reach the fast path
    assert fast.unknown_codes and fast.unusable and fast.skipped


def test_fast_path_and_general_path_agree_on_the_benchmark_patient(
    monkeypatch: pytest.MonkeyPatch, knowledge: Knowledge
) -> None:
    builder = icu_patient(1000, AT)
    fast, general = both_ways(monkeypatch, builder.resources, knowledge)
    assert fast == general
    assert sum(len(series) for series in fast.observations.values()) > 600
    assert {a.drug for a in fast.administrations} >= {"norepinephrine", "vasopressin"}
