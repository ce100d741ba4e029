"""CDS Hooks cards rendered from the templates in ``cards/`` (Jinja2 text in YAML).

``cards/default.yaml`` holds the shared wording; ``cards/<NCT id>.yaml`` may override any key for
one trial. Templates receive the evaluation result (see :meth:`CardRenderer.context`); this module
only shapes the JSON the spec asks for — summary under 140 characters, indicator ``info`` or
``warning`` (never ``critical``), source with a ``topic`` Coding carrying the NCT id, links, the
referral suggestion (``referral.py``) and the override reasons — and omits empty optional fields.
See docs/cards.md.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined, Template, TemplateError

from ..base.datafiles import DataFileError, DataFileProblem, load_and_validate
from ..base.facts import format_time
from ..clinical.derived import Evidence
from ..clinical.evaluation import ELIGIBLE, POSSIBLY, UPCOMING, CriterionResult, TrialResult
from ..knowledge.criteria_language import MET
from .referral import CLINICALTRIALS_SYSTEM, ReferralRequest, referral_suggestion

log = logging.getLogger(__name__)

SUMMARY_LIMIT = 140  # the spec: summary < 140 characters
EVIDENCE_SHOWN = 3  # evidence items listed per met criterion
#: Registry statuses under which the trial no longer enrolls (the card says so).
ENROLLMENT_CLOSED = {"active, not recruiting", "completed", "terminated", "withdrawn", "suspended"}

_TEXT = {"type": "string", "empty": False}
CARD_TEMPLATE_SCHEMA: dict[str, Any] = {
    "summary": {
        "type": "dict",
        "schema": {status: _TEXT for status in (ELIGIBLE, POSSIBLY, UPCOMING)},
    },
    "detail": _TEXT,
    "note": {"type": "string"},
    "source_label": _TEXT,
    "registry_link_label": _TEXT,
    "referral_label": _TEXT,
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
REQUIRED_IN_DEFAULT = ("summary", "detail", "source_label", "registry_link_label", "referral_label")
_TEXT_KEYS = ("detail", "note", "source_label", "registry_link_label", "referral_label")


# -- template filters -----------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """A time span as a clinician reads it: '35 min', '1 h 30 min', '12 h'."""
    if seconds is None:
        return "unknown"
    minutes = max(0, round(seconds / 60))
    if minutes < 60:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    if hours >= 10 or rest == 0:
        return f"{round(minutes / 60)} h"
    return f"{hours} h {rest} min"


def _time(epoch: float | None) -> str:
    return format_time(epoch) if epoch is not None else "unknown"


def _evidence(items: Iterable[Evidence], limit: int = EVIDENCE_SHOWN) -> str:
    """Evidence as one Markdown-safe line: 'ANC 0.4 × 10⁹/L at 2024-05-01T10:00Z; …'."""
    listed = list(dict.fromkeys(e.describe() for e in items))  # rules joined by all_of may repeat one
    text = "; ".join(listed[:limit])
    if len(listed) > limit:
        text += f"; and {len(listed) - limit} more"
    return text


# -- rendering ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CardTemplates:
    summary: dict[str, Template]
    detail: Template
    note: Template
    source_label: Template
    registry_link_label: Template
    referral_label: Template
    override_reasons: tuple[tuple[str, str], ...]


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


class CardRenderer:
    """Loads the card templates once; renders a card per trial result."""

    def __init__(self, data_dir: Path, screening: dict[str, Any]):
        self.screening = screening
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
        self._compiled: dict[str, CardTemplates] = {}
        self._compile_all(folder)

    def _compile_all(self, folder: Path) -> None:
        for trial_id in ["", *self.overrides]:
            override = self.overrides.get(trial_id, {})
            merged = {**self.default, **override}
            merged["summary"] = {**self.default["summary"], **override.get("summary", {})}
            path = folder / (f"{trial_id}.yaml" if trial_id else "default.yaml")
            try:
                texts = {key: self.env.from_string(merged.get(key, "")) for key in _TEXT_KEYS}
                self._compiled[trial_id] = CardTemplates(
                    summary={k: self.env.from_string(v) for k, v in merged["summary"].items()},
                    override_reasons=tuple((r["code"], r["display"]) for r in merged["override_reasons"]),
                    **texts,
                )
            except TemplateError as exc:
                line = getattr(exc, "lineno", None)
                raise DataFileError(
                    [DataFileProblem(str(path), None, "template", f"line {line} of a template: {exc}")]
                ) from exc

    def templates_for(self, trial_id: str) -> CardTemplates:
        return self._compiled.get(trial_id, self._compiled[""])

    def closing_soon(self, result: TrialResult) -> bool:
        """True when the enrollment window closes within ``closing_soon_minutes``."""
        if result.window_closes_at is None:
            return False
        return result.window_closes_at - result.at <= float(self.screening["closing_soon_minutes"]) * 60

    def context(self, result: TrialResult) -> dict[str, Any]:
        """Everything a template may use (documented in cards/default.yaml and docs/cards.md)."""
        trial = result.trial
        by_id = {r.criterion.id: r for r in result.results}
        decisive = [
            by_id[cid].summary
            for cid in trial.summary_criteria
            if cid in by_id and by_id[cid].status == MET and by_id[cid].summary
        ]
        time_left = (result.window_closes_at - result.at) if result.window_closes_at is not None else None
        time_to_open = (result.window_opens_at - result.at) if result.window_opens_at is not None else None
        unknown = result.unknown
        return {
            "trial": trial,
            "result": result,
            "status": result.status,
            "decisive": decisive,
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
            "window_opens_at": result.window_opens_at,
            "window_closes_at": result.window_closes_at,
            "time_left": time_left,
            "time_to_open": time_to_open,
            "closing_soon": self.closing_soon(result),
            "evaluated_at": result.at,
            "research_team": self.screening["research_team_display"],
            "recruiting": trial.registry_status == "recruiting",
            "enrollment_closed": trial.registry_status in ENROLLMENT_CLOSED,
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
        context = {**context, "note": templates.note.render(context).strip()}
        summary_template = templates.summary[context["status"]]
        return {
            "summary": fit_summary(
                lambda facts: summary_template.render({**context, "decisive": facts}), context["decisive"]
            ),
            "detail": templates.detail.render(context).strip(),
            "source_label": templates.source_label.render(context).strip(),
            "registry_link_label": templates.registry_link_label.render(context).strip(),
            "referral_label": " ".join(templates.referral_label.render(context).split()),
        }

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
        context = self.context(result)
        try:
            texts = self.texts(templates, context)
        except TemplateError:
            if templates is self._compiled[""]:
                raise
            log.exception("card template for %s failed: default wording used", result.trial.id)
            templates = self._compiled[""]
            texts = self.texts(templates, context)
        card_uuid = card_uuid or str(uuid.uuid4())
        trial = result.trial
        card: dict[str, Any] = {
            "uuid": card_uuid,
            "summary": texts["summary"],
            "indicator": "warning" if result.status == ELIGIBLE and context["closing_soon"] else "info",
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
        links.extend({"label": label, "url": url, "type": "absolute"} for label, url in trial.links)
        site_url = self.screening.get("site_link_url")
        if site_url:
            # A SMART launch URL: the EHR adds `iss` and `launch`; no appContext (Oracle Health drops
            # it), so the trial travels in the URL when the site asks for it with {trial_id}.
            links.append(
                {
                    "label": self.screening["site_link_label"],
                    "url": site_url.replace("{trial_id}", trial.id),
                    "type": self.screening.get("site_link_type", "smart"),
                }
            )
        return links
