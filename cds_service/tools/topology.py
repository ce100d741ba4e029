"""The production topology, run here: nginx (Debian's package) with TLS in front of N service
instances (``cds-service serve``) sharing one store. Used by tests/test_topology.py and ``make probe``.

* :class:`ServiceInstance` — one ``cds-service serve`` in a subprocess (its own process group, so
  that it can be stopped or killed whole), on a free loopback port.
* :func:`self_signed_certificate` — a certificate for ``localhost`` / ``127.0.0.1`` made now.
* :class:`Nginx` — nginx running the shipped ``docker/nginx/cds-service.conf.template`` (rendered
  with :func:`render_site`, as ``envsubst`` would) inside a main configuration of its own: pid, logs
  and temporary files in a work folder, nothing of the machine's nginx touched.

Everything is stopped by pid (SIGTERM, then SIGKILL after a grace period); on Linux the kernel also
stops the children should the parent die without cleaning up.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import requests

from ..base.config import PROJECT_ROOT
from .fhir_server import die_with_parent, free_port

SITE_TEMPLATE = PROJECT_ROOT / "docker" / "nginx" / "cds-service.conf.template"
STOP_GRACE_SECONDS = 15.0
_VARIABLE = re.compile(r"\$\{(CDS_[A-Z_]+)\}")


class TopologyError(RuntimeError):
    """A part of the topology could not be started."""


def find_nginx() -> Path | None:
    """The nginx binary (Debian: /usr/sbin/nginx, installed by ``make nginx-bin``), or None."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    return Path(found) if found else None


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TopologyError(f"{what} exited early:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TopologyError(f"{what} did not listen on {port} within {timeout} s")


def _stop_group(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal the process group, wait, then SIGKILL it if it is still there."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # workers left behind by a killed master
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def _running(pid: int) -> bool:
    """The process exists and has not exited (a zombie has released its sockets already)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cds_service_command() -> list[str]:
    script = Path(sys.executable).parent / "cds-service"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cds_service.cli"]


class ServiceInstance:
    """``cds-service serve`` in a subprocess on a free 127.0.0.1 port.

    ``env`` holds ``CDS_*`` settings (the rest of the environment is inherited without ``CDS_*``).
    """

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        *,
        name: str = "instance",
        workers: int = 2,
        threads: int | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.name = name
        self.port = port or free_port()
        self.env = dict(env)
        self.workers = workers
        self.threads = threads
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> ServiceInstance:
        self.workdir.mkdir(parents=True, exist_ok=True)
        temp = self.workdir / f"{self.name}-tmp"
        temp.mkdir(exist_ok=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CDS_") and k != "PROMETHEUS_MULTIPROC_DIR"
        }
        env.update({"TMPDIR": str(temp), "CDS_LOGGING_LEVEL": "WARNING", **self.env})
        args = [*_cds_service_command(), "serve", "--port", str(self.port), "--workers", str(self.workers)]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise TopologyError(f"{self.name} exited early:\n{self.log()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise TopologyError(f"{self.name} did not answer /health:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
            return [int(pid) for pid in children.split()]
        return []

    def pids(self) -> list[int]:
        return ([self.process.pid] if self.process else []) + self.worker_pids()

    def stop(self) -> None:
        if self.process is not None:
            _stop_group(self.process)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL to the master and its workers at once: the instance dies mid-request. Returns once
        every one of its processes has exited (a worker outlives its master by a moment, and while
        it lives the listening socket still accepts connections)."""
        if self.process is None:
            return
        pids = self.pids()
        _stop_group(self.process, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.005)

    def __enter__(self) -> ServiceInstance:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def self_signed_certificate(folder: Path, names: Iterable[str] = ("localhost",)) -> tuple[Path, Path]:
    """A new key and self-signed certificate for ``names`` and 127.0.0.1: (certificate, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    names = list(names)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.UTC)
    alternative = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cds-test.crt", folder / "cds-test.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def render_site(values: dict[str, str], template: Path = SITE_TEMPLATE) -> str:
    """The site template with its ``${CDS_*}`` names replaced (nginx's own ``$variables`` stay)."""
    text = template.read_text(encoding="utf-8")
    missing = sorted({name for name in _VARIABLE.findall(text) if name not in values})
    if missing:
        raise TopologyError(f"{template}: no value for {', '.join(missing)}")
    return _VARIABLE.sub(lambda match: values[match.group(1)], text)


class Nginx:
    """nginx with the shipped site configuration, TLS on a free port, in front of ``upstreams``."""

    def __init__(
        self,
        workdir: Path,
        upstreams: Iterable[str],
        *,
        max_body_size: str = "64m",
        port: int | None = None,
        binary: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.binary = binary or find_nginx()
        if self.binary is None:
            raise TopologyError("nginx is not installed: run `make nginx-bin` (Debian package nginx)")
        self.upstreams = list(upstreams)
        self.max_body_size = max_body_size
        self.process: subprocess.Popen[bytes] | None = None
        self.certificate, self.key = self_signed_certificate(workdir / "tls")

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    def site(self) -> str:
        return render_site(
            {
                "CDS_LISTEN": f"127.0.0.1:{self.port} ssl",
                "CDS_SERVER_NAME": "localhost",
                "CDS_TLS_CERTIFICATE": str(self.certificate),
                "CDS_TLS_CERTIFICATE_KEY": str(self.key),
                "CDS_UPSTREAM_SERVERS": " ".join(f"server {u};" for u in self.upstreams),
                "CDS_MAX_BODY_SIZE": self.max_body_size,
            }
        )

    def main_configuration(self) -> str:
        temp = self.workdir / "temp"
        user = "user root;\n" if os.geteuid() == 0 else ""  # temp files in a folder only root may use
        return (
            f"{user}worker_processes 1;\n"
            f"pid {self.workdir / 'nginx.pid'};\n"
            f"error_log {self.error_log} warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            "    access_log off;\n"
            f"    client_body_temp_path {temp / 'body'};\n"
            f"    proxy_temp_path {temp / 'proxy'};\n"
            f"    fastcgi_temp_path {temp / 'fastcgi'};\n"
            f"    uwsgi_temp_path {temp / 'uwsgi'};\n"
            f"    scgi_temp_path {temp / 'scgi'};\n"
            f"    include {self.workdir / 'cds-service.conf'};\n"
            "}\n"
        )

    def start(self, timeout: float = 30.0) -> Nginx:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "temp").mkdir(exist_ok=True)
        (self.workdir / "cds-service.conf").write_text(self.site(), encoding="utf-8")
        main = self.workdir / "nginx.conf"
        main.write_text(self.main_configuration(), encoding="utf-8")
        check = subprocess.run(
            [str(self.binary), "-t", "-q", "-p", str(self.workdir), "-c", str(main)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            raise TopologyError(f"nginx -t refused the configuration:\n{check.stderr}")
        log = self.workdir / "nginx.out"
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [str(self.binary), "-p", str(self.workdir), "-c", str(main), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        _wait_for_port(self.port, self.process, timeout, "nginx", log)
        return self

    def stop(self) -> None:
        if self.process is not None:
            _stop_group(self.process, signal.SIGQUIT)  # graceful: finish the requests in flight

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
