"""The screening pipeline: raw patient data → facts → derived inputs → trial results → cards.

``Screener`` holds everything loaded once at start-up (mappings, trials, templates) and runs the
steps in order; the HTTP layer and the CLI both call it, so they cannot disagree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .base.config import Settings
from .base.facts import PatientFacts
from .cards.render import CardRenderer, WorksheetLink
from .clinical.derived import ClinicalInputs, derive_inputs, load_derivation_params
from .clinical.evaluation import TrialResult, evaluate_trial
from .knowledge.mappings import Knowledge, load_knowledge
from .knowledge.trials import Trial, load_trials
from .patient_data.extract import extract
from .patient_data.gather import PrefetchPlan, RawPatientData, build_prefetch_plan
from .patient_data.lean_json import LeanDecoder


@dataclass(frozen=True)
class ScreeningOutcome:
    facts: PatientFacts
    inputs: ClinicalInputs
    results: list[TrialResult]


class Screener:
    """Loaded knowledge + the pipeline steps after data gathering."""

    def __init__(self, settings: Settings):
        data_dir = settings.data_dir
        self.settings = settings
        self.knowledge: Knowledge = load_knowledge(data_dir)
        self.derivation_params: dict[str, Any] = load_derivation_params(data_dir)
        self.trials: list[Trial] = load_trials(
            data_dir, self.knowledge, settings.section("screening")["trials"]
        )
        self.plan: PrefetchPlan = build_prefetch_plan(
            self.knowledge, self.trials, int(settings.section("fhir")["page_size"])
        )
        #: Decodes a hook request's body as far as this plan's screening reads it.
        self.request_decoder = LeanDecoder.for_plan(self.plan)
        worksheet = settings.section("worksheet")
        self.renderer = CardRenderer(
            data_dir,
            settings.section("screening"),
            self.trials,
            # With the worksheet on, the card carries the checklist's count and links to the worksheet.
            worksheet_enabled=bool(worksheet["enabled"]),
            worksheet_link=(
                WorksheetLink(f"{settings.worksheet_url}/worksheet/launch", worksheet["link_label"])
                if worksheet["enabled"]
                else None
            ),
        )

    def screen(self, patient_id: str, data: RawPatientData, at: float | None = None) -> ScreeningOutcome:
        at = time.time() if at is None else at
        facts = extract(patient_id, data.patient, data.all_resources(), self.knowledge)
        by_key = {query.key: query.delivers for query in self.plan.queries}
        for key in data.unavailable:
            facts.unavailable |= by_key.get(key, frozenset())
        inputs = derive_inputs(facts, self.knowledge, self.derivation_params, at)
        results = [evaluate_trial(trial, inputs) for trial in self.trials]
        return ScreeningOutcome(facts, inputs, results)

    def cards(
        self, outcome: ScreeningOutcome, user_id: str | None = None
    ) -> list[tuple[TrialResult, dict[str, Any]]]:
        """A card per trial result that shows one, in the card order (``user_id`` becomes the
        referral's requester)."""
        patient_id = outcome.facts.patient_id
        return [
            (result, self.renderer.render(result, patient_id=patient_id, user_id=user_id))
            for result in self.renderer.shown(outcome.results)
        ]
