"""Trial evaluation: every criterion met / not met / unknown / to confirm, then the trial's status.

Statuses:

- ``eligible`` — every computable criterion met, no exclusion met, only confirmation items left;
- ``possibly_eligible`` — nothing fails, but some computable criteria lack data (the card says what);
- ``upcoming`` — nothing fails, but the enrollment window has not opened yet: an ``info`` card says
  when it opens, so the research team can prepare (I-MICRO randomises from 6 h after onset);
- ``window_closed`` — nothing else fails, but the window has closed: no card;
- ``not_eligible`` — a criterion rules the patient out: no card.

The window. It opens ``opens_after`` the trial's anchor (septic-shock onset) or, when later, when
the last inclusion criterion whose clock is running will be met (a ``sustained`` run still going on
but not yet long enough: its ``due`` time). It closes ``closes_after`` the anchor or, when earlier,
when a not-yet-met exclusion's clock runs out. An exclusion marked ``closes_window`` *is* the
enrollment clock ("inclusion criteria met for more than 12 h"): once met, the status is
``window_closed`` rather than ``not_eligible``.

Decision (documented in docs/trials.md): before the window opens an ``upcoming`` info card is shown
rather than nothing — the research team needs hours to prepare consent and randomisation, and a
silent screen would surface the patient only once the clock is already running. The card says when
the window opens; data still missing at that point is listed as usual once the window is open.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..knowledge.criteria_language import CONFIRM, MET, NOT_MET, UNKNOWN
from ..knowledge.trials import Criterion, Trial
from .criteria import RuleResult, evaluate_rule
from .derived import ClinicalInputs, Derived, Evidence

ELIGIBLE, POSSIBLY, UPCOMING = "eligible", "possibly_eligible", "upcoming"
NOT_ELIGIBLE, WINDOW_CLOSED = "not_eligible", "window_closed"
CARD_STATUSES = (ELIGIBLE, POSSIBLY, UPCOMING)


@dataclass(frozen=True)
class CriterionResult:
    criterion: Criterion
    status: str
    evidence: tuple[Evidence, ...]
    missing: tuple[str, ...]
    summary: str
    due: float | None = None  # not met yet; met at this time if nothing changes
    #: What the rule found missing, as it said it ("mottling score within the last 6h"); ``missing``
    #: is the trial file's ``measure`` when it has one (referral notes), this is the specific gap the
    #: card shows beside the values that are charted.
    gaps: tuple[str, ...] = ()

    @property
    def blocks(self) -> bool:
        """True when this result rules the patient out (now)."""
        return (self.criterion.kind == "inclusion" and self.status == NOT_MET) or (
            self.criterion.kind == "exclusion" and self.status == MET
        )

    @property
    def pending(self) -> bool:
        """An inclusion criterion not met yet whose clock is running (met at ``due``)."""
        return self.criterion.kind == "inclusion" and self.status == NOT_MET and self.due is not None

    @property
    def closes(self) -> bool:
        """A met exclusion that is the enrollment clock: the window has closed."""
        return self.criterion.closes_window and self.criterion.kind == "exclusion" and self.status == MET


@dataclass(frozen=True)
class TrialResult:
    trial: Trial
    status: str
    at: float
    results: tuple[CriterionResult, ...]
    onset: Derived  # the septic-shock onset (shown on every card)
    window_opens_at: float | None
    window_closes_at: float | None
    #: What the window is timed from (the trial's `enrollment_window.anchor`): the septic-shock
    #: onset, or e.g. the norepinephrine start for I-MICRO.
    anchor: Derived | None = None
    anchor_name: str = "septic_shock_onset"

    @property
    def shows_card(self) -> bool:
        return self.status in CARD_STATUSES

    def with_status(self, status: str) -> list[CriterionResult]:
        return [r for r in self.results if r.status == status]

    @property
    def blocking(self) -> list[CriterionResult]:
        return [r for r in self.results if r.blocks]

    @property
    def pending(self) -> list[CriterionResult]:
        """Inclusion criteria whose clock is running: the reason the window has not opened yet."""
        return [r for r in self.results if r.pending]

    @property
    def unknown(self) -> list[CriterionResult]:
        return self.with_status(UNKNOWN)

    @property
    def to_confirm(self) -> list[CriterionResult]:
        return self.with_status(CONFIRM)

    @property
    def met_inclusions(self) -> list[CriterionResult]:
        return [r for r in self.results if r.criterion.kind == "inclusion" and r.status == MET]


def evaluate_criterion(criterion: Criterion, inputs: ClinicalInputs) -> CriterionResult:
    if criterion.rule is None:
        return CriterionResult(criterion, CONFIRM, (), (), "")
    result: RuleResult = evaluate_rule(inputs, criterion.rule)
    missing = (criterion.measure,) if result.status == UNKNOWN and criterion.measure else result.missing
    return CriterionResult(
        criterion,
        result.status,
        result.evidence,
        tuple(dict.fromkeys(missing)),
        result.summary,
        result.due if result.status == NOT_MET else None,
        tuple(dict.fromkeys(result.missing)) if result.status == UNKNOWN else (),
    )


def _window(trial: Trial, anchor: Derived, results: tuple[CriterionResult, ...]) -> tuple[float | None, ...]:
    """(opens, closes): the anchor's window narrowed by the running clocks of the criteria."""
    opens = closes = None
    if anchor.value is not None:
        opens = float(anchor.value) + trial.window_opens
        closes = float(anchor.value) + trial.window_closes
    for r in results:
        if r.pending and r.due is not None:
            opens = r.due if opens is None else max(opens, r.due)
        elif r.criterion.kind == "exclusion" and r.status == NOT_MET and r.due is not None:
            closes = r.due if closes is None else min(closes, r.due)
    return opens, closes


def evaluate_trial(trial: Trial, inputs: ClinicalInputs) -> TrialResult:
    results = tuple(evaluate_criterion(c, inputs) for c in trial.criteria)
    anchor = inputs.scalar(trial.window_anchor) or Derived(None, "unknown")
    onset = inputs.scalar("septic_shock_onset") or anchor
    opens, closes = _window(trial, anchor, results)
    if any(r.blocks and not r.pending and not r.closes for r in results):
        status = NOT_ELIGIBLE
    elif any(r.closes for r in results) or (closes is not None and inputs.at > closes):
        status = WINDOW_CLOSED
    elif opens is not None and closes is not None and opens > closes:
        status = NOT_ELIGIBLE  # the clocks say the window would close before it opens
    elif any(r.pending for r in results) or (opens is not None and inputs.at < opens):
        status = UPCOMING
    elif any(r.status == UNKNOWN for r in results):
        status = POSSIBLY
    else:
        status = ELIGIBLE
    return TrialResult(trial, status, inputs.at, results, onset, opens, closes, anchor, trial.window_anchor)
