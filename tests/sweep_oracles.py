"""Brute-force oracles for the sweep-line derivations (issue 17): the versions that rescan every
record or segment at every boundary (O(n²) per drug) and every lactate for every vasopressor
episode, kept from before the sweep so that tests/test_sweep_line.py can check the fast versions in
``clinical/derived.py`` against them. The septic-shock onset's decision, which the sweep did not
change, is the service's own: only its inputs (episodes, lactates in a range) are brute force here.

Do not optimise this file: being obviously the definition is its whole job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cds_service.base.facts import HOUR, AdministrationFact, ObservationFact, PatientFacts
from cds_service.clinical.derived import (
    _FINISHED,
    _RUNNING,
    Derived,
    Evidence,
    _arithmetic,
    _dose,
    _Episode,
    _record_end,
    _Segment,
    body_weight,
    onset_from_episodes,
)
from cds_service.knowledge.mappings import Knowledge


def infusion_segments(
    administrations: Sequence[AdministrationFact], drugs: set[str], at: float
) -> list[_Segment]:
    """Turn administration records into non-overlapping per-drug rate segments up to ``at``.

    At any moment, a drug's rate is that of the most recently started record still running then
    (ties: the one running longer, then the later record): a titration charted as a new record
    replaces the old rate without double counting, and when a short later record ends, an earlier
    record still running gives the rate again.
    """
    by_drug: dict[str, list[AdministrationFact]] = {}
    for record in administrations:
        if record.drug in drugs and record.start <= at:
            by_drug.setdefault(record.drug, []).append(record)
    segments: list[_Segment] = []
    for drug, records in by_drug.items():
        records.sort(key=lambda r: r.start)
        spans: list[tuple[float, float, int, AdministrationFact]] = []
        for index, record in enumerate(records):
            next_start = next((r.start for r in records[index + 1 :] if r.start > record.start), None)
            end = _record_end(record, next_start, at)
            if end is not None and end > record.start:
                spans.append((record.start, end, index, record))
        boundaries = sorted({span[0] for span in spans} | {span[1] for span in spans if span[1] != _RUNNING})
        drug_segments: list[_Segment] = []
        for position, time in enumerate(boundaries):
            active = [span for span in spans if span[0] <= time < span[1]]
            if not active:
                continue
            winner = max(active, key=lambda span: (span[0], span[1], span[2]))[3]
            until = boundaries[position + 1] if position + 1 < len(boundaries) else None
            previous = drug_segments[-1] if drug_segments else None
            if previous is not None and previous.resource == winner.resource and previous.end == time:
                drug_segments[-1] = previous._replace(end=until)
                continue
            drug_segments.append(
                _Segment(
                    drug,
                    time,
                    until,
                    winner.rate,
                    winner.rate_unit,
                    winner.resource,
                    winner.matched_by,
                    winner.rate_note,
                )
            )
        segments.extend(drug_segments)
    return segments


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
    segments = infusion_segments(facts.administrations, set(vis_drugs), at)
    if not segments:
        if "administrations" in facts.unavailable:
            return [], Derived(
                None, "unknown", (), "MedicationAdministrations (not available: prefetch null or not fetched)"
            )
        summary = Derived(0.0, "known", (Evidence("no vasoactive infusion running in the look-back window"),))
        return [], summary
    weight = weight if weight is not None else body_weight(facts, at)
    change_times = sorted({s.start for s in segments} | {s.end for s in segments if s.end is not None})
    points: list[ObservationFact] = []
    used_weight = False
    for time in change_times:
        active = [s for s in segments if s.start <= time and (s.end is None or time < s.end)]
        total = 0.0
        parts: list[str] = []
        resources: list[str] = []
        for segment in active:
            drug = vis_drugs[segment.drug]
            dose, why, per_kg = _dose(segment, drug.dose_unit, knowledge, weight)
            used_weight = used_weight or per_kg
            if dose is None:
                if segment.rate is None and segment.rate_note:
                    shown = f"{segment.drug} {segment.rate_note}"  # "norepinephrine pump 67.5 mL/h, …"
                else:
                    rate = f"{segment.rate:g} {segment.rate_unit}" if segment.rate is not None else "no rate"
                    shown = f"{segment.drug} infusion, {rate}"
                evidence = (
                    Evidence(shown, segment.start, (segment.resource,)),
                    *(weight.evidence if per_kg else ()),
                )
                return [], Derived(None, "unknown", evidence, why)
            total += drug.vis_coefficient * dose  # type: ignore[operator]
            text_note = " (matched by medication text)" if segment.matched_by == "text" else ""
            arithmetic = _arithmetic(segment, dose, drug.dose_unit, per_kg, weight)
            parts.append(f"{segment.drug} {dose:.3g} {drug.dose_unit}{arithmetic}{text_note}")
            resources.append(segment.resource)
        note = " + ".join(parts) if parts else "no vasoactive infusion running"
        points.append(ObservationFact("vis", time, total, "", ",".join(resources), "derived:vis", note))
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


def vasopressor_episodes(facts: PatientFacts, knowledge: Knowledge, gap: float, at: float) -> list[_Episode]:
    """Vasopressor infusions grouped into episodes; a pause longer than ``gap`` starts a new one.
    Boluses are left out: a push dose is no vasopressor requirement."""
    records = sorted(
        (
            a
            for a in facts.administrations
            if a.start <= at and not a.bolus and knowledge.drugs[a.drug].vasopressor
        ),
        key=lambda a: a.start,
    )
    episodes: list[_Episode] = []
    for record in records:
        if record.end is not None:
            end = min(max(record.end, record.start), at)
        else:
            end = record.start if record.status in _FINISHED else at
        if episodes and record.start - episodes[-1].end <= gap:
            episodes[-1] = episodes[-1]._replace(end=max(episodes[-1].end, end))
        else:
            episodes.append(_Episode(record, end))
    return episodes


def septic_shock_onset(
    facts: PatientFacts, knowledge: Knowledge, params: dict[str, Any], at: float
) -> Derived:
    """The onset with the brute-force episodes and every lactate rescanned for every episode; the
    decision that follows (lactate around or during the episode, infection, charted onset) is the
    service's own ``onset_from_episodes``: only the episodes and the lactate look-up were swept."""
    lactates = [f for f in facts.series("lactate") if f.time <= at and isinstance(f.value, int | float)]

    def lactates_between(first: float, last: float) -> list[ObservationFact]:
        return [f for f in lactates if first <= f.time <= last]

    episodes = vasopressor_episodes(facts, knowledge, float(params["episode_gap_hours"]) * HOUR, at)
    return onset_from_episodes(facts, params, at, episodes, lactates_between)


# -- the series rules of the criteria language (persistence runs, trends, "for more than N h") ----
# The fast versions in ``clinical/derived.py`` and ``clinical/criteria.py`` are single passes; these
# rescan from the start for every value, so each says what it means without carrying state.


def _block_start(series: Sequence[ObservationFact], compare: Any, index: int) -> int:
    """The first index of the unbroken stretch of values beyond the threshold that ends at ``index``."""
    start = index
    while start > 0 and compare(series[start - 1]) is True:
        start -= 1
    return start


def _counted(series: Sequence[ObservationFact], first: int, last: int, min_interval: float) -> list[int]:
    """The values of ``series[first:last + 1]`` a run counts: each at least ``min_interval`` after the
    previous counted one (closer ones are skipped over)."""
    counted: list[int] = []
    for index in range(first, last + 1):
        if not counted or series[index].time - series[counted[-1]].time >= min_interval:
            counted.append(index)
    return counted


def persistent(
    series: Sequence[ObservationFact], compare: Any, min_interval: float, count: int = 2, current: bool = True
) -> tuple[ObservationFact, ...] | None:
    """The latest ``count`` counted values of a stretch beyond the threshold, ending at a counted value;
    with ``current`` only the stretch that reaches the latest value."""
    best: tuple[ObservationFact, ...] | None = None
    for index in range(len(series)):
        if compare(series[index]) is not True:
            continue
        if current and any(compare(f) is not True for f in series[index + 1 :]):
            continue
        counted = _counted(series, _block_start(series, compare, index), index, min_interval)
        if counted[-1] == index and len(counted) >= count:
            best = tuple(series[i] for i in counted[-count:])
    return best


def trend_holds(values: Sequence[ObservationFact], direction: str) -> bool:
    """Every later value against every earlier one (not only neighbours)."""
    pairs = [(values[i], values[j]) for i in range(len(values)) for j in range(i + 1, len(values))]
    if direction == "non_decreasing":
        return all(float(b.value) >= float(a.value) for a, b in pairs)
    if direction == "non_increasing":
        return all(float(b.value) <= float(a.value) for a, b in pairs)
    raise ValueError(direction)


def _joined(series: Sequence[ObservationFact], compare: Any, first: int, last: int, max_gap: float) -> bool:
    """Whether ``series[first..last]`` is all beyond the threshold with no gap longer than ``max_gap``."""
    return all(compare(series[i]) is True for i in range(first, last + 1)) and all(
        series[i + 1].time - series[i].time <= max_gap for i in range(first, last)
    )


def sustained_run(
    series: Sequence[ObservationFact], compare: Any, at: float, max_gap: float
) -> tuple[float, tuple[ObservationFact, ...]] | None:
    """Of every stretch (first, last) up to ``at`` that cannot be extended to the left, the longest;
    ties go to the one ending later."""
    upto = [f for f in series if f.time <= at]
    best: tuple[float, tuple[ObservationFact, ...]] | None = None
    for last in range(len(upto)):
        for first in range(last + 1):
            if not _joined(upto, compare, first, last, max_gap):
                continue
            if first > 0 and _joined(upto, compare, first - 1, last, max_gap):
                continue  # not the stretch's real start
            duration = upto[last].time - upto[first].time
            if best is None or duration >= best[0]:
                best = (duration, (upto[first], upto[last]))
    return best


def current_run(
    values: Sequence[ObservationFact], compare: Any, at: float, max_gap: float
) -> tuple[ObservationFact, ObservationFact] | None:
    """The stretch that ends at the latest value, when that value is within ``max_gap`` of ``at``."""
    if not values or at - values[-1].time > max_gap:
        return None
    last = len(values) - 1
    starts = [first for first in range(last + 1) if _joined(values, compare, first, last, max_gap)]
    return (values[min(starts)], values[last]) if starts else None
