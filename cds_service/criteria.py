"""A small criteria language, evaluated with three-valued logic (plus "needs confirmation").

A criterion's ``rule`` is one of these forms (the language knows nothing about any trial):

``value``       {input, op, threshold, unit?, aggregate: latest|min|max|any|all, within?,
                 if_missing?: unknown|not_met}
``persistent``  {input, op, threshold, unit?, count: 2, min_interval, within?,
                 trend?: non_decreasing|non_increasing}
``sustained``   {input, op, threshold, unit?, for_more_than, max_gap, within?, current?}
``established`` {input}                     — a derived input is present (e.g. septic_shock_onset)
``time_since``  {input, min?, max?}         — time since a derived time input (e.g. onset)
``condition``   {value_sets: [...], if_absent: not_met|confirm|unknown, if_present: met|confirm}
``all_of`` / ``any_of`` [rules] ; ``not`` rule
A criterion may instead be a ``confirm`` item: text a clinician must confirm.

Statuses: ``met``, ``not_met``, ``unknown`` (data missing: say what to measure) and ``confirm``.
Combinators follow Kleene's three-valued logic; ``confirm`` ranks between ``unknown`` and ``met``
(a clinician must look, but no data is missing).

Clocks. A ``not_met`` result may carry ``due``: the time at which the rule will be met if nothing
changes (a ``sustained`` run still going on but not yet long enough; a ``time_since`` minimum not
reached yet). ``all_of`` is due when every failing part is (the latest of them), ``any_of`` when any
failing part is (the earliest). Evaluation uses it for "upcoming" and for the window's closing time.

``sustained`` semantics: the run is the longest stretch of consecutive values beyond the threshold
(a gap longer than ``max_gap`` between two values breaks it; its duration is first to last value, so
unobserved time is never counted). ``current: true`` asks for the run going on now instead: it ends
at the latest value, which is at most ``max_gap`` old.
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
#: ObservationFact.code of computed step series (derived.py): a value holds until the next point.
STEP_SERIES_PREFIX = "derived:"

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
        # An optional alternative measure: when never charted, `not_met` instead of asking for it.
        "if_missing": {"type": "string", "allowed": [UNKNOWN, NOT_MET]},
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
        "current": {"type": "boolean"},
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
        # A charted code that suggests but does not prove the criterion (severity not coded …).
        "if_present": {"type": "string", "allowed": [MET, CONFIRM]},
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
    evidence = (
        _fact_evidence(inputs, first, "from "),
        _fact_evidence(inputs, last, "to "),
        Evidence(f"{duration / HOUR:.1f} h {spec['op']} {spec['threshold']}"),
    )
    summary = f"{_label(inputs, spec['input'])} {spec['op']} {spec['threshold']} for {duration / HOUR:.1f} h"
    if duration > needed:
        return RuleResult(MET, evidence, (), summary)
    due = None
    if ongoing is not None:
        # Still going on: met once it has lasted long enough (or at the next value, if that is later).
        due = max(ongoing[0].time + needed, inputs.at)
        ongoing_hours = (ongoing[1].time - ongoing[0].time) / HOUR
        evidence = (
            _fact_evidence(inputs, ongoing[0], "since "),
            Evidence(f"{ongoing_hours:.1f} h {spec['op']} {spec['threshold']} so far, going on"),
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
            Evidence(f"{name.replace('_', ' ')} charted ({c.code})", c.onset, (c.resource,))
            for name, c in found[:3]
        )
        return RuleResult(spec.get("if_present", MET), evidence, (), found[0][0].replace("_", " "))
    absent = spec.get("if_absent", CONFIRM)
    names = ", ".join(n.replace("_", " ") for n in spec["value_sets"])
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


def rule_can_confirm(rule: dict[str, Any]) -> bool:
    """True when the rule may hand the decision to a clinician (a condition with a confirm option)."""
    ((kind, spec),) = rule.items()
    if kind in ("all_of", "any_of"):
        return any(rule_can_confirm(r) for r in spec)
    if kind == "not":
        return rule_can_confirm(spec)
    return kind == "condition" and CONFIRM in (spec.get("if_absent", CONFIRM), spec.get("if_present", MET))


_OP_TEXT = {"<=": "≤", ">=": "≥", "==": "=", "!=": "≠"}
_AGGREGATE_TEXT = {"latest": "latest", "min": "lowest", "max": "highest", "any": "any", "all": "every"}


def describe_rule(rule: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    """A rule in words, for the generated documentation ("latest ANC <= 1.0 within 24h")."""
    labels = labels or {}
    ((kind, spec),) = rule.items()
    if kind in ("all_of", "any_of"):
        joiner = " and " if kind == "all_of" else " or "
        return "(" + joiner.join(describe_rule(r, labels) for r in spec) + ")"
    if kind == "not":
        return f"not {describe_rule(spec, labels)}"
    name = labels.get(spec.get("input", ""), spec.get("input", "").replace("_", " "))
    unit = f" {spec['unit']}" if spec.get("unit") else ""
    within = f" within {spec['within']}" if spec.get("within") is not None else ""
    compared = f"{_OP_TEXT.get(spec.get('op', ''), spec.get('op'))} {spec.get('threshold')}{unit}"
    if kind == "value":
        aggregate = f"{_AGGREGATE_TEXT[spec['aggregate']]} " if spec.get("aggregate") else ""
        optional = " (if charted)" if spec.get("if_missing") == NOT_MET else ""
        return f"{aggregate}{name} {compared}{within}{optional}"
    if kind == "persistent":
        trend = f", trend {spec['trend'].replace('_', '-')}" if spec.get("trend") else ""
        return (
            f"{spec.get('count', 2)} consecutive {name} {compared} at least {spec['min_interval']} apart"
            f"{within}{trend}"
        )
    if kind == "sustained":
        now = ", still going on" if spec.get("current") else ""
        return f"{name} {compared} for more than {spec['for_more_than']} (gaps ≤ {spec['max_gap']}){now}"
    if kind == "established":
        return f"{name} established"
    if kind == "time_since":
        parts = [
            f"≥ {spec['min']}" if spec.get("min") is not None else "",
            f"≤ {spec['max']}" if spec.get("max") is not None else "",
        ]
        return f"time since {name} " + " and ".join(p for p in parts if p)
    if kind == "condition":
        present = " (charted: clinician confirms)" if spec.get("if_present") == CONFIRM else ""
        absent = {
            NOT_MET: "",
            CONFIRM: "; none charted: clinician confirms",
            UNKNOWN: "; none charted: unknown",
        }[spec.get("if_absent", CONFIRM)]
        sets = ", ".join(v.replace("_", " ") for v in spec["value_sets"])
        return f"Condition charted: {sets}{present}{absent}"
    return kind
