"""[speed] The sweep-line derivations give exactly what the brute-force definitions give.

``clinical/derived.py`` builds the infusion segments and the VIS series in one pass over the
records' start and stop times (O(n log n); issue 17). ``tests/sweep_oracles.py`` keeps the
versions that rescan every record at every boundary (O(n²)) as the definition. Random titration
histories — overlapping records, gaps, several records at the same time, open-ended records,
single-time rates, boluses, finished records with no end, malformed periods, several drugs, rates
that cannot be converted, no or an old body weight — must give the same segments, the same VIS
points (time, value, resources, note) and the same summary, evidence included.

A second property runs FHIR MedicationAdministrations through extraction first, in every shape
EHRs chart an infusion ([fidelity]): a dose rate, ``dosage.dose`` beside a pump rate, a pump rate in
mL/h with the bag's strength in a contained or a referenced Medication, a bag with no strength, and
rates charted at a single moment.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.base.config import PROJECT_ROOT
from cds_service.base.facts import AdministrationFact, ConditionFact, ObservationFact, PatientFacts
from cds_service.clinical.derived import (
    _infusion_segments,
    _vasopressor_episodes,
    body_weight,
    load_derivation_params,
    septic_shock_onset,
    vis_series,
)
from cds_service.knowledge.mappings import Knowledge, load_knowledge
from cds_service.patient_data.extract import extract
from cds_service.tools.scenario_builder import PatientBuilder

from . import sweep_oracles

AT = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
T = AT.timestamp()
STEP = 300.0  # a 5-minute grid: records often start or stop at the same moment
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_KNOWLEDGE = load_knowledge(PROJECT_ROOT)
_ONSET = load_derivation_params(PROJECT_ROOT)["septic_shock_onset"]
#: VIS drugs, a vasopressor without a VIS coefficient and a drug that is no vasoactive at all.
DRUGS = [*sorted(n for n, d in _KNOWLEDGE.drugs.items() if d.vis_coefficient is not None), "phenylephrine"]
UNITS = ["ug/kg/min", "ug/min", "mg/h", "U/min", "U/kg/min", "ug/kg/h", "mL/h", "mg"]
STATUSES = ["in-progress", "completed", "stopped", "on-hold", "not-done", "unknown"]
RATE_NOTES = ["", "", "", "15 mL/h × 16 mg/250 mL = 0.96 mg/h", "pump 67.5 mL/h, bag strength not charted"]


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return _KNOWLEDGE


@st.composite
def administration(draw: st.DrawFn, index: int) -> AdministrationFact:
    start = T - draw(st.integers(-2, 48)) * STEP + draw(st.sampled_from([0.0, 0.0, 0.0, 17.5]))
    end_kind = draw(st.sampled_from(["none", "same", "later", "later", "later", "before", "after_at"]))
    end = {
        "none": None,
        "same": start,
        "later": start + draw(st.integers(1, 24)) * STEP,
        "before": start - STEP,  # a malformed period
        "after_at": T + 3 * STEP,
    }[end_kind]
    rate = draw(st.one_of(st.none(), st.sampled_from([0.05, 0.1, 0.12, 0.3, 2.0, 8.0, 0.03])))
    return AdministrationFact(
        drug=draw(st.sampled_from(DRUGS)),
        start=start,
        end=end,
        rate=rate,
        rate_unit=draw(st.sampled_from(UNITS)),
        # Mostly one resource per record; a small pool of ids lets some records share one.
        resource=f"MedicationAdministration/{draw(st.sampled_from([index, index, index, index % 3]))}",
        code="http://www.nlm.nih.gov/research/umls/rxnorm|7512",
        matched_by=draw(st.sampled_from(["code", "code", "text"])),
        status=draw(st.sampled_from(STATUSES)),
        bolus=draw(st.booleans()) if draw(st.integers(0, 5)) == 0 else False,
        rate_note=draw(st.sampled_from(RATE_NOTES)),
    )


@st.composite
def titration_history(draw: st.DrawFn) -> PatientFacts:
    count = draw(st.integers(0, 40))
    records = [draw(administration(index)) for index in range(count)]
    facts = PatientFacts("p", administrations=records)
    weight = draw(st.sampled_from(["recent", "recent", "none", "old"]))
    if weight != "none":
        hours = 2 if weight == "recent" else 400
        facts.observations["body_weight"] = [
            ObservationFact(
                "body_weight", T - hours * 3600, 80.0, "kg", "Observation/w", "http://loinc.org|29463-7"
            )
        ]
    if draw(st.integers(0, 9)) == 0:
        facts.unavailable.add("administrations")
    return facts


@PROPERTY
@given(facts=titration_history(), at_offset=st.sampled_from([0.0, -6 * STEP, -20.5 * STEP]))
def test_infusion_segments_and_vis_agree_with_the_brute_force_definition(
    facts: PatientFacts, at_offset: float
) -> None:
    at = T + at_offset
    knowledge = _KNOWLEDGE
    vis_drugs = {n for n, d in knowledge.drugs.items() if d.vis_coefficient is not None}
    for drugs in (vis_drugs, set(DRUGS)):
        assert _infusion_segments(facts.administrations, drugs, at) == sweep_oracles.infusion_segments(
            facts.administrations, drugs, at
        )
    weight = body_weight(facts, at)
    assert vis_series(facts, knowledge, at, weight) == sweep_oracles.vis_series(facts, knowledge, at, weight)
    assert vis_series(facts, knowledge, at) == sweep_oracles.vis_series(facts, knowledge, at)


@st.composite
def consecutive_titration(draw: st.DrawFn) -> PatientFacts:
    """A titration charted as consecutive records — each ends when the next starts, or is a rate
    charted at one moment — as most EHRs chart one: the shape the segments' and the VIS points'
    one-drug fast paths take. Now and then a gap, an overlap, a record sharing its neighbour's
    resource, a repeated rate, a second drug, so that both sides of each fast path are exercised."""
    drugs = ["norepinephrine"] + (["vasopressin"] if draw(st.integers(0, 3)) == 0 else [])
    records: list[AdministrationFact] = []
    for drug in drugs:
        time = T - draw(st.integers(0, 48)) * STEP
        count = draw(st.integers(1, 30))
        for index in range(count):
            step = draw(st.sampled_from([1, 1, 1, 2, 3])) * STEP
            shape = draw(st.sampled_from(["period", "period", "period", "moment", "gap", "overlap"]))
            last = index == count - 1
            end: float | None = {
                "period": time + step,
                "moment": time,
                "gap": time + step / 2,
                "overlap": time + 2 * step,
            }[shape]
            if last and draw(st.booleans()):
                end = None
            status = "in-progress" if shape == "moment" or end is None else "completed"
            resource = index - 1 if index and draw(st.integers(0, 9)) == 0 else index
            records.append(
                AdministrationFact(
                    drug,
                    time,
                    end,
                    draw(
                        st.sampled_from(
                            [0.1, 0.1, 0.12, 0.3, 0.0, 0.05 if drug == "norepinephrine" else 0.03]
                        )
                    ),
                    "ug/kg/min" if drug == "norepinephrine" else "U/min",
                    f"MedicationAdministration/{drug}-{resource}",
                    "c",
                    draw(st.sampled_from(["code", "code", "text"])),
                    status,
                )
            )
            time += step
    records.sort(key=lambda a: a.start)  # as extraction orders them
    facts = PatientFacts("p", administrations=records)
    facts.observations["body_weight"] = [
        ObservationFact("body_weight", T - 7200.0, 80.0, "kg", "Observation/w", "http://loinc.org|29463-7")
    ]
    return facts


@PROPERTY
@given(facts=consecutive_titration(), at_offset=st.sampled_from([0.0, 0.0, -6 * STEP, -20.5 * STEP]))
def test_consecutive_titrations_agree_with_the_brute_force_definition(
    facts: PatientFacts, at_offset: float
) -> None:
    at = T + at_offset
    vis_drugs = {n for n, d in _KNOWLEDGE.drugs.items() if d.vis_coefficient is not None}
    assert _infusion_segments(facts.administrations, vis_drugs, at) == sweep_oracles.infusion_segments(
        facts.administrations, vis_drugs, at
    )
    assert vis_series(facts, _KNOWLEDGE, at) == sweep_oracles.vis_series(facts, _KNOWLEDGE, at)


# -- septic-shock onset: every vasopressor episode against the lactates around it ------------------------


@st.composite
def onset_history(draw: st.DrawFn) -> PatientFacts:
    facts = draw(titration_history())
    # Several short episodes (pauses longer than 6 h split them) and lactates around them.
    for _ in range(draw(st.integers(0, 6))):
        start = T - draw(st.integers(0, 40)) * 3600.0 - draw(st.sampled_from([0.0, 1800.0]))
        facts.administrations.append(
            AdministrationFact(
                "norepinephrine",
                start,
                start + 1800.0,
                0.1,
                "ug/kg/min",
                "MedicationAdministration/e",
                "c",
                "code",
                "completed",
            )
        )
    lactates = [
        ObservationFact(
            "lactate",
            T - draw(st.integers(-2, 60)) * 1800.0,
            draw(st.sampled_from([1.1, 2.0, 2.04, 3.5, 5.2])),
            "mmol/L",
            f"Observation/l{index}",
            "http://loinc.org|2524-7",
        )
        for index in range(draw(st.integers(0, 12)))
    ]
    facts.observations["lactate"] = sorted(lactates, key=lambda f: f.time)  # as extraction orders them
    statuses = ["active", "resolved", ""]
    for index in range(draw(st.integers(0, 3))):
        onset = draw(
            st.one_of(st.none(), st.sampled_from([T - 200 * 3600.0, T - 30 * 3600.0, T - 3 * 3600.0]))
        )
        facts.conditions.append(
            ConditionFact(
                frozenset(draw(st.sampled_from([{"sepsis"}, {"septic_shock"}, {"pneumonia"}]))),
                onset,
                None,
                draw(st.sampled_from(statuses)),
                "confirmed",
                f"Condition/c{index}",
                "http://hl7.org/fhir/sid/icd-10-cm|A41.9",
            )
        )
    if draw(st.integers(0, 9)) == 0:
        facts.unavailable.add("conditions")
    facts.administrations.sort(key=lambda a: a.start)  # as extraction orders them
    return facts


@PROPERTY
@given(facts=onset_history(), at_offset=st.sampled_from([0.0, -10 * 3600.0]))
def test_septic_shock_onset_agrees_with_the_brute_force_definition(
    facts: PatientFacts, at_offset: float
) -> None:
    at = T + at_offset
    assert _vasopressor_episodes(facts, _KNOWLEDGE, 6 * 3600.0, at) == sweep_oracles.vasopressor_episodes(
        facts, _KNOWLEDGE, 6 * 3600.0, at
    )
    assert septic_shock_onset(facts, _KNOWLEDGE, _ONSET, at) == sweep_oracles.septic_shock_onset(
        facts, _KNOWLEDGE, _ONSET, at
    )


@pytest.mark.parametrize(
    ("hours_from_start", "onset_hours_from_start"),
    [(-6.0, 0.0), (6.0, 0.0), (20.0, 20.0), (-6.5, None), (21.0, None)],
)
def test_a_lactate_on_the_edge_of_an_episode_window_counts_as_the_definition_says(
    hours_from_start: float, onset_hours_from_start: float | None
) -> None:
    # Norepinephrine from 20 h ago, still running; one lactate of 3.1 mmol/L. Exactly 6 h before or
    # after the start it is "around" the start (onset: the start); exactly now, the episode's end, it
    # is a late lactate while on vasopressors (onset: now); outside the window it does not count.
    start = T - 20 * 3600.0
    facts = PatientFacts(
        "p",
        administrations=[
            AdministrationFact(
                "norepinephrine",
                start,
                None,
                0.1,
                "ug/kg/min",
                "MedicationAdministration/n",
                "c",
                "code",
                "in-progress",
            )
        ],
        observations={
            "lactate": [
                ObservationFact(
                    "lactate",
                    start + hours_from_start * 3600.0,
                    3.1,
                    "mmol/L",
                    "Observation/l",
                    "loinc|2524-7",
                )
            ]
        },
        conditions=[
            ConditionFact(
                frozenset({"sepsis"}), T - 10 * 3600.0, None, "active", "confirmed", "Condition/s", "x|A41.9"
            )
        ],
    )
    found = septic_shock_onset(facts, _KNOWLEDGE, _ONSET, T)
    assert found == sweep_oracles.septic_shock_onset(facts, _KNOWLEDGE, _ONSET, T)
    if onset_hours_from_start is None:
        assert found.status != "known"
    else:
        assert found.status == "known" and found.value == start + onset_hours_from_start * 3600.0


# -- through extraction: the infusion shapes EHRs send ----------------------------------------------

_CODES = {"norepinephrine": "7512", "epinephrine": "3992", "vasopressin": "11149", "dopamine": "3628"}


@st.composite
def charted_infusions(draw: st.DrawFn) -> PatientBuilder:
    builder = PatientBuilder("sweep", AT, age=60, gender="female")
    if draw(st.booleans()):
        builder.weight(80.0, hours=draw(st.sampled_from([3, 30, 300])))
    for _ in range(draw(st.integers(1, 25))):
        drug = draw(st.sampled_from(sorted(_CODES)))
        code = _CODES[drug]
        start = draw(st.integers(0, 96)) * 0.25
        end = draw(
            st.one_of(st.none(), st.sampled_from([start, max(0.0, start - 0.25), max(0.0, start - 2.0)]))
        )
        shape = draw(
            st.sampled_from(["rate", "rate", "dose", "pump-contained", "pump-referenced", "no-strength"])
        )
        status = draw(st.sampled_from([None, None, "in-progress", "completed", "stopped"]))
        if shape == "rate":
            unit = (
                "U/min" if drug == "vasopressin" else draw(st.sampled_from(["ug/kg/min", "ug/min", "mg/h"]))
            )
            builder.infusion(
                code, drug, draw(st.sampled_from([0.04, 0.1, 0.3, 5.0])), unit, start, end, status=status
            )
        elif shape == "dose":
            builder.infusion(code, drug, 67.5, "mL/h", start, end, status=status, dose=(0.9, "ug/kg/min"))
        elif shape == "pump-contained":
            reference = builder.medication(code, drug, (16.0, "mg"), contained=True)
            builder.infusion(code, drug, 67.5, "mL/h", start, end, status=status, medication=reference)
            builder.contain()
        else:
            amount = (4.0, "mg") if shape == "pump-referenced" else None
            reference = builder.medication(code, f"{drug} bag", amount)
            builder.infusion(code, drug, 120.0, "mL/h", start, end, status=status, medication=reference)
        if draw(st.integers(0, 3)) == 0:
            # Charted at a single moment (a titration from a flowsheet): it holds until the next record.
            resource = builder.resources[-1]
            if "effectivePeriod" in resource:
                resource["effectiveDateTime"] = resource.pop("effectivePeriod")["start"]
    return builder


@PROPERTY
@given(builder=charted_infusions())
def test_charted_infusion_shapes_agree_with_the_brute_force_definition(builder: PatientBuilder) -> None:
    facts = extract(builder.patient_id, builder.patient, builder.resources, _KNOWLEDGE)
    assert vis_series(facts, _KNOWLEDGE, T) == sweep_oracles.vis_series(facts, _KNOWLEDGE, T)


def test_the_oracle_is_the_definition_on_a_worked_example(knowledge: Knowledge) -> None:
    # Norepinephrine 0.1 from 6 h to 2 h ago, a later record at 0.3 from 4 h to 3 h ago, an open one
    # at 0.2 from 1 h ago.
    # Expected rates: 0.1 (6→4 h), 0.3 (4→3 h), 0.1 again (3→2 h), nothing (2→1 h), 0.2 (1 h → now).
    def record(start_h: float, end_h: float | None, rate: float, name: str) -> AdministrationFact:
        end = None if end_h is None else T - end_h * 3600
        status = "in-progress" if end is None else "completed"
        return AdministrationFact(
            "norepinephrine", T - start_h * 3600, end, rate, "ug/kg/min", name, "c", "code", status
        )

    facts = PatientFacts(
        "p", administrations=[record(6, 2, 0.1, "a"), record(4, 3, 0.3, "b"), record(1, None, 0.2, "c")]
    )
    expected = [(6, 10.0), (4, 30.0), (3, 10.0), (2, 0.0), (1, 20.0)]
    for implementation in (vis_series, sweep_oracles.vis_series):
        points, now = implementation(facts, knowledge, T)
        assert [((T - p.time) / 3600, round(float(p.value), 6)) for p in points] == expected
        assert now.value == pytest.approx(20.0)
