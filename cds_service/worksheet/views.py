"""The screening worksheet's Flask blueprint: SMART launch, the pages, what users record.

Routes (all under ``/worksheet``):

- ``GET /launch``: SMART launch, EHR (``iss`` + ``launch``) or standalone (``iss``, or
  ``worksheet.standalone_iss``);
- ``GET /callback``: the redirect URI; checks ``state``, exchanges the code, verifies the id_token,
  opens a session;
- ``GET /``: the overview, every screened trial in full;
- ``GET /trials/<NCT id>``: one trial in full (a card's link opens it through ``appContext``);
- ``POST /trials/<NCT id>/record``: the bedside checklist and a decision, stored with the user and
  the time;
- ``POST /end``: ends the session (its tokens are deleted).

Every page is server-rendered HTML (no script at all), sent with ``Cache-Control: no-store`` and a
strict Content-Security-Policy. Every failure is a page saying what happened and what to do, with
a 4xx/5xx status that fits: nothing the user, the EHR or the network does gives a stack trace.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from ..base.config import Settings, is_loopback_url
from ..cards.render import card_order
from ..clinical.evaluation import TrialResult
from ..patient_data.fhir_client import DataUnavailable, FhirClient
from ..patient_data.gather import gather
from ..patient_data.hook_request import HookRequest
from ..service import ServiceState
from ..store import SOURCE_WORKSHEET, Feedback, IssuedCard
from .page import DECISIONS, DECISIONS_BY_KEY, patient_banner, trial_sheet
from .sessions import Cookies, LaunchProblem, Sealer, SessionProblem, Sessions, WorksheetSession
from .smart import SmartClient, SmartError, SmartServer, code_verifier

log = logging.getLogger(__name__)

bp = Blueprint(
    "worksheet",
    __name__,
    url_prefix="/worksheet",
    template_folder="templates",
    static_folder="static",
)

#: Resource types a launch asks scopes for: what the screening reads, and Medication (referenced by
#: administrations).
EXTRA_SCOPE_TYPES = ("Medication",)
MAX_REASON_CHARS = 500
MAX_PARAM_CHARS = 4096


class FormProblem(Exception):
    """A post the worksheet cannot take (a bad field); the message says which."""


@dataclass
class Worksheet:
    """The worksheet's per-app state."""

    settings: Settings
    smart: SmartClient
    sessions: Sessions
    cookies: Cookies
    fhir_client: FhirClient

    @property
    def zone(self) -> str:
        return str(self.settings.section("screening")["timezone"])


def init_app(app: Flask, state: ServiceState) -> None:
    """Register the worksheet on the app (only when ``worksheet.enabled``)."""
    settings = state.settings
    section = settings.section("worksheet")
    public_url = settings.worksheet_url
    fhir = dict(settings.section("fhir"))
    fhir["allowed_servers"] = list(section["issuers"])
    fhir["deadline_seconds"] = float(section["fhir_deadline_seconds"])
    fhir_client = FhirClient(fhir, on_query=state.metrics.fhir_query)
    resource_types = [q.resource_type for q in state.screener.plan.queries] + list(EXTRA_SCOPE_TYPES)
    app.extensions["worksheet"] = Worksheet(
        settings=settings,
        smart=SmartClient(section, fhir_client, f"{public_url}/worksheet/callback", resource_types),
        sessions=Sessions(
            lambda: state.store,
            Sealer(list(section["token_keys"])),
            idle_seconds=float(section["idle_minutes"]) * 60,
            max_seconds=float(section["max_hours"]) * 3600,
        ),
        cookies=Cookies(
            secure=not (public_url.startswith("http://") and is_loopback_url(public_url)),
            samesite=str(section["cookie_samesite"]),
        ),
        fhir_client=fhir_client,
    )
    app.register_blueprint(bp)


def worksheet() -> Worksheet:
    return current_app.extensions["worksheet"]


def service() -> ServiceState:
    return current_app.extensions["cds"]


# -- headers and error pages ------------------------------------------------------------------------


def _csp() -> str:
    ancestors = " ".join(worksheet().settings.section("worksheet")["frame_ancestors"]) or "'none'"
    return (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; "
        f"frame-ancestors {ancestors}"
    )


def secure_headers(response: Response) -> Response:
    """No caching anywhere (pages hold patient data), a strict CSP (no script, no inline style), no
    Referer (launch and callback URLs carry codes), no MIME sniffing."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    response.headers["Content-Security-Policy"] = _csp()
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    if not worksheet().settings.section("worksheet")["frame_ancestors"]:
        response.headers["X-Frame-Options"] = "DENY"
    return response


bp.after_request(secure_headers)


def error_page(status: int, title: str, message: str, *, detail: str | None = None) -> Response:
    """A page saying what went wrong and what to do; ``detail`` is technical and safe to show."""
    html = render_template("message.html", title=title, message=message, detail=detail, status=status)
    return Response(html, status=status, mimetype="text/html")


RELAUNCH = "Open the screening worksheet again from the patient's chart in the EHR."

_SMART_PAGES: dict[str, tuple[int, str, str]] = {
    "bad_launch": (400, "This link cannot start the worksheet", RELAUNCH),
    "not_allowed": (
        403,
        "This EHR is not one the worksheet is set up for",
        "The FHIR server that launched the worksheet is not in its list of trusted servers "
        "(worksheet.issuers). Ask your integration team.",
    ),
    "unreachable": (
        502,
        "The EHR's sign-in service did not answer",
        "It may be down or slow right now. Try again in a few minutes; " + RELAUNCH[0].lower() + RELAUNCH[1:],
    ),
    "bad_server": (
        502,
        "The EHR's sign-in service gave an answer the worksheet cannot use",
        "Ask your integration team; the details below name the problem.",
    ),
    "denied": (403, "The EHR did not authorize the worksheet", RELAUNCH),
    "token_refused": (403, "The EHR refused to complete the sign-in", RELAUNCH),
    "identity": (403, "Your identity could not be verified", RELAUNCH),
}

_SESSION_PAGES: dict[str, tuple[str, str]] = {
    "none": ("No worksheet session", "This browser has no open worksheet session."),
    "idle": ("Your worksheet session has ended", "It ended after {idle} without activity."),
    "expired": ("Your worksheet session has ended", "Sessions last at most {max}."),
    "token_expired": ("Your worksheet session has ended", "The EHR's access for this session has expired."),
    "unreadable": ("Your worksheet session has ended", "It can no longer be read (the keys changed)."),
}


def _duration_text(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes} minutes" if minutes < 120 else f"{minutes / 60:g} hours"


@bp.errorhandler(SmartError)
def smart_error(exc: SmartError) -> Response:
    status, title, message = _SMART_PAGES[exc.kind]
    log.warning("worksheet launch failed", extra={"fields": {"kind": exc.kind, "detail": exc.detail}})
    return error_page(status, title, message, detail=exc.detail)


@bp.errorhandler(LaunchProblem)
def launch_problem(exc: LaunchProblem) -> Response:
    log.warning("worksheet callback refused", extra={"fields": {"reason": str(exc)}})
    return error_page(
        400,
        "This sign-in could not be completed",
        "The sign-in link was already used, has expired (after 10 minutes), or was started in another "
        "browser. " + RELAUNCH,
    )


@bp.errorhandler(SessionProblem)
def session_problem(exc: SessionProblem) -> Response:
    sessions = worksheet().sessions
    title, message = _SESSION_PAGES.get(exc.reason, _SESSION_PAGES["none"])
    message = message.format(
        idle=_duration_text(sessions.idle_seconds), max=_duration_text(sessions.max_seconds)
    )
    response = error_page(401, title, f"{message} {RELAUNCH}")
    response.delete_cookie(worksheet().cookies.session, **_cookie_scope())
    return response


@bp.errorhandler(DataUnavailable)
def data_unavailable(exc: DataUnavailable) -> Response:
    reason = exc.reason
    log.warning("worksheet could not read the patient's data: %s", reason)
    if "deadline" in reason or "timed out" in reason:
        seconds = worksheet().settings.section("worksheet")["fhir_deadline_seconds"]
        return error_page(
            504,
            "The EHR's FHIR server is too slow right now",
            f"The patient's data did not arrive within {seconds:g} seconds. Reload the page to try again.",
        )
    if "HTTP 401" in reason or "HTTP 403" in reason:
        return error_page(
            403,
            "The EHR refused the worksheet's access to the chart",
            "The access token of this session was not accepted. " + RELAUNCH,
        )
    return error_page(
        502,
        "The patient's data could not be read",
        "The EHR's FHIR server did not give the data the screening needs. Reload the page to try again.",
        detail=reason,
    )


@bp.errorhandler(FormProblem)
def form_problem(exc: FormProblem) -> Response:
    return error_page(400, "Nothing was recorded", f"{exc} Go back to the worksheet and try again.")


@bp.errorhandler(Exception)
def unexpected(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return http_error_page(exc)
    if _is_store_error(exc):
        log.error("worksheet: store unavailable (%s)", type(exc).__name__)
        return error_page(
            503,
            "The worksheet cannot reach its database",
            "Nothing was recorded. Try again in a few minutes.",
        )
    log.exception("worksheet: unexpected error (%s)", type(exc).__name__)
    return error_page(
        500, "Something went wrong", "The worksheet hit an error it did not expect. Nothing was recorded."
    )


def _is_store_error(exc: Exception) -> bool:
    module = type(exc).__module__
    return module.startswith(("sqlite3", "psycopg")) or type(exc).__name__ in {"OperationalError"}


def http_error_page(exc: HTTPException) -> Response:
    """Routing errors under /worksheet (unknown page, wrong method) as pages, with the headers."""
    status = exc.code or 400
    titles = {404: "No such worksheet page", 405: "Not available this way"}
    response = error_page(status, titles.get(status, exc.name), "Open the worksheet from the EHR.")
    return secure_headers(response)


def _cookie_scope() -> dict[str, Any]:
    flags = worksheet().cookies.flags()
    return {"path": flags["path"], "secure": flags["secure"], "httponly": True, "samesite": flags["samesite"]}


# -- launch ----------------------------------------------------------------------------------------


def _param(name: str) -> str | None:
    value = request.args.get(name)
    if value is not None and len(value) > MAX_PARAM_CHARS:
        raise SmartError("bad_launch", f"the {name} parameter is too long")
    return value


@bp.get("/launch")
def launch() -> Response:
    ws = worksheet()
    iss = (_param("iss") or "").strip()
    launch_code = _param("launch")
    if launch_code is not None and not launch_code.strip():
        raise SmartError("bad_launch", "the launch parameter is empty")
    if not iss:
        if launch_code is not None:
            raise SmartError("bad_launch", "an EHR launch must give iss")
        if not ws.smart.standalone_iss:
            raise SmartError(
                "bad_launch", "no iss given, and no worksheet.standalone_iss for a standalone launch"
            )
        iss = ws.smart.standalone_iss
    iss = ws.smart.check_iss(iss)
    server = ws.smart.discover(iss)
    verifier, nonce = code_verifier(), secrets.token_urlsafe(24)
    state, binding = ws.sessions.begin_launch(
        {"server": server.as_dict(), "verifier": verifier, "nonce": nonce}
    )
    log.info(
        "worksheet launch",
        extra={"fields": {"launch": "ehr" if launch_code is not None else "standalone"}},
    )
    target = ws.smart.authorize_url(server, launch=launch_code, state=state, nonce=nonce, verifier=verifier)
    response = redirect(target, 302)
    response.set_cookie(ws.cookies.launch, binding, max_age=600, **ws.cookies.flags())
    return response


def _trial_from_app_context(app_context: str | None) -> str | None:
    """The trial a card's link named in ``appContext`` (``{"trial": "NCT…"}`` or a bare NCT id)."""
    if not app_context:
        return None
    trial: Any = app_context.strip()
    try:
        loaded = json.loads(app_context)
        if isinstance(loaded, dict):
            trial = loaded.get("trial")
    except ValueError:
        pass
    screened = {t.id for t in service().screener.trials}
    return trial if isinstance(trial, str) and trial in screened else None


@bp.get("/callback")
def callback() -> Response:
    ws = worksheet()
    state = _param("state") or ""
    binding = request.cookies.get(ws.cookies.launch)
    error = _param("error")
    if error is not None:
        # The authorization server refused (the user said no, a bad scope, an unknown client …).
        # The launch is used up either way; the state is not needed to believe a refusal.
        with contextlib.suppress(LaunchProblem):
            ws.sessions.finish_launch(state, binding)
        description = (_param("error_description") or "")[:300]
        code = error[:60]
        raise SmartError("denied", f"{code}: {description}" if description else code)
    payload = ws.sessions.finish_launch(state, binding)
    code = _param("code")
    if not code:
        raise SmartError("bad_launch", "the callback has no authorization code")
    server = SmartServer.from_dict(payload["server"])
    grant = ws.smart.exchange_code(server, code, payload["verifier"], time.time())
    user = ws.smart.verify_id_token(server, grant.id_token, payload["nonce"])
    trial = _trial_from_app_context(grant.app_context)
    ws.sessions.end(request.cookies.get(ws.cookies.session))  # a new launch replaces this browser's session
    cookie, _ = ws.sessions.create(
        {
            "iss": server.iss,
            "patient_id": grant.patient_id,
            "user": user,
            "access_token": grant.access_token,
            "token_expires_at": grant.expires_at,
            "scope": grant.scope,
            "trial": trial,
            "need_patient_banner": grant.need_patient_banner,
            "encounter_id": grant.encounter_id,
        }
    )
    # The user's resource type only: a fhirUser can be a Patient/… (a patient identifier).
    user_type = user.rsplit("/", 2)[-2] if "/" in user else "unknown"
    log.info("worksheet session started", extra={"fields": {"user_type": user_type, "trial": trial}})
    target = url_for(".trial", trial_id=trial) if trial else url_for(".overview")
    response = redirect(target, 303)
    response.set_cookie(ws.cookies.session, cookie, **ws.cookies.flags())
    response.delete_cookie(ws.cookies.launch, **_cookie_scope())
    return response


# -- pages -----------------------------------------------------------------------------------------


def _session() -> WorksheetSession:
    ws = worksheet()
    return ws.sessions.load(request.cookies.get(ws.cookies.session))


def _screen(session: WorksheetSession) -> tuple[list[TrialResult], dict[str, Any] | None]:
    """The patient's data through the one screening pipeline, with the session's own access token."""
    ws = worksheet()
    state = service()
    hook_request = HookRequest(
        hook="patient-view",
        hook_instance=str(uuid.uuid4()),
        patient_id=session.patient_id,
        user_id=session.user,
        encounter_id=session.encounter_id,
        fhir_server=session.iss,
        access_token=session.access_token,
        prefetch=None,
    )
    at = time.time()
    deadline = time.monotonic() + float(ws.settings.section("worksheet")["fhir_deadline_seconds"])
    data = gather(
        hook_request, state.screener.plan, ws.fhir_client, state.settings.section("fhir"), at, deadline
    )
    outcome = state.screener.screen(session.patient_id, data, at)
    return sorted(outcome.results, key=card_order), data.patient


def _known_trial(trial_id: str) -> None:
    if trial_id not in {t.id for t in service().screener.trials}:
        raise FormProblem(f"{trial_id[:20]!r} is not a trial this service screens.")


def _render(focus: str | None) -> Response:
    session = _session()
    results, patient = _screen(session)
    state = service()
    zone = worksheet().zone
    sheets = []
    for result in results:
        last = state.store.latest_worksheet_records(session.patient_id, result.trial.id)
        labels = state.screener.renderer.templates_for(result.trial.id).criteria
        sheets.append(trial_sheet(result, zone, last[0] if last else None, labels))
    recorded = request.args.get("recorded")
    html = render_template(
        "worksheet.html",
        sheets=sheets,
        focus=focus,
        user=session.user,
        banner=patient_banner(patient) if session.need_patient_banner else None,
        csrf=session.csrf,
        decisions=DECISIONS,
        zone=zone,
        recorded=DECISIONS_BY_KEY[recorded].label
        if recorded in DECISIONS_BY_KEY
        else ("Checklist saved" if recorded == "checklist" else None),
    )
    return Response(html, mimetype="text/html")


@bp.get("/")
def overview() -> Response:
    return _render(None)


@bp.get("/trials/<trial_id>")
def trial(trial_id: str) -> Response:
    if trial_id not in {t.id for t in service().screener.trials}:
        _session()  # no session: say so first
        return error_page(404, "No such trial", f"{trial_id[:20]!r} is not a trial this service screens.")
    return _render(trial_id)


def _check_csrf(session: WorksheetSession) -> None:
    sent = request.form.get("csrf_token", "")
    if not hmac.compare_digest(sent.encode("utf-8", "replace"), session.csrf.encode("ascii")):
        raise _CsrfProblem()


class _CsrfProblem(Exception):
    pass


@bp.errorhandler(_CsrfProblem)
def csrf_problem(exc: _CsrfProblem) -> Response:
    log.warning("worksheet post refused: CSRF token missing or wrong")
    return error_page(
        403,
        "This form cannot be accepted",
        "It did not come from this worksheet session (its security token is missing or wrong). "
        "Nothing was recorded. Reload the worksheet and try again.",
    )


@bp.post("/trials/<trial_id>/record")
def record(trial_id: str) -> Response:
    session = _session()
    _check_csrf(session)
    _known_trial(trial_id)
    key = request.form.get("decision", "checklist")
    decision = DECISIONS_BY_KEY.get(key)
    if decision is None and key != "checklist":
        raise FormProblem("That decision is not one the worksheet knows.")
    reason = " ".join(request.form.get("reason", "").split())[:MAX_REASON_CHARS]
    if "\x00" in reason:
        raise FormProblem("The reason holds a character that cannot be stored.")
    if decision is not None and decision.needs_reason and not reason:
        raise FormProblem(f"“{decision.label}” needs a reason.")
    results, _ = _screen(session)
    result = next(r for r in results if r.trial.id == trial_id)
    if not result.shows_card:
        raise FormProblem(
            f"The patient is not a candidate for {result.trial.short_name} now ({result.status})."
        )
    checklist_ids = {r.criterion.id for r in result.to_confirm}
    confirmed = request.form.getlist("confirmed")
    if any(item not in checklist_ids for item in confirmed):
        raise FormProblem("The checklist holds an item this trial does not have for the patient.")
    now = time.time()
    card_uuid = str(uuid.uuid4())
    entry = IssuedCard(
        card_uuid=card_uuid,
        patient_id=session.patient_id,
        trial_id=trial_id,
        hook_instance="worksheet",
        issued_at=now,
        status=result.status,
        criteria_unmet=[r.criterion.id for r in result.blocking],
        criteria_unknown=[r.criterion.id for r in result.unknown],
        criteria_to_confirm=sorted(checklist_ids),
        source=SOURCE_WORKSHEET,
        recorded_by=session.user,
        checklist_confirmed=sorted(set(confirmed)),
        # The rules the worksheet showed, as on a card's row (an auditor knows which decided).
        trial_version=result.trial.version,
        mappings_version=service().screener.knowledge.version,
    )
    feedback = None
    if decision is not None:
        feedback = Feedback(
            card_uuid=card_uuid,
            outcome=decision.outcome,
            outcome_timestamp=now,
            received_at=now,
            reason_code=decision.reason_code,
            reason_display=decision.reason_display,
            user_comment=reason or None,
        )
    service().store.record_worksheet_entry(entry, feedback)
    if feedback is not None:
        service().metrics.feedback(feedback.outcome, True)
    log.info(
        "worksheet record",
        extra={"fields": {"trial": trial_id, "decision": key, "checklist": len(entry.checklist_confirmed)}},
    )
    return redirect(url_for(".trial", trial_id=trial_id, recorded=key), 303)


@bp.post("/end")
def end() -> Response:
    ws = worksheet()
    session = _session()
    _check_csrf(session)
    ws.sessions.end(request.cookies.get(ws.cookies.session))
    log.info("worksheet session ended by the user")
    response = error_page(
        200, "Session ended", "Your worksheet session has ended and its access to the chart is gone."
    )
    response.delete_cookie(ws.cookies.session, **_cookie_scope())
    return response
