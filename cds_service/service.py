"""Per-process service state: loaded knowledge, the FHIR client, the store, the JWT verifier.

Heavy, fork-unsafe things (HTTP sessions, database connections) are created lazily in the worker
process that uses them, never in the gunicorn master before the fork.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from .config import Settings
from .errors import HookError
from .evaluation import ELIGIBLE, POSSIBLY
from .fhir_client import FhirClient
from .hook_request import HookRequest
from .metrics import Metrics
from .patient_data import gather
from .screening import Screener
from .store import Feedback, IssuedCard, Store, open_store

log = logging.getLogger(__name__)

SERVICE_ID = "septic-shock-trial-screening"
HOOK = "patient-view"


class ServiceState:
    def __init__(self, settings: Settings, screener: Screener | None = None, metrics: Metrics | None = None):
        self.settings = settings
        self.screener = screener or Screener(settings)
        self.metrics = metrics or Metrics()
        self._pid = os.getpid()
        self._client: FhirClient | None = None
        self._store: Store | None = None
        self.verifier: Any = None
        if settings.auth_enabled:
            from .auth import JwtVerifier

            self.verifier = JwtVerifier(settings.section("security"), self._remember_jti)

    # -- process-local resources --------------------------------------------------------------------
    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            self._pid, self._client, self._store = os.getpid(), None, None

    @property
    def client(self) -> FhirClient:
        self._check_fork()
        if self._client is None:
            self._client = FhirClient(self.settings.section("fhir"))
        return self._client

    @property
    def store(self) -> Store:
        self._check_fork()
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
        cards: list[dict[str, Any]] = []
        silence = float(self.settings.section("screening")["override_silence_hours"]) * 3600
        for result, card in self.screener.cards(outcome):
            override = (
                self.store.last_override(request.patient_id, result.trial.id, at - silence)
                if silence
                else None
            )
            if override is not None and not (override.status == POSSIBLY and result.status == ELIGIBLE):
                log.info("card silenced after an override", extra={"fields": {"trial": result.trial.id}})
                continue
            self.store.record_card(
                IssuedCard(
                    card_uuid=card["uuid"],
                    patient_id=request.patient_id,
                    trial_id=result.trial.id,
                    hook_instance=request.hook_instance,
                    issued_at=at,
                    status=result.status,
                    criteria_unmet=[r.criterion.id for r in result.blocking],
                    criteria_unknown=[r.criterion.id for r in result.unknown],
                    criteria_to_confirm=[r.criterion.id for r in result.to_confirm],
                )
            )
            self.metrics.card_issued(result.trial.id, result.status)
            cards.append(card)
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

    def record_feedback(self, item: dict[str, Any], outcome_time: float) -> None:
        reason = (item.get("overrideReason") or {}).get("reason") or {}
        feedback = Feedback(
            card_uuid=item["card"],
            outcome=item["outcome"],
            outcome_timestamp=outcome_time,
            received_at=time.time(),
            reason_code=reason.get("code"),
            reason_display=reason.get("display"),
            user_comment=(item.get("overrideReason") or {}).get("userComment"),
            accepted_suggestions=[s["id"] for s in item.get("acceptedSuggestions") or []],
        )
        known = self.store.get_card(item["card"]) is not None
        new = self.store.record_feedback(feedback)
        if not known:
            log.info("feedback for an unknown card accepted", extra={"fields": {"outcome": item["outcome"]}})
        self.metrics.feedback(item["outcome"], new)
