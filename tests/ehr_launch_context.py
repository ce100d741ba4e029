"""A stand-in for an EHR's SMART launch-context service, in front of the SMART launcher (tests only).

The CDS Hooks sandbox opens a card's ``smart`` link only after asking its FHIR server for a launch
context: ``POST <fhirServer>/_services/smart/Launch`` with ``{launchUrl, parameters: {patient,
appContext, …}}``, expecting ``{"launch_id": …}`` (the HSPC/Logica sandbox API). An EHR does the
same inside itself: it records the context, hands the app an opaque ``launch``, and returns the
context — ``appContext`` included (CDS Hooks 2.0) — in the token answer. The SMART Health IT
launcher has neither piece, so this proxy adds them and passes everything else through:

- ``POST …/_services/smart/Launch`` answers a ``launch_id`` that *is* a launcher launch code for the
  patient (and a fixed practitioner), and remembers the request's ``appContext`` under it;
- the authorization request carrying that ``launch`` is passed on, and the code the launcher issues
  (in its redirect) is tied to the launch;
- the token answer for that code gets the launch's ``appContext`` added.

Everything is forwarded with ``X-Forwarded-Host`` so the launcher names the proxy in its discovery
document, redirects, id_token ``iss`` and FHIR links: to the app and the sandbox, the proxy is the
EHR. It is not a product and not a security boundary; see docs/worksheet.md ("The CDS Hooks
sandbox's SMART links").
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from tests.smart_launcher import SmartLauncher, launch_code

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-encoding",
    "content-length",
    "upgrade",
    "host",
}
LAUNCH_PATH = "/_services/smart/Launch"


class LaunchContextProxy:
    """The launcher behind an EHR-like launch-context service, on a free 127.0.0.1 port."""

    def __init__(self, launcher: SmartLauncher, provider: str) -> None:
        self.launcher = launcher
        self.provider = provider
        self.lock = threading.Lock()
        #: launch_id → the appContext the sandbox asked for (None when it sent none)
        self.launches: dict[str, str | None] = {}
        #: authorization code → launch_id
        self.codes: dict[str, str] = {}
        #: every launch-context request received (what the sandbox sent)
        self.requests: list[dict[str, Any]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="launch-context", daemon=True)
        self._thread.start()
        self._session = requests.Session()

    @property
    def fhir_url(self) -> str:
        return f"{self.origin}/v/r4/fhir"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._session.close()

    # -- the pieces the launcher lacks -------------------------------------------------------------

    def new_launch(self, body: dict[str, Any]) -> str:
        parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
        patient = str(parameters.get("patient", ""))
        app_context = parameters.get("appContext")
        launch_id = launch_code(patient, self.provider)
        with self.lock:
            self.requests.append(body)
            self.launches[launch_id] = app_context if isinstance(app_context, str) else None
        return launch_id

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> requests.Response:
        sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
        sent["X-Forwarded-Host"] = self.origin.removeprefix("http://")
        sent["X-Forwarded-Proto"] = "http"
        url = self.launcher.url + path
        return self._session.request(
            method, url, headers=sent, data=body or None, allow_redirects=False, timeout=30
        )

    def after(self, method: str, path: str, body: bytes, response: requests.Response) -> bytes:
        """Tie an issued code to its launch; add the launch's appContext to the token answer."""
        parts = urlsplit(path)
        if method == "GET" and parts.path.endswith("/auth/authorize") and response.is_redirect:
            launch = parse_qs(parts.query).get("launch", [""])[0]
            code = parse_qs(urlsplit(response.headers["Location"]).query).get("code", [""])[0]
            if launch and code:
                with self.lock:
                    self.codes[code] = launch
        if method == "POST" and parts.path.endswith("/auth/token") and response.status_code == 200:
            code = parse_qs(body.decode("utf-8", "replace")).get("code", [""])[0]
            with self.lock:
                app_context = self.launches.get(self.codes.get(code, ""))
            if app_context is not None:
                answer = response.json()
                answer["appContext"] = app_context
                return json.dumps(answer).encode()
        return response.content


def _handler(proxy: LaunchContextProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _cors(self) -> None:
            self.send_header("Access-Control-Allow-Origin", self.headers.get("Origin") or "*")
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
            self.send_header("Vary", "Origin")

        def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if urlsplit(self.path).path.endswith(LAUNCH_PATH):
                if self.command == "OPTIONS":
                    self.send_response(204)
                    self._cors()
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                try:
                    request = json.loads(body or b"{}")
                except ValueError:
                    request = {}
                launch_id = proxy.new_launch(request if isinstance(request, dict) else {})
                self.send_response(200)
                self._cors()
                payload = json.dumps({"launch_id": launch_id}).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            response = proxy.forward(self.command, self.path, dict(self.headers.items()), body)
            payload = proxy.after(self.command, self.path, body, response)
            headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
            self._send(response.status_code, headers, payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_HEAD = _handle

    return Handler
