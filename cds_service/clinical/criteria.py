"""Evaluate the criteria language (``knowledge/criteria_language.py``) on a patient's clinical inputs.

Three-valued logic plus "needs confirmation"; every result carries its evidence, what is missing,
and a clock (``due``) when a rule is not met yet but will be if nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..base.facts import ConditionFact, ObservationFact, format_time
from ..knowledge.criteria_language import (
    CONFIRM,
    INCONCLUSIVE,
    MET,
    NOT_MET,
    OPERATORS,
    STEP_SERIES_PREFIX,
    UNKNOWN,
    parse_duration,
)
from .derived import (
    CONFIRM_STATUS,
    HOUR,
    ClinicalInputs,
    Evidence,
    FactTest,
    in_window,
    latest,
    persistent,
    sustained_run,
    trend_holds,
)


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
    """The threshold test on a plain value (scalars: age, the current VIS …)."""
    compare, threshold = OPERATORS[spec["op"]], spec["threshold"]
    if isinstance(threshold, str):
        return lambda value: compare(str(value), threshold)
    return lambda value: isinstance(value, int | float) and compare(float(value), float(threshold))


def censored_test(comparator: str, bound: float, op: str, threshold: float) -> bool | None:
    """Whether a value charted as ``<comparator><bound>`` (e.g. "> 3") meets ``<op> threshold``:
    True or False when every value the censoring allows gives that answer, else None (undecidable).

    "> 3" meets "> 3" and "≥ 3"; "< 0.1" meets "< 1"; "> 3" fails "< 3"; "< 5" against "> 3" is None.
    """
    if comparator in (">", ">="):
        strict = comparator == ">"  # the true value lies in (bound, ∞), or [bound, ∞) for ">="
        if op in (">", ">="):
            ok = bound > threshold or (bound == threshold and (strict or op == ">="))
            return True if ok else None
        if op in ("<", "<="):
            never = bound > threshold or (bound == threshold and (strict or op == "<"))
            return False if never else None
        return None
    if comparator in ("<", "<="):
        strict = comparator == "<"  # the true value lies in (-∞, bound), or (-∞, bound]
        if op in ("<", "<="):
            ok = bound < threshold or (bound == threshold and (strict or op == "<="))
            return True if ok else None
        if op in (">", ">="):
            never = bound < threshold or (bound == threshold and (strict or op == ">"))
            return False if never else None
        return None
    return None  # "ad" (sufficient to achieve) or anything else: not a bound we can use


def _fact_test(spec: dict[str, Any]) -> FactTest:
    """The threshold test on a charted fact: three-valued, censored values (comparator) included."""
    op, threshold = spec["op"], spec["threshold"]
    compare = OPERATORS[op]
    if isinstance(threshold, str):
        return lambda fact: compare(str(fact.value), threshold)
    limit = float(threshold)

    def test(fact: ObservationFact) -> bool | None:
        value = fact.value
        if type(value) is float and not fact.comparator:  # the common case, as below
            return compare(value, limit)
        if not isinstance(value, int | float):
            return False
        if fact.comparator:
            return censored_test(fact.comparator, float(value), op, limit)
        return compare(float(value), limit)

    return test


def _undecidable(values: list[ObservationFact], test: FactTest) -> list[ObservationFact]:
    """The values the test cannot decide. Only a censored value (a comparator) can be undecidable:
    the others are not tested again (a VIS series is a point per titration record)."""
    return [f for f in values if f.comparator and test(f) is None]


def _censored_unknown(
    inputs: ClinicalInputs, spec: dict[str, Any], facts: list[ObservationFact]
) -> RuleResult:
    """UNKNOWN because censored values cannot be compared with the threshold: never "not met"."""
    shown = facts[-1]
    return RuleResult(
        UNKNOWN,
        (_fact_evidence(inputs, shown),),
        (
            f"{_label(inputs, spec['input'])} charted as censored ({shown.comparator}{_fmt(shown.value)}): "
            f"cannot tell whether {spec['op']} {spec['threshold']} — an exact value",
        ),
    )


def _three_valued(results: list[bool | None], every: bool) -> bool | None:
    """Kleene any (every=False) / all (every=True) over three-valued results."""
    if every:
        return False if False in results else (True if all(r is True for r in results) else None)
    return True if True in results else (False if all(r is False for r in results) else None)


def _unavailable(inputs: ClinicalInputs, name: str) -> bool:
    return name in inputs.facts.unavailable


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
    test = _fact_test(spec)
    values = _series(inputs, spec)
    if not values:
        if _unavailable(inputs, spec["input"]):
            return RuleResult(
                UNKNOWN, (), (f"{_missing(inputs, spec)} (not available: prefetch null or not fetched)",)
            )
        older = latest(inputs.series.get(spec["input"], []), inputs.at)
        if older is not None and spec.get("if_stale") == CONFIRM:
            # Recency for every decision: an older value decides nothing, either way — it is shown
            # and the clinician confirms (a pregnancy test from last year).
            evidence = _fact_evidence(inputs, older, "latest ")
            stale = Evidence(
                f"{evidence.text} — older than {spec['within']}, so it cannot decide",
                older.time,
                evidence.resources,
            )
            return RuleResult(CONFIRM, (stale,), (), "")
        if spec.get("if_missing") == NOT_MET:
            return RuleResult(NOT_MET, (Evidence(f"no {_missing(inputs, spec)} charted"),))
        return RuleResult(UNKNOWN, (), (_missing(inputs, spec),))
    aggregate = spec.get("aggregate", "latest")
    if aggregate in ("min", "max") and spec["op"] in ("==", "!="):
        numeric = [f for f in values if isinstance(f.value, int | float)]
        if not numeric:
            return RuleResult(UNKNOWN, (), (_missing(inputs, spec),))
        chosen = (min if aggregate == "min" else max)(numeric, key=lambda f: float(f.value))
        ok: bool | None = test(chosen)
    elif aggregate in ("any", "all", "min", "max"):
        # min / max against an inequality are any / all over the values (exact with censored values):
        # "lowest < t" = any value < t, "lowest > t" = every value > t; and the other way for max.
        if aggregate in ("min", "max"):
            every = (aggregate == "min") == (spec["op"] in (">", ">="))
        else:
            every = aggregate == "all"
        results = [test(f) for f in values]
        ok = _three_valued(results, every)
        if ok is None:
            return _censored_unknown(
                inputs, spec, [f for f, r in zip(values, results, strict=True) if r is None]
            )
        if aggregate in ("min", "max"):
            numeric = [f for f in values if isinstance(f.value, int | float)] or values
            chosen = (min if aggregate == "min" else max)(numeric, key=lambda f: float(f.value))
        elif every:
            chosen = next((f for f, r in zip(values, results, strict=True) if r is False), values[-1])
        else:
            chosen = next(
                (f for f, r in zip(reversed(values), reversed(results), strict=True) if r), values[-1]
            )
    else:
        chosen = values[-1]
        if chosen.value == INCONCLUSIVE:
            # A coded result that decides nothing (an equivocal hCG): the clinician is asked.
            return RuleResult(CONFIRM, (_fact_evidence(inputs, chosen, "inconclusive: "),), (), "")
        ok = test(chosen)
        if ok is None:
            return _censored_unknown(inputs, spec, [chosen])
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
    test = _fact_test(spec)
    run = persistent(values, test, parse_duration(spec["min_interval"]), count, spec.get("current", True))
    if run is None:
        undecided = _undecidable(values, test)
        if undecided:
            return _censored_unknown(inputs, spec, undecided)
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
    values: list[ObservationFact], compare: FactTest, at: float, max_gap: float
) -> tuple[ObservationFact, ObservationFact] | None:
    """The run of values beyond the threshold that is still going on at ``at`` (first, last)."""
    if not values or compare(values[-1]) is not True or at - values[-1].time > max_gap:
        return None
    first = values[-1]
    for fact in reversed(values[:-1]):
        if compare(fact) is not True or first.time - fact.time > max_gap:
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
    test = _fact_test(spec)
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
    ongoing = current_run(values, test, inputs.at, max_gap)
    if spec.get("current"):
        found = (ongoing[1].time - ongoing[0].time, ongoing) if ongoing is not None else None
    else:
        found = sustained_run(values, test, inputs.at, max_gap)
    if found is None:
        undecided = _undecidable(values, test)
        if undecided:
            return _censored_unknown(inputs, spec, undecided)
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
    if derived.status == CONFIRM_STATUS:
        return RuleResult(CONFIRM, derived.evidence, (), "")
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


_ACTIVE = frozenset({"active", "recurrence", "relapse", ""})


def _asks(inputs: ClinicalInputs, name: str, condition: ConditionFact) -> list[str]:
    """Why a charted Condition of value set ``name`` only asks the clinician ([] = it decides)."""
    reasons: list[str] = []
    if name in condition.suggests:
        reasons.append("the code only suggests it")
    if not condition.clinical_status:
        reasons.append("no clinical status")
    if not condition.verification_status:
        reasons.append("no verification status")
    elif condition.verification_status != "confirmed":
        reasons.append(f"verification {condition.verification_status}")
    window = inputs.condition_windows.get(name)
    if window is not None:
        when = condition.onset if condition.onset is not None else condition.recorded
        if when is None:
            reasons.append("undated")
        elif inputs.at - when > window:
            reasons.append(f"dated more than {window / HOUR / 24:g} days ago")
    return reasons


def _condition(inputs: ClinicalInputs, spec: dict[str, Any]) -> RuleResult:
    """A charted Condition decides only when its code means the value set, it is active and
    confirmed, and it is recent enough (the value set's `current_within`); otherwise it asks."""
    found: list[tuple[str, ConditionFact, list[str]]] = []
    for name in spec["value_sets"]:
        for condition in inputs.conditions.get(name, []):
            if condition.clinical_status in _ACTIVE and (
                condition.onset is None or condition.onset <= inputs.at
            ):
                found.append((name, condition, _asks(inputs, name, condition)))
    if found:
        found.sort(key=lambda item: bool(item[2]))  # the deciding ones first
        decides = not found[0][2]
        evidence = []
        for name, c, reasons in found[:3]:
            display = f" {c.display}" if c.display else ""
            why = f" — to confirm: {', '.join(reasons)}" if reasons else ""
            when = c.onset if c.onset is not None else c.recorded
            evidence.append(
                Evidence(
                    f"{_value_set_label(inputs, name)} charted ({_code_shown(c.code)}{display}){why}",
                    when,
                    (c.resource,),
                )
            )
        status = spec.get("if_present", MET) if decides else CONFIRM
        return RuleResult(
            status, tuple(evidence), (), _value_set_label(inputs, found[0][0]) if decides else ""
        )
    names = ", ".join(_value_set_label(inputs, n) for n in spec["value_sets"])
    if _unavailable(inputs, "conditions"):
        return RuleResult(
            UNKNOWN, (), (f"Conditions ({names}) — not available: prefetch null or not fetched",)
        )
    absent = spec.get("if_absent", CONFIRM)
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
