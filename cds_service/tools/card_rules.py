"""The CDS Hooks 2.0 card rules, as a checker (used by the test suite and the integration harness).

Returns human-readable problems; an empty list means the card follows the rules we rely on:
only the card fields the spec defines; required fields; a one-line summary under 140 characters;
indicator values; ``source.label`` and absolute source URLs; link types and ``appContext`` only on
``smart`` links; ``selectionBehavior`` whenever there are suggestions; suggestions with a label, a
unique uuid (feedback's ``acceptedSuggestions`` echo it, so the card needs a uuid too), a boolean
``isRecommended`` (at most one recommended under ``at-most-one``) and well-formed actions (a FHIR
resource for create/update, a ``resourceId`` for delete); override reasons as Codings with a display;
and no empty optional fields (the spec says optional fields are omitted, never null, "", [] or {}).
"""

from __future__ import annotations

import re
from typing import Any

INDICATORS = {"info", "warning", "critical"}
LINK_TYPES = {"absolute", "smart"}
ACTION_TYPES = {"create", "update", "delete"}
SELECTION_BEHAVIORS = {"at-most-one", "any"}
CARD_FIELDS = {
    "uuid",
    "summary",
    "detail",
    "indicator",
    "source",
    "suggestions",
    "selectionBehavior",
    "overrideReasons",
    "links",
    "extension",
}
UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _no_empty(value: Any, path: str, problems: list[str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            if _empty(inner):
                problems.append(f"{path}.{key}: empty optional field (omit it instead)")
            else:
                _no_empty(inner, f"{path}.{key}", problems)
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            _no_empty(inner, f"{path}[{index}]", problems)


def _coding(value: Any, path: str, problems: list[str], need_display: bool = False) -> None:
    if not isinstance(value, dict) or not value.get("code"):
        problems.append(f"{path}: a Coding needs a code")
    elif need_display and not value.get("display"):
        problems.append(f"{path}: needs a display")


def _absolute_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://"))


def _action_problems(action: Any, where: str, problems: list[str]) -> None:
    if not isinstance(action, dict) or action.get("type") not in ACTION_TYPES:
        problems.append(f"{where}.type: must be create|update|delete")
        return
    if not action.get("description"):
        problems.append(f"{where}.description: required")
    if action["type"] in ("create", "update"):
        resource = action.get("resource")
        if not isinstance(resource, dict):
            problems.append(f"{where}.resource: required for {action['type']}")
        elif not isinstance(resource.get("resourceType"), str) or not resource["resourceType"]:
            problems.append(f"{where}.resource: a FHIR resource needs a resourceType")
    elif not action.get("resourceId") and not isinstance(action.get("resource"), str):
        problems.append(f"{where}.resourceId: required for delete")


def _suggestion_problems(card: dict[str, Any], problems: list[str]) -> None:
    suggestions = card.get("suggestions")
    if suggestions is None:
        return
    if not isinstance(suggestions, list):
        problems.append("suggestions: must be a list")
        return
    if card.get("selectionBehavior") not in SELECTION_BEHAVIORS:
        problems.append("selectionBehavior: required (at-most-one | any) when there are suggestions")
    if suggestions and "uuid" not in card:
        problems.append("uuid: required when there are suggestions (feedback names the card)")
    seen: set[str] = set()
    recommended = 0
    for index, suggestion in enumerate(suggestions):
        path = f"suggestions[{index}]"
        if not isinstance(suggestion, dict) or not suggestion.get("label"):
            problems.append(f"{path}.label: required")
            continue
        uuid = suggestion.get("uuid")
        if uuid is None:
            problems.append(f"{path}.uuid: required (feedback's acceptedSuggestions echo it)")
        elif not UUID.match(str(uuid)):
            problems.append(f"{path}.uuid: not a UUID")
        elif str(uuid).lower() in seen:
            problems.append(f"{path}.uuid: duplicate within the card")
        else:
            seen.add(str(uuid).lower())
        if "isRecommended" in suggestion:
            if not isinstance(suggestion["isRecommended"], bool):
                problems.append(f"{path}.isRecommended: must be true or false")
            elif suggestion["isRecommended"]:
                recommended += 1
        actions = suggestion.get("actions", [])
        if not isinstance(actions, list):
            problems.append(f"{path}.actions: must be a list")
            continue
        for number, action in enumerate(actions):
            _action_problems(action, f"{path}.actions[{number}]", problems)
    if recommended > 1 and card.get("selectionBehavior") == "at-most-one":
        problems.append("suggestions: more than one isRecommended under selectionBehavior at-most-one")


def card_problems(card: Any, *, allow_critical: bool = False) -> list[str]:
    """Every way ``card`` breaks the CDS Hooks card rules (empty list = fine)."""
    problems: list[str] = []
    if not isinstance(card, dict):
        return ["a card must be a JSON object"]
    _no_empty(card, "card", problems)
    for key in sorted(set(card) - CARD_FIELDS):
        problems.append(f"{key}: not a CDS Hooks card field")
    summary = card.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        problems.append("summary: required")
    elif len(summary) >= 140:
        problems.append(f"summary: {len(summary)} characters (must be < 140)")
    elif "\n" in summary or "\r" in summary:
        problems.append("summary: must be one line (it has a line break)")
    if card.get("indicator") not in INDICATORS:
        problems.append(f"indicator: {card.get('indicator')!r} not one of {sorted(INDICATORS)}")
    elif card["indicator"] == "critical" and not allow_critical:
        problems.append("indicator: 'critical' is for serious clinical harm, not an enrollment suggestion")
    if "uuid" in card and not (isinstance(card["uuid"], str) and UUID.match(card["uuid"])):
        problems.append("uuid: not a UUID")
    if "detail" in card and not isinstance(card["detail"], str):
        problems.append("detail: must be a (Markdown) string")
    source = card.get("source")
    if (
        not isinstance(source, dict)
        or not isinstance(source.get("label"), str)
        or not source["label"].strip()
    ):
        problems.append("source.label: required")
    else:
        if "topic" in source:
            _coding(source["topic"], "source.topic", problems)
        for key in ("url", "icon"):
            if key in source and not _absolute_url(source[key]):
                problems.append(f"source.{key}: must be an absolute URL")
    links = card.get("links", [])
    if not isinstance(links, list):
        problems.append("links: must be a list")
        links = []
    for index, link in enumerate(links):
        path = f"links[{index}]"
        if not isinstance(link, dict):
            problems.append(f"{path}: must be an object")
            continue
        for key in ("label", "url", "type"):
            if not link.get(key):
                problems.append(f"{path}.{key}: required")
        if link.get("type") not in LINK_TYPES:
            problems.append(f"{path}.type: {link.get('type')!r} not absolute|smart")
        if "appContext" in link:
            if link.get("type") != "smart":
                problems.append(f"{path}.appContext: only for smart links")
            elif not isinstance(link["appContext"], str):
                problems.append(f"{path}.appContext: must be a string")
        if isinstance(link.get("url"), str) and not _absolute_url(link["url"]):
            problems.append(f"{path}.url: must be an absolute URL")
    if "selectionBehavior" in card and card["selectionBehavior"] not in SELECTION_BEHAVIORS:
        problems.append(f"selectionBehavior: {card['selectionBehavior']!r} not at-most-one|any")
    _suggestion_problems(card, problems)
    reasons = card.get("overrideReasons", [])
    if not isinstance(reasons, list):
        problems.append("overrideReasons: must be a list of Codings")
        reasons = []
    if reasons and "uuid" not in card:
        problems.append("uuid: required when there are overrideReasons (feedback names the card)")
    for index, reason in enumerate(reasons):
        _coding(reason, f"overrideReasons[{index}]", problems, need_display=True)
    return problems


def response_problems(body: Any) -> list[str]:
    """Problems with a whole hook response ``{"cards": [...]}``."""
    if not isinstance(body, dict) or not isinstance(body.get("cards"), list):
        return ["a hook response must be an object with a `cards` list"]
    problems = [f"cards[{i}].{p}" for i, card in enumerate(body["cards"]) for p in card_problems(card)]
    uuids = [c.get("uuid") for c in body["cards"] if isinstance(c, dict) and c.get("uuid")]
    if len(uuids) != len(set(uuids)):
        problems.append("cards: duplicate uuid")
    suggestion_uuids = [
        str(s.get("uuid")).lower()
        for c in body["cards"]
        if isinstance(c, dict) and isinstance(c.get("suggestions"), list)
        for s in c["suggestions"]
        if isinstance(s, dict) and s.get("uuid")
    ]
    if len(suggestion_uuids) != len(set(suggestion_uuids)):
        problems.append("cards: duplicate suggestion uuid across cards")
    if "systemActions" in body and _empty(body["systemActions"]):
        problems.append("systemActions: empty optional field")
    return problems
