"""The SMART Health IT launcher, a real SMART on FHIR authorization server, for the worksheet's tests.

``make test`` copies ``../shared/vendor/smart-launcher-v2`` into ``.cache/smart-launcher`` and runs
``npm ci`` there (``.ci/npm-install``). :class:`SmartLauncher` starts it with node from the machine on
a free 127.0.0.1 port, in front of the test FHIR server, and always stops it (by pid; the kernel
also sends it SIGTERM should the test process die). What it does is in ``../shared/vendor/README.md``:

- its FHIR base is ``{url}/v/r4/fhir`` (discovery at ``.well-known/smart-configuration`` there);
- an EHR launch opens ``<app launch URL>?iss=<FHIR base>&launch=<code>``, the code being the
  base64url JSON list built by :func:`launch_code` (one patient, one provider, no encounter and the
  skip flags give no screen at all, so an HTTP client following redirects completes the flow);
- ``FHIR base`` can also be ``{url}/v/r4/sim/<code>/fhir``: the code then applies to a standalone
  launch, and its ``fhir_server`` item puts another FHIR server behind the launcher;
- ``auth_error`` simulates errors: ``auth_invalid_scope`` and ``auth_invalid_client_id`` come back on
  the callback as ``error=…``; ``token_invalid_token`` fails the token request;
  ``request_invalid_token`` makes the FHIR proxy answer 401.

Its limits: the FHIR proxy enforces no token or scope, and codes can be replayed. It tests the app's
side of the launch, not the EHR's security.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from cds_service.base.config import PROJECT_ROOT
from cds_service.tools.fhir_server import die_with_parent, free_port

LAUNCHER_DIR = Path(os.environ.get("CDS_TEST_SMART_LAUNCHER", PROJECT_ROOT / ".cache" / "smart-launcher"))
START_TIMEOUT = 90.0  # ts-node compiles the TypeScript at start: ~10 s here, more on a loaded machine
STOP_GRACE = 5.0
#: The launch types of the code (src/isomorphic/codec.ts).
PROVIDER_EHR, PROVIDER_STANDALONE = 0, 2


def launch_code(
    patient: str,
    provider: str,
    *,
    launch_type: int = PROVIDER_EHR,
    auth_error: str = "",
    client_id: str = "",
    client_secret: str = "",
    client_type: int = 0,
    fhir_server: str = "",
    scope: str = "",
) -> str:
    """The launcher's launch code: base64url (no padding) of its 17-item JSON list."""
    items = [
        launch_type,
        patient,
        provider,
        "NONE",  # encounter: none (AUTO would need an Encounter; MANUAL a screen)
        1,  # skip_login
        1,  # skip_auth
        0,  # sim_ehr: 0 = the app shows its own patient banner (need_patient_banner true)
        scope,
        "",  # redirect_uris ("" = any)
        client_id,
        client_secret,
        auth_error,
        "",  # jwks_url
        "",  # jwks
        client_type,  # 0 public, 1 confidential-symmetric
        2,  # pkce: always
        fhir_server,
    ]
    raw = json.dumps(items, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class LauncherError(RuntimeError):
    pass


class SmartLauncher:
    """A running launcher process (``node`` + ``ts-node``, no build) in front of a FHIR server."""

    def __init__(self, fhir_base: str, directory: Path = LAUNCHER_DIR) -> None:
        self.fhir_base = fhir_base
        self.directory = directory
        self.port = 0
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="smart-launcher-", suffix=".log")[1])

    @staticmethod
    def installed() -> bool:
        """True when ``make npm-tools`` has installed the launcher (its ts-node is there)."""
        return (LAUNCHER_DIR / "node_modules" / ".bin" / "ts-node").exists()

    @property
    def fhir_url(self) -> str:
        """The FHIR base through the launcher (what an EHR launch gives as ``iss``)."""
        return f"{self.url}/v/r4/fhir"

    def sim_fhir_url(self, code: str) -> str:
        return f"{self.url}/v/r4/sim/{code}/fhir"

    def start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "NODE_ENV": "production",  # in development its screens redirect to a fixed localhost:8444
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "FHIR_SERVER_R4": self.fhir_base,
            "FHIR_SERVER_R3": "",
            "FHIR_SERVER_R2": "",
            "SECRET": os.urandom(16).hex(),
        }
        command = [
            str(self.directory / "node_modules" / ".bin" / "ts-node"),
            "--skipProject",
            "--transpile-only",
            "backend/index.ts",
        ]
        with self._log.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.directory,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # Linux only, before exec
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LauncherError(f"the SMART launcher exited at start: {self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.fhir_url}/.well-known/smart-configuration", timeout=1).ok:
                    return
            time.sleep(0.2)
        self.stop()
        raise LauncherError(f"the SMART launcher did not start in {START_TIMEOUT:g} s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self._log.read_text(encoding="utf-8", errors="replace")[-chars:]
        return ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_GRACE)
        with contextlib.suppress(OSError):
            self._log.unlink()
