"""The trial files: faithful to their sources, selected by the site, documented, and open to a new
trial added as a data file alone."""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cds_service.app import create_app
from cds_service.base.config import PROJECT_ROOT, load_settings
from cds_service.base.datafiles import DataFileError
from cds_service.patient_data.gather import RawPatientData
from cds_service.screening import Screener
from cds_service.tools.scenarios import ECMO, IMICRO, MSC, Scenario, all_scenarios
from cds_service.tools.trial_docs import render_document, render_trial_table
from tests.conftest import (
    SERVICE_URL,
    SHARED_DIR,
    CardCheckingClient,
    hook_body,
    make_settings,
    needs_infrastructure,
)

SHARED = SHARED_DIR  # ../shared beside the checkout, as in CI
SEEDS = {
    ECMO: SHARED / "seeds" / "000_67edb00d4b67abb5.txt",
    IMICRO: SHARED / "seeds" / "003_503ac6449248aeab.txt",
    MSC: SHARED / "seeds" / "004_749a594901771799.txt",
}
CLINICAL_KNOWLEDGE = SHARED / "reference" / "clinical-knowledge.md"


def _normal(text: str) -> str:
    return " ".join(text.replace("\u2022", " ").split())


def scenario(name: str, at: datetime) -> Scenario:
    return next(s for s in all_scenarios(at) if s.name == name)


def test_the_three_seed_trials_load_with_registry_facts(screener: Screener) -> None:
    trials = {t.id: t for t in screener.trials}
    assert set(trials) == {ECMO, IMICRO, MSC}
    assert {t.id for t in trials.values() if t.registry_status == "recruiting"} == {ECMO}
    assert trials[IMICRO].registry_status == "completed" and trials[MSC].registry_status == "unknown"
    for trial in trials.values():
        assert trial.registry_url == f"https://clinicaltrials.gov/study/{trial.id}"
        assert trial.title and trial.sponsor and trial.window_source
    # I-MICRO's registry times randomisation from norepinephrine onset (issue 14, defect 5).
    assert {t.id: t.window_anchor for t in trials.values()} == {
        ECMO: "septic_shock_onset",
        MSC: "septic_shock_onset",
        IMICRO: "norepinephrine_start",
    }
    assert (trials[MSC].window_opens, trials[MSC].window_closes) == (0, 10 * 3600)
    assert (trials[IMICRO].window_opens, trials[IMICRO].window_closes) == (6 * 3600, 24 * 3600)
    closers = [c.id for c in trials[ECMO].exclusion if c.closes_window]
    assert closers == ["criteria_met_over_12h"]


def test_every_criterion_quotes_its_source_verbatim(screener: Screener) -> None:
    """Each `source` is a quotation: every fragment between '…' is in the seed text, or — when it is
    marked 'CK §…:' — in clinical-knowledge.md."""
    needs_infrastructure(
        "the seed documents and clinical-knowledge.md in ../shared",
        all(path.is_file() for path in [*SEEDS.values(), CLINICAL_KNOWLEDGE]),
        f"put the shared folder beside the checkout ({SHARED})",
    )
    knowledge_text = _normal(CLINICAL_KNOWLEDGE.read_text(encoding="utf-8"))
    for trial in screener.trials:
        seed = _normal(SEEDS[trial.id].read_text(encoding="utf-8"))
        quotes = [(c.id, c.source) for c in trial.criteria] + [("enrollment_window", trial.window_source)]
        for criterion_id, source in quotes:
            text, where = seed, "seed"
            marked = re.match(r"^CK §\d[^:]*:\s*(.*)$", source)
            if marked:
                source, text, where = marked.group(1), knowledge_text, "clinical-knowledge.md"
            for fragment in (f.strip(" .") for f in source.split("…")):
                if fragment:
                    assert _normal(fragment) in text, (
                        f"{trial.id} {criterion_id}: not in the {where}: {fragment!r}"
                    )


def test_clinician_items_and_computed_items_are_both_there(screener: Screener) -> None:
    by_id = {t.id: t for t in screener.trials}
    decided = {t.id: {c.id: c.decided_by for c in t.criteria} for t in screener.trials}
    assert decided[MSC]["informed_consent"] == "clinician"
    assert decided[MSC]["severe_neutropenia"] == "data"
    assert decided[ECMO]["life_expectancy_under_1_year"] == "clinician"
    assert decided[ECMO]["icu_after_fluid_resuscitation"] == "clinician"
    # "Absence of a code proves nothing": charted conditions decide, else the clinician.
    for criterion_id in (
        "other_cardiac_dysfunction",
        "obstructive_cause_of_shock",
        "peripheral_artery_disease",
    ):
        assert decided[ECMO][criterion_id] == "data, else clinician"
    assert decided[IMICRO]["thrombocytopenia_under_30"] == "data"
    assert decided[IMICRO]["iloprost_hypersensitivity"] == "clinician"
    hypoperfusion = next(c for c in by_id[IMICRO].inclusion if c.id == "peripheral_hypoperfusion")
    mottling = hypoperfusion.rule["any_of"][0]["value"]  # type: ignore[index]
    assert (mottling["input"], mottling["op"], mottling["threshold"]) == ("mottling_score", ">=", 2)


def test_docs_trials_md_is_generated_from_the_trial_files(screener: Screener) -> None:
    shipped = (PROJECT_ROOT / "docs" / "trials.md").read_text(encoding="utf-8")
    assert shipped == render_document(screener), (
        "docs/trials.md is stale: python -m cds_service.tools.trial_docs"
    )
    table = render_trial_table(screener)
    for trial in screener.trials:
        assert f"### {trial.short_name} — {trial.id}" in table
        for criterion in trial.criteria:
            assert criterion.text.replace("|", "\\|") in table
    assert "clinician (checklist)" in table and "computed from data" in table
    assert "## Scenario files" in shipped and '"evaluatedAt"' in shipped


# -- site configuration ---------------------------------------------------------------------------------


def test_site_configuration_chooses_the_trials(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, screening={"trials": [ECMO]})
    app = create_app(settings)
    app.test_client_class = CardCheckingClient
    client = app.test_client()
    (service,) = client.get("/cds-services").get_json()["services"]
    assert ECMO in service["description"] and IMICRO not in service["description"]
    now = datetime.now(UTC).replace(microsecond=0)
    # I-MICRO and ECMO-RESCUE both apply to this patient; only the configured trial is screened.
    response = client.post(SERVICE_URL, json=hook_body(scenario("ecmo-eligible", now).builder))
    assert [c["source"]["topic"]["code"] for c in response.get_json()["cards"]] == [ECMO]
    app.extensions["cds"].store.close()


def test_an_unknown_trial_in_the_configuration_is_an_error() -> None:
    settings = load_settings(environ={}, overrides={"screening": {"trials": ["NCT00000001"]}})
    with pytest.raises(DataFileError, match=r"screening.trials: NCT00000001: no such trial file"):
        Screener(settings)


@pytest.mark.parametrize("name", ["ecmo-eligible", "imicro-eligible", "msc-eligible"])
def test_the_card_shows_the_registry_status(screener: Screener, name: str) -> None:
    at = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    b = scenario(name, at).builder
    outcome = screener.screen(b.patient_id, RawPatientData(b.patient, {"all": b.resources}), at.timestamp())
    phrases = {
        "recruiting": None,
        "completed": "enrollment closed per registry",
        "unknown": "registry status unknown",
    }
    for result, card in screener.cards(outcome):
        phrase = phrases[result.trial.registry_status]
        if phrase is None:  # recruiting: nothing to say about the registry
            assert "registry" not in card["summary"] and "registry" not in card["detail"].lower()
            continue
        # A trial that is not recruiting says so in the summary, and sends the clinician to the
        # research team first.
        assert phrase in card["summary"], card["summary"]
        assert f"**{phrase[:1].upper()}{phrase[1:]}**" in card["detail"], card["detail"]
        assert "ask the ICU research team before approaching the patient" in card["detail"]
        assert card["suggestions"][0]["isRecommended"] is False


# -- a fourth trial, from a data file alone ---------------------------------------------------------------

MADE_UP_TRIAL = """\
# A made-up trial: nothing in Python knows about it.
id: NCT09999999
short_name: PLT-SHOCK
title: Made-up trial of platelet support in septic shock with thrombocytopenia
sponsor: Nobody (test data)
registry:
  status: not yet recruiting
  checked: "2026"
  url: https://clinicaltrials.gov/study/NCT09999999
sources: ["invented for a test"]
enrollment_window:
  anchor: septic_shock_onset
  opens_after: 2h
  closes_after: 48h
  source: "within 48 h of septic shock"
summary_criteria: [thrombocytopenia]
inclusion:
  - id: septic_shock
    text: Septic shock
    source: "adults in septic shock"
    rule: {established: {input: septic_shock_onset}}
  - id: thrombocytopenia
    text: Platelets < 50 × 10⁹/L
    source: "platelets below 50 000 per microlitre"
    rule:
      value: {input: platelets, op: "<", threshold: 50, aggregate: min, within: 24h, within_source: "today"}
    measure: a platelet count in the last 24 h
  - id: adult
    text: Age ≥ 18 years
    source: "adults"
    rule: {value: {input: age_years, op: ">=", threshold: 18}}
exclusion:
  - id: heparin_induced_thrombocytopenia
    text: Heparin-induced thrombocytopenia
    source: "no HIT"
    confirm: Not heparin-induced thrombocytopenia
"""


@pytest.fixture
def data_dir_with_a_fourth_trial(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for folder in ("mappings", "trials", "cards"):
        shutil.copytree(PROJECT_ROOT / folder, data / folder)
    (data / "trials" / "NCT09999999-made-up.yaml").write_text(MADE_UP_TRIAL, encoding="utf-8")
    return data


def test_a_fourth_trial_from_a_data_file_alone(data_dir_with_a_fourth_trial: Path, tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"data": {"dir": str(data_dir_with_a_fourth_trial)}})
    screener = Screener(settings)
    assert [t.id for t in screener.trials].count("NCT09999999") == 1 and len(screener.trials) == 4
    at = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    b = scenario("imicro-low-platelets", at).builder  # platelets 22, septic shock for 12 h
    outcome = screener.screen(b.patient_id, RawPatientData(b.patient, {"all": b.resources}), at.timestamp())
    statuses = {r.trial.id: r.status for r in outcome.results}
    assert statuses["NCT09999999"] == "eligible"
    assert statuses[IMICRO] == "not_eligible"  # the shipped trials are evaluated as before
    b = scenario("imicro-eligible", at).builder  # platelets 160
    outcome = screener.screen(b.patient_id, RawPatientData(b.patient, {"all": b.resources}), at.timestamp())
    assert {r.trial.id: r.status for r in outcome.results}["NCT09999999"] == "not_eligible"
    # The prefetch asks for platelets because a criterion uses them.
    assert "777-3" in screener.plan.templates()["observations"]

    app = create_app(make_settings(tmp_path, data={"dir": str(data_dir_with_a_fourth_trial)}))
    app.test_client_class = CardCheckingClient
    client = app.test_client()
    (service,) = client.get("/cds-services").get_json()["services"]
    assert "NCT09999999" in service["description"]
    now = datetime.now(UTC).replace(microsecond=0)
    response = client.post(SERVICE_URL, json=hook_body(scenario("imicro-low-platelets", now).builder))
    cards = [c for c in response.get_json()["cards"] if c["source"]["topic"]["code"] == "NCT09999999"]
    assert len(cards) == 1
    assert "PLT-SHOCK" in cards[0]["summary"] and "not yet recruiting" in cards[0]["summary"]
    assert "**Registry status not yet recruiting**" in cards[0]["detail"]
    app.extensions["cds"].store.close()


def test_the_made_up_trial_is_documented_too(data_dir_with_a_fourth_trial: Path) -> None:
    settings = load_settings(environ={}, overrides={"data": {"dir": str(data_dir_with_a_fourth_trial)}})
    table = render_trial_table(Screener(settings))
    assert "### PLT-SHOCK — NCT09999999" in table
    assert "| Heparin-induced thrombocytopenia | exclusion | clinician (checklist) |" in table


def test_readme_shows_each_trials_criteria_generated_from_the_trial_files(screener: Screener) -> None:
    from cds_service.tools.trial_docs import README_BEGIN, README_END, with_readme_section

    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    assert README_BEGIN in readme and README_END in readme
    assert readme == with_readme_section(readme, screener), (
        "README is stale: python -m cds_service.tools.trial_docs --readme"
    )
    for trial in screener.trials:
        assert trial.id in readme
