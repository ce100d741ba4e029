"""The Flask application factory."""

from __future__ import annotations

import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from .base.config import Settings, load_settings, startup_warnings
from .base.errors import outcome_response
from .base.logs import configure_logging
from .base.metrics import Metrics
from .protocol.api import bp
from .screening import Screener
from .service import ServiceState

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None, *, screener: Screener | None = None, metrics: Metrics | None = None
) -> Flask:
    """Build the app. Knowledge files are loaded and validated here: a bad file stops start-up."""
    settings = settings or load_settings()
    configure_logging(settings.section("logging")["level"])
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.section("server")["max_body_bytes"]
    app.json.sort_keys = False  # type: ignore[attr-defined]
    state = ServiceState(settings, screener, metrics)
    app.extensions["cds"] = state
    app.register_blueprint(bp)
    worksheet_on = bool(settings.section("worksheet")["enabled"])
    if worksheet_on:
        from .worksheet import views as worksheet_views

        worksheet_views.init_app(app, state)

    @app.get("/metrics")
    def metrics_route() -> Response:
        body, content_type = state.metrics.exposition()
        return Response(body, content_type=content_type)  # with its format version, as Prometheus wants

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 400
        if worksheet_on and request.path.startswith("/worksheet"):
            return worksheet_views.http_error_page(exc)  # a person's browser: a page, not JSON
        return outcome_response(status, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:  # pragma: no cover - the hypothesis test hunts for these
        log.exception("unexpected error (%s)", type(exc).__name__)
        return outcome_response(500, "internal error: the screening could not be completed")

    for warning in startup_warnings(settings):
        log.warning(warning)
    if state.verifier is None:
        log.warning(
            "RUNNING OPEN: no trusted CDS clients configured (security.trusted_clients); "
            "any caller can invoke the hook. Use only for local work and sandboxes."
        )
    return app
