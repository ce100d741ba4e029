"""Per-process service state: loaded knowledge, the FHIR client, the store, the JWT verifier.

Fork-unsafe things (the FHIR client's HTTP session and threads) are created lazily in the worker
process that uses them. The store is opened in the gunicorn master (``serving.py``: its migrations
run once) and is fork-safe: each process opens its own database connections.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

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

_T = TypeVar("_T")

SERVICE_ID = "septic-shock-trial-screening"
HOOK = "patient-view"


class StoreGate:
    """Runs the hook path's store calls on a few threads of their own and waits for each at most a
    given time, so that a slow or unreachable store cannot hold up the answer.

    A call still running at its timeout goes on in the background (a card row is then recorded a
    little after the answer, or its failure is logged). At most ``max_backlog`` calls wait or run at
    once; beyond that a call is not started at all (and logged), so an unreachable store cannot pile
    up work. Fork-safe: a child process gets its own threads on first use.
    """

    def __init__(self, threads: int = 2, max_backlog: int = 64) -> None:
        self._threads = threads
        self._max_backlog = max_backlog
        self._lock = threading.Lock()
        self._pid = -1
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._backlog = 0

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._pid != os.getpid():
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    self._threads, thread_name_prefix="store"
                )
                self._pid, self._backlog = os.getpid(), 0
            return self._executor

    def call(self, what: str, work: Callable[[], _T], timeout: float | None) -> tuple[bool, _T | None]:
        """``(True, result)`` when ``work`` finished within ``timeout`` seconds (None: do not wait),
        else ``(False, None)``. Exceptions of ``work`` are logged here, never raised."""
        pool = self._pool()
        with self._lock:
            if self._backlog >= self._max_backlog:
                log.error("store backlog full: %s skipped", what)
                return False, None
            self._backlog += 1

        def run() -> _T | None:
            try:
                return work()
            except Exception:
                log.exception("store unavailable: %s failed", what)
                raise
            finally:
                with self._lock:
                    self._backlog -= 1

        future = pool.submit(run)
        if timeout is None:
            return False, None
        try:
            return True, future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            log.warning("store slow: answering before %s finished (it goes on in the background)", what)
            return False, None
        except Exception:
            return False, None  # already logged by run()

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued call has finished (tests; a stopping worker)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._backlog <= 0:
                    return
            time.sleep(0.01)


class ServiceState:
    def __init__(self, settings: Settings, screener: Screener | None = None, metrics: Metrics | None = None):
        self.settings = settings
        self.screener = screener or Screener(settings)
        self.metrics = metrics or Metrics()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._client: FhirClient | None = None
        self._store: Store | None = None
        self.store_gate = StoreGate()
        self.verifier: Any = None
        if settings.auth_enabled:
            from .protocol.auth import JwtVerifier

            self.verifier = JwtVerifier(settings.section("security"), self._remember_jti)

    # -- process-local resources --------------------------------------------------------------------
    def _check_fork(self) -> None:
        # The FHIR client's threads do not survive a fork: a new one per process. The store is kept:
        # it is fork-safe itself (it opens new connections in the child and never closes inherited
        # ones), and opening it again would run its schema check inside a worker's first hook.
        if os.getpid() != self._pid:
            self._pid, self._client = os.getpid(), None
            self._lock = threading.Lock()

    @property
    def client(self) -> FhirClient:
        self._check_fork()
        if self._client is None:
            with self._lock:  # threaded servers: open one client, not one per racing request
                if self._client is None:
                    self._client = FhirClient(
                        self.settings.section("fhir"),
                        on_query=self.metrics.fhir_query,
                        # Metrics labels: the resource types the service asks for, else "other".
                        resource_types={q.resource_type for q in self.screener.plan.queries},
                        # Each of the worker's threads may be answering a hook that fetches.
                        concurrent_hooks=int(self.settings.section("server")["threads"]),
                    )
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
        """Render, remember and return a card per result that shows one, minus the silenced ones, in
        the card order (``cards/render.py``: status, recruiting first, earliest closing window).

        Each card is written to the store before it is returned (card uuid -> patient, trial, hook
        instance, time, status): that row is the screening log and what feedback is matched to. The
        store gets ``store.hook_timeout_seconds`` for the silence check and as long again for the
        write; when it is slower or down the cards are returned anyway — clinicians keep the
        information — and the log says so (a slow write still completes in the background; feedback
        on a card that never reached the store is logged as feedback for an unknown card).
        """
        store_settings = self.settings.section("store")
        timeout = float(store_settings["hook_timeout_seconds"])
        silence = float(self.settings.section("screening")["override_silence_hours"]) * 3600
        shown = self.screener.renderer.shown(results)
        previous: dict[str, OverrideInfo | None] = {}
        if silence and shown:
            trial_ids = [result.trial.id for result in shown]

            def lookup() -> dict[str, OverrideInfo | None]:
                return {
                    trial_id: self.store.last_override_or_referral(request.patient_id, trial_id, at - silence)
                    for trial_id in trial_ids
                }

            done, found = self.store_gate.call("the silence check", lookup, timeout)
            if done and found is not None:
                previous = found
            else:
                log.warning("cards shown without the silence check (store slow or unavailable)")
        cards: list[dict[str, Any]] = []
        rows: list[IssuedCard] = []
        for result in shown:
            trial_id = result.trial.id
            earlier = previous.get(trial_id)
            if earlier is not None and keeps_silent(earlier, result.status):
                log.info(
                    "card silenced by earlier feedback",
                    extra={
                        "fields": {"trial": trial_id, "outcome": earlier.outcome, "card": earlier.card_uuid}
                    },
                )
                continue
            card = self.screener.renderer.render(
                result, patient_id=request.patient_id, user_id=request.user_id
            )
            rows.append(
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
                    trial_version=result.trial.version,
                    mappings_version=self.screener.knowledge.version,
                )
            )
            self.metrics.card_issued(trial_id, result.status)
            cards.append(card)
        if rows:
            self.store_gate.call(
                f"recording {len(rows)} issued card(s)", lambda: self.store.record_cards(rows), timeout
            )
        retention_days = float(store_settings["retention_days"])
        self.store_gate.call("the retention purge", lambda: self.store.purge_if_due(retention_days), None)
        return cards

    def record_feedback(self, items: list[tuple[dict[str, Any], float]]) -> None:
        """Store the entries of one feedback message, all or none (idempotent per entry); an accepted
        referral suggestion is logged as a referral. ``items`` holds (entry, outcome time) pairs.

        Feedback for a card uuid the store does not know is stored and logged, never refused: clients
        retry, and a card issued while the store was down is unknown to it.
        """
        received = time.time()
        entries = [(item, self._feedback(item, outcome_time, received)) for item, outcome_time in items]
        fresh = self.store.record_feedback_items([feedback for _, feedback in entries])
        for (item, feedback), new in zip(entries, fresh, strict=True):
            card = self.store.get_card(feedback.card_uuid)
            referral = feedback.reason_code == REFERRAL_REASON and feedback.outcome == "accepted"
            fields: dict[str, Any] = {
                "outcome": feedback.outcome,
                "card": feedback.card_uuid,
                "repeat": not new,
            }
            if card is None:
                log.info("feedback for an unknown card accepted", extra={"fields": fields})
            elif referral:
                log.info(
                    "referral to the research team recorded",
                    extra={"fields": {**fields, "trial": card.trial_id}},
                )
            else:
                log.info("feedback recorded", extra={"fields": {**fields, "trial": card.trial_id}})
            self.metrics.feedback(item["outcome"], new)

    @staticmethod
    def _feedback(item: dict[str, Any], outcome_time: float, received: float) -> Feedback:
        """A validated feedback entry as a store record (an accepted referral gets REFERRAL_REASON)."""
        card_uuid = item["card"].lower()
        override = item.get("overrideReason") or {}
        reason = override.get("reason") or {}
        accepted = [str(s["id"]).lower() for s in item.get("acceptedSuggestions") or []]
        referral = item["outcome"] == "accepted" and referral_suggestion_uuid(card_uuid) in accepted
        return Feedback(
            card_uuid=card_uuid,
            outcome=item["outcome"],
            outcome_timestamp=outcome_time,
            received_at=received,
            reason_code=REFERRAL_REASON if referral else reason.get("code"),
            reason_display=REFERRAL_DISPLAY if referral else reason.get("display"),
            user_comment=override.get("userComment"),
            accepted_suggestions=accepted,
        )


#: Stored with REFERRAL_REASON on an accepted referral (the screening log's ``reason`` column).
REFERRAL_DISPLAY = "Referred to the research team"


def keeps_silent(previous: OverrideInfo, status: str) -> bool:
    """Whether earlier feedback on this patient's card for the trial keeps the new card silent.

    An override, or an accepted referral, within the silence period does — unless the trial status
    rose from possibly eligible (when the feedback was given) to eligible now: that is news worth a
    card. An acceptance without the referral suggestion silences nothing.
    """
    return not (previous.status == POSSIBLY and status == ELIGIBLE)
