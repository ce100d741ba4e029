"""The session fixture ``fhir_server``: a real FHIR R4 server for the whole test run.

The launcher is :mod:`cds_service.tools.fhir_server` (shared with the benchmark and the harness),
where the sekmet behaviour the tests rely on is written down. ``tests/conftest.py`` star-imports
this module, so every name in ``__all__`` (fixtures included) is available to all tests.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator

import pytest

from cds_service.tools.fhir_server import FhirTestServer, fhir_transaction, sekmet_binary

# Re-exported (see __all__) so that the conftest star-import also brings the fault server fixture in.
from tests.fault_server import fault_server

__all__ = [
    "FhirTestServer",
    "fault_server",
    "fhir_server",
    "fhir_transaction",
    "sekmet_binary",
]


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[FhirTestServer]:
    """A real FHIR R4 server (sekmet) for the whole test session: ``.base_url`` + helpers."""
    binary = sekmet_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(
            f"FHIR test server not found at {binary}: run `make test` (it installs the FHIR server into"
            " .fhir-venv), or set CDS_TEST_SEKMET to a sekmet executable"
        )
    server = FhirTestServer(binary)
    atexit.register(server.stop)  # even if pytest dies without running the fixture's finaliser
    try:
        server.start()
        yield server
    finally:
        server.stop()
        with contextlib.suppress(Exception):
            atexit.unregister(server.stop)
