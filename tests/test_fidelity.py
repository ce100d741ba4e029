"""Issue 14 — real charts, real candidates: each of the ten defects found by the clinical review,
tested on its scenario patient (in memory; the scenario suite runs them over HTTP with and without
prefetch too) and on the mechanism underneath, so that variants of each defect are right as well."""

from __future__ import annotations

import copy
import io
import shutil
from contextlib import redirect_stdout
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from cds_service.base.config import PROJECT_ROOT
from cds_service.base.datafiles import DataFileError
from cds_service.base.facts import HOUR, ObservationFact, PatientFacts
from cds_service.cli import main as cli_main
from cds_service.clinical.criteria import censored_test, evaluate_rule
from cds_service.clinical.derived import ClinicalInputs
from cds_service.clinical.evaluation import TrialResult
from cds_service.knowledge.criteria_language import CONFIRM, MET, NOT_MET, UNKNOWN, absence_rules
from cds_service.knowledge.mappings import load_knowledge
from cds_service.knowledge.trials import load_trials
from cds_service.patient_data.gather import RawPatientData
from cds_service.screening import Screener
from cds_service.tools.scenario_builder import ICD10CM, PatientBuilder
from cds_service.tools.scenarios import ECMO, IMICRO, MSC, Scenario, all_scenarios
from tests.conftest import SERVICE_URL, hook_body

AT = datetime(2026, 3, 1, 8, 30, tzinfo=UTC)
T = AT.timestamp()
SCENARIOS = {s.name: s for s in all_scenarios(AT)}


def screen(screener: Screener, scenario: Scenario | PatientBuilder) -> dict[str, TrialResult]:
    b = scenario.builder if isinstance(scenario, Scenario) else scenario
    data = RawPatientData(patient=b.patient, resources={"all": b.resources})
    return {r.trial.id: r for r in screener.screen(b.patient_id, data, T).results}


def criterion(result: TrialResult, criterion_id: str) -> Any:
    return next(r for r in result.results if r.criterion.id == criterion_id)


def text(items: Any) -> str:
    return " | ".join(e.describe() for e in items)


def assert_scenario(screener: Screener, name: str) -> dict[str, TrialResult]:
    results = screen(screener, SCENARIOS[name])
    assert {k: r.status for k, r in results.items()} == SCENARIOS[name].expected, SCENARIOS[name].story
    return results


# -- (1) recency: the pregnancy test decides for 72 h; older ones are shown and confirmed ------------


@pytest.mark.parametrize(
    ("name", "trial", "shown"),
    [
        ("preg-positive-years-ago", ECMO, "pregnancy test positive"),
        ("preg-negative-last-year", IMICRO, "pregnancy test negative"),
        ("preg-negative-5-days-ago", IMICRO, "pregnancy test negative"),
    ],
)
def test_an_old_pregnancy_test_either_way_is_shown_and_confirmed(
    screener: Screener, name: str, trial: str, shown: str
) -> None:
    result = assert_scenario(screener, name)[trial]
    pregnancy = criterion(result, "pregnancy")
    assert pregnancy.status == CONFIRM
    assert shown in text(pregnancy.evidence) and "older than 72h" in text(pregnancy.evidence)
    assert result.status == "eligible" and pregnancy in result.to_confirm


def test_a_recent_pregnancy_test_still_decides(screener: Screener) -> None:
    # Real exclusions still exclude: a positive test from yesterday; a negative one this admission clears.
    for hours, positive, expected in ((20, True, MET), (60, False, NOT_MET)):
        b = PatientBuilder(f"cdsh-preg-{hours}", AT, age=30, gender="female")
        b.observation(
            "2106-3",
            None,
            "",
            hours,
            value_codeable=("http://snomed.info/sct", "10828004" if positive else "260385009"),
        )
        results = screen(screener, b)
        assert {criterion(r, "pregnancy").status for r in results.values()} == {expected}


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("preg-serum-hcg-positive", MET),
        ("preg-serum-hcg-below-2", NOT_MET),
        ("preg-serum-hcg-equivocal", CONFIRM),
    ],
)
def test_quantitative_serum_hcg_is_read_through_its_bands(screener: Screener, name: str, status: str) -> None:
    results = assert_scenario(screener, name)
    pregnancy = criterion(results[IMICRO], "pregnancy")
    assert pregnancy.status == status
    assert "quantitative" in text(pregnancy.evidence)


# -- (2) exclusion codes that mean the exclusion ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "criterion_id", "status", "shown"),
    [
        ("ecmo-type2-mi", "other_cardiac_dysfunction", CONFIRM, "I21.A1"),
        ("ecmo-heart-failure-unspecified", "other_cardiac_dysfunction", CONFIRM, "I50.9"),
        ("ecmo-traumatic-pneumothorax", "obstructive_cause_of_shock", CONFIRM, "S27.0XXA"),
        ("ecmo-old-pulmonary-embolism", "obstructive_cause_of_shock", CONFIRM, "dated more than 7 days ago"),
        ("ecmo-hiv-infection", "aids", CONFIRM, "86406008"),
        ("ecmo-mi-without-status", "other_cardiac_dysfunction", CONFIRM, "no clinical status"),
        ("ecmo-stemi", "other_cardiac_dysfunction", MET, "I21.09"),
        ("ecmo-chronic-heart-failure", "other_cardiac_dysfunction", MET, "I50.22"),
        ("ecmo-aids-snomed", "aids", MET, "62479008"),
        ("ecmo-aids", "aids", MET, "B20"),
        ("ecmo-acute-mi", "other_cardiac_dysfunction", MET, "I21.4"),
        ("ecmo-pulmonary-embolism", "obstructive_cause_of_shock", MET, "59282003"),
    ],
)
def test_a_code_excludes_only_when_it_means_the_exclusion(
    screener: Screener, name: str, criterion_id: str, status: str, shown: str
) -> None:
    result = assert_scenario(screener, name)[ECMO]
    found = criterion(result, criterion_id)
    assert found.status == status
    assert shown in text(found.evidence)
    if status == CONFIRM:
        assert found.evidence[0].time is not None or "undated" in text(found.evidence)  # the code's date


def test_a_chapter_o_code_asks_rather_than_excludes(screener: Screener) -> None:
    results = assert_scenario(screener, "msc-puerperium")
    pregnancy = criterion(results[MSC], "pregnancy")
    assert pregnancy.status == CONFIRM and "O86.4" in text(pregnancy.evidence)


def test_every_condition_row_says_why_it_excludes_or_only_asks() -> None:
    knowledge = load_knowledge(PROJECT_ROOT)
    for value_set in knowledge.value_sets.values():
        for row in value_set.codes:
            assert row.meaning in ("means", "suggests") and row.why, (value_set.name, row.code)
    # The most specific ICD-10-CM row wins: I21.A1 meets I21.A (suggests), I21.4 meets I21 (means).
    match = knowledge.condition_matches
    assert match(ICD10CM, "I21.A1")["acute_myocardial_infarction"].meaning == "suggests"
    assert match(ICD10CM, "I21.4")["acute_myocardial_infarction"].meaning == "means"
    assert match(ICD10CM, "O09.513")["pregnancy"].meaning == "means"
    assert match(ICD10CM, "O86.4")["pregnancy"].meaning == "suggests"
    windows = {name: v.current_within for name, v in knowledge.value_sets.items() if v.current_within}
    assert (
        windows["acute_myocardial_infarction"] == 28 * 24 * HOUR
        and windows["pulmonary_embolism"] == 7 * 24 * HOUR
    )
    assert all(knowledge.value_sets[name].current_source for name in windows)


def test_a_condition_row_without_its_reason_fails_to_load(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(PROJECT_ROOT / "mappings", data / "mappings")
    path = data / "mappings" / "conditions.yaml"
    path.write_text(path.read_text().replace(', meaning: means, why: "the concept septic shock"', ""))
    with pytest.raises(DataFileError, match=r"conditions.yaml:.*meaning"):
        load_knowledge(data)


# -- (3) censored values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("charted", "rule", "expected"),
    [
        ((">", 3), (">", 3), True),
        ((">", 3), (">=", 3), True),
        (("<", 0.1), ("<", 1), True),
        (("<", 0.1), ("<=", 1), True),
        ((">", 3), ("<", 3), False),
        ((">=", 3), ("<", 3), False),
        (("<", 5), (">", 3), None),
        (("<", 5), ("<=", 1), None),
        ((">=", 3), (">", 3), None),
        (("<=", 1), ("<", 1), None),
        ((">", 20), (">", 2), True),
        (("<", 2), (">", 2), False),
    ],
)
def test_censored_values_are_compared_three_valued(
    charted: tuple[str, float], rule: tuple[str, float], expected: bool | None
) -> None:
    assert censored_test(charted[0], charted[1], rule[0], rule[1]) is expected


def test_censored_values_in_scenarios_and_the_evidence_says_so(screener: Screener) -> None:
    crt = criterion(
        assert_scenario(screener, "imicro-capillary-refill-censored")[IMICRO], "peripheral_hypoperfusion"
    )
    assert crt.status == MET and "charted as >3" in text(crt.evidence)
    assert (
        criterion(assert_scenario(screener, "msc-anc-censored-low")[MSC], "severe_neutropenia").status == MET
    )
    undecided = criterion(
        assert_scenario(screener, "msc-anc-censored-undecidable")[MSC], "severe_neutropenia"
    )
    assert undecided.status == UNKNOWN and "charted as <5" in text(undecided.evidence)


def test_undecidable_censored_values_make_series_rules_unknown_not_not_met() -> None:
    start = T - 10 * HOUR
    series = [
        ObservationFact("lactate", start + i * HOUR, 5.0, "mmol/L", f"Observation/{i}", "x", "", "<")
        for i in range(8)
    ]
    data = ClinicalInputs(T, {"lactate": series}, {}, {}, PatientFacts("p"))
    spec = {"input": "lactate", "op": ">", "threshold": 2}
    assert (
        evaluate_rule(data, {"persistent": {**spec, "count": 2, "min_interval": "30min"}}).status == UNKNOWN
    )
    sustained = {**spec, "for_more_than": "5h", "max_gap": "2h", "current": True}
    assert evaluate_rule(data, {"sustained": sustained}).status == UNKNOWN
    assert evaluate_rule(data, {"value": {**spec, "aggregate": "any"}}).status == UNKNOWN
    # "< 5" against "> 6" is decided: never met.
    assert evaluate_rule(data, {"value": {**spec, "threshold": 6, "aggregate": "latest"}}).status == NOT_MET


# -- (4) infusions as EHRs chart them, and the weight --------------------------------------------


@pytest.mark.parametrize(
    ("name", "arithmetic"),
    [
        ("ecmo-dose-in-dosage", "dose charted in dosage.dose, pump 67.5 mL/h"),
        ("ecmo-pump-rate-contained-bag", "67.5 mL/h × 16 mg/250 mL = 4.32 mg/h ÷ 80 kg"),
        ("ecmo-pump-rate-referenced-bag", "120 mL/h × 4 mg/250 mL = 1.92 mg/h ÷ 80 kg"),
    ],
)
def test_infusion_shapes_give_the_vis_with_the_arithmetic(
    screener: Screener, name: str, arithmetic: str
) -> None:
    result = assert_scenario(screener, name)[ECMO]
    vis = criterion(result, "high_dose_vasoactive_over_5h")
    assert vis.status == MET and "VIS 130" in vis.summary + text(vis.evidence)
    outcome = screener.screen(
        SCENARIOS[name].patient_id,
        RawPatientData(
            patient=SCENARIOS[name].builder.patient, resources={"all": SCENARIOS[name].builder.resources}
        ),
        T,
    )
    assert arithmetic in outcome.inputs.scalars["vis"].evidence[0].text


def test_no_dose_to_be_had_gives_an_unknown_vis_with_the_reason(screener: Screener) -> None:
    result = assert_scenario(screener, "ecmo-pump-rate-no-strength")[ECMO]
    vis = criterion(result, "high_dose_vasoactive_over_5h")
    assert vis.status == UNKNOWN
    assert any("pump 67.5 mL/h, bag strength not charted" in m for m in vis.missing), vis.missing


@pytest.mark.parametrize("name", ["ecmo-weight-measured", "ecmo-weight-estimated"])
def test_weight_from_any_weight_code_with_the_code_shown(screener: Screener, name: str) -> None:
    b = SCENARIOS[name].builder
    outcome = screener.screen(
        b.patient_id, RawPatientData(patient=b.patient, resources={"all": b.resources}), T
    )
    assert_scenario(screener, name)
    code = "3141-9" if name.endswith("measured") else "8335-2"
    assert f"weight 80 kg, LOINC {code}" in text(outcome.inputs.scalars["vis"].evidence)


def test_the_newest_weight_of_any_code_wins_and_an_old_one_is_not_used(screener: Screener) -> None:
    b = PatientBuilder("cdsh-weights", AT)
    b.weight(70, hours=50, code="29463-7")
    b.weight(82, hours=5, code="8335-2")
    outcome = screener.screen(
        b.patient_id, RawPatientData(patient=b.patient, resources={"all": b.resources}), T
    )
    assert outcome.inputs.scalars["body_weight"].value == 82
    stale = assert_scenario(screener, "ecmo-weight-stale")[ECMO]
    vis = criterion(stale, "high_dose_vasoactive_over_5h")
    assert vis.status == UNKNOWN and "current body weight" in " ".join(vis.missing)


# -- (5) I-MICRO's window from norepinephrine start -----------------------------------------------


def test_imicro_window_runs_from_norepinephrine_start_and_the_card_shows_both(screener: Screener) -> None:
    result = assert_scenario(screener, "imicro-norepinephrine-after-phenylephrine")[IMICRO]
    assert result.onset.value == T - 26 * HOUR  # septic shock began on phenylephrine
    assert result.anchor is not None and result.anchor.value == T - 10 * HOUR
    assert (result.window_opens_at, result.window_closes_at) == (T - 4 * HOUR, T + 14 * HOUR)
    card = screener.renderer.render(result)
    assert (
        "septic-shock onset yesterday 06:30; timed from the norepinephrine start yesterday 22:30"
        in (card["detail"])
    )
    # The machine-readable window (cards-ux's extension) is the norepinephrine-timed one.
    window = card["extension"]["screening"]["window"]
    assert window == {"opens": "2026-03-01T04:30:00Z", "closes": "2026-03-01T22:30:00Z"}


# -- (6) null prefetch keys and missing keys with no fhirServer -------------------------------------

#: Per prefetch key: a criterion that depends on it (on the ecmo-eligible patient) → unknown.
DEPENDS = {
    "patient": (ECMO, "age_18_to_75"),
    "observations": (ECMO, "refractory_hypoperfusion_over_5h"),
    "latestBodyWeight": (ECMO, "high_dose_vasoactive_over_5h"),  # the pumps are per minute
    "latestLvef": (ECMO, "myocardial_impairment"),
    "latestPregnancyTest": (ECMO, "pregnancy"),
    "medicationAdministrations": (ECMO, "high_dose_vasoactive_over_5h"),
    "conditions": (ECMO, "aids"),
}


@pytest.fixture(scope="module")
def null_app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    from cds_service.app import create_app
    from tests.conftest import CardCheckingClient, make_settings

    app = create_app(make_settings(tmp_path_factory.mktemp("null-prefetch"), fhir={"allow_http": True}))
    app.test_client_class = CardCheckingClient
    return app


@pytest.mark.parametrize("how", ["null", "missing"])
def test_each_prefetch_key_null_or_missing_without_fhir_server_makes_its_criteria_unknown(
    screener: Screener, how: str
) -> None:
    keys = {q.key for q in screener.plan.queries}
    assert set(DEPENDS) == keys, "every prefetch key has a dependent criterion here"
    now = datetime.now(UTC).replace(microsecond=0)
    base = next(s for s in all_scenarios(now) if s.name == "ecmo-ug-per-min")
    female = PatientBuilder(base.patient_id, now, age=30, gender="female")
    female.resources = list(base.builder.resources)  # a woman under 55: the pregnancy test matters
    female.observation("2106-3", None, "", 10, value_codeable=("http://snomed.info/sct", "260385009"))
    from cds_service.patient_data.gather import gather
    from cds_service.patient_data.hook_request import parse_hook_request

    for key, (trial, criterion_id) in DEPENDS.items():
        body = hook_body(female)
        if how == "null":
            body["prefetch"][key] = None
        else:
            del body["prefetch"][key]
        request = parse_hook_request(body, "patient-view")
        data = gather(
            request, screener.plan, None, {"deadline_seconds": 3, "lookback_hours": 72}, now.timestamp()
        )
        assert key in data.unavailable
        results = {r.trial.id: r for r in screener.screen(request.patient_id, data, now.timestamp()).results}
        found = criterion(results[trial], criterion_id)
        assert found.status == UNKNOWN, (key, criterion_id, found.status, found.evidence)
        # With the key present the same criterion is decided.
        full = parse_hook_request(hook_body(female), "patient-view")
        decided = gather(
            full, screener.plan, None, {"deadline_seconds": 3, "lookback_hours": 72}, now.timestamp()
        )
        again = {r.trial.id: r for r in screener.screen(full.patient_id, decided, now.timestamp()).results}
        assert criterion(again[trial], criterion_id).status != UNKNOWN, key


def test_null_conditions_over_http_is_possibly_eligible_not_excluded_or_cleared(null_app: Flask) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    scenario = next(s for s in all_scenarios(now) if s.name == "ecmo-eligible")
    body = hook_body(scenario.builder)
    body["prefetch"]["conditions"] = None
    response = null_app.test_client().post(SERVICE_URL, json=body)
    assert response.status_code == 200
    store = null_app.extensions["cds"].store
    statuses = {
        c["source"]["topic"]["code"]: store.get_card(c["uuid"]).status for c in response.get_json()["cards"]
    }
    assert statuses[ECMO] == "possibly_eligible"  # AIDS (and the onset's infection) unknown, not "not met"


# -- (7) onset from a charted septic-shock Condition alone -------------------------------------------


def test_onset_from_a_charted_condition_alone_is_to_confirm(screener: Screener) -> None:
    results = assert_scenario(screener, "msc-charted-septic-shock-only")
    septic_shock = criterion(results[MSC], "septic_shock")
    assert septic_shock.status == CONFIRM
    assert results[MSC].onset.value == T - 4 * HOUR and results[MSC].onset.status == "confirm"
    assert "candidate onset" in text(septic_shock.evidence)
    card = screener.renderer.render(results[MSC])
    assert "septic-shock onset today 04:30 (candidate, to confirm)" in card["detail"]
    criteria = {c["id"]: c for c in card["extension"]["screening"]["criteria"]}
    assert criteria["septic_shock"]["result"] == "to_confirm"


# -- (8) every "absence means not met" carries its reason --------------------------------------------


def test_every_rule_whose_missing_data_counts_as_not_met_has_a_reason(screener: Screener) -> None:
    found = [
        (trial.id, c.id, spec)
        for trial in screener.trials
        for c in trial.criteria
        if c.rule is not None
        for _, spec in absence_rules(c.rule)
    ]
    assert found, "the AIDS rule and the pregnancy condition arm at least"
    for trial_id, criterion_id, spec in found:
        assert len(spec.get("absent_reason", "")) > 30, (trial_id, criterion_id)


def test_a_trial_rule_without_its_absence_reason_fails_to_load(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(PROJECT_ROOT / "mappings", data / "mappings")
    shutil.copytree(PROJECT_ROOT / "trials", data / "trials")
    path = data / "trials" / "NCT05184296-ecmo-rescue.yaml"
    source = path.read_text()
    start = source.index(', absent_reason: "AIDS')
    end = source.index('"}}', start) + 1
    path.write_text(source[:start] + source[end:])
    with pytest.raises(DataFileError, match="absent_reason"):
        load_trials(data, load_knowledge(data))


def test_cds_service_check_lists_the_absence_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["check"]) == 0
    out = capsys.readouterr().out
    assert 'missing data counts as "not met"' in out
    assert "NCT05184296 aids" in out and "knee_recoloration_time" in out


def test_the_arrhythmia_arm_asks_when_none_is_coded(screener: Screener) -> None:
    result = assert_scenario(screener, "ecmo-normal-lvef-arrhythmia-to-confirm")[ECMO]
    assert criterion(result, "myocardial_impairment").status == CONFIRM


# -- (9) the truncated I-MICRO exclusion list is a checklist item --------------------------------


def test_imicro_cards_carry_the_other_registry_exclusions_item(screener: Screener) -> None:
    result = assert_scenario(screener, "imicro-eligible")[IMICRO]
    card = screener.renderer.render(result)
    assert "other registry exclusions: check the protocol" in card["detail"]
    criteria = {c["id"]: c for c in card["extension"]["screening"]["criteria"]}
    assert criteria["other_registry_exclusions"] == {
        "id": "other_registry_exclusions",
        "kind": "exclusion",
        "result": "to_confirm",
        "evidence": [],
    }


# -- (10) persistence means still true now ------------------------------------------------------


def test_a_lactate_that_fell_back_is_not_persistent(screener: Screener) -> None:
    result = assert_scenario(screener, "ecmo-lactate-fell-back")[ECMO]
    outcome = criterion(result, "refractory_hypoperfusion_over_5h")
    assert outcome.status == UNKNOWN  # only the SvO2 arm (not charted) is left open
    scenario = SCENARIOS["ecmo-lactate-fell-back"]
    b = copy.deepcopy(scenario.builder)
    b.observation("19224-5", 70, "%", 1, display="SvO2")  # a normal SvO2: nothing left open
    b.observation("19224-5", 71, "%", 0.5, display="SvO2")
    assert screen(screener, b)[ECMO].status == "not_eligible"


def test_check_output_is_printed_to_stdout() -> None:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert cli_main(["check"]) == 0
    assert buffer.getvalue().startswith("ok:")


# -- fetch mode: the service's own queries ask for the Medications -----------------------------------


def test_prefetch_template_includes_the_medications(screener: Screener) -> None:
    templates = screener.plan.templates()
    assert "_include=MedicationAdministration:medication" in templates["medicationAdministrations"]
    # The weight codes and the quantitative hCG are asked for too (the templates come from the mappings).
    assert all(code in templates["latestBodyWeight"] for code in ("29463-7", "3141-9", "8335-2"))
    assert "19080-1" in templates["latestPregnancyTest"]


@pytest.mark.fhir
def test_a_referenced_bag_missing_from_prefetch_is_fetched_by_id(null_app: Flask, fhir_server: Any) -> None:
    """Prefetch without the included Medications (a client that ignores _include): the service fetches
    them by id from fhirServer, within the hook's deadline, and the VIS is computed."""
    now = datetime.now(UTC).replace(microsecond=0)
    scenario = next(s for s in all_scenarios(now) if s.name == "ecmo-pump-rate-referenced-bag")
    fhir_server.post_transaction(scenario.bundle())
    try:
        body = hook_body(scenario.builder, fhir_server=fhir_server.base_url)
        bundle = body["prefetch"]["medicationAdministrations"]
        bundle["entry"] = [e for e in bundle["entry"] if e["search"]["mode"] == "match"]
        assert not any(e["resource"]["resourceType"] == "Medication" for e in bundle["entry"])
        response = null_app.test_client().post(SERVICE_URL, json=body)
        assert response.status_code == 200, response.data
        store = null_app.extensions["cds"].store
        cards = response.get_json()["cards"]
        statuses = {c["source"]["topic"]["code"]: store.get_card(c["uuid"]).status for c in cards}
        assert statuses[ECMO] == "eligible"
        # Without a fhirServer the bag strength cannot be had: the VIS is unknown, not 0.
        del body["fhirServer"]
        response = null_app.test_client().post(SERVICE_URL, json=body)
        cards = response.get_json()["cards"]
        statuses = {c["source"]["topic"]["code"]: store.get_card(c["uuid"]).status for c in cards}
        assert statuses[ECMO] == "possibly_eligible"
    finally:
        fhir_server.delete_patient_everything(scenario.patient_id)


# -- a version on every screening-log row ----------------------------------------------------------


def test_every_screening_log_row_records_the_trial_and_mappings_versions(
    null_app: Flask, screener: Screener, tmp_path: Path
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    scenario = next(s for s in all_scenarios(now) if s.name == "ecmo-eligible")
    response = null_app.test_client().post(SERVICE_URL, json=hook_body(scenario.builder))
    assert response.status_code == 200
    store = null_app.extensions["cds"].store
    trials = {t.id: t for t in screener.trials}
    for card in response.get_json()["cards"]:
        row = store.get_card(card["uuid"])
        trial = trials[row.trial_id]
        assert row.trial_version == trial.version and row.trial_version.startswith("sha256:")
        assert row.mappings_version == screener.knowledge.version
    # The hash follows the file's content: an edited trial file gets another version.
    data = tmp_path / "data"
    shutil.copytree(PROJECT_ROOT / "mappings", data / "mappings")
    shutil.copytree(PROJECT_ROOT / "trials", data / "trials")
    path = data / "trials" / "NCT05184296-ecmo-rescue.yaml"
    path.write_text(path.read_text() + "\n# a site's edit\n")
    edited = {t.id: t.version for t in load_trials(data, load_knowledge(data))}
    assert edited[ECMO] != trials[ECMO].version and edited[MSC] == trials[MSC].version
    logged = {r.card_uuid: r for r in store.screening_log()}
    assert all(r.trial_version and r.mappings_version for r in logged.values())


def test_norepinephrine_start_is_that_of_the_episode_even_before_a_late_lactate_onset(
    screener: Screener,
) -> None:
    # Norepinephrine from 14 h ago, lactate normal around its start, > 2 only 9 h later (5 h ago):
    # the septic-shock onset is the lactate's time, the I-MICRO window still runs from 14 h ago.
    b = PatientBuilder("cdsh-late-lactate", AT, age=60)
    b.weight(80, hours=40)
    b.condition(ICD10CM, "A41.9", "Sepsis, unspecified organism", 16)
    b.lactate(1.6, hours=14.5)
    b.norepinephrine(0.2, "ug/kg/min", start=14)
    b.lactate(3.4, hours=5)
    result = screen(screener, b)[IMICRO]
    assert result.onset.value == T - 5 * HOUR
    assert result.anchor is not None and result.anchor.value == T - 14 * HOUR
