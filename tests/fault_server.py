"""A small local HTTP server that misbehaves on purpose, for fault tests of FHIR and JWKS clients.

Every request is answered by the behaviour programmed for its path (the path without the query),
else by the global default (an empty searchset Bundle unless changed). Every request is recorded
(method, path, query, headers) whatever the behaviour, so any server doubles as a capturing one::

    with FaultServer() as server:                # or the `fault_server` fixture
        server.slow("/fhir/Observation", 2.0)    # answer after 2 s
        server.trickle("Observation", 0.05)      # headers at once, then the body 16 bytes at a time
        server.status("/fhir/Patient/1", 500)
        server.malformed("/fhir/Condition")
        server.loop("/fhir/MedicationAdministration")   # a Bundle whose next link is itself
        server.next_to("/fhir/Observation", "http://other:1/fhir/Observation?page=2")
        server.operation_outcome("/fhir/Observation")
        client_call(server.base_url)
        assert server.requests == [] / server.requests[0].headers.get("Authorization") is None

`refused_port()` / `refused_url()` give an address where nothing listens (connection refused).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

__all__ = [
    "Behaviour",
    "CapturedRequest",
    "FaultServer",
    "fault_server",
    "refused_port",
    "refused_url",
    "searchset",
]

FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True)
class CapturedRequest:
    """One request the server received (header names as sent; look them up case-insensitively)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or None."""
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class Behaviour:
    """What to answer: after ``delay`` seconds, ``status`` with ``body`` (bytes, or JSON-encoded)."""

    status: int = 200
    body: Any = None
    delay: float = 0.0
    content_type: str = FHIR_JSON
    #: When set, the body is a searchset Bundle whose next link is this URL ("{self}" = the request URL).
    next_url: str | None = None
    resources: list[dict[str, Any]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    #: When > 0, the body is sent a few bytes at a time, one piece every ``trickle`` seconds.
    trickle: float = 0.0
    #: When > 0, a Bundle of about this many bytes is streamed with no Content-Length (then closed).
    stream_bytes: int = 0


def searchset(
    resources: list[dict[str, Any]], next_url: str | None = None, self_url: str = ""
) -> dict[str, Any]:
    """A minimal searchset Bundle with the given resources and optional next link."""
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "link": [{"relation": "self", "url": self_url}] if self_url else [],
        "entry": [{"resource": resource, "search": {"mode": "match"}} for resource in resources],
    }
    if next_url:
        bundle["link"].append({"relation": "next", "url": next_url})
    return bundle


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read `requests` instead."""

    def _answer(self) -> None:
        parts = urlsplit(self.path)
        owner = self.server.owner
        owner._record(CapturedRequest(self.command, parts.path, parts.query, dict(self.headers.items())))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        behaviour = owner.behaviour_for(parts.path)
        if behaviour.delay:
            time.sleep(behaviour.delay)
        self_url = f"{owner.origin}{self.path}"
        if behaviour.stream_bytes:
            self._stream(behaviour)
            return
        if isinstance(behaviour.body, bytes):
            payload = behaviour.body
        elif behaviour.body is not None:
            payload = json.dumps(behaviour.body).encode()
        else:
            next_url = behaviour.next_url.replace("{self}", self_url) if behaviour.next_url else None
            payload = json.dumps(searchset(behaviour.resources, next_url, self_url)).encode()
        try:
            self.send_response(behaviour.status)
            self.send_header("Content-Type", behaviour.content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in behaviour.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            if behaviour.trickle > 0:
                for start in range(0, len(payload), 16):
                    self.wfile.write(payload[start : start + 16])
                    self.wfile.flush()
                    time.sleep(behaviour.trickle)
            else:
                self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (deadline): fine
            self.close_connection = True

    def _stream(self, behaviour: Behaviour) -> None:
        """A huge Bundle, generated on the fly and sent without a length (the end is the close)."""
        entry = b'{"resource":{"resourceType":"Observation","id":"x","status":"final"}},'
        piece = entry * (65536 // len(entry))
        self.close_connection = True
        try:
            self.send_response(behaviour.status)
            self.send_header("Content-Type", behaviour.content_type)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b'{"resourceType":"Bundle","type":"searchset","entry":[')
            sent = 0
            while sent < behaviour.stream_bytes:
                self.wfile.write(piece)
                sent += len(piece)
            self.wfile.write(b'{"resource":{"resourceType":"Observation","id":"y"}}]}')
        except (BrokenPipeError, ConnectionResetError):  # the client cut it: expected
            pass

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FaultServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up (deadlines, refused redirects) are expected here: stay quiet about them."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class FaultServer:
    """A threaded HTTP server on 127.0.0.1 (free port) with programmable behaviours per path."""

    def __init__(self, prefix: str = "/fhir") -> None:
        self.prefix = prefix.rstrip("/")
        self._lock = threading.Lock()
        self._rules: dict[str, Behaviour] = {}
        self._default = Behaviour()
        self._requests: list[CapturedRequest] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fault-server",
            daemon=True,
        )
        self._thread.start()

    # -- addresses ------------------------------------------------------------------------------

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The FHIR base URL, e.g. ``http://127.0.0.1:PORT/fhir``."""
        return self.origin + self.prefix

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` relative to the base URL (``"Observation?x=1"``)."""
        return f"{self.base_url}/{path.lstrip('/')}"

    # -- programming ----------------------------------------------------------------------------

    def _path(self, path: str | None) -> str | None:
        if path is None:
            return None
        return path if path.startswith("/") else f"{self.prefix}/{path}"

    def set(self, path: str | None, behaviour: Behaviour) -> None:
        """Answer requests to ``path`` (absolute, or relative to the prefix; None = every path) so."""
        key = self._path(path)
        with self._lock:
            if key is None:
                self._default = behaviour
            else:
                self._rules[key] = behaviour

    def behaviour_for(self, path: str) -> Behaviour:
        with self._lock:
            return self._rules.get(path, self._default)

    def bundle(self, path: str | None, resources: list[dict[str, Any]], next_url: str | None = None) -> None:
        """A searchset Bundle with these resources (and a next link when given)."""
        self.set(path, Behaviour(resources=list(resources), next_url=next_url))

    def json(self, path: str | None, document: Any, status: int = 200) -> None:
        """Any JSON document with any status."""
        self.set(path, Behaviour(status=status, body=document))

    def slow(self, path: str | None, seconds: float, resources: list[dict[str, Any]] | None = None) -> None:
        """A searchset Bundle answered after ``seconds``."""
        self.set(path, Behaviour(delay=seconds, resources=list(resources or [])))

    def status(self, path: str | None, code: int, body: Any = None) -> None:
        """Status ``code`` (500, 401, ...) with an OperationOutcome body unless given."""
        if body is None:
            body = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "exception", "diagnostics": f"HTTP {code}"}],
            }
        self.set(path, Behaviour(status=code, body=body))

    def trickle(
        self, path: str | None, interval: float, resources: list[dict[str, Any]] | None = None
    ) -> None:
        """A searchset Bundle (padded to several kB) sent 16 bytes every ``interval`` seconds."""
        padding = [{"resourceType": "Basic", "id": f"pad{i}", "code": {"text": "x" * 100}} for i in range(40)]
        self.set(path, Behaviour(resources=list(resources or []) + padding, trickle=interval))

    def huge(self, path: str | None, size: int) -> None:
        """A valid searchset Bundle of about ``size`` bytes, streamed with no Content-Length."""
        self.set(path, Behaviour(stream_bytes=size))

    def malformed(self, path: str | None) -> None:
        """200 with a body that is not JSON."""
        self.set(path, Behaviour(body=b'{"resourceType": "Bundle", "entry": [{'))

    def loop(self, path: str | None) -> None:
        """A Bundle whose next link is the very URL requested."""
        self.set(path, Behaviour(resources=[], next_url="{self}"))

    def next_to(self, path: str | None, url: str, resources: list[dict[str, Any]] | None = None) -> None:
        """A Bundle whose next link points at ``url`` (another host, port or path)."""
        self.set(path, Behaviour(resources=list(resources or []), next_url=url))

    def operation_outcome(self, path: str | None, status: int = 200) -> None:
        """An OperationOutcome where a Bundle is expected."""
        body = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "too-costly", "diagnostics": "search too costly"}],
        }
        self.set(path, Behaviour(status=status, body=body))

    def reset(self) -> None:
        """Forget every rule and every recorded request."""
        with self._lock:
            self._rules.clear()
            self._default = Behaviour()
            self._requests.clear()

    # -- capture --------------------------------------------------------------------------------

    def _record(self, request: CapturedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[CapturedRequest]:
        """Every request received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def refused_port() -> int:
    """A 127.0.0.1 port where nothing listens: bound, then closed (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refused_url(prefix: str = "/fhir") -> str:
    """A FHIR base URL on a refused port."""
    return f"http://127.0.0.1:{refused_port()}{prefix}"


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    """A fresh :class:`FaultServer` for one test, closed afterwards."""
    with FaultServer() as server:
        yield server
