"""[speed] The fetch path's client: what it costs around the server's answers (issue 17).

The searches of one hook go out with the longest first; connections are kept for every request the
pool can make at once; the environment (proxies, CA bundle) is read once, as requests reads it, and
~/.netrc never. Against the misbehaving local server (``fault_server``), which records every request.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from cds_service.base.config import DEFAULTS, load_settings
from cds_service.patient_data import fhir_client
from cds_service.patient_data.fhir_client import FhirClient
from cds_service.patient_data.gather import gather
from cds_service.patient_data.hook_request import parse_hook_request
from cds_service.screening import Screener
from tests.conftest import at_once
from tests.fault_server import FaultServer

TOKEN = "tok-SECRET-fetch-path"


def _client(**overrides: Any) -> FhirClient:
    settings = copy.deepcopy(DEFAULTS["fhir"])
    settings["allow_http"] = True
    settings.update(overrides)
    return FhirClient(settings)


@pytest.fixture(scope="module")
def screener() -> Screener:
    """The shipped trials' screener: its prefetch plan is the hook's searches."""
    return Screener(load_settings(environ={}))


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No proxy variables from the machine running the tests (each test sets its own)."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    yield monkeypatch


def test_a_hook_sends_its_longest_searches_first(fault_server: FaultServer, screener: Screener) -> None:
    """With one pool thread the server sees the searches in the order they were handed to the pool:
    the look-back-window searches (every Observation and administration of 72 h) first, then the
    other paged search, then the Patient and the single-page "latest" searches. The resources come
    back under the plan's keys, in the plan's order, whatever the sending order."""
    fhir = {**DEFAULTS["fhir"], "allow_http": True}
    body = {
        "hook": "patient-view",
        "hookInstance": "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0",
        "context": {"userId": "Practitioner/icu-doc-1", "patientId": "pt-order"},
        "fhirServer": fault_server.base_url,
    }
    request = parse_hook_request(body, "patient-view")
    with _client(max_workers=1) as client:
        data = gather(request, screener.plan, client, fhir, time.time(), time.monotonic() + 10)
    sent = [r.path.rsplit("/", 1)[-1] for r in fault_server.requests]
    windowed = [q for q in screener.plan.queries if q.date_param]
    assert len(windowed) == 2 and sent[:2] == [q.resource_type for q in windowed], sent
    assert sent[2] == "Condition", sent
    assert sorted(sent[3:]) == sorted(
        q.resource_type for q in screener.plan.queries if q.single_page or q.resource_type == "Patient"
    ), sent
    assert all("date=ge" in r.query or "effective-time=ge" in r.query for r in fault_server.requests[:2])
    plan_keys = [q.key for q in screener.plan.queries if q.key != "patient"]
    assert list(data.resources) == plan_keys
    assert sorted(data.fetched) == sorted(q.key for q in screener.plan.queries)


class _Meeting(ThreadingHTTPServer):
    """Answers (an empty searchset) only once ``expected`` requests are waiting at the same time;
    when they never are, each answers 503 after a few seconds: requests sent one after another
    cannot pass."""

    daemon_threads = True

    def __init__(self, expected: int) -> None:
        self.barrier = threading.Barrier(expected, timeout=5)
        self.paths: list[str] = []
        super().__init__(("127.0.0.1", 0), _MeetingHandler)
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}/fhir"


class _MeetingHandler(BaseHTTPRequestHandler):
    server: _Meeting
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        try:
            self.server.barrier.wait()
            status, body = 200, {"resourceType": "Bundle", "type": "searchset", "entry": []}
        except threading.BrokenBarrierError:
            status, body = 503, {"resourceType": "OperationOutcome", "issue": []}
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_prefetch_next_pages_are_read_alongside_the_searches(screener: Screener) -> None:
    """Prefetch Bundles with a next link (two keys) and five keys to fetch: the seven requests are
    in flight together (the server answers none until all seven wait), not the searches first and
    then each Bundle's next pages one key after the other."""
    server = _Meeting(expected=7)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        observation = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {}}

        def first_page(kind: str, resources: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "resourceType": "Bundle",
                "type": "searchset",
                "link": [{"relation": "next", "url": f"{server.base_url}/{kind}?patient=pt-paged&page=2"}],
                "entry": [{"resource": resource} for resource in resources],
            }

        body = {
            "hook": "patient-view",
            "hookInstance": "1f2e3d4c-5b6a-4978-8675-a4b3c2d1e0f9",
            "context": {"userId": "Practitioner/icu-doc-1", "patientId": "pt-paged"},
            "fhirServer": server.base_url,
            "prefetch": {
                "observations": first_page("Observation", [observation]),
                "medicationAdministrations": first_page("MedicationAdministration", []),
            },
        }
        request = parse_hook_request(body, "patient-view")
        fhir = {**DEFAULTS["fhir"], "allow_http": True}
        with _client() as client:
            data = gather(request, screener.plan, client, fhir, time.time(), time.monotonic() + 10)
    finally:
        server.shutdown()
        server.server_close()
    assert len(server.paths) == 7
    assert sum("page=2" in path for path in server.paths) == 2
    assert data.resources["observations"] == [observation]
    assert data.resources["medicationAdministrations"] == []
    assert sorted(data.fetched) == sorted(q.key for q in screener.plan.queries)


def test_concurrent_hooks_keep_their_connections(
    fault_server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    """8 hooks × 2 searches at once need 16 connections; the next 8 hooks reuse them all. (With
    requests' default of 10 kept per host, 6 were closed after each use and opened again.)"""
    fault_server.slow(None, 0.3)  # every search is still running when the last one is sent
    queries = {"o": "Observation?patient=p", "c": "Condition?patient=p"}
    client = FhirClient({**DEFAULTS["fhir"], "allow_http": True, "max_workers": 2}, concurrent_hooks=8)

    def hooks() -> list[BaseException]:
        return at_once(lambda: client.search_many(fault_server.base_url, None, queries, _in(10)), 8)[1]

    try:
        with caplog.at_level(logging.DEBUG, logger="urllib3.connectionpool"):
            assert hooks() == []
            opened = [r for r in caplog.records if "Starting new HTTP connection" in r.getMessage()]
            assert len(opened) == 16
            caplog.clear()
            assert hooks() == []
            reopened = [r for r in caplog.records if "Starting new HTTP connection" in r.getMessage()]
            discarded = [r for r in caplog.records if "pool is full" in r.getMessage()]
    finally:
        client.close()
    assert (reopened, discarded) == ([], [])
    assert len(fault_server.requests) == 32


def test_the_proxy_of_the_environment_is_used_and_no_proxy_is_honoured(
    fault_server: FaultServer, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY / NO_PROXY mean what they mean to requests, read once when the client starts."""
    with FaultServer() as proxy:
        clean_proxy_env.setenv("HTTP_PROXY", proxy.origin)
        with _client() as client:
            result = client.search_many(fault_server.base_url, TOKEN, {"o": "Observation?patient=p"}, _in(5))
        assert result == {"o": []}
        assert fault_server.requests == [] and [r.path for r in proxy.requests] == ["/fhir/Observation"]

        host = fault_server.base_url.split("//", 1)[1].split(":", 1)[0]
        clean_proxy_env.setenv("NO_PROXY", host)
        with _client() as client:
            client.search_many(fault_server.base_url, TOKEN, {"o": "Observation?patient=p"}, _in(5))
            clean_proxy_env.delenv("NO_PROXY")  # read at start: a later change does not apply
            client.search_many(fault_server.base_url, TOKEN, {"o": "Observation?patient=p"}, _in(5))
        assert len(proxy.requests) == 1 and len(fault_server.requests) == 2


def test_netrc_credentials_are_never_sent(
    fault_server: FaultServer, clean_proxy_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A ~/.netrc entry for the FHIR server's host must not add Basic credentials to a hook's
    requests: the server is one the hook names; only the hook's own token may go to it."""
    host = fault_server.base_url.split("//", 1)[1].split(":", 1)[0]
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {host} login service-account password file-secret\n", encoding="utf-8")
    netrc.chmod(0o600)
    clean_proxy_env.setenv("NETRC", str(netrc))
    with _client() as client:
        client.search_many(fault_server.base_url, None, {"o": "Observation?patient=p"}, _in(5))
        client.search_many(fault_server.base_url, TOKEN, {"o": "Observation?patient=p"}, _in(5))
    assert [r.header("Authorization") for r in fault_server.requests] == [None, f"Bearer {TOKEN}"]


def test_each_request_is_the_one_requests_would_send(
    fault_server: FaultServer, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    """The client sends a copy of a GET prepared once (issue 17): the server must see what
    ``requests.Session.get`` sends (request target requoted the same way, the same headers), for
    the first page of a search and for a next link with characters that need quoting. A next link
    carrying user:password gets the hook's token, not Basic credentials of the server's choosing."""
    next_page = "/fhir/next-page?_getpages=a|b c~&_page=%7e2&t=2026-11-18T00:00:00+01:00"
    fault_server.bundle("/fhir/Observation", [], next_url=fault_server.origin + next_page)
    fault_server.bundle("/fhir/next-page", [{"resourceType": "Observation", "id": "o1"}])
    search = "Observation?patient=p-1&code=http:%2F%2Floinc.org|2524-7,http:%2F%2Floinc.org|32693-4"
    with _client() as client:
        result = client.search_many(fault_server.base_url, TOKEN, {"o": search}, _in(5))
    assert [r["id"] for r in result["o"]] == ["o1"]
    ours = fault_server.requests
    fault_server.reset()
    fault_server.bundle("/fhir/Observation", [], next_url=fault_server.origin + next_page)
    fault_server.bundle("/fhir/next-page", [{"resourceType": "Observation", "id": "o1"}])
    with requests.Session() as session:
        session.trust_env = False
        session.headers["User-Agent"] = fhir_client._USER_AGENT
        headers = {"Accept": "application/fhir+json", "Authorization": f"Bearer {TOKEN}"}
        for url in (f"{fault_server.base_url}/{search}", fault_server.origin + next_page):
            session.get(url, headers=headers, allow_redirects=False).close()
    theirs = fault_server.requests
    assert len(ours) == 2 and ours == theirs
    assert "%7C" in ours[0].query and "b%20c~" in ours[1].query  # requoted, as requests does

    fault_server.reset()
    credentials_link = fault_server.origin.replace("//", "//someone:secret@") + "/fhir/next-page"
    fault_server.bundle("/fhir/Observation", [], next_url=credentials_link)
    fault_server.bundle("/fhir/next-page", [])
    with _client() as client:
        client.search_many(fault_server.base_url, TOKEN, {"o": "Observation?patient=p-1"}, _in(5))
    assert [r.header("Authorization") for r in fault_server.requests] == [f"Bearer {TOKEN}"] * 2


def test_the_ca_bundle_of_the_environment_is_used(
    clean_proxy_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """REQUESTS_CA_BUNDLE (else CURL_CA_BUNDLE) verifies the EHR's TLS certificate, as with requests."""
    bundle = tmp_path / "hospital-ca.pem"
    clean_proxy_env.delenv("REQUESTS_CA_BUNDLE", raising=False)
    clean_proxy_env.setenv("CURL_CA_BUNDLE", str(bundle))
    with _client() as client:
        assert client._pool()[0].verify == str(bundle)
    clean_proxy_env.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "other.pem"))
    with _client() as client:
        assert client._pool()[0].verify == str(tmp_path / "other.pem")
    clean_proxy_env.delenv("REQUESTS_CA_BUNDLE")
    clean_proxy_env.delenv("CURL_CA_BUNDLE")
    with _client() as client:
        assert client._pool()[0].verify is True


def _in(seconds: float) -> float:
    return time.monotonic() + seconds


class _ClosesKeptConnections:
    """A FHIR server whose keep-alive timeout always ends just as the client reuses a connection:
    it answers the first request on each connection (an empty searchset, keep-alive) and closes the
    connection, unanswered, when a second request arrives on it. ``answer_none``: close every
    connection at its first request (a server that never answers)."""

    def __init__(self, answer_none: bool = False) -> None:
        import socket

        self.answer_none = answer_none
        self._counting = threading.Lock()  # the counts are read by the test as soon as it is answered
        self.connections = 0
        self.requests = 0
        self.answered = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/fhir"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with self._counting:
                self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: Any) -> None:
        body = json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": []}).encode()
        with connection:
            pending = b""
            for index in range(2):
                while b"\r\n\r\n" not in pending:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    pending += chunk
                pending = pending.split(b"\r\n\r\n", 1)[1]
                with self._counting:
                    self.requests += 1
                    answering = index == 0 and not self.answer_none
                    if answering:  # counted before the client can see the answer
                        self.answered += 1
                if not answering:
                    return  # closed, unanswered
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
                    b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n%s" % (len(body), body)
                )

    def close(self) -> None:
        self._listener.close()


def test_a_kept_alive_connection_closed_by_the_server_is_replaced_not_a_failed_hook() -> None:
    """A server may close a kept-alive connection (its idle timeout: uvicorn 5 s, nginx 75 s) just as
    a hook's search goes out on it. The search is sent once more on a new connection, within the
    deadline, instead of failing the hook with "connection failed" (a 412 for that chart-open)."""
    server = _ClosesKeptConnections()
    try:
        with _client() as client:
            for _ in range(3):
                result = client.search_many(server.base_url, None, {"o": "Observation?patient=p"}, _in(5))
                assert result == {"o": []}
    finally:
        server.close()
    # Each later search met a closed connection, then went out again on a new one.
    assert (server.connections, server.requests, server.answered) == (3, 5, 3)


def test_a_server_that_closes_every_connection_unanswered_fails_after_one_more_attempt() -> None:
    """Sending again is bounded: one more attempt, then "connection failed" (a 412), in time."""
    from cds_service.patient_data.fhir_client import DataUnavailable

    server = _ClosesKeptConnections(answer_none=True)
    started = time.monotonic()
    try:
        with _client() as client, pytest.raises(DataUnavailable, match="connection failed"):
            client.search_many(server.base_url, None, {"o": "Observation?patient=p"}, _in(5))
    finally:
        server.close()
    assert time.monotonic() - started < 2
    assert (server.connections, server.requests, server.answered) == (2, 2, 0)
