"""The framework floor of ``make bench``: a Flask + gunicorn app that only decodes the hook body.

``python -m cds_service.tools.decode_stub --port N`` serves ``POST /cds-services/<id>``: it reads the
body, ``orjson.loads`` it and answers ``{"cards": []}`` — no validation, no screening. The benchmark
runs it beside ``cds-service serve``, with the same gunicorn worker model (worker class, workers,
threads, keep-alive: ``serving.gunicorn_options``), and posts the same bodies to both
in one interleaved run: the hook's time and CPU per request are reported as multiples of the
stub's (issue 17). Loopback only; the benchmark stops it by pid.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson
from flask import Flask, Response, request
from gunicorn.app.base import BaseApplication

EMPTY_ANSWER = orjson.dumps({"cards": []})


def create_stub_app() -> Flask:
    app = Flask("decode_stub")

    @app.post("/cds-services/<service_id>")
    def hook(service_id: str) -> Response:
        decoded = orjson.loads(request.get_data())
        del decoded
        return Response(EMPTY_ANSWER, mimetype="application/json")

    @app.get("/health")
    def health() -> Response:
        return Response(b'{"status":"ok"}', mimetype="application/json")

    return app


class _StubServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self._app = app
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self._app


#: The gunicorn options that make the worker model, as ``serving.gunicorn_options`` sets them.
WORKER_MODEL_KEYS = ("workers", "worker_class", "threads", "keepalive", "timeout", "preload_app")


def worker_model(settings: Any) -> dict[str, Any]:
    """The worker model of ``cds-service serve`` (``serving.gunicorn_options``, which this layer
    cannot import: ``tests/test_bench_smoke.py`` checks that the two agree) and nothing else: no
    logging hooks, no request limits, no metrics."""
    return {
        "workers": settings.workers,
        "worker_class": "gthread",
        "threads": settings.section("server")["threads"],
        "keepalive": 5,
        "timeout": 30,
        "preload_app": True,
    }


def main(argv: list[str] | None = None) -> int:
    from ..base.config import load_settings

    parser = argparse.ArgumentParser(
        prog="python -m cds_service.tools.decode_stub", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    settings = load_settings()  # the same environment as the service it is the floor for
    options = {**worker_model(settings), "bind": f"{args.host}:{args.port}", "accesslog": None}
    print(f"decode stub: {options}", file=sys.stderr)
    _StubServer(create_stub_app(), options).run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
