"""The CDS Hooks blueprint: discovery, the patient-view service, feedback, health; CORS on all."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import weakref
from datetime import datetime
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from ..base.datafiles import ValidatorPool, dotted_errors
from ..base.errors import HookError, outcome_response
from ..base.logs import hook_context
from ..patient_data.fhir_client import DataUnavailable
from ..patient_data.hook_request import UUID_PATTERN, parse_hook_request
from ..service import ServiceState

log = logging.getLogger(__name__)
bp = Blueprint("cds", __name__)

#: Free text from clients: anything but NUL, which PostgreSQL cannot store in text columns.
NO_NUL = r"^[^\x00]*$"

FEEDBACK_SCHEMA: dict[str, Any] = {
    "feedback": {
        "type": "list",
        "required": True,
        "minlength": 1,
        "maxlength": 1000,
        "schema": {
            "type": "dict",
            "allow_unknown": True,
            "schema": {
                "card": {"type": "string", "required": True, "regex": UUID_PATTERN},
                "outcome": {"type": "string", "required": True, "allowed": ["accepted", "overridden"]},
                "outcomeTimestamp": {"type": "string", "required": True, "empty": False},
                "acceptedSuggestions": {
                    "type": "list",
                    "schema": {
                        "type": "dict",
                        "allow_unknown": True,
                        "schema": {"id": {"type": "string", "required": True, "regex": NO_NUL}},
                    },
                },
                "overrideReason": {
                    "type": "dict",
                    "allow_unknown": True,
                    "schema": {
                        "reason": {
                            "type": "dict",
                            "allow_unknown": True,
                            "schema": {
                                "code": {"type": "string", "regex": NO_NUL},
                                "system": {"type": "string", "regex": NO_NUL},
                                "display": {"type": "string", "regex": NO_NUL},
                            },
                        },
                        "userComment": {"type": "string", "regex": NO_NUL},
                    },
                },
            },
        },
    }
}


_FEEDBACK_VALIDATORS = ValidatorPool(FEEDBACK_SCHEMA, allow_unknown=True)


def state() -> ServiceState:
    return current_app.extensions["cds"]


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status=status, mimetype="application/json")


@bp.after_app_request
def add_cors_headers(response: Response) -> Response:
    # The public sandbox calls from a browser on another origin: every route, POST included — but
    # not the screening worksheet's pages, which no other origin may read.
    if request.blueprint == "worksheet" or request.path.startswith("/worksheet/"):
        return response
    response.headers["Access-Control-Allow-Origin"] = request.headers.get("Origin") or "*"
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
    response.headers["Access-Control-Max-Age"] = "600"
    if request.headers.get("Access-Control-Request-Private-Network") == "true":
        # Chrome asks before a public page (the sandbox) calls a service on localhost.
        response.headers["Access-Control-Allow-Private-Network"] = "true"
    response.headers["Vary"] = "Origin"
    return response


@bp.get("/cds-services")
def discovery() -> Response:
    return json_response({"services": state().discovery()})


@bp.get("/health")
def health() -> Response:
    current = state()
    return json_response(
        {
            "status": "ok",
            "trials": [t.id for t in current.screener.trials],
            # Trials screened but whose cards the site hides (screening.show_not_recruiting: false).
            "cards_hidden": [
                t.id
                for t in current.screener.trials
                if not t.recruiting and not current.settings.section("screening")["show_not_recruiting"]
            ],
            "auth": "jwt" if current.verifier else "open",
        }
    )


_READ_BYTES = 1024 * 1024


def _read_body(limit: int) -> bytes:
    """The request body, read up to ``limit`` bytes: a longer one (announced or, when sent chunked
    with no length, found on reading) is a 413 without the rest being read."""
    too_large = HookError(413, f"request body over the limit of {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    stream = request.stream
    parts: list[bytes] = []
    size = 0
    try:
        while size <= limit:
            part = stream.read(min(_READ_BYTES, limit + 1 - size))
            if not part:
                break
            parts.append(part)
            size += len(part)
    except RequestEntityTooLarge:  # werkzeug's own cut at MAX_CONTENT_LENGTH
        raise too_large from None
    if size > limit:
        raise too_large
    return b"".join(parts)


def _decode_body() -> Any:
    return _loads(_read_body(state().settings.section("server")["max_body_bytes"]))


def _decode_hook_body() -> Any:
    """A hook request decoded only as far as screening reads it (``patient_data/lean_json.py``);
    a body that is not an ordinary request is decoded in full, and answered as it always was."""
    current = state()
    raw = _read_body(current.settings.section("server")["max_body_bytes"])
    lean = current.screener.request_decoder.decode(raw)
    return lean if lean is not None else _loads(raw)


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise HookError(400, f"the body is not valid JSON ({exc.msg} at position {exc.pos})") from None


def _authenticate(service_path: str) -> None:
    verifier = state().verifier
    if verifier is None:
        return
    from .auth import AuthError  # local: the auth module is optional at import time for the CLI

    try:
        verifier.verify(request.headers.get("Authorization"), state().audience(service_path))
    except AuthError as exc:
        log.warning("client authentication failed: %s", exc.reason)
        raise HookError(401, "unauthorized") from None


class GcPause:
    """The cyclic garbage collector, paused while this process answers hooks, with each hook's
    decoded body kept until its answer has been sent.

    Measured at 20 000 Observations (docs/performance.md): the collector makes decoding the body
    ~1.7× slower (it keeps walking the young dicts), and freeing the decoded body costs ~35 ms. So a
    hook pauses the collector and lets its body go once the response is closed, i.e. after the WSGI
    server has written it.

    The collector is process-wide and worker threads answer hooks at the same time, so the pause is
    counted: it starts with the first hook in flight and ends (restoring the collector's earlier
    setting) when the last one is done. Hooks that overlap without a gap would keep it paused for
    good, so a pause that has lasted :attr:`MAX_PAUSE_SECONDS` ends with a full collection run by
    the hook that finishes then (after its answer is sent). A hold whose response is never closed
    (a test client) is released when the response object goes away, or by a later hook once it is
    :attr:`STALE_SECONDS` old.
    """

    MAX_PAUSE_SECONDS = 5.0
    STALE_SECONDS = 120.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holds: list[_Hold] = []
        self._was_enabled = True
        self._since = 0.0

    @property
    def active(self) -> int:
        """How many hooks hold the pause now."""
        with self._lock:
            return len(self._holds)

    def hold(self) -> _Hold:
        now = time.monotonic()
        with self._lock:
            stale = [h for h in self._holds if now - h.started > self.STALE_SECONDS]
        for old in stale:
            old.release()
        held = _Hold(self, now)
        with self._lock:
            if not self._holds:
                self._was_enabled = gc.isenabled()
                self._since = now
                gc.disable()
            self._holds.append(held)
        return held

    def _release(self, held: _Hold) -> None:
        collect = False
        with self._lock:
            with contextlib.suppress(ValueError):
                self._holds.remove(held)
            if not self._holds:
                if self._was_enabled:
                    gc.enable()
            elif self._was_enabled and time.monotonic() - self._since > self.MAX_PAUSE_SECONDS:
                self._since = time.monotonic()
                collect = True
        if collect:
            gc.collect()


class _Hold:
    """One hook's share of the :class:`GcPause`; ``items`` live until :meth:`release`."""

    def __init__(self, pause: GcPause, started: float) -> None:
        self._pause = pause
        self.started = started
        self.items: list[Any] = []
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.items.clear()
        self._pause._release(self)


#: One per process: the collector it pauses is process-wide.
GC_PAUSE = GcPause()


@bp.post("/cds-services/<service_id>")
def call_service(service_id: str) -> Response:
    held = GC_PAUSE.hold()
    try:
        response = _answer_hook(service_id, held)
    except BaseException:
        held.release()
        raise
    response.call_on_close(held.release)
    weakref.finalize(response, held.release)
    return response


def _answer_hook(service_id: str, held: _Hold) -> Response:
    started = time.monotonic()
    current = state()
    # Metrics are labelled by known service ids only: callers choose the URL.
    label = service_id if service_id in current.service_ids else "unknown"
    try:
        _authenticate(request.path)
        if service_id not in current.service_ids:
            raise HookError(404, f"no CDS service with id {service_id!r}")
        body = _decode_hook_body()
        held.items.append(body)
        hook_request = parse_hook_request(body, current.hook_of(service_id))
    except HookError as exc:
        current.metrics.hook_call(label, exc.status, time.monotonic() - started)
        return outcome_response(exc.status, exc.diagnostics, exc.expression)
    with hook_context(hook_request.hook_instance):
        try:
            cards = current.answer(service_id, hook_request, started)
        except HookError as exc:
            current.metrics.hook_call(service_id, exc.status, time.monotonic() - started)
            return outcome_response(exc.status, exc.diagnostics, exc.expression)
        except DataUnavailable as exc:
            log.warning("answering 412: %s", exc.reason)
            current.metrics.hook_call(service_id, 412, time.monotonic() - started)
            # An unauthenticated caller learns only the category (exc.public_reason): the details
            # would tell which hosts and ports answer HTTP behind the service. They are in the log.
            shown = (
                exc.reason if current.verifier is not None or exc.public_reason is None else exc.public_reason
            )
            return outcome_response(412, f"patient data needed for screening could not be obtained: {shown}")
        current.metrics.hook_call(service_id, 200, time.monotonic() - started)
        return json_response({"cards": cards})


def _epoch(text: str) -> float | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo else None


@bp.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str) -> Response:
    current = state()
    try:
        _authenticate(request.path)
        if service_id not in current.service_ids:
            raise HookError(404, f"no CDS service with id {service_id!r}")
        body = _decode_body()
        if not isinstance(body, dict):
            raise HookError(400, "the feedback body must be a JSON object")
        with _FEEDBACK_VALIDATORS.lend() as validator:
            problems = None if validator.validate(body) else dotted_errors(validator.errors)
        if problems is not None:
            raise HookError(
                400,
                "invalid feedback: " + "; ".join(f"{p}: {m}" for p, m in problems),
                sorted({p for p, _ in problems}),
            )
        for index, item in enumerate(body["feedback"]):
            if _epoch(item["outcomeTimestamp"]) is None:
                raise HookError(
                    400,
                    f"feedback[{index}].outcomeTimestamp: not an ISO 8601 instant with a time zone",
                    [f"feedback.{index}.outcomeTimestamp"],
                )
    except HookError as exc:
        return outcome_response(exc.status, exc.diagnostics, exc.expression)
    current.record_feedback(
        [(item, _epoch(item["outcomeTimestamp"]) or time.time()) for item in body["feedback"]]
    )
    response = Response(status=200)
    del response.headers["Content-Type"]  # an empty body has no media type (not text/html)
    return response
