"""Cards a clinician can act on: wording from cards/ templates, the referral suggestion (validated
FHIR R4 resources), override reasons, links, and the CDS Hooks card rules they all follow."""

from __future__ import annotations

import logging
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.researchsubject import ResearchSubject
from fhir.resources.R4B.servicerequest import ServiceRequest
from flask.testing import FlaskClient

from cds_service.base.config import PROJECT_ROOT, load_settings
from cds_service.base.datafiles import DataFileError
from cds_service.cards.referral import (
    CLINICALTRIALS_SYSTEM,
    InvalidResource,
    ReferralRequest,
    referral_suggestion_uuid,
    service_request,
    validated,
)
from cds_service.cards.render import SUMMARY_LIMIT, CardRenderer, duration, fit_summary
from cds_service.cards.text import LocalClock
from cds_service.clinical.derived import Derived, Evidence
from cds_service.clinical.evaluation import ELIGIBLE, POSSIBLY, UPCOMING, CriterionResult, TrialResult
from cds_service.knowledge.criteria_language import CONFIRM, MET, NOT_MET, UNKNOWN
from cds_service.knowledge.trials import Criterion, Trial
from cds_service.patient_data.gather import RawPatientData
from cds_service.screening import Screener
from cds_service.tools.card_rules import card_problems, response_problems
from cds_service.tools.scenario_builder import PatientBuilder
from tests.conftest import SERVICE_URL, hook_body, make_settings

MSC = "NCT01849237"
HOUR = 3600.0
AT = 1_780_000_000.0  # a fixed evaluation time for the synthetic results


def msc_patient(now: datetime, *, onset_hours: float = 4, anc: float | None = 0.4) -> PatientBuilder:
    builder = PatientBuilder(f"card-{uuid.uuid4().hex[:8]}", now, age=45, gender="male")
    builder.septic_shock_story(onset_hours=onset_hours)
    if anc is not None:
        builder.anc(anc, hours=2)
    return builder


def screen(screener: Screener, builder: PatientBuilder, user_id: str | None = None) -> list[dict[str, Any]]:
    data = RawPatientData(patient=builder.patient, resources={"bundle": builder.resources})
    outcome = screener.screen(builder.patient_id, data, builder.at.timestamp())
    return [card for _, card in screener.cards(outcome, user_id=user_id)]


def msc_card(screener: Screener, builder: PatientBuilder, user_id: str | None = None) -> dict[str, Any]:
    (card,) = [c for c in screen(screener, builder, user_id) if c["source"]["topic"]["code"] == MSC]
    assert card_problems(card) == []
    return card


# -- synthetic trials: any trial id, any status, without a trial file ------------------------------------


def criterion(cid: str, kind: str = "inclusion", *, confirm: str | None = None, measure: str | None = None):
    rule = None if confirm else {"value": {"input": "age_years", "op": ">=", "threshold": 0}}
    return Criterion(cid, cid.replace("_", " ").capitalize(), "source text", kind, rule, confirm, measure)


def synthetic_trial(trial_id: str, short_name: str, summary_criteria: tuple[str, ...], **extra: Any) -> Trial:
    inclusion = (
        *(criterion(c) for c in summary_criteria),
        criterion("cardiac_index"),
        criterion("consent", confirm="Informed consent (patient or next of kin)"),
    )
    fields: dict[str, Any] = {
        "id": trial_id,
        "short_name": short_name,
        "title": f"{short_name} trial",
        "sponsor": "A sponsor",
        "registry_status": "recruiting",
        "registry_checked": "2026-01",
        "registry_url": f"https://clinicaltrials.gov/study/{trial_id}",
        "registry_note": "",
        "links": (),
        "window_anchor": "septic_shock_onset",
        "window_opens": 0.0,
        "window_closes": 12 * HOUR,
        "window_source": "source",
        "summary_criteria": summary_criteria,
        "inclusion": inclusion,
        "exclusion": (criterion("pregnancy", "exclusion", measure="a pregnancy test"),),
        "path": "synthetic",
    }
    fields.update(extra)
    return Trial(**fields)


def synthetic_result(
    trial: Trial,
    status: str,
    facts: dict[str, str],
    *,
    onset_hours_ago: float = 3.0,
    unknown: tuple[str, ...] = (),
) -> TrialResult:
    onset = AT - onset_hours_ago * HOUR
    results = []
    for c in trial.criteria:
        if c.confirm:
            results.append(CriterionResult(c, CONFIRM, (), (), ""))
        elif c.id in unknown:
            results.append(CriterionResult(c, UNKNOWN, (), (c.measure or f"a {c.id}",), ""))
        elif c.kind == "exclusion":
            results.append(CriterionResult(c, NOT_MET, (Evidence("sex male"),), (), ""))
        else:
            summary = facts.get(c.id, "")
            evidence = (Evidence(summary or c.id, AT - HOUR, ("Observation/o1",)),)
            results.append(CriterionResult(c, MET, evidence, (), summary))
    onset_value = Derived(
        onset, "known", (Evidence("norepinephrine started", onset, ("MedicationAdministration/m1",)),)
    )
    return TrialResult(
        trial,
        status,
        AT,
        tuple(results),
        onset_value,
        onset + trial.window_opens,
        onset + trial.window_closes,
    )


@pytest.fixture(scope="module")
def renderer() -> CardRenderer:
    return CardRenderer(PROJECT_ROOT, load_settings(environ={}).section("screening"))


# -- summary, detail, indicator ----------------------------------------------------------------------


def test_eligible_card_names_the_trial_and_the_decisive_facts(screener: Screener, now: datetime) -> None:
    card = msc_card(screener, msc_patient(now))
    summary = card["summary"]
    assert len(summary) < SUMMARY_LIMIT and "\n" not in summary
    assert "MSC-Neutropenia" in summary and MSC in summary
    assert "septic shock" in summary and "ANC 0.4" in summary
    assert " eligible, registry status unknown: " in summary and summary.endswith("— 6 h left")
    assert card["indicator"] == "info"  # 6 h left: not closing yet (and the trial is not recruiting)
    assert card["extension"]["screening"]["status"] == "eligible"


def test_detail_has_the_facts_window_checklist_and_registry_status(screener: Screener, now: datetime) -> None:
    builder = msc_patient(now, onset_hours=4)
    detail = msc_card(screener, builder)["detail"]
    clock = LocalClock("UTC", builder.at.timestamp())
    onset, closes = (clock.at(builder.at.timestamp() - h * HOUR) for h in (4, 4 - 10))
    assert detail.startswith("**Eligible** on every criterion the chart can answer.")
    assert f"**Window:** closes {closes} UTC (6 h left); septic-shock onset {onset}." in detail
    assert f"- ANC 0.4 × 10⁹/L, {clock.at(builder.at.timestamp() - 2 * HOUR)}" in detail  # a key fact
    assert "**To confirm (2):**\n☐ signed consent\n☐ no chemoresistant blood cancer" in detail
    assert "**Registry status unknown** (checked 2026): ask the ICU research team" in detail
    assert "MedicationAdministration/" not in detail and "Z" not in detail.replace("ZZ", "")
    # Markdown lists are separated from the paragraph above them by a blank line (GFM renders them)
    lines = detail.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("- ") and index and not lines[index - 1].startswith("- "):
            assert lines[index - 1] == "", f"list item without a blank line before it: {line!r}"


def test_unknown_criteria_say_what_to_measure(screener: Screener, now: datetime) -> None:
    card = msc_card(screener, msc_patient(now, anc=None))
    assert card["summary"] == (
        "MSC-Neutropenia (NCT01849237) possibly eligible, registry status unknown: "
        "needs neutrophil count (last 24 h)"
    )
    assert "**Needs data (1):**\nneutrophil count (last 24 h): none charted." in card["detail"]
    assert card["indicator"] == "info"


def test_indicator_warns_only_when_eligible_for_a_recruiting_trial_and_the_window_is_closing(
    renderer: CardRenderer, screener: Screener, now: datetime
) -> None:
    trial = synthetic_trial("NCT09999990", "OPEN-TRIAL", ("shock",))  # recruiting, window 0–12 h
    closing = renderer.render(
        synthetic_result(trial, ELIGIBLE, {"shock": "MAP 58 mmHg"}, onset_hours_ago=10.5)
    )
    assert closing["indicator"] == "warning"
    assert closing["summary"].endswith("— 1 h 30 min left")
    assert "(1 h 30 min left) — closing soon" in closing["detail"]
    possibly = renderer.render(
        synthetic_result(trial, POSSIBLY, {"shock": "MAP 58 mmHg"}, onset_hours_ago=10.5, unknown=("shock",))
    )
    assert possibly["indicator"] == "info"
    # MSC's registry status is unknown (not recruiting): a closing window is no reason to alarm.
    msc_closing = msc_card(screener, msc_patient(now, onset_hours=8.5))  # 1 h 30 min left
    assert msc_closing["indicator"] == "info" and msc_closing["summary"].endswith("— 1 h 30 min left")
    for card in (closing, possibly, msc_closing):
        assert card["indicator"] != "critical"


def test_upcoming_card_says_when_the_window_opens(renderer: CardRenderer) -> None:
    trial = synthetic_trial(
        "NCT03788837", "I-MICRO", ("hypoperfusion",), window_opens=6 * HOUR, window_closes=24 * HOUR
    )
    card = renderer.render(
        synthetic_result(trial, UPCOMING, {"hypoperfusion": "CRT 5 s"}, onset_hours_ago=4), patient_id="p1"
    )
    assert card["summary"] == "I-MICRO (NCT03788837) upcoming: randomisation opens in 2 h — CRT 5 s"
    assert card["indicator"] == "info"
    assert "**Window:** opens today " in card["detail"] and "UTC (in 2 h), closes " in card["detail"]
    assert "mottling score" in card["detail"]  # the trial's note
    assert card_problems(card) == []


def test_ecmo_template_puts_vis_and_lvef_in_the_summary(renderer: CardRenderer) -> None:
    trial = synthetic_trial("NCT05184296", "ECMO-RESCUE", ("vis_over_120", "lvef_under_35"))
    facts = {"vis_over_120": "VIS 130", "lvef_under_35": "LVEF 25 %"}
    possibly = renderer.render(
        synthetic_result(trial, POSSIBLY, facts, unknown=("cardiac_index",)), patient_id="p1"
    )
    assert possibly["summary"] == "ECMO-RESCUE (NCT05184296) possibly eligible: needs Cardiac index"
    eligible = renderer.render(synthetic_result(trial, ELIGIBLE, facts, onset_hours_ago=11), patient_id="p1")
    assert eligible["summary"] == "ECMO-RESCUE (NCT05184296) eligible: VIS 130, LVEF 25 % — 1 h left"
    assert eligible["indicator"] == "warning"
    assert "ECMO team" in eligible["detail"]
    assert "- VIS 130, " in eligible["detail"] and "- LVEF 25 %, " in eligible["detail"]
    for card in (possibly, eligible):
        assert card_problems(card) == []


def test_a_trial_without_its_own_template_uses_the_default(renderer: CardRenderer) -> None:
    trial = synthetic_trial("NCT09999999", "NEW-TRIAL", ("shock",), registry_status="recruiting")
    card = renderer.render(synthetic_result(trial, ELIGIBLE, {"shock": "MAP 58 mmHg"}), patient_id="p1")
    assert card["summary"] == "NEW-TRIAL (NCT09999999) eligible: MAP 58 mmHg — 9 h left"
    assert "registry" not in card["detail"].lower()  # recruiting: nothing to say about the registry
    assert card_problems(card) == []


def test_long_summaries_drop_facts_from_the_end_and_stay_under_140(renderer: CardRenderer) -> None:
    names = tuple(f"fact_{i}" for i in range(8))
    trial = synthetic_trial("NCT09999998", "A-VERY-LONG-TRIAL-NAME-123456", names)
    facts = {name: f"measurement {i} = {i * 111} units" for i, name in enumerate(names)}
    card = renderer.render(synthetic_result(trial, ELIGIBLE, facts), patient_id="p1")
    assert len(card["summary"]) < SUMMARY_LIMIT
    assert "measurement 0 = 0 units" in card["summary"]  # the first facts are kept …
    assert "measurement 7" not in card["summary"]  # … the last ones dropped
    assert card["summary"].endswith("— 9 h left")  # the rest of the sentence stays whole


def test_fit_summary_cuts_at_a_word_when_nothing_else_helps() -> None:
    summary = fit_summary(lambda facts: "word " * 60, ["a", "b"])
    assert len(summary) < SUMMARY_LIMIT and summary.endswith("word…")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "unknown"),
        (-30, "0 min"),
        (35 * 60, "35 min"),
        (90 * 60, "1 h 30 min"),
        (2 * HOUR, "2 h"),
        (12.4 * HOUR, "12 h"),
    ],
)
def test_duration_reads_like_a_clinician_says_it(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text


# -- source, links, override reasons --------------------------------------------------------------------


def test_source_carries_the_registry_and_the_nct_topic(screener: Screener, now: datetime) -> None:
    source = msc_card(screener, msc_patient(now))["source"]
    assert source["label"] == "Septic-shock trial screening (NCT01849237)"
    assert source["url"] == "https://clinicaltrials.gov/study/NCT01849237"
    assert source["topic"] == {"system": CLINICALTRIALS_SYSTEM, "code": MSC, "display": "MSC-Neutropenia"}


def test_links_registry_absolute_and_site_app_smart_without_app_context(
    tmp_path: Path, now: datetime
) -> None:
    plain = Screener(make_settings(tmp_path))
    links = msc_card(plain, msc_patient(now))["links"]
    assert links[0] == {
        "label": "NCT01849237 on ClinicalTrials.gov",
        "url": "https://clinicaltrials.gov/study/NCT01849237",
        "type": "absolute",
    }
    assert all(link["type"] == "absolute" for link in links)  # the trial's own links follow the registry
    site = Screener(
        make_settings(
            tmp_path,
            screening={
                "site_link_url": "https://research.example.org/launch?trial={trial_id}",
                "site_link_label": "Screening app",
            },
        )
    )
    links = msc_card(site, msc_patient(now))["links"]
    assert links[-1] == {
        "label": "Screening app",
        "url": "https://research.example.org/launch?trial=NCT01849237",
        "type": "smart",
    }
    protocol = Screener(
        make_settings(
            tmp_path,
            screening={"site_link_url": "https://intranet.example.org/msc.pdf", "site_link_type": "absolute"},
        )
    )
    assert msc_card(protocol, msc_patient(now))["links"][-1]["type"] == "absolute"


def test_override_reasons_are_codings_with_displays(
    tmp_path: Path, screener: Screener, now: datetime
) -> None:
    reasons = msc_card(screener, msc_patient(now))["overrideReasons"]
    assert [(r["code"], r["display"]) for r in reasons] == [
        ("declined", "Declined by patient or family"),
        ("not-appropriate", "Not clinically appropriate"),
        ("already-screened", "Already screened for this trial"),
        ("other-trial", "Enrolled in another trial"),
    ]
    assert {r["system"] for r in reasons} == {"https://cds-service.example.org/override-reason"}
    site = Screener(
        make_settings(tmp_path, screening={"override_reason_system": "https://hospital.example/cds/override"})
    )
    assert {r["system"] for r in msc_card(site, msc_patient(now))["overrideReasons"]} == {
        "https://hospital.example/cds/override"
    }


# -- the referral suggestion ------------------------------------------------------------------------------


def test_referral_suggestion_creates_valid_fhir_resources(screener: Screener, now: datetime) -> None:
    builder = msc_patient(now)
    card = msc_card(screener, builder, user_id="Practitioner/icu-doc-1")
    assert card["selectionBehavior"] == "at-most-one"
    (suggestion,) = card["suggestions"]
    assert suggestion["label"] == "Refer to the research team"
    assert suggestion["uuid"] == referral_suggestion_uuid(card["uuid"])
    # Eligible, but the MSC trial's registry status is unknown: the referral is not pre-selected.
    assert suggestion["isRecommended"] is False
    request, subject = (action["resource"] for action in suggestion["actions"])
    assert all(action["type"] == "create" and action["description"] for action in suggestion["actions"])
    # both validate as FHIR R4 (R4B models) and are plain JSON already
    assert ServiceRequest.model_validate(request).model_dump(mode="json", exclude_none=True) == request
    assert ResearchSubject.model_validate(subject).model_dump(mode="json", exclude_none=True) == subject

    assert request["status"] == "active" and request["intent"] == "order"
    assert request["code"]["text"] == "Referral to research team for trial screening"
    assert request["category"][0]["coding"][0]["code"] == "3457005"
    assert request["subject"] == {"reference": f"Patient/{builder.patient_id}"}
    assert request["requester"] == {"reference": "Practitioner/icu-doc-1"}
    assert request["performer"] == [{"display": "ICU research team"}]
    assert request["reasonCode"][0]["coding"][0] == {
        "system": CLINICALTRIALS_SYSTEM,
        "code": MSC,
        "display": "MSC-Neutropenia",
    }
    assert MSC in request["note"][0]["text"] and card["uuid"] in request["note"][0]["text"]
    assert request["identifier"] == [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{card['uuid']}"}]
    assert request["occurrencePeriod"]["end"] == builder.time(4 - 10)  # before the window closes
    assert request["priority"] == "routine"
    assert "supportingInfo" not in request

    assert subject["status"] == "candidate"
    assert subject["study"]["identifier"] == {"system": CLINICALTRIALS_SYSTEM, "value": MSC}
    assert subject["individual"] == {"reference": f"Patient/{builder.patient_id}"}


def test_referral_follows_the_configuration(tmp_path: Path, now: datetime) -> None:
    settings = make_settings(
        tmp_path,
        screening={
            "referral_resources": ["ServiceRequest"],
            "research_team_display": "Critical-care research nurses",
            "research_team_reference": "CareTeam/icu-research",
        },
    )
    card = msc_card(Screener(settings), msc_patient(now, onset_hours=8.5), user_id="Patient/self")
    (action,) = card["suggestions"][0]["actions"]
    request = action["resource"]
    assert request["performer"] == [
        {"display": "Critical-care research nurses", "reference": "CareTeam/icu-research"}
    ]
    assert "requester" not in request  # only a Practitioner or PractitionerRole user requests
    assert request["priority"] == "routine"  # closing within 2 h, but the trial is not recruiting
    assert "Critical-care research nurses" in action["description"]
    # A recruiting trial whose window closes within 2 h: urgent, and recommended.
    renderer = CardRenderer(PROJECT_ROOT, settings.section("screening"))
    trial = synthetic_trial("NCT09999989", "OPEN-TRIAL", ("shock",))
    closing = synthetic_result(trial, ELIGIBLE, {"shock": "MAP 58 mmHg"}, onset_hours_ago=10.5)
    (suggestion,) = renderer.render(closing, patient_id="p1")["suggestions"]
    assert suggestion["isRecommended"] is True
    assert suggestion["actions"][0]["resource"]["priority"] == "urgent"


def test_possible_candidates_get_the_suggestion_without_a_recommendation(
    screener: Screener, now: datetime
) -> None:
    card = msc_card(screener, msc_patient(now, anc=None))
    (suggestion,) = card["suggestions"]
    assert suggestion["isRecommended"] is False
    request = suggestion["actions"][0]["resource"]
    assert "Needs data: an absolute neutrophil count" in request["note"][0]["text"]


def test_resources_are_validated_including_required_codes() -> None:
    trial = synthetic_trial("NCT09999997", "X", ("shock",))
    good = service_request(
        ReferralRequest("3fa85f64-5717-4562-b3fc-2c963f66afa6", "p1", trial, ELIGIBLE, AT),
        load_settings(environ={}).section("screening"),
    )
    with pytest.raises(InvalidResource, match="intent"):
        validated({**good, "intent": "suggestion"})  # fhir.resources alone accepts any code
    with pytest.raises(InvalidResource, match="subject"):
        validated({k: v for k, v in good.items() if k != "subject"})
    with pytest.raises(InvalidResource, match="occurrencePeriod"):
        validated({**good, "occurrencePeriod": {"end": "tomorrow"}})
    with pytest.raises(InvalidResource, match="resourceType"):
        validated({"resourceType": "Basic"})


def test_suggestion_uuid_is_stable_and_distinct_per_card() -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    assert referral_suggestion_uuid(first) == referral_suggestion_uuid(first)
    assert referral_suggestion_uuid(first) != referral_suggestion_uuid(second)
    uuid.UUID(referral_suggestion_uuid(first))


def test_without_a_patient_id_there_is_no_suggestion(renderer: CardRenderer) -> None:
    trial = synthetic_trial("NCT09999996", "X", ("shock",))
    card = renderer.render(synthetic_result(trial, ELIGIBLE, {"shock": "MAP 58 mmHg"}))
    assert "suggestions" not in card and "selectionBehavior" not in card
    assert card_problems(card) == []


# -- templates --------------------------------------------------------------------------------------------


def _data_dir(tmp_path: Path) -> Path:
    shutil.copytree(PROJECT_ROOT / "cards", tmp_path / "cards")
    return tmp_path


def test_a_broken_trial_template_is_reported_with_its_file(tmp_path: Path) -> None:
    data_dir = _data_dir(tmp_path)
    (data_dir / "cards" / "NCT09999995.yaml").write_text("summary:\n  eligible: '{{ trial.id'\n")
    with pytest.raises(DataFileError, match=r"NCT09999995\.yaml"):
        CardRenderer(data_dir, load_settings(environ={}).section("screening"))


def test_a_trial_template_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    data_dir = _data_dir(tmp_path)
    (data_dir / "cards" / "NCT09999994.yaml").write_text("sumary:\n  eligible: x\n")
    with pytest.raises(DataFileError, match="sumary"):
        CardRenderer(data_dir, load_settings(environ={}).section("screening"))


def test_a_template_failing_at_render_time_falls_back_to_the_default_wording(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = _data_dir(tmp_path)
    (data_dir / "cards" / "NCT09999993.yaml").write_text("summary:\n  eligible: '{{ trail.short_name }}'\n")
    renderer = CardRenderer(data_dir, load_settings(environ={}).section("screening"))
    trial = synthetic_trial("NCT09999993", "TYPO", ("shock",))
    with caplog.at_level(logging.ERROR, logger="cds_service.cards.render"):
        card = renderer.render(synthetic_result(trial, ELIGIBLE, {"shock": "MAP 58 mmHg"}), patient_id="p1")
    assert card["summary"].startswith("TYPO (NCT09999993) eligible: MAP 58 mmHg")
    assert "NCT09999993" in caplog.text
    assert card_problems(card) == []


def test_every_shipped_template_renders_every_status(renderer: CardRenderer) -> None:
    for path in sorted((PROJECT_ROOT / "cards").glob("NCT*.yaml")):
        trial = synthetic_trial(
            path.stem, "SHORT", ("shock",), window_opens=6 * HOUR, window_closes=24 * HOUR
        )
        for status, hours in ((ELIGIBLE, 23.5), (POSSIBLY, 8), (UPCOMING, 2)):
            unknown = ("cardiac_index",) if status == POSSIBLY else ()
            result = synthetic_result(
                trial, status, {"shock": "MAP 58 mmHg"}, onset_hours_ago=hours, unknown=unknown
            )
            card = renderer.render(result, patient_id="p1")
            assert card_problems(card) == [], (path.name, status)
            assert path.stem in card["summary"], (path.name, status)


# -- the card rules themselves ------------------------------------------------------------------------------


def test_card_rules_catch_what_the_spec_forbids(screener: Screener, now: datetime) -> None:
    good = msc_card(screener, msc_patient(now))
    suggestion = good["suggestions"][0]

    def broken(**changes: Any) -> list[str]:
        return card_problems({**good, **changes})

    assert any("not a CDS Hooks card field" in p for p in broken(sumary="x"))
    assert any("one line" in p for p in broken(summary="two\nlines"))
    assert any(
        "uuid: required" in p
        for p in broken(suggestions=[{k: v for k, v in suggestion.items() if k != "uuid"}])
    )
    assert any("isRecommended" in p for p in broken(suggestions=[{**suggestion, "isRecommended": "yes"}]))
    recommended = {**suggestion, "isRecommended": True}
    twice = [recommended, {**recommended, "uuid": str(uuid.uuid4())}]
    assert any("more than one isRecommended" in p for p in broken(suggestions=twice))
    assert any(
        "duplicate" in p for p in broken(suggestions=[suggestion, {**suggestion, "isRecommended": False}])
    )
    assert any(
        "resourceId" in p
        for p in broken(suggestions=[{**suggestion, "actions": [{"type": "delete", "description": "x"}]}])
    )
    no_type = {**suggestion, "actions": [{"type": "create", "description": "x", "resource": {"id": "1"}}]}
    assert any("resourceType" in p for p in broken(suggestions=[no_type]))
    assert any("appContext" in p for p in broken(links=[{**good["links"][0], "appContext": "x"}]))
    assert any("selectionBehavior" in p for p in broken(selectionBehavior="all"))
    assert any("display" in p for p in broken(overrideReasons=[{"code": "x"}]))
    without_uuid = {k: v for k, v in good.items() if k != "uuid"}
    assert any("uuid: required" in p for p in card_problems(without_uuid))
    assert any("source.url" in p for p in broken(source={**good["source"], "url": "clinicaltrials.gov"}))
    assert any(
        "duplicate suggestion uuid" in p
        for p in response_problems({"cards": [good, {**good, "uuid": str(uuid.uuid4())}]})
    )


def test_hook_responses_carry_complete_cards(client: FlaskClient, now: datetime) -> None:
    """Through HTTP (the CardCheckingClient checks every response against the card rules)."""
    body = hook_body(msc_patient(now))
    cards = client.post(SERVICE_URL, json=body).get_json()["cards"]
    (card,) = [c for c in cards if c["source"]["topic"]["code"] == MSC]
    assert {"uuid", "summary", "detail", "indicator", "source", "suggestions", "selectionBehavior"} <= set(
        card
    )
    assert {"overrideReasons", "links"} <= set(card)
    request = card["suggestions"][0]["actions"][0]["resource"]
    assert request["requester"] == {"reference": body["context"]["userId"]}


def test_every_scenario_card_follows_the_rules_and_its_resources_validate(screener: Screener) -> None:
    """The shipped scenario patients (all three trials): every card, every suggested resource."""
    from cds_service.tools import scenarios

    models = {"ServiceRequest": ServiceRequest, "ResearchSubject": ResearchSubject}
    seen: set[tuple[str, str]] = set()
    for scenario in scenarios.all_scenarios(scenarios.EXAMPLES_AT):
        for card in screen(screener, scenario.builder, user_id="Practitioner/icu-doc-1"):
            assert card_problems(card) == [], (scenario.name, card["summary"])
            seen.add((card["source"]["topic"]["code"], card["indicator"]))
            for action in card["suggestions"][0]["actions"]:
                resource = action["resource"]
                model = models[resource["resourceType"]]
                assert model.model_validate(resource).model_dump(mode="json", exclude_none=True) == resource
    assert {trial for trial, _ in seen} == {MSC, "NCT03788837", "NCT05184296"}


def test_upcoming_ecmo_card_lists_what_the_window_waits_for(screener: Screener) -> None:
    """ECMO-RESCUE needs VIS > 120 for more than 5 h: while that clock runs, the card says so."""
    from cds_service.tools.scenarios import all_scenarios

    at = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    (scenario,) = [s for s in all_scenarios(at) if s.name == "ecmo-upcoming"]
    builder = scenario.builder
    outcome = screener.screen(
        builder.patient_id, RawPatientData(builder.patient, {"all": builder.resources}), at.timestamp()
    )
    cards = {result.trial.id: card for result, card in screener.cards(outcome)}
    detail = cards["NCT05184296"]["detail"]
    assert "- VIS > 120 for 2.5 h so far: met today 14:30 if it goes on" in detail
    assert "**Window:** opens today 14:30 UTC (in 2 h 30 min), closes tomorrow 02:30." in detail
