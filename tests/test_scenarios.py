"""Scenario patients: every story gives its expected result for all three trials — in memory, through
the HTTP hook with prefetch, and through the hook against a real FHIR server without prefetch —
plus the scenario files, their time shifting, the CLI and the shipped examples."""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_service.app import create_app
from cds_service.cli import main as cli_main
from cds_service.patient_data.gather import RawPatientData
from cds_service.screening import Screener
from cds_service.tools.scenario_builder import PatientBuilder
from cds_service.tools.scenarios import (
    CARD_STATUSES,
    ECMO,
    EXAMPLES_AT,
    EXAMPLES_DIR,
    IMICRO,
    MSC,
    STATUSES,
    Scenario,
    ScenarioFileError,
    all_scenarios,
    check_files,
    load_scenario_file,
    outcome_problems,
    shift_bundle_times,
    write_examples,
)
from tests.conftest import SERVICE_URL, CardCheckingClient, hook_body, make_settings

NAMES = [s.name for s in all_scenarios(EXAMPLES_AT)]


def scenario_now(name: str) -> Scenario:
    """The scenario built for *now* (the service evaluates at the current time)."""
    now = datetime.now(UTC).replace(microsecond=0)
    return next(s for s in all_scenarios(now) if s.name == name)


def screen(screener: Screener, scenario: Scenario, at: float) -> dict[str, str]:
    b = scenario.builder
    outcome = screener.screen(
        b.patient_id, RawPatientData(patient=b.patient, resources={"all": b.resources}), at
    )
    return {r.trial.id: r.status for r in outcome.results}


# -- the catalogue ----------------------------------------------------------------------------------


def test_scenarios_are_well_formed_and_cover_every_result() -> None:
    scenarios = all_scenarios(EXAMPLES_AT)
    ids = [s.patient_id for s in scenarios]
    assert all(i.startswith("cdsh-") for i in ids) and len(ids) == len(set(ids))
    assert len({s.name for s in scenarios}) == len(scenarios)
    for scenario in scenarios:
        assert set(scenario.expected) == {ECMO, IMICRO, MSC}, scenario.name
        assert set(scenario.expected.values()) <= set(STATUSES), scenario.name
        assert len(scenario.story) > 60, scenario.name
        bundle = scenario.bundle()
        assert bundle["type"] == "transaction"
        assert all(e["request"]["method"] == "PUT" for e in bundle["entry"])
        assert [e["resource"]["resourceType"] for e in bundle["entry"]].count("Patient") == 1
    seen = {trial: Counter(s.expected[trial] for s in scenarios) for trial in (ECMO, IMICRO, MSC)}
    for trial in (ECMO, IMICRO):
        assert set(seen[trial]) == set(STATUSES), (trial, seen[trial])
    # MSC's window opens at onset: it can never be "upcoming" (documented in its trial file).
    assert set(seen[MSC]) == set(STATUSES) - {"upcoming"}, seen[MSC]


def test_scenarios_include_the_unit_and_coding_variants() -> None:
    by_name = {s.name: s for s in all_scenarios(EXAMPLES_AT)}

    def dumped(name: str) -> str:
        return json.dumps(by_name[name].bundle())

    assert '"code": "ug/min"' in dumped("ecmo-ug-per-min") and '"29463-7"' in dumped("ecmo-ug-per-min")
    assert '"242969"' in dumped("ecmo-salt-code") and '"7512"' not in dumped("ecmo-salt-code")
    assert '"14118-4"' in dumped("imicro-lactate-mg-dl") and '"mg/dL"' in dumped("imicro-lactate-mg-dl")
    assert '"85354-9"' in dumped("ecmo-map-from-panel") and '"8478-0"' not in dumped("ecmo-map-from-panel")
    assert '"code": "/uL"' in dumped("msc-anc-per-ul") and '"code": "/uL"' in dumped(
        "imicro-platelets-per-ul"
    )


# -- (a) in memory ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_scenario_in_memory(screener: Screener, name: str) -> None:
    at = datetime(2026, 3, 1, 8, 30, tzinfo=UTC)
    scenario = next(s for s in all_scenarios(at) if s.name == name)
    assert screen(screener, scenario, at.timestamp()) == scenario.expected, scenario.story
    # The same expectations read from the cards' extension.screening (status and named criteria).
    b = scenario.builder
    outcome = screener.screen(
        b.patient_id, RawPatientData(patient=b.patient, resources={"all": b.resources}), at.timestamp()
    )
    cards = [card for _, card in screener.cards(outcome)]
    report = outcome_problems(scenario.expected, scenario.expected_criteria, outcome.results, cards)
    assert {trial: problems for trial, (_, problems) in report.items() if problems} == {}, scenario.story


# -- (b) and (c) through the hook ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenario_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    """One app (and store) for every scenario: loading the knowledge per test would cost ~0.5 s each."""
    application = create_app(make_settings(tmp_path_factory.mktemp("scenarios"), fhir={"allow_http": True}))
    application.test_client_class = CardCheckingClient
    yield application
    state = application.extensions["cds"]
    if state._store is not None:
        state._store.close()


def card_outcome(app: Flask, response: Any) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """NCT id → (the card's extension.screening status, its summary, the whole extension); one card
    per trial at most, and the status the service logged for the card is the extension's."""
    assert response.status_code == 200, response.data
    cards = response.get_json()["cards"]
    topics = [c["source"]["topic"]["code"] for c in cards]
    assert len(topics) == len(set(topics)), topics
    store = app.extensions["cds"].store
    outcome = {}
    for card in cards:
        screening = card["extension"]["screening"]
        issued = store.get_card(card["uuid"])
        assert issued is not None and issued.status == screening["status"]
        outcome[card["source"]["topic"]["code"]] = (screening["status"], card["summary"], screening)
    return outcome


def assert_expected(outcome: dict[str, tuple[str, str, dict[str, Any]]], scenario: Scenario) -> None:
    for trial_id, expected in scenario.expected.items():
        if expected in CARD_STATUSES:
            assert trial_id in outcome, (scenario.name, trial_id, expected, outcome)
            assert outcome[trial_id][0] == expected, (scenario.name, trial_id, outcome[trial_id])
            results = {c["id"]: c["result"] for c in outcome[trial_id][2]["criteria"]}
            for criterion, result in scenario.expected_criteria.get(trial_id, {}).items():
                assert results[criterion] == result, (scenario.name, trial_id, criterion, results)
        else:
            assert trial_id not in outcome, (scenario.name, trial_id, expected, outcome)


@pytest.mark.fhir
@pytest.mark.parametrize("name", NAMES)
def test_scenario_through_the_hook_with_and_without_prefetch(
    scenario_app: Flask, fhir_server: Any, name: str
) -> None:
    app, client = scenario_app, scenario_app.test_client()
    scenario = scenario_now(name)
    started = datetime.now(UTC).replace(microsecond=0)
    with_prefetch = card_outcome(app, client.post(SERVICE_URL, json=hook_body(scenario.builder)))
    assert_expected(with_prefetch, scenario)
    fhir_server.post_transaction(scenario.bundle())
    try:
        body = hook_body(scenario.builder, prefetch=False, fhir_server=fhir_server.base_url)
        assert "prefetch" not in body
        fetched = card_outcome(app, client.post(SERVICE_URL, json=body))
    finally:
        fhir_server.delete_patient_everything(scenario.patient_id)
    assert_expected(fetched, scenario)
    # Same statuses, card summaries and machine-readable results. Evidence that runs "until now" is
    # timed at each call's own evaluation time: the two calls may be a second apart.
    during = (started, datetime.now(UTC) + timedelta(seconds=1))
    assert _evaluation_times_as_now(fetched, during) == _evaluation_times_as_now(with_prefetch, during)


def _evaluation_times_as_now(node: Any, during: tuple[datetime, datetime]) -> Any:
    """``node`` with every ``time`` that falls inside the test's own calls replaced by "now"."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "time" and isinstance(value, str):
                with contextlib.suppress(ValueError):
                    if during[0] <= datetime.fromisoformat(value) <= during[1]:
                        value = "now"
            out[key] = _evaluation_times_as_now(value, during)
        return out
    if isinstance(node, list | tuple):
        return type(node)(_evaluation_times_as_now(item, during) for item in node)
    return node


# -- scenario files -----------------------------------------------------------------------------------


def test_scenario_files_round_trip_and_replay_at_another_time(screener: Screener, tmp_path: Path) -> None:
    from cds_service.tools.scenarios import write_scenarios

    written = write_scenarios(tmp_path, EXAMPLES_AT)
    assert (tmp_path / "README.md") in written
    loaded = load_scenario_file(tmp_path / "ecmo-upcoming.json")
    assert loaded.evaluated_at == EXAMPLES_AT and loaded.expected[ECMO] == "upcoming"
    assert loaded.patient_id == "cdsh-ecmo-upcoming"
    later = datetime(2027, 2, 3, 4, 5, 6, tzinfo=UTC)
    replayed = loaded.shifted_to(later)
    others = [r for r in replayed.resources() if r is not replayed.patient]
    outcome = screener.screen(
        replayed.patient_id,
        RawPatientData(patient=replayed.patient, resources={"b": others}),
        later.timestamp(),
    )
    assert {r.trial.id: r.status for r in outcome.results} == loaded.expected
    out = io.StringIO()
    assert check_files(sorted(tmp_path.glob("*.json")), screener, out) == 0
    assert out.getvalue().count("ok  ") == 3 * len(NAMES)


def test_shift_bundle_times_moves_event_times_only() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "cdsh-x", "birthDate": "1970-05-01"}},
            {
                "resource": {
                    "resourceType": "Observation",
                    "effectiveDateTime": "2026-01-15T10:00:00+02:00",
                    "issued": "2026-01-15T08:30:00.123Z",
                    "code": {"text": "2026-01-15T10:00:00Z"},
                }
            },
            {
                "resource": {
                    "resourceType": "MedicationAdministration",
                    "effectivePeriod": {"start": "2026-01-15T06:00:00Z", "end": "2026-01-15T07:00:00Z"},
                }
            },
            {
                "resource": {
                    "resourceType": "Condition",
                    "onsetDateTime": "2026-01-14",
                    "recordedDate": "2026-01-14T23:00:00-05:00",
                }
            },
        ],
    }
    shifted = shift_bundle_times(bundle, timedelta(days=2, hours=3).total_seconds())
    patient, observation, administration, condition = (e["resource"] for e in shifted["entry"])
    assert patient["birthDate"] == "1970-05-01"
    assert observation["effectiveDateTime"] == "2026-01-17T13:00:00+02:00"
    assert observation["issued"] == "2026-01-17T11:30:00.123Z"
    assert observation["code"]["text"] == "2026-01-15T10:00:00Z"  # not a time element
    assert administration["effectivePeriod"] == {
        "start": "2026-01-17T09:00:00Z",
        "end": "2026-01-17T10:00:00Z",
    }
    assert condition["onsetDateTime"] == "2026-01-16"
    assert condition["recordedDate"] == "2026-01-17T02:00:00-05:00"
    assert bundle["entry"][1]["resource"]["issued"] == "2026-01-15T08:30:00.123Z"  # the input is untouched


def test_bad_scenario_files_name_the_file_and_key(tmp_path: Path) -> None:
    good = all_scenarios(EXAMPLES_AT)[0].document()
    cases = [
        ({k: v for k, v in good.items() if k != "evaluatedAt"}, "evaluatedAt: required"),
        ({**good, "evaluatedAt": "2026-01-15T12:00:00"}, "needs a time-zone offset"),
        ({**good, "expected": {MSC: "maybe"}}, f"expected.{MSC}: 'maybe' is not one of"),
        ({**good, "bundle": {"resourceType": "Patient"}}, "bundle: must be a FHIR Bundle"),
        (
            {**good, "expectedCriteria": {MSC: {"severe_neutropenia": "yes"}}},
            f"expectedCriteria.{MSC}.severe_neutropenia: 'yes' is not one of",
        ),
        (
            {**good, "expectedCriteria": {ECMO: {"age_18_to_75": "met"}}},
            f"expectedCriteria.{ECMO}: only for a trial expected to give a card",
        ),
    ]
    for document, message in cases:
        path = tmp_path / "case.json"
        path.write_text(json.dumps(document), encoding="utf-8")
        with pytest.raises(ScenarioFileError, match=message) as raised:
            load_scenario_file(path)
        assert str(path) in str(raised.value)


# -- command line and the shipped examples --------------------------------------------------------------


def test_cli_scenarios_write_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["scenarios", "write", str(tmp_path), "--at", "2026-06-01T00:00:00Z"]) == 0
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == len(NAMES)
    assert load_scenario_file(files[0]).evaluated_at == datetime(2026, 6, 1, tzinfo=UTC)
    assert "| scenario |" in (tmp_path / "README.md").read_text(encoding="utf-8")
    capsys.readouterr()
    assert cli_main(["scenarios", "check", str(tmp_path)]) == 0
    assert f"{len(NAMES)} scenario file(s), 0 mismatch(es)" in capsys.readouterr().out
    # A criterion expectation the card's extension.screening does not meet is a mismatch, named.
    path = tmp_path / "msc-anc-missing.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    document["expectedCriteria"][MSC]["severe_neutropenia"] = "met"
    path.write_text(json.dumps(document), encoding="utf-8")
    assert cli_main(["scenarios", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL msc-anc-missing" in out
    assert "extension.screening criterion severe_neutropenia: expected met, got unknown" in out


@pytest.mark.fhir
def test_cli_scenarios_load_puts_every_patient(fhir_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        assert cli_main(["scenarios", "load", "--fhir", fhir_server.base_url, "--wait", "5"]) == 0
        assert f"loaded {len(NAMES)} of {len(NAMES)}" in capsys.readouterr().out
        patient = fhir_server.get("Patient/cdsh-ecmo-eligible")
        assert patient["id"] == "cdsh-ecmo-eligible"
        infusions = fhir_server.search_all("MedicationAdministration?patient=cdsh-ecmo-eligible")
        assert len(infusions) == 3
    finally:
        for scenario in all_scenarios(EXAMPLES_AT):
            fhir_server.delete_patient_everything(scenario.patient_id)


def test_shipped_examples_are_current(tmp_path: Path) -> None:
    """examples/ is exactly what `python -m cds_service.tools.scenarios examples` writes (it cannot drift)."""
    write_examples(tmp_path, EXAMPLES_AT)
    generated = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    for relative in generated:
        shipped = EXAMPLES_DIR / relative
        assert shipped.is_file(), f"{shipped} missing: run `python -m cds_service.tools.scenarios examples`"
        assert shipped.read_bytes() == (tmp_path / relative).read_bytes(), (
            f"{shipped} is stale: run `python -m cds_service.tools.scenarios examples`"
        )
    assert "2026-11-21T12:00:00Z" in (EXAMPLES_DIR / "README.md").read_text(encoding="utf-8")


def test_example_patient_through_cds_service_evaluate(capsys: pytest.CaptureFixture[str]) -> None:
    """Foundation acceptance: the example request gives the NCT01849237 card through `cds-service
    evaluate`; the example patient with a normal neutrophil count gives none."""
    at = load_scenario_file(EXAMPLES_DIR / "scenarios" / "msc-eligible.json").evaluated_at.isoformat()
    capsys.readouterr()
    assert cli_main(["evaluate", str(EXAMPLES_DIR / "hook-request-msc-eligible.json"), "--at", at]) == 0
    cards = json.loads(capsys.readouterr().out)["cards"]
    assert [c["source"]["topic"]["code"] for c in cards].count(MSC) == 1
    assert cli_main(["evaluate", str(EXAMPLES_DIR / "patient-msc-normal-anc.json"), "--at", at]) == 0
    cards = json.loads(capsys.readouterr().out)["cards"]
    assert MSC not in [c["source"]["topic"]["code"] for c in cards]


def test_example_patient_through_the_http_hook(client: FlaskClient) -> None:
    """The same two examples through the HTTP hook, replayed at the current time (every event time
    shifted by now − evaluatedAt)."""
    evaluated_at = load_scenario_file(EXAMPLES_DIR / "scenarios" / "msc-eligible.json").evaluated_at
    seconds = (datetime.now(UTC) - evaluated_at).total_seconds()

    request = json.loads((EXAMPLES_DIR / "hook-request-msc-eligible.json").read_text(encoding="utf-8"))
    request["prefetch"] = {
        key: shift_bundle_times(value, seconds) if value.get("resourceType") == "Bundle" else value
        for key, value in request["prefetch"].items()
    }
    response = client.post(SERVICE_URL, json=request)
    assert response.status_code == 200, response.data
    assert [c["source"]["topic"]["code"] for c in response.get_json()["cards"]].count(MSC) == 1

    bundle = json.loads((EXAMPLES_DIR / "patient-msc-normal-anc.json").read_text(encoding="utf-8"))
    resources = [e["resource"] for e in shift_bundle_times(bundle, seconds)["entry"]]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    holder = PatientBuilder(patient["id"], datetime.now(UTC))  # only to fill the prefetch templates
    holder.patient, holder.resources = patient, [r for r in resources if r is not patient]
    response = client.post(SERVICE_URL, json=hook_body(holder))
    assert response.status_code == 200, response.data
    assert MSC not in [c["source"]["topic"]["code"] for c in response.get_json()["cards"]]


def test_cds_service_evaluate_reads_a_scenario_file_at_its_own_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`cds-service evaluate examples/scenarios/X.json` needs no --at: the file says when it happens."""
    from cds_service.cli import main

    for name in ("msc-eligible", "msc-normal-anc", "ecmo-upcoming"):
        path = EXAMPLES_DIR / "scenarios" / f"{name}.json"
        expected = json.loads(path.read_text())["expected"]
        assert main(["evaluate", str(path)]) == 0
        cards = json.loads(capsys.readouterr().out)["cards"]
        shown = {card["source"]["topic"]["code"] for card in cards}
        assert shown == {trial for trial, status in expected.items() if status in CARD_STATUSES}, name
