"""Derived clinical inputs: pure functions of the normalised facts and the evaluation time.

Each returns its value together with the evidence behind it, and says "unknown" — never zero or
"no" — when the data needed is missing. Parameters (thresholds, windows) come from
``mappings/derived.yaml``; the formulas live here.

Conventions, also stated in the README:

- **VIS** (Gaies 2010) is a step function: it changes only when an infusion starts, stops or changes
  rate. When two records of the same drug overlap, the most recently started one gives the rate
  (a rate change is charted as a new record; adding both would double-count). An infusion with no
  end runs until the evaluation time. A record charted as a single time (no period) with a rate
  and status ``in-progress`` runs until the next record of that drug; a completed single-time
  record is a bolus and does not enter the score. Doses in µg/min, mg/h, U/min … are converted with
  the latest body weight; when a conversion needs a weight and there is none, VIS is unknown.
- **Septic-shock onset** (clinical-knowledge.md §2): the start of the first vasopressor episode with
  an infection diagnosis and a lactate > 2 mmol/L from 6 h before to 6 h after its start. When the
  computed onset and a charted septic-shock Condition onset disagree, the computed one is used (it
  is timed by the infusion record) and the charted one is shown beside it; a charted onset alone is
  used when no vasopressor episode qualifies.
- **Sustained** (below a threshold for more than N hours): the run starts at the first value beyond
  the threshold and lasts until the last consecutive value beyond it; a gap between two consecutive
  measurements longer than ``max_gap`` breaks the run (we cannot vouch for unobserved hours).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NamedTuple

from .datafiles import load_and_validate
from .facts import AdministrationFact, ConditionFact, ObservationFact, PatientFacts, format_time
from .knowledge import Knowledge

HOUR = 3600.0

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}

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
        },
    },
    "map_derivation": {"type": "dict", "schema": {"source": {"type": "string"}}},
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


def body_weight(facts: PatientFacts, at: float) -> Derived:
    fact = latest(facts.series("body_weight"), at)
    if fact is None:
        return Derived(None, "unknown", missing="body weight (LOINC 29463-7)")
    return Derived(fact.value, "known", (Evidence(f"weight {fact.value:g} kg", fact.time, (fact.resource,)),))


# -- vasoactive-inotropic score -------------------------------------------------------------------


class _Segment(NamedTuple):
    drug: str
    start: float
    end: float
    rate: float | None
    rate_unit: str
    resource: str
    matched_by: str


def _infusion_segments(
    administrations: Sequence[AdministrationFact], drugs: set[str], at: float
) -> list[_Segment]:
    """Turn administration records into non-overlapping per-drug rate segments up to ``at``."""
    by_drug: dict[str, list[AdministrationFact]] = {}
    for record in administrations:
        if record.drug in drugs and record.start <= at:
            by_drug.setdefault(record.drug, []).append(record)
    segments: list[_Segment] = []
    for drug, records in by_drug.items():
        records.sort(key=lambda r: r.start)
        for index, record in enumerate(records):
            later_start = records[index + 1].start if index + 1 < len(records) else None
            if record.end is None:
                end = at  # a period with no end: still running
            elif record.end == record.start:
                # Charted at a single time: a running infusion's rate until the drug's next record,
                # or a bolus (completed) that does not enter the score.
                end = (
                    (later_start if later_start is not None else at)
                    if record.status == "in-progress"
                    else record.start
                )
            else:
                end = min(record.end, at)
            if later_start is not None and later_start < end:
                end = later_start  # the later record gives the rate from its start on
            if end > record.start:
                segments.append(
                    _Segment(
                        drug,
                        record.start,
                        end,
                        record.rate,
                        record.rate_unit,
                        record.resource,
                        record.matched_by,
                    )
                )
    return segments


def vis_series(facts: PatientFacts, knowledge: Knowledge, at: float) -> tuple[list[ObservationFact], Derived]:
    """VIS as a step series (one point per change) and a summary Derived for the current value."""
    vis_drugs = {name: drug for name, drug in knowledge.drugs.items() if drug.vis_coefficient is not None}
    segments = _infusion_segments(facts.administrations, set(vis_drugs), at)
    if not segments:
        summary = Derived(
            0.0, "known", (Evidence("no vasoactive infusion recorded in the look-back window"),)
        )
        return [], summary
    weight = body_weight(facts, at)
    change_times = sorted({s.start for s in segments} | {s.end for s in segments})
    points: list[ObservationFact] = []
    problem: str = ""
    used_weight = False
    for time in change_times:
        active = [s for s in segments if s.start <= time < s.end]
        total = 0.0
        parts: list[str] = []
        resources: list[str] = []
        for segment in active:
            drug = vis_drugs[segment.drug]
            dose, why, per_kg = _dose(segment, drug.dose_unit, knowledge, weight)
            used_weight = used_weight or per_kg
            if dose is None:
                problem = problem or why
                total = float("nan")
                break
            total += drug.vis_coefficient * dose  # type: ignore[operator]
            text_note = " (matched by medication text)" if segment.matched_by == "text" else ""
            parts.append(f"{segment.drug} {dose:.3g} {drug.dose_unit}{text_note}")
            resources.append(segment.resource)
        if total != total:  # NaN: a dose could not be converted
            return points, Derived(None, "unknown", (), problem)
        note = " + ".join(parts) if parts else "no vasoactive infusion running"
        points.append(ObservationFact("vis", time, total, "", ",".join(resources), "derived:vis", note))
    current = latest(points, at)
    value = current.value if current is not None else 0.0
    evidence = [
        Evidence(
            f"VIS {value:.0f} = {current.note}" if current else "VIS 0",
            current.time if current else None,
            tuple(current.resource.split(",")) if current and current.resource else (),
        )
    ]
    if used_weight:
        evidence.extend(weight.evidence)
    return points, Derived(value, "known", tuple(evidence))


def _dose(
    segment: _Segment, dose_unit: str, knowledge: Knowledge, weight: Derived
) -> tuple[float | None, str, bool]:
    """(dose in the drug's VIS unit, why not, whether the body weight was used)."""
    if segment.rate is None:
        return None, f"{segment.drug} infusion rate not charted ({segment.resource})", False
    conversion = knowledge.rate_conversion(segment.rate_unit)
    if conversion is None or conversion.to != dose_unit:
        return None, f"{segment.drug} rate unit {segment.rate_unit!r} not convertible to {dose_unit}", False
    dose = segment.rate * conversion.factor
    if conversion.per_kg:
        if weight.status != "known" or not weight.value:
            return (
                None,
                f"body weight (LOINC 29463-7), needed to convert {segment.drug} {segment.rate_unit}",
                True,
            )
        dose /= float(weight.value)
    return dose, "", conversion.per_kg


# -- septic-shock onset ---------------------------------------------------------------------------


def septic_shock_onset(
    facts: PatientFacts, knowledge: Knowledge, params: dict[str, Any], at: float
) -> Derived:
    """Sepsis-3 onset per clinical-knowledge.md §2, with the resources that show it."""
    vasopressors = sorted(
        (
            a
            for a in facts.administrations
            if a.start <= at and knowledge.drugs[a.drug].vasopressor and a.status not in {"not-done"}
        ),
        key=lambda a: a.start,
    )
    charted = [
        c
        for c in facts.conditions
        if c.value_sets & set(params["charted_value_sets"])
        and c.clinical_status in {"active", "recurrence", "relapse", ""}
    ]
    charted_onset = min((c.onset for c in charted if c.onset is not None and c.onset <= at), default=None)
    charted_evidence = tuple(
        Evidence(
            f"septic shock charted (onset {format_time(c.onset)})" if c.onset else "septic shock charted",
            None,
            (c.resource,),
        )
        for c in charted
    )
    infection = [
        c
        for c in facts.conditions
        if c.value_sets & set(params["infection_value_sets"])
        and c.clinical_status in {"active", "recurrence", "relapse", ""}
        and (c.onset is None or c.onset <= at)
    ]
    lactates = [f for f in facts.series("lactate") if f.time <= at]
    threshold = float(params["lactate_threshold"])
    before, after = float(params["lactate_hours_before"]) * HOUR, float(params["lactate_hours_after"]) * HOUR

    episode_starts: list[AdministrationFact] = []
    last_end: float | None = None
    for record in vasopressors:
        if last_end is None or record.start - last_end > float(params["episode_gap_hours"]) * HOUR:
            episode_starts.append(record)
        end = record.end if record.end is not None else at
        last_end = end if last_end is None else max(last_end, end)

    missing_lactate = False
    lactate_normal = False
    for start in episode_starts:
        around = [f for f in lactates if start.start - before <= f.time <= start.start + after]
        high = [f for f in around if float(f.value) > threshold]
        vaso = Evidence(f"{start.drug} started", start.start, (start.resource,))
        if not around:
            missing_lactate = True
            continue
        if not high:
            lactate_normal = True
            continue
        peak = max(high, key=lambda f: float(f.value))
        lactate_ev = Evidence(f"lactate {float(peak.value):.1f} mmol/L", peak.time, (peak.resource,))
        if infection:
            infection_ev = Evidence(
                "infection diagnosis charted", None, tuple(c.resource for c in infection[:3])
            )
            evidence = (vaso, lactate_ev, infection_ev, *charted_evidence)
            return Derived(start.start, "known", evidence)
        # Vasopressor + high lactate but no infection diagnosis charted: the onset time is usable,
        # septic shock itself needs the clinician (or a charted diagnosis).
        return Derived(
            start.start,
            "unknown",
            (vaso, lactate_ev),
            "an infection diagnosis (sepsis / septic shock Condition) or clinician confirmation",
        )
    if charted_onset is not None:
        return Derived(
            charted_onset,
            "known",
            (
                Evidence(
                    "onset taken from the charted septic-shock diagnosis (no qualifying vasopressor episode)",
                    charted_onset,
                    tuple(c.resource for c in charted),
                ),
            ),
        )
    if missing_lactate:
        return Derived(
            None,
            "unknown",
            tuple(Evidence(f"{s.drug} started", s.start, (s.resource,)) for s in episode_starts[:1]),
            "a lactate around the vasopressor start (LOINC 2524-7 or 32693-4)",
        )
    if not vasopressors:
        if charted:
            return Derived(
                None, "unknown", charted_evidence, "the septic-shock onset time (vasopressor start)"
            )
        return Derived(None, "absent", (Evidence("no vasopressor administration in the look-back window"),))
    if lactate_normal:
        return Derived(
            None, "absent", (Evidence(f"lactate ≤ {threshold:g} mmol/L around every vasopressor start"),)
        )
    return Derived(None, "absent", (Evidence("no septic shock by Sepsis-3 criteria"),))


# -- series rules used by the criteria language ---------------------------------------------------


def in_window(series: Sequence[ObservationFact], at: float, within: float | None) -> list[ObservationFact]:
    start = at - within if within is not None else float("-inf")
    return [f for f in series if start <= f.time <= at]


def persistent(
    series: Sequence[ObservationFact], compare: Callable[[Any], bool], min_interval: float, count: int = 2
) -> tuple[ObservationFact, ...] | None:
    """The latest run of ``count`` consecutive values all beyond the threshold, each pair at least
    ``min_interval`` seconds apart (values closer than that are skipped over, not counted)."""
    best: tuple[ObservationFact, ...] | None = None
    run: list[ObservationFact] = []
    for fact in series:
        if not compare(fact.value):
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
    series: Sequence[ObservationFact], compare: Callable[[Any], bool], at: float, max_gap: float
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
        if (
            compare(fact.value)
            and run_start is not None
            and previous is not None
            and fact.time - previous.time <= max_gap
        ):
            previous = fact
        elif compare(fact.value):
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
    vis_points, vis_now = vis_series(facts, knowledge, at)
    series["vis"] = vis_points
    conditions: dict[str, list[ConditionFact]] = {}
    for condition in facts.conditions:
        for name in condition.value_sets:
            conditions.setdefault(name, []).append(condition)
    scalars = {
        "age_years": age_years(facts.birth_date, at),
        "sex": Derived(facts.gender, "known", (Evidence(f"sex {facts.gender}"),))
        if facts.gender
        else Derived(None, "unknown", missing="administrative sex (Patient.gender)"),
        "body_weight": body_weight(facts, at),
        "vis": vis_now,
        "septic_shock_onset": septic_shock_onset(facts, knowledge, params["septic_shock_onset"], at),
    }
    labels = {name: item.label for name, item in knowledge.inputs.items()}
    labels.update({"vis": "VIS", "age_years": "age", "septic_shock_onset": "septic shock", "sex": "sex"})
    units = {name: item.display_unit for name, item in knowledge.inputs.items()}
    return ClinicalInputs(at, series, scalars, conditions, facts, labels, units)
