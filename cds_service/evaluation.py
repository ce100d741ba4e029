"""Trial evaluation: every criterion met / not met / unknown / to confirm, then the trial's status.

Statuses:

- ``eligible`` — every computable criterion met, no exclusion met, only confirmation items left;
- ``possibly_eligible`` — nothing fails, but some computable criteria lack data (the card says what);
- ``upcoming`` — nothing fails but the enrollment window has not opened yet: an ``info`` card says
  when it opens, so the research team can prepare (I-MICRO randomises from 6 h after onset);
- ``window_closed`` / ``not_eligible`` — no card.
"""

from __future__ import annotations

from dataclasses import dataclass

from .criteria import CONFIRM, MET, NOT_MET, UNKNOWN, RuleResult, evaluate_rule
from .derived import ClinicalInputs, Derived, Evidence
from .trials import Criterion, Trial

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

    @property
    def blocks(self) -> bool:
        """True when this result rules the patient out."""
        return (self.criterion.kind == "inclusion" and self.status == NOT_MET) or (
            self.criterion.kind == "exclusion" and self.status == MET
        )


@dataclass(frozen=True)
class TrialResult:
    trial: Trial
    status: str
    at: float
    results: tuple[CriterionResult, ...]
    onset: Derived
    window_opens_at: float | None
    window_closes_at: float | None

    @property
    def shows_card(self) -> bool:
        return self.status in CARD_STATUSES

    def with_status(self, status: str) -> list[CriterionResult]:
        return [r for r in self.results if r.status == status]

    @property
    def blocking(self) -> list[CriterionResult]:
        return [r for r in self.results if r.blocks]

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
        criterion, result.status, result.evidence, tuple(dict.fromkeys(missing)), result.summary
    )


def evaluate_trial(trial: Trial, inputs: ClinicalInputs) -> TrialResult:
    results = tuple(evaluate_criterion(c, inputs) for c in trial.criteria)
    anchor = inputs.scalar(trial.window_anchor) or Derived(None, "unknown")
    opens = closes = None
    if anchor.value is not None:
        opens = float(anchor.value) + trial.window_opens
        closes = float(anchor.value) + trial.window_closes
    if any(r.blocks for r in results):
        status = NOT_ELIGIBLE
    elif closes is not None and inputs.at > closes:
        status = WINDOW_CLOSED
    elif opens is not None and inputs.at < opens:
        status = UPCOMING
    elif any(r.status == UNKNOWN for r in results):
        status = POSSIBLY
    else:
        status = ELIGIBLE
    return TrialResult(trial, status, inputs.at, results, anchor, opens, closes)
