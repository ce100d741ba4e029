"""What the worksheet shows, from the same trial results the cards are made of.

The worksheet runs the one screening pipeline (``screening.Screener``: patient data → facts →
derived inputs → trial results); this module only shapes its results for the page: every screened
trial with its status and window, every criterion of the trial file with its result, the values and
times that decided it and the records they came from, the bedside checklist and the decisions a user
can record. Times are in ``screening.timezone`` (``cards/text.py``'s :class:`LocalClock`); evidence
text goes through the same cleaning as card text (local times, allowed characters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..cards.text import LocalClock, clean, duration
from ..clinical.derived import Evidence
from ..clinical.evaluation import (
    CARD_STATUSES,
    ELIGIBLE,
    NOT_ELIGIBLE,
    POSSIBLY,
    UPCOMING,
    WINDOW_CLOSED,
    CriterionResult,
    TrialResult,
)
from ..knowledge.criteria_language import CONFIRM, MET, NOT_MET, UNKNOWN
from ..store import REFERRAL_REASON, ScreeningLogRow

STATUS_LABELS = {
    ELIGIBLE: "Eligible",
    POSSIBLY: "Possibly eligible",
    UPCOMING: "Upcoming",
    NOT_ELIGIBLE: "Not eligible",
    WINDOW_CLOSED: "Enrollment window closed",
}
STATUS_EXPLAINED = {
    ELIGIBLE: "Every criterion the chart can answer is met; the bedside items below remain to confirm.",
    POSSIBLY: "Nothing charted rules the patient out, but some criteria lack data.",
    UPCOMING: "Nothing charted rules the patient out yet; the enrollment window has not opened.",
    NOT_ELIGIBLE: "A criterion rules the patient out (marked below).",
    WINDOW_CLOSED: "The enrollment window has closed.",
}


@dataclass(frozen=True)
class Decision:
    """A decision the worksheet records, as the card feedback it becomes (``store.Feedback``)."""

    key: str
    label: str
    outcome: str  # accepted | overridden
    reason_code: str
    reason_display: str
    needs_reason: bool = False


#: The decision buttons. A referral is an accepted referral (as the card's suggestion would be); the
#: others are overrides with a reason. Each silences the trial's cards like feedback on a card.
DECISIONS: tuple[Decision, ...] = (
    Decision(
        "referred",
        "Referred to the research team",
        "accepted",
        REFERRAL_REASON,
        "Referred to the research team",
    ),
    Decision("not-eligible", "Not eligible", "overridden", "not-eligible", "Not eligible", needs_reason=True),
    Decision("family-declined", "Family declined", "overridden", "declined", "Declined by patient or family"),
    Decision(
        "enrolled-elsewhere",
        "Already enrolled elsewhere",
        "overridden",
        "other-trial",
        "Enrolled in another trial",
    ),
)
DECISIONS_BY_KEY = {decision.key: decision for decision in DECISIONS}


@dataclass(frozen=True)
class EvidenceLine:
    text: str
    when: str | None  # local time ("today 14:30"), None for undated facts (age, sex)
    sources: tuple[str, ...]  # the records: "Observation/abc"


@dataclass(frozen=True)
class CriterionLine:
    id: str
    kind: str  # inclusion | exclusion
    text: str
    result: str  # met | not_met | unknown | to_confirm (the extension's names)
    result_label: str
    rules_out: bool
    evidence: tuple[EvidenceLine, ...]
    needs: tuple[str, ...]  # what to chart (unknown)
    to_confirm: bool
    confirm_text: str | None
    source_quote: str
    note: str


@dataclass(frozen=True)
class ChecklistItem:
    id: str
    label: str
    charted: tuple[EvidenceLine, ...]
    confirmed: bool


@dataclass(frozen=True)
class LastRecord:
    when: str
    by: str
    decision: str | None  # the reason shown in the screening log ("Not eligible (reason)")
    checklist: tuple[str, ...]


@dataclass(frozen=True)
class TrialSheet:
    id: str
    short_name: str
    title: str
    registry_url: str
    registry_status: str
    recruiting: bool
    status: str
    status_label: str
    status_explained: str
    window: str
    criteria: tuple[CriterionLine, ...]
    checklist: tuple[ChecklistItem, ...]
    decidable: bool  # a card status: the decisions and the checklist can be recorded
    last: LastRecord | None
    counts: dict[str, int] = field(default_factory=dict)


def _result_label(r: CriterionResult) -> str:
    if r.status == CONFIRM:
        return "To confirm at the bedside"
    if r.status == UNKNOWN:
        return "Unknown: needs data"
    if r.criterion.kind == "exclusion":
        return "Applies: rules the patient out" if r.status == MET else "Does not apply"
    if r.status == MET:
        return "Met"
    return "Not met yet" if r.pending else "Not met: rules the patient out"


_RESULT_NAMES = {MET: "met", NOT_MET: "not_met", UNKNOWN: "unknown", CONFIRM: "to_confirm"}


def _evidence(items: tuple[Evidence, ...], clock: LocalClock) -> tuple[EvidenceLine, ...]:
    lines = []
    for item in dict.fromkeys(items):
        lines.append(
            EvidenceLine(
                text=clean(item.text, clock),
                when=clock.at(item.time) if item.time is not None else None,
                sources=tuple(item.resources),
            )
        )
    return tuple(lines)


def _window(result: TrialResult, clock: LocalClock) -> str:
    opens, closes = result.window_opens_at, result.window_closes_at
    if opens is None and closes is None:
        return "Unknown: no septic-shock onset established in the chart."
    parts = []
    if opens is not None:
        parts.append(f"opens {clock.at(opens)}" if opens > result.at else f"opened {clock.at(opens)}")
    left = ""
    if closes is not None:
        if closes > result.at:
            parts.append(f"closes {clock.at(closes)}")
            left = f", {duration(closes - result.at)} left"
        else:
            parts.append(f"closed {clock.at(closes)}")
    anchor = result.onset.value
    onset = f"; septic-shock onset {clock.at(float(anchor))}" if anchor is not None else ""
    text = ", ".join(parts)
    return f"{text[:1].upper()}{text[1:]} ({clock.zone_label}){left}{onset}."


def _last(row: ScreeningLogRow | None, clock: LocalClock) -> LastRecord | None:
    if row is None:
        return None
    return LastRecord(
        when=clock.at(row.time),
        by=row.recorded_by,
        decision=row.reason if row.outcome else None,
        checklist=tuple(row.checklist_confirmed),
    )


def trial_sheet(
    result: TrialResult,
    zone: str,
    last: ScreeningLogRow | None = None,
    labels: dict[str, dict[str, str]] | None = None,
) -> TrialSheet:
    """One trial's part of the worksheet. ``last`` is the latest worksheet record (its checklist
    shows as ticked); ``labels`` are the card files' short checklist labels (fallback: the trial
    file's ``confirm`` sentence, which the worksheet has room for)."""
    clock = LocalClock(zone, result.at)
    confirmed = set(last.checklist_confirmed) if last is not None else set()
    criteria = []
    checklist = []
    for r in result.results:
        criterion = r.criterion
        evidence = _evidence(r.evidence, clock)
        needs = tuple(dict.fromkeys(r.missing or r.gaps)) if r.status == UNKNOWN else ()
        criteria.append(
            CriterionLine(
                id=criterion.id,
                kind=criterion.kind,
                text=criterion.text,
                result=_RESULT_NAMES[r.status],
                result_label=_result_label(r),
                rules_out=r.blocks and not r.pending,
                evidence=evidence,
                needs=needs,
                to_confirm=r.status == CONFIRM,
                confirm_text=criterion.confirm,
                source_quote=criterion.source,
                note=criterion.note,
            )
        )
        if r.status == CONFIRM:
            label = criterion.confirm or (labels or {}).get(criterion.id, {}).get("confirm") or criterion.text
            checklist.append(
                ChecklistItem(
                    id=criterion.id,
                    label=label,
                    charted=tuple(e for e in evidence if e.when is not None or e.sources),
                    confirmed=criterion.id in confirmed,
                )
            )
    counts = {name: sum(1 for c in criteria if c.result == name) for name in _RESULT_NAMES.values()}
    return TrialSheet(
        id=result.trial.id,
        short_name=result.trial.short_name,
        title=result.trial.title,
        registry_url=result.trial.registry_url,
        registry_status=result.trial.registry_status,
        recruiting=result.trial.recruiting,
        status=result.status,
        status_label=STATUS_LABELS.get(result.status, result.status),
        status_explained=STATUS_EXPLAINED.get(result.status, ""),
        window=_window(result, clock),
        criteria=tuple(criteria),
        checklist=tuple(checklist),
        decidable=result.status in CARD_STATUSES,
        last=_last(last, clock),
        counts=counts,
    )


def patient_banner(patient: dict[str, Any] | None) -> dict[str, str] | None:
    """Name, birth date and sex for the patient banner (when the EHR asks the app to show one)."""
    if not isinstance(patient, dict):
        return None
    names = patient.get("name") if isinstance(patient.get("name"), list) else []
    name = ""
    for entry in names:
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("text"), str):
            name = entry["text"]
        else:
            given = " ".join(g for g in entry.get("given") or [] if isinstance(g, str))
            family = entry.get("family") if isinstance(entry.get("family"), str) else ""
            name = f"{given} {family}".strip()
        if name:
            break
    return {
        "name": clean(name) or "(no name charted)",
        "birth_date": clean(str(patient.get("birthDate") or "not charted")),
        "sex": clean(str(patient.get("gender") or "not charted")),
    }
