"""``cds-service serve`` for real (gunicorn gthread, 2 workers): what a misbehaving client or FHIR
server meets when it talks to the service directly, with no proxy in front.

* slow-header clients do not stop ``/health`` and cause no worker timeout;
* hooks waiting on a FHIR server that never answers get 412 while ``/health`` is answered;
* a chunked body over the limit gets 413, a 12 KB ``Authorization`` header the service's own JSON
  401, a header over gunicorn's limit a JSON 431;
* gunicorn's own log lines are JSON, and no control socket is created;
* no feedback is lost when a worker is killed mid-load (SQLite and PostgreSQL).

Timing figures (how fast, under which load) come from ``make probe``; the bounds here are generous.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from cds_service.store import open_store
from cds_service.tools.topology import ServiceInstance
from tests.conftest import SERVICE_URL

ISSUER = "https://ehr.serving.test"
FEEDBACK_URL = f"{SERVICE_URL}/feedback"


@pytest.fixture(scope="module")
def open_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceInstance]:
    workdir = tmp_path_factory.mktemp("serve-open")
    env = {
        "CDS_STORE_URL": f"sqlite:///{workdir / 'store.sqlite3'}",
        "CDS_FHIR_ALLOW_HTTP": "true",
        "CDS_SERVER_MAX_BODY_BYTES": str(256 * 1024),
        "CDS_FHIR_DEADLINE_SECONDS": "1.5",
        "CDS_LOGGING_LEVEL": "INFO",
        "HOME": str(workdir),  # where gunicorn would put its control socket by default
        "XDG_RUNTIME_DIR": "",
    }
    with ServiceInstance(workdir, env, name="open", workers=2) as instance:
        yield instance


@pytest.fixture(scope="module")
def jwt_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceInstance]:
    workdir = tmp_path_factory.mktemp("serve-jwt")
    key = ec.generate_private_key(ec.SECP384R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    (workdir / "jwks.json").write_text(json.dumps({"keys": [{**public, "kid": "k1", "use": "sig"}]}))
    env = {
        "CDS_STORE_URL": f"sqlite:///{workdir / 'store.sqlite3'}",
        "CDS_SERVER_PUBLIC_URL": "https://cds.example.org",
        "CDS_SECURITY_TRUSTED_CLIENTS": json.dumps({ISSUER: {"jwks_file": str(workdir / "jwks.json")}}),
    }
    with ServiceInstance(workdir, env, name="jwt", workers=2) as instance:
        yield instance


def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes, return what comes back (the connection is closed by the server or at timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        received = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            if b"content-length:" in head.lower():
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                )
                if len(body) >= length:
                    break
    return received


def status_and_json(response: bytes) -> tuple[int, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), orjson.loads(body)


# -- slow clients, hanging FHIR servers -------------------------------------------------------------------


def test_slow_header_clients_do_not_stop_health(open_instance: ServiceInstance) -> None:
    slow: list[socket.socket] = []
    try:
        for _ in range(4):
            conn = socket.create_connection(("127.0.0.1", open_instance.port))
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(conn)
        for _ in range(4):
            for conn in slow:
                conn.sendall(b"a")
            response = requests.get(open_instance.base_url + "/health", timeout=3)
            assert response.status_code == 200
            time.sleep(0.5)
    finally:
        for conn in slow:
            conn.close()
    assert "WORKER TIMEOUT" not in open_instance.log()


def test_hooks_waiting_on_a_hanging_fhir_server_do_not_block_health(open_instance: ServiceInstance) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # accepts connections (the kernel does), never answers
    statuses: list[int] = []

    def hook() -> None:
        body = {
            "hook": "patient-view",
            "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/1", "patientId": "p1"},
            "fhirServer": f"http://127.0.0.1:{listener.getsockname()[1]}/fhir",
        }
        statuses.append(
            requests.post(open_instance.base_url + SERVICE_URL, json=body, timeout=30).status_code
        )

    try:
        callers = [threading.Thread(target=hook) for _ in range(8)]
        for caller in callers:
            caller.start()
        time.sleep(0.3)
        for _ in range(3):
            assert requests.get(open_instance.base_url + "/health", timeout=2).status_code == 200
        for caller in callers:
            caller.join(timeout=30)
    finally:
        listener.close()
    assert statuses == [412] * 8


# -- limits ---------------------------------------------------------------------------------------------


def test_a_chunked_body_over_the_limit_gets_413(open_instance: ServiceInstance) -> None:
    piece = b"x" * 16384
    chunks = (
        b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(32)) + b"0\r\n\r\n"
    )  # 512 KiB > 256
    request = (
        f"POST {SERVICE_URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    status, body = status_and_json(raw_request(open_instance.port, request + chunks))
    assert status == 413 and body["resourceType"] == "OperationOutcome"
    assert "over the limit" in body["issue"][0]["diagnostics"]


def test_a_header_over_gunicorns_limit_gets_json(open_instance: ServiceInstance) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
    status, body = status_and_json(raw_request(open_instance.port, request))
    assert status == 431 and body["resourceType"] == "OperationOutcome"


def test_a_12_kb_authorization_header_gets_the_services_own_401(jwt_instance: ServiceInstance) -> None:
    response = requests.post(
        jwt_instance.base_url + SERVICE_URL,
        json={},
        headers={"Authorization": "Bearer " + "a" * 12 * 1024},
        timeout=10,
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["issue"][0]["diagnostics"] == "unauthorized"


# -- logs and the control socket -----------------------------------------------------------------------


def test_gunicorns_log_lines_are_json_and_no_control_socket_is_made(open_instance: ServiceInstance) -> None:
    lines = [line for line in open_instance.log().splitlines() if line.startswith("{")]
    gunicorn = [json.loads(line) for line in lines if '"gunicorn.error"' in line]
    assert any("Using worker: gthread" in entry["message"] for entry in gunicorn)
    other = [line for line in open_instance.log().splitlines() if line and not line.startswith("{")]
    assert all(line.startswith("cds-service: serving on") for line in other), other
    assert not (open_instance.workdir / ".gunicorn").exists()


# -- a worker killed mid-load loses no feedback ------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def feedback_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite3'}"
    return str(request.getfixturevalue("pg_fresh_url"))


def test_no_feedback_is_lost_when_a_worker_is_killed_mid_load(tmp_path: Path, feedback_store: str) -> None:
    """Clients retry what failed (as CDS clients do); a 200 means stored, and a message is stored whole."""
    env = {"CDS_STORE_URL": feedback_store}
    messages = 300
    base = datetime.now(UTC) - timedelta(hours=1)
    cards = [str(uuid.uuid4()) for _ in range(20)]
    bodies = [
        {
            "feedback": [
                {
                    "card": cards[i % len(cards)],
                    "outcome": "overridden",
                    "overrideReason": {"userComment": f"message {i} item {item}"},
                    "outcomeTimestamp": (base + timedelta(milliseconds=2 * i + item)).isoformat(),
                }
                for item in range(2)
            ]
        }
        for i in range(messages)
    ]
    retried = [0]
    with ServiceInstance(tmp_path, env, name="killed", workers=2, threads=4) as instance:

        def post_all(part: list[dict[str, Any]]) -> None:
            with requests.Session() as session:
                for body in part:
                    for _attempt in range(20):
                        try:
                            response = session.post(instance.base_url + FEEDBACK_URL, json=body, timeout=30)
                            if response.status_code == 200:
                                break
                        except requests.RequestException:
                            session.close()
                        retried[0] += 1
                        time.sleep(0.05)
                    else:
                        raise AssertionError("a feedback message was never accepted")

        clients = [threading.Thread(target=post_all, args=(bodies[k::4],)) for k in range(4)]
        for client in clients:
            client.start()
        time.sleep(0.5)
        victim = instance.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        for client in clients:
            client.join(timeout=180)
        assert victim not in instance.worker_pids()  # gunicorn started a new worker in its place
    with open_store(feedback_store) as store:
        stored = [f for card in cards for f in store.feedback_for_card(card)]
    assert len(stored) == 2 * messages
    assert {f.user_comment for f in stored} == {
        f"message {i} item {item}" for i in range(messages) for item in range(2)
    }


def test_hook_requests_validated_on_many_threads_at_once_get_their_own_answer() -> None:
    """gthread workers validate on many threads at once: each request gets its own verdict and its own
    error fields (cerberus validators keep per-call state, so a shared one would mix them up)."""
    from cds_service.base.errors import HookError
    from cds_service.patient_data.hook_request import parse_hook_request

    bad_fields = ["hookInstance", "context.patientId", "context.userId", "fhirServer"]
    barrier = threading.Barrier(8)
    mistakes: list[str] = []

    def validate(thread_no: int) -> None:
        barrier.wait()
        for round_no in range(40):
            body: dict[str, Any] = {
                "hook": "patient-view",
                "hookInstance": str(uuid.uuid4()),
                "context": {"userId": "Practitioner/1", "patientId": f"p{thread_no}"},
            }
            field = bad_fields[(thread_no + round_no) % len(bad_fields)] if round_no % 2 else None
            if field == "hookInstance":
                body["hookInstance"] = "not-a-uuid"
            elif field == "fhirServer":
                body["fhirServer"] = 42
            elif field is not None:
                body["context"][field.split(".")[1]] = 7
            try:
                parse_hook_request(body, "patient-view")
                if field is not None:
                    mistakes.append(f"{field} accepted")
            except HookError as exc:
                if field is None or exc.expression != [field]:
                    mistakes.append(f"expected {field}, got {exc.expression}")

    threads = [threading.Thread(target=validate, args=(n,)) for n in range(8)]
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a loaded worker does, so that races show
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        sys.setswitchinterval(switch_interval)
    assert mistakes == []


def test_the_default_worker_model_uses_every_core_with_threads_for_waiting(tmp_path: Path) -> None:
    """What ``cds-service serve`` runs with its defaults: a gthread worker per core (the screening is
    CPU-bound), 16 threads each (for FHIR waits, slow clients and /health), the app loaded before the
    fork, header lines long enough for the service's own Authorization check, no control socket."""
    from cds_service.protocol.auth import MAX_AUTHORIZATION_CHARS
    from cds_service.serving import gunicorn_options
    from tests.conftest import make_settings

    options = gunicorn_options(make_settings(tmp_path))
    assert options["worker_class"] == "gthread"
    assert options["workers"] == (os.cpu_count() or 1)
    assert options["threads"] == 16
    assert options["preload_app"] is True
    assert options["limit_request_field_size"] > len("Authorization: Bearer ") + MAX_AUTHORIZATION_CHARS
    assert options["control_socket_disable"] is True
    assert options["bind"] == "127.0.0.1:8080"


def _minor_faults(pids: list[int]) -> int:
    """Minor page faults the processes took so far (``/proc/<pid>/stat``, field 10)."""
    return sum(int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7]) for pid in pids)


def test_a_worker_keeps_the_memory_a_hook_frees_for_the_next_hook(tmp_path: Path) -> None:
    """A hook at 1 000 Observations decodes, reads and frees a few MB. A worker that gave that back
    to the kernel after each hook took ~580 page faults (and ~2 ms of kernel time) per hook to get
    it again; with ``serving.keep_freed_memory`` the same hooks take almost none."""
    from cds_service.screening import Screener
    from cds_service.tools import bench
    from tests.conftest import make_settings

    queries = Screener(make_settings(tmp_path)).plan.queries
    body = bench.make_patient(1000, queries, "faults", administrations=300, single_drug=True).body
    env = {"CDS_STORE_URL": f"sqlite:///{tmp_path / 'store.sqlite3'}", "HOME": str(tmp_path)}
    with ServiceInstance(tmp_path, env, name="faults", workers=1) as instance, requests.Session() as session:

        def hook() -> None:
            response = session.post(
                f"{instance.base_url}{SERVICE_URL}",
                data=bench.with_new_instance(body),
                headers={"Content-Type": "application/json"},
                timeout=30,
            )
            assert response.status_code == 200, response.text[:300]

        for _ in range(5):  # the first hooks grow the heap to what a hook needs
            hook()
        workers = instance.worker_pids()
        before = _minor_faults(workers)
        hooks = 20
        for _ in range(hooks):
            hook()
        per_hook = (_minor_faults(workers) - before) / hooks
    assert per_hook < 60, f"{per_hook:.0f} page faults per hook"
