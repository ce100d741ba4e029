"""A real FHIR R4 server (sekmet-fhir 0.1.1) in a subprocess, shared by the tests, bench and harness.

``FhirTestServer.start()`` runs ``sekmet serve`` on a free 127.0.0.1 port with a fresh data
directory and waits for ``GET /fhir/metadata``; ``stop()`` always stops it (by pid: SIGTERM, SIGKILL
after a grace period; on Linux the kernel also sends it SIGTERM should the parent die without
cleaning up) and removes the directory. The pytest fixture that wraps it is in ``tests/fhir_server.py``.

What sekmet 0.1.1 does, found by experiment (keep in mind when writing queries and test data):

* Transactions: ``POST {base}`` with a ``transaction`` Bundle is atomic; ``PUT Type/id`` entries
  with client-chosen ids create (201) or update; ``POST`` entries with ``urn:uuid:`` fullUrls get
  server ids and references to them are rewritten; ``DELETE Type/id`` entries work. With
  ``validation: {inbound: warn}`` an invalid resource (e.g. ``status: "nonsense"``) is stored anyway.
  A body that is not JSON → 400 OperationOutcome.
* Reads: ``GET Patient/x`` → 200; unknown id → 404 OperationOutcome (``not-found``); deleted
  → 410 (``deleted``). ``PUT`` after a delete re-creates the resource.
* Search, working: ``patient=X`` and ``patient=Patient/X`` and ``subject=Patient/X``;
  ``code=http://loinc.org|2524-7,http://loinc.org|8478-0`` (comma = OR); ``code=2524-7`` (code
  alone matches any system); a wrong system matches nothing; ``code=|2524-7`` (explicit "no system")
  matches nothing for LOINC-coded data. ``date=geT&date=leT`` / ``gt`` / ``lt`` with ``Z`` or an
  offset (``+02:00`` must be sent as ``%2B02:00``: a raw ``+`` decodes as a space), and day precision
  (``date=2026-11-20``, ``ge2026-11-20``). ``MedicationAdministration?patient=X&effective-time=geT``
  matches an ``effectivePeriod`` with no end when its start is before T (open period = still
  running: correct FHIR range semantics). ``_sort=date`` / ``_sort=-date``. ``POST Type/_search``
  (form-encoded) behaves like GET. ``Patient/X/$everything`` returns the patient and everything in
  its compartment in one Bundle (it ignores ``_count``: no paging).
* Paging: the default page size is 20; ``_count`` is capped at 1000 silently (``_count=5000`` →
  1000 per page); ``_count=0`` → only ``total``; ``_count=abc`` → 400. Links ``self``/``first``/
  ``next``/``last`` are absolute URLs of the form ``{base}/Observation?...&_count=N&_offset=M``
  (offset paging, so a write between pages can shift results); the query is re-encoded
  (``|`` → ``%7C``). ``total`` is always present.
* Unknown search parameters are ignored in searches: the Bundle gets an extra entry with an
  OperationOutcome (``not-supported`` warning) and ``search.mode == "outcome"`` (clients must skip
  it). In a conditional delete an unknown parameter is a 400 instead.
* Conditional delete ``DELETE Observation?patient=X`` matching more than one resource → 412
  ``multiple-matches``: clean up with ``$everything`` + a transaction of DELETEs instead.
* An invalid date (``date=garbage``) → 400 OperationOutcome. ``_format=xml`` answers XML.
* Nothing is written to the working directory; the data dir holds SQLite files. Ready in < 1 s.

Several processes (``workers``, for the benchmark; found by reading sekmet's source,
``sekmet/fhir/store.py``, ``context.py``, ``main.py``): ``sekmet serve`` is one uvicorn process whose
handlers run in a thread pool but hold one sqlite connection under one lock, so it answers one
search at a time. ``uvicorn sekmet.main:app_factory --factory --workers N`` (settings from
``SEKMET_CONFIG``) runs N processes, each with its own connection to the same SQLite files in WAL
mode: readers in several processes do not block each other, and a transaction committed by one
process is seen by the next read in every other. What is process-local: each process numbers the
writes it makes (``Store._seq``, read from the database when the process starts; searches use it as
the last sort key) and keeps the write listeners (subscriptions). So the data is written through ONE
process only — :class:`FhirTestServer` with ``data_dir=`` of a running single-process server
shares that server's store read-only in practice: load through the single process, search through
either. At start each process creates the schema if missing (``CREATE … IF NOT EXISTS``) and seeds
the built-in subscription topics only when they are not stored yet, so a shared, already started
store is not written to. Each process takes ~1 s to start (more on a busy machine).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from ..base.config import PROJECT_ROOT

START_TIMEOUT = 30.0
STOP_GRACE = 5.0
_FHIR_JSON = "application/fhir+json"


class FhirServerError(RuntimeError):
    """sekmet did not start, or answered a helper call with an error."""


def sekmet_binary() -> Path:
    """The sekmet executable: ``$CDS_TEST_SEKMET`` or ``<repo>/.fhir-venv/bin/sekmet``."""
    configured = os.environ.get("CDS_TEST_SEKMET")
    return Path(configured) if configured else PROJECT_ROOT / ".fhir-venv" / "bin" / "sekmet"


def _interpreter_of(binary: Path) -> Path:
    """The Python that runs the ``sekmet`` script (its ``#!`` line): uvicorn is installed beside it."""
    try:
        with open(binary, "rb") as script:
            first = script.readline().decode("utf-8", "replace").strip()
    except OSError:
        first = ""
    if first.startswith("#!") and " " not in first[2:].strip():
        return Path(first[2:].strip())
    return binary.parent / "python"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound then released: a small race, retried by the starter)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the test process dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def fhir_transaction(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A transaction Bundle that PUTs every resource at ``Type/id`` (ids are given a uuid when missing)."""
    entries = []
    for resource in resources:
        resource.setdefault("id", uuid.uuid4().hex)
        ref = f"{resource['resourceType']}/{resource['id']}"
        entries.append({"fullUrl": ref, "resource": resource, "request": {"method": "PUT", "url": ref}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


class FhirTestServer:
    """A running sekmet process and a small REST helper bound to it."""

    def __init__(self, binary: Path, workers: int = 1, data_dir: Path | None = None) -> None:
        """``workers`` > 1 runs that many uvicorn worker processes (see the module docstring), and
        ``data_dir`` serves the store of another, running server instead of a fresh one (its data
        is written through that server; this one's ``stop()`` leaves it in place)."""
        self.binary = binary
        self.workers = max(1, int(workers))
        self.shared_data_dir = data_dir
        self.workdir = Path(tempfile.mkdtemp(prefix="sekmet-test-"))
        #: The directory of the SQLite store being served (set by ``start()``).
        self.data_dir: Path | None = None
        self.port = 0
        self.base_url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.session.headers.update({"Accept": _FHIR_JSON, "Content-Type": _FHIR_JSON})
        self._log_path = self.workdir / "sekmet.log"

    # -- lifetime -------------------------------------------------------------------------------

    def start(self, attempts: int = 3, port: int | None = None) -> None:
        """Start sekmet and wait until it answers ``/metadata``; a taken free port is retried.

        ``port`` asks for a fixed port (``make demo``): one attempt, no retry on another port."""
        if port is not None:
            attempts = 1
        for attempt in range(1, attempts + 1):
            self.port = port if port is not None else free_port()
            self.base_url = f"http://127.0.0.1:{self.port}/fhir"
            if self.shared_data_dir is not None:
                data_dir = self.shared_data_dir
            else:
                data_dir = self.workdir / f"data-{attempt}"
                data_dir.mkdir()
            self.data_dir = data_dir
            config = self.workdir / "settings.yaml"
            config.write_text(
                f"base_url: {self.base_url}\n"
                "host: 127.0.0.1\n"
                f"port: {self.port}\n"
                f"data_dir: {data_dir}\n"
                "simulator: {enabled: false}\n"
                "log_inbound: false\n"
                "validation: {inbound: warn}\n",
                encoding="utf-8",
            )
            with open(self._log_path, "ab") as log:
                self._log_start = log.tell()
                self.process = subprocess.Popen(
                    self._command(config),
                    cwd=self.workdir,
                    env={**os.environ, "SEKMET_CONFIG": str(config)},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C in the terminal reaches pytest, which stops it
                    preexec_fn=die_with_parent if sys.platform == "linux" else None,
                )
            if self._wait_ready():
                return
            self.stop_process()
        self.stop()
        raise FhirServerError(f"the FHIR server (sekmet) did not start; last log lines:\n{self._log_tail()}")

    def _command(self, config: Path) -> list[str]:
        if self.workers == 1:
            return [str(self.binary), "serve", "--config", str(config)]
        # sekmet's own `serve` runs one process; uvicorn's supervisor runs several (settings from
        # SEKMET_CONFIG), at `serve`'s log level (its access log included: the same work per request).
        return [
            str(_interpreter_of(self.binary)),
            "-m",
            "uvicorn",
            "sekmet.main:app_factory",
            "--factory",
            "--workers",
            str(self.workers),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "info",  # also: one "Application startup complete." per worker, how readiness is counted
        ]

    def _wait_ready(self) -> bool:
        """``/metadata`` answers and, with several workers, every worker has finished starting (one
        answering worker is not enough: a search sent to one still loading would wait for it)."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT * self.workers
        answered = False
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if not answered:
                with contextlib.suppress(requests.RequestException):
                    answered = self.session.get(f"{self.base_url}/metadata", timeout=2).status_code == 200
            if answered and (self.workers == 1 or self._workers_started() >= self.workers):
                return True
            time.sleep(0.05)
        return False

    def _workers_started(self) -> int:
        try:
            with open(self._log_path, "rb") as log:
                log.seek(self._log_start)
                return log.read().count(b"Application startup complete.")
        except OSError:
            return 0

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop_process(self) -> None:
        """Terminate the process by pid: SIGTERM, then SIGKILL after a grace period."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_GRACE)
        if self.workers > 1:
            # uvicorn's workers are the supervisor's children, in the session started for it: any
            # the supervisor did not stop (it was killed) are stopped here, by that group's id.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop the process and remove the data directory (idempotent)."""
        self.stop_process()
        self.session.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- REST helpers ---------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def _json(self, response: requests.Response, what: str) -> dict[str, Any]:
        if not response.ok:
            raise AssertionError(
                f"FHIR test server: {what} → HTTP {response.status_code}: {response.text[:1000]}"
            )
        return response.json() if response.content else {}

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        """GET a path relative to the base URL (a read or a search) and return the JSON body."""
        return self._json(self.session.get(self.url(path), params=params or None, timeout=30), f"GET {path}")

    def post_transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction (or batch) Bundle; returns the response Bundle; fails the test on error."""
        return self._json(self.session.post(self.base_url, json=bundle, timeout=60), "transaction")

    def put(self, resource: dict[str, Any]) -> dict[str, Any]:
        """PUT one resource at ``Type/id`` (client-assigned id); returns the stored resource."""
        ref = f"{resource['resourceType']}/{resource['id']}"
        return self._json(self.session.put(self.url(ref), json=resource, timeout=30), f"PUT {ref}")

    def put_all(self, resources: list[dict[str, Any]]) -> dict[str, Any]:
        """PUT every resource in one atomic transaction (see :func:`fhir_transaction`)."""
        return self.post_transaction(fhir_transaction(resources))

    def search_all(self, query: str) -> list[dict[str, Any]]:
        """Every resource a search returns, following ``next`` links (test-side reference)."""
        resources: list[dict[str, Any]] = []
        url: str | None = self.url(query)
        while url:
            bundle = self._json(self.session.get(url, timeout=30), "search")
            resources += [
                entry["resource"]
                for entry in bundle.get("entry", [])
                if entry.get("search", {}).get("mode") != "outcome"
            ]
            url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
        return resources

    def delete_patient_everything(self, patient_id: str) -> int:
        """Delete the patient and everything in its compartment; returns how many were deleted."""
        response = self.session.get(self.url(f"Patient/{patient_id}/$everything"), timeout=30)
        if response.status_code in (404, 410):
            return 0
        bundle = self._json(response, "$everything")
        refs = [
            f"{entry['resource']['resourceType']}/{entry['resource']['id']}"
            for entry in bundle.get("entry", [])
            if entry.get("search", {}).get("mode") != "outcome"
        ]
        if refs:
            deletes = [{"request": {"method": "DELETE", "url": ref}} for ref in refs]
            self.post_transaction({"resourceType": "Bundle", "type": "transaction", "entry": deletes})
        return len(refs)
