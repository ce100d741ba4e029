"""``make probe``: how the served service stands up to misbehaving clients and FHIR servers.

Runs every check of issue 16's acceptance against ``cds-service serve`` twice — reached directly,
and behind the documented nginx (TLS, ``docker/nginx/cds-service.conf.template``) — and writes
``probe-results/results.json`` (every figure) and ``probe-results/results.md`` (the summary that
docs/deploy.md records):

* 4 slow-header clients for 10 s: the slowest ``/health`` answer, worker timeouts;
* 8 concurrent hooks against a FHIR server that never answers: each hook's 412 time, the slowest
  ``/health`` meanwhile;
* 2 concurrent hooks whose FHIR answer is 300 MB: their 412 times and the workers' peak memory;
* 300 hooks with made-up resource types in paged prefetch: how much ``/metrics`` grows;
* a chunked body over the limit, a 12 KB ``Authorization`` header;
* the public sandbox's token (signed as its vendored build signs), accepted offline with its key
  pinned; every JWT attack of a fixed list answered 401;
* ≥ 10 000 fuzzed requests (mutated hook and feedback bodies, random JSON and bytes, odd methods
  and headers): how many 5xx;
* feedback posted while a worker is SIGKILLed, on SQLite and on PostgreSQL: how many items lost.

The service runs with JWT checks on (a probe issuer with its key in a file, and the sandbox's key
pinned): the fuzzed requests carry valid tokens, so they reach the validation they are meant to
test. The machine is shared: the results say what else was running (load average).
``--compare-workers`` also runs the slow-client, hanging-FHIR and throughput checks against plain
gunicorn with sync, gthread and (when installed) gevent workers: the measurement behind the choice.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import orjson
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..base.config import DEFAULTS, PROJECT_ROOT, load_settings
from .fhir_server import free_port
from .icu_generator import hook_request, icu_patient
from .pg_server import PostgresServer, PostgresUnavailable, create_database, find_postgres_bin
from .sandbox_client import SandboxBuildError, SandboxSigner
from .topology import Nginx, ServiceInstance, find_nginx

SERVICE_ID = "septic-shock-trial-screening"
HOOK_PATH = f"/cds-services/{SERVICE_ID}"
FEEDBACK_PATH = f"{HOOK_PATH}/feedback"
PROBE_ISSUER = "https://probe.cds-service.test"
DEADLINE = float(DEFAULTS["fhir"]["deadline_seconds"])

#: The acceptance figures (issue 16).
TARGET_HEALTH_SECONDS = 0.5
TARGET_LATE_SECONDS = 1.0
TARGET_PEAK_MB = 400.0
TARGET_METRICS_GROWTH = 20 * 1024
TARGET_FUZZ_REQUESTS = 10_000
#: What HealthPoller.summary reports and the worker-model comparison keeps.
HEALTH_FIGURES = ("health_answers", "health_max_ms", "health_failures")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# -- how the probe reaches the service -------------------------------------------------------------------


@dataclass
class Front:
    """One setup: the URL clients use (direct, or nginx with TLS) and the instance behind it."""

    name: str
    base_url: str
    verify: str | bool
    instance: ServiceInstance
    nginx: Nginx | None
    signer: ProbeSigner

    def session(self) -> requests.Session:
        session = requests.Session()
        session.verify = self.verify
        session.trust_env = False
        return session

    def raw_socket(self, timeout: float = 10) -> socket.socket:
        port = self.nginx.port if self.nginx else self.instance.port
        conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if self.nginx is None:
            return conn
        context = ssl.create_default_context(cafile=str(self.nginx.certificate))
        return context.wrap_socket(conn, server_hostname="localhost")

    def auth(self, path: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.signer.token(self.base_url + path)}"}


class ProbeSigner:
    """The probe's own trusted client: an ES384 key whose public half is in a key file."""

    def __init__(self, folder: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP384R1())
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        self.jwks_path = folder / "probe-jwks.json"
        self.jwks_path.write_text(
            json.dumps({"keys": [{**public, "kid": "probe-1", "use": "sig", "alg": "ES384"}]})
        )

    def token(self, audience: str, **changes: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": PROBE_ISSUER, "aud": audience, "iat": now, "exp": now + 300}
        claims["jti"] = str(uuid.uuid4())
        claims.update(changes)
        headers = {"kid": changes.pop("_kid", "probe-1"), "typ": "JWT"}
        return jwt.encode(
            {k: v for k, v in claims.items() if v is not None}, self.key, "ES384", headers=headers
        )


def _instance_env(
    workdir: Path, public_url: str, store_url: str, signer: ProbeSigner, sandbox: SandboxSigner | None
) -> dict[str, str]:
    clients: dict[str, Any] = {PROBE_ISSUER: {"jwks_file": str(signer.jwks_path)}}
    if sandbox is not None:
        clients[sandbox.issuer] = {"jwks_file": str(sandbox.jwks_path)}
    return {
        "CDS_STORE_URL": store_url,
        "CDS_SERVER_PUBLIC_URL": public_url,
        "CDS_SECURITY_TRUSTED_CLIENTS": json.dumps(clients),
        "CDS_FHIR_ALLOW_HTTP": "true",  # the probe's misbehaving FHIR servers are local
        "CDS_LOGGING_LEVEL": "WARNING",
    }


@contextlib.contextmanager
def setup(
    kind: str, workdir: Path, store_url: str, signer: ProbeSigner, sandbox: SandboxSigner | None
) -> Iterator[Front]:
    """A fresh instance (2 workers whatever the core count, otherwise the defaults), reached directly
    or through nginx."""
    workdir.mkdir(parents=True, exist_ok=True)
    nginx_port = free_port()
    instance_port = free_port()
    public_url = f"https://127.0.0.1:{nginx_port}" if kind == "nginx" else f"http://127.0.0.1:{instance_port}"
    env = _instance_env(workdir, public_url, store_url, signer, sandbox)
    instance = ServiceInstance(workdir, env, name=f"{kind}-{uuid.uuid4().hex[:6]}", port=instance_port)
    instance.start()
    nginx = None
    try:
        if kind == "nginx":
            nginx = Nginx(
                workdir / f"nginx-{uuid.uuid4().hex[:6]}", [f"127.0.0.1:{instance_port}"], port=nginx_port
            )
            nginx.start()
        verify: str | bool = str(nginx.certificate) if nginx else True
        yield Front(kind, public_url, verify, instance, nginx, signer)
    finally:
        if nginx is not None:
            nginx.stop()
        instance.stop()


def _peak_mb(pids: list[int]) -> float:
    peak = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
    return round(peak / 1024, 1)


class HealthPoller:
    """Asks ``/health`` every 100 ms in a thread; records each answer time (failures as 99 s)."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.times: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.front.session() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    ok = session.get(self.front.base_url + "/health", timeout=5).status_code == 200
                except requests.RequestException:
                    ok = False
                self.times.append(time.monotonic() - started if ok else 99.0)
                self.failures += 0 if ok else 1
                self._stop.wait(0.1)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        return {
            "health_answers": len(self.times),
            "health_max_ms": _ms(max(self.times)) if self.times else None,
            "health_median_ms": _ms(statistics.median(self.times)) if self.times else None,
            "health_failures": self.failures,
        }


# -- misbehaving FHIR servers ------------------------------------------------------------------------------


@contextlib.contextmanager
def hanging_server() -> Iterator[str]:
    """A FHIR base URL whose server accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/fhir"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


class _FhirHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    huge_bytes = 0

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        resource_type = self.path.split("/fhir/", 1)[-1].split("?", 1)[0].split("/", 1)[0]
        if self.huge_bytes and resource_type == "Observation":
            self._huge()
            return
        body = orjson.dumps({"resourceType": "Bundle", "type": "searchset", "entry": []})
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _huge(self) -> None:
        entry = b'{"resource":{"resourceType":"Observation","id":"x","status":"final"}},'
        piece = entry * (65536 // len(entry))
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b'{"resourceType":"Bundle","type":"searchset","entry":[')
            sent = 0
            while sent < self.huge_bytes:
                self.wfile.write(piece)
                sent += len(piece)
            self.wfile.write(b'{"resource":{"resourceType":"Observation","id":"y"}}]}')
        except (BrokenPipeError, ConnectionResetError):
            pass


@contextlib.contextmanager
def fhir_server(huge_bytes: int = 0) -> Iterator[str]:
    """Empty searchsets for everything; with ``huge_bytes``, an Observation answer that large."""
    handler = type("Handler", (_FhirHandler,), {"huge_bytes": huge_bytes})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    finally:
        server.shutdown()
        server.server_close()


def _plain_hook(fhir_base: str | None = None, prefetch: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/probe", "patientId": f"probe-{uuid.uuid4().hex[:8]}"},
    }
    if fhir_base:
        body["fhirServer"] = fhir_base
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


@functools.cache
def _planned_queries() -> tuple[tuple[str, str], ...]:
    """(prefetch key, resource type) of every query the service plans. Loaded once: building a
    Screener loads and validates every knowledge file, which would dominate a loop of hooks."""
    from ..screening import Screener

    return tuple((q.key, q.resource_type) for q in Screener(load_settings(environ={})).plan.queries)


def _empty_prefetch(except_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    prefetch: dict[str, Any] = {}
    for key, resource_type in _planned_queries():
        if key in except_keys:
            continue
        if resource_type == "Patient":
            prefetch[key] = {
                "resourceType": "Patient",
                "id": "probe",
                "birthDate": "1970-01-01",
                "gender": "male",
            }
        else:
            prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    return prefetch


# -- the checks ------------------------------------------------------------------------------------------


def check_slow_headers(front: Front, clients: int = 4, seconds: float = 10.0) -> dict[str, Any]:
    before = front.instance.log().count("WORKER TIMEOUT")
    slow: list[socket.socket] = []
    with HealthPoller(front) as poller:
        for _ in range(clients):
            conn = front.raw_socket()
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            slow.append(conn)
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            for conn in slow:
                with contextlib.suppress(OSError):
                    conn.sendall(b"a")
            time.sleep(min(2.0, max(0.0, ends - time.monotonic())))
    for conn in slow:
        conn.close()
    result = poller.summary()
    result["worker_timeouts"] = front.instance.log().count("WORKER TIMEOUT") - before
    result["met"] = (
        result["health_max_ms"] is not None
        and result["health_max_ms"] <= TARGET_HEALTH_SECONDS * 1000
        and result["worker_timeouts"] == 0
        and result["health_failures"] == 0
    )
    return result


def _concurrent_hooks(front: Front, bodies: list[dict[str, Any]]) -> list[tuple[int, float]]:
    def call(body: dict[str, Any]) -> tuple[int, float]:
        started = time.monotonic()
        with front.session() as session:
            try:
                status = session.post(
                    front.base_url + HOOK_PATH, json=body, headers=front.auth(HOOK_PATH), timeout=60
                ).status_code
            except requests.RequestException:
                status = 0
        return status, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(call, bodies))


def check_hanging_fhir(front: Front, hooks: int = 8) -> dict[str, Any]:
    with hanging_server() as base, HealthPoller(front) as poller:
        answers = _concurrent_hooks(front, [_plain_hook(base) for _ in range(hooks)])
    result = poller.summary()
    result["hook_statuses"] = dict(Counter(status for status, _ in answers))
    result["hook_max_ms"] = _ms(max(seconds for _, seconds in answers))
    result["deadline_ms"] = _ms(DEADLINE)
    result["met"] = (
        all(status == 412 for status, _ in answers)
        and max(seconds for _, seconds in answers) <= DEADLINE + TARGET_LATE_SECONDS
        and result["health_max_ms"] is not None
        and result["health_max_ms"] <= TARGET_HEALTH_SECONDS * 1000
    )
    return result


def check_huge_fhir(front: Front, hooks: int = 2, size: int = 300 * 1024 * 1024) -> dict[str, Any]:
    """Run on a fresh instance: VmHWM is the peak since each worker started."""
    with fhir_server(huge_bytes=size) as base:
        warm = _concurrent_hooks(front, [_plain_hook(base, _empty_prefetch()) for _ in range(4)])
        idle_peak = _peak_mb(front.instance.worker_pids())
        answers = _concurrent_hooks(
            front, [_plain_hook(base, _empty_prefetch(("observations",))) for _ in range(hooks)]
        )
    peak = _peak_mb(front.instance.worker_pids())
    result = {
        "answer_mb": round(size / 2**20),
        "warm_up_statuses": dict(Counter(status for status, _ in warm)),
        "hook_statuses": dict(Counter(status for status, _ in answers)),
        "hook_max_ms": _ms(max(seconds for _, seconds in answers)),
        "worker_peak_mb_before": idle_peak,
        "worker_peak_mb": peak,
    }
    result["met"] = (
        all(status == 412 for status, _ in answers)
        and max(seconds for _, seconds in answers) <= DEADLINE + TARGET_LATE_SECONDS
        and peak <= TARGET_PEAK_MB
    )
    return result


def check_metrics_growth(front: Front, hooks: int = 300) -> dict[str, Any]:
    metrics_url = front.instance.base_url + "/metrics"  # scraped at the instance (nginx does not expose it)
    with fhir_server() as base:
        warm = _plain_hook(base, _empty_prefetch())
        with front.session() as session:
            session.post(front.base_url + HOOK_PATH, json=warm, headers=front.auth(HOOK_PATH), timeout=30)
            before = len(requests.get(metrics_url, timeout=10).content)
            statuses: Counter[int] = Counter()
            for index in range(hooks):
                prefetch = _empty_prefetch()
                prefetch["observations"] = {
                    "resourceType": "Bundle",
                    "type": "searchset",
                    "entry": [{"resource": {"resourceType": f"MadeUp{index}", "id": "x"}}],
                    "link": [{"relation": "next", "url": f"{base}/MadeUp{index}?page=2"}],
                }
                response = session.post(
                    front.base_url + HOOK_PATH,
                    json=_plain_hook(base, prefetch),
                    headers=front.auth(HOOK_PATH),
                    timeout=30,
                )
                statuses[response.status_code] += 1
        page = requests.get(metrics_url, timeout=10).content
    growth = len(page) - before
    return {
        "hooks": hooks,
        "statuses": dict(statuses),
        "metrics_bytes_before": before,
        "metrics_bytes_after": len(page),
        "growth_bytes": growth,
        "made_up_labels": page.count(b"MadeUp"),
        "met": growth < TARGET_METRICS_GROWTH and b"MadeUp" not in page,
    }


def _read_answer(conn: socket.socket) -> tuple[int, bytes, bytes]:
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = conn.recv(65536)
        if not chunk:
            break
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else 0
    return status, head, body


def _is_outcome(content_type: str, body: bytes) -> bool:
    try:
        return "json" in content_type and orjson.loads(body).get("resourceType") == "OperationOutcome"
    except (orjson.JSONDecodeError, AttributeError):
        return False


def check_limits(front: Front) -> dict[str, Any]:
    limit = DEFAULTS["server"]["max_body_bytes"]
    conn = front.raw_socket(timeout=30)
    try:
        token = front.auth(HOOK_PATH)["Authorization"]
        conn.sendall(
            (
                f"POST {HOOK_PATH} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                f"Authorization: {token}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        piece = b"x" * (1024 * 1024)
        sent = 0
        with contextlib.suppress(OSError):  # the server may answer 413 and close before the end
            while sent <= limit + len(piece):
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
            conn.sendall(b"0\r\n\r\n")
        status, head, body = _read_answer(conn)
    finally:
        conn.close()
    content_type = next(
        (
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-type")
        ),
        "",
    )
    with front.session() as session:
        big = session.post(
            front.base_url + HOOK_PATH,
            json=_plain_hook(),
            headers={"Authorization": "Bearer " + "a" * 12 * 1024},
            timeout=30,
        )
    result = {
        "chunked_over_limit_status": status,
        "chunked_over_limit_json": _is_outcome(content_type, body),
        "authorization_12kb_status": big.status_code,
        "authorization_12kb_json": _is_outcome(big.headers.get("Content-Type", ""), big.content),
    }
    result["met"] = (
        status == 413
        and result["chunked_over_limit_json"]
        and 400 <= big.status_code < 500
        and result["authorization_12kb_json"]
    )
    return result


def check_sandbox(front: Front, sandbox: SandboxSigner | None) -> dict[str, Any]:
    if sandbox is None:
        return {"met": False, "note": "the sandbox build is not at ../shared/vendor"}
    body = hook_request(
        icu_patient(200, datetime.now(UTC), patient_id=f"probe-sbx-{uuid.uuid4().hex[:6]}"),
        (),
        hook_instance=str(uuid.uuid4()),
    )
    body["prefetch"] = _empty_prefetch()
    with front.session() as session:
        token = sandbox.token(front.base_url + HOOK_PATH)
        response = session.post(
            front.base_url + HOOK_PATH, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        replay = session.post(
            front.base_url + HOOK_PATH, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
    return {
        "kid": sandbox.kid,
        "jku": sandbox.jku,
        "status": response.status_code,
        "replay_status": replay.status_code,
        "met": response.status_code == 200 and replay.status_code == 401,
    }


def _attacks(front: Front) -> dict[str, str | None]:
    signer = front.signer
    audience = front.base_url + HOOK_PATH
    now = int(time.time())
    valid = signer.token(audience)
    header, payload, signature = valid.split(".")
    forged_claims = jwt.utils.base64url_encode(
        orjson.dumps({"iss": PROBE_ISSUER, "aud": audience, "iat": now, "exp": now + 9999, "jti": "forged"})
    ).decode()
    public_pem = signer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    stranger = ec.generate_private_key(ec.SECP384R1())

    def signed(key: Any, alg: str, headers: dict[str, Any], **claims: Any) -> str:
        base = {"iss": PROBE_ISSUER, "aud": audience, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
        base.update(claims)
        return jwt.encode({k: v for k, v in base.items() if v is not None}, key, alg, headers=headers)

    replayed = signer.token(audience)
    return {
        "no header": None,
        "alg none": f"{_NONE_HEADER}.{payload}.",
        "HMAC keyed with the public key": _hmac_token(public_pem, audience, now),
        "tampered payload": f"{header}.{forged_claims}.{signature}",
        "expired": signer.token(audience, iat=now - 900, exp=now - 600),
        "issued in the future": signer.token(audience, iat=now + 900, exp=now + 1200),
        "wrong audience": signer.token("https://elsewhere.example.org" + HOOK_PATH),
        "audience of the feedback route": signer.token(front.base_url + FEEDBACK_PATH),
        "unknown issuer": signed(signer.key, "ES384", {"kid": "probe-1"}, iss="https://intruder.example"),
        "pinned kid, stranger key": signed(stranger, "ES384", {"kid": "probe-1"}),
        "unknown kid with a made-up jku": signed(
            stranger, "ES384", {"kid": "x", "jku": "https://evil.example/jwks.json"}
        ),
        "missing jti": signer.token(audience, jti=None),
        "replayed jti": replayed,
        "huge jti": signer.token(audience, jti="j" * 5000),
        "basic scheme": "Basic dXNlcjpwYXNzd29yZA==",
    }


_NONE_HEADER = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()


def _hmac_token(secret: bytes, audience: str, now: int) -> str:
    import hashlib
    import hmac

    head = jwt.utils.base64url_encode(orjson.dumps({"alg": "HS384", "typ": "JWT", "kid": "probe-1"}))
    body = jwt.utils.base64url_encode(
        orjson.dumps(
            {"iss": PROBE_ISSUER, "aud": audience, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
        )
    )
    signing_input = head + b"." + body
    return (
        signing_input
        + b"."
        + jwt.utils.base64url_encode(hmac.new(secret, signing_input, hashlib.sha384).digest())
    ).decode()


def check_jwt_attacks(front: Front) -> dict[str, Any]:
    attacks = _attacks(front)
    body = _plain_hook(prefetch=_empty_prefetch())
    statuses: dict[str, int] = {}
    with front.session() as session:
        first = session.post(
            front.base_url + HOOK_PATH,
            json=body,
            headers={"Authorization": f"Bearer {attacks['replayed jti']}"},
            timeout=30,
        )
        for name, token in attacks.items():
            headers = {}
            if token is not None:
                headers["Authorization"] = token if token.startswith("Basic") else f"Bearer {token}"
            response = session.post(front.base_url + HOOK_PATH, json=body, headers=headers, timeout=30)
            statuses[name] = response.status_code
    return {
        "attacks": len(attacks),
        "statuses": statuses,
        "replayed_token_first_use": first.status_code,
        "met": first.status_code == 200 and all(status == 401 for status in statuses.values()),
    }


# -- fuzzing ---------------------------------------------------------------------------------------------

_ODD_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**63,
    1e308,
    "",
    " ",
    "\u0000",
    "\ud7ff\ue000",
    "x" * 10000,
    [],
    {},
    [[[[[]]]]],
    {"resourceType": "Bundle"},
    {"resourceType": "OperationOutcome"},
    "2026-13-45T99:99:99Z",
    "../../etc/passwd",
    "Patient/../../x",
    "http://169.254.169.254/latest/meta-data/",
    "%00",
    "{{context.patientId}}",
]


def _mutate(value: Any, rng: random.Random, depth: int = 0) -> Any:
    if depth > 6 or rng.random() < 0.2:
        return rng.choice(_ODD_VALUES)
    if isinstance(value, dict) and value:
        copy = dict(value)
        key = rng.choice(list(copy))
        action = rng.random()
        if action < 0.3:
            del copy[key]
        elif action < 0.4:
            copy[f"unexpected{rng.randint(0, 99)}"] = rng.choice(_ODD_VALUES)
        else:
            copy[key] = _mutate(copy[key], rng, depth + 1)
        return copy
    if isinstance(value, list) and value:
        copy = list(value)
        index = rng.randrange(len(copy))
        if rng.random() < 0.3:
            copy.pop(index)
        else:
            copy[index] = _mutate(copy[index], rng, depth + 1)
        return copy
    return rng.choice(_ODD_VALUES)


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.random()
    if depth > 4 or kind < 0.4:
        return rng.choice(_ODD_VALUES)
    if kind < 0.7:
        return {
            rng.choice(["hook", "context", "prefetch", "feedback", "x", "fhirServer"]): _random_json(
                rng, depth + 1
            )
            for _ in range(rng.randint(0, 4))
        }
    return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]


def check_fuzz(front: Front, requests_wanted: int = TARGET_FUZZ_REQUESTS, seed: int = 16) -> dict[str, Any]:
    rng = random.Random(seed)
    with fhir_server() as base:
        hook = _plain_hook(base, _empty_prefetch())
        card = str(uuid.uuid4())
        feedback = {
            "feedback": [
                {
                    "card": card,
                    "outcome": "overridden",
                    "overrideReason": {
                        "reason": {"code": "declined", "system": "x", "display": "y"},
                        "userComment": "c",
                    },
                    "acceptedSuggestions": [{"id": "s"}],
                    "outcomeTimestamp": datetime.now(UTC).isoformat(),
                }
            ]
        }
        cases: list[tuple[str, str, bytes, dict[str, str], bool]] = []
        for _ in range(requests_wanted):
            pick = rng.random()
            headers = {"Content-Type": "application/json"}
            if pick < 0.45:
                path, data = (
                    HOOK_PATH,
                    orjson.dumps(_mutate({**hook, "hookInstance": str(uuid.uuid4())}, rng)),
                )
            elif pick < 0.7:
                path, data = FEEDBACK_PATH, orjson.dumps(_mutate(feedback, rng))
            elif pick < 0.85:
                path, data = rng.choice([HOOK_PATH, FEEDBACK_PATH]), orjson.dumps(_random_json(rng))
            elif pick < 0.95:
                path, data = rng.choice([HOOK_PATH, FEEDBACK_PATH]), rng.randbytes(rng.randint(0, 2000))
            else:
                path = rng.choice(
                    [HOOK_PATH, FEEDBACK_PATH, "/cds-services/unknown", f"{HOOK_PATH}/x/y", "/health"]
                )
                data = orjson.dumps(hook)
                headers = {
                    "Content-Type": rng.choice(
                        ["text/plain", "application/xml", "", "application/json; charset=latin-1"]
                    )
                }
            method = (
                "POST" if rng.random() < 0.97 else rng.choice(["GET", "PUT", "DELETE", "OPTIONS", "PATCH"])
            )
            cases.append((method, path, data, headers, rng.random() < 0.05))  # 5 %: a garbage token

        statuses: Counter[int] = Counter()
        lock = threading.Lock()

        def run(part: list[tuple[str, str, bytes, dict[str, str], bool]]) -> None:
            with front.session() as session:
                for method, path, data, headers, garbage in part:
                    auth = {"Authorization": "Bearer garbage"} if garbage else front.auth(path)
                    try:
                        status = session.request(
                            method, front.base_url + path, data=data, headers={**headers, **auth}, timeout=60
                        ).status_code
                    except requests.RequestException:
                        status = 0
                    with lock:
                        statuses[status] += 1

        started = time.monotonic()
        workers = 8
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, [cases[k::workers] for k in range(workers)]))
        elapsed = time.monotonic() - started
    server_errors = sum(count for status, count in statuses.items() if status >= 500 or status == 0)
    return {
        "requests": sum(statuses.values()),
        "seconds": round(elapsed, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": server_errors,
        "met": sum(statuses.values()) >= requests_wanted and server_errors == 0,
    }


# -- killed workers ---------------------------------------------------------------------------------------


def check_killed_worker(
    front: Front, store_url: str, messages: int = 300, clients: int = 4
) -> dict[str, Any]:
    base = datetime.now(UTC) - timedelta(hours=1)
    cards = [str(uuid.uuid4()) for _ in range(20)]
    run_id = uuid.uuid4().hex[:8]
    bodies = [
        {
            "feedback": [
                {
                    "card": cards[i % len(cards)],
                    "outcome": "overridden",
                    "overrideReason": {"userComment": f"{run_id} {i} {item}"},
                    "outcomeTimestamp": (base + timedelta(milliseconds=2 * i + item)).isoformat(),
                }
                for item in range(2)
            ]
        }
        for i in range(messages)
    ]
    failures = Counter[str]()
    lock = threading.Lock()

    def post_all(part: list[dict[str, Any]]) -> None:
        session = front.session()
        for body in part:
            for _attempt in range(50):
                try:
                    response = session.post(
                        front.base_url + FEEDBACK_PATH,
                        json=body,
                        headers=front.auth(FEEDBACK_PATH),
                        timeout=30,
                    )
                    if response.status_code == 200:
                        break
                    reason = f"HTTP {response.status_code}"
                except requests.RequestException as exc:
                    reason = type(exc).__name__
                    session.close()
                    session = front.session()
                with lock:
                    failures[reason] += 1
                time.sleep(0.05)
        session.close()

    threads = [threading.Thread(target=post_all, args=(bodies[k::clients],)) for k in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(0.7)
    victims = front.instance.worker_pids()[:1]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=300)
    from ..store import open_store

    with open_store(store_url) as store:
        stored = {
            f.user_comment
            for card in cards
            for f in store.feedback_for_card(card)
            if (f.user_comment or "").startswith(run_id)
        }
    expected = 2 * messages
    return {
        "messages": messages,
        "items": expected,
        "killed_worker": victims,
        "failed_attempts_retried": dict(failures),
        "items_stored": len(stored),
        "items_lost": expected - len(stored),
        "met": len(stored) == expected and bool(victims),
    }


# -- worker model comparison ------------------------------------------------------------------------------


def compare_workers(workdir: Path, seconds: float = 10.0) -> dict[str, Any]:
    """gunicorn with sync, gthread and gevent workers on the same app: slow clients, hanging FHIR,
    throughput at 1 000 Observations (the measurement behind serving.py's choice)."""
    from ..screening import Screener
    from .bench import run_load
    from .icu_generator import hook_request as bench_request

    settings = load_settings(environ={})
    # As serving.gunicorn_options (the entry layer, which tools/ may not import) sets them.
    options = {"workers": settings.workers, "threads": settings.section("server")["threads"], "timeout": 30}
    body = orjson.dumps(
        bench_request(
            icu_patient(1000, datetime.now(UTC), patient_id="probe-compare"),
            Screener(settings).plan.queries,
            hook_instance=str(uuid.uuid4()),
        )
    )
    kinds = ["sync", "gthread"]
    with contextlib.suppress(ImportError):
        import gevent  # noqa: F401

        kinds.append("gevent")
    results: dict[str, Any] = {}
    for kind in kinds:
        port = free_port()
        args = [
            str(Path(sys.executable).parent / "gunicorn"), "-b", f"127.0.0.1:{port}",
            "-w", str(options["workers"]), "-k", kind, "--timeout", str(options["timeout"]),
            "--no-control-socket",
        ]  # fmt: skip
        if kind == "gthread":
            args += ["--threads", str(options["threads"])]
        args.append("cds_service.app:create_app()")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
        env.update(
            {
                "CDS_FHIR_ALLOW_HTTP": "true",
                "CDS_STORE_URL": f"sqlite:///{workdir}/compare-{kind}.sqlite3",
                "CDS_LOGGING_LEVEL": "WARNING",
            }
        )
        log = workdir / f"compare-{kind}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                args, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(requests.RequestException):
                    if requests.get(base + "/health", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"gunicorn {kind} did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
            fake = ServiceInstance(workdir, {}, name=f"compare-{kind}", port=port)
            fake.process = process
            front = Front(kind, base, True, fake, None, ProbeSigner(workdir))
            front.auth = lambda path: {}  # type: ignore[method-assign]
            slow = check_slow_headers(front, seconds=seconds)
            slow["worker_timeouts"] = log.read_text().count("WORKER TIMEOUT")
            hanging = check_hanging_fhir(front)
            pids = [process.pid, *fake.worker_pids()]
            load = run_load(base, body, workdir, seconds, 8, server_pids=pids)
            results[kind] = {
                "slow_headers": {
                    k: slow[k]
                    for k in ("health_answers", "health_max_ms", "health_failures", "worker_timeouts")
                },
                "hanging_fhir": {
                    k: hanging[k]
                    for k in (
                        "hook_statuses",
                        "hook_max_ms",
                        "health_answers",
                        "health_max_ms",
                        "health_failures",
                    )
                },
                "throughput": {
                    k: load.get(k)
                    for k in ("hooks_per_second", "p50_ms", "p99_ms", "errors", "server_cpu_ms_per_hook")
                },
            }
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return results


# -- the run -------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def run(out: Path, fuzz_requests: int, compare: bool) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cds-probe-"))
    results: dict[str, Any] = {"machine_at_start": machine(), "setups": {}}
    try:
        sandbox = SandboxSigner.from_build()
    except SandboxBuildError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        sandbox = None
    signer = ProbeSigner(workdir)
    postgres: PostgresServer | None = None
    bin_dir = find_postgres_bin()
    if bin_dir is not None:
        try:
            postgres = PostgresServer(bin_dir)
            postgres.init()
            postgres.start()
        except (PostgresUnavailable, RuntimeError) as exc:
            print(f"probe: PostgreSQL not available: {exc}", file=sys.stderr)
            postgres = None
    kinds = ["direct", "nginx"] if find_nginx() else ["direct"]
    try:
        for kind in kinds:
            checks: dict[str, Any] = {}
            results["setups"][kind] = checks
            folder = workdir / kind

            def sqlite(folder: Path = folder) -> str:
                return f"sqlite:///{folder / f'store-{uuid.uuid4().hex[:6]}.sqlite3'}"

            steps: list[tuple[str, Callable[[Front], dict[str, Any]]]] = [
                ("huge_fhir_answers", check_huge_fhir),  # first: the workers' peak memory is this check's
                ("slow_header_clients", check_slow_headers),
                ("hanging_fhir_server", check_hanging_fhir),
                ("made_up_resource_types", check_metrics_growth),
                ("limits", check_limits),
                ("sandbox_token_pinned", lambda f: check_sandbox(f, sandbox)),
                ("jwt_attacks", check_jwt_attacks),
                ("fuzzing", lambda f: check_fuzz(f, fuzz_requests)),
            ]
            with setup(kind, folder, sqlite(), signer, sandbox) as front:
                for name, step in steps:
                    print(f"probe: {kind}: {name} …", file=sys.stderr, flush=True)
                    checks[name] = step(front)
            stores = {"sqlite": sqlite()}
            if postgres is not None:
                stores["postgresql"] = create_database(
                    postgres.admin_url, f"cds_probe_{uuid.uuid4().hex[:10]}"
                )
            for store_kind, store_url in stores.items():
                print(f"probe: {kind}: killed worker ({store_kind}) …", file=sys.stderr, flush=True)
                with setup(kind, folder, store_url, signer, sandbox) as front:
                    checks[f"killed_worker_{store_kind}"] = check_killed_worker(front, store_url)
            if postgres is None:
                checks["killed_worker_postgresql"] = {"met": False, "note": "PostgreSQL is not installed"}
        if compare:
            print("probe: comparing worker models …", file=sys.stderr, flush=True)
            results["worker_models"] = compare_workers(workdir)
    finally:
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results["machine_at_end"] = machine()
    results["all_met"] = all(
        check.get("met") for checks in results["setups"].values() for check in checks.values()
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    return results


def _figure(name: str, check: dict[str, Any]) -> str:
    if name == "slow_header_clients":
        return (
            f"slowest /health {check['health_max_ms']} ms of {check['health_answers']}, "
            f"{check['worker_timeouts']} worker timeouts"
        )
    if name == "hanging_fhir_server":
        return (
            f"hooks {check['hook_statuses']}, slowest {check['hook_max_ms']} ms; "
            f"slowest /health {check['health_max_ms']} ms"
        )
    if name == "huge_fhir_answers":
        return (
            f"hooks {check['hook_statuses']}, slowest {check['hook_max_ms']} ms; worker peak "
            f"{check['worker_peak_mb']} MB (before: {check['worker_peak_mb_before']} MB)"
        )
    if name == "made_up_resource_types":
        return (
            f"{check['hooks']} hooks {check['statuses']}: /metrics +{check['growth_bytes']} bytes, "
            f"{check['made_up_labels']} made-up labels"
        )
    if name == "limits":
        return (
            f"chunked over the limit: {check['chunked_over_limit_status']}"
            f"{' JSON' if check['chunked_over_limit_json'] else ''}; 12 KB Authorization: "
            f"{check['authorization_12kb_status']}{' JSON' if check['authorization_12kb_json'] else ''}"
        )
    if name == "sandbox_token_pinned":
        return check.get("note") or f"hook {check['status']}, replay {check['replay_status']}"
    if name == "jwt_attacks":
        return f"{check['attacks']} attacks: {dict(Counter(check['statuses'].values()))}"
    if name == "fuzzing":
        return (
            f"{check['requests']} requests in {check['seconds']} s: {check['server_errors']} × 5xx "
            f"({check['statuses']})"
        )
    if name.startswith("killed_worker"):
        return check.get("note") or (
            f"{check['items']} items, {check['items_lost']} lost; "
            f"failed attempts retried: {check['failed_attempts_retried']}"
        )
    return json.dumps(check)


TARGETS = {
    "slow_header_clients": "4 slow-header clients for 10 s: every /health ≤ 500 ms, no worker timeout",
    "hanging_fhir_server": "8 hooks, FHIR never answers: each 412 ≤ deadline + 1 s; /health ≤ 500 ms",
    "huge_fhir_answers": "2 hooks, 300 MB FHIR answers: each 412 ≤ deadline + 1 s; worker peak ≤ 400 MB",
    "made_up_resource_types": "300 hooks with made-up resource types: /metrics grows < 20 KB",
    "limits": "chunked body over the limit: 413; 12 KB Authorization: 4xx JSON OperationOutcome",
    "sandbox_token_pinned": "the public sandbox's token accepted offline, key pinned",
    "jwt_attacks": "every JWT attack: 401",
    "fuzzing": "≥ 10 000 fuzzed requests: 0 × 5xx",
    "killed_worker_sqlite": "a worker SIGKILLed mid-load, SQLite: 0 feedback items lost",
    "killed_worker_postgresql": "a worker SIGKILLed mid-load, PostgreSQL: 0 feedback items lost",
}


def _health_cell(check: dict[str, Any]) -> str:
    """The slowest /health answer; unanswered polls (5 s timeout) counted, not shown as a time."""
    failures, answers = check.get("health_failures", 0), check.get("health_answers")
    if not failures:
        return f"slowest {check['health_max_ms']} ms"
    return f"**{failures} of {answers} unanswered** within 5 s"


def markdown(results: dict[str, Any]) -> str:
    start, end = results["machine_at_start"], results["machine_at_end"]
    lines = [
        f"`make probe`, {start['time']}: {start['cores']} cores, Python {start['python']}; load average "
        f"{start['load_average'][0]} at the start, {end['load_average'][0]} at the end (a shared machine). "
        "Service: `cds-service serve --workers 2` (gunicorn gthread, 2 workers × 16 threads), JWT checks on.",
        "",
    ]
    for kind, checks in results["setups"].items():
        title = (
            "`cds-service serve`, directly"
            if kind == "direct"
            else "behind nginx (TLS, the shipped configuration)"
        )
        lines += [f"**{title}**", "", "| check | result | |", "|---|---|---|"]
        for name, target in TARGETS.items():
            if name in checks:
                check = checks[name]
                lines.append(
                    f"| {target} | {_figure(name, check)} | {'met' if check.get('met') else '**not met**'} |"
                )
        lines.append("")
    models = results.get("worker_models")
    if models:
        lines += [
            "**Worker models** (plain gunicorn, same app, same options; throughput at 1 000 Observations, "
            "8 clients, 10 s)",
            "",
            "| workers | slow clients: slowest /health | hanging FHIR: hooks, slowest /health | throughput |",
            "|---|---|---|---|",
        ]
        for kind, figures in models.items():
            slow, hanging, load = figures["slow_headers"], figures["hanging_fhir"], figures["throughput"]
            lines.append(
                f"| {kind} | {_health_cell(slow)}, {slow['worker_timeouts']} worker timeouts "
                f"| {hanging['hook_statuses']} by {hanging['hook_max_ms']} ms; "
                f"/health {_health_cell(hanging)} "
                f"| {load['hooks_per_second']} hooks/s, p99 {load['p99_ms']} ms, "
                f"{load['server_cpu_ms_per_hook']} ms CPU/hook |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cds_service.tools.probe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="probe-results", help="folder for results.json and results.md")
    parser.add_argument("--fuzz-requests", type=int, default=TARGET_FUZZ_REQUESTS)
    parser.add_argument("--compare-workers", action="store_true", help="also compare gunicorn worker models")
    args = parser.parse_args(argv)
    results = run(Path(args.out), args.fuzz_requests, args.compare_workers)
    sys.stdout.write(markdown(results))
    return 0 if results["all_met"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
