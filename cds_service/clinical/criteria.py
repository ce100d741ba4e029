"""Evaluate the criteria language (``knowledge/criteria_language.py``) on a patient's clinical inputs.

Three-valued logic plus "needs confirmation"; every result carries its evidence, what is missing,
and a clock (``due``) when a rule is not met yet but will be if nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..base.facts import ObservationFact, format_time
from ..knowledge.criteria_language import (
    CONFIRM,
    MET,
    NOT_MET,
    OPERATORS,
    STEP_SERIES_PREFIX,
    UNKNOWN,
    parse_duration,
)
from .derived import HOUR, ClinicalInputs, Evidence, in_window, persistent, sustained_run, trend_holds


@dataclass(frozen=True)
class RuleResult:
    status: str
    evidence: tuple[Evidence, ...] = ()
    missing: tuple[str, ...] = ()  # what to measure / chart when unknown
    summary: str = ""  # the decisive fact, short ("VIS 130", "ANC 0.4 × 10⁹/L")
    due: float | None = None  # not met yet, but met at this time if nothing changes (a running clock)


# -- helpers --------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def _label(inputs: ClinicalInputs, name: str) -> str:
    return inputs.labels.get(name, name.replace("_", " "))


def _shown(inputs: ClinicalInputs, name: str, value: Any) -> str:
    """'ANC 0.4 × 10⁹/L', 'MAP 58 mmHg', 'VIS 130', 'age 45'."""
    unit = inputs.units.get(name, "")
    joiner = "" if unit in ("%",) else " "
    return f"{_label(inputs, name)} {_fmt(value)}{joiner + unit if unit else ''}"


def _fact_evidence(
    inputs: ClinicalInputs, fact: ObservationFact, prefix: str = "", verdict: str = ""
) -> Evidence:
    note = f" ({fact.note})" if fact.note else ""
    resources = tuple(r for r in fact.resource.split(",") if r)
    shown = f"{prefix}{_shown(inputs, fact.input, fact.value)}{note}"
    return Evidence(f"{shown} ({verdict})" if verdict else shown, fact.time, resources)


#: How a threshold reads on a card ("not > 3 s"); ``==`` / ``!=`` compare codes.
_OP_SHOWN = {"<": "<", "<=": "≤", ">": ">", ">=": "≥", "==": "", "!=": "other than"}


def _threshold_text(inputs: ClinicalInputs, spec: dict[str, Any]) -> str:
    """'> 3 s', '< 65 mmHg', 'positive': the rule's threshold in the input's display unit."""
    threshold = spec["threshold"]
    if isinstance(threshold, str):
        return f"{_OP_SHOWN[spec['op']]} {threshold}".strip()
    unit = inputs.units.get(spec["input"], "")
    joiner = "" if unit in ("", "%") else " "
    return f"{_OP_SHOWN[spec['op']]} {_fmt(float(threshold))}{joiner}{unit}"


def _verdict(inputs: ClinicalInputs, spec: dict[str, Any], ok: bool) -> str:
    """Beside a value that does not satisfy the rule: 'not > 3 s' (so '2 s' is not read as a pass)."""
    return "" if ok else f"not {_threshold_text(inputs, spec)}"


def _value_set_label(inputs: ClinicalInputs, name: str) -> str:
    """A condition value set as clinicians say it (its description), never its file key."""
    return inputs.labels.get(f"value_set:{name}", name.replace("_", " "))


#: Code systems as clinicians name them (evidence shows "ICD-10-CM I21.4", not the system URI).
_SYSTEM_NAMES = {
    "http://snomed.info/sct": "SNOMED CT",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD-10",
}


def _code_shown(code: str) -> str:
    """'system|code' → 'ICD-10-CM I21.4' (an unnamed system: the code alone)."""
    system, _, value = code.rpartition("|")
    name = _SYSTEM_NAMES.get(system)
    return f"{name} {value}" if name else value


def _window_text(spec: dict[str, Any]) -> str:
    return f" within the last {spec['within']}" if spec.get("within") is not None else ""


def _series(inputs: ClinicalInputs, spec: dict[str, Any]) -> list[ObservationFact]:
    within = parse_duration(spec["within"]) if spec.get("within") is not None else None
    return in_window(inputs.series.get(spec["input"], []), inputs.at, within)


def _comparator(spec: dict[str, Any]) -> Callable[[Any], bool]:
    compare, threshold = OPERATORS[spec["op"]], spec["threshold"]
    if isinstance(threshold, str):
        return lambda value: compare(str(value), threshold)
    return lambda value: isinstance(value, int | float) and compare(float(value), float(threshold))


def _missing(inputs: ClinicalInputs, spec: dict[str, Any]) -> str:
    return f"{_label(inputs, spec['input'])}{_window_text(spec)}"


# -- rule kinds -----------------------------------------------------------------------------------


def _value(inputs: ClinicalInputs, spec: dict[str, Any]) -> RuleResult:
    compare = _comparator(spec)
    scalar = inputs.scalar(spec["input"])
    # Scalar inputs (age, current VIS …) are used directly; a series input that also has a scalar
    # (VIS, weight) uses it for "latest" and whenever the scalar says the value cannot be known.
    use_scalar = scalar is not None and (
        spec["input"] not in inputs.series
        or scalar.status != "known"
        or (spec.get("aggregate", "latest") == "latest" and spec.get("within") is None)
    )
    if scalar is not None and use_scalar:
        if scalar.status != "known" or scalar.value is None:
            return RuleResult(UNKNOWN, scalar.evidence, (scalar.missing or _label(inputs, spec["input"]),))
        ok = compare(scalar.value)
        return RuleResult(
            MET if ok else NOT_MET, scalar.evidence, (), _shown(inputs, spec["input"], scalar.value)
        )
    values = _series(inputs, spec)
    if not values:
        if spec.get("if_missing") == NOT_MET:
            return RuleResult(NOT_MET, (Evidence(f"no {_missing(inputs, spec)} charted"),))
        return RuleResult(UNKNOWN, (), (_missing(inputs, spec),))
    aggregate = spec.get("aggregate", "latest")
    if aggregate in ("any", "all"):
        hits = [f for f in values if compare(f.value)]
        ok = bool(hits) if aggregate == "any" else len(hits) == len(values)
        shown = (
            (hits[-1] if hits else values[-1])
            if aggregate == "any"
            else next((f for f in values if not compare(f.value)), values[-1])
        )
        return RuleResult(
            MET if ok else NOT_MET,
            (_fact_evidence(inputs, shown, verdict=_verdict(inputs, spec, ok)),),
            (),
            _shown(inputs, shown.input, shown.value),
        )
    if aggregate == "latest":
        chosen = values[-1]
    else:
        numeric = [f for f in values if isinstance(f.value, int | float)]
        if not numeric:
            return RuleResult(UNKNOWN, (), (_missing(inputs, spec),))
        chosen = (min if aggregate == "min" else max)(numeric, key=lambda f: float(f.value))
    ok = compare(chosen.value)
    return RuleResult(
        MET if ok else NOT_MET,
        (_fact_evidence(inputs, chosen, verdict=_verdict(inputs, spec, ok)),),
        (),
        _shown(inputs, chosen.input, chosen.value),
    )


def _unknown_scalar(inputs: ClinicalInputs, spec: dict[str, Any]) -> RuleResult | None:
    """A series input whose scalar says it cannot be known (VIS without a body weight): UNKNOWN."""
    scalar = inputs.scalar(spec["input"])
    if scalar is not None and scalar.status == "unknown" and spec["input"] in inputs.series:
        return RuleResult(UNKNOWN, scalar.evidence, (scalar.missing or _label(inputs, spec["input"]),))
    return None


def _persistent(inputs: ClinicalInputs, spec: dict[str, Any]) -> RuleResult:
    if (unknown := _unknown_scalar(inputs, spec)) is not None:
        return unknown
    values = _series(inputs, spec)
    count = int(spec.get("count", 2))
    if len(values) < count:
        have = f" (only {len(values)} value{'s' if len(values) != 1 else ''})" if values else ""
        return RuleResult(
            UNKNOWN,
            tuple(_fact_evidence(inputs, f) for f in values),
            (f"{count} values of {_missing(inputs, spec)}, at least {spec['min_interval']} apart{have}",),
        )
    run = persistent(values, _comparator(spec), parse_duration(spec["min_interval"]), count)
    if run is None:
        return RuleResult(NOT_MET, (_fact_evidence(inputs, values[-1], "latest "),))
    evidence = tuple(_fact_evidence(inputs, f) for f in run)
    if spec.get("trend"):
        # The trend is judged over every value from the run's start on, not only the two picked.
        since = [f for f in values if f.time >= run[0].time]
        if not trend_holds(since, spec["trend"]):
            return RuleResult(
                NOT_MET, evidence, (), f"{spec['input']} trend not {spec['trend'].replace('_', '-')}"
            )
    return RuleResult(MET, evidence, (), _shown(inputs, spec["input"], run[-1].value))


def held_until_now(values: list[ObservationFact], at: float) -> list[ObservationFact]:
    """A computed step series (facts coded ``derived:…``, e.g. VIS from infusion records) changes
    only at its points, so its last value holds until the evaluation time: add that point."""
    if values and values[-1].code.startswith(STEP_SERIES_PREFIX) and values[-1].time < at:
        return [*values, values[-1]._replace(time=at)]
    return values


def current_run(
    values: list[ObservationFact], compare: Callable[[Any], bool], at: float, max_gap: float
) -> tuple[ObservationFact, ObservationFact] | None:
    """The run of values beyond the threshold that is still going on at ``at`` (first, last)."""
    if not values or not compare(values[-1].value) or at - values[-1].time > max_gap:
        return None
    first = values[-1]
    for fact in reversed(values[:-1]):
        if not compare(fact.value) or first.time - fact.time > max_gap:
            break
        first = fact
    return first, values[-1]


def _sustained(inputs: ClinicalInputs, spec: dict[str, Any]) -> RuleResult:
    if (unknown := _unknown_scalar(inputs, spec)) is not None:
        return unknown
    values = held_until_now(_series(inputs, spec), inputs.at)
    needed = parse_duration(spec["for_more_than"])
    max_gap = parse_duration(spec["max_gap"])
    compare = _comparator(spec)
    scalar = inputs.scalar(spec["input"])
    current_value = scalar.value if scalar is not None and scalar.status == "known" else None
    if not values and scalar is not None and current_value is not None and not compare(current_value):
        # No change in the look-back window (no infusion at all: VIS 0): the current value held throughout.
        return RuleResult(NOT_MET, scalar.evidence, (), _shown(inputs, spec["input"], current_value))
    if len(values) < 2:
        return RuleResult(
            UNKNOWN,
            tuple(_fact_evidence(inputs, f) for f in values),
            (f"repeated {_missing(inputs, spec)} (over more than {spec['for_more_than']})",),
        )
    ongoing = current_run(values, compare, inputs.at, max_gap)
    if spec.get("current"):
        found = (ongoing[1].time - ongoing[0].time, ongoing) if ongoing is not None else None
    else:
        found = sustained_run(values, compare, inputs.at, max_gap)
    if found is None:
        return RuleResult(NOT_MET, (_fact_evidence(inputs, values[-1], "latest "),))
    duration, (first, last) = found
    threshold = _threshold_text(inputs, spec)
    evidence = (
        _fact_evidence(inputs, first, "from "),
        _fact_evidence(inputs, last, "to "),
        Evidence(f"{_label(inputs, spec['input'])} {threshold} for {duration / HOUR:.1f} h"),
    )
    summary = f"{_label(inputs, spec['input'])} {threshold} for {duration / HOUR:.1f} h"
    if duration > needed:
        return RuleResult(MET, evidence, (), summary)
    due = None
    if ongoing is not None:
        # Still going on: met once it has lasted long enough (or at the next value, if that is later).
        due = max(ongoing[0].time + needed, inputs.at)
        ongoing_hours = (ongoing[1].time - ongoing[0].time) / HOUR
        # One item, timed at the run's start: "MAP 58 mmHg (< 65 mmHg for 2.5 h so far)".
        evidence = (
            _fact_evidence(inputs, ongoing[0], verdict=f"{threshold} for {ongoing_hours:.1f} h so far"),
        )
    return RuleResult(NOT_MET, evidence, (), summary, due)


def _established(inputs: ClinicalInputs, spec: dict[str, Any]) -> RuleResult:
    derived = inputs.scalar(spec["input"])
    if derived is None:
        return RuleResult(UNKNOWN, (), (_label(inputs, spec["input"]),))
    if derived.status == "known":
        return RuleResult(MET, derived.evidence, (), _label(inputs, spec["input"]))
    if derived.status == "absent":
        return RuleResult(NOT_MET, derived.evidence)
    return RuleResult(UNKNOWN, derived.evidence, (derived.missing or _label(inputs, spec["input"]),))


def _time_since(inputs: ClinicalInputs, spec: dict[str, Any]) -> RuleResult:
    derived = inputs.scalar(spec["input"])
    if derived is None or derived.value is None:
        if derived is not None and derived.status == "absent":
            return RuleResult(NOT_MET, derived.evidence)
        return RuleResult(
            UNKNOWN,
            derived.evidence if derived else (),
            ((derived.missing if derived else "") or _label(inputs, spec["input"]),),
        )
    since = float(derived.value)
    elapsed = inputs.at - since
    low = parse_duration(spec["min"]) if spec.get("min") is not None else None
    high = parse_duration(spec["max"]) if spec.get("max") is not None else None
    ok = (low is None or elapsed >= low) and (high is None or elapsed <= high)
    evidence = (
        Evidence(f"{_label(inputs, spec['input'])} since {format_time(since)}, {elapsed / HOUR:.1f} h ago"),
    )
    summary = f"{_label(inputs, spec['input'])} {elapsed / HOUR:.1f} h ago"
    due = since + low if low is not None and elapsed < low and (high is None or low <= high) else None
    return RuleResult(MET if ok else NOT_MET, evidence, (), summary, due)


def _condition(inputs: ClinicalInputs, spec: dict[str, Any]) -> RuleResult:
    found = []
    for name in spec["value_sets"]:
        for condition in inputs.conditions.get(name, []):
            if condition.clinical_status in {"active", "recurrence", "relapse", ""} and (
                condition.onset is None or condition.onset <= inputs.at
            ):
                found.append((name, condition))
    if found:
        evidence = tuple(
            Evidence(
                f"{_value_set_label(inputs, name)} charted ({_code_shown(c.code)})", c.onset, (c.resource,)
            )
            for name, c in found[:3]
        )
        return RuleResult(spec.get("if_present", MET), evidence, (), _value_set_label(inputs, found[0][0]))
    absent = spec.get("if_absent", CONFIRM)
    names = ", ".join(_value_set_label(inputs, n) for n in spec["value_sets"])
    text = spec.get("absent_text") or f"none of: {names} (no matching Condition charted)"
    if absent == UNKNOWN:
        return RuleResult(UNKNOWN, (), (text,))
    return RuleResult(absent, (Evidence(f"no Condition charted for {names}"),))


def _evidence_of(results: list[RuleResult]) -> tuple[Evidence, ...]:
    """The evidence of several results, each item once (two age checks cite the same birth date)."""
    return tuple(dict.fromkeys(e for r in results for e in r.evidence))


def combine_all(results: list[RuleResult]) -> RuleResult:
    """Kleene AND: any not_met → not_met; all met → met; unknown before confirm.

    A not_met AND is due (will be met) when every failing part is due: at the latest of them."""
    statuses = [r.status for r in results]
    if NOT_MET in statuses:
        failing = [r for r in results if r.status == NOT_MET]
        dues = [r.due for r in failing if r.due is not None]
        due = max(dues) if len(dues) == len(failing) else None
        return RuleResult(NOT_MET, _evidence_of(failing), (), failing[0].summary, due)
    status = MET if all(s == MET for s in statuses) else (UNKNOWN if UNKNOWN in statuses else CONFIRM)
    return RuleResult(
        status,
        _evidence_of(results),
        tuple(m for r in results for m in r.missing),
        "; ".join(r.summary for r in results if r.summary and r.status == MET),
    )


def combine_any(results: list[RuleResult]) -> RuleResult:
    """Kleene OR: any met → met; all not_met → not_met; unknown before confirm.

    A not_met OR is due when any part is due: at the earliest of them."""
    met = [r for r in results if r.status == MET]
    if met:
        return RuleResult(MET, _evidence_of(met), (), met[0].summary)
    statuses = [r.status for r in results]
    if all(s == NOT_MET for s in statuses):
        dues = [r.due for r in results if r.due is not None]
        return RuleResult(NOT_MET, _evidence_of(results), (), "", min(dues, default=None))
    status = UNKNOWN if UNKNOWN in statuses else CONFIRM
    return RuleResult(status, _evidence_of(results), tuple(m for r in results for m in r.missing))


def evaluate_rule(inputs: ClinicalInputs, rule: dict[str, Any]) -> RuleResult:
    ((kind, spec),) = rule.items()
    if kind == "all_of":
        return combine_all([evaluate_rule(inputs, r) for r in spec])
    if kind == "any_of":
        return combine_any([evaluate_rule(inputs, r) for r in spec])
    if kind == "not":
        inner = evaluate_rule(inputs, spec)
        flipped = {MET: NOT_MET, NOT_MET: MET}.get(inner.status, inner.status)
        return RuleResult(flipped, inner.evidence, inner.missing, inner.summary)  # no clock: `due` dropped
    return _HANDLERS[kind](inputs, spec)


_HANDLERS: dict[str, Callable[[ClinicalInputs, dict[str, Any]], RuleResult]] = {
    "value": _value,
    "persistent": _persistent,
    "sustained": _sustained,
    "established": _established,
    "time_since": _time_since,
    "condition": _condition,
}
