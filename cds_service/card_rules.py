"""The CDS Hooks 2.0 card rules, as a checker (used by the test suite and the integration harness).

Returns human-readable problems; an empty list means the card follows the rules we rely on:
required fields, summary under 140 characters, indicator values, ``source.label``, link types,
``selectionBehavior`` whenever there are suggestions, suggestion actions, and no empty optional
fields (the spec says optional fields are omitted, never null, "", [] or {}).
"""

from __future__ import annotations

import re
from typing import Any

INDICATORS = {"info", "warning", "critical"}
LINK_TYPES = {"absolute", "smart"}
ACTION_TYPES = {"create", "update", "delete"}
SELECTION_BEHAVIORS = {"at-most-one", "any"}
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


def card_problems(card: Any, *, allow_critical: bool = False) -> list[str]:
    """Every way ``card`` breaks the CDS Hooks card rules (empty list = fine)."""
    problems: list[str] = []
    if not isinstance(card, dict):
        return ["a card must be a JSON object"]
    _no_empty(card, "card", problems)
    summary = card.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        problems.append("summary: required")
    elif len(summary) >= 140:
        problems.append(f"summary: {len(summary)} characters (must be < 140)")
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
    elif "topic" in source:
        _coding(source["topic"], "source.topic", problems)
    for index, link in enumerate(card.get("links") or []):
        path = f"links[{index}]"
        if not isinstance(link, dict):
            problems.append(f"{path}: must be an object")
            continue
        for key in ("label", "url", "type"):
            if not link.get(key):
                problems.append(f"{path}.{key}: required")
        if link.get("type") not in LINK_TYPES:
            problems.append(f"{path}.type: {link.get('type')!r} not absolute|smart")
        if "appContext" in link and link.get("type") != "smart":
            problems.append(f"{path}.appContext: only for smart links")
        if isinstance(link.get("url"), str) and not link["url"].startswith(("https://", "http://")):
            problems.append(f"{path}.url: must be an absolute URL")
    suggestions = card.get("suggestions") or []
    if suggestions and card.get("selectionBehavior") not in SELECTION_BEHAVIORS:
        problems.append("selectionBehavior: required (at-most-one | any) when there are suggestions")
    for index, suggestion in enumerate(suggestions):
        path = f"suggestions[{index}]"
        if not isinstance(suggestion, dict) or not suggestion.get("label"):
            problems.append(f"{path}.label: required")
            continue
        if "uuid" in suggestion and not UUID.match(str(suggestion["uuid"])):
            problems.append(f"{path}.uuid: not a UUID")
        for number, action in enumerate(suggestion.get("actions") or []):
            where = f"{path}.actions[{number}]"
            if not isinstance(action, dict) or action.get("type") not in ACTION_TYPES:
                problems.append(f"{where}.type: must be create|update|delete")
                continue
            if not action.get("description"):
                problems.append(f"{where}.description: required")
            if action["type"] in ("create", "update") and not isinstance(action.get("resource"), dict):
                problems.append(f"{where}.resource: required for {action['type']}")
    for index, reason in enumerate(card.get("overrideReasons") or []):
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
    if "systemActions" in body and _empty(body["systemActions"]):
        problems.append("systemActions: empty optional field")
    return problems
