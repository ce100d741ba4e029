"""Trial definitions: one YAML file per trial under ``trials/``, validated at start-up.

A file carries the registry facts (id, title, sponsor, status, links), the enrollment window
relative to an anchor time (septic-shock onset), and every inclusion and exclusion criterion, each
quoting the source sentence it encodes. A site adds a trial by adding a file: no code changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cerberus import Validator

from ..base.datafiles import DataFileError, DataFileProblem, LoadedFile, load_yaml, validate
from .criteria_language import (
    COMBINATORS,
    CONFIRM,
    RULE_SCHEMAS,
    absence_rules,
    parse_duration,
    rule_can_confirm,
    rule_inputs,
)
from .mappings import Knowledge, content_hash

#: Inputs computed in derived.py (besides every observation input of the mappings).
DERIVED_INPUTS = {"age_years", "sex", "body_weight", "vis", "septic_shock_onset", "norepinephrine_start"}
#: What each derived input needs fetched: observation inputs, and whether administrations/conditions.
DERIVED_NEEDS: dict[str, set[str]] = {
    "vis": {"body_weight"},
    "septic_shock_onset": {"lactate"},
    "norepinephrine_start": {"lactate"},
}

_CRITERION = {
    "type": "dict",
    "schema": {
        "id": {"type": "string", "regex": r"^[a-z][a-z0-9_]*$", "required": True},
        "text": {"type": "string", "required": True, "maxlength": 160},
        "source": {"type": "string", "required": True, "empty": False},
        "rule": {"type": "dict"},
        # With no rule: what the clinician confirms. With a rule that may answer "confirm"
        # (a condition with if_absent/if_present: confirm): the checklist wording for that case.
        "confirm": {"type": "string", "empty": False},
        "measure": {"type": "string"},
        # An exclusion that is the enrollment clock: once met, the window has closed (no card), and
        # while its clock runs (`due`) it gives the window's closing time.
        "closes_window": {"type": "boolean"},
        "note": {"type": "string"},
    },
}

TRIAL_SCHEMA: dict[str, Any] = {
    "id": {"type": "string", "regex": r"^NCT\d{8}$", "required": True},
    "short_name": {"type": "string", "required": True, "maxlength": 30},
    "title": {"type": "string", "required": True},
    "sponsor": {"type": "string", "required": True},
    "registry": {
        "type": "dict",
        "required": True,
        "schema": {
            "status": {
                "type": "string",
                "required": True,
                "allowed": [
                    "recruiting",
                    "not yet recruiting",
                    "active, not recruiting",
                    "completed",
                    "terminated",
                    "withdrawn",
                    "suspended",
                    "unknown",
                ],
            },
            "checked": {"type": "string", "required": True},
            "url": {"type": "string", "regex": r"^https://.+", "required": True},
            "note": {"type": "string"},
        },
    },
    "links": {
        "type": "list",
        "schema": {
            "type": "dict",
            "schema": {
                "label": {"type": "string", "required": True},
                "url": {"type": "string", "regex": r"^https://.+", "required": True},
            },
        },
    },
    "sources": {"type": "list", "schema": {"type": "string"}, "required": True},
    "enrollment_window": {
        "type": "dict",
        "required": True,
        "schema": {
            "anchor": {"type": "string", "required": True},
            "opens_after": {"type": ["string", "number"], "required": True},
            "closes_after": {"type": ["string", "number"], "required": True},
            "source": {"type": "string", "required": True},
        },
    },
    "summary_criteria": {"type": "list", "schema": {"type": "string"}},
    "inclusion": {"type": "list", "schema": _CRITERION, "required": True, "minlength": 1},
    "exclusion": {"type": "list", "schema": _CRITERION, "required": True},
}


@dataclass(frozen=True)
class Criterion:
    id: str
    text: str
    source: str
    kind: str  # inclusion | exclusion
    rule: dict[str, Any] | None
    confirm: str | None
    measure: str | None
    closes_window: bool = False
    note: str = ""

    @property
    def computable(self) -> bool:
        return self.rule is not None

    @property
    def decided_by(self) -> str:
        """``data`` (computed), ``clinician`` (a confirm item) or ``data, else clinician``."""
        if self.rule is None:
            return "clinician"
        return "data, else clinician" if rule_can_confirm(self.rule) else "data"


@dataclass(frozen=True)
class Trial:
    id: str
    short_name: str
    title: str
    sponsor: str
    registry_status: str
    registry_checked: str
    registry_url: str
    registry_note: str
    links: tuple[tuple[str, str], ...]
    window_anchor: str
    window_opens: float  # seconds after the anchor
    window_closes: float
    window_source: str
    summary_criteria: tuple[str, ...]
    inclusion: tuple[Criterion, ...]
    exclusion: tuple[Criterion, ...]
    path: str
    version: str = ""  # content hash of the trial file (recorded on each screening-log row)

    @property
    def criteria(self) -> tuple[Criterion, ...]:
        return self.inclusion + self.exclusion

    @property
    def recruiting(self) -> bool:
        """Only ``recruiting`` counts: ``unknown``, ``not yet recruiting``, ``completed`` … do not."""
        return self.registry_status == "recruiting"

    def inputs(self) -> set[str]:
        """Every input the trial's rules use, with what derived inputs need."""
        names: set[str] = {self.window_anchor}
        for criterion in self.criteria:
            if criterion.rule is not None:
                names |= rule_inputs(criterion.rule)
        for name in list(names):
            names |= DERIVED_NEEDS.get(name, set())
        return names


def _check_rule(
    rule: Any,
    path: tuple[Any, ...],
    loaded: LoadedFile,
    knowledge: Knowledge,
    problems: list[DataFileProblem],
) -> None:
    if not isinstance(rule, dict) or len(rule) != 1:
        problems.append(
            loaded.problem(
                path,
                f"a rule is a mapping with exactly one of: {', '.join(RULE_SCHEMAS)}, "
                f"{', '.join(COMBINATORS)}",
            )
        )
        return
    ((kind, spec),) = rule.items()
    if kind in ("all_of", "any_of"):
        if not isinstance(spec, list) or not spec:
            problems.append(loaded.problem((*path, kind), "must be a non-empty list of rules"))
            return
        for index, inner in enumerate(spec):
            _check_rule(inner, (*path, kind, index), loaded, knowledge, problems)
        return
    if kind == "not":
        _check_rule(spec, (*path, kind), loaded, knowledge, problems)
        return
    if kind not in RULE_SCHEMAS:
        problems.append(
            loaded.problem(
                (*path, kind),
                f"unknown rule kind (use one of {', '.join(RULE_SCHEMAS)}, {', '.join(COMBINATORS)})",
            )
        )
        return
    validator = Validator(RULE_SCHEMAS[kind])
    if not isinstance(spec, dict) or not validator.validate(spec):
        errors = validator.errors if isinstance(spec, dict) else {"": ["must be a mapping"]}
        for key, messages in errors.items():
            problems.append(loaded.problem((*path, kind, key), "; ".join(str(m) for m in messages)))
        return
    name = spec.get("input")
    if name is not None and name not in knowledge.inputs and name not in DERIVED_INPUTS:
        problems.append(
            loaded.problem((*path, kind, "input"), f"unknown input {name!r} (not in mappings/ nor derived)")
        )
    elif (
        name in knowledge.inputs and "unit" in spec and spec["unit"] != knowledge.inputs[name].canonical_unit
    ):
        problems.append(
            loaded.problem(
                (*path, kind, "unit"),
                f"{name} is compared in its canonical unit "
                f"{knowledge.inputs[name].canonical_unit!r}, not {spec['unit']!r}",
            )
        )
    where = (*path, kind)
    if kind == "value" and name in knowledge.inputs and spec.get("within") is None:
        problems.append(
            loaded.problem(
                where,
                f"a value of {name} decides only while recent enough: give `within` (and `within_source`)",
            )
        )
    if kind in ("value", "persistent") and spec.get("within") is not None and not spec.get("within_source"):
        problems.append(
            loaded.problem((*where, "within_source"), "say why this window (the source of the choice)")
        )
    if (kind, spec) in absence_rules({kind: spec}) and not spec.get("absent_reason"):
        problems.append(
            loaded.problem(
                (*where, "absent_reason"),
                'missing data counts as "not met" here: give the one-line clinical reason',
            )
        )
    if kind == "persistent" and spec.get("current") is False and not spec.get("current_reason"):
        problems.append(
            loaded.problem((*where, "current_reason"), "an earlier run counts here: say why (current: false)")
        )
    for value_set in spec.get("value_sets", ()):
        if value_set not in knowledge.value_sets:
            problems.append(loaded.problem((*path, kind, "value_sets"), f"unknown value set {value_set!r}"))


def load_trial(path: Path, knowledge: Knowledge) -> Trial:
    loaded = load_yaml(path)
    document = validate(loaded, TRIAL_SCHEMA)
    problems: list[DataFileProblem] = []
    seen: set[str] = set()
    criteria: dict[str, list[Criterion]] = {"inclusion": [], "exclusion": []}
    for kind in ("inclusion", "exclusion"):
        for index, raw in enumerate(document[kind]):
            where = (kind, index)
            if raw["id"] in seen:
                problems.append(loaded.problem((*where, "id"), f"duplicate criterion id {raw['id']!r}"))
            seen.add(raw["id"])
            if "rule" not in raw and "confirm" not in raw:
                problems.append(
                    loaded.problem(
                        where, "give a `rule` (computable) or a `confirm` text (for the clinician)"
                    )
                )
                continue
            if "rule" in raw:
                _check_rule(raw["rule"], (*where, "rule"), loaded, knowledge, problems)
            if raw.get("closes_window") and (kind != "exclusion" or "rule" not in raw):
                problems.append(
                    loaded.problem(
                        (*where, "closes_window"), "only a computed exclusion can close the window"
                    )
                )
            criteria[kind].append(
                Criterion(
                    raw["id"],
                    raw["text"],
                    raw["source"],
                    kind,
                    raw.get("rule"),
                    raw.get("confirm"),
                    raw.get("measure"),
                    bool(raw.get("closes_window", False)),
                    raw.get("note", ""),
                )
            )
    window = document["enrollment_window"]
    if window["anchor"] not in DERIVED_INPUTS:
        problems.append(
            loaded.problem(
                ("enrollment_window", "anchor"), "must be a derived time input (septic_shock_onset)"
            )
        )
    try:
        opens, closes = parse_duration(window["opens_after"]), parse_duration(window["closes_after"])
        if closes <= opens:
            problems.append(loaded.problem(("enrollment_window",), "closes_after must be after opens_after"))
    except ValueError as exc:
        problems.append(loaded.problem(("enrollment_window",), str(exc)))
        opens = closes = 0.0
    for index, criterion_id in enumerate(document.get("summary_criteria", [])):
        if criterion_id not in seen:
            problems.append(loaded.problem(("summary_criteria", index), f"no criterion {criterion_id!r}"))
    if problems:
        raise DataFileError(problems)
    registry = document["registry"]
    return Trial(
        id=document["id"],
        short_name=document["short_name"],
        title=document["title"],
        sponsor=document["sponsor"],
        registry_status=registry["status"],
        registry_checked=registry["checked"],
        registry_url=registry["url"],
        registry_note=registry.get("note", ""),
        links=tuple((link["label"], link["url"]) for link in document.get("links", [])),
        window_anchor=window["anchor"],
        window_opens=opens,
        window_closes=closes,
        window_source=window["source"],
        summary_criteria=tuple(document.get("summary_criteria", [])),
        inclusion=tuple(criteria["inclusion"]),
        exclusion=tuple(criteria["exclusion"]),
        path=str(path),
        version=content_hash([path]),
    )


def load_trials(data_dir: Path, knowledge: Knowledge, selected: list[str] | None = None) -> list[Trial]:
    """Load every ``trials/*.yaml``; keep those selected by the site (all when none are named)."""
    problems: list[DataFileProblem] = []
    trials: list[Trial] = []
    for path in sorted((data_dir / "trials").glob("*.yaml")):
        try:
            trials.append(load_trial(path, knowledge))
        except DataFileError as exc:
            problems.extend(exc.problems)
    ids = [t.id for t in trials]
    for trial_id in {i for i in ids if ids.count(i) > 1}:
        problems.append(DataFileProblem(str(data_dir / "trials"), None, "id", f"{trial_id} defined twice"))
    for trial_id in selected or []:
        if trial_id not in ids:
            problems.append(
                DataFileProblem(
                    "configuration",
                    None,
                    "screening.trials",
                    f"{trial_id}: no such trial file in {data_dir / 'trials'}",
                )
            )
    if problems:
        raise DataFileError(problems)
    if selected:
        trials = [t for t in trials if t.id in selected]
    return trials


__all__ = ["CONFIRM", "Criterion", "Trial", "load_trial", "load_trials"]
