"""Per-process service state: loaded knowledge, the FHIR client, the store, the JWT verifier.

Heavy, fork-unsafe things (HTTP sessions, database connections) are created lazily in the worker
process that uses them, never in the gunicorn master before the fork.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from .base.config import Settings
from .base.errors import HookError
from .base.metrics import Metrics
from .cards.referral import referral_suggestion_uuid
from .clinical.evaluation import ELIGIBLE, POSSIBLY, TrialResult
from .patient_data.fhir_client import FhirClient
from .patient_data.gather import gather
from .patient_data.hook_request import HookRequest
from .screening import Screener
from .store import REFERRAL_REASON, Feedback, IssuedCard, OverrideInfo, Store, open_store

log = logging.getLogger(__name__)

SERVICE_ID = "septic-shock-trial-screening"
HOOK = "patient-view"


class ServiceState:
    def __init__(self, settings: Settings, screener: Screener | None = None, metrics: Metrics | None = None):
        self.settings = settings
        self.screener = screener or Screener(settings)
        self.metrics = metrics or Metrics()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._client: FhirClient | None = None
        self._store: Store | None = None
        self.verifier: Any = None
        if settings.auth_enabled:
            from .protocol.auth import JwtVerifier

            self.verifier = JwtVerifier(settings.section("security"), self._remember_jti)

    # -- process-local resources --------------------------------------------------------------------
    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            self._pid, self._client, self._store = os.getpid(), None, None
            self._lock = threading.Lock()

    @property
    def client(self) -> FhirClient:
        self._check_fork()
        if self._client is None:
            with self._lock:  # threaded servers: open one client, not one per racing request
                if self._client is None:
                    self._client = FhirClient(self.settings.section("fhir"), on_query=self.metrics.fhir_query)
        return self._client

    @property
    def store(self) -> Store:
        self._check_fork()
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = open_store(self.settings.section("store")["url"])
        return self._store

    def _remember_jti(self, jti: str, expires_at: float, issuer: str = "") -> bool:
        return self.store.remember_jti(issuer, jti, expires_at)

    # -- discovery ----------------------------------------------------------------------------------
    @property
    def service_ids(self) -> set[str]:
        return {SERVICE_ID}

    def hook_of(self, service_id: str) -> str:
        return HOOK

    def discovery(self) -> list[dict[str, Any]]:
        trials = self.screener.trials
        names = ", ".join(f"{t.short_name} ({t.id}, {t.registry_status})" for t in trials)
        return [
            {
                "hook": HOOK,
                "id": SERVICE_ID,
                "title": "Septic-shock clinical trial screening",
                "description": f"Screens ICU patients in septic shock for clinical trials: {names}. "
                "Suggests referral to the research team; never decides eligibility.",
                "prefetch": self.screener.plan.templates(),
                "usageRequirements": "Needs read access to Patient, Observation, "
                "MedicationAdministration and Condition for the patient in context.",
            }
        ]

    def audience(self, path: str) -> str:
        public_url = self.settings.section("server")["public_url"].rstrip("/")
        return f"{public_url}{path}"

    # -- the hook -----------------------------------------------------------------------------------
    def answer(self, service_id: str, request: HookRequest, started: float) -> list[dict[str, Any]]:
        fhir = self.settings.section("fhir")
        deadline = started + float(fhir["deadline_seconds"])
        if request.prefetch is None and not request.fhir_server:
            raise HookError(412, "no prefetch and no fhirServer: there is no patient data to screen")
        client = self.client if request.fhir_server else None
        at = time.time()
        data = gather(request, self.screener.plan, client, fhir, at, deadline)
        outcome = self.screener.screen(request.patient_id, data, at)
        cards = self.issue_cards(request, outcome.results, at)
        log.info(
            "screened",
            extra={
                "fields": {
                    "trials": {r.trial.id: r.status for r in outcome.results},
                    "fetched": data.fetched,
                    "cards": len(cards),
                    "unknown_codes": sum(outcome.facts.unknown_codes.values()),
                    "skipped": sum(outcome.facts.skipped.values()),
                }
            },
        )
        return cards

    # -- cards and feedback ---------------------------------------------------------------------------
    def issue_cards(
        self, request: HookRequest, results: list[TrialResult], at: float
    ) -> list[dict[str, Any]]:
        """Render, remember and return a card per result that shows one, minus the silenced ones.

        Each card is written to the store before it is returned (card uuid -> patient, trial, hook
        instance, time, status): that row is the screening log and what feedback is matched to. If
        the store cannot be reached the cards are still returned — clinicians keep the information;
        their feedback will then be logged as feedback for an unknown card.
        """
        silence = float(self.settings.section("screening")["override_silence_hours"]) * 3600
        store_ok = True  # after one failure this call stops trying (each attempt may wait for a timeout)
        cards: list[dict[str, Any]] = []
        for result in results:
            if not result.shows_card:
                continue
            trial_id = result.trial.id
            previous: OverrideInfo | None = None
            if silence and store_ok:
                try:
                    previous = self.store.last_override_or_referral(
                        request.patient_id, trial_id, at - silence
                    )
                except Exception:
                    log.exception("store unavailable: cards shown without the silence check")
                    store_ok = False
            if previous is not None and keeps_silent(previous, result.status):
                log.info(
                    "card silenced by earlier feedback",
                    extra={
                        "fields": {"trial": trial_id, "outcome": previous.outcome, "card": previous.card_uuid}
                    },
                )
                continue
            card = self.screener.renderer.render(
                result, patient_id=request.patient_id, user_id=request.user_id
            )
            if store_ok:
                try:
                    self.store.log_screening(
                        IssuedCard(
                            card_uuid=card["uuid"],
                            patient_id=request.patient_id,
                            trial_id=trial_id,
                            hook_instance=request.hook_instance,
                            issued_at=at,
                            status=result.status,
                            criteria_unmet=[r.criterion.id for r in result.blocking],
                            criteria_unknown=[r.criterion.id for r in result.unknown],
                            criteria_to_confirm=[r.criterion.id for r in result.to_confirm],
                        )
                    )
                except Exception:
                    log.exception("store unavailable: cards shown but not in the screening log")
                    store_ok = False
            self.metrics.card_issued(trial_id, result.status)
            cards.append(card)
        return cards

    def record_feedback(self, item: dict[str, Any], outcome_time: float) -> None:
        """Store one feedback entry (idempotent); an accepted referral suggestion is logged as a referral.

        Feedback for a card uuid the store does not know is stored and logged, never refused: clients
        retry, and a card issued while the store was down is unknown to it.
        """
        card_uuid = item["card"].lower()
        override = item.get("overrideReason") or {}
        reason = override.get("reason") or {}
        accepted = [str(s["id"]).lower() for s in item.get("acceptedSuggestions") or []]
        referral = item["outcome"] == "accepted" and referral_suggestion_uuid(card_uuid) in accepted
        feedback = Feedback(
            card_uuid=card_uuid,
            outcome=item["outcome"],
            outcome_timestamp=outcome_time,
            received_at=time.time(),
            reason_code=REFERRAL_REASON if referral else reason.get("code"),
            reason_display=REFERRAL_DISPLAY if referral else reason.get("display"),
            user_comment=override.get("userComment"),
            accepted_suggestions=accepted,
        )
        card = self.store.get_card(card_uuid)
        new = self.store.record_feedback(feedback)
        fields: dict[str, Any] = {"outcome": item["outcome"], "card": card_uuid, "repeat": not new}
        if card is None:
            log.info("feedback for an unknown card accepted", extra={"fields": fields})
        elif referral:
            log.info(
                "referral to the research team recorded", extra={"fields": {**fields, "trial": card.trial_id}}
            )
        else:
            log.info("feedback recorded", extra={"fields": {**fields, "trial": card.trial_id}})
        self.metrics.feedback(item["outcome"], new)


#: Stored with REFERRAL_REASON on an accepted referral (the screening log's ``reason`` column).
REFERRAL_DISPLAY = "Referred to the research team"


def keeps_silent(previous: OverrideInfo, status: str) -> bool:
    """Whether earlier feedback on this patient's card for the trial keeps the new card silent.

    An override, or an accepted referral, within the silence period does — unless the trial status
    rose from possibly eligible (when the feedback was given) to eligible now: that is news worth a
    card. An acceptance without the referral suggestion silences nothing.
    """
    return not (previous.status == POSSIBLY and status == ELIGIBLE)
