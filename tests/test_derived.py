"""[knowledge] Derived clinical inputs, each with numbers worked out by hand in the comments.

Evaluation time 2025-03-01 12:00 UTC throughout; ``h(n)`` is n hours before it. The clinical story
of each test is in its name; the arithmetic is beside the assertion.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pytest

from cds_service.base.config import PROJECT_ROOT
from cds_service.base.facts import ObservationFact, PatientFacts
from cds_service.clinical.derived import (
    age_years,
    body_weight,
    derive_inputs,
    latest,
    load_derivation_params,
    persistent,
    septic_shock_onset,
    sustained_run,
    trend_holds,
    vis_series,
)
from cds_service.knowledge.mappings import Knowledge, load_knowledge
from cds_service.patient_data.extract import extract
from cds_service.tools.scenario_builder import ICD10CM, RXNORM, SNOMED, UCUM, PatientBuilder

AT = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
T = AT.timestamp()
HOUR = 3600.0
MINUTE = 60.0


def h(hours_before: float) -> float:
    return T - hours_before * HOUR


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return load_knowledge(PROJECT_ROOT)


@pytest.fixture(scope="module")
def onset_params() -> dict[str, Any]:
    return load_derivation_params(PROJECT_ROOT)["septic_shock_onset"]


def facts_of(builder: PatientBuilder, knowledge: Knowledge, *extra: dict[str, Any]) -> PatientFacts:
    return extract(builder.patient_id, builder.patient, [*builder.resources, *extra], knowledge)


def vis_points(facts: PatientFacts, knowledge: Knowledge, at: float = T) -> list[tuple[float, float]]:
    points, _ = vis_series(facts, knowledge, at)
    return [(p.time, round(float(p.value), 6)) for p in points]


def single_time(
    code: str, rate: float, unit: str, hours: float, status: str = "in-progress"
) -> dict[str, Any]:
    """A rate charted at one moment (no period), as flowsheet-driven EHRs send titrations."""
    return {
        "resourceType": "MedicationAdministration",
        "id": f"st-{code}-{hours}",
        "status": status,
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code}]},
        "effectiveDateTime": datetime.fromtimestamp(h(hours), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dosage": {"rateQuantity": {"value": rate, "unit": unit, "system": UCUM, "code": unit}},
    }


# -- age and weight -------------------------------------------------------------------------------


def test_age_counts_completed_years_at_the_evaluation_time() -> None:
    # Born 1980-06-15: on 2025-03-01 the 45th birthday is still ahead → 44; on 2025-06-15 → 45.
    assert age_years(date(1980, 6, 15), T).value == 44
    assert age_years(date(1980, 6, 15), datetime(2025, 6, 15, 0, 30, tzinfo=UTC).timestamp()).value == 45
    unknown = age_years(None, T)
    assert unknown.status == "unknown" and "birth date" in unknown.missing


def test_latest_weight_at_or_before_the_evaluation_time(knowledge: Knowledge) -> None:
    builder = PatientBuilder("w", AT)
    builder.weight(82, hours=48)
    builder.weight(79.5, hours=10)
    builder.weight(90, hours=-1)  # charted after the evaluation time: not seen yet
    weight = body_weight(facts_of(builder, knowledge), T)
    assert (weight.value, weight.status) == (79.5, "known")
    assert weight.evidence[0].time == h(10)
    assert body_weight(PatientFacts("none"), T).missing == "body weight (LOINC 29463-7, 3141-9 or 8335-2)"


# -- VIS ------------------------------------------------------------------------------------------


def test_vis_follows_a_norepinephrine_rate_change_in_the_middle_of_the_window(knowledge: Knowledge) -> None:
    builder = PatientBuilder("vis-titr", AT)
    builder.weight(80)
    builder.norepinephrine(0.1, "ug/kg/min", start=6, end=3)
    builder.norepinephrine(0.25, "ug/kg/min", start=3)  # titrated up 3 h ago, still running
    facts = facts_of(builder, knowledge)
    # 100 × 0.1 = 10 from 06:00; 100 × 0.25 = 25 from 09:00 until now.
    assert vis_points(facts, knowledge) == [(h(6), 10.0), (h(3), 25.0)]
    _, now = vis_series(facts, knowledge, T)
    assert (now.value, now.status) == (25.0, "known")
    assert now.evidence[0].text == "VIS 25 = norepinephrine 0.25 ug/kg/min"
    # Half-way through the first rate the score was 10.
    points, _ = vis_series(facts, knowledge, T)
    assert latest(points, h(4.5)).value == 10.0


def test_overlapping_records_of_one_drug_are_not_added(knowledge: Knowledge) -> None:
    builder = PatientBuilder("vis-overlap", AT)
    builder.weight(80)
    # The first record was closed late (at 11:00) although the titration to 0.3 started at 08:00.
    builder.norepinephrine(0.1, "ug/kg/min", start=6, end=1)
    builder.norepinephrine(0.3, "ug/kg/min", start=4)
    facts = facts_of(builder, knowledge)
    # 06:00–08:00: 100 × 0.1 = 10. From 08:00 the later record gives the rate: 100 × 0.3 = 30,
    # not 10 + 30 = 40; the first record's end at 11:00 changes nothing.
    assert vis_points(facts, knowledge) == [(h(6), 10.0), (h(4), 30.0)]


def test_earlier_infusion_gives_the_rate_again_when_a_short_later_record_ends(knowledge: Knowledge) -> None:
    builder = PatientBuilder("vis-short", AT)
    builder.weight(80)
    builder.norepinephrine(0.1, "ug/kg/min", start=6)  # running, no end
    builder.norepinephrine(0.3, "ug/kg/min", start=4, end=2)  # a 2-hour higher rate
    facts = facts_of(builder, knowledge)
    # 10 from 06:00, 30 from 08:00, back to 10 at 10:00 (the first infusion never stopped).
    assert vis_points(facts, knowledge) == [(h(6), 10.0), (h(4), 30.0), (h(2), 10.0)]


def test_vis_of_norepinephrine_and_vasopressin_in_units_per_minute(knowledge: Knowledge) -> None:
    builder = PatientBuilder("vis-two", AT)
    builder.weight(80)
    builder.norepinephrine(0.2, "ug/kg/min", start=5)
    builder.infusion("11149", "vasopressin", 0.04, "U/min", start=2)
    facts = facts_of(builder, knowledge)
    # Norepinephrine 100 × 0.2 = 20. Vasopressin 0.04 U/min ÷ 80 kg = 0.0005 U/kg/min,
    # × 10 000 = 5. From 10:00: 20 + 5 = 25.
    assert vis_points(facts, knowledge) == [(h(5), 20.0), (h(2), 25.0)]
    _, now = vis_series(facts, knowledge, T)
    assert "vasopressin 0.0005 U/kg/min" in now.evidence[0].text
    assert any(e.text == "weight 80 kg, LOINC 29463-7" for e in now.evidence)  # the weight used is shown
    assert "(0.04 U/min ÷ 80 kg)" in now.evidence[0].text  # and the arithmetic


def test_vis_from_micrograms_per_minute_and_milligrams_per_hour(knowledge: Knowledge) -> None:
    builder = PatientBuilder("vis-units", AT)
    builder.weight(80)
    builder.norepinephrine(16, "ug/min", start=3)  # 16 µg/min ÷ 80 kg = 0.2 µg/kg/min → 20
    builder.infusion("3992", "epinephrine", 0.6, "mg/h", start=1)
    # Epinephrine 0.6 mg/h = 600 µg / 60 min = 10 µg/min ÷ 80 kg = 0.125 µg/kg/min, × 100 = 12.5.
    _, now = vis_series(facts_of(builder, knowledge), knowledge, T)
    assert now.value == pytest.approx(32.5)


def test_missing_weight_makes_vis_unknown_not_zero(knowledge: Knowledge) -> None:
    builder = PatientBuilder("vis-noweight", AT)
    builder.norepinephrine(16, "ug/min", start=3)
    facts = facts_of(builder, knowledge)
    points, now = vis_series(facts, knowledge, T)
    assert (now.value, now.status) == (None, "unknown")
    assert now.missing.startswith("body weight")
    assert points == []  # no partial series a criterion could read as "no infusion"
    assert now.evidence[0].resources == (facts.administrations[0].resource,)
    # A weight-based rate needs no weight: 100 × 0.3 = 30 with no weight charted.
    other = PatientBuilder("vis-perkg", AT)
    other.norepinephrine(0.3, "ug/kg/min", start=3)
    _, known = vis_series(facts_of(other, knowledge), knowledge, T)
    assert (known.value, known.status) == (30.0, "known")


def test_in_progress_infusion_runs_until_the_evaluation_time(knowledge: Knowledge) -> None:
    builder = PatientBuilder("vis-running", AT)
    builder.norepinephrine(0.3, "ug/kg/min", start=4)
    facts = facts_of(builder, knowledge)
    # Started 08:00 with no end: 100 × 0.3 = 30 now, and still 30 two hours later.
    for at in (T, T + 2 * HOUR):
        _, now = vis_series(facts, knowledge, at)
        assert now.value == 30.0
    # Before it started, the score was 0 and nothing was running.
    _, before = vis_series(facts, knowledge, h(5))
    assert before.value == 0.0


def test_stopped_and_restarted_infusion_drops_to_zero_in_between(knowledge: Knowledge) -> None:
    builder = PatientBuilder("vis-restart", AT)
    builder.norepinephrine(0.2, "ug/kg/min", start=8, end=6)
    builder.norepinephrine(0.2, "ug/kg/min", start=4)
    facts = facts_of(builder, knowledge)
    # 04:00–06:00: 20; 06:00–08:00: nothing running → 0; from 08:00: 20 again.
    assert vis_points(facts, knowledge) == [(h(8), 20.0), (h(6), 0.0), (h(4), 20.0)]
    points, _ = vis_series(facts, knowledge, T)
    assert latest(points, h(5)).note == "no vasoactive infusion running"


def test_rates_charted_at_single_times_hold_until_the_next_record(knowledge: Knowledge) -> None:
    facts = facts_of(
        PatientBuilder("vis-points", AT),
        knowledge,
        single_time("7512", 0.1, "ug/kg/min", hours=6),
        single_time("7512", 0.2, "ug/kg/min", hours=3),
    )
    # 10 from 06:00, then 20 from 09:00 until now (the last charted rate is still running).
    assert vis_points(facts, knowledge) == [(h(6), 10.0), (h(3), 20.0)]


def test_bolus_and_completed_single_time_records_do_not_enter_the_vis(knowledge: Knowledge) -> None:
    push = single_time("3992", 10, "ug/min", hours=1, status="completed")  # a push dose charted as a rate
    facts = facts_of(PatientBuilder("vis-push", AT), knowledge, push)
    points, now = vis_series(facts, knowledge, T)
    assert (points, now.value, now.status) == ([], 0.0, "known")


def test_vis_unknown_when_the_rate_unit_does_not_fit_the_drug(knowledge: Knowledge) -> None:
    builder = PatientBuilder("vis-badunit", AT)
    builder.weight(80)
    builder.norepinephrine(0.03, "U/min", start=2)  # a vasopressin unit on norepinephrine
    _, now = vis_series(facts_of(builder, knowledge), knowledge, T)
    assert now.status == "unknown"
    assert "'U/min' not convertible to ug/kg/min" in now.missing


def test_vis_names_a_drug_matched_by_text(knowledge: Knowledge) -> None:
    builder = PatientBuilder("vis-text", AT)
    builder.infusion("", "Levophed infusion", 0.15, "ug/kg/min", start=2, text_only=True)
    _, now = vis_series(facts_of(builder, knowledge), knowledge, T)
    # 100 × 0.15 = 15
    assert now.value == pytest.approx(15.0)
    assert "(matched by medication text)" in now.evidence[0].text


# -- septic-shock onset ---------------------------------------------------------------------------


def shock(builder: PatientBuilder, *, lactate: float | None = 4.2, infection: bool = True) -> PatientBuilder:
    """Sepsis dated 3 h before norepinephrine, started 4 h ago; lactate 30 min before the start."""
    builder.weight(80)
    if infection:
        builder.condition(ICD10CM, "A41.9", "Sepsis, unspecified organism", onset_hours=7)
    if lactate is not None:
        builder.lactate(lactate, hours=4.5)
    builder.norepinephrine(0.3, "ug/kg/min", start=4)
    return builder


def test_onset_is_the_vasopressor_start_of_a_qualifying_episode(
    knowledge: Knowledge, onset_params: dict[str, Any]
) -> None:
    builder = shock(PatientBuilder("onset", AT))
    facts = facts_of(builder, knowledge)
    onset = septic_shock_onset(facts, knowledge, onset_params, T)
    assert (onset.value, onset.status) == (h(4), "known")
    texts = [e.text for e in onset.evidence]
    assert texts[:3] == ["norepinephrine started", "lactate 4.2 mmol/L", "infection diagnosis charted"]
    shown = {r for e in onset.evidence for r in e.resources}
    assert {facts.administrations[0].resource, facts.conditions[0].resource} <= shown


def test_onset_with_missing_lactate_is_unknown_but_timed(
    knowledge: Knowledge, onset_params: dict[str, Any]
) -> None:
    facts = facts_of(shock(PatientBuilder("onset-nolac", AT), lactate=None), knowledge)
    onset = septic_shock_onset(facts, knowledge, onset_params, T)
    assert (onset.value, onset.status) == (h(4), "unknown")
    assert "lactate" in onset.missing


def test_lactate_of_two_or_less_means_no_septic_shock(
    knowledge: Knowledge, onset_params: dict[str, Any]
) -> None:
    builder = shock(PatientBuilder("onset-lownormal", AT), lactate=1.8)
    onset = septic_shock_onset(facts_of(builder, knowledge), knowledge, onset_params, T)
    assert (onset.value, onset.status) == (None, "absent")
    # 18.02 mg/dL ÷ 9.01 = 2.0 mmol/L exactly: not > 2.
    mass = shock(PatientBuilder("onset-mgdl", AT), lactate=None)
    mass.observation("14118-4", 18.02, "mg/dL", hours=4.5)
    assert septic_shock_onset(facts_of(mass, knowledge), knowledge, onset_params, T).status == "absent"


def test_lactate_just_above_two_qualifies_and_is_shown_unrounded(
    knowledge: Knowledge, onset_params: dict[str, Any]
) -> None:
    builder = shock(PatientBuilder("onset-204", AT), lactate=2.04)
    onset = septic_shock_onset(facts_of(builder, knowledge), knowledge, onset_params, T)
    assert onset.status == "known"
    # 2.04 > 2; shown as "2.0" it would look like evidence for a value that is not > 2.
    assert onset.evidence[1].text == "lactate 2.04 mmol/L"


def test_lactate_rising_later_on_vasopressors_sets_the_onset(
    knowledge: Knowledge, onset_params: dict[str, Any]
) -> None:
    builder = PatientBuilder("onset-late", AT)
    builder.condition(ICD10CM, "A41.9", "Sepsis", onset_hours=11)
    builder.lactate(1.5, hours=10.5)  # normal around the start at 02:00
    builder.norepinephrine(0.2, "ug/kg/min", start=10)
    builder.lactate(3.5, hours=2)  # 8 h after the start (> 6 h window), still on norepinephrine
    onset = septic_shock_onset(facts_of(builder, knowledge), knowledge, onset_params, T)
    # Both Sepsis-3 conditions hold from the 10:00 lactate on.
    assert (onset.value, onset.status) == (h(2), "known")


def test_no_infection_diagnosis_gives_a_timed_but_unknown_onset(
    knowledge: Knowledge, onset_params: dict[str, Any]
) -> None:
    facts = facts_of(shock(PatientBuilder("onset-noinf", AT), infection=False), knowledge)
    onset = septic_shock_onset(facts, knowledge, onset_params, T)
    assert (onset.value, onset.status) == (h(4), "unknown")
    assert "infection diagnosis" in onset.missing


def test_stale_infection_diagnosis_does_not_establish_septic_shock(
    knowledge: Knowledge, onset_params: dict[str, Any]
) -> None:
    # "Sepsis" still active on the problem list from a stay 10 days ago (never resolved): more than
    # 48 h before the vasopressor start, so the clinician is asked to confirm the infection.
    builder = shock(PatientBuilder("onset-stale", AT), infection=False)
    builder.condition(SNOMED, "91302008", "Sepsis", onset_hours=240)
    onset = septic_shock_onset(facts_of(builder, knowledge), knowledge, onset_params, T)
    assert (onset.value, onset.status) == (h(4), "unknown")


def test_charted_septic_shock_alone_gives_a_candidate_onset_to_confirm(
    knowledge: Knowledge, onset_params: dict[str, Any]
) -> None:
    # Issue 14 (7): with no vasopressor-plus-lactate episode Sepsis-3 is not shown by the chart, so
    # the charted diagnosis gives a *candidate* onset the clinician confirms, never a known one.
    builder = PatientBuilder("onset-charted", AT)
    builder.condition(ICD10CM, "R65.21", "Severe sepsis with septic shock", onset_hours=5)
    facts = facts_of(builder, knowledge)
    onset = septic_shock_onset(facts, knowledge, onset_params, T)
    assert (onset.value, onset.status) == (h(5), "confirm")
    assert "candidate onset from the charted septic-shock diagnosis" in onset.evidence[0].text
    assert "no vasopressor" in onset.missing + " ".join(e.text for e in onset.evidence)
    assert onset.evidence[0].resources == (facts.conditions[0].resource,)


def test_computed_onset_wins_over_the_charted_one_which_is_shown(
    knowledge: Knowledge, onset_params: dict[str, Any]
) -> None:
    builder = shock(PatientBuilder("onset-both", AT))
    builder.condition(SNOMED, "76571007", "Septic shock", onset_hours=7)
    onset = septic_shock_onset(facts_of(builder, knowledge), knowledge, onset_params, T)
    assert (onset.value, onset.status) == (h(4), "known")
    texts = [e.text for e in onset.evidence]
    assert "septic shock charted (onset 2025-03-01T05:00Z)" in texts
    # 08:00 computed vs 05:00 charted: 3.0 h apart.
    assert any("differs by 3.0 h" in t for t in texts)


def test_a_later_episode_qualifies_after_a_pause_longer_than_six_hours(
    knowledge: Knowledge, onset_params: dict[str, Any]
) -> None:
    builder = PatientBuilder("onset-episodes", AT)
    builder.weight(80)
    builder.lactate(1.2, hours=30)
    builder.norepinephrine(0.05, "ug/kg/min", start=30, end=28)  # peri-operative, lactate normal
    builder.condition(ICD10CM, "A41.9", "Sepsis", onset_hours=6)
    builder.lactate(5.1, hours=5)
    builder.norepinephrine(0.2, "ug/kg/min", start=5)  # 23 h after the first stopped: a new episode
    onset = septic_shock_onset(facts_of(builder, knowledge), knowledge, onset_params, T)
    assert (onset.value, onset.status) == (h(5), "known")


def test_a_push_dose_is_not_a_vasopressor_requirement(
    knowledge: Knowledge, onset_params: dict[str, Any]
) -> None:
    builder = PatientBuilder("onset-push", AT)
    builder.condition(ICD10CM, "A41.9", "Sepsis", onset_hours=6)
    builder.lactate(4.0, hours=2)
    push = {
        "resourceType": "MedicationAdministration",
        "id": "push",
        "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "8163"}]},
        "effectiveDateTime": "2025-03-01T10:00:00Z",
        "dosage": {"dose": {"value": 100, "unit": "ug", "system": UCUM, "code": "ug"}},
    }
    onset = septic_shock_onset(facts_of(builder, knowledge, push), knowledge, onset_params, T)
    assert (onset.value, onset.status) == (None, "absent")
    assert onset.evidence[0].text == "no vasopressor infusion in the look-back window"


def test_onset_with_offset_timestamps(knowledge: Knowledge, onset_params: dict[str, Any]) -> None:
    builder = PatientBuilder("onset-tz", AT)
    builder.condition(ICD10CM, "A41.9", "Sepsis", onset_hours=7)
    builder.observation("2524-7", 3.6, "mmol/L", hours=4.5, time_zone="-05:00")  # 02:30-05:00 = 07:30Z
    builder.norepinephrine(0.3, "ug/kg/min", start=4)
    builder.resources[-1]["effectivePeriod"]["start"] = "2025-03-01T10:00:00+02:00"  # = 08:00Z
    onset = septic_shock_onset(facts_of(builder, knowledge), knowledge, onset_params, T)
    assert (onset.value, onset.status) == (datetime(2025, 3, 1, 8, 0, tzinfo=UTC).timestamp(), "known")


# -- persistence, trend, sustained ----------------------------------------------------------------


def series(*points: tuple[float, float], name: str = "lactate") -> list[ObservationFact]:
    """(minutes after 00:00, value) pairs → facts."""
    start = datetime(2025, 3, 1, tzinfo=UTC).timestamp()
    return [ObservationFact(name, start + m * MINUTE, v, "", f"Observation/{m}", "") for m, v in points]


def above_5(fact: ObservationFact) -> bool:
    return float(fact.value) > 5


def test_persistent_needs_two_values_beyond_the_threshold_at_least_30_min_apart() -> None:
    # 00:10 is only 10 min after 00:00, so it is passed over; 00:35 is 35 min after → the pair.
    run = persistent(series((0, 5.5), (10, 6.0), (35, 6.2)), above_5, 30 * MINUTE)
    assert [f.value for f in run] == [5.5, 6.2]
    # Exactly 30 min apart counts ("at least 30 min").
    assert persistent(series((0, 5.5), (30, 5.6)), above_5, 30 * MINUTE) is not None
    # Two high values 20 min apart are not enough.
    assert persistent(series((0, 6.0), (20, 6.1)), above_5, 30 * MINUTE) is None


def test_a_value_below_the_threshold_breaks_persistence() -> None:
    # 6.0 then 4.8 (breaks) then 6.5 and 7.0, 35 min apart → the pair is 00:40 and 01:15.
    run = persistent(series((0, 6.0), (20, 4.8), (40, 6.5), (75, 7.0)), above_5, 30 * MINUTE)
    assert [f.value for f in run] == [6.5, 7.0]
    assert persistent(series((0, 6.0), (20, 4.8), (50, 6.5)), above_5, 30 * MINUTE) is None


def test_persistence_means_still_true_now() -> None:
    # Issue 14 (10): 6.0 and 6.5 an hour apart were a persistent run, but the latest value fell back
    # to 3.1: the lactacemia is not persistent now. Only `current=False` accepts the earlier run.
    fell_back = series((0, 6.0), (60, 6.5), (120, 3.1))
    assert persistent(fell_back, above_5, 30 * MINUTE) is None
    earlier = persistent(fell_back, above_5, 30 * MINUTE, current=False)
    assert earlier is not None and [f.value for f in earlier] == [6.0, 6.5]
    # A later value beyond the threshold keeps it going: the run reaches the latest value.
    still = persistent(series((0, 6.0), (60, 6.5), (120, 7.1)), above_5, 30 * MINUTE)
    assert still is not None and [f.value for f in still] == [6.5, 7.1]
    # A value that cannot be decided (censored the wrong way) breaks it too.
    assert persistent(fell_back[:2], lambda f: None if f.value == 6.5 else True, 30 * MINUTE) is None


def test_trend_directions() -> None:
    assert trend_holds(series((0, 6.0), (30, 6.0), (60, 6.4)), "non_decreasing")
    assert not trend_holds(series((0, 6.0), (30, 5.9)), "non_decreasing")
    # SvO2 "not increasing": 52, 50, 50 holds; 50 then 53 does not.
    assert trend_holds(series((0, 52), (30, 50), (60, 50), name="svo2"), "non_increasing")
    assert not trend_holds(series((0, 50), (30, 53), name="svo2"), "non_increasing")


def below_65(fact: ObservationFact) -> bool:
    return float(fact.value) < 65


def test_sustained_run_counts_from_first_to_last_consecutive_value() -> None:
    hourly = series(*[(m, 60.0) for m in range(0, 361, 60)], name="map")  # 00:00 … 06:00, 7 values
    at = hourly[-1].time + 30 * MINUTE
    duration, (first, last) = sustained_run(hourly, below_65, at, max_gap=2 * HOUR)
    assert duration == 6 * HOUR  # 00:00 → 06:00; the 30 min after the last value are not counted
    assert (first.time, last.time) == (hourly[0].time, hourly[-1].time)


def test_sustained_run_gap_longer_than_max_gap_breaks_the_run() -> None:
    # Values at 00:00, 01:00, 02:00, then none until 05:00 and 06:00 (a 3 h gap).
    values = series((0, 60), (60, 61), (120, 59), (300, 58), (360, 60), name="map")
    at = values[-1].time
    # max_gap 2 h: runs 00:00→02:00 (2 h) and 05:00→06:00 (1 h); the longest is 2 h.
    assert sustained_run(values, below_65, at, max_gap=2 * HOUR)[0] == 2 * HOUR
    # max_gap 3 h: the gap is tolerated (3 h ≤ 3 h), one run 00:00→06:00 = 6 h.
    assert sustained_run(values, below_65, at, max_gap=3 * HOUR)[0] == 6 * HOUR


def test_sustained_run_broken_by_a_value_at_or_above_the_threshold() -> None:
    values = series((0, 60), (60, 62), (120, 66), (180, 60), (240, 61), name="map")
    # 66 breaks it: 00:00→01:00 (1 h) and 03:00→04:00 (1 h).
    assert sustained_run(values, below_65, values[-1].time, max_gap=2 * HOUR)[0] == HOUR
    # Values after the evaluation time are not looked at.
    assert sustained_run(values, below_65, values[1].time, max_gap=2 * HOUR)[0] == HOUR


# -- assembled inputs -----------------------------------------------------------------------------


def test_derive_inputs_puts_map_anc_and_vis_in_canonical_units(
    knowledge: Knowledge, onset_params: dict[str, Any]
) -> None:
    builder = shock(PatientBuilder("all", AT))
    builder.bp_panel(84, 48, hours=1)  # (84 + 96) / 3 = 60 mmHg
    builder.anc(350, hours=2, unit="/uL")  # 0.35 × 10⁹/L
    inputs = derive_inputs(facts_of(builder, knowledge), knowledge, load_derivation_params(PROJECT_ROOT), T)
    assert [f.value for f in inputs.series["mean_arterial_pressure"]] == [60.0]
    assert [f.value for f in inputs.series["absolute_neutrophil_count"]] == [pytest.approx(0.35)]
    assert inputs.scalar("vis").value == 30.0  # 100 × 0.3
    assert [(p.time, p.value) for p in inputs.series["vis"]] == [(h(4), 30.0)]
    assert inputs.scalar("septic_shock_onset").value == h(4)
    assert inputs.scalar("body_weight").value == 80
    assert inputs.units["absolute_neutrophil_count"] == "× 10⁹/L"
