"""Scenario patients: clinical stories as FHIR Bundles, each with the expected result per trial.

Every scenario is built relative to an evaluation time ``at`` (``PatientBuilder`` takes hours
*before* it), so the same story can be replayed now against a live service, or written once to a
file (``examples/scenarios/*.json``) and evaluated later with ``cds-service evaluate --at``.
Patient ids all start with ``cdsh-`` so that they cannot collide with real patients.

The expected results state, for all three seed trials, what the criteria in ``trials/`` must give:
``eligible`` / ``possibly_eligible`` / ``upcoming`` (a card) or ``not_eligible`` / ``window_closed``
(no card). A card's outcome is read from its machine-readable ``extension.screening`` (status, and
the criteria results a scenario names in ``expectedCriteria``), never from its English text. The
test suite runs every scenario in memory, through the HTTP hook with prefetch, and through the hook
against a real FHIR server without prefetch; the integration harness runs them against a deployment.

Scenario file format (documented in docs/trials.md, "Scenario files")::

    {"name": ..., "story": ..., "evaluatedAt": "<ISO UTC>",
     "expected": {"NCT…": "eligible" | "possibly_eligible" | "upcoming" | "not_eligible" | "window_closed"},
     "expectedCriteria": {"NCT…": {"<criterion id>": "met" | "not_met" | "unknown" | "to_confirm"}},
     "bundle": <transaction Bundle of PUTs>}

``expectedCriteria`` is optional, and only for trials expected to give a card.

``python -m cds_service.tools.scenarios examples`` regenerates ``examples/`` at the fixed time ``EXAMPLES_AT``
(``--help`` lists the other commands; without a command nothing is written).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import requests

from ..base.config import PROJECT_ROOT
from .scenario_builder import ICD10CM, SNOMED, PatientBuilder, iso

ECMO = "NCT05184296"
IMICRO = "NCT03788837"
MSC = "NCT01849237"
TRIAL_NAMES = {ECMO: "ECMO-RESCUE", IMICRO: "I-MICRO", MSC: "MSC-Neutropenia"}
STATUSES = ("eligible", "possibly_eligible", "upcoming", "not_eligible", "window_closed")
CARD_STATUSES = ("eligible", "possibly_eligible", "upcoming")
CRITERION_RESULTS = ("met", "not_met", "unknown", "to_confirm")
ID_PREFIX = "cdsh-"
SITE_CODES = "urn:cds-service:site-codes"
#: The evaluation time of the shipped examples (``cds-service evaluate --at`` must use it).
EXAMPLES_AT = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
EXAMPLES_DIR = PROJECT_ROOT / "examples"


@dataclass
class Scenario:
    """One clinical story: the patient's data and the expected result per trial (NCT id → status)."""

    name: str
    story: str
    expected: dict[str, str]
    builder: PatientBuilder
    #: NCT id → criterion id → result in the card's extension (met, not_met, unknown, to_confirm).
    expected_criteria: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def patient_id(self) -> str:
        return self.builder.patient_id

    def bundle(self) -> dict[str, Any]:
        """A transaction Bundle of PUTs (loading it twice changes nothing)."""
        return self.builder.transaction()

    def document(self) -> dict[str, Any]:
        """The scenario file content (see the module docstring)."""
        document: dict[str, Any] = {
            "name": self.name,
            "story": self.story,
            "evaluatedAt": iso(self.builder.at),
            "expected": dict(self.expected),
        }
        if self.expected_criteria:
            document["expectedCriteria"] = {k: dict(v) for k, v in self.expected_criteria.items()}
        document["bundle"] = self.bundle()
        return document


# -- building blocks ------------------------------------------------------------------------------


def _patient(name: str, at: datetime, *, age: int = 60, gender: str = "male") -> PatientBuilder:
    return PatientBuilder(f"{ID_PREFIX}{name}", at, age=age, gender=gender)


def _septic_shock(
    b: PatientBuilder,
    onset: float,
    *,
    rate: float = 0.25,
    unit: str = "ug/kg/min",
    weight: float | None = 80.0,
    lactate: float = 4.2,
    lactate_mg_dl: bool = False,
    norepinephrine_code: str = "7512",
    until: float | None = None,
) -> None:
    """Sepsis diagnosed 3 h before the first norepinephrine (started ``onset`` hours ago, running
    unless ``until``), lactate high 30 min before it: the septic-shock onset is ``onset`` h ago."""
    if weight is not None:
        b.weight(weight, hours=onset + 20)
    b.condition(ICD10CM, "A41.9", "Sepsis, unspecified organism", onset + 3)
    b.lactate(lactate, hours=onset + 0.5, mg_dl=lactate_mg_dl)
    display = "norepinephrine bitartrate" if norepinephrine_code == "242969" else "norepinephrine"
    b.norepinephrine(rate, unit, start=onset, end=until, code=norepinephrine_code, display=display)


def _refractory_shock(
    b: PatientBuilder,
    onset: float,
    high_dose_from: float,
    *,
    unit: str = "ug/kg/min",
    weight: float | None = 80.0,
    norepinephrine_code: str = "7512",
    map_values: bool = True,
) -> None:
    """Septic shock from ``onset`` h ago on norepinephrine 0.3 µg/kg/min; from ``high_dose_from`` h ago
    norepinephrine 0.9 + epinephrine 0.4 µg/kg/min (VIS 130), MAP 58 mmHg charted hourly since then."""
    per_minute = unit == "ug/min"
    scale = (weight or 80.0) if per_minute else 1.0
    _septic_shock(
        b,
        onset,
        rate=round(0.3 * scale, 3),
        unit=unit,
        weight=weight,
        norepinephrine_code=norepinephrine_code,
        until=high_dose_from,
    )
    display = "norepinephrine bitartrate" if norepinephrine_code == "242969" else "norepinephrine"
    b.norepinephrine(
        round(0.9 * scale, 3), unit, start=high_dose_from, code=norepinephrine_code, display=display
    )
    b.infusion("3992", "epinephrine", round(0.4 * scale, 3), unit, start=high_dose_from)
    if map_values:
        _hourly(b, high_dose_from, lambda h: b.map(58, hours=h))


def _hourly(b: PatientBuilder, since: float, chart: Callable[[float], None], last: float = 0.5) -> None:
    """Chart something every hour from ``since`` hours ago to ``last`` hours ago."""
    hours = since
    while hours >= last - 1e-9:
        chart(hours)
        hours -= 1.0


def _mottling(b: PatientBuilder, score: float, hours: float) -> None:
    b.observation(
        "mottling-score",
        score,
        "{score}",
        hours,
        system=SITE_CODES,
        display="Skin mottling score",
        category="exam",
    )


def _capillary_refill(b: PatientBuilder, seconds: float, hours: float) -> None:
    b.observation(
        "44963-7", seconds, "s", hours, display="Capillary refill [Time] of Nail bed", category="exam"
    )


def _platelets(b: PatientBuilder, value: float, hours: float, unit: str = "10*3/uL") -> None:
    b.observation("777-3", value, unit, hours, display="Platelets [#/volume] in Blood by Automated count")


def _lvef(b: PatientBuilder, percent: float, hours: float) -> None:
    b.observation(
        "10230-1", percent, "%", hours, display="Left ventricular Ejection fraction", category="imaging"
    )


def _cardiac_index(b: PatientBuilder, value: float, hours: float) -> None:
    b.observation(
        "75919-1", value, "L/min/m2", hours, display="Left ventricular Cardiac index", category="procedure"
    )


def _pregnancy_test(b: PatientBuilder, positive: bool, hours: float, code: str = "2106-3") -> None:
    result = (SNOMED, "10828004") if positive else (SNOMED, "260385009")
    b.observation(code, None, "", hours, display="Choriogonadotropin (pregnancy test)", value_codeable=result)


def _ecmo_base(
    b: PatientBuilder, onset: float = 8.0, high_dose_from: float = 7.5, *, lvef: float | None = 25, **kw: Any
) -> None:
    """Refractory septic shock with septic cardiomyopathy (LVEF 25 %), mottled, normal neutrophils."""
    _refractory_shock(b, onset, high_dose_from, **kw)
    if lvef is not None:
        _lvef(b, lvef, hours=2)
    b.anc(7.8, hours=3)
    _platelets(b, 95, hours=3)
    _mottling(b, 4, hours=1)


def _imicro_base(
    b: PatientBuilder,
    onset: float = 12.0,
    *,
    mottling: float | None = 3,
    platelets: float = 160,
    platelet_unit: str = "10*3/uL",
) -> None:
    """Septic shock on moderate norepinephrine (VIS 20), mottled knees, platelets normal, no ANC."""
    _septic_shock(b, onset, rate=0.2)
    if mottling is not None:
        _mottling(b, mottling, hours=1)
    _platelets(b, platelets, hours=4, unit=platelet_unit)


def _msc_base(b: PatientBuilder, onset: float = 4.0, anc: float | None = 0.4, unit: str = "10*3/uL") -> None:
    """Neutropenic septic shock: norepinephrine 0.3 µg/kg/min, ANC charted 2 h ago."""
    _septic_shock(b, onset, rate=0.3)
    if anc is not None:
        b.anc(anc, hours=2, unit=unit)


def _expect(ecmo: str, imicro: str, msc: str) -> dict[str, str]:
    return {ECMO: ecmo, IMICRO: imicro, MSC: msc}


# -- the scenarios --------------------------------------------------------------------------------


def all_scenarios(at: datetime) -> list[Scenario]:
    """Every scenario, built relative to the evaluation time ``at``."""
    out: list[Scenario] = []

    def add(
        name: str,
        story: str,
        expected: dict[str, str],
        builder: PatientBuilder,
        criteria: dict[str, dict[str, str]] | None = None,
    ) -> None:
        out.append(Scenario(name, story, expected, builder, criteria or {}))

    # -- MSC in neutropenic septic shock (NCT01849237): window 0–10 h after onset --------------
    b = _patient("msc-eligible", at, age=45)
    _msc_base(b)
    add(
        "msc-eligible",
        "45-year-old man, neutropenic after chemotherapy, septic shock since 4 h (norepinephrine "
        "0.3 µg/kg/min, lactate 4.2 mmol/L), ANC 0.4 × 10⁹/L. MSC: eligible (consent and chemo-"
        "resistance to confirm). I-MICRO: window opens at 6 h → upcoming. "
        "ECMO-RESCUE: VIS 30 → not eligible.",
        _expect("not_eligible", "upcoming", "eligible"),
        b,
    )
    b = _patient("msc-normal-anc", at, age=45)
    _msc_base(b, anc=5.2)
    add(
        "msc-normal-anc",
        "Same story, but the neutrophil count is normal (5.2 × 10⁹/L). MSC: not eligible (no card). "
        "I-MICRO: upcoming. ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "upcoming", "not_eligible"),
        b,
    )
    b = _patient("msc-anc-missing", at, age=50)
    _msc_base(b, onset=3.0, anc=None)
    add(
        "msc-anc-missing",
        "50-year-old man in septic shock for 3 h; no neutrophil count in the chart. MSC: possibly "
        "eligible — the card asks for an absolute neutrophil count. I-MICRO: upcoming. "
        "ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "upcoming", "possibly_eligible"),
        b,
        {MSC: {"septic_shock": "met", "severe_neutropenia": "unknown", "informed_consent": "to_confirm"}},
    )
    b = _patient("msc-anc-per-ul", at, age=38)
    _msc_base(b, anc=400, unit="/uL")
    add(
        "msc-anc-per-ul",
        "38-year-old man, septic shock for 4 h; the lab reports the ANC as 400 /µL (= 0.4 × 10⁹/L). "
        "MSC: eligible after unit conversion. I-MICRO: upcoming. ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "upcoming", "eligible"),
        b,
    )
    b = _patient("msc-window-closed", at, age=45)
    _msc_base(b, onset=13.0)
    b.anc(0.3, hours=3)
    add(
        "msc-window-closed",
        "Neutropenic septic shock that started 13 h ago (ANC 0.3). MSC: the 10 h window has closed "
        "(no card). I-MICRO: inside its 6–24 h window but no mottling / capillary refill and no "
        "platelets charted → possibly eligible. ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "possibly_eligible", "window_closed"),
        b,
    )
    b = _patient("msc-no-septic-shock-yet", at, age=52)
    b.weight(75, hours=30)
    b.condition(ICD10CM, "A41.9", "Sepsis, unspecified organism", 6)
    b.condition(ICD10CM, "D70.1", "Agranulocytosis secondary to cancer chemotherapy", 200)
    b.lactate(3.1, hours=2)
    b.anc(0.2, hours=3)
    add(
        "msc-no-septic-shock-yet",
        "Neutropenic sepsis on the ward (ANC 0.2, lactate 3.1) but no vasopressor yet: no septic "
        "shock, so no trial's window has opened (MSC opens at onset: it can never be 'upcoming'). "
        "All three: not eligible.",
        _expect("not_eligible", "not_eligible", "not_eligible"),
        b,
    )
    b = _patient("msc-over-75", at, age=79)
    _msc_base(b)
    add(
        "msc-over-75",
        "79-year-old man in neutropenic septic shock for 4 h. MSC: age > 75 excludes. I-MICRO has no "
        "upper age limit → upcoming. ECMO-RESCUE: not eligible (VIS 30, age).",
        _expect("not_eligible", "upcoming", "not_eligible"),
        b,
    )
    b = _patient("msc-age-16", at, age=16)
    _msc_base(b)
    add(
        "msc-age-16",
        "16-year-old boy in neutropenic septic shock. MSC needs ≥ 17, I-MICRO adults, ECMO-RESCUE "
        "18–75: not eligible for any.",
        _expect("not_eligible", "not_eligible", "not_eligible"),
        b,
    )
    b = _patient("msc-age-17", at, age=17)
    _msc_base(b)
    add(
        "msc-age-17",
        "17-year-old in neutropenic septic shock for 4 h. MSC (≥ 17): eligible. I-MICRO (adults) and "
        "ECMO-RESCUE (18–75): not eligible.",
        _expect("not_eligible", "not_eligible", "eligible"),
        b,
    )
    b = _patient("msc-pregnant", at, age=27, gender="female")
    _msc_base(b)
    b.condition(ICD10CM, "Z33.1", "Pregnant state, incidental", 500)
    add(
        "msc-pregnant",
        "27-year-old pregnant woman (Z33.1 charted) in neutropenic septic shock for 4 h. Pregnancy "
        "excludes her from all three trials.",
        _expect("not_eligible", "not_eligible", "not_eligible"),
        b,
    )

    # -- I-MICRO (NCT03788837): window 6–24 h after onset --------------------------------------
    b = _patient("imicro-eligible", at, age=64)
    _imicro_base(b)
    add(
        "imicro-eligible",
        "64-year-old man, septic shock for 12 h on norepinephrine 0.2 µg/kg/min, mottling score 3 "
        "an hour ago, platelets 160. I-MICRO: eligible. MSC: its 10 h window has closed. "
        "ECMO-RESCUE: VIS 20 → not eligible.",
        _expect("not_eligible", "eligible", "window_closed"),
        b,
    )
    b = _patient("imicro-upcoming", at, age=64)
    _imicro_base(b, onset=3.0)
    add(
        "imicro-upcoming",
        "Same patient 3 h into septic shock: I-MICRO randomises from 6 h → upcoming (info card, "
        "opens in 3 h). MSC: no ANC → possibly eligible. ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "upcoming", "possibly_eligible"),
        b,
    )
    b = _patient("imicro-window-closed", at, age=64)
    _imicro_base(b, onset=30.0)
    add(
        "imicro-window-closed",
        "Mottled patient 30 h into septic shock: I-MICRO's 24 h window and MSC's 10 h window have "
        "closed (no cards). ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "window_closed", "window_closed"),
        b,
    )
    b = _patient("imicro-low-platelets", at, age=59)
    _imicro_base(b, platelets=22)
    add(
        "imicro-low-platelets",
        "Mottled septic shock for 12 h with platelets 22 × 10⁹/L: I-MICRO excludes platelets < 30. "
        "MSC: window closed. ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "not_eligible", "window_closed"),
        b,
    )
    b = _patient("imicro-platelets-per-ul", at, age=59)
    _imicro_base(b, platelets=25000, platelet_unit="/uL")
    add(
        "imicro-platelets-per-ul",
        "As above, but the count is reported as 25 000 /µL (= 25 × 10⁹/L): the conversion matters — "
        "I-MICRO not eligible. MSC: window closed. ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "not_eligible", "window_closed"),
        b,
    )
    b = _patient("imicro-pregnant", at, age=31, gender="female")
    _imicro_base(b)
    _pregnancy_test(b, True, hours=10, code="2118-8")
    add(
        "imicro-pregnant",
        "31-year-old woman, mottled septic shock for 12 h, serum hCG positive. I-MICRO, ECMO-RESCUE "
        "and MSC all exclude pregnancy (MSC: the exclusion rules her out before its closed window).",
        _expect("not_eligible", "not_eligible", "not_eligible"),
        b,
    )
    b = _patient("imicro-pregnancy-test-missing", at, age=34, gender="female")
    _imicro_base(b)
    add(
        "imicro-pregnancy-test-missing",
        "34-year-old woman, mottled septic shock for 12 h, no pregnancy test charted. I-MICRO: "
        "possibly eligible — the card asks for a pregnancy test. MSC: window closed. "
        "ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "possibly_eligible", "window_closed"),
        b,
    )
    b = _patient("imicro-negative-pregnancy-test", at, age=34, gender="female")
    _imicro_base(b)
    _pregnancy_test(b, False, hours=10)
    add(
        "imicro-negative-pregnancy-test",
        "Same woman with a negative urine hCG: I-MICRO eligible. MSC: window closed. "
        "ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "eligible", "window_closed"),
        b,
    )
    b = _patient("imicro-woman-over-55", at, age=68, gender="female")
    _imicro_base(b)
    add(
        "imicro-woman-over-55",
        "68-year-old woman, mottled septic shock for 12 h, no pregnancy test: pregnancy is only "
        "checked under 55 (documented decision) → I-MICRO eligible. MSC: window closed. "
        "ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "eligible", "window_closed"),
        b,
    )
    b = _patient("imicro-no-hypoperfusion", at, age=57)
    _imicro_base(b, mottling=0)
    _capillary_refill(b, 2, hours=1)
    add(
        "imicro-no-hypoperfusion",
        "Septic shock for 12 h, but no mottling (score 0) and capillary refill 2 s: no persistent "
        "hypoperfusion → I-MICRO not eligible. MSC: window closed. ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "not_eligible", "window_closed"),
        b,
    )
    b = _patient("imicro-hypoperfusion-missing", at, age=57)
    _imicro_base(b, mottling=None)
    add(
        "imicro-hypoperfusion-missing",
        "Septic shock for 12 h, neither mottling nor capillary refill charted: I-MICRO possibly "
        "eligible — the card asks for a mottling score or a capillary refill time. MSC: window closed. "
        "ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "possibly_eligible", "window_closed"),
        b,
        {IMICRO: {"peripheral_hypoperfusion": "unknown"}},
    )
    b = _patient("imicro-refill-normal-mottling-missing", at, age=66)
    _imicro_base(b, mottling=None)
    _capillary_refill(b, 2, hours=1)
    add(
        "imicro-refill-normal-mottling-missing",
        "Septic shock for 12 h; a normal fingertip capillary refill (2 s) an hour ago, no mottling score "
        "charted. A normal refill alone does not rule out persistent hypoperfusion (mottling counts "
        "too): I-MICRO possibly eligible — the card shows the 2 s refill and asks for the mottling "
        "score. MSC: window closed. ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "possibly_eligible", "window_closed"),
        b,
        {IMICRO: {"peripheral_hypoperfusion": "unknown", "thrombocytopenia_under_30": "not_met"}},
    )
    b = _patient("imicro-capillary-refill", at, age=57)
    _imicro_base(b, mottling=None)
    _capillary_refill(b, 4.5, hours=1)
    add(
        "imicro-capillary-refill",
        "Septic shock for 12 h, no mottling score but fingertip capillary refill 4.5 s: I-MICRO "
        "eligible. MSC: window closed. ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "eligible", "window_closed"),
        b,
    )
    b = _patient("imicro-lactate-mg-dl", at, age=61)
    _septic_shock(b, 12.0, rate=0.2, lactate=4.2, lactate_mg_dl=True)
    _mottling(b, 3, hours=1)
    _platelets(b, 160, hours=4)
    add(
        "imicro-lactate-mg-dl",
        "Septic shock for 12 h; the lactate around the norepinephrine start is charted as 37.8 mg/dL "
        "(LOINC 14118-4, = 4.2 mmol/L): the onset is established after conversion → I-MICRO eligible. "
        "MSC: window closed. ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "eligible", "window_closed"),
        b,
    )

    # -- ECMO-RESCUE (NCT05184296): VIS > 120 with hypoperfusion > 5 h, 12 h clock --------------
    ecmo_others = "I-MICRO: mottled, platelets 95, 8 h after onset → eligible. MSC: ANC 7.8 → not eligible."
    b = _patient("ecmo-eligible", at, age=52)
    _ecmo_base(b)
    add(
        "ecmo-eligible",
        "52-year-old man, septic shock for 8 h; for 7.5 h norepinephrine 0.9 + epinephrine 0.4 "
        "µg/kg/min (VIS 130) with MAP 58 mmHg, LVEF 25 % on echo. ECMO-RESCUE: eligible, the 12 h "
        f"clock closes the window in 9.5 h. {ecmo_others}",
        _expect("eligible", "eligible", "not_eligible"),
        b,
    )
    b = _patient("ecmo-upcoming", at, age=52)
    _ecmo_base(b, onset=3.0, high_dose_from=2.5)
    add(
        "ecmo-upcoming",
        "Same patient only 2.5 h into VIS 130 with MAP 58: the condition must last more than 5 h → "
        "ECMO-RESCUE upcoming (opens in 2.5 h). I-MICRO (3 h after onset): upcoming. "
        "MSC: ANC normal → not eligible.",
        _expect("upcoming", "upcoming", "not_eligible"),
        b,
    )
    b = _patient("ecmo-window-closed", at, age=52)
    _ecmo_base(b, onset=20.5, high_dose_from=20.0)
    add(
        "ecmo-window-closed",
        "VIS 130 with MAP 58 for 20 h: the inclusion criteria have been met for more than 12 h → "
        "ECMO-RESCUE window closed (no card). I-MICRO (20.5 h after onset, mottled): eligible. "
        "MSC: not eligible.",
        _expect("window_closed", "eligible", "not_eligible"),
        b,
    )
    b = _patient("ecmo-acute-mi", at, age=58)
    _ecmo_base(b)
    b.condition(ICD10CM, "I21.4", "Non-ST elevation myocardial infarction", 30)
    add(
        "ecmo-acute-mi",
        "Refractory shock with low LVEF, but an acute myocardial infarction (I21.4) is charted: the "
        f"cardiac dysfunction has another cause → ECMO-RESCUE not eligible. {ecmo_others}",
        _expect("not_eligible", "eligible", "not_eligible"),
        b,
    )
    b = _patient("ecmo-pulmonary-embolism", at, age=58)
    _ecmo_base(b)
    b.condition(SNOMED, "59282003", "Pulmonary embolism", 9)
    add(
        "ecmo-pulmonary-embolism",
        "Refractory shock with a pulmonary embolism charted (SNOMED 59282003): an obstructive cause "
        f"of shock → ECMO-RESCUE not eligible. {ecmo_others}",
        _expect("not_eligible", "eligible", "not_eligible"),
        b,
    )
    b = _patient("ecmo-pregnant", at, age=29, gender="female")
    _ecmo_base(b)
    _pregnancy_test(b, True, hours=7)
    add(
        "ecmo-pregnant",
        "29-year-old woman in refractory septic shock with a positive urine hCG: pregnancy excludes "
        "her from ECMO-RESCUE, I-MICRO and MSC.",
        _expect("not_eligible", "not_eligible", "not_eligible"),
        b,
    )
    b = _patient("ecmo-aids", at, age=41)
    _ecmo_base(b)
    b.condition(ICD10CM, "B20", "Human immunodeficiency virus [HIV] disease", 2000)
    add(
        "ecmo-aids",
        "41-year-old man with AIDS (B20) in refractory septic shock: ECMO-RESCUE excludes AIDS; "
        "I-MICRO does not → eligible. MSC: ANC normal → not eligible.",
        _expect("not_eligible", "eligible", "not_eligible"),
        b,
    )
    b = _patient("ecmo-over-75", at, age=78)
    _ecmo_base(b)
    add(
        "ecmo-over-75",
        f"78-year-old man in refractory septic shock: ECMO-RESCUE is for 18–75 → not eligible. {ecmo_others}",
        _expect("not_eligible", "eligible", "not_eligible"),
        b,
    )
    b = _patient("ecmo-vis-below-120", at, age=52)
    _septic_shock(b, 8.0, rate=0.6)
    _hourly(b, 7.5, lambda h: b.map(60, hours=h))
    _lvef(b, 25, hours=2)
    b.anc(7.8, hours=3)
    _platelets(b, 95, hours=3)
    _mottling(b, 4, hours=1)
    add(
        "ecmo-vis-below-120",
        "Septic shock with septic cardiomyopathy, MAP 60, but norepinephrine 0.6 µg/kg/min only "
        f"(VIS 60 ≤ 120) → ECMO-RESCUE not eligible. {ecmo_others}",
        _expect("not_eligible", "eligible", "not_eligible"),
        b,
    )
    b = _patient("ecmo-aortic-regurgitation", at, age=52)
    _ecmo_base(b)
    b.condition(SNOMED, "60234000", "Aortic valve regurgitation", 4000)
    add(
        "ecmo-aortic-regurgitation",
        "Refractory shock with aortic regurgitation on the problem list (severity not coded): "
        "ECMO-RESCUE stays eligible, the card asks the clinician to confirm it is not moderate–severe. "
        f"{ecmo_others}",
        _expect("eligible", "eligible", "not_eligible"),
        b,
        {ECMO: {"other_cardiac_dysfunction": "to_confirm", "myocardial_impairment": "met"}},
    )
    b = _patient("ecmo-ug-per-min", at, age=52)
    _ecmo_base(b, unit="ug/min")
    add(
        "ecmo-ug-per-min",
        "As ecmo-eligible, but the pumps are charted in µg/min (norepinephrine 72, epinephrine 32 "
        "µg/min) with a body weight of 80 kg → VIS 130 after conversion → ECMO-RESCUE eligible. "
        f"{ecmo_others}",
        _expect("eligible", "eligible", "not_eligible"),
        b,
    )
    b = _patient("ecmo-ug-per-min-no-weight", at, age=52)
    _ecmo_base(b, unit="ug/min", weight=None)
    add(
        "ecmo-ug-per-min-no-weight",
        "Pumps in µg/min but no body weight charted: the VIS cannot be computed → ECMO-RESCUE "
        f"possibly eligible, the card asks for a body weight. {ecmo_others}",
        _expect("possibly_eligible", "eligible", "not_eligible"),
        b,
    )
    b = _patient("ecmo-salt-code", at, age=52)
    _ecmo_base(b, norepinephrine_code="242969")
    add(
        "ecmo-salt-code",
        "As ecmo-eligible, but norepinephrine is coded with the salt RxNorm code 242969 "
        f"(norepinephrine bitartrate) → recognised → ECMO-RESCUE eligible. {ecmo_others}",
        _expect("eligible", "eligible", "not_eligible"),
        b,
    )
    b = _patient("ecmo-map-from-panel", at, age=52)
    _ecmo_base(b, map_values=False)
    _hourly(b, 7.5, lambda h: b.bp_panel(85, 52, hours=h))
    add(
        "ecmo-map-from-panel",
        "No mean pressure charted, only blood-pressure panels (85354-9) with 85/52 mmHg: MAP (S + 2D)/3 "
        f"= 63 is derived → ECMO-RESCUE eligible. {ecmo_others}",
        _expect("eligible", "eligible", "not_eligible"),
        b,
    )
    b = _patient("ecmo-lactate-rising", at, age=52)
    _ecmo_base(b, map_values=False)
    _hourly(b, 7.5, lambda h: b.map(70, hours=h))
    for hours, value in ((7.5, 5.6), (5.5, 6.0), (3.5, 6.4), (1.5, 6.9)):
        b.lactate(value, hours=hours)
    add(
        "ecmo-lactate-rising",
        "VIS 130 keeps MAP at 70, but lactate stays > 5 mmol/L and rises (5.6 → 6.9) over 6 h: "
        f"persistent lactacemia for more than 5 h → ECMO-RESCUE eligible. {ecmo_others}",
        _expect("eligible", "eligible", "not_eligible"),
        b,
    )
    b = _patient("ecmo-lvef-missing", at, age=52)
    _ecmo_base(b, lvef=None)
    add(
        "ecmo-lvef-missing",
        "Refractory shock for 7.5 h but no LVEF or cardiac index charted (the echo is only a narrative): "
        f"ECMO-RESCUE possibly eligible — the card asks for an LVEF or a cardiac index. {ecmo_others}",
        _expect("possibly_eligible", "eligible", "not_eligible"),
        b,
        {ECMO: {"myocardial_impairment": "unknown", "high_dose_vasoactive_over_5h": "met"}},
    )
    b = _patient("ecmo-cardiac-index", at, age=52)
    _ecmo_base(b, lvef=None)
    _hourly(b, 4.5, lambda h: _cardiac_index(b, 1.6, hours=h))
    add(
        "ecmo-cardiac-index",
        "No LVEF, but a PiCCO cardiac index of 1.6 L/min/m² for 4 h (> 3 h): myocardial impairment "
        f"→ ECMO-RESCUE eligible. {ecmo_others}",
        _expect("eligible", "eligible", "not_eligible"),
        b,
    )
    out.extend(_real_chart_scenarios(at))
    names = [s.patient_id for s in out]
    assert len(names) == len(set(names)), "scenario patient ids must be unique"
    return out


# -- issue 14: real charts, real candidates -----------------------------------------------------------

#: Per infusion: (RxNorm, display, dose µg/kg/min, mg in a 250 mL bag) — norepinephrine 0.9 and
#: epinephrine 0.4 µg/kg/min at 80 kg: VIS 130.
_HIGH_DOSE = (("7512", "norepinephrine", 0.9, 16.0), ("3992", "epinephrine", 0.4, 4.0))


def _ecmo_charted_as(b: PatientBuilder, shape: str, onset: float = 8.0, high: float = 7.5) -> None:
    """Refractory septic shock as in ``_ecmo_base`` (VIS 130, MAP 58, LVEF 25 %), but the high-dose
    infusions charted in one of the shapes EHRs send:

    - ``dose``: the weight-based dose in ``dosage.dose`` (µg/kg/min), the pump rate in mL/h beside it;
    - ``pump-contained``: the pump rate in mL/h alone, the bag (16 mg / 250 mL) a contained Medication;
    - ``pump-referenced``: the same, the bag a Medication resource of its own (``Medication/id``);
    - ``pump-no-strength``: the pump rate alone, and the Medication charts no strength."""
    weight = 80.0
    _septic_shock(b, onset, rate=0.3, until=high, weight=weight)
    for code, display, dose, bag_mg in _HIGH_DOSE:
        ml_per_h = round(dose * weight * 60 / (bag_mg * 1000 / 250), 3)
        if shape == "dose":
            b.infusion(code, display, ml_per_h, "mL/h", start=high, dose=(dose, "ug/kg/min"))
        elif shape == "pump-contained":
            reference = b.medication(code, display, (bag_mg, "mg"), contained=True)
            b.infusion(code, display, ml_per_h, "mL/h", start=high, medication=reference)
            b.contain()
        else:
            amount = (bag_mg, "mg") if shape == "pump-referenced" else None
            reference = b.medication(code, f"{display} {bag_mg:g} mg in 250 mL", amount)
            b.infusion(code, display, ml_per_h, "mL/h", start=high, medication=reference)
    _hourly(b, high, lambda h: b.map(58, hours=h))
    _lvef(b, 25, hours=2)
    b.anc(7.8, hours=3)
    _platelets(b, 95, hours=3)
    _mottling(b, 4, hours=1)


def _serum_hcg(b: PatientBuilder, value: float, hours: float, comparator: str | None = None) -> None:
    b.observation(
        "19080-1",
        value,
        "m[IU]/mL",
        hours,
        display="Choriogonadotropin [Units/volume] in Serum",
        comparator=comparator,
    )


def _real_chart_scenarios(at: datetime) -> list[Scenario]:
    """Issue 14: charts as EHRs send them. Each story says which defect it guards against."""
    out: list[Scenario] = []

    def add(name: str, story: str, expected: dict[str, str], builder: PatientBuilder) -> None:
        out.append(Scenario(name, story, expected, builder))

    ecmo_others = "I-MICRO: mottled, platelets 95, 8 h after onset → eligible. MSC: ANC 7.8 → not eligible."
    imicro_others = "MSC: its 10 h window has closed. ECMO-RESCUE: VIS 20 → not eligible."

    # (1) Recency of the pregnancy test ------------------------------------------------------------
    b = _patient("preg-positive-years-ago", at, age=30, gender="female")
    _ecmo_base(b)
    _pregnancy_test(b, True, hours=3 * 365 * 24)
    add(
        "preg-positive-years-ago",
        "30-year-old woman in refractory septic shock; her only pregnancy test is a positive urine hCG "
        "from 3 years ago. A test decides for 72 h: the old result is shown and the clinician confirms "
        f"she is not pregnant now → ECMO-RESCUE eligible (to confirm), not excluded. {ecmo_others}",
        _expect("eligible", "eligible", "not_eligible"),
        b,
    )
    b = _patient("preg-negative-last-year", at, age=33, gender="female")
    _imicro_base(b)
    _pregnancy_test(b, False, hours=400 * 24)
    add(
        "preg-negative-last-year",
        "33-year-old woman, mottled septic shock for 12 h; a negative urine hCG from last year. It no "
        "longer clears her: I-MICRO eligible with the pregnancy to confirm (the old test shown). "
        f"{imicro_others}",
        _expect("not_eligible", "eligible", "window_closed"),
        b,
    )
    b = _patient("preg-negative-5-days-ago", at, age=24, gender="female")
    _imicro_base(b)
    _pregnancy_test(b, False, hours=5 * 24, code="2118-8")
    add(
        "preg-negative-5-days-ago",
        "24-year-old woman, mottled septic shock for 12 h; a negative serum hCG 5 days ago (hCG can be "
        "negative 10–14 days after conception): older than 72 h → pregnancy to confirm, I-MICRO eligible. "
        f"{imicro_others}",
        _expect("not_eligible", "eligible", "window_closed"),
        b,
    )
    b = _patient("preg-serum-hcg-positive", at, age=26, gender="female")
    _imicro_base(b)
    _serum_hcg(b, 1250, hours=6)
    add(
        "preg-serum-hcg-positive",
        "26-year-old woman, mottled septic shock for 12 h; quantitative serum hCG 1 250 mIU/mL (LOINC "
        "19080-1) 6 h ago: ≥ 25 is positive → pregnancy excludes her from all three trials.",
        _expect("not_eligible", "not_eligible", "not_eligible"),
        b,
    )
    b = _patient("preg-serum-hcg-below-2", at, age=26, gender="female")
    _imicro_base(b)
    _serum_hcg(b, 2, hours=6, comparator="<")
    add(
        "preg-serum-hcg-below-2",
        "26-year-old woman, mottled septic shock for 12 h; serum hCG reported as < 2 mIU/mL 6 h ago: "
        f"negative (< 5) → I-MICRO eligible. {imicro_others}",
        _expect("not_eligible", "eligible", "window_closed"),
        b,
    )
    b = _patient("preg-serum-hcg-equivocal", at, age=36, gender="female")
    _imicro_base(b)
    _serum_hcg(b, 12, hours=6)
    add(
        "preg-serum-hcg-equivocal",
        "36-year-old woman, mottled septic shock for 12 h; serum hCG 12 mIU/mL (between 5 and 25: "
        "equivocal) → neither clears nor excludes: I-MICRO eligible with the pregnancy to confirm. "
        f"{imicro_others}",
        _expect("not_eligible", "eligible", "window_closed"),
        b,
    )

    # (2) Exclusion codes that mean the exclusion -----------------------------------------------
    for name, age, system, code, display, onset, expected_ecmo, story in (
        (
            "ecmo-type2-mi",
            58,
            ICD10CM,
            "I21.A1",
            "Myocardial infarction type 2",
            10,
            "eligible",
            "a type 2 (demand) myocardial infarction (I21.A1) charted during the shock: not another cause "
            "of the cardiac dysfunction → ECMO-RESCUE eligible, the code shown to confirm",
        ),
        (
            "ecmo-stemi",
            61,
            ICD10CM,
            "I21.09",
            "STEMI involving other coronary artery of anterior wall",
            20,
            "not_eligible",
            "an acute anterior STEMI (I21.09) this admission, active and confirmed: another cause of the "
            "cardiac dysfunction → ECMO-RESCUE not eligible",
        ),
        (
            "ecmo-heart-failure-unspecified",
            66,
            ICD10CM,
            "I50.9",
            "Heart failure, unspecified",
            2000,
            "eligible",
            "heart failure, unspecified (I50.9) on the problem list: not chronic heart failure as such → "
            "ECMO-RESCUE eligible, the code shown to confirm",
        ),
        (
            "ecmo-chronic-heart-failure",
            66,
            ICD10CM,
            "I50.22",
            "Chronic systolic (congestive) heart failure",
            9000,
            "not_eligible",
            "chronic systolic heart failure (I50.22), active and confirmed: another cause of the cardiac "
            "dysfunction → ECMO-RESCUE not eligible",
        ),
        (
            "ecmo-traumatic-pneumothorax",
            44,
            ICD10CM,
            "S27.0XXA",
            "Traumatic pneumothorax, initial encounter",
            30,
            "eligible",
            "a traumatic pneumothorax (S27.0XXA), not a tension pneumothorax → ECMO-RESCUE eligible, the "
            "code shown to confirm",
        ),
        (
            "ecmo-old-pulmonary-embolism",
            57,
            ICD10CM,
            "I26.99",
            "Other pulmonary embolism without acute cor pulmonale",
            2 * 365 * 24,
            "eligible",
            "a pulmonary embolism from 2 years ago still active on the problem list: not a suspected cause "
            "of this shock → ECMO-RESCUE eligible, the PE and its date shown to confirm",
        ),
        (
            "ecmo-hiv-infection",
            39,
            SNOMED,
            "86406008",
            "Human immunodeficiency virus infection",
            20000,
            "eligible",
            "HIV infection (SNOMED 86406008), not AIDS → ECMO-RESCUE eligible, the code shown to confirm",
        ),
        (
            "ecmo-aids-snomed",
            47,
            SNOMED,
            "62479008",
            "Acquired immune deficiency syndrome",
            20000,
            "not_eligible",
            "AIDS (SNOMED 62479008), active and confirmed → ECMO-RESCUE excludes AIDS",
        ),
    ):
        b = _patient(name, at, age=age)
        _ecmo_base(b)
        b.condition(system, code, display, onset)
        add(
            name,
            f"Refractory septic shock with {story}. {ecmo_others}",
            _expect(expected_ecmo, "eligible", "not_eligible"),
            b,
        )
    b = _patient("ecmo-mi-without-status", at, age=63)
    _ecmo_base(b)
    b.condition(
        ICD10CM,
        "I21.4",
        "Non-ST elevation myocardial infarction",
        30,
        clinical_status=None,
        verification=None,
    )
    add(
        "ecmo-mi-without-status",
        "Refractory septic shock; an NSTEMI (I21.4) is charted with no clinical or verification status, "
        "as real charts often do: it may be a rule-out. It asks rather than excludes → ECMO-RESCUE "
        f"eligible, the code shown to confirm. {ecmo_others}",
        _expect("eligible", "eligible", "not_eligible"),
        b,
    )
    b = _patient("msc-puerperium", at, age=28, gender="female")
    _msc_base(b)
    b.condition(ICD10CM, "O86.4", "Pyrexia of unknown origin following delivery", 100)
    _pregnancy_test(b, False, hours=30)
    add(
        "msc-puerperium",
        "28-year-old woman, delivered 5 days ago, puerperal fever (O86.4) and neutropenic septic shock "
        "for 4 h; urine hCG negative yesterday. A chapter O code is not a current pregnancy: it asks → "
        "MSC eligible. I-MICRO: upcoming. ECMO-RESCUE: VIS 30 → not eligible.",
        _expect("not_eligible", "upcoming", "eligible"),
        b,
    )

    # (3) Censored values (comparator) ------------------------------------------------------------
    b = _patient("imicro-capillary-refill-censored", at, age=57)
    _imicro_base(b, mottling=None)
    b.observation(
        "44963-7", 3, "s", 1, display="Capillary refill [Time] of Nail bed", category="exam", comparator=">"
    )
    add(
        "imicro-capillary-refill-censored",
        "Septic shock for 12 h; no mottling score, capillary refill charted as '> 3 s': it satisfies "
        f"'> 3 s' → I-MICRO eligible (the evidence says it was charted censored). {imicro_others}",
        _expect("not_eligible", "eligible", "window_closed"),
        b,
    )
    b = _patient("msc-anc-censored-low", at, age=45)
    _msc_base(b, anc=None)
    b.observation("751-8", 0.1, "10*3/uL", 2, display="Neutrophils [#/volume] in Blood", comparator="<")
    add(
        "msc-anc-censored-low",
        "Neutropenic septic shock for 4 h; the ANC is reported as '< 0.1 × 10⁹/L': it satisfies ≤ 1 → "
        "MSC eligible. I-MICRO: upcoming. ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "upcoming", "eligible"),
        b,
    )
    b = _patient("msc-anc-censored-undecidable", at, age=45)
    _msc_base(b, anc=None)
    b.observation("751-8", 5, "10*3/uL", 2, display="Neutrophils [#/volume] in Blood", comparator="<")
    add(
        "msc-anc-censored-undecidable",
        "Septic shock for 4 h; the ANC is reported only as '< 5 × 10⁹/L': it could be 0.3 or 4.9, so "
        "≤ 1 cannot be decided → unknown, never 'not met': MSC possibly eligible, the card asks for an "
        "exact count. I-MICRO: upcoming. ECMO-RESCUE: not eligible.",
        _expect("not_eligible", "upcoming", "possibly_eligible"),
        b,
    )

    # (4) Infusions as EHRs chart them, and the weight --------------------------------------------
    for name, shape, expected_ecmo, story in (
        (
            "ecmo-dose-in-dosage",
            "dose",
            "eligible",
            "norepinephrine 0.9 and epinephrine 0.4 µg/kg/min charted in dosage.dose, the pump rates "
            "(67.5 and 120 mL/h) beside them → VIS 130 → ECMO-RESCUE eligible",
        ),
        (
            "ecmo-pump-rate-contained-bag",
            "pump-contained",
            "eligible",
            "only the pump rates charted (67.5 mL/h of norepinephrine 16 mg/250 mL, 120 mL/h of "
            "epinephrine 4 mg/250 mL, contained Medications): dose = rate × strength ÷ 80 kg → VIS 130 → "
            "ECMO-RESCUE eligible, the arithmetic shown",
        ),
        (
            "ecmo-pump-rate-referenced-bag",
            "pump-referenced",
            "eligible",
            "only the pump rates charted, the drugs named by medicationReference to Medication resources "
            "holding the bag strength (fetched with the administrations) → VIS 130 → ECMO-RESCUE eligible",
        ),
        (
            "ecmo-pump-rate-no-strength",
            "pump-no-strength",
            "possibly_eligible",
            "only the pump rates charted and the Medications give no strength: no dose can be had → VIS "
            "unknown with the reason → ECMO-RESCUE possibly eligible",
        ),
    ):
        b = _patient(name, at, age=52)
        _ecmo_charted_as(b, shape)
        add(
            name,
            f"Refractory septic shock; {story}. {ecmo_others}",
            _expect(expected_ecmo, "eligible", "not_eligible"),
            b,
        )
    for name, code, label in (
        ("ecmo-weight-measured", "3141-9", "measured"),
        ("ecmo-weight-estimated", "8335-2", "estimated"),
    ):
        b = _patient(name, at, age=52)
        _ecmo_base(b, unit="ug/min", weight=None)
        b.weight(80, hours=28, code=code)
        add(
            name,
            f"Pumps in µg/min (norepinephrine 72, epinephrine 32); the only weight is a {label} body weight "
            f"(LOINC {code}, 80 kg) → VIS 130 → ECMO-RESCUE eligible. {ecmo_others}",
            _expect("eligible", "eligible", "not_eligible"),
            b,
        )
    b = _patient("ecmo-weight-stale", at, age=52)
    _ecmo_base(b, unit="ug/min", weight=None)
    b.weight(80, hours=40 * 24)
    add(
        "ecmo-weight-stale",
        "Pumps in µg/min; the only body weight is from a clinic visit 40 days ago (older than 7 days): "
        "not used to convert the doses → VIS unknown, the card asks for a current weight → ECMO-RESCUE "
        f"possibly eligible. {ecmo_others}",
        _expect("possibly_eligible", "eligible", "not_eligible"),
        b,
    )

    # (5) I-MICRO's window from norepinephrine start ----------------------------------------------
    b = _patient("imicro-norepinephrine-after-phenylephrine", at, age=63)
    b.weight(80, hours=50)
    b.condition(ICD10CM, "A41.9", "Sepsis, unspecified organism", 29)
    b.lactate(4.0, hours=26.5)
    b.infusion("8163", "phenylephrine", 1.0, "ug/kg/min", start=26)
    b.norepinephrine(0.2, "ug/kg/min", start=10)
    _mottling(b, 3, hours=1)
    _platelets(b, 160, hours=4)
    add(
        "imicro-norepinephrine-after-phenylephrine",
        "63-year-old man in septic shock for 26 h on phenylephrine, norepinephrine added 10 h ago; "
        "mottled. I-MICRO's window runs from norepinephrine start (registry): 10 h → eligible, the card "
        "shows both times. MSC: window closed (26 h). ECMO-RESCUE: VIS 20 → not eligible.",
        _expect("not_eligible", "eligible", "window_closed"),
        b,
    )

    # (7) Onset from a charted septic-shock Condition alone ---------------------------------------
    b = _patient("msc-charted-septic-shock-only", at, age=45)
    b.weight(80, hours=30)
    b.condition(ICD10CM, "A41.9", "Sepsis, unspecified organism", 7)
    b.condition(ICD10CM, "R65.21", "Severe sepsis with septic shock", 4)
    b.lactate(4.0, hours=4.5)
    b.anc(0.4, hours=2)
    _mottling(b, 3, hours=1)
    _platelets(b, 160, hours=2)
    add(
        "msc-charted-septic-shock-only",
        "45-year-old neutropenic man with septic shock charted (R65.21) 4 h ago, but no vasopressor in "
        "the chart: Sepsis-3 is not shown, so the charted onset is a candidate the clinician confirms → "
        "MSC eligible (septic shock to confirm). I-MICRO: no norepinephrine start to time the window → "
        "possibly eligible. ECMO-RESCUE: no vasoactive infusion → not eligible.",
        _expect("not_eligible", "possibly_eligible", "eligible"),
        b,
    )

    # (8) "Absence means no" only with a reason: the arrhythmia arm asks ---------------------------
    b = _patient("ecmo-normal-lvef-arrhythmia-to-confirm", at, age=50)
    _ecmo_base(b, lvef=45)
    _hourly(b, 4.5, lambda h: _cardiac_index(b, 2.6, hours=h))
    add(
        "ecmo-normal-lvef-arrhythmia-to-confirm",
        "Refractory septic shock with LVEF 45 % and cardiac index 2.6: the myocardial criterion rests on "
        "a new refractory arrhythmia, which is often only on the monitor (only VT/VF are coded) → "
        f"ECMO-RESCUE eligible, the arrhythmia to confirm. {ecmo_others}",
        _expect("eligible", "eligible", "not_eligible"),
        b,
    )

    # (10) Persistence means still true now --------------------------------------------------------
    b = _patient("ecmo-lactate-fell-back", at, age=52)
    _refractory_shock(b, 8.0, 7.5, map_values=False)
    _hourly(b, 7.5, lambda h: b.map(70, hours=h))
    for hours, value in ((7.0, 5.8), (5.0, 6.4), (3.0, 6.9), (0.5, 3.2)):
        b.lactate(value, hours=hours)
    _lvef(b, 25, hours=2)
    b.anc(7.8, hours=3)
    _platelets(b, 95, hours=3)
    _mottling(b, 4, hours=1)
    add(
        "ecmo-lactate-fell-back",
        "VIS 130 keeps MAP at 70; lactate was > 5 mmol/L and rising for 4 h (5.8 → 6.9) but the latest is "
        "3.2: persistence means still true now, so the lactate arm is not met; only a mixed venous SvO2 "
        f"(none charted) could still qualify → ECMO-RESCUE possibly eligible, asking for it. {ecmo_others}",
        _expect("possibly_eligible", "eligible", "not_eligible"),
        b,
    )
    return out


# -- scenario files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenarioFile:
    """A scenario as written to / read from a JSON file."""

    name: str
    story: str
    evaluated_at: datetime
    expected: dict[str, str]
    bundle: dict[str, Any]
    path: str = ""
    expected_criteria: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def at(self) -> float:
        return self.evaluated_at.timestamp()

    def resources(self) -> list[dict[str, Any]]:
        return [e["resource"] for e in self.bundle.get("entry") or [] if isinstance(e.get("resource"), dict)]

    @property
    def patient(self) -> dict[str, Any]:
        return next(r for r in self.resources() if r.get("resourceType") == "Patient")

    @property
    def patient_id(self) -> str:
        return str(self.patient["id"])

    def shifted_to(self, at: datetime) -> ScenarioFile:
        """The same story replayed with ``at`` as its evaluation time."""
        seconds = (at - self.evaluated_at).total_seconds()
        return ScenarioFile(
            self.name,
            self.story,
            at,
            dict(self.expected),
            shift_bundle_times(self.bundle, seconds),
            self.path,
            {k: dict(v) for k, v in self.expected_criteria.items()},
        )


class ScenarioFileError(ValueError):
    """A scenario file that does not follow the format; the message names the file and the key."""


def _parse_instant(text: Any, where: str) -> datetime:
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError as exc:
        raise ScenarioFileError(f"{where}: not an ISO 8601 time: {text!r}") from exc
    if moment.tzinfo is None:
        raise ScenarioFileError(f"{where}: needs a time-zone offset (e.g. Z): {text!r}")
    return moment


def load_scenario_file(path: str | Path) -> ScenarioFile:
    """Read and check a scenario file (format in docs/trials.md, "Scenario files")."""
    path = Path(path)
    try:
        document = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ScenarioFileError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ScenarioFileError(f"{path}: expected a JSON object")
    for key in ("name", "story", "evaluatedAt", "expected", "bundle"):
        if key not in document:
            raise ScenarioFileError(f"{path}: {key}: required")
    expected = document["expected"]
    if not isinstance(expected, dict) or not expected:
        raise ScenarioFileError(f"{path}: expected: a non-empty object NCT id → status")
    for trial_id, status in expected.items():
        if status not in STATUSES:
            raise ScenarioFileError(
                f"{path}: expected.{trial_id}: {status!r} is not one of {', '.join(STATUSES)}"
            )
    criteria = document.get("expectedCriteria", {})
    if not isinstance(criteria, dict):
        raise ScenarioFileError(f"{path}: expectedCriteria: an object NCT id → criterion id → result")
    for trial_id, results in criteria.items():
        if expected.get(trial_id) not in CARD_STATUSES:
            raise ScenarioFileError(
                f"{path}: expectedCriteria.{trial_id}: only for a trial expected to give a card "
                f"({', '.join(CARD_STATUSES)})"
            )
        if not isinstance(results, dict) or not results:
            raise ScenarioFileError(f"{path}: expectedCriteria.{trial_id}: a non-empty object id → result")
        for criterion_id, result in results.items():
            if result not in CRITERION_RESULTS:
                raise ScenarioFileError(
                    f"{path}: expectedCriteria.{trial_id}.{criterion_id}: {result!r} is not one of "
                    f"{', '.join(CRITERION_RESULTS)}"
                )
    bundle = document["bundle"]
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ScenarioFileError(f"{path}: bundle: must be a FHIR Bundle")
    scenario = ScenarioFile(
        name=str(document["name"]),
        story=str(document["story"]),
        evaluated_at=_parse_instant(document["evaluatedAt"], f"{path}: evaluatedAt"),
        expected={str(k): str(v) for k, v in expected.items()},
        bundle=bundle,
        path=str(path),
        expected_criteria={str(k): {str(c): str(r) for c, r in v.items()} for k, v in criteria.items()},
    )
    patients = [r for r in scenario.resources() if r.get("resourceType") == "Patient"]
    if len(patients) != 1:
        raise ScenarioFileError(f"{path}: bundle: must hold exactly one Patient (found {len(patients)})")
    return scenario


#: FHIR elements holding a dateTime / instant in the resources scenarios use (birthDate is a date of
#: birth, not an event time: never shifted).
TIME_ELEMENTS = frozenset(
    {
        "effectiveDateTime",
        "effectiveInstant",
        "issued",
        "onsetDateTime",
        "abatementDateTime",
        "recordedDate",
        "authoredOn",
        "occurrenceDateTime",
        "dateAsserted",
        "lastUpdated",
        "deceasedDateTime",
    }
)
#: Elements of type Period whose start / end are shifted.
PERIOD_ELEMENTS = frozenset(
    {"effectivePeriod", "onsetPeriod", "abatementPeriod", "period", "occurrencePeriod"}
)


def _shift_time(text: str, seconds: float) -> str:
    """Shift one FHIR dateTime/instant, keeping its offset style (Z or ±hh:mm) and precision."""
    if len(text) <= 7:
        return text  # a year or year-month: too coarse to shift meaningfully
    if len(text) == 10:
        day = datetime.fromisoformat(text).date() + timedelta(days=round(seconds / 86400))
        return day.isoformat()
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    shifted = moment + timedelta(seconds=seconds)
    fraction = ""
    if "." in text[19:]:
        digits = len(text[20:].split("+")[0].split("-")[0].rstrip("Z"))
        fraction = "." + f"{shifted.microsecond:06d}"[:digits]
    offset = shifted.utcoffset() or timedelta(0)
    if text.endswith("Z"):
        zone = "Z"
    else:
        minutes = int(offset.total_seconds() // 60)
        sign = "+" if minutes >= 0 else "-"
        zone = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return shifted.strftime("%Y-%m-%dT%H:%M:%S") + fraction + zone


def _shift(node: Any, seconds: float) -> Any:
    if isinstance(node, list):
        return [_shift(item, seconds) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in TIME_ELEMENTS and isinstance(value, str):
            out[key] = _shift_time(value, seconds)
        elif key in PERIOD_ELEMENTS and isinstance(value, dict):
            out[key] = {
                k: (
                    _shift_time(v, seconds)
                    if k in ("start", "end") and isinstance(v, str)
                    else _shift(v, seconds)
                )
                for k, v in value.items()
            }
        else:
            out[key] = _shift(value, seconds)
    return out


def shift_bundle_times(bundle: dict[str, Any], seconds: float) -> dict[str, Any]:
    """A copy of ``bundle`` with every event time in its resources moved by ``seconds`` (not birthDate)."""
    return _shift(copy.deepcopy(bundle), seconds)


def write_scenarios(folder: Path, at: datetime) -> list[Path]:
    """Write every scenario as ``<name>.json`` plus an index ``README.md``; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    scenarios = all_scenarios(at)
    for scenario in scenarios:
        path = folder / f"{scenario.name}.json"
        path.write_bytes(orjson.dumps(scenario.document(), option=orjson.OPT_INDENT_2) + b"\n")
        written.append(path)
    index = folder / "README.md"
    index.write_text(scenario_index(scenarios, at), encoding="utf-8")
    written.append(index)
    return written


def expectation_table(rows: list[tuple[str, dict[str, str]]], link: bool = False) -> str:
    """A Markdown table: scenario → expected status per trial."""
    trials = [ECMO, IMICRO, MSC]
    head = "| scenario | " + " | ".join(f"{TRIAL_NAMES[t]} ({t})" for t in trials) + " |"
    lines = [head, "|---|" + "---|" * len(trials)]
    for name, expected in rows:
        label = f"[{name}]({name}.json)" if link else name
        lines.append(f"| {label} | " + " | ".join(expected.get(t, "—") for t in trials) + " |")
    return "\n".join(lines)


def scenario_index(scenarios: list[Scenario], at: datetime) -> str:
    """The README written next to the scenario files."""
    stories = "\n".join(f"- **{s.name}** (`{s.patient_id}`): {s.story}" for s in scenarios)
    return (
        "# Scenario patients\n\n"
        "Generated by `cds-service scenarios write DIR --at TIME` (do not edit by hand). Every file holds\n"
        "one clinical story as a FHIR transaction Bundle, the time it was written for (`evaluatedAt`)\n"
        "and the result each trial must give at that time. Check them all — each is evaluated at its own\n"
        "`evaluatedAt`, since the enrollment windows are relative to septic-shock onset — with\n\n"
        "```\n"
        ".venv/bin/cds-service scenarios check examples/scenarios\n"
        "```\n\n"
        "To see one patient's cards, run `cds-service evaluate --at <evaluatedAt> --explain` on the\n"
        'file\'s `bundle`. The format is described in docs/trials.md, section "Scenario files".\n\n'
        f"Evaluation time of these files: **{iso(at)}**.\n\n"
        + expectation_table([(s.name, s.expected) for s in scenarios], link=True)
        + "\n\n## Stories\n\n"
        + stories
        + "\n"
    )


def hook_request(
    scenario: Scenario, templates: dict[str, str], fhir_server: str | None = None
) -> dict[str, Any]:
    """A full patient-view request with the scenario's data as prefetch, filled from ``templates``
    (the service's discovery prefetch) the way a CDS client fills them."""
    b = scenario.builder
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid5(uuid.NAMESPACE_URL, f"cds-service/scenario/{scenario.name}")),
        "context": {"userId": "Practitioner/icu-doc-1", "patientId": b.patient_id},
        "prefetch": b.prefetch(templates),
    }
    if fhir_server:
        body["fhirServer"] = fhir_server
    return body


def write_examples(folder: Path = EXAMPLES_DIR, at: datetime = EXAMPLES_AT) -> list[Path]:
    """Regenerate ``examples/``: the scenario files, a hook request and a patient Bundle."""
    from ..base.config import load_settings
    from ..screening import Screener

    written = write_scenarios(folder / "scenarios", at)
    by_name = {s.name: s for s in all_scenarios(at)}
    templates = Screener(load_settings(environ={})).plan.templates()
    request = folder / "hook-request-msc-eligible.json"
    document = hook_request(by_name["msc-eligible"], templates)
    request.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    patient = folder / "patient-msc-normal-anc.json"
    patient.write_bytes(orjson.dumps(by_name["msc-normal-anc"].bundle(), option=orjson.OPT_INDENT_2) + b"\n")
    return [*written, request, patient]


# -- command line ---------------------------------------------------------------------------------


def parse_at(text: str) -> datetime:
    """argparse type for ``--at``: an ISO 8601 time with an offset, in UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text!r} (e.g. 2026-11-21T12:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"a time-zone offset is needed (e.g. {text}Z): {text!r}")
    return moment.astimezone(UTC)


def _at(moment: datetime | None) -> datetime:
    return moment if moment is not None else datetime.now(UTC).replace(microsecond=0)


def scenario_paths(path: str | Path) -> list[Path]:
    """A scenario file, or the ``*.json`` files of a folder; InputError when there are none."""
    from ..base.commandline import InputError

    target = Path(path)
    if target.is_dir():
        paths = sorted(p for p in target.glob("*.json") if p.is_file())
        if not paths:
            raise InputError(f"{target}: no *.json scenario files in this folder")
        return paths
    if not target.exists():
        raise InputError(f"{target}: no such file or folder")
    return [target]


def _bundles(args: argparse.Namespace, at: datetime) -> list[tuple[str, dict[str, Any]]]:
    from ..base.commandline import InputError

    if args.files:
        try:
            loaded = [load_scenario_file(p) for p in scenario_paths(args.files)]
        except ScenarioFileError as exc:
            raise InputError(str(exc)) from None
        return [(s.name, s.shifted_to(at).bundle) for s in loaded]
    return [(s.name, s.bundle()) for s in all_scenarios(at)]


def cmd_write(args: argparse.Namespace) -> int:
    at = _at(args.at)
    written = write_scenarios(Path(args.dir), at)
    print(f"wrote {len(written) - 1} scenario files and README.md to {args.dir} (evaluatedAt {iso(at)})")
    return 0


def outcome_problems(
    expected: dict[str, str],
    expected_criteria: dict[str, dict[str, str]],
    results: list[Any],
    cards: list[dict[str, Any]],
    hidden: set[str] | frozenset[str] = frozenset(),
) -> dict[str, tuple[str, list[str]]]:
    """NCT id → (what it gave, problems) for an in-memory screening: the cards' ``extension.screening``
    decides for a card (``card_rules.expectation_problems``), the evaluation tells a "no card" apart
    (not_eligible vs window_closed). A trial in ``hidden`` (cards hidden by the site's
    ``screening.show_not_recruiting``) is judged on its evaluation status alone."""
    from .card_rules import expectation_problems, outcome_of

    status_of = {r.trial.id: r.status for r in results}
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for card in cards:
        by_trial.setdefault(card["source"]["topic"]["code"], []).append(card)
    report: dict[str, tuple[str, list[str]]] = {}
    for trial_id, want in sorted(expected.items()):
        status = status_of.get(trial_id)
        if status is None:
            report[trial_id] = ("not screened", [f"{trial_id} is not screened"])
            continue
        if trial_id in hidden:
            ok = status == want
            report[trial_id] = (f"{status} (card hidden)", [] if ok else [f"expected {want}, got {status}"])
            continue
        trial_cards = by_trial.get(trial_id, [])
        problems = expectation_problems(trial_id, want, trial_cards, expected_criteria.get(trial_id))
        got = outcome_of(trial_cards)
        if not trial_cards:
            got = status
            if want not in CARD_STATUSES and status != want:
                problems.append(f"expected {want} (no card), the evaluation gave {status}")
        report[trial_id] = (got, problems)
    return report


def check_files(paths: list[Path], screener: Any, out: Any = None) -> int:
    """Evaluate scenario files in memory at their ``evaluatedAt``; print one line per scenario and trial.

    Returns the number of mismatches (a trial named in ``expected`` that is not screened counts)."""
    from ..patient_data.gather import RawPatientData

    out = out or sys.stdout
    mismatches = 0
    for path in paths:
        scenario = load_scenario_file(path)
        others = [r for r in scenario.resources() if r is not scenario.patient]
        data = RawPatientData(patient=scenario.patient, resources={"bundle": others})
        outcome = screener.screen(scenario.patient_id, data, scenario.at)
        cards = [card for _, card in screener.cards(outcome)]
        hidden = {r.trial.id for r in outcome.results if r.shows_card and not screener.renderer.shows(r)}
        report = outcome_problems(
            scenario.expected, scenario.expected_criteria, outcome.results, cards, hidden
        )
        for trial_id, (got, problems) in report.items():
            expected = scenario.expected[trial_id]
            mismatches += bool(problems)
            mark = "FAIL" if problems else "ok  "
            out.write(f"{mark} {scenario.name:<38} {trial_id}  expected {expected:<18} got {got}\n")
            for problem in problems:
                out.write(f"       - {problem}\n")
    return mismatches


def cmd_check(args: argparse.Namespace) -> int:
    from ..base.commandline import InputError
    from ..base.config import load_settings
    from ..screening import Screener

    paths = scenario_paths(args.path)
    try:
        mismatches = check_files(paths, Screener(load_settings(args.config)))
    except ScenarioFileError as exc:
        raise InputError(str(exc)) from None
    print(f"{len(paths)} scenario file(s), {mismatches} mismatch(es)")
    return 1 if mismatches else 0


def _wait_for(session: Any, base: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if session.get(f"{base}/metadata", timeout=5).status_code == 200:
                return True
        except requests.RequestException:
            pass  # not up yet
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


def cmd_load(args: argparse.Namespace) -> int:
    from ..base.commandline import InputError

    at = _at(args.at)
    base = args.fhir.rstrip("/")
    if not re.match(r"^https?://[^/\s]+", base):
        raise InputError(f"--fhir {args.fhir!r}: expected an http(s) URL, e.g. http://127.0.0.1:8090/fhir")
    bundles = _bundles(args, at)
    session = requests.Session()
    session.headers.update({"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
    if args.bearer:
        session.headers["Authorization"] = f"Bearer {args.bearer}"
    if not _wait_for(session, base, args.wait):
        print(
            f"cds-service scenarios load: {base}/metadata did not answer within {args.wait:g} s",
            file=sys.stderr,
        )
        return 2
    failures = 0
    for name, bundle in bundles:
        try:
            response = session.post(base, data=orjson.dumps(bundle), timeout=60)
        except requests.RequestException as exc:
            raise InputError(f"{base}: loading {name} failed: {type(exc).__name__}") from None
        if not response.ok:
            failures += 1
            print(f"{name}: HTTP {response.status_code}: {response.text[:300]}", file=sys.stderr)
    print(f"loaded {len(bundles) - failures} of {len(bundles)} scenario patients into {base} (at {iso(at)})")
    return 1 if failures else 0


def register(subparsers: Any) -> None:
    """Add ``cds-service scenarios write|load|check``."""
    parser = subparsers.add_parser(
        "scenarios", help="write scenario patient files, load them into a FHIR server, or check them"
    )
    _add_commands(parser.add_subparsers(dest="scenarios_command", required=True, metavar="COMMAND"))


def _add_commands(sub: Any) -> None:
    write = sub.add_parser("write", help="write every scenario as a JSON file plus an index README.md")
    write.add_argument("dir", help="folder to write into (e.g. examples/scenarios)")
    write.add_argument(
        "--at", type=parse_at, default=None, help="evaluation time, ISO 8601 with offset (default: now)"
    )
    write.set_defaults(func=cmd_write)
    load = sub.add_parser("load", help="PUT every scenario patient into a FHIR server (transaction Bundles)")
    load.add_argument("--fhir", required=True, help="FHIR base URL, e.g. http://localhost:8090/fhir")
    load.add_argument(
        "--at", type=parse_at, default=None, help="evaluation time the stories are built for (default: now)"
    )
    load.add_argument(
        "--files",
        default=None,
        help="load these scenario files (a folder), shifted to --at, instead of the built-in ones",
    )
    load.add_argument("--bearer", default=None, help="bearer token for the FHIR server")
    load.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for the server to answer (default 60)"
    )
    load.set_defaults(func=cmd_load)
    check = sub.add_parser(
        "check", help="evaluate scenario files in memory at their evaluatedAt and compare with `expected`"
    )
    check.add_argument("path", help="a scenario file or a folder of them (e.g. examples/scenarios)")
    check.add_argument("--config", default=None, help="YAML configuration file (default: $CDS_CONFIG)")
    check.set_defaults(func=cmd_check)


def main(argv: list[str] | None = None) -> int:
    """``python -m cds_service.tools.scenarios COMMAND``: nothing is written without a command."""
    from ..base.commandline import CommandParser

    parser = CommandParser(
        prog="python -m cds_service.tools.scenarios",
        description="The scenario patients. `examples` regenerates the files under examples/ "
        f"(evaluated at {iso(EXAMPLES_AT)}); the other commands are those of `cds-service scenarios`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    examples = sub.add_parser(
        "examples",
        help=f"regenerate examples/ (scenario files, hook request, patient Bundle) at {iso(EXAMPLES_AT)}",
    )
    examples.set_defaults(func=lambda _args: _write_examples_command())
    _add_commands(sub)
    args = parser.parse_args(argv)
    from ..base.commandline import InputError

    try:
        return int(args.func(args))
    except (InputError, OSError) as exc:
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return 2


def _write_examples_command() -> int:
    paths = write_examples()
    print(f"regenerated {len(paths)} files under {EXAMPLES_DIR} (evaluatedAt {iso(EXAMPLES_AT)})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
