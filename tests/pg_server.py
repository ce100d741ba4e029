"""Pytest fixtures running a throw-away PostgreSQL server for the store tests.

``pg_url`` (session) starts one server for the whole run (:class:`cds_service.tools.pg_server.PostgresServer`:
fresh data dir, trust auth, a free 127.0.0.1 port, its unix socket inside the temp dir) and yields
``postgresql://postgres@127.0.0.1:<port>/cds_test``. ``pg_fresh_url`` (function) gives each test its
own new database on that server and drops it afterwards. The server is always stopped and its
directory removed (teardown, and ``atexit`` as a fallback).

Without the binaries the tests that need PostgreSQL skip (fail in CI: ``needs_infrastructure``). Set
``CDS_TEST_POSTGRES_URL`` to an existing server's admin URL (a role that may create databases) to use
it instead of starting one.

Import with ``from tests.pg_server import *`` in a conftest.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

from cds_service.tools.pg_server import (
    TEST_DATABASE,
    PostgresServer,
    PostgresUnavailable,
    create_database,
    drop_database,
    find_postgres_bin,
)
from tests.infrastructure import needs_infrastructure

__all__ = ["PostgresServer", "find_postgres_bin", "pg_fresh_url", "pg_server", "pg_url"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer | str]:
    """The running server (or the external admin URL from ``CDS_TEST_POSTGRES_URL``)."""
    external = os.environ.get("CDS_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    bin_dir = find_postgres_bin()
    needs_infrastructure(
        "PostgreSQL server binaries (initdb, postgres, pg_ctl in /usr/lib/postgresql/*/bin or PATH)",
        bin_dir is not None,
        "run `make postgres-bin`, or set CDS_TEST_POSTGRES_URL to a server",
    )
    assert bin_dir is not None
    try:
        server = PostgresServer(bin_dir)
    except PostgresUnavailable as exc:
        needs_infrastructure(
            "a 'postgres' OS user to run PostgreSQL as (PostgreSQL refuses to run as root)",
            False,
            f"install Debian's postgresql package (`make postgres-bin`), which creates it ({exc})",
        )
        raise
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()


def _admin_url(server: PostgresServer | str) -> str:
    return server if isinstance(server, str) else server.admin_url


@pytest.fixture(scope="session")
def pg_url(pg_server: PostgresServer | str) -> str:
    """``postgresql://postgres@127.0.0.1:<port>/cds_test`` on the session's server."""
    return create_database(_admin_url(pg_server), TEST_DATABASE)


@pytest.fixture
def pg_fresh_url(pg_server: PostgresServer | str) -> Iterator[str]:
    """A URL to a brand-new, empty database, dropped (forcibly) after the test."""
    name = f"cds_t_{uuid.uuid4().hex[:16]}"
    admin = _admin_url(pg_server)
    url = create_database(admin, name)
    try:
        yield url
    finally:
        with contextlib.suppress(Exception):
            drop_database(admin, name)
