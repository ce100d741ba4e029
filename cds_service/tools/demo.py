"""``make demo``: the service, a real FHIR server and the scenario patients, on this machine, now.

One command starts, on loopback only:

1. the test FHIR server (sekmet, as :mod:`.fhir_server` starts it for the tests) on
   ``127.0.0.1:8090`` — the address ``make harness`` and the docs use by default;
2. the scenario patients (:func:`.scenarios.all_scenarios`) loaded into it, their times written
   relative to *now*, so their enrollment windows are open while the demo runs;
3. ``cds-service serve`` on ``127.0.0.1:8080``, configured for that server only (plain http is
   allowed because the one allowed server is on loopback), with a fresh store, so that feedback
   from an earlier demo cannot silence a card.

It checks that the hook answers with a card, then prints the discovery URL, a ``curl`` that shows
a card, the ``make harness`` command and how to point the CDS Hooks sandbox at it. Ctrl-C (or
SIGTERM) stops both servers and removes the temporary folder (configuration, store, logs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

import requests

from ..base.commandline import InputError, tcp_port
from ..base.config import PROJECT_ROOT
from .fhir_server import FhirServerError, FhirTestServer, die_with_parent, sekmet_binary

HOST = "127.0.0.1"  # never anything else: the demo runs open, with plain-http FHIR
DEFAULT_PORT = 8080
DEFAULT_FHIR_PORT = 8090
SERVICE_ID = "septic-shock-trial-screening"
#: The patient the printed curl asks about: neutropenic septic shock for 4 h, so an MSC card
#: (eligible) for the next 6 h and an I-MICRO "upcoming" card for the next 2 h.
DEMO_PATIENT = "cdsh-msc-eligible"
DEMO_HOOK_INSTANCE = "5e1f3a7c-0d2b-4c6e-9f8a-1b2c3d4e5f60"
PUBLIC_SANDBOX = "https://sandbox.cds-hooks.org/"
VENDORED_SANDBOX = PROJECT_ROOT.parent / "shared" / "vendor" / "cds-hooks-sandbox" / "build"
START_TIMEOUT = 45.0
STOP_GRACE = 10.0


class DemoError(Exception):
    """The demo cannot start (a port taken, sekmet missing, a server that does not come up)."""


@dataclass(frozen=True)
class DemoAddresses:
    port: int = DEFAULT_PORT
    fhir_port: int = DEFAULT_FHIR_PORT

    @property
    def service(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def discovery(self) -> str:
        return f"{self.service}/cds-services"

    @property
    def hook(self) -> str:
        return f"{self.discovery}/{SERVICE_ID}"

    @property
    def fhir(self) -> str:
        return f"http://{HOST}:{self.fhir_port}/fhir"


def demo_hook_request(addresses: DemoAddresses, patient_id: str = DEMO_PATIENT) -> dict[str, Any]:
    """The patient-view call the printed curl sends: no prefetch, so the service fetches from FHIR."""
    return {
        "hook": "patient-view",
        "hookInstance": DEMO_HOOK_INSTANCE,
        "fhirServer": addresses.fhir,
        "context": {"userId": "Practitioner/demo-clinician", "patientId": patient_id},
    }


def curl_command(addresses: DemoAddresses) -> str:
    body = json.dumps(demo_hook_request(addresses), separators=(",", ":"))
    return (
        f"curl -s {addresses.hook} -H 'Content-Type: application/json' -d {shlex.quote(body)}"
        " | python3 -m json.tool"
    )


def sandbox_url(addresses: DemoAddresses, base: str = PUBLIC_SANDBOX) -> str:
    """The sandbox opened on the demo: discovery, FHIR server, patient and hook in the query."""
    return (
        f"{base}?serviceDiscoveryURL={quote(addresses.discovery, safe='')}"
        f"&fhirServiceUrl={quote(addresses.fhir, safe='')}&patientId={DEMO_PATIENT}&hook=patient-view"
    )


def demo_settings(addresses: DemoAddresses, workdir: Path, workers: int) -> str:
    """The service's configuration file: this FHIR server only, open, a store of its own."""
    return (
        "# Written by `make demo` (cds_service/tools/demo.py); removed when the demo stops.\n"
        "server:\n"
        f"  host: {HOST}\n"
        f"  port: {addresses.port}\n"
        f"  workers: {workers}\n"
        "fhir:\n"
        "  # Plain http, but to one server only, on loopback. Never allow http where real data flows.\n"
        f"  allowed_servers: [{addresses.fhir!r}]\n"
        "  allow_http: true\n"
        "store:\n"
        f"  url: 'sqlite:///{workdir / 'store.sqlite3'}'\n"
        "security:\n"
        "  trusted_clients: {}   # open: synthetic data on your own machine only\n"
    )


def port_taken(port: int) -> bool:
    """Whether a server listens on the port (SO_REUSEADDR, as the servers set it: connections of an
    earlier demo in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def _cds_service_command() -> list[str]:
    script = Path(sys.executable).with_name("cds-service")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cds_service.cli"]


class Demo:
    """The running demo: sekmet with the scenario patients, and ``cds-service serve``."""

    def __init__(self, addresses: DemoAddresses, sekmet: Path, workers: int = 2) -> None:
        self.addresses = addresses
        self.sekmet = sekmet
        self.workers = workers
        self.workdir = Path(tempfile.mkdtemp(prefix="cds-demo-"))
        self.fhir: FhirTestServer | None = None
        self.service: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "cds-service.log"
        self.loaded = 0
        self.card_summaries: list[str] = []

    # -- start ------------------------------------------------------------------------------------
    def preflight(self) -> None:
        """What can be checked before anything starts: free ports, sekmet installed."""
        for name, port in (("service", self.addresses.port), ("FHIR server", self.addresses.fhir_port)):
            if port_taken(port):
                raise DemoError(
                    f"port {port} on {HOST} (the {name}) is in use: stop what holds it "
                    "(`make run`? another `make demo`?) or choose another port"
                )
        if not (self.sekmet.is_file() and os.access(self.sekmet, os.X_OK)):
            raise DemoError(
                f"the FHIR server (sekmet) is not installed at {self.sekmet}: run `make demo`, which "
                "installs it into .fhir-venv"
            )

    def start(self) -> None:
        self._start_fhir()
        self._load_scenarios()
        self._start_service()
        self._check_card()

    def _start_fhir(self) -> None:
        self.fhir = FhirTestServer(self.sekmet)
        try:
            self.fhir.start(port=self.addresses.fhir_port)
        except FhirServerError as exc:
            raise DemoError(str(exc).splitlines()[0]) from None

    def _load_scenarios(self) -> None:
        from .scenarios import all_scenarios

        assert self.fhir is not None
        now = datetime.now(UTC).replace(microsecond=0)
        scenarios = all_scenarios(now)
        for scenario in scenarios:
            try:
                self.fhir.post_transaction(scenario.bundle())
            except (AssertionError, requests.RequestException) as exc:
                raise DemoError(f"loading scenario {scenario.name} failed: {str(exc)[:200]}") from None
        self.loaded = len(scenarios)

    def _start_service(self) -> None:
        config = self.workdir / "cds-config.yaml"
        config.write_text(demo_settings(self.addresses, self.workdir, self.workers), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}  # the file decides
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.workdir / "metrics")
        (self.workdir / "metrics").mkdir()
        with open(self.log_path, "ab") as log:
            self.service = subprocess.Popen(
                [*_cds_service_command(), "serve", "--config", str(config)],
                cwd=PROJECT_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stopped by us, workers included (its process group)
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.service.poll() is not None:
                raise DemoError(f"cds-service serve stopped at start: {self.log_tail(1)}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.addresses.service}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise DemoError(f"cds-service serve did not answer /health within {START_TIMEOUT:g} s")

    def _check_card(self) -> None:
        """The printed curl must show a card: ask once, the way the curl does."""
        response = requests.post(self.addresses.hook, json=demo_hook_request(self.addresses), timeout=30)
        cards = response.json().get("cards") if response.status_code == 200 else None
        if not cards:
            raise DemoError(
                f"the demo hook call answered HTTP {response.status_code} without a card: "
                f"{response.text[:200]}"
            )
        self.card_summaries = [str(card.get("summary")) for card in cards]

    # -- run and stop -----------------------------------------------------------------------------
    def banner(self) -> str:
        a = self.addresses
        harness = "make harness"
        if a != DemoAddresses():
            harness += f" PORT={a.port} FHIR_PORT={a.fhir_port}"
        lines = [
            "",
            f"cds-service demo: up — {self.loaded} scenario patients (ids cdsh-…) in the FHIR server, "
            "their times relative to now",
            "",
            f"  discovery     {a.discovery}",
            f"  FHIR server   {a.fhir}   (sekmet, plain http, loopback only)",
            f"  service log   {self.log_path}",
            "",
            f"A card, right now (patient {DEMO_PATIENT}: neutropenic septic shock for 4 h):",
            "",
            f"  {curl_command(a)}",
            "",
            *(f"    → {summary}" for summary in self.card_summaries),
            "",
            "The integration harness against this demo (another terminal):",
            "",
            f"  {harness}",
            "",
            "The public CDS Hooks sandbox (a web page: your browser calls both loopback servers; "
            "allow it to reach localhost if it asks):",
            "",
            f"  {sandbox_url(a)}",
        ]
        if VENDORED_SANDBOX.is_dir():
            lines += [
                "",
                "  or its offline copy in ../shared:  python3 -m http.server 8088 --bind 127.0.0.1 "
                f"--directory {os.path.relpath(VENDORED_SANDBOX)}",
                f"  then open {sandbox_url(a, 'http://127.0.0.1:8088/')}",
            ]
        lines += [
            "",
            "The stories were written for the moment the demo started: the windows close after some "
            "hours (MSC 6 h). Restart to renew.",
            "Ctrl-C stops everything the demo started "
            f"(FHIR server pid {self.fhir_pid}, service pid {self.service_pid}).",
            "",
        ]
        return "\n".join(lines)

    @property
    def fhir_pid(self) -> int | None:
        process = self.fhir.process if self.fhir is not None else None
        return process.pid if process is not None else None

    @property
    def service_pid(self) -> int | None:
        return self.service.pid if self.service is not None else None

    def wait(self) -> str:
        """Block until a server stops by itself; returns which one."""
        while True:
            if self.service is not None and self.service.poll() is not None:
                return f"cds-service serve stopped (exit {self.service.returncode}): {self.log_tail(1)}"
            fhir_process = self.fhir.process if self.fhir is not None else None
            if fhir_process is not None and fhir_process.poll() is not None:
                return f"the FHIR server stopped (exit {fhir_process.returncode})"
            time.sleep(0.5)

    def log_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self) -> None:
        """Stop the service (its whole process group) and sekmet; remove the temporary folder."""
        service, self.service = self.service, None
        if service is not None and service.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.pid, signal.SIGTERM)  # gunicorn master and workers
            try:
                service.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.pid, signal.SIGKILL)
                service.wait(timeout=STOP_GRACE)
        if service is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.pid, signal.SIGKILL)  # a worker left behind by a crashed master
        if self.fhir is not None:
            self.fhir.stop()
            self.fhir = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def _stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM behaves like Ctrl-C: the finally clause stops everything


def run_demo(addresses: DemoAddresses, sekmet: Path, workers: int = 2) -> int:
    demo = Demo(addresses, sekmet, workers)
    previous = signal.signal(signal.SIGTERM, _stop_on_signal)
    started = time.monotonic()
    try:
        demo.preflight()
        print(
            f"cds-service demo: starting the FHIR server on {addresses.fhir}, loading the scenario "
            f"patients, starting the service on {addresses.service} …",
            file=sys.stderr,
            flush=True,
        )
        demo.start()
        print(demo.banner(), flush=True)
        print(f"(up in {time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
        reason = demo.wait()
        print(f"cds-service demo: {reason}; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncds-service demo: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        demo.stop()
        signal.signal(signal.SIGTERM, previous)


# -- command line -------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    sekmet = Path(args.sekmet) if args.sekmet else sekmet_binary()
    try:
        return run_demo(DemoAddresses(args.port, args.fhir_port), sekmet, args.workers)
    except DemoError as exc:
        raise InputError(str(exc)) from None


def register(subparsers: Any) -> None:
    """Add ``cds-service demo`` to the command line."""
    parser = subparsers.add_parser(
        "demo",
        help="run the service with a local FHIR server holding the scenario patients (Ctrl-C stops it)",
        description="Start the test FHIR server (sekmet) with the scenario patients, written for now, "
        "and the service configured for it, both on 127.0.0.1; print how to see cards. Ctrl-C stops both.",
    )
    parser.add_argument(
        "--port", type=tcp_port, default=DEFAULT_PORT, help=f"the service's port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--fhir-port",
        type=tcp_port,
        default=DEFAULT_FHIR_PORT,
        help=f"the FHIR server's port (default {DEFAULT_FHIR_PORT})",
    )
    parser.add_argument("--workers", type=int, default=2, help="gunicorn sync workers (default 2)")
    parser.add_argument(
        "--sekmet",
        default=None,
        help="the sekmet executable (default: .fhir-venv/bin/sekmet or $CDS_TEST_SEKMET)",
    )
    parser.set_defaults(func=cmd_demo)
