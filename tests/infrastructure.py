"""Test infrastructure a test needs (PostgreSQL, the FHIR server, ../shared, Chromium, node, …):
skipped on a developer's machine when missing, a FAILURE in CI.

Every test, fixture or helper that cannot run without a piece of infrastructure calls the one
helper, re-exported by ``tests/conftest.py``::

    from tests.conftest import needs_infrastructure

    needs_infrastructure("node", shutil.which("node") is not None, "make test installs Node.js")

Without the infrastructure it skips — unless ``CI`` is set (CI runs ``.ci/run`` with ``CI=true``),
where it fails the test with the same message: CI must never go green with its infrastructure
skipped. ``tests/conftest.py`` also turns any other skip into a failure in CI, and ends every run
with one line counting the skips.
"""

from __future__ import annotations

import os

import pytest

from cds_service.base.config import PROJECT_ROOT

#: ``../shared`` beside the checkout: the seed documents, reference files and vendored tools.
SHARED_DIR = PROJECT_ROOT.parent / "shared"
#: Every skip of this run, "test id: reason", including those turned into failures in CI (the
#: last line of the run counts them: tests/conftest.py).
SKIPS: list[str] = []


def in_ci() -> bool:
    """True when ``CI`` is set to anything but an empty string, 0, false or no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def needs_infrastructure(what: str, available: bool, how_to_get_it: str) -> None:
    """Skip (locally) or fail (in CI) the calling test when ``available`` is false.

    ``what`` names the missing piece ("PostgreSQL server binaries"), ``how_to_get_it`` tells a
    developer how to get it ("run `make postgres-bin`"). Works in tests and in fixtures (a fixture
    of any scope: every test using it skips, or fails in CI).
    """
    if available:
        return
    message = f"needs {what}: {how_to_get_it}"
    if in_ci():
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        SKIPS.append(f"{test}: {message}")
        pytest.fail(f"{message} — missing in CI, where tests may not skip", pytrace=False)
    pytest.skip(message)
