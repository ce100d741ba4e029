"""Cards a clinician reads in five seconds, with a machine-readable screening result ([cards-ux]).

Every rule is checked on EVERY shipped scenario (all three trials, every card they give), in UTC and
in a zone with an offset: the detail's length, no resource ids, the character allow-list, no
internal names, local times, the one card order, "needs data" showing what is charted, trials that
are not recruiting, and the ``extension.screening`` contract. Then the pieces one by one.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import zoneinfo
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cds_service.base.config import PROJECT_ROOT, ConfigError, load_settings
from cds_service.base.datafiles import DataFileError
from cds_service.cards.extension import RESULTS
from cds_service.cards.render import (
    DETAIL_LIMIT,
    SUMMARY_LIMIT,
    CardRenderer,
    card_order,
    fit_detail,
)
from cds_service.cards.text import ISO_INSTANT, RESOURCE_ID, LocalClock, clean, disallowed
from cds_service.clinical.evaluation import ELIGIBLE, POSSIBLY, UPCOMING, TrialResult
from cds_service.knowledge.criteria_language import UNKNOWN
from cds_service.patient_data.gather import RawPatientData
from cds_service.screening import Screener
from cds_service.tools.card_rules import card_problems, screening_extension_problems
from cds_service.tools.scenarios import ECMO, EXAMPLES_AT, IMICRO, MSC, Scenario, all_scenarios
from tests.test_cards import HOUR, synthetic_result, synthetic_trial

SCENARIOS = {s.name: s for s in all_scenarios(EXAMPLES_AT)}
ZONES = ("UTC", "America/Chicago")
#: Phrases a trial that is not recruiting must carry in its summary.
NOT_RECRUITING = {"completed": "enrollment closed per registry", "unknown": "registry status unknown"}


@pytest.fixture(scope="module")
def screeners() -> dict[str, Screener]:
    return {
        zone: Screener(load_settings(environ={}, overrides={"screening": {"timezone": zone}}))
        for zone in ZONES
    }


def screened(screener: Screener, scenario: Scenario) -> list[tuple[TrialResult, dict[str, Any]]]:
    b = scenario.builder
    outcome = screener.screen(
        b.patient_id, RawPatientData(b.patient, {"all": b.resources}), EXAMPLES_AT.timestamp()
    )
    return screener.cards(outcome, user_id="Practitioner/icu-doc-1")


def internal_names(screener: Screener) -> set[str]:
    """Names that exist for the code only: value-set and input keys, criterion ids (snake_case)."""
    knowledge = screener.knowledge
    names = {*knowledge.value_sets, *knowledge.inputs, "septic_shock_onset", "age_years", "body_weight"}
    names |= {c.id for t in screener.trials for c in t.criteria}
    multiword = {n for n in names if "_" in n}
    # A value set's key with spaces is internal unless its description says the same ("hiv aids" is,
    # "septic shock" is plain English).
    spaced = {
        n.replace("_", " ")
        for n, vs in knowledge.value_sets.items()
        if "_" in n and n.replace("_", " ") not in vs.description.lower()
    }
    return multiword | spaced | {"derived:"}


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_card_of_every_scenario_reads_in_five_seconds(
    screeners: dict[str, Screener], name: str, zone: str
) -> None:
    screener = screeners[zone]
    scenario = SCENARIOS[name]
    cards = screened(screener, scenario)
    ids = {e["resource"]["id"] for e in scenario.bundle()["entry"]}
    internal = internal_names(screener)
    clock_zone = zoneinfo.ZoneInfo(zone)
    for result, card in cards:
        where = (name, result.trial.id)
        summary, detail = card["summary"], card["detail"]
        texts = [summary, detail, card["source"]["label"], *(link["label"] for link in card["links"])]
        texts += [s["label"] for s in card.get("suggestions", [])]
        assert card_problems(card) == [], where
        # length
        assert len(summary) < SUMMARY_LIMIT and "\n" not in summary, where
        assert len(detail) <= DETAIL_LIMIT, (where, len(detail), detail)
        # Markdown: the key facts are the only list; no other line starts like a list item.
        assert not [line for line in detail.splitlines() if re.match(r"^\s*([+*]|\d+\.) ", line)], where
        assert len([line for line in detail.splitlines() if line.startswith("- ")]) <= 3, where
        for text in texts:
            # the character allow-list (no emoji, whatever the font)
            assert disallowed(text) == [], (where, disallowed(text), text)
            # no raw resource ids, no patient or resource id of this chart
            assert not RESOURCE_ID.search(text), (where, text)
            assert not [i for i in ids if i in text], (where, text)
            # no internal names
            assert not [n for n in internal if n in text], (where, [n for n in internal if n in text])
            # local times only (no ISO 8601 instants)
            assert not ISO_INSTANT.search(text) and not re.search(r"\d{2}:\d{2}Z", text), (where, text)
        # the window in local time, with the zone named
        clock = LocalClock(clock_zone, result.at)
        shown = result.window_opens_at if result.status == UPCOMING else result.window_closes_at
        if shown is not None:
            assert f"{clock.at(shown)} {clock.zone_label}" in detail, (where, detail)
        # the extension
        assert screening_extension_problems(card) == [], where
        extension = card["extension"]["screening"]
        assert extension["trial"] == result.trial.id and extension["status"] == result.status
        assert [c["id"] for c in extension["criteria"]] == [c.id for c in result.trial.criteria]
        assert [c["result"] for c in extension["criteria"]] == [RESULTS[r.status] for r in result.results]
        assert {e["resource"] for c in extension["criteria"] for e in c["evidence"]} - {None} <= {
            f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in scenario.bundle()["entry"]
        }
        # "needs data" shows what is charted
        for r in result.unknown:
            charted = [e for e in r.evidence if e.time is not None]
            if charted:
                assert clean(charted[0].text) in detail, (where, r.criterion.id, detail)
        # not recruiting: said in the summary, never a recommended referral, never a warning
        if not result.trial.recruiting:
            assert NOT_RECRUITING[result.trial.registry_status] in summary, where
            assert card["suggestions"][0]["isRecommended"] is False, where
            assert card["indicator"] == "info", where
        else:
            assert "registry" not in summary, where
    # one order: eligible, possibly, upcoming; recruiting first; the window closing first
    keys = [card_order(result) for result, _ in cards]
    assert keys == sorted(keys), (name, keys)
    assert [c["extension"]["screening"]["trial"] for _, c in cards] == [r.trial.id for r, _ in cards]


def test_the_order_puts_the_recruiting_eligible_trial_first() -> None:
    """The issue's example: an ECMO-eligible patient also "eligible" for the completed I-MICRO."""
    screener = Screener(load_settings(environ={}))
    cards = [c for _, c in screened(screener, SCENARIOS["ecmo-eligible"])]
    assert [c["extension"]["screening"]["trial"] for c in cards] == [ECMO, IMICRO]
    assert cards[0]["suggestions"][0]["isRecommended"] is True
    assert cards[1]["suggestions"][0]["isRecommended"] is False
    # Possibly eligible for the recruiting trial still comes after eligible for a closed one.
    cards = [c for _, c in screened(screener, SCENARIOS["ecmo-lvef-missing"])]
    assert [(c["extension"]["screening"]["trial"], c["extension"]["screening"]["status"]) for c in cards] == [
        (IMICRO, ELIGIBLE),
        (ECMO, POSSIBLY),
    ]


def test_card_order_keys() -> None:
    def result(status: str, registry: str, closes_in: float | None, trial_id: str) -> TrialResult:
        trial = synthetic_trial(trial_id, trial_id[-4:], (), registry_status=registry)
        base = synthetic_result(trial, status, {}, onset_hours_ago=1)
        closes = None if closes_in is None else base.at + closes_in * HOUR
        return TrialResult(trial, status, base.at, base.results, base.onset, base.window_opens_at, closes)

    results = [
        result(UPCOMING, "recruiting", 2, "NCT00000001"),
        result(POSSIBLY, "recruiting", 1, "NCT00000002"),
        result(ELIGIBLE, "unknown", 1, "NCT00000003"),
        result(ELIGIBLE, "recruiting", 9, "NCT00000004"),
        result(ELIGIBLE, "recruiting", 3, "NCT00000005"),
        result(ELIGIBLE, "recruiting", None, "NCT00000006"),
        result(ELIGIBLE, "completed", 0.5, "NCT00000007"),
    ]
    ordered = [r.trial.id[-1] for r in sorted(results, key=card_order)]
    assert ordered == ["5", "4", "6", "7", "3", "2", "1"]


# -- trials that are not recruiting -------------------------------------------------------------------


def test_a_site_can_hide_cards_of_trials_not_recruiting(tmp_path: Path) -> None:
    shown = Screener(load_settings(environ={}))
    hidden = Screener(load_settings(environ={}, overrides={"screening": {"show_not_recruiting": False}}))
    assert load_settings(environ={}).section("screening")["show_not_recruiting"] is True  # the default
    trials_seen = set()
    for scenario in SCENARIOS.values():
        with_all = [c for _, c in screened(shown, scenario)]
        recruiting_only = [c for _, c in screened(hidden, scenario)]
        trials_seen |= {c["extension"]["screening"]["trial"] for c in with_all}
        assert [c["extension"]["screening"]["trial"] for c in recruiting_only] == [
            c["extension"]["screening"]["trial"]
            for c in with_all
            if c["extension"]["screening"]["trial"] == ECMO
        ], scenario.name
    assert trials_seen == {ECMO, IMICRO, MSC}  # the default shows all three
    env = load_settings(environ={"CDS_SCREENING_SHOW_NOT_RECRUITING": "false"})
    assert env.section("screening")["show_not_recruiting"] is False


def test_health_lists_the_trials_whose_cards_are_hidden(tmp_path: Path) -> None:
    from cds_service.app import create_app
    from tests.conftest import make_settings

    for show, hidden in ((True, []), (False, [MSC, IMICRO])):
        app = create_app(make_settings(tmp_path, screening={"show_not_recruiting": show}))
        body = app.test_client().get("/health").get_json()
        assert sorted(body["cards_hidden"]) == sorted(hidden)
        assert len(body["trials"]) == 3


# -- needs data, local times ---------------------------------------------------------------------------


def test_needs_data_shows_the_charted_capillary_refill() -> None:
    """The issue's example: a refill of 2 s charted an hour ago is shown, and the mottling is asked for."""
    screener = Screener(load_settings(environ={}, overrides={"screening": {"timezone": "Europe/Paris"}}))
    (card,) = [c for r, c in screened(screener, SCENARIOS["imicro-refill-normal-mottling-missing"])]
    assert card["extension"]["screening"]["status"] == "possibly_eligible"
    assert card["summary"].endswith("needs mottling score within the last 6h")  # what is still missing
    # 12:00Z is 13:00 in Paris (CET): the refill charted at 11:00Z reads "today 12:00".
    assert "capillary refill 2 s (not > 3 s), today 12:00" in card["detail"]
    assert "not charted: mottling score within the last 6h" in card["detail"]
    assert "**Window:** closes tomorrow 01:00 CET (12 h left)" in card["detail"]


def test_local_clock_reads_like_a_clinician() -> None:
    now = datetime(2026, 3, 28, 23, 30, tzinfo=UTC).timestamp()  # Sunday 00:30 in Paris (CET, +1)
    paris = LocalClock("Europe/Paris", now)
    assert paris.zone_label == "CET"
    assert paris.at(now) == "today 00:30"
    assert paris.at(now - 3600) == "yesterday 23:30"
    assert paris.at(now + 5 * 3600) == "today 06:30"  # the clocks went forward at 02:00 (CEST)
    assert paris.at(now + 24 * 3600) == "tomorrow 01:30"
    assert paris.at(now + 9 * 86400) == "7 Apr 01:30"
    assert paris.at(now - 400 * 86400) == "22 Feb 2025 00:30"
    assert paris.relative(now + 3 * 3600 + 600) == "in 3 h 10 min"
    assert paris.relative(now - 7200) == "2 h ago" and paris.relative(now + 20) == "now"
    assert LocalClock("UTC", now).at(now) == "today 23:30"
    assert paris.at_text("2026-03-28T22:00Z") == "yesterday 23:00"


def test_the_time_zone_setting_is_validated() -> None:
    assert load_settings(environ={}).section("screening")["timezone"] == "UTC"
    with pytest.raises(ConfigError, match=r"screening.timezone: unknown IANA time zone 'Mars/Olympus'"):
        load_settings(environ={}, overrides={"screening": {"timezone": "Mars/Olympus"}})
    assert load_settings(environ={"CDS_SCREENING_TIMEZONE": "Asia/Kolkata"}).section("screening")["timezone"]


def test_time_zones_resolve_without_the_system_database() -> None:
    """tzdata (a dependency) carries the IANA database: slim images have no /usr/share/zoneinfo."""
    assert metadata.version("tzdata")
    try:
        zoneinfo.reset_tzpath(to=[])
        zoneinfo.ZoneInfo.clear_cache()
        assert datetime(2026, 7, 1, tzinfo=zoneinfo.ZoneInfo("America/Chicago")).tzname() == "CDT"
    finally:
        zoneinfo.reset_tzpath()
        zoneinfo.ZoneInfo.clear_cache()


# -- characters and ids ------------------------------------------------------------------------------


def test_the_allow_list() -> None:
    assert disallowed("ANC 0.4 × 10⁹/L ≤ 1 — 37 °C, 5 µg/kg/min → ☐ consent; Hôpitaux “AP-HP”…") == []
    assert disallowed("✅ ❔ ⏳ 🫀 ≠ μ Łódź 中") == ["✅", "❔", "⏳", "🫀", "≠", "μ", "Ł", "ź", "中"]
    assert clean("✅ ok ❔ — 5 μg ≠ 3 ǎ; Łódź, Győr 中") == " ok  — 5 µg other than 3 a; Lódz, Gyor "
    assert (
        clean("VIS 130 (norepinephrine 0.9 ug/kg/min), 4 mcg/min")
        == "VIS 130 (norepinephrine 0.9 µg/kg/min), 4 µg/min"
    )
    text = "norepinephrine started (MedicationAdministration/7b3a-1, Observation/x.2); see Condition/c-9"
    assert clean(text) == "norepinephrine started; see Condition"
    clock = LocalClock("UTC", datetime(2026, 11, 21, 12, tzinfo=UTC).timestamp())
    assert (
        clean("septic shock charted (onset 2026-11-21T04:00Z)", clock)
        == "septic shock charted (onset today 04:00)"
    )


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "Observation/",
                "Condition/c-9",
                "a.2",
                "ug/",
                "mcg",
                "/",
                "(",
                ")",
                ", ",
                " ",
                "kg",
                "T",
                "2026-11-21",
                "T04:00",
                ":00",
                "Z",
                "+01:00",
                "2026-11-21T04:00+01:00",
                "2026-11-21T04:00Z",
                "-",
                "μ",
                "✅",
                "中",
                "\n",
            ]
        ),
        max_size=14,
    ).map("".join)
)
def test_clean_skips_only_the_patterns_that_cannot_match(text: str) -> None:
    """``clean`` skips a pattern when the text lacks a character it needs ('/', 'T'): the same text
    as applying every pattern (what it did before)."""
    from cds_service.cards import text as card_text

    clock = LocalClock("UTC", datetime(2026, 11, 21, 12, tzinfo=UTC).timestamp())
    every = card_text._RESOURCE_LIST.sub("", text)
    every = card_text._MICROGRAM.sub("µg", every)
    every = RESOURCE_ID.sub(lambda match: match.group(0).split("/", 1)[0], every)
    without_clock = card_text._OUTSIDE.sub(card_text._replacement, every)
    every = ISO_INSTANT.sub(lambda match: clock.at_text(match.group(0)), every)
    assert clean(text, clock) == card_text._OUTSIDE.sub(card_text._replacement, every)
    assert clean(text) == without_clock


def _data_dir(tmp_path: Path) -> Path:
    shutil.copytree(PROJECT_ROOT / "cards", tmp_path / "cards")
    return tmp_path


def test_texts_fixed_for_a_trial_are_rendered_once_and_the_others_for_every_card(tmp_path: Path) -> None:
    """The shipped labels, note and registry phrase read only what is fixed for a trial: rendered once
    per trial, the same on every card. A site's text that reads the card's status or the hook's
    clock is rendered for each card."""
    screening = load_settings(environ={}).section("screening")
    shipped = CardRenderer(PROJECT_ROOT, screening)
    fixed = {"note", "registry_phrase", "source_label", "registry_link_label", "referral_label"}
    assert all(t.fixed_for_a_trial == fixed for t in shipped._compiled.values())
    trial = synthetic_trial("NCT09999993", "SITE", ("vis",))
    eligible = synthetic_result(trial, ELIGIBLE, {"vis": "VIS 130"})
    possibly = synthetic_result(trial, POSSIBLY, {"vis": "VIS 130"}, unknown=("cardiac_index",))
    first, second = shipped.render(eligible), shipped.render(possibly)
    assert (
        first["source"]["label"] == second["source"]["label"] == "Septic-shock trial screening (NCT09999993)"
    )

    data_dir = _data_dir(tmp_path)
    (data_dir / "cards" / "NCT09999993.yaml").write_text(
        "source_label: '{{ trial.short_name }}: {{ status }}'\n"
        "registry_link_label: '{{ trial.id }} ({{ trial.registry_status }})'\n"
        "note: 'Screened {{ evaluated_at | at }}.'\n",
        encoding="utf-8",
    )
    site = CardRenderer(data_dir, screening)
    assert site.templates_for(trial.id).fixed_for_a_trial == fixed - {"source_label", "note"}
    labels = [site.render(result)["source"]["label"] for result in (eligible, possibly, eligible)]
    assert labels == ["SITE: eligible", "SITE: possibly_eligible", "SITE: eligible"]
    later = synthetic_result(trial, ELIGIBLE, {"vis": "VIS 130"})
    later = dataclasses.replace(later, at=later.at + 30 * HOUR)
    details = [site.render(result)["detail"] for result in (eligible, later)]
    notes = [line for detail in details for line in detail.splitlines() if line.startswith("Screened ")]
    assert len(notes) == 2 and notes[0] != notes[1], notes
    # Another trial object with the same id (a reloaded trial file) is rendered again.
    closed = dataclasses.replace(trial, registry_status="completed")
    assert site.render(synthetic_result(closed, ELIGIBLE, {"vis": "VIS 130"}))["links"][0]["label"] == (
        "NCT09999993 (completed)"
    )


def test_card_wording_outside_the_allow_list_stops_the_start_up(tmp_path: Path) -> None:
    data_dir = _data_dir(tmp_path)
    (data_dir / "cards" / "NCT09999992.yaml").write_text("note: 'Eligible ✅'\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"NCT09999992\.yaml.*note.*U\+2705"):
        CardRenderer(data_dir, load_settings(environ={}).section("screening"))


def test_card_labels_must_name_criteria_of_the_trial(tmp_path: Path) -> None:
    screener = Screener(load_settings(environ={}))
    data_dir = _data_dir(tmp_path)
    path = data_dir / "cards" / f"{MSC}.yaml"
    path.write_text(path.read_text() + "  severe_neutropenai: {needs: ANC}\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"criteria\.severe_neutropenai.*no criterion"):
        CardRenderer(data_dir, load_settings(environ={}).section("screening"), screener.trials)
    with pytest.raises(DataFileError, match=r"max ?length"):
        path.write_text("criteria:\n  severe_neutropenia: {needs: '" + "x" * 80 + "'}\n", encoding="utf-8")
        CardRenderer(data_dir, load_settings(environ={}).section("screening"), screener.trials)


def test_shipped_trial_texts_need_no_cleaning() -> None:
    """Trial files and labels use the allow-list themselves: the cleaner is for chart data only."""
    screener = Screener(load_settings(environ={}))
    for trial in screener.trials:
        for text in (trial.short_name, trial.title, *(c.text for c in trial.criteria)):
            assert disallowed(text) == [], (trial.id, text)
        for c in trial.criteria:
            assert disallowed(c.confirm or "") == [], (trial.id, c.id)


# -- the 700 characters, the checklist and the worksheet -----------------------------------------------


def crowded_result(checklist: int = 30, unknown: int = 12) -> TrialResult:
    from cds_service.clinical.derived import Evidence
    from cds_service.clinical.evaluation import CriterionResult
    from cds_service.knowledge.trials import Criterion

    confirm = tuple(
        Criterion(
            f"item_{i}",
            f"Item {i}",
            "s",
            "exclusion",
            None,
            f"A long bedside item number {i} to confirm",
            None,
        )
        for i in range(checklist)
    )
    computed = tuple(
        Criterion(
            f"lab_{i}",
            f"Laboratory value number {i} within range",
            "s",
            "inclusion",
            {"value": {}},
            None,
            None,
        )
        for i in range(unknown)
    )
    trial = synthetic_trial("NCT09999980", "CROWDED", (), inclusion=computed, exclusion=confirm)
    base = synthetic_result(trial, POSSIBLY, {})
    results = tuple(
        CriterionResult(
            c,
            UNKNOWN,
            (Evidence(f"lab {i} charted 12.3 units", base.at - HOUR, ("Observation/o1",)),),
            ("x",),
            "",
            gaps=(f"lab {i} within the last 24h",),
        )
        for i, c in enumerate(computed)
    ) + tuple(r for r in base.results if r.criterion.confirm)
    return TrialResult(
        trial, POSSIBLY, base.at, results, base.onset, base.window_opens_at, base.window_closes_at
    )


def test_a_crowded_card_still_fits_and_counts_what_it_leaves_out() -> None:
    renderer = CardRenderer(PROJECT_ROOT, load_settings(environ={}).section("screening"))
    card = renderer.render(crowded_result(), patient_id="p1")
    detail = card["detail"]
    assert len(detail) <= DETAIL_LIMIT, len(detail)
    assert "**Needs data (12):**" in detail and "**To confirm (30):**" in detail
    assert re.search(r"\(\d+ more not shown\.\)", detail) and re.search(r"\(\d+ more not shown\)", detail)
    # Only the key facts are a Markdown list: no other line may start like a list item.
    assert not [line for line in detail.splitlines() if re.match(r"^\s*[-+*] ", line)]
    assert card_problems(card) == [] and len(card["summary"]) < SUMMARY_LIMIT


def test_a_site_template_that_ignores_the_limits_is_cut_at_a_paragraph() -> None:
    detail = fit_detail(lambda limits: "\n\n".join(f"Paragraph {i} " + "word " * 20 for i in range(20)))
    assert len(detail) <= DETAIL_LIMIT and detail.endswith("\n\n…")


def test_with_the_worksheet_the_card_carries_the_count_only() -> None:
    screening = load_settings(environ={}).section("screening")
    result = crowded_result(checklist=11, unknown=1)
    inline = CardRenderer(PROJECT_ROOT, screening).render(result)["detail"]
    counted = CardRenderer(PROJECT_ROOT, screening, worksheet_enabled=True).render(result)["detail"]
    assert "☐ A long bedside item number 0" in inline
    assert "**To confirm (11)** in the screening worksheet." in counted and "☐" not in counted
    # The [worksheet] issue turns it on with a `worksheet.enabled` setting; until then it is off.
    assert Screener(load_settings(environ={})).renderer.worksheet_enabled is False
