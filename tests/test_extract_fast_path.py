"""[performance] The extraction fast path gives exactly the facts the general path gives.

``_Extractor._simple_quantity`` handles the common case (a UCUM quantity needing no conversion)
without the general ``_quantity_fact``; memos cache times, code look-ups, unknown-code keys, drug
texts and derived-mean notes. Issue 17 added per-record fast paths behind the same switch: a drug
code seen before, a dose rate in a unit known to convert, a value in a unit known to need no
conversion (inlined into ``observation``). Here both ways run over odd, ordinary and random data
and must agree on every fact, count and note.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    bag = builder.medication("7512", "norepinephrine 4 mg/250 mL", (4.0, "mg"))
    for pump in (15, 22.5):  # coded and naming its bag: the second one takes the drug-code memo
        builder.infusion("7512", "norepinephrine", pump, "mL/h", start=1, medication=bag)
        builder.resources[-1]["medicationCodeableConcept"] = {
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "7512"}]
        }
    # A dose-rate code in another unit system, after the same code in UCUM: its unit is the one named.
    builder.norepinephrine(0.1, "ug/kg/min", start=1)
    builder.norepinephrine(0.1, "ug/kg/min", start=0.5)
    builder.resources[-1]["dosage"]["rateQuantity"] |= {
        "system": "http://example.org/u",
        "unit": "mcg/kg/min",
    }
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


# -- random data, both ways (issue 17: the per-record fast paths) ------------------------------------

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: dateTime texts: valid ones, the same one again, seconds 60 and beyond, non-ASCII digits, a bad
#: date or hour, offsets, no zone (the time memo must keep each as ``parse_time`` reads it).
times = st.one_of(
    st.builds(
        lambda day, hour, minute, second: f"2025-03-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}Z",
        st.integers(1, 3),
        st.integers(9, 10),
        st.sampled_from([0, 1, 59]),
        st.integers(0, 61),
    ),
    st.sampled_from(
        [
            "2025-03-01T10:00:07Z",
            "2025-03-01T10:00:99Z",
            "2025-03-01T10:00:5aZ",
            "2025-03-01T10:00:0\u0663Z",
            "2025-03-01T10:00:-1Z",
            "2025-03-01T10:00: 7Z",
            "2025-02-30T10:00:07Z",
            "2025-03-01T24:00:07Z",
            "2025-03-01T10:60:07Z",
            "2025-03-01 10:00:07Z",
            "2025-03-01T10:00:07z",
            "2025-03-01T10:00:07+02:00",
            "2025-03-01T10:00:07.5Z",
            "2025-03-01T10:00:07",
            "2025-03-01T1000:07Z",
            "2025-W09-6T10:00:07Z",
            "20250301T10:00:07Z",
            "2025-03-01",
            "2025-03",
            "",
        ]
    ),
    st.text(alphabet="0123456789-:TZ+ .", min_size=0, max_size=22),
)


_UNITS = st.sampled_from(["ug/kg/min", "ug/min", "mg/h", "U/min", "mL/h", "furlong", "", "ug/kg/min "])


@st.composite
def quantity(draw: st.DrawFn, units: st.SearchStrategy[str]) -> Any:
    """A FHIR Quantity as charted, and now and then as it should not be."""
    value = draw(st.sampled_from([0.1, 0.05, 2, 0, -0.0, 8.0, True, "0.1", None]))
    unit = draw(units)
    shape = draw(st.sampled_from(["ucum", "ucum", "ucum", "unit only", "other system", "int code", "junk"]))
    if shape == "junk":
        return draw(st.sampled_from([None, [], "0.1 ug/kg/min", {}]))
    found: dict[str, Any] = {"value": value} if value is not None else {}
    if shape == "ucum":
        found |= {"unit": unit, "system": UCUM, "code": unit}
    elif shape == "unit only":
        found["unit"] = unit
    elif shape == "other system":
        found |= {"system": "http://example.org/units", "code": unit}
        if draw(st.booleans()):
            found["unit"] = "mcg/kg/min"  # then the unit read is this one, not the code
    else:
        found |= {"system": UCUM, "code": 7}
    return found


@st.composite
def administration(draw: st.DrawFn, index: int) -> Any:
    """A MedicationAdministration with the drug coded, by text, by reference or not at all, and a
    rate in each of the fields EHRs use (or none)."""
    resource: dict[str, Any] = {"resourceType": "MedicationAdministration", "id": f"a{index}"}
    status = draw(st.sampled_from(["in-progress", "completed", "stopped", "not-done", None]))
    if status is not None:
        resource["status"] = status
    codings = draw(
        st.lists(
            st.one_of(
                st.builds(
                    lambda system, code: {"system": system, "code": code, "display": "Levophed"},
                    st.sampled_from([RXNORM, RXNORM, "http://example.org", None, 7]),
                    st.sampled_from(["7512", "7512", "11149", "99999", 7512, None]),
                ),
                st.sampled_from(["not a coding", {"system": ["x"], "code": "7512"}]),
            ),
            max_size=3,
        )
    )
    concept: dict[str, Any] = {"coding": codings}
    if draw(st.booleans()):
        concept["text"] = draw(st.sampled_from(["norepinephrine", "propofol", "Levophed 4 mg in 250 mL"]))
    where = draw(st.sampled_from(["concept", "concept", "concept", "reference", "both", "none"]))
    if where in ("concept", "both"):
        resource["medicationCodeableConcept"] = draw(st.sampled_from([concept, concept, "junk"]))
    if where in ("reference", "both"):
        resource["medicationReference"] = draw(
            st.sampled_from(
                [
                    {"reference": "Medication/bag", "display": "norepinephrine"},
                    {"reference": "Medication/missing", "display": "norepinephrine"},
                    {"reference": "#bag"},
                    {},
                    "",
                ]
            )
        )
        if draw(st.booleans()):
            resource["contained"] = [BAG]
    start = draw(times)
    when = draw(st.sampled_from(["period", "period", "moment", "none"]))
    if when == "period":
        resource["effectivePeriod"] = {"start": start, "end": draw(st.one_of(st.none(), times))}
    elif when == "moment":
        resource["effectiveDateTime"] = start
    dosage: dict[str, Any] = {}
    for field in draw(st.sets(st.sampled_from(["rateQuantity", "rateRatio", "dose"]))):
        if field == "rateRatio":
            dosage[field] = {"numerator": draw(quantity(_UNITS)), "denominator": {"value": 1, "code": "min"}}
        else:
            dosage[field] = draw(quantity(_UNITS))
    resource["dosage"] = draw(st.sampled_from([dosage, dosage, dosage, None]))
    return resource


BAG = {
    "resourceType": "Medication",
    "id": "bag",
    "code": {"coding": [{"system": RXNORM, "code": "7512"}], "text": "norepinephrine"},
    "ingredient": [
        {
            "itemCodeableConcept": {"coding": [{"system": RXNORM, "code": "7512"}]},
            "strength": {
                "numerator": {"value": 4, "system": UCUM, "code": "mg"},
                "denominator": {"value": 250, "system": UCUM, "code": "mL"},
            },
        }
    ],
}


@st.composite
def observation(draw: st.DrawFn, index: int) -> Any:
    """An Observation (a vital, a lab, a blood-pressure panel, an unknown code) with values in
    accepted, converted and refused units, censored, unit-less or missing."""
    # 19080-1 (serum hCG) is a coded input read from a quantity through its bands, never plainly.
    kind = draw(st.sampled_from(["8867-4", "8478-0", "751-8", "29463-7", "85354-9", "19080-1", "0000-0"]))
    units = {
        "19080-1": st.sampled_from(["m[IU]/mL", "[IU]/L"]),
        "8867-4": st.sampled_from(["/min", "/min", "{beats}/min", "%"]),
        "8478-0": st.sampled_from(["mm[Hg]", "mm[Hg]", "kPa"]),
        "751-8": st.sampled_from(["10*3/uL", "10*9/L", "/uL", "%"]),
        "29463-7": st.sampled_from(["kg", "kg", "[lb_av]", "g"]),
    }
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"o{index}",
        "status": draw(st.sampled_from(["final", "final", "amended", "entered-in-error"])),
        "code": {"coding": [{"system": LOINC, "code": kind}]},
        "effectiveDateTime": draw(times),
    }

    def value(code: str) -> dict[str, Any]:
        charted = draw(quantity(units.get(code, st.just("mm[Hg]"))))
        if isinstance(charted, dict) and draw(st.integers(0, 5)) == 0:
            charted["comparator"] = draw(st.sampled_from(["<", ">=", ""]))
        return {"valueQuantity": charted} if charted is not None else {}

    if kind == "85354-9":
        resource["component"] = [
            {"code": {"coding": [{"system": LOINC, "code": code}]}, **value(code)}
            for code in draw(st.lists(st.sampled_from(["8480-6", "8462-4", "8478-0"]), max_size=3))
        ]
    else:
        resource |= value(kind)
    return resource


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resources=st.lists(st.one_of(administration(0), administration(1), observation(2)), max_size=12))
def test_fast_and_general_paths_agree_on_random_charts(resources: list[Any], knowledge: Knowledge) -> None:
    resources.append(BAG)
    with pytest.MonkeyPatch.context() as monkeypatch:
        fast, general = both_ways(monkeypatch, resources, knowledge)
    assert fast == general
    assert list(fast.observations) == list(general.observations)
    assert list(fast.unknown_codes) == list(general.unknown_codes)
    assert repr(fast) == repr(general)  # 0.0 / -0.0 and 1 / 1.0 too
