"""The CDS Hooks 2.0 card rules, as a checker (used by the test suite and the integration harness).

Returns human-readable problems; an empty list means the card follows the rules we rely on:
only the card fields the spec defines; required fields; a one-line summary under 140 characters;
indicator values; ``source.label`` and absolute source URLs; link types and ``appContext`` only on
``smart`` links; ``selectionBehavior`` whenever there are suggestions; suggestions with a label, a
unique uuid (feedback's ``acceptedSuggestions`` echo it, so the card needs a uuid too), a boolean
``isRecommended`` (at most one recommended under ``at-most-one``) and well-formed actions (a FHIR
resource for create/update, a ``resourceId`` for delete); override reasons as Codings with a display;
and no empty optional fields (the spec says optional fields are omitted, never null, "", [] or {}).

:func:`screening_extension_problems` checks this service's own contract, ``extension.screening``.
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


#: ``card.extension.screening`` (cds_service/cards/extension.py; the README's contract).
SCREENING_STATUSES = ("eligible", "possibly_eligible", "upcoming")
CRITERION_RESULTS = ("met", "not_met", "unknown", "to_confirm")
CRITERION_KINDS = ("inclusion", "exclusion")
INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
REFERENCE = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _no_empty(value: Any, path: str, problems: list[str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            if path == "card" and key == "extension":
                continue  # an extension's content follows its own contract (nulls allowed there)
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


def _keys(value: Any, keys: set[str], path: str, problems: list[str]) -> bool:
    if not isinstance(value, dict):
        problems.append(f"{path}: must be an object")
        return False
    if set(value) != keys:
        missing, extra = sorted(keys - set(value)), sorted(set(value) - keys)
        problems.append(f"{path}: keys must be exactly {sorted(keys)} (missing {missing}, extra {extra})")
        return False
    return True


def _instant_or_null(value: Any, path: str, problems: list[str]) -> None:
    if value is not None and not (isinstance(value, str) and INSTANT.match(value)):
        problems.append(f"{path}: {value!r} is neither an instant (with offset) nor null")


def screening_extension_problems(card: Any) -> list[str]:
    """Every way ``card.extension.screening`` breaks the contract (README, "The screening extension")."""
    problems: list[str] = []
    extension = card.get("extension") if isinstance(card, dict) else None
    screening = extension.get("screening") if isinstance(extension, dict) else None
    where = "extension.screening"
    if screening is None:
        return [f"{where}: missing"]
    if not _keys(screening, {"trial", "status", "window", "criteria"}, where, problems):
        return problems
    trial = screening["trial"]
    if not (isinstance(trial, str) and re.match(r"^NCT\d{8}$", trial)):
        problems.append(f"{where}.trial: {trial!r} is not an NCT id")
    topic = (card.get("source") or {}).get("topic") or {}
    if isinstance(topic, dict) and topic.get("code") and topic.get("code") != trial:
        problems.append(f"{where}.trial: {trial!r} differs from source.topic.code {topic.get('code')!r}")
    if screening["status"] not in SCREENING_STATUSES:
        problems.append(f"{where}.status: {screening['status']!r} not one of {', '.join(SCREENING_STATUSES)}")
    if _keys(screening["window"], {"opens", "closes"}, f"{where}.window", problems):
        for key in ("opens", "closes"):
            _instant_or_null(screening["window"][key], f"{where}.window.{key}", problems)
    criteria = screening["criteria"]
    if not isinstance(criteria, list) or not criteria:
        problems.append(f"{where}.criteria: must be a non-empty list")
        return problems
    seen: set[str] = set()
    for index, entry in enumerate(criteria):
        path = f"{where}.criteria[{index}]"
        if not _keys(entry, {"id", "kind", "result", "evidence"}, path, problems):
            continue
        if not isinstance(entry["id"], str) or not entry["id"] or entry["id"] in seen:
            problems.append(f"{path}.id: {entry['id']!r} must be a unique non-empty string")
        seen.add(str(entry["id"]))
        if entry["kind"] not in CRITERION_KINDS:
            problems.append(f"{path}.kind: {entry['kind']!r} not inclusion|exclusion")
        if entry["result"] not in CRITERION_RESULTS:
            problems.append(f"{path}.result: {entry['result']!r} not one of {', '.join(CRITERION_RESULTS)}")
        if not isinstance(entry["evidence"], list):
            problems.append(f"{path}.evidence: must be a list")
            continue
        for number, item in enumerate(entry["evidence"]):
            item_path = f"{path}.evidence[{number}]"
            if not _keys(item, {"text", "time", "resource"}, item_path, problems):
                continue
            if not isinstance(item["text"], str) or not item["text"]:
                problems.append(f"{item_path}.text: must be a non-empty string")
            _instant_or_null(item["time"], f"{item_path}.time", problems)
            resource = item["resource"]
            if resource is not None and not (isinstance(resource, str) and REFERENCE.match(resource)):
                problems.append(f"{item_path}.resource: {resource!r} is neither Type/id nor null")
    return problems


def screening_of(card: Any) -> dict[str, Any]:
    """``card.extension.screening`` (an empty dict when the card has none)."""
    extension = card.get("extension") if isinstance(card, dict) else None
    screening = extension.get("screening") if isinstance(extension, dict) else None
    return screening if isinstance(screening, dict) else {}


def expectation_problems(
    trial: str,
    expected: str,
    cards: list[Any],
    expected_criteria: dict[str, str] | None = None,
) -> list[str]:
    """How the cards answered for ``trial`` (those whose ``source.topic.code`` is the trial) differ
    from a scenario's expectation, judged on ``extension.screening`` — never on the English text.

    ``expected`` is a status; eligible / possibly_eligible / upcoming want exactly one card whose
    extension says so, not_eligible / window_closed want no card. ``expected_criteria`` (criterion
    id → met | not_met | unknown | to_confirm) is checked against the extension's criteria.
    """
    problems: list[str] = []
    want_card = expected in SCREENING_STATUSES
    if len(cards) > 1:
        problems.append(f"{len(cards)} cards for {trial} (expected at most one)")
        if not want_card:
            problems.append(f"expected no {trial} card ({expected}), got a card")
        return problems
    if not cards:
        return [f"expected a {trial} card ({expected}), got no card"] if want_card else []
    if not want_card:
        return [f"expected no {trial} card ({expected}), got a card"]
    card = cards[0]
    problems += screening_extension_problems(card)
    screening = screening_of(card)
    status = screening.get("status")
    if status != expected:
        problems.append(f"extension.screening.status: expected {expected}, got {status}")
    results = {c.get("id"): c.get("result") for c in screening.get("criteria") or [] if isinstance(c, dict)}
    for criterion, result in sorted((expected_criteria or {}).items()):
        got = results.get(criterion, "absent")
        if got != result:
            problems.append(f"extension.screening criterion {criterion}: expected {result}, got {got}")
    return problems


def outcome_of(cards: list[Any]) -> str:
    """What a trial's cards say, for a report: the extension's status, 'no card' or 'N cards'."""
    if not cards:
        return "no card"
    if len(cards) > 1:
        return f"{len(cards)} cards"
    return str(screening_of(cards[0]).get("status") or "card without extension")
