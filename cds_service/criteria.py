"""A small criteria language, evaluated with three-valued logic (plus "needs confirmation").

A criterion's ``rule`` is one of these forms (the language knows nothing about any trial):

``value``       {input, op, threshold, unit?, aggregate: latest|min|max|any|all, within?}
``persistent``  {input, op, threshold, unit?, count: 2, min_interval, within?,
                 trend?: non_decreasing|non_increasing}
``sustained``   {input, op, threshold, unit?, for_more_than, max_gap, within?}
``established`` {input}                     — a derived input is present (e.g. septic_shock_onset)
``time_since``  {input, min?, max?}         — time since a derived time input (e.g. onset)
``condition``   {value_sets: [...], if_absent: not_met|confirm|unknown}
``all_of`` / ``any_of`` [rules] ; ``not`` rule
A criterion may instead be a ``confirm`` item: text a clinician must confirm.

Statuses: ``met``, ``not_met``, ``unknown`` (data missing: say what to measure) and ``confirm``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .derived import (
    HOUR,
    OPERATORS,
    ClinicalInputs,
    Evidence,
    in_window,
    persistent,
    sustained_run,
    trend_holds,
)
from .facts import ObservationFact, format_time

MET, NOT_MET, UNKNOWN, CONFIRM = "met", "not_met", "unknown", "confirm"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|min|m|h|d)\s*$")
_SECONDS = {"s": 1.0, "min": 60.0, "m": 60.0, "h": HOUR, "d": 24 * HOUR}


def parse_duration(text: str | int | float) -> float:
    """'30m', '30 min', '5h', '2d' → seconds. A bare number means hours."""
    if isinstance(text, int | float):
        return float(text) * HOUR
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30min, 5h, 2d)")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def _duration_ok(field: str, value: Any, error: Callable[[str, str], None]) -> None:
    try:
        parse_duration(value)
    except ValueError as exc:
        error(field, str(exc))


_DURATION_FIELD = {"type": ["string", "number"], "check_with": _duration_ok}
_THRESHOLD = {
    "input": {"type": "string", "required": True},
    "op": {"type": "string", "allowed": list(OPERATORS), "required": True},
    "threshold": {"type": ["number", "string"], "required": True},
    "unit": {"type": "string"},
    "within": _DURATION_FIELD,
}

RULE_SCHEMAS: dict[str, dict[str, Any]] = {
    "value": {
        **_THRESHOLD,
        "aggregate": {"type": "string", "allowed": ["latest", "min", "max", "any", "all"]},
    },
    "persistent": {
        **_THRESHOLD,
        "count": {"type": "integer", "min": 2},
        "min_interval": {**_DURATION_FIELD, "required": True},
        "trend": {"type": "string", "allowed": ["non_decreasing", "non_increasing"]},
    },
    "sustained": {
        **_THRESHOLD,
        "for_more_than": {**_DURATION_FIELD, "required": True},
        "max_gap": {**_DURATION_FIELD, "required": True},
    },
    "established": {"input": {"type": "string", "required": True}},
    "time_since": {
        "input": {"type": "string", "required": True},
        "min": _DURATION_FIELD,
        "max": _DURATION_FIELD,
    },
    "condition": {
        "value_sets": {"type": "list", "schema": {"type": "string"}, "required": True, "minlength": 1},
        "if_absent": {"type": "string", "allowed": [NOT_MET, CONFIRM, UNKNOWN]},
        "absent_text": {"type": "string"},
    },
}
COMBINATORS = ("all_of", "any_of", "not")
RULE_KINDS = (*RULE_SCHEMAS, *COMBINATORS)


@dataclass(frozen=True)
class RuleResult:
    status: str
    evidence: tuple[Evidence, ...] = ()
    missing: tuple[str, ...] = ()  # what to measure / chart when unknown
    summary: str = ""  # the decisive fact, short ("VIS 130", "ANC 0.4 × 10⁹/L")


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


def _fact_evidence(inputs: ClinicalInputs, fact: ObservationFact, prefix: str = "") -> Evidence:
    note = f" ({fact.note})" if fact.note else ""
    resources = tuple(r for r in fact.resource.split(",") if r)
    return Evidence(f"{prefix}{_shown(inputs, fact.input, fact.value)}{note}", fact.time, resources)


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
            (_fact_evidence(inputs, shown),),
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
        (_fact_evidence(inputs, chosen),),
        (),
        _shown(inputs, chosen.input, chosen.value),
    )


def _persistent(inputs: ClinicalInputs, spec: dict[str, Any]) -> RuleResult:
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


def _sustained(inputs: ClinicalInputs, spec: dict[str, Any]) -> RuleResult:
    values = _series(inputs, spec)
    needed = parse_duration(spec["for_more_than"])
    if len(values) < 2:
        return RuleResult(
            UNKNOWN,
            tuple(_fact_evidence(inputs, f) for f in values),
            (f"repeated {_missing(inputs, spec)} (over more than {spec['for_more_than']})",),
        )
    found = sustained_run(values, _comparator(spec), inputs.at, parse_duration(spec["max_gap"]))
    if found is None:
        return RuleResult(NOT_MET, (_fact_evidence(inputs, values[-1], "latest "),))
    duration, (first, last) = found
    evidence = (
        _fact_evidence(inputs, first, "from "),
        _fact_evidence(inputs, last, "to "),
        Evidence(f"{duration / HOUR:.1f} h {spec['op']} {spec['threshold']}"),
    )
    status = MET if duration > needed else NOT_MET
    return RuleResult(
        status,
        evidence,
        (),
        f"{_label(inputs, spec['input'])} {spec['op']} {spec['threshold']} for {duration / HOUR:.1f} h",
    )


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
    elapsed = inputs.at - float(derived.value)
    ok = True
    if spec.get("min") is not None:
        ok = ok and elapsed >= parse_duration(spec["min"])
    if spec.get("max") is not None:
        ok = ok and elapsed <= parse_duration(spec["max"])
    evidence = (
        Evidence(
            f"{_label(inputs, spec['input'])} since {format_time(float(derived.value))}, "
            f"{elapsed / HOUR:.1f} h ago"
        ),
    )
    return RuleResult(
        MET if ok else NOT_MET, evidence, (), f"{_label(inputs, spec['input'])} {elapsed / HOUR:.1f} h ago"
    )


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
            Evidence(f"{name.replace('_', ' ')} charted ({c.code})", c.onset, (c.resource,))
            for name, c in found[:3]
        )
        return RuleResult(MET, evidence, (), found[0][0].replace("_", " "))
    absent = spec.get("if_absent", CONFIRM)
    names = ", ".join(n.replace("_", " ") for n in spec["value_sets"])
    text = spec.get("absent_text") or f"none of: {names} (no matching Condition charted)"
    if absent == UNKNOWN:
        return RuleResult(UNKNOWN, (), (text,))
    return RuleResult(absent, (Evidence(f"no Condition charted for {names}"),))


def combine_all(results: list[RuleResult]) -> RuleResult:
    """Kleene AND: any not_met → not_met; all met → met; unknown before confirm."""
    statuses = [r.status for r in results]
    if NOT_MET in statuses:
        failing = [r for r in results if r.status == NOT_MET]
        return RuleResult(NOT_MET, tuple(e for r in failing for e in r.evidence), (), failing[0].summary)
    status = MET if all(s == MET for s in statuses) else (UNKNOWN if UNKNOWN in statuses else CONFIRM)
    return RuleResult(
        status,
        tuple(e for r in results for e in r.evidence),
        tuple(m for r in results for m in r.missing),
        "; ".join(r.summary for r in results if r.summary and r.status == MET),
    )


def combine_any(results: list[RuleResult]) -> RuleResult:
    """Kleene OR: any met → met; all not_met → not_met; unknown before confirm."""
    met = [r for r in results if r.status == MET]
    if met:
        return RuleResult(MET, tuple(e for r in met for e in r.evidence), (), met[0].summary)
    statuses = [r.status for r in results]
    if all(s == NOT_MET for s in statuses):
        return RuleResult(NOT_MET, tuple(e for r in results for e in r.evidence))
    status = UNKNOWN if UNKNOWN in statuses else CONFIRM
    return RuleResult(
        status, tuple(e for r in results for e in r.evidence), tuple(m for r in results for m in r.missing)
    )


def evaluate_rule(inputs: ClinicalInputs, rule: dict[str, Any]) -> RuleResult:
    ((kind, spec),) = rule.items()
    if kind == "all_of":
        return combine_all([evaluate_rule(inputs, r) for r in spec])
    if kind == "any_of":
        return combine_any([evaluate_rule(inputs, r) for r in spec])
    if kind == "not":
        inner = evaluate_rule(inputs, spec)
        flipped = {MET: NOT_MET, NOT_MET: MET}.get(inner.status, inner.status)
        return RuleResult(flipped, inner.evidence, inner.missing, inner.summary)
    return _HANDLERS[kind](inputs, spec)


_HANDLERS: dict[str, Callable[[ClinicalInputs, dict[str, Any]], RuleResult]] = {
    "value": _value,
    "persistent": _persistent,
    "sustained": _sustained,
    "established": _established,
    "time_since": _time_since,
    "condition": _condition,
}


def rule_inputs(rule: dict[str, Any]) -> set[str]:
    """Every input name a rule refers to (to build prefetch queries and check trial files)."""
    ((kind, spec),) = rule.items()
    if kind in ("all_of", "any_of"):
        return set().union(*(rule_inputs(r) for r in spec))
    if kind == "not":
        return rule_inputs(spec)
    return {spec["input"]} if "input" in spec else set()


def rule_value_sets(rule: dict[str, Any]) -> set[str]:
    ((kind, spec),) = rule.items()
    if kind in ("all_of", "any_of"):
        return set().union(*(rule_value_sets(r) for r in spec))
    if kind == "not":
        return rule_value_sets(spec)
    return set(spec.get("value_sets", ()))
