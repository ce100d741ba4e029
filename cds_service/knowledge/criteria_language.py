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

import operator
import re
from collections.abc import Callable
from typing import Any

from ..base.facts import HOUR

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}

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

_REASON = {"type": "string", "empty": False}
RULE_SCHEMAS: dict[str, dict[str, Any]] = {
    "value": {
        **_THRESHOLD,
        # Why a value this old still decides (required with `within`: recency for every decision).
        "within_source": _REASON,
        "aggregate": {"type": "string", "allowed": ["latest", "min", "max", "any", "all"]},
        # An optional alternative measure: when never charted, `not_met` instead of asking for it
        # (then `absent_reason` says why absence may count as "not met").
        "if_missing": {"type": "string", "allowed": [UNKNOWN, NOT_MET]},
        # Only an older value than `within`: `confirm` shows it and asks (default: unknown).
        "if_stale": {"type": "string", "allowed": [UNKNOWN, CONFIRM]},
        "absent_reason": _REASON,
    },
    "persistent": {
        **_THRESHOLD,
        "within_source": _REASON,
        "count": {"type": "integer", "min": 2},
        "min_interval": {**_DURATION_FIELD, "required": True},
        "trend": {"type": "string", "allowed": ["non_decreasing", "non_increasing"]},
        # Persistence means "still true now" (default): a later value not beyond the threshold
        # breaks the run. `current: false` accepts an earlier run; `current_reason` says why.
        "current": {"type": "boolean"},
        "current_reason": _REASON,
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
        # Required with `if_absent: not_met`: the clinical reason why no charted code may count as "no".
        "absent_reason": _REASON,
    },
}
#: The outcome label of a coded input (pregnancy test) that decides nothing: the clinician is asked.
INCONCLUSIVE = "inconclusive"
COMBINATORS = ("all_of", "any_of", "not")
RULE_KINDS = (*RULE_SCHEMAS, *COMBINATORS)


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


def absence_rules(rule: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The parts of a rule whose missing data counts as "not met" ((kind, spec) pairs)."""
    ((kind, spec),) = rule.items()
    if kind in ("all_of", "any_of"):
        return [found for inner in spec for found in absence_rules(inner)]
    if kind == "not":
        return absence_rules(spec)
    if (kind == "condition" and spec.get("if_absent") == NOT_MET) or (
        kind == "value" and spec.get("if_missing") == NOT_MET
    ):
        return [(kind, spec)]
    return []


def walk_rules(rule: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every leaf of a rule as (kind, spec)."""
    ((kind, spec),) = rule.items()
    if kind in ("all_of", "any_of"):
        return [found for inner in spec for found in walk_rules(inner)]
    if kind == "not":
        return walk_rules(spec)
    return [(kind, spec)]


def rule_can_confirm(rule: dict[str, Any]) -> bool:
    """True when the rule may hand the decision to a clinician (a condition with a confirm option)."""
    ((kind, spec),) = rule.items()
    if kind in ("all_of", "any_of"):
        return any(rule_can_confirm(r) for r in spec)
    if kind == "not":
        return rule_can_confirm(spec)
    if kind == "value":
        return spec.get("if_stale") == CONFIRM
    # A charted code that only suggests the value set, or an unconfirmed one, asks too.
    return kind == "condition"


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
        stale = "; an older one: clinician confirms" if spec.get("if_stale") == CONFIRM else ""
        return f"{aggregate}{name} {compared}{within}{optional}{stale}"
    if kind == "persistent":
        trend = f", trend {spec['trend'].replace('_', '-')}" if spec.get("trend") else ""
        now = "" if spec.get("current", True) else " (an earlier run counts)"
        return (
            f"{spec.get('count', 2)} consecutive {name} {compared} at least {spec['min_interval']} apart"
            f"{within}{trend}, the latest still beyond it{now}"
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
