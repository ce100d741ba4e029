"""CDS Hooks cards rendered from the templates in ``cards/`` (Jinja2 text in YAML).

``cards/default.yaml`` holds the shared wording; ``cards/<NCT id>.yaml`` may override any key for
one trial. Templates receive the evaluation result; this module only shapes the JSON the spec asks
for: optional fields are omitted, never empty.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined, Template, TemplateError

from .datafiles import DataFileError, DataFileProblem, load_and_validate
from .evaluation import ELIGIBLE, POSSIBLY, UPCOMING, TrialResult
from .facts import format_time

SUMMARY_LIMIT = 140
CLINICALTRIALS_SYSTEM = "https://clinicaltrials.gov"

CARD_TEMPLATE_SCHEMA: dict[str, Any] = {
    "summary": {
        "type": "dict",
        "schema": {status: {"type": "string", "empty": False} for status in (ELIGIBLE, POSSIBLY, UPCOMING)},
    },
    "detail": {"type": "string", "empty": False},
    "source_label": {"type": "string", "empty": False},
    "registry_link_label": {"type": "string", "empty": False},
}


def _hours(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.0f} h" if hours >= 10 else f"{hours:.1f} h"


def _time(epoch: float | None) -> str:
    return format_time(epoch) if epoch is not None else "unknown"


@dataclass(frozen=True)
class CardTemplates:
    summary: dict[str, Template]
    detail: Template
    source_label: Template
    registry_link_label: Template


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
        self.env.filters["hours"] = _hours
        self.env.filters["time"] = _time
        folder = data_dir / "cards"
        _, self.default = load_and_validate(folder / "default.yaml", CARD_TEMPLATE_SCHEMA)
        for key in CARD_TEMPLATE_SCHEMA:
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
            merged = {**self.default, **self.overrides.get(trial_id, {})}
            merged["summary"] = {
                **self.default["summary"],
                **self.overrides.get(trial_id, {}).get("summary", {}),
            }
            path = folder / (f"{trial_id}.yaml" if trial_id else "default.yaml")
            try:
                self._compiled[trial_id] = CardTemplates(
                    summary={k: self.env.from_string(v) for k, v in merged["summary"].items()},
                    detail=self.env.from_string(merged["detail"]),
                    source_label=self.env.from_string(merged["source_label"]),
                    registry_link_label=self.env.from_string(merged["registry_link_label"]),
                )
            except TemplateError as exc:
                line = getattr(exc, "lineno", None)
                raise DataFileError(
                    [DataFileProblem(str(path), None, "template", f"line {line} of a template: {exc}")]
                ) from exc

    def templates_for(self, trial_id: str) -> CardTemplates:
        return self._compiled.get(trial_id, self._compiled[""])

    def context(self, result: TrialResult) -> dict[str, Any]:
        trial = result.trial
        decisive = [
            r
            for r in result.results
            if r.criterion.id in trial.summary_criteria and r.summary and r.status == "met"
        ]
        time_left = (result.window_closes_at - result.at) if result.window_closes_at is not None else None
        closing_soon = time_left is not None and time_left <= self.screening["closing_soon_minutes"] * 60
        return {
            "trial": trial,
            "result": result,
            "status": result.status,
            "decisive": [r.summary for r in decisive],
            "met": [r for r in result.results if r.criterion.kind == "inclusion" and r.status == "met"],
            "exclusions_clear": [
                r for r in result.results if r.criterion.kind == "exclusion" and r.status == "not_met"
            ],
            "unknown": result.unknown,
            "to_confirm": result.to_confirm,
            "onset": result.onset,
            "window_opens_at": result.window_opens_at,
            "window_closes_at": result.window_closes_at,
            "time_left": time_left,
            "time_to_open": (result.window_opens_at - result.at)
            if result.window_opens_at is not None
            else None,
            "closing_soon": closing_soon,
            "evaluated_at": result.at,
        }

    def render(self, result: TrialResult, card_uuid: str | None = None) -> dict[str, Any]:
        templates = self.templates_for(result.trial.id)
        context = self.context(result)
        summary = " ".join(templates.summary[result.status].render(context).split())
        if len(summary) >= SUMMARY_LIMIT:
            summary = summary[: SUMMARY_LIMIT - 2].rstrip() + "…"
        detail = templates.detail.render(context).strip()
        trial = result.trial
        indicator = "warning" if result.status == ELIGIBLE and context["closing_soon"] else "info"
        card: dict[str, Any] = {
            "uuid": card_uuid or str(uuid.uuid4()),
            "summary": summary,
            "indicator": indicator,
            "source": {
                "label": templates.source_label.render(context).strip(),
                "url": trial.registry_url,
                "topic": {"system": CLINICALTRIALS_SYSTEM, "code": trial.id, "display": trial.short_name},
            },
        }
        if detail:
            card["detail"] = detail
        links = [
            {
                "label": templates.registry_link_label.render(context).strip(),
                "url": trial.registry_url,
                "type": "absolute",
            }
        ]
        links.extend({"label": label, "url": url, "type": "absolute"} for label, url in trial.links)
        if self.screening.get("site_link_url"):
            # `smart` links launch the site's screening app; no appContext (Oracle Health drops it).
            links.append(
                {
                    "label": self.screening["site_link_label"],
                    "url": self.screening["site_link_url"],
                    "type": "smart",
                }
            )
        card["links"] = links
        return card


def now() -> float:
    return time.time()


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat().replace("+00:00", "Z")
