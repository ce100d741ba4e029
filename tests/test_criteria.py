"""The criteria language: each rule kind, the three-valued combinators, clocks, and file errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from cds_service.base.config import PROJECT_ROOT
from cds_service.base.datafiles import DataFileError
from cds_service.base.facts import ConditionFact, ObservationFact, PatientFacts
from cds_service.clinical.criteria import RuleResult, combine_all, combine_any, evaluate_rule
from cds_service.clinical.derived import HOUR, ClinicalInputs, Derived, Evidence
from cds_service.knowledge.criteria_language import (
    CONFIRM,
    MET,
    NOT_MET,
    UNKNOWN,
    describe_rule,
    parse_duration,
    rule_can_confirm,
)
from cds_service.knowledge.mappings import load_knowledge
from cds_service.knowledge.trials import load_trial

AT = 1_800_000_000.0


def obs(name: str, hours_ago: float, value: float | str, code: str = "http://loinc.org|x") -> ObservationFact:
    return ObservationFact(name, AT - hours_ago * HOUR, value, "", f"Observation/{name}-{hours_ago}", code)


def inputs(
    series: dict[str, list[ObservationFact]] | None = None,
    scalars: dict[str, Derived] | None = None,
    conditions: dict[str, list[ConditionFact]] | None = None,
) -> ClinicalInputs:
    series = {k: sorted(v, key=lambda f: f.time) for k, v in (series or {}).items()}
    return ClinicalInputs(
        AT, series, scalars or {}, conditions or {}, PatientFacts("p"), {"mean_arterial_pressure": "MAP"}
    )


def condition(value_set: str, status: str = "active", onset_hours_ago: float | None = 10) -> ConditionFact:
    onset = AT - onset_hours_ago * HOUR if onset_hours_ago is not None else None
    return ConditionFact(frozenset({value_set}), onset, None, status, "confirmed", "Condition/c1", "sys|code")


R = RuleResult


# -- combinators ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "all_of", "any_of"),
    [
        ((MET, MET), MET, MET),
        ((MET, NOT_MET), NOT_MET, MET),
        ((NOT_MET, NOT_MET), NOT_MET, NOT_MET),
        ((MET, UNKNOWN), UNKNOWN, MET),
        ((NOT_MET, UNKNOWN), NOT_MET, UNKNOWN),
        ((UNKNOWN, UNKNOWN), UNKNOWN, UNKNOWN),
        ((MET, CONFIRM), CONFIRM, MET),
        ((NOT_MET, CONFIRM), NOT_MET, CONFIRM),
        ((UNKNOWN, CONFIRM), UNKNOWN, UNKNOWN),  # data missing outranks "ask the clinician"
        ((CONFIRM, CONFIRM), CONFIRM, CONFIRM),
    ],
)
def test_kleene_combinators(statuses: tuple[str, str], all_of: str, any_of: str) -> None:
    results = [R(s) for s in statuses]
    assert combine_all(results).status == all_of
    assert combine_all(list(reversed(results))).status == all_of
    assert combine_any(results).status == any_of
    assert combine_any(list(reversed(results))).status == any_of


def test_not_flips_met_and_not_met_only() -> None:
    data = inputs(scalars={"age_years": Derived(80, "known")})
    rule = {"value": {"input": "age_years", "op": ">", "threshold": 75}}
    assert evaluate_rule(data, {"not": rule}).status == NOT_MET
    assert (
        evaluate_rule(inputs(scalars={"age_years": Derived(None, "unknown")}), {"not": rule}).status
        == UNKNOWN
    )


def test_clocks_combine_latest_for_and_earliest_for_or() -> None:
    early, late = R(NOT_MET, due=AT + HOUR), R(NOT_MET, due=AT + 3 * HOUR)
    assert combine_all([early, late]).due == AT + 3 * HOUR
    assert combine_all([early, R(MET)]).due == AT + HOUR
    assert combine_all([early, R(NOT_MET)]).due is None  # one part will never be met by waiting
    assert combine_any([early, late]).due == AT + HOUR
    assert combine_any([early, R(NOT_MET)]).due == AT + HOUR


def test_evidence_is_not_repeated_by_combinators() -> None:
    born = Evidence("born 1980-01-01, 46 years old")
    data = inputs(scalars={"age_years": Derived(46, "known", (born,))})
    rule = {
        "all_of": [
            {"value": {"input": "age_years", "op": ">=", "threshold": 18}},
            {"value": {"input": "age_years", "op": "<=", "threshold": 75}},
        ]
    }
    result = evaluate_rule(data, rule)
    assert result.status == MET and result.evidence == (born,)


# -- rule kinds -----------------------------------------------------------------------------------


def test_value_aggregates_and_windows() -> None:
    series = {
        "platelets": [obs("platelets", 30, 20.0), obs("platelets", 10, 50.0), obs("platelets", 2, 40.0)]
    }
    data = inputs(series)
    rule = {"input": "platelets", "op": "<", "threshold": 30}
    assert evaluate_rule(data, {"value": {**rule, "aggregate": "latest"}}).status == NOT_MET
    assert evaluate_rule(data, {"value": {**rule, "aggregate": "min"}}).status == MET
    assert evaluate_rule(data, {"value": {**rule, "aggregate": "min", "within": "24h"}}).status == NOT_MET
    assert evaluate_rule(data, {"value": {**rule, "aggregate": "any"}}).status == MET
    assert evaluate_rule(data, {"value": {**rule, "aggregate": "all"}}).status == NOT_MET
    assert (
        evaluate_rule(data, {"value": {**rule, "aggregate": "max", "op": "<", "threshold": 60}}).status == MET
    )
    missing = evaluate_rule(data, {"value": {**rule, "within": "1h"}})
    assert missing.status == UNKNOWN and missing.missing == ("platelets within the last 1h",)


def test_value_if_missing_not_met_for_an_optional_measure() -> None:
    rule = {"value": {"input": "knee_recoloration_time", "op": ">", "threshold": 4, "if_missing": NOT_MET}}
    assert evaluate_rule(inputs(), rule).status == NOT_MET
    data = inputs({"knee_recoloration_time": [obs("knee_recoloration_time", 1, 5.0)]})
    assert evaluate_rule(data, rule).status == MET


def test_value_on_scalars_and_coded_values() -> None:
    data = inputs(
        {"pregnancy_test": [obs("pregnancy_test", 30, "positive"), obs("pregnancy_test", 2, "negative")]},
        {"sex": Derived("female", "known"), "age_years": Derived(None, "unknown", missing="birth date")},
    )
    assert evaluate_rule(data, {"value": {"input": "sex", "op": "==", "threshold": "female"}}).status == MET
    latest = {
        "value": {"input": "pregnancy_test", "op": "==", "threshold": "positive", "aggregate": "latest"}
    }
    assert evaluate_rule(data, latest).status == NOT_MET
    age = evaluate_rule(data, {"value": {"input": "age_years", "op": ">=", "threshold": 18}})
    assert age.status == UNKNOWN and age.missing == ("birth date",)


def test_persistent_needs_two_values_apart_and_the_trend() -> None:
    rule = {"input": "lactate", "op": ">", "threshold": 5, "count": 2, "min_interval": "30min"}
    rising = inputs({"lactate": [obs("lactate", 3, 5.5), obs("lactate", 2, 6.1)]})
    assert evaluate_rule(rising, {"persistent": {**rule, "trend": "non_decreasing"}}).status == MET
    too_close = inputs({"lactate": [obs("lactate", 2.2, 5.5), obs("lactate", 2, 6.1)]})
    assert evaluate_rule(too_close, {"persistent": rule}).status == NOT_MET
    falling = inputs({"lactate": [obs("lactate", 3, 7.5), obs("lactate", 2, 6.1)]})
    assert evaluate_rule(falling, {"persistent": rule}).status == MET
    assert evaluate_rule(falling, {"persistent": {**rule, "trend": "non_decreasing"}}).status == NOT_MET
    one = evaluate_rule(inputs({"lactate": [obs("lactate", 1, 6.0)]}), {"persistent": rule})
    assert one.status == UNKNOWN and "only 1 value" in one.missing[0]


MAP_RULE = {
    "input": "mean_arterial_pressure",
    "op": "<",
    "threshold": 65,
    "for_more_than": "5h",
    "max_gap": "2h",
}


def hourly(name: str, value: float, since: float, last: float = 0.5) -> list[ObservationFact]:
    out, hours = [], since
    while hours >= last:
        out.append(obs(name, hours, value))
        hours -= 1
    return out


def test_sustained_counts_only_observed_time_and_gaps_break_the_run() -> None:
    met = evaluate_rule(
        inputs({"mean_arterial_pressure": hourly("mean_arterial_pressure", 58, 7)}), {"sustained": MAP_RULE}
    )
    assert met.status == MET and "6.0 h" in met.summary
    gappy = [*hourly("mean_arterial_pressure", 58, 7, last=4), obs("mean_arterial_pressure", 0.5, 58)]
    assert evaluate_rule(inputs({"mean_arterial_pressure": gappy}), {"sustained": MAP_RULE}).status == NOT_MET


def test_sustained_current_run_and_its_clock() -> None:
    rule = {"sustained": {**MAP_RULE, "current": True}}
    short = evaluate_rule(inputs({"mean_arterial_pressure": hourly("mean_arterial_pressure", 58, 2.5)}), rule)
    assert short.status == NOT_MET
    assert short.due == pytest.approx(AT - 2.5 * HOUR + 5 * HOUR)  # met in 2.5 h if it goes on
    # A long run that ended (MAP back to 75 now) is not "going on": no current run, no clock.
    ended = hourly("mean_arterial_pressure", 58, 9, last=2.5) + hourly("mean_arterial_pressure", 75, 1.5)
    result = evaluate_rule(inputs({"mean_arterial_pressure": ended}), rule)
    assert result.status == NOT_MET and result.due is None
    assert evaluate_rule(inputs({"mean_arterial_pressure": ended}), {"sustained": MAP_RULE}).status == MET


def test_sustained_on_a_step_series_holds_its_last_value_until_now() -> None:
    # VIS points exist only where an infusion changes: 130 since 6 h, unchanged since.
    vis = [obs("vis", 8, 30.0, code="derived:vis"), obs("vis", 6, 130.0, code="derived:vis")]
    data = inputs({"vis": vis}, {"vis": Derived(130.0, "known")})
    rule = {"input": "vis", "op": ">", "threshold": 120, "max_gap": "72h", "current": True}
    assert evaluate_rule(data, {"sustained": {**rule, "for_more_than": "5h"}}).status == MET
    pending = evaluate_rule(data, {"sustained": {**rule, "for_more_than": "17h"}})
    assert pending.status == NOT_MET and pending.due == pytest.approx(AT + 11 * HOUR)
    no_infusion = inputs({"vis": []}, {"vis": Derived(0.0, "known")})
    assert evaluate_rule(no_infusion, {"sustained": {**rule, "for_more_than": "5h"}}).status == NOT_MET
    no_weight = inputs({"vis": []}, {"vis": Derived(None, "unknown", missing="body weight")})
    unknown = evaluate_rule(no_weight, {"sustained": {**rule, "for_more_than": "5h"}})
    assert unknown.status == UNKNOWN and unknown.missing == ("body weight",)


def test_established_and_time_since() -> None:
    known = inputs(scalars={"septic_shock_onset": Derived(AT - 3 * HOUR, "known")})
    absent = inputs(scalars={"septic_shock_onset": Derived(None, "absent")})
    unsure = inputs(
        scalars={"septic_shock_onset": Derived(AT - HOUR, "unknown", missing="an infection diagnosis")}
    )
    rule = {"established": {"input": "septic_shock_onset"}}
    assert evaluate_rule(known, rule).status == MET
    assert evaluate_rule(absent, rule).status == NOT_MET
    assert evaluate_rule(unsure, rule).missing == ("an infection diagnosis",)
    since = {"time_since": {"input": "septic_shock_onset", "min": "6h", "max": "24h"}}
    early = evaluate_rule(known, since)
    assert early.status == NOT_MET and early.due == pytest.approx(AT + 3 * HOUR)
    assert evaluate_rule(known, {"time_since": {"input": "septic_shock_onset", "max": "10h"}}).status == MET
    assert evaluate_rule(absent, since).status == NOT_MET


def test_condition_if_absent_and_if_present() -> None:
    charted = inputs(conditions={"cardiac_arrest": [condition("cardiac_arrest")]})
    resolved = inputs(conditions={"cardiac_arrest": [condition("cardiac_arrest", status="resolved")]})
    later = inputs(conditions={"cardiac_arrest": [condition("cardiac_arrest", onset_hours_ago=-2)]})
    base = {"value_sets": ["cardiac_arrest"]}
    assert evaluate_rule(charted, {"condition": base}).status == MET
    assert evaluate_rule(charted, {"condition": {**base, "if_present": CONFIRM}}).status == CONFIRM
    for data in (inputs(), resolved, later):
        assert evaluate_rule(data, {"condition": base}).status == CONFIRM  # absence proves nothing
        assert evaluate_rule(data, {"condition": {**base, "if_absent": NOT_MET}}).status == NOT_MET
        assert evaluate_rule(data, {"condition": {**base, "if_absent": UNKNOWN}}).status == UNKNOWN


def test_parse_duration() -> None:
    assert (
        parse_duration("30min") == 1800 and parse_duration("5h") == 5 * HOUR and parse_duration(2) == 2 * HOUR
    )
    assert parse_duration("2d") == 48 * HOUR
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("five hours")


def test_describe_and_confirm_detection() -> None:
    rule: dict[str, Any] = {
        "any_of": [
            {"value": {"input": "lvef", "op": "<", "threshold": 35, "unit": "%", "aggregate": "latest"}},
            {
                "condition": {
                    "value_sets": ["ventricular_arrhythmia"],
                    "if_present": "confirm",
                    "if_absent": "not_met",
                }
            },
        ]
    }
    text = describe_rule(rule, {"lvef": "LVEF"})
    assert "latest LVEF < 35 %" in text and "ventricular arrhythmia (charted: clinician confirms)" in text
    assert rule_can_confirm(rule)
    # A charted code may only suggest its value set (or be unconfirmed): every condition rule can ask.
    assert rule_can_confirm({"condition": {"value_sets": ["hiv_aids"], "if_absent": "not_met"}})
    assert not rule_can_confirm({"value": {"input": "platelets", "op": "<", "threshold": 30}})


# -- trial files with mistakes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def knowledge() -> Any:
    return load_knowledge(PROJECT_ROOT)


def write_trial(tmp_path: Path, body: str) -> Path:
    source = (PROJECT_ROOT / "trials" / "NCT01849237-msc-neutropenia.yaml").read_text(encoding="utf-8")
    head = source.split("inclusion:\n")[0]
    path = tmp_path / "NCT01849237-broken.yaml"
    path.write_text(head + body, encoding="utf-8")
    return path


HEAD = "inclusion:\n  - id: a\n    text: t\n    source: s\n"  # lines 1-4 of the criteria part


def rule_body(*rule_lines: str) -> str:
    return HEAD + "".join(f"{line}\n" for line in rule_lines) + "exclusion: []\n"


@pytest.mark.parametrize(
    ("body", "line", "key", "message"),
    [
        (
            rule_body("    rule: {value: {input: no_such_input, op: '<', threshold: 1}}"),
            5,
            "inclusion[0].rule.value.input",
            "unknown input 'no_such_input'",
        ),
        (
            rule_body("    rule:", "      sometimes: {input: lactate}"),
            6,
            "inclusion[0].rule.sometimes",
            "unknown rule kind",
        ),
        (
            rule_body("    rule: {value: {input: lactate, op: '~', threshold: 1}}"),
            5,
            "inclusion[0].rule.value.op",
            "unallowed value",
        ),
        (
            rule_body("    rule: {value: {input: lactate, op: '>', threshold: 2, unit: mg/dL}}"),
            5,
            "inclusion[0].rule.value.unit",
            "canonical unit 'mmol/L'",
        ),
        (
            rule_body(
                "    rule:",
                "      sustained: {input: lactate, op: '>', threshold: 5, for_more_than: ages, max_gap: 1h}",
            ),
            6,
            "inclusion[0].rule.sustained.for_more_than",
            "not a duration",
        ),
        (
            rule_body("    rule: {condition: {value_sets: [dragons]}}"),
            5,
            "inclusion[0].rule.condition.value_sets",
            "unknown value set 'dragons'",
        ),
        (rule_body(), 2, "inclusion[0]", "give a `rule`"),
        (
            rule_body("    confirm: c", "    closes_window: true"),
            6,
            "inclusion[0].closes_window",
            "only a computed exclusion",
        ),
        (
            HEAD + "    confirm: c\nexclusion:\n  - id: a\n    text: t\n    source: s\n    confirm: c\n",
            7,
            "exclusion[0].id",
            "duplicate criterion id 'a'",
        ),
    ],
)
def test_bad_trial_files_name_file_line_and_key(
    tmp_path: Path, knowledge: Any, body: str, line: int, key: str, message: str
) -> None:
    path = write_trial(tmp_path, body)
    head_lines = path.read_text(encoding="utf-8").split("inclusion:\n")[0].count("\n")
    with pytest.raises(DataFileError) as raised:
        load_trial(path, knowledge)
    problems = raised.value.problems
    assert any(p.key == key and message in p.message for p in problems), [str(p) for p in problems]
    problem = next(p for p in problems if p.key == key)
    assert problem.file == str(path)
    assert problem.line == head_lines + line, str(problem)
    assert f"{path}:{head_lines + line}: {key}:" in str(raised.value)


def test_a_missing_required_key_is_named(tmp_path: Path, knowledge: Any) -> None:
    source = (PROJECT_ROOT / "trials" / "NCT01849237-msc-neutropenia.yaml").read_text(encoding="utf-8")
    path = tmp_path / "NCT01849237-no-window.yaml"
    shutil.copy(PROJECT_ROOT / "trials" / "NCT01849237-msc-neutropenia.yaml", path)
    path.write_text(source.replace("enrollment_window:", "enrolment_window:"), encoding="utf-8")
    with pytest.raises(DataFileError) as raised:
        load_trial(path, knowledge)
    keys = {p.key for p in raised.value.problems}
    assert "enrollment_window" in keys and "enrolment_window" in keys
