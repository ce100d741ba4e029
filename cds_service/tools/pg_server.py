"""A throw-away PostgreSQL server (Debian's packages) for the tests and ``make probe``.

:class:`PostgresServer` runs one cluster in a temp dir — fresh data dir, trust auth, a free
127.0.0.1 port, its unix socket inside the temp dir — and always stops it and removes the directory
(``stop()``, and ``atexit`` as a fallback). The pytest fixtures that wrap it are in
``tests/pg_server.py``.

The binaries are looked up in ``$CDS_TEST_PG_BIN``, ``/usr/lib/postgresql/*/bin`` (newest first) and
``PATH`` (``make postgres-bin`` installs them). As root the server runs as the ``postgres`` OS user
(PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = [
    "TEST_DATABASE",
    "PostgresServer",
    "PostgresUnavailable",
    "create_database",
    "drop_database",
    "find_postgres_bin",
]

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30
TEST_DATABASE = "cds_test"
_PORT_ATTEMPTS = 5


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be run here (no binaries, or no OS user to run it as)."""


def find_postgres_bin() -> Path | None:
    """The folder holding ``initdb``, ``postgres`` and ``pg_ctl``, or None."""
    candidates: list[Path] = []
    if os.environ.get("CDS_TEST_PG_BIN"):
        candidates.append(Path(os.environ["CDS_TEST_PG_BIN"]))

    def version(path: str) -> tuple[int, ...]:
        match = re.search(r"/postgresql/([\d.]+)/bin", path)
        return tuple(int(part) for part in match.group(1).split(".") if part) if match else ()

    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True):
        candidates.append(Path(initdb).parent)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "postgres", "pg_ctl")):
            return folder
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec hook asking Linux to stop the server if the test process dies (best effort)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return hook


class PostgresServer:
    """One PostgreSQL cluster in a temp dir, started and stopped by the test session."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="cds-pg-"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_file = self.root / "postgres.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._run_as: dict[str, Any] = {}
        self._owner_pid = os.getpid()  # a forked test process must never stop the server
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                raise PostgresUnavailable(
                    "running as root and there is no 'postgres' OS user to run PostgreSQL as"
                ) from None
            self._run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self.socket_dir.mkdir()
        if self._run_as:
            os.chown(self.socket_dir, self._run_as["user"], self._run_as["group"])
        atexit.register(self.stop)

    # -- process control ------------------------------------------------------------------------

    def _command(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, cwd=self.root, capture_output=True, text=True, timeout=timeout, check=False, **self._run_as
        )

    def init(self) -> None:
        result = self._command(
            [
                str(self.bin_dir / "initdb"),
                "-D", str(self.data_dir),
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def start(self) -> None:
        last_log = ""
        for _ in range(_PORT_ATTEMPTS):
            self.port = _free_port()
            with open(self.log_file, "ab") as log:
                self.process = subprocess.Popen(
                    [
                        str(self.bin_dir / "postgres"),
                        "-D", str(self.data_dir),
                        "-p", str(self.port),
                        "-k", str(self.socket_dir),
                        "-c", "listen_addresses=127.0.0.1",
                        "-c", "max_connections=200",
                        "-c", "fsync=off",
                        "-c", "synchronous_commit=off",
                        "-c", "full_page_writes=off",
                    ],
                    cwd=self.root,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent(),  # runs before any test thread exists
                    **self._run_as,
                )  # fmt: skip
            if self._wait_ready():
                return
            last_log = self.log_file.read_text(errors="replace")[-4000:]
            self._stop_process()
            if "could not bind" not in last_log and "already in use" not in last_log:
                break
        raise RuntimeError(f"PostgreSQL did not start; log tail:\n{last_log}")

    def _wait_ready(self) -> bool:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with psycopg.connect(self.admin_url, connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def _stop_process(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self._command(
                [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "stop", "-m", "fast", "-w",
                 "-t", str(STOP_TIMEOUT_SECONDS)],
                timeout=STOP_TIMEOUT_SECONDS + 10,
            )  # fmt: skip
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def stop(self) -> None:
        """Stop the server (fast shutdown, SIGKILL if it hangs) and remove its directory. Idempotent."""
        if os.getpid() != self._owner_pid:
            return
        try:
            self._stop_process()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- databases ------------------------------------------------------------------------------

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def create_database(self, name: str) -> str:
        return create_database(self.admin_url, name)

    def drop_database(self, name: str) -> None:
        drop_database(self.admin_url, name)


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"unsafe database name {name!r}")
    return name


def _database_url(admin_url: str, name: str) -> str:
    """``admin_url`` (URL or key=value conninfo) pointed at database ``name``, as a URL."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(admin_url)
    user = quote(str(params.get("user") or "postgres"), safe="")
    password = f":{quote(str(params['password']), safe='')}" if params.get("password") else ""
    host = params.get("host") or "127.0.0.1"
    port = params.get("port") or "5432"
    return f"postgresql://{user}{password}@{host}:{port}/{name}"


def create_database(admin_url: str, name: str) -> str:
    """Create database ``name`` (if missing) through ``admin_url``; returns a URL to it."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{_check_name(name)}"')
    return _database_url(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{_check_name(name)}" WITH (FORCE)')
