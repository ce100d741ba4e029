"""Errors as FHIR OperationOutcome responses: every 4xx names the problem, never a stack trace."""

from __future__ import annotations

from typing import Any

import orjson
from flask import Response

#: OperationOutcome.issue.code per HTTP status (FHIR issue-type value set).
_ISSUE_CODE = {
    400: "invalid",
    401: "login",
    404: "not-found",
    405: "not-supported",
    412: "incomplete",
    413: "too-costly",
    415: "not-supported",
    500: "exception",
    503: "transient",
}


class HookError(Exception):
    """A request that cannot be answered with cards. ``expression`` lists the offending field paths."""

    def __init__(self, status: int, diagnostics: str, expression: list[str] | None = None):
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics
        self.expression = expression or []


def operation_outcome(status: int, diagnostics: str, expression: list[str] | None = None) -> dict[str, Any]:
    issue: dict[str, Any] = {
        "severity": "error",
        "code": _ISSUE_CODE.get(status, "processing"),
        "diagnostics": diagnostics,
    }
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def outcome_response(status: int, diagnostics: str, expression: list[str] | None = None) -> Response:
    body = orjson.dumps(operation_outcome(status, diagnostics, expression))
    response = Response(body, status=status, mimetype="application/fhir+json")
    if status == 401:
        # RFC 6750: the scheme the client must use. No error details (docs/security.md).
        response.headers["WWW-Authenticate"] = "Bearer"
    return response
