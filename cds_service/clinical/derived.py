"""Derived clinical inputs: pure functions of the normalised facts and the evaluation time.

Each returns its value together with the evidence behind it, and says "unknown" — never zero or
"no" — when the data needed is missing. Parameters (thresholds, windows) come from
``mappings/derived.yaml``; the formulas live here. docs/knowledge.md explains them for clinicians.

Conventions:

- **VIS** (Gaies 2010) is a step function: it changes only when an infusion starts, stops or changes
  rate. At any moment a drug's rate is that of the most recently started record still running
  then: a titration charted as a new record replaces the old rate (adding both would double-count),
  and when a short later record ends, an earlier one still running gives the rate again. A period
  with no end runs until the evaluation time unless its status says it finished (completed /
  stopped / on-hold: then it ran until the drug's next record, or adds nothing). A record charted
  at a single time with a rate and status ``in-progress`` runs until the drug's next record; any
  other single-time record is a bolus and does not enter the score. Doses in µg/min, mg/h, U/min …
  are converted with the latest body weight; when any dose in the window cannot be computed (no
  weight, no rate, unknown unit) the VIS is unknown, never a partial sum.
- **Septic-shock onset** (clinical-knowledge.md §2): the start of the first vasopressor episode with
  a lactate > 2 mmol/L from 6 h before to 6 h after its start and an infection diagnosis dated
  within 48 h of it (see ``septic_shock_onset`` for the late-lactate rule and the statuses). When the
  computed onset and a charted septic-shock Condition onset disagree, the computed one is used (it
  is timed by the infusion record) and the charted one is shown beside it; a charted onset alone is
  used when no vasopressor episode qualifies.
- **Persistent**: ``count`` consecutive values beyond the threshold, each at least ``min_interval``
  after the previous counted one (values in between that are also beyond it are passed over; one
  value not beyond it breaks the run).
- **Sustained** (beyond a threshold for more than N hours): the run starts at the first value beyond
  the threshold and lasts until the last consecutive value beyond it — the time after the last
  value is not counted; a gap between two consecutive measurements longer than ``max_gap`` breaks
  the run (we cannot vouch for unobserved hours).
- **Linear time.** The VIS segments and series, the vasopressor episodes and the lactates around
  them are each one sweep over events sorted by time, O(n log n) (issue 17); the series rules above
  (persistence, trends, "for more than N h") are single passes. ``tests/test_sweep_line.py`` and
  ``tests/test_series_rules_oracle.py`` check them against the rescan-everything definitions kept
  in ``tests/sweep_oracles.py``.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from operator import attrgetter
from pathlib import Path
from typing import Any, NamedTuple

from ..base.datafiles import load_and_validate
from ..base.facts import HOUR, AdministrationFact, ConditionFact, ObservationFact, PatientFacts, format_time
from ..knowledge.mappings import Knowledge

DERIVED_SCHEMA: dict[str, Any] = {
    "septic_shock_onset": {
        "type": "dict",
        "required": True,
        "schema": {
            "source": {"type": "string", "required": True},
            "infection_value_sets": {"type": "list", "schema": {"type": "string"}, "required": True},
            "charted_value_sets": {"type": "list", "schema": {"type": "string"}, "required": True},
            "lactate_threshold": {"type": "number", "required": True},
            "lactate_hours_before": {"type": "number", "min": 0, "required": True},
            "lactate_hours_after": {"type": "number", "min": 0, "required": True},
            "episode_gap_hours": {"type": "number", "min": 0, "required": True},
            # An infection diagnosis counts when dated this close to the onset (an undated one counts).
            "infection_hours_before": {"type": "number", "min": 0, "default": 48},
            "infection_hours_after": {"type": "number", "min": 0, "default": 48},
        },
    },
    "map_derivation": {"type": "dict", "schema": {"source": {"type": "string"}}},
    "body_weight": {
        "type": "dict",
        "required": True,
        "schema": {
            "max_age_hours": {"type": "number", "min": 0, "required": True},
            "source": {"type": "string", "required": True, "empty": False},
        },
    },
    "norepinephrine_start": {
        "type": "dict",
        "required": True,
        "schema": {
            "drugs": {"type": "list", "schema": {"type": "string"}, "required": True, "minlength": 1},
            "source": {"type": "string", "required": True, "empty": False},
        },
    },
}


class Evidence(NamedTuple):
    """One fact shown to the clinician: what, when, and which resources say so."""

    text: str
    time: float | None = None
    resources: tuple[str, ...] = ()

    def describe(self) -> str:
        when = f" at {format_time(self.time)}" if self.time is not None else ""
        return f"{self.text}{when}"


@dataclass(frozen=True)
class Derived:
    """A derived value: ``status`` is "known", "absent" (data says no) or "unknown" (data missing)."""

    value: Any
    status: str
    evidence: tuple[Evidence, ...] = ()
    missing: str = ""  # what to measure or chart when unknown


@dataclass
class ClinicalInputs:
    """Everything the criteria may refer to, by name."""

    at: float
    series: dict[str, list[ObservationFact]]
    scalars: dict[str, Derived]
    conditions: dict[str, list[ConditionFact]]
    facts: PatientFacts
    labels: dict[str, str] = field(default_factory=dict)  # short clinical labels for cards ("ANC")
    units: dict[str, str] = field(default_factory=dict)  # units as shown on cards ("× 10⁹/L")
    #: value set → how recent a charted Condition must be to decide (seconds; None = any age).
    condition_windows: dict[str, float | None] = field(default_factory=dict)

    def scalar(self, name: str) -> Derived | None:
        return self.scalars.get(name)


# -- scalars -------------------------------------------------------------------------------------


def age_years(birth_date: date | None, at: float) -> Derived:
    if birth_date is None:
        return Derived(None, "unknown", missing="birth date (Patient.birthDate)")
    today = datetime.fromtimestamp(at, tz=UTC).date()
    years = today.year - birth_date.year - ((today.month, today.day) < (birth_date.month, birth_date.day))
    return Derived(years, "known", (Evidence(f"born {birth_date.isoformat()}, {years} years old"),))


def latest(
    series: Sequence[ObservationFact], at: float, within: float | None = None
) -> ObservationFact | None:
    """The most recent value at or before ``at`` (optionally no older than ``within`` seconds)."""
    for fact in reversed(series):
        if fact.time <= at:
            if within is not None and fact.time < at - within:
                return None
            return fact
    return None


#: How old a body weight may be to convert a dose, when derived.yaml is not given (tests).
DEFAULT_WEIGHT_MAX_AGE_HOURS = 168.0
_WEIGHT_CODES = "LOINC 29463-7, 3141-9 or 8335-2"


def body_weight(
    facts: PatientFacts, at: float, max_age_hours: float = DEFAULT_WEIGHT_MAX_AGE_HOURS
) -> Derived:
    """The newest body weight of any weight code at or before ``at``, if at most ``max_age_hours`` old.

    An older one is not used (unknown, with the old weight shown): see mappings/derived.yaml."""
    fact = latest(facts.series("body_weight"), at)
    if fact is None:
        missing = f"body weight ({_WEIGHT_CODES})"
        if "body_weight" in facts.unavailable:
            missing += " — not available (prefetch null)"
        return Derived(None, "unknown", missing=missing)
    code = fact.code.rsplit("|", 1)[-1]
    note = f" ({fact.note})" if fact.note else ""
    shown = Evidence(f"weight {float(fact.value):g} kg, LOINC {code}{note}", fact.time, (fact.resource,))
    if at - fact.time > max_age_hours * HOUR:
        days = (at - fact.time) / HOUR / 24
        old = Evidence(
            f"latest weight {float(fact.value):g} kg (LOINC {code}) is {days:.0f} days old, "
            f"older than {max_age_hours:g} h: not used",
            fact.time,
            (fact.resource,),
        )
        return Derived(
            None, "unknown", (old,), f"a current body weight ({_WEIGHT_CODES}, last {max_age_hours:g} h)"
        )
    return Derived(fact.value, "known", (shown,))


# -- vasoactive-inotropic score -------------------------------------------------------------------


class _Segment(NamedTuple):
    drug: str
    start: float
    end: float | None  # None: still running at the evaluation time
    rate: float | None
    rate_unit: str
    resource: str
    matched_by: str
    rate_note: str = ""


_RUNNING = float("inf")
_UNSET: Any = object()
#: A NamedTuple built without its Python-level ``__new__`` (every field given): built per record.
_new_tuple = tuple.__new__
#: A record with a period start and no end is running unless its status says it has finished.
_FINISHED = frozenset({"completed", "stopped", "on-hold"})


def _record_end(record: AdministrationFact, next_start: float | None, at: float) -> float | None:
    """When the drug stopped running according to this record (``_RUNNING``: still running at ``at``);
    None when the record gives no running time at all."""
    if record.bolus:
        return None
    end = record.end
    if end is None or end == record.start:
        single_time = end is not None
        running = record.status == "in-progress" if single_time else record.status not in _FINISHED
        if running:
            # A rate charted at one moment holds until the drug's next record; an open period runs on.
            return next_start if single_time and next_start is not None else _RUNNING
        # Finished with no end time: it ran at most until the drug's next record; with none, we
        # cannot say for how long, so it adds nothing (a completed single-time record is a bolus).
        return next_start if not single_time and next_start is not None else None
    if end < record.start:
        return None  # malformed period
    return _RUNNING if end > at else end


def _infusion_segments(
    administrations: Sequence[AdministrationFact], drugs: set[str], at: float
) -> list[_Segment]:
    """Turn administration records into non-overlapping per-drug rate segments up to ``at``.

    At any moment, a drug's rate is that of the most recently started record still running then
    (ties: the one running longer, then the later record): a titration charted as a new record
    replaces the old rate without double counting, and when a short later record ends, an earlier
    record still running gives the rate again.

    One sweep per drug over the records' start and stop times, O(n log n) for the sort and O(n)
    after it (issue 17; ``tests/test_sweep_line.py`` checks it against the version that rescans
    every record at every boundary). Of records starting at the same moment only the preferred one
    can ever give the rate, so the candidates have distinct starts and sit on a stack, latest start
    on top; one that has stopped is dropped when it reaches the top.
    """
    by_drug: dict[str, list[AdministrationFact]] = {}
    for record in administrations:
        if record.drug in drugs and record.start <= at:
            by_drug.setdefault(record.drug, []).append(record)
    segments: list[_Segment] = []
    for drug, records in by_drug.items():
        records.sort(key=_start_of)  # stable: equal starts keep their order (the last tie-break)
        # (start, end, record) of each record that runs, built latest first (`following` is the
        # drug's next later start: a rate charted at one moment runs until then), then put in order.
        spans: list[tuple[float, float, AdministrationFact]] = []
        following: float | None = None
        # Whether the spans follow one another without overlapping (a titration charted as
        # consecutive records, the common case) and no two that touch are the same resource (which
        # the sweep would merge): then each span is its own segment and the sweep is not needed.
        disjoint = True
        later_start, later_resource = _RUNNING, None
        for index in range(len(records) - 1, -1, -1):
            record = records[index]
            start, end = record.start, record.end
            # `_record_end` inlined for a period with a later end, the common shape.
            if end is None or end <= start or record.bolus:
                end = _record_end(record, following, at)
            elif end > at:
                end = _RUNNING
            if end is not None and end > start:
                spans.append((start, end, record))
                if disjoint and (
                    end > later_start or (end == later_start and record.resource == later_resource)
                ):
                    disjoint = False
                later_start, later_resource = start, record.resource
            if index and records[index - 1].start < start:
                following = start
        spans.reverse()
        if disjoint:
            segments.extend(
                [
                    _new_tuple(
                        _Segment,
                        (
                            drug,
                            start,
                            None if end == _RUNNING else end,
                            record.rate,
                            record.rate_unit,
                            record.resource,
                            record.matched_by,
                            record.rate_note,
                        ),
                    )
                    for start, end, record in spans
                ]
            )
            continue
        boundaries = sorted({span[0] for span in spans} | {span[1] for span in spans if span[1] != _RUNNING})
        # The candidate for each distinct start: the one running longest, then the later record.
        candidates: list[tuple[float, float, AdministrationFact]] = []
        for span in spans:
            if candidates and candidates[-1][0] == span[0]:
                if span[1] >= candidates[-1][1]:
                    candidates[-1] = span
            else:
                candidates.append(span)
        stack: list[tuple[float, float, AdministrationFact]] = []
        pending = iter(candidates)
        upcoming = next(pending, None)
        drug_segments: list[_Segment] = []
        last = len(boundaries) - 1
        for position, time in enumerate(boundaries):
            if upcoming is not None and upcoming[0] == time:
                stack.append(upcoming)
                upcoming = next(pending, None)
            while stack and stack[-1][1] <= time:  # stopped at or before this boundary
                stack.pop()
            if not stack:
                continue
            winner = stack[-1][2]
            until = boundaries[position + 1] if position < last else None
            if drug_segments:
                previous = drug_segments[-1]
                if previous.resource == winner.resource and previous.end == time:
                    drug_segments[-1] = previous._replace(end=until)
                    continue
            drug_segments.append(
                _new_tuple(
                    _Segment,
                    (
                        drug,
                        time,
                        until,
                        winner.rate,
                        winner.rate_unit,
                        winner.resource,
                        winner.matched_by,
                        winner.rate_note,
                    ),
                )
            )
        segments.extend(drug_segments)
    return segments


#: Sort keys (C-level getters: a Python function per record costs more than the sort).
_start_of: Callable[[AdministrationFact], float] = attrgetter("start")
_time_of: Callable[[ObservationFact], float] = attrgetter("time")


def vis_series(
    facts: PatientFacts, knowledge: Knowledge, at: float, weight: Derived | None = None
) -> tuple[list[ObservationFact], Derived]:
    """VIS as a step series (one point per change) and a summary Derived for the current value.

    When any dose in the look-back window cannot be computed (no rate, an unconvertible unit, or a
    per-minute rate with no body weight), the VIS is unknown and the series empty: a partial series
    would let a criterion read a gap as "no infusion". With no administrations to read (prefetch
    null) it is unknown too, never 0.
    """
    vis_drugs = {name: drug for name, drug in knowledge.drugs.items() if drug.vis_coefficient is not None}
    segments = _infusion_segments(facts.administrations, set(vis_drugs), at)
    if not segments:
        if "administrations" in facts.unavailable:
            return [], Derived(
                None, "unknown", (), "MedicationAdministrations (not available: prefetch null or not fetched)"
            )
        summary = Derived(0.0, "known", (Evidence("no vasoactive infusion running in the look-back window"),))
        return [], summary
    weight = weight if weight is not None else body_weight(facts, at)
    # A segment's dose and its text do not change while it runs: worked out once per segment — and,
    # as a titration returns to the same few rates, once per distinct rate (`known_terms`). The
    # score is unknown as soon as one dose cannot be had: that of the first such segment in time
    # (then in the drugs' order) is named, as a walk through time would find it.
    by_drug: dict[str, list[_Segment]] = {}
    for segment in segments:
        by_drug.setdefault(segment.drug, []).append(segment)
    groups: list[tuple[list[_Segment], list[_Term]]] = []
    known_terms: dict[tuple[Any, ...], _Term] = {}
    conversions: dict[str, Any] = {}  # rate unit → knowledge.rate_conversion (one look-up per unit)
    failed: tuple[float, int, _Segment, str, bool] | None = None
    used_weight = False
    for group, drug_segments in enumerate(by_drug.values()):
        drug = vis_drugs[drug_segments[0].drug]
        terms: list[_Term] = []
        for segment in drug_segments:
            rate = segment.rate
            # Only a non-zero float is a safe key: 0.0 and -0.0 (or 1 and 1.0) are equal keys that
            # print differently.
            memo_key = (
                (segment.drug, rate, segment.rate_unit, segment.rate_note, segment.matched_by)
                if type(rate) is float and rate
                else None
            )
            term = known_terms.get(memo_key) if memo_key is not None else None
            if term is None:
                dose, why, per_kg = _dose(segment, drug.dose_unit, knowledge, weight, conversions)
                if dose is None:
                    if failed is None or (segment.start, group) < failed[:2]:
                        failed = (segment.start, group, segment, why, per_kg)
                    break  # a later segment of this drug cannot come first
                text_note = " (matched by medication text)" if segment.matched_by == "text" else ""
                arithmetic = _arithmetic(segment, dose, drug.dose_unit, per_kg, weight)
                term = _Term(
                    drug.vis_coefficient * dose,  # type: ignore[operator]
                    f"{segment.drug} {dose:.3g} {drug.dose_unit}{arithmetic}{text_note}",
                    per_kg,
                )
                if memo_key is not None:
                    known_terms[memo_key] = term
            used_weight = used_weight or term.per_kg
            terms.append(term)
        groups.append((drug_segments, terms))
    if failed is not None:
        _, _, segment, why, per_kg = failed
        if segment.rate is None and segment.rate_note:
            shown = f"{segment.drug} {segment.rate_note}"  # "norepinephrine pump 67.5 mL/h, …"
        else:
            rate = f"{segment.rate:g} {segment.rate_unit}" if segment.rate is not None else "no rate"
            shown = f"{segment.drug} infusion, {rate}"
        evidence = (Evidence(shown, segment.start, (segment.resource,)), *(weight.evidence if per_kg else ()))
        return [], Derived(None, "unknown", evidence, why)
    points = _one_drug_points(*groups[0]) if len(groups) == 1 else _points(segments, groups)
    current = points[-1]  # every change time is at or before `at`
    evidence = [
        Evidence(
            f"VIS {current.value:.0f} = {current.note}",
            current.time,
            tuple(current.resource.split(",")) if current.resource else (),
        )
    ]
    if used_weight:
        evidence.extend(weight.evidence)
    return points, Derived(current.value, "known", tuple(evidence))


class _Term(NamedTuple):
    """A running segment's part of the score: its points, its text in the note, whether per kg."""

    value: float
    text: str
    per_kg: bool


_NONE_RUNNING = "no vasoactive infusion running"


def _one_drug_points(drug_segments: list[_Segment], terms: list[_Term]) -> list[ObservationFact]:
    """The VIS points when one drug gives the whole score (the common case): a point where each
    segment starts, and one where it stops unless the next one starts then. :func:`_points` gives
    the same for any number of drugs (the sum starts at 0.0, so the value is ``0.0 + term``, as
    there); ``tests/test_sweep_line.py`` checks both against the brute-force definition."""
    points: list[ObservationFact] = []
    append = points.append
    last = len(drug_segments) - 1
    for index, segment in enumerate(drug_segments):
        term = terms[index]
        append(
            _new_tuple(
                ObservationFact,
                ("vis", segment.start, 0.0 + term.value, "", segment.resource, "derived:vis", term.text, ""),
            )
        )
        end = segment.end
        if end is not None and (index == last or drug_segments[index + 1].start != end):
            append(_new_tuple(ObservationFact, ("vis", end, 0.0, "", "", "derived:vis", _NONE_RUNNING, "")))
    return points


def _points(
    segments: list[_Segment], groups: list[tuple[list[_Segment], list[_Term]]]
) -> list[ObservationFact]:
    """The VIS points of several drugs: one sweep over the change times. A drug's segments do not
    overlap and come in time order, so each drug keeps a pointer to the segment that may be
    running; the drugs keep their order (the order of the terms in the sum and in the note)."""
    change_times = sorted({s.start for s in segments} | {s.end for s in segments if s.end is not None})
    pointers = [0] * len(groups)
    points: list[ObservationFact] = []
    for time in change_times:
        total = 0.0
        parts: list[str] = []
        resources: list[str] = []
        for group, (drug_segments, terms) in enumerate(groups):
            position = pointers[group]
            count = len(drug_segments)
            while position < count and (end := drug_segments[position].end) is not None and end <= time:
                position += 1
            pointers[group] = position
            if position < count and (running := drug_segments[position]).start <= time:
                term = terms[position]
                total += term.value
                parts.append(term.text)
                resources.append(running.resource)
        note = " + ".join(parts) if parts else _NONE_RUNNING
        fact = ("vis", time, total, "", ",".join(resources), "derived:vis", note, "")
        points.append(_new_tuple(ObservationFact, fact))
    return points


def _arithmetic(segment: _Segment, dose: float, dose_unit: str, per_kg: bool, weight: Derived) -> str:
    """How a dose was obtained, for the evidence: "(15 mL/h × 16 mg/250 mL = 0.96 mg/h ÷ 80 kg)"."""
    steps = [segment.rate_note] if segment.rate_note else []
    if per_kg and weight.value:
        if not steps:
            steps.append(f"{segment.rate:g} {segment.rate_unit}")
        steps.append(f"÷ {float(weight.value):g} kg")
    return f" ({' '.join(steps)})" if steps else ""


def _dose(
    segment: _Segment,
    dose_unit: str,
    knowledge: Knowledge,
    weight: Derived,
    conversions: dict[str, Any] | None = None,
) -> tuple[float | None, str, bool]:
    """(dose in the drug's VIS unit, why not, whether the body weight was used). ``conversions``
    memoises ``knowledge.rate_conversion`` per rate unit for the caller."""
    if segment.rate is None:
        why = segment.rate_note or f"infusion rate not charted ({segment.resource})"
        return None, f"{segment.drug}: {why}", False
    unit = segment.rate_unit
    if conversions is None:
        conversion = knowledge.rate_conversion(unit)
    elif (conversion := conversions.get(unit, _UNSET)) is _UNSET:
        conversion = conversions[unit] = knowledge.rate_conversion(unit)
    if conversion is None or conversion.to != dose_unit:
        return None, f"{segment.drug} rate unit {segment.rate_unit!r} not convertible to {dose_unit}", False
    dose = segment.rate * conversion.factor
    if conversion.per_kg:
        if weight.status != "known" or not weight.value:
            needed = weight.missing or f"body weight ({_WEIGHT_CODES})"
            return None, f"{needed}, needed to convert {segment.drug} {segment.rate_unit}", True
        dose /= float(weight.value)
    return dose, "", conversion.per_kg


# -- septic-shock onset ---------------------------------------------------------------------------

_ACTIVE_CLINICAL = frozenset({"active", "recurrence", "relapse", ""})
#: Derived.status of a value a clinician must confirm (a candidate septic-shock onset).
CONFIRM_STATUS = "confirm"
_UNAVAILABLE_TEXT = {
    "administrations": "MedicationAdministrations",
    "lactate": "lactates",
    "conditions": "Conditions",
}


def _started(record: AdministrationFact) -> Evidence:
    how = " (matched by medication text)" if record.matched_by == "text" else ""
    return Evidence(f"{record.drug} started{how}", record.start, (record.resource,))


def _condition_time(condition: ConditionFact) -> float | None:
    return condition.onset if condition.onset is not None else condition.recorded


class _Episode(NamedTuple):
    first: AdministrationFact  # the record that started the episode
    end: float  # when the last vasopressor of the episode stopped (``at`` while one is running)


def _vasopressor_episodes(facts: PatientFacts, knowledge: Knowledge, gap: float, at: float) -> list[_Episode]:
    """Vasopressor infusions grouped into episodes; a pause longer than ``gap`` starts a new one.
    Boluses are left out: a push dose is no vasopressor requirement. One pass in start order."""
    vasopressors = {name for name, drug in knowledge.drugs.items() if drug.vasopressor}
    records = sorted(
        (a for a in facts.administrations if a.start <= at and not a.bolus and a.drug in vasopressors),
        key=_start_of,
    )
    episodes: list[_Episode] = []
    first: AdministrationFact | None = None
    episode_end = 0.0
    for record in records:
        start, end = record.start, record.end
        if end is not None:
            if end < start:
                end = start
            if end > at:
                end = at
        else:
            end = start if record.status in _FINISHED else at
        if first is not None and start - episode_end <= gap:
            if end > episode_end:
                episode_end = end
        else:
            if first is not None:
                episodes.append(_Episode(first, episode_end))
            first, episode_end = record, end
    if first is not None:
        episodes.append(_Episode(first, episode_end))
    return episodes


def septic_shock_onset(
    facts: PatientFacts, knowledge: Knowledge, params: dict[str, Any], at: float
) -> Derived:
    """Sepsis-3 septic-shock onset per clinical-knowledge.md §2, with the resources that show it.

    Onset = the start of the first vasopressor episode with a lactate > 2 mmol/L around it (from
    ``lactate_hours_before`` to ``lactate_hours_after``) and an active infection diagnosis dated
    within ``infection_hours_before`` / ``infection_hours_after`` of it (an undated one counts).
    When the lactate first exceeds the threshold later in the episode, while vasopressors still run,
    both Sepsis-3 conditions hold from that lactate on: it is the onset.
    Conflict with a charted septic-shock Condition: the computed onset wins (it is timed by the
    infusion record; a Condition's onset is often the time of charting) and the charted one is
    shown beside it; the charted onset is used alone when no episode qualifies.
    Status "unknown" with a value: the onset time is known but septic shock is not established
    (no lactate yet, or no infection diagnosis) — the time windows can still be computed.
    """
    # In time order (as extraction gives them): each episode's lactates are then a slice (bisect).
    lactates = [f for f in facts.series("lactate") if f.time <= at and isinstance(f.value, int | float)]
    lactates.sort(key=_time_of)
    lactate_times = [f.time for f in lactates]

    def lactates_between(first: float, last: float) -> list[ObservationFact]:
        return lactates[bisect.bisect_left(lactate_times, first) : bisect.bisect_right(lactate_times, last)]

    episodes = _vasopressor_episodes(facts, knowledge, float(params["episode_gap_hours"]) * HOUR, at)
    return onset_from_episodes(facts, params, at, episodes, lactates_between)


def onset_from_episodes(
    facts: PatientFacts,
    params: dict[str, Any],
    at: float,
    episodes: Sequence[_Episode],
    lactates_between: Callable[[float, float], list[ObservationFact]],
) -> Derived:
    """:func:`septic_shock_onset`'s decision, given the vasopressor episodes and the numeric lactates
    charted in a time range (both ends included, in time order). tests/sweep_oracles.py gives it
    brute-force versions of both, so the fast ones are checked against the same decision."""
    threshold = float(params["lactate_threshold"])
    lactate_before = float(params["lactate_hours_before"]) * HOUR
    lactate_after = float(params["lactate_hours_after"]) * HOUR
    infection_before = float(params.get("infection_hours_before", 48)) * HOUR
    infection_after = float(params.get("infection_hours_after", 48)) * HOUR
    infection_sets, charted_sets = set(params["infection_value_sets"]), set(params["charted_value_sets"])

    active = [
        c
        for c in facts.conditions
        if c.clinical_status in _ACTIVE_CLINICAL and ((t := _condition_time(c)) is None or t <= at)
    ]
    charted = [c for c in active if c.value_sets & charted_sets]
    charted_onset = min((c.onset for c in charted if c.onset is not None), default=None)
    charted_evidence = tuple(
        Evidence(
            f"septic shock charted (onset {format_time(c.onset)})" if c.onset else "septic shock charted",
            None,
            (c.resource,),
        )
        for c in charted
    )
    infection = [c for c in active if c.value_sets & infection_sets]

    no_infection: tuple[float, tuple[Evidence, ...]] | None = None
    missing_lactate: _Episode | None = None
    lactate_normal: list[Evidence] = []
    for episode in episodes:
        start = episode.first.start
        seen = lactates_between(start - lactate_before, max(episode.end, start + lactate_after))
        around = [f for f in seen if f.time <= start + lactate_after]
        high = [f for f in around if float(f.value) > threshold]
        if high:
            onset = start
            peak = max(high, key=lambda f: float(f.value))
            # 3 significant digits: a 2.04 must not be shown as "2.0" as evidence for "> 2".
            lactate_ev = Evidence(f"lactate {float(peak.value):.3g} mmol/L", peak.time, (peak.resource,))
        else:
            late = next(
                (f for f in seen if f.time > start + lactate_after and float(f.value) > threshold), None
            )
            if late is None:
                if seen:
                    lactate_normal.append(_started(episode.first))
                elif missing_lactate is None:
                    missing_lactate = episode
                continue
            onset = late.time
            lactate_ev = Evidence(
                f"lactate {float(late.value):.3g} mmol/L while on vasopressors (first value > {threshold:g})",
                late.time,
                (late.resource,),
            )
        dated = [
            c
            for c in infection
            if (t := _condition_time(c)) is None or onset - infection_before <= t <= onset + infection_after
        ]
        if not dated:
            if no_infection is None:
                others = tuple(
                    Evidence(
                        f"infection diagnosis dated more than {infection_before / HOUR:g} h before / "
                        f"{infection_after / HOUR:g} h after the onset",
                        _condition_time(c),
                        (c.resource,),
                    )
                    for c in infection[:3]
                )
                no_infection = (onset, (_started(episode.first), lactate_ev, *others))
            continue
        infection_ev = Evidence("infection diagnosis charted", None, tuple(c.resource for c in dated[:3]))
        evidence = [_started(episode.first), lactate_ev, infection_ev, *charted_evidence]
        if charted_onset is not None and abs(charted_onset - onset) > HOUR:
            evidence.append(
                Evidence(
                    f"charted onset {format_time(charted_onset)} differs by "
                    f"{abs(charted_onset - onset) / HOUR:.1f} h: the computed onset (from the infusion "
                    "record) is used"
                )
            )
        return Derived(onset, "known", tuple(evidence))

    if charted_onset is not None:
        # Sepsis-3 is not shown by the chart (no vasopressor with a lactate > 2 around it): the charted
        # diagnosis gives a candidate onset the clinician confirms (issue 14), never a "known" one.
        evidence = [
            Evidence(
                "candidate onset from the charted septic-shock diagnosis: the chart does not show Sepsis-3 "
                f"(no vasopressor infusion with a lactate > {threshold:g} mmol/L around its start)",
                charted_onset,
                tuple(c.resource for c in charted),
            )
        ]
        if lactate_normal:
            evidence.append(Evidence(f"lactate ≤ {threshold:g} mmol/L around the vasopressor start"))
            evidence.extend(lactate_normal)
        elif not episodes:
            evidence.append(Evidence("no vasopressor infusion in the look-back window"))
        return Derived(
            charted_onset,
            CONFIRM_STATUS,
            tuple(evidence),
            "clinician confirmation of septic shock and its onset (Sepsis-3 not shown by the chart)",
        )
    if no_infection is not None:
        # Vasopressor + high lactate but no infection diagnosis charted around it: the onset time is
        # usable, septic shock itself needs the clinician (or a charted diagnosis).
        return Derived(
            no_infection[0],
            "unknown",
            no_infection[1],
            "an infection diagnosis (sepsis / septic shock Condition) or clinician confirmation",
        )
    if missing_lactate is not None:
        return Derived(
            missing_lactate.first.start,
            "unknown",
            (_started(missing_lactate.first),),
            "a lactate around the vasopressor start (LOINC 2524-7 or 32693-4)",
        )
    if charted:
        return Derived(None, "unknown", charted_evidence, "the septic-shock onset time (vasopressor start)")
    unavailable = sorted(facts.unavailable & {"administrations", "conditions"})
    if unavailable and not episodes:
        # No data is no "no": with the administrations (or lactates / diagnoses) not available, the
        # onset cannot be ruled out (issue 14, null prefetch keys).
        names = ", ".join(_UNAVAILABLE_TEXT.get(name, name) for name in unavailable)
        return Derived(None, "unknown", (), f"{names} (not available: prefetch null or not fetched)")
    if not episodes:
        return Derived(None, "absent", (Evidence("no vasopressor infusion in the look-back window"),))
    return Derived(
        None,
        "absent",
        (
            Evidence(
                f"lactate ≤ {threshold:g} mmol/L around every vasopressor start and while on vasopressors"
            ),
            *lactate_normal,
        ),
    )


def drug_start(
    facts: PatientFacts, params: dict[str, Any], onset: Derived, episode_gap_hours: float, at: float
) -> Derived:
    """The first start of one of ``params["drugs"]`` in the septic-shock episode: from
    ``episode_gap_hours`` before the onset on (the whole look-back when the onset is not known).

    A window anchor (I-MICRO: "after norepinephrine onset"). When it differs from the septic-shock
    onset the evidence shows both times (issue 14)."""
    drugs = set(params["drugs"])
    since = float(onset.value) - episode_gap_hours * HOUR if onset.value is not None else float("-inf")
    # A record counts when it started in the episode, or was still running when it began (a
    # norepinephrine started hours before the lactate that made the onset is the same episode).
    records = [
        a
        for a in facts.administrations
        if a.drug in drugs
        and not a.bolus
        and a.start <= at
        and (a.start >= since or a.end is None or a.end >= since)
    ]
    names = " or ".join(sorted(drugs))
    if not records:
        reason = (
            " — MedicationAdministrations not available" if "administrations" in facts.unavailable else ""
        )
        evidence = (Evidence(f"no {names} infusion in the septic-shock episode"),) if not reason else ()
        return Derived(None, "unknown", evidence, f"the {names} start (the window is timed from it){reason}")
    first = min(records, key=lambda a: a.start)
    evidence = [_started(first)]
    if onset.value is not None and abs(float(onset.value) - first.start) >= 60:
        onset_time = float(onset.value)
        hours = abs(first.start - onset_time) / HOUR
        side = "earlier" if onset_time < first.start else "later"
        evidence.append(
            Evidence(
                f"septic-shock onset {format_time(onset_time)}, {hours:.1f} h {side}: the window runs "
                f"from the {first.drug} start ({params.get('source', '')})",
            )
        )
    return Derived(first.start, "known", tuple(evidence))


# -- series rules used by the criteria language ---------------------------------------------------


def in_window(series: Sequence[ObservationFact], at: float, within: float | None) -> list[ObservationFact]:
    start = at - within if within is not None else float("-inf")
    return [f for f in series if start <= f.time <= at]


#: A three-valued test of one fact against a threshold: True, False, or None when a censored value
#: (comparator) cannot be decided.
FactTest = Callable[[ObservationFact], "bool | None"]


def persistent(
    series: Sequence[ObservationFact],
    compare: FactTest,
    min_interval: float,
    count: int = 2,
    current: bool = True,
) -> tuple[ObservationFact, ...] | None:
    """The latest run of ``count`` consecutive values all beyond the threshold, each pair at least
    ``min_interval`` seconds apart (values closer than that are skipped over, not counted).

    Persistence means "still true now" (``current``, the default): a value after the run that is not
    beyond the threshold — or cannot be decided — breaks it, so only the run reaching the latest value
    counts. With ``current=False`` an earlier run counts too (the latest such run is returned)."""
    if current:
        breaks = [index for index, fact in enumerate(series) if compare(fact) is not True]
        series = series[breaks[-1] + 1 :] if breaks else series
    best: tuple[ObservationFact, ...] | None = None
    run: list[ObservationFact] = []
    for fact in series:
        if compare(fact) is not True:
            run = []
            continue
        if run and fact.time - run[-1].time < min_interval:
            continue
        run.append(fact)
        if len(run) >= count:
            best = tuple(run[-count:])
    return best


def trend_holds(values: Sequence[ObservationFact], direction: str) -> bool:
    """non_decreasing / non_increasing over consecutive values."""
    pairs = itertools.pairwise(values)
    if direction == "non_decreasing":
        return all(float(b.value) >= float(a.value) for a, b in pairs)
    if direction == "non_increasing":
        return all(float(b.value) <= float(a.value) for a, b in pairs)
    raise ValueError(direction)


def sustained_run(
    series: Sequence[ObservationFact], compare: FactTest, at: float, max_gap: float
) -> tuple[float, tuple[ObservationFact, ...]] | None:
    """The longest run of consecutive values beyond the threshold (gaps > max_gap break it).

    Returns (duration in seconds, the first and last facts of the run) or None when no value is beyond it.
    """
    best: tuple[float, tuple[ObservationFact, ...]] | None = None
    run_start: ObservationFact | None = None
    previous: ObservationFact | None = None
    for fact in series:
        if fact.time > at:
            break
        beyond = compare(fact) is True
        if beyond and run_start is not None and previous is not None and fact.time - previous.time <= max_gap:
            previous = fact
        elif beyond:
            run_start = previous = fact
        else:
            run_start = previous = None
        if run_start is not None and previous is not None:
            duration = previous.time - run_start.time
            if best is None or duration >= best[0]:
                best = (duration, (run_start, previous))
    return best


# -- assembling the inputs ------------------------------------------------------------------------


def load_derivation_params(data_dir: Path) -> dict[str, Any]:
    _, document = load_and_validate(data_dir / "mappings" / "derived.yaml", DERIVED_SCHEMA)
    return document


def derive_inputs(
    facts: PatientFacts, knowledge: Knowledge, params: dict[str, Any], at: float
) -> ClinicalInputs:
    """Compute every derived input once; criteria then only look things up."""
    series = {name: values for name, values in facts.observations.items()}
    weight_params = params.get("body_weight") or {}
    weight = body_weight(facts, at, float(weight_params.get("max_age_hours", DEFAULT_WEIGHT_MAX_AGE_HOURS)))
    vis_points, vis_now = vis_series(facts, knowledge, at, weight)
    series["vis"] = vis_points
    onset_params = params["septic_shock_onset"]
    onset = septic_shock_onset(facts, knowledge, onset_params, at)
    norepinephrine = drug_start(
        facts,
        params.get("norepinephrine_start") or {"drugs": ["norepinephrine"]},
        onset,
        float(onset_params["episode_gap_hours"]),
        at,
    )
    conditions: dict[str, list[ConditionFact]] = {}
    for condition in facts.conditions:
        for name in condition.value_sets:
            conditions.setdefault(name, []).append(condition)
    scalars = {
        "age_years": age_years(facts.birth_date, at),
        "sex": Derived(facts.gender, "known", (Evidence(f"sex {facts.gender}"),))
        if facts.gender
        else Derived(None, "unknown", missing="administrative sex (Patient.gender)"),
        "body_weight": weight,
        "vis": vis_now,
        "septic_shock_onset": onset,
        "norepinephrine_start": norepinephrine,
    }
    labels = {name: item.label for name, item in knowledge.inputs.items()}
    labels.update(
        {
            "vis": "VIS",
            "age_years": "age",
            "septic_shock_onset": "septic shock",
            "sex": "sex",
            "norepinephrine_start": "norepinephrine start",
        }
    )
    # Condition value sets by their description, without its parenthesis ("HIV disease / AIDS").
    labels.update(
        {f"value_set:{name}": vs.description.split(" (")[0] for name, vs in knowledge.value_sets.items()}
    )
    units = {name: item.display_unit for name, item in knowledge.inputs.items()}
    windows = {name: value_set.current_within for name, value_set in knowledge.value_sets.items()}
    return ClinicalInputs(at, series, scalars, conditions, facts, labels, units, windows)
