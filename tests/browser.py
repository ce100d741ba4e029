"""What the browser tests share: Debian's Chromium driven by Playwright, and the built CDS Hooks
sandbox (``../shared/vendor/cds-hooks-sandbox/build/``) served as static files on 127.0.0.1.

Playwright's own browser download is never used. In CI a missing Playwright, Chromium or sandbox
build fails the test; elsewhere it skips (tests/infrastructure.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cds_service.tools.sandbox_client import SANDBOX_BUILD, SandboxBuildError, SandboxSigner
from tests.infrastructure import needs_infrastructure

try:  # the dev extra installs it; missing, chromium() fails in CI and skips elsewhere
    from playwright.sync_api import Browser, sync_playwright
except ImportError:  # pragma: no cover - checked by needs_infrastructure()
    Browser = Any  # type: ignore[assignment,misc]
    sync_playwright = None  # type: ignore[assignment]

#: Debian's Chromium (``make test`` installs it).
CHROMIUM = Path(os.environ.get("CDS_TEST_CHROMIUM", "/usr/bin/chromium"))
#: Chromium as root on a machine with a closed network: without the background-networking flags
#: its connections are refused many at a time.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless. One per test module: Playwright's sync API cannot run twice at
    once in a process."""
    needs_infrastructure(
        "Playwright for Python", sync_playwright is not None, "run `make dev` (the dev extra)"
    )
    needs_infrastructure(
        f"Debian's Chromium at {CHROMIUM}",
        CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK),
        "run `make chromium-bin` (apt-get install chromium)",
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def served_sandbox() -> Iterator[str]:
    """The built sandbox on a free 127.0.0.1 port; yields its base URL."""
    needs_infrastructure(
        f"the built CDS Hooks sandbox in {SANDBOX_BUILD}",
        SANDBOX_BUILD.joinpath("index.html").is_file(),
        "put ../shared beside the checkout (../shared/vendor/README.md)",
    )
    handler = functools.partial(_QuietFiles, directory=str(SANDBOX_BUILD))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def sandbox_trusted_client() -> dict[str, dict[str, str]]:
    """``security.trusted_clients`` for the vendored sandbox offline (docs/security.md): its issuer
    with its public key pinned, since the jku's host is unreachable here. A missing sandbox build
    fails in CI and skips elsewhere (tests/infrastructure.py)."""
    try:
        issuer = SandboxSigner.from_build(SANDBOX_BUILD).issuer
    except SandboxBuildError as exc:
        needs_infrastructure(
            "the vendored CDS Hooks sandbox build", False, f"{exc}: put ../shared beside the checkout"
        )
    return {issuer: {"jwks_file": str(SANDBOX_BUILD / ".well-known" / "jwks.json")}}
