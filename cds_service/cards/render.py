"""CDS Hooks cards rendered from the templates in ``cards/`` (Jinja2 text in YAML).

``cards/default.yaml`` holds the shared wording; ``cards/<NCT id>.yaml`` may override any key for
one trial, and names the trial's criteria the way the card says them (``criteria:``). This module
shapes the evaluation result into what the templates show, and the JSON the spec asks for:

- a summary under 140 characters (decisive facts dropped from the end until it fits);
- a detail of at most :data:`DETAIL_LIMIT` characters: the template is rendered with fewer items
  (:func:`fit_steps`) until it fits, so a long chart can never make a long card;
- only characters of the allow-list (``text.py``), local times (``screening.timezone``), no
  resource ids;
- indicator ``info`` or ``warning`` (never ``critical``), the source with a ``topic`` Coding carrying
  the NCT id, links, the referral suggestion (``referral.py``), the override reasons, and the
  machine-readable result in ``extension.screening`` (``extension.py``).

Cards come in one order (:func:`card_order`). See docs/cards.md.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined, Template, TemplateError, meta, nodes, pass_context

from ..base.datafiles import DataFileError, DataFileProblem, load_and_validate
from ..base.facts import format_time
from ..clinical.derived import Evidence
from ..clinical.evaluation import ELIGIBLE, POSSIBLY, UPCOMING, CriterionResult, TrialResult
from ..knowledge.criteria_language import MET
from ..knowledge.trials import Trial
from .extension import EXTENSION_KEY, screening_extension
from .referral import CLINICALTRIALS_SYSTEM, ReferralRequest, referral_suggestion
from .text import LocalClock, clean, disallowed, duration

log = logging.getLogger(__name__)

SUMMARY_LIMIT = 140  # the spec: summary < 140 characters
DETAIL_LIMIT = 700  # a side panel read in five seconds
EVIDENCE_SHOWN = 3  # evidence items listed per met criterion (the `evidence` filter)
#: Registry statuses under which the trial no longer enrolls (the card says "enrollment closed").
ENROLLMENT_CLOSED = {"active, not recruiting", "completed", "terminated", "withdrawn", "suspended"}
#: The card order's first key: eligible, then possibly eligible, then upcoming.
STATUS_ORDER = {ELIGIBLE: 0, POSSIBLY: 1, UPCOMING: 2}

_TEXT = {"type": "string", "empty": False}
_LABEL = {"type": "string", "empty": False, "maxlength": 70}
CARD_TEMPLATE_SCHEMA: dict[str, Any] = {
    "summary": {
        "type": "dict",
        "schema": {status: _TEXT for status in (ELIGIBLE, POSSIBLY, UPCOMING)},
    },
    "detail": _TEXT,
    "note": {"type": "string"},
    "registry_phrase": {"type": "string"},
    "source_label": _TEXT,
    "registry_link_label": _TEXT,
    "referral_label": _TEXT,
    # How the card names a criterion: `needs` reads after "needs" (what to chart), `confirm` is the
    # bedside checklist item. Without one, the trial file's `confirm` / `text` is used.
    "criteria": {
        "type": "dict",
        "keysrules": {"type": "string", "regex": r"^[a-z][a-z0-9_]*$"},
        "valuesrules": {"type": "dict", "schema": {"needs": _LABEL, "confirm": _LABEL}},
    },
    "override_reasons": {
        "type": "list",
        "minlength": 1,
        "schema": {
            "type": "dict",
            "schema": {
                "code": {"type": "string", "regex": r"^[a-z][a-z0-9-]*$", "required": True},
                "display": {"type": "string", "empty": False, "required": True},
            },
        },
    },
}
#: Keys ``cards/default.yaml`` must define (a trial file may override any of them).
REQUIRED_IN_DEFAULT = (
    "summary",
    "detail",
    "registry_phrase",
    "source_label",
    "registry_link_label",
    "referral_label",
)
_TEXT_KEYS = ("detail", "note", "registry_phrase", "source_label", "registry_link_label", "referral_label")
#: The context entries fixed for a trial in one renderer (see :meth:`CardRenderer.context`), and the
#: filters that read the hook's clock. A short text that reads only the former, with none of the
#: latter (the shipped labels, note and registry phrase), is rendered once per trial: it is the
#: same on every card of that trial, and rendering costs a Jinja context each time.
_FIXED_FOR_A_TRIAL = frozenset({"trial", "recruiting", "enrollment_closed", "research_team", "worksheet"})
_CLOCK_FILTERS = frozenset({"at", "relative"})

#: How many items the detail names at first; :func:`fit_steps` lowers them step by step
#: (cumulatively) until the detail fits in :data:`DETAIL_LIMIT` characters.
FULL_DETAIL: dict[str, Any] = {
    "note": True,
    "facts": 3,
    "needs": 9,
    "charted": 2,
    "gaps": True,
    "checklist": 20,
}


def fit_steps(checklist: int) -> Iterable[dict[str, Any]]:
    """What to leave out first: the trial's note, a second charted value, then bedside checklist
    items one at a time (down to 5: the checklist stays in the card), the "not charted" gaps, the
    third need and fact, then the rest. Each step adds to the ones before it."""
    yield {"note": False}
    yield {"charted": 1}
    for count in range(min(checklist, FULL_DETAIL["checklist"]) - 1, 4, -1):
        yield {"checklist": count}
    yield {"gaps": False}
    yield {"needs": 2}
    yield {"facts": 2}
    yield {"checklist": 2}
    yield {"needs": 1, "charted": 0}
    yield {"facts": 1, "checklist": 0}


# -- template filters -----------------------------------------------------------------------------


def _time(epoch: float | None) -> str:
    return format_time(epoch) if epoch is not None else "unknown"


def _evidence(items: Iterable[Evidence], limit: int = EVIDENCE_SHOWN) -> str:
    """Evidence as one line: 'ANC 0.4 × 10⁹/L at 2024-05-01T10:00Z; …' (local times after clean())."""
    listed = list(dict.fromkeys(e.describe() for e in items))  # rules joined by all_of may repeat one
    text = "; ".join(listed[:limit])
    if len(listed) > limit:
        text += f"; and {len(listed) - limit} more"
    return text


@pass_context
def _at(context: Any, epoch: float | None) -> str:
    """'today 14:30' in screening.timezone (relative to the evaluation time)."""
    return context["clock"].at(epoch)


@pass_context
def _relative(context: Any, epoch: float | None) -> str:
    """'in 3 h 10 min', '2 h ago'."""
    return context["clock"].relative(epoch)


# -- what the templates show ----------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFact:
    """A met criterion's short result ("VIS > 120 for 7.5 h") and when it was seen.

    ``since`` is the start of a run (two or more charted values), ``at`` the time of a single value;
    ``due`` is when a criterion still running will be met (upcoming cards)."""

    text: str
    since: float | None = None
    at: float | None = None
    due: float | None = None


@dataclass(frozen=True)
class Need:
    """A criterion lacking data: its label, the values that are charted, and what is not."""

    id: str
    label: str
    kind: str
    charted: tuple[Evidence, ...]
    gaps: tuple[str, ...]


@dataclass(frozen=True)
class CheckItem:
    """A bedside checklist item, with what the chart shows about it (a code and its date)."""

    id: str
    label: str
    charted: tuple[Evidence, ...]


def _timed(evidence: Iterable[Evidence]) -> tuple[Evidence, ...]:
    """Evidence with a time: values charted in the record (not "sex male" or "none charted")."""
    timed: list[Evidence] = []
    for e in evidence:
        if e.time is not None and e not in timed:  # rules joined by all_of may repeat one
            timed.append(e)
    return tuple(timed)


def key_fact(result: CriterionResult) -> KeyFact:
    timed = _timed(result.evidence)
    if len(timed) >= 2:
        return KeyFact(result.summary, since=min(e.time for e in timed if e.time is not None))
    return KeyFact(result.summary, at=timed[0].time if timed else None)


def card_order(result: TrialResult) -> tuple[Any, ...]:
    """The one order of cards: eligible, possibly eligible, upcoming; within each, recruiting trials
    before the others; then the window that closes first (unknown last); then the NCT id."""
    closes = result.window_closes_at if result.window_closes_at is not None else math.inf
    return (STATUS_ORDER.get(result.status, 9), not result.trial.recruiting, closes, result.trial.id)


@dataclass(frozen=True)
class WorksheetLink:
    """The card's link to the screening worksheet (a SMART app): its launch URL and label."""

    url: str
    label: str


@dataclass(frozen=True)
class CardTemplates:
    summary: dict[str, Template]
    detail: Template
    note: Template
    registry_phrase: Template
    source_label: Template
    registry_link_label: Template
    referral_label: Template
    override_reasons: tuple[tuple[str, str], ...]
    criteria: dict[str, dict[str, str]]
    #: The short texts (keys of :data:`_TEXT_KEYS`) fixed for a trial: rendered once per trial.
    fixed_for_a_trial: frozenset[str] = frozenset()


def fit_summary(render: Callable[[list[str]], str], decisive: list[str]) -> str:
    """Render the summary with as many decisive facts as fit under the limit, dropping from the end.

    ``render(facts)`` returns the summary for a list of facts; a summary still too long without any
    fact is cut at a word boundary with an ellipsis.
    """
    for count in range(len(decisive), -1, -1):
        summary = " ".join(render(decisive[:count]).split())
        if len(summary) < SUMMARY_LIMIT:
            return summary
    cut = summary[: SUMMARY_LIMIT - 2]
    if " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:—-") + "…"


def fit_detail(render: Callable[[dict[str, Any]], str], checklist: int = 0) -> str:
    """Render the detail naming fewer items at each of :func:`fit_steps` until it fits the limit.

    A detail still too long (a site template that ignores ``limits``) is cut at its last paragraph
    break that fits, with an ellipsis."""
    limits = dict(FULL_DETAIL)
    detail = render(limits)
    for step in fit_steps(checklist):
        if len(detail) <= DETAIL_LIMIT:
            return detail
        limits.update(step)
        detail = render(limits)
    if len(detail) <= DETAIL_LIMIT:
        return detail
    cut = detail[: DETAIL_LIMIT - 2]
    cut = cut.rsplit("\n\n", 1)[0] if "\n\n" in cut else cut.rsplit(" ", 1)[0]
    return cut.rstrip() + "\n\n…"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _markdown_text(text: str) -> str:
    """Blank-line runs collapsed to one and trailing spaces dropped (templates leave some)."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out)


class CardRenderer:
    """Loads the card templates once; renders a card per trial result."""

    def __init__(
        self,
        data_dir: Path,
        screening: dict[str, Any],
        trials: Iterable[Trial] = (),
        *,
        worksheet_enabled: bool = False,
        worksheet_link: WorksheetLink | None = None,
    ):
        self.screening = screening
        self.zone = str(screening.get("timezone") or "UTC")
        # With the screening worksheet on, the bedside checklist lives in the SMART worksheet and the
        # card carries its count only (the templates read `worksheet`), and a link that opens it.
        self.worksheet_enabled = worksheet_enabled
        self.worksheet_link = worksheet_link
        self.env = Environment(
            undefined=StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
        )
        self.env.filters["hours"] = duration  # the older name, kept for site templates
        self.env.filters["duration"] = duration
        self.env.filters["time"] = _time
        self.env.filters["evidence"] = _evidence
        self.env.filters["at"] = _at
        self.env.filters["relative"] = _relative
        folder = data_dir / "cards"
        _, self.default = load_and_validate(folder / "default.yaml", CARD_TEMPLATE_SCHEMA)
        for key in (*REQUIRED_IN_DEFAULT, "override_reasons"):
            if key not in self.default:
                raise DataFileError(
                    [DataFileProblem(str(folder / "default.yaml"), None, key, "required in default")]
                )
        self.overrides: dict[str, dict[str, Any]] = {}
        for path in sorted(folder.glob("NCT*.yaml")):
            _, self.overrides[path.stem] = load_and_validate(path, CARD_TEMPLATE_SCHEMA)
        self._check_characters(folder)
        self._check_criteria(folder, list(trials))
        self._compiled: dict[str, CardTemplates] = {}
        self._compile_all(folder)
        self._trial_texts: dict[tuple[str, str], tuple[Trial, CardTemplates, str]] = {}

    # -- start-up checks ----------------------------------------------------------------------------
    def _check_characters(self, folder: Path) -> None:
        """Every wording is within the card character allow-list (no emoji): checked at start-up."""
        problems = []
        for name, document in [("default", self.default), *self.overrides.items()]:
            for key, text in _strings(document):
                bad = disallowed(text)
                if bad:
                    problems.append(
                        DataFileProblem(
                            str(folder / f"{name}.yaml"),
                            None,
                            key,
                            f"characters outside the card allow-list: {' '.join(bad)} "
                            f"({', '.join(f'U+{ord(c):04X}' for c in bad)})",
                        )
                    )
        if problems:
            raise DataFileError(problems)

    def _check_criteria(self, folder: Path, trials: list[Trial]) -> None:
        """A trial's card file names only criteria its trial file has (a typo would silently not apply)."""
        by_id = {t.id: t for t in trials}
        problems = []
        for trial_id, document in self.overrides.items():
            trial = by_id.get(trial_id)
            if trial is None:
                continue  # not screened here (screening.trials), or a card file for a trial to come
            ids = {c.id for c in trial.criteria}
            for criterion_id in document.get("criteria", {}):
                if criterion_id not in ids:
                    problems.append(
                        DataFileProblem(
                            str(folder / f"{trial_id}.yaml"),
                            None,
                            f"criteria.{criterion_id}",
                            f"no criterion {criterion_id!r} in the trial file {Path(trial.path).name}",
                        )
                    )
        if problems:
            raise DataFileError(problems)

    def _compile_all(self, folder: Path) -> None:
        for trial_id in ["", *self.overrides]:
            override = self.overrides.get(trial_id, {})
            merged = {**self.default, **override}
            merged["summary"] = {**self.default["summary"], **override.get("summary", {})}
            criteria = {k: dict(v) for k, v in self.default.get("criteria", {}).items()}
            for key, labels in override.get("criteria", {}).items():
                criteria[key] = {**criteria.get(key, {}), **labels}
            path = folder / (f"{trial_id}.yaml" if trial_id else "default.yaml")
            try:
                texts = {key: self.env.from_string(merged.get(key, "")) for key in _TEXT_KEYS}
                self._compiled[trial_id] = CardTemplates(
                    summary={k: self.env.from_string(v) for k, v in merged["summary"].items()},
                    override_reasons=tuple((r["code"], r["display"]) for r in merged["override_reasons"]),
                    criteria=criteria,
                    fixed_for_a_trial=frozenset(
                        key
                        for key in _TEXT_KEYS
                        if key != "detail" and self._fixed_for_a_trial(merged.get(key, ""))
                    ),
                    **texts,
                )
            except TemplateError as exc:
                line = getattr(exc, "lineno", None)
                raise DataFileError(
                    [DataFileProblem(str(path), None, "template", f"line {line} of a template: {exc}")]
                ) from exc

    def _fixed_for_a_trial(self, source: str) -> bool:
        """The template reads only context entries fixed for a trial, through no clock filter."""
        tree = self.env.parse(source)
        filters = {node.name for node in tree.find_all(nodes.Filter)}
        return meta.find_undeclared_variables(tree) <= _FIXED_FOR_A_TRIAL and not filters & _CLOCK_FILTERS

    def templates_for(self, trial_id: str) -> CardTemplates:
        return self._compiled.get(trial_id, self._compiled[""])

    # -- which cards, in which order ------------------------------------------------------------------
    def shows(self, result: TrialResult) -> bool:
        """A card for this result: its status gives one, and the site shows this trial's cards."""
        if not result.shows_card:
            return False
        return result.trial.recruiting or bool(self.screening.get("show_not_recruiting", True))

    def shown(self, results: Iterable[TrialResult]) -> list[TrialResult]:
        """The results that give a card, in the card order (:func:`card_order`)."""
        return sorted((r for r in results if self.shows(r)), key=card_order)

    def closing_soon(self, result: TrialResult) -> bool:
        """True when the enrollment window closes within ``closing_soon_minutes``."""
        if result.window_closes_at is None:
            return False
        return result.window_closes_at - result.at <= float(self.screening["closing_soon_minutes"]) * 60

    # -- the templates' context -------------------------------------------------------------------------
    def context(self, result: TrialResult, templates: CardTemplates | None = None) -> dict[str, Any]:
        """Everything a template may use (documented in cards/default.yaml and docs/cards.md)."""
        templates = templates or self.templates_for(result.trial.id)
        trial = result.trial
        by_id = {r.criterion.id: r for r in result.results}
        decisive = [
            by_id[cid].summary
            for cid in trial.summary_criteria
            if cid in by_id and by_id[cid].status == MET and by_id[cid].summary
        ]
        anchor_rule = {"established": {"input": trial.window_anchor}}
        facts = [
            key_fact(by_id[cid])
            for cid in trial.summary_criteria
            if cid in by_id
            and by_id[cid].status == MET
            and by_id[cid].summary
            and by_id[cid].criterion.rule != anchor_rule  # the window line shows the onset
        ]
        pending = [KeyFact(r.summary, due=r.due) for r in result.pending if r.summary]
        labels = templates.criteria

        def label(r: CriterionResult, kind: str) -> str:
            chosen = labels.get(r.criterion.id, {}).get(kind)
            if chosen:
                return chosen
            return (r.criterion.confirm if kind == "confirm" else None) or r.criterion.text

        unknown = result.unknown
        needs = [
            Need(r.criterion.id, label(r, "needs"), r.criterion.kind, _timed(r.evidence), r.gaps)
            for r in sorted(unknown, key=lambda r: r.criterion.kind != "inclusion")
        ]
        checklist = [
            CheckItem(r.criterion.id, label(r, "confirm"), _timed(r.evidence)) for r in result.to_confirm
        ]
        time_left = (result.window_closes_at - result.at) if result.window_closes_at is not None else None
        time_to_open = (result.window_opens_at - result.at) if result.window_opens_at is not None else None
        clock = LocalClock(self.zone, result.at)
        return {
            "trial": trial,
            "result": result,
            "status": result.status,
            "decisive": decisive,
            "facts": facts,
            "pending_facts": pending,
            "needs": needs,
            "checklist": checklist,
            "met": result.met_inclusions,
            "exclusions_clear": [
                r for r in result.results if r.criterion.kind == "exclusion" and r.status == "not_met"
            ],
            "unknown": unknown,
            "unknown_inclusions": [r for r in unknown if r.criterion.kind == "inclusion"],
            "unknown_exclusions": [r for r in unknown if r.criterion.kind == "exclusion"],
            "to_confirm": result.to_confirm,
            "pending": result.pending,
            "onset": result.onset,
            "anchor": result.anchor or result.onset,
            "anchor_label": result.anchor_name.replace("_", " "),
            # The window is timed from another time than the onset (I-MICRO: norepinephrine start)
            # and the two differ: the card shows both.
            "anchor_differs": result.anchor is not None
            and result.anchor.value is not None
            and (
                result.onset.value is None
                or abs(float(result.anchor.value) - float(result.onset.value)) >= 60
            ),
            "window_opens_at": result.window_opens_at,
            "window_closes_at": result.window_closes_at,
            "time_left": time_left,
            "time_to_open": time_to_open,
            "closing_soon": self.closing_soon(result),
            "evaluated_at": result.at,
            "clock": clock,
            "zone": clock.zone_label,
            "research_team": self.screening["research_team_display"],
            "recruiting": trial.recruiting,
            "enrollment_closed": trial.registry_status in ENROLLMENT_CLOSED,
            "worksheet": self.worksheet_enabled,
            "limits": dict(FULL_DETAIL),
            "detail_limit": DETAIL_LIMIT,
        }

    def referral_request(
        self, result: TrialResult, card_uuid: str, patient_id: str, user_id: str | None
    ) -> ReferralRequest:
        def confirm_text(r: CriterionResult) -> str:
            return r.criterion.confirm or r.criterion.text

        return ReferralRequest(
            card_uuid=card_uuid,
            patient_id=patient_id,
            trial=result.trial,
            status=result.status,
            screened_at=result.at,
            window_opens_at=result.window_opens_at,
            window_closes_at=result.window_closes_at,
            closing_soon=self.closing_soon(result),
            user_id=user_id,
            to_confirm=tuple(confirm_text(r) for r in result.to_confirm),
            needs_data=tuple(m for r in result.unknown for m in (r.missing or (r.criterion.text,))),
        )

    def texts(self, templates: CardTemplates, context: dict[str, Any]) -> dict[str, str]:
        """Every text of the card rendered from ``templates`` (raises jinja2's TemplateError)."""
        context = {**context}
        context["note"] = self._text(templates, "note", context, str.strip)
        context["registry_phrase"] = self._text(templates, "registry_phrase", context, _one_line)
        clock = context["clock"]
        summary_template = templates.summary[context["status"]]

        def summary(facts: list[str]) -> str:
            return clean(summary_template.render({**context, "decisive": facts}), clock)

        def detail(limits: dict[str, Any]) -> str:
            return clean(_markdown_text(templates.detail.render({**context, "limits": limits})), clock)

        return {
            "summary": fit_summary(summary, context["decisive"]),
            "detail": fit_detail(detail, len(context["checklist"])),
            "source_label": self._text(templates, "source_label", context, lambda t: clean(t.strip())),
            "registry_link_label": self._text(
                templates, "registry_link_label", context, lambda t: clean(t.strip())
            ),
            "referral_label": self._text(templates, "referral_label", context, lambda t: clean(_one_line(t))),
        }

    def _text(
        self, templates: CardTemplates, key: str, context: dict[str, Any], finish: Callable[[str], str]
    ) -> str:
        """``finish`` of the text ``key`` rendered, once per trial when it is fixed for a trial."""
        template: Template = getattr(templates, key)
        if key not in templates.fixed_for_a_trial:
            return finish(template.render(context))
        trial = context["trial"]
        cached = self._trial_texts.get((trial.id, key))
        # Held with the trial and the templates it was rendered from: a reloaded trial file, or the
        # default wording taking over from a failing site template, renders it again.
        if cached is not None and cached[0] is trial and cached[1] is templates:
            return cached[2]
        text = finish(template.render(context))
        self._trial_texts[trial.id, key] = (trial, templates, text)
        return text

    def render(
        self,
        result: TrialResult,
        card_uuid: str | None = None,
        *,
        patient_id: str | None = None,
        user_id: str | None = None,
    ) -> dict[str, Any]:
        """The card for one trial result. Without ``patient_id`` the card has no referral suggestion.

        A trial template that fails at render time (a misspelt variable in a site's file) is logged
        and the default wording is used instead: one bad file must not take every card down.
        """
        templates = self.templates_for(result.trial.id)
        try:
            texts = self.texts(templates, self.context(result, templates))
        except TemplateError:
            if templates is self._compiled[""]:
                raise
            log.exception("card template for %s failed: default wording used", result.trial.id)
            templates = self._compiled[""]
            texts = self.texts(templates, self.context(result, templates))
        card_uuid = card_uuid or str(uuid.uuid4())
        trial = result.trial
        closing = self.closing_soon(result)
        card: dict[str, Any] = {
            "uuid": card_uuid,
            "summary": texts["summary"],
            # A closing window is worth a warning only where the trial still enrolls.
            "indicator": "warning" if result.status == ELIGIBLE and closing and trial.recruiting else "info",
            "source": {
                "label": texts["source_label"],
                "url": trial.registry_url,
                "topic": {"system": CLINICALTRIALS_SYSTEM, "code": trial.id, "display": trial.short_name},
            },
        }
        if texts["detail"]:
            card["detail"] = texts["detail"]
        if patient_id:
            request = self.referral_request(result, card_uuid, patient_id, user_id)
            card["suggestions"] = [referral_suggestion(request, self.screening, texts["referral_label"])]
            card["selectionBehavior"] = "at-most-one"
        card["overrideReasons"] = [
            {"system": self.screening["override_reason_system"], "code": code, "display": display}
            for code, display in templates.override_reasons
        ]
        card["links"] = self.links(result, texts["registry_link_label"])
        card["extension"] = {EXTENSION_KEY: screening_extension(result)}
        return card

    def links(self, result: TrialResult, registry_label: str) -> list[dict[str, Any]]:
        """The registry page and the trial's own links (absolute), then the site's protocol or app."""
        trial = result.trial
        links: list[dict[str, Any]] = [
            {
                "label": registry_label,
                "url": trial.registry_url,
                "type": "absolute",
            }
        ]
        links.extend({"label": clean(label), "url": url, "type": "absolute"} for label, url in trial.links)
        if self.worksheet_link is not None:
            # A SMART launch of the screening worksheet. `appContext` names the trial so that the
            # worksheet opens on it; clients that drop appContext (Oracle Health) open its overview.
            links.append(
                {
                    "label": clean(self.worksheet_link.label),
                    "url": self.worksheet_link.url,
                    "type": "smart",
                    "appContext": json.dumps({"trial": trial.id}, separators=(",", ":")),
                }
            )
        site_url = self.screening.get("site_link_url")
        if site_url:
            # A SMART launch URL: the EHR adds `iss` and `launch`; no appContext (Oracle Health drops
            # it), so the trial travels in the URL when the site asks for it with {trial_id}.
            links.append(
                {
                    "label": clean(self.screening["site_link_label"]),
                    "url": site_url.replace("{trial_id}", trial.id),
                    "type": self.screening.get("site_link_type", "smart"),
                }
            )
        return links


def _strings(node: Any, path: str = "") -> Iterable[tuple[str, str]]:
    """Every string in a loaded YAML document with its dotted key."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, f"{path}[{index}]")
