"""The machine-readable screening result every card carries: ``card.extension.screening``.

A contract with hospital integration teams, the integration harness and the scenario files
(README, "The screening extension"): the key names below never change meaning.

.. code-block:: json

    {"trial": "NCT05184296",
     "status": "eligible" | "possibly_eligible" | "upcoming",
     "window": {"opens": "<instant or null>", "closes": "<instant or null>"},
     "criteria": [{"id": "...", "kind": "inclusion" | "exclusion",
                   "result": "met" | "not_met" | "unknown" | "to_confirm",
                   "evidence": [{"text": "...", "time": "<instant or null>",
                                 "resource": "Type/id or null"}]}]}

- Every criterion of the trial file is listed, in the file's order (inclusions, then exclusions).
- For an exclusion, ``met`` means the exclusion applies (the patient would be ruled out).
- Instants are FHIR instants in UTC (``2026-11-21T04:00:00Z``), whatever ``screening.timezone``
  says: the extension is for machines; the card's text is for people.
- An evidence item that several resources support is listed once per resource.
"""

from __future__ import annotations

import re
from typing import Any

from ..clinical.derived import Evidence
from ..clinical.evaluation import CARD_STATUSES, CriterionResult, TrialResult
from ..knowledge.criteria_language import CONFIRM, MET, NOT_MET, UNKNOWN
from .referral import fhir_instant

EXTENSION_KEY = "screening"
#: Result names in the extension (the evaluation says ``confirm``; the contract says ``to_confirm``).
RESULTS = {MET: "met", NOT_MET: "not_met", UNKNOWN: "unknown", CONFIRM: "to_confirm"}
STATUSES = CARD_STATUSES
KINDS = ("inclusion", "exclusion")
#: A FHIR literal reference ``Type/id``: evidence from a resource whose id is not a FHIR id (a chart
#: can send ``"id": []`` or none) names no resource rather than break the contract.
_REFERENCE = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")


def _instant(epoch: float | None) -> str | None:
    return fhir_instant(epoch) if epoch is not None else None


def evidence_items(evidence: tuple[Evidence, ...]) -> list[dict[str, Any]]:
    """Evidence as the extension lists it: text, time and one resource per item."""
    items: list[dict[str, Any]] = []
    for e in evidence:
        for resource in e.resources or (None,):
            if resource is not None and not _REFERENCE.match(resource):
                resource = None
            items.append({"text": e.text, "time": _instant(e.time), "resource": resource})
    return items


def criterion_entry(result: CriterionResult) -> dict[str, Any]:
    return {
        "id": result.criterion.id,
        "kind": result.criterion.kind,
        "result": RESULTS[result.status],
        "evidence": evidence_items(result.evidence),
    }


def screening_extension(result: TrialResult) -> dict[str, Any]:
    """``extension.screening`` for a card (the trial result must be one that shows a card)."""
    if result.status not in STATUSES:
        raise ValueError(f"{result.trial.id}: status {result.status!r} gives no card")
    return {
        "trial": result.trial.id,
        "status": result.status,
        "window": {"opens": _instant(result.window_opens_at), "closes": _instant(result.window_closes_at)},
        "criteria": [criterion_entry(r) for r in result.results],
    }
