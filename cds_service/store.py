"""Persistent state: issued cards (the screening log), card feedback, the JWT ``jti`` replay cache and
the screening worksheet's sessions.

``open_store(url)`` returns a :class:`SqliteStore` (``sqlite:///relative/path`` or
``sqlite:////absolute/path``) or a :class:`PostgresStore` (``postgresql://user@host:port/db``). Both
keep the same tables and behave the same way; the SQL lives in :class:`Store` and the subclasses only
manage connections.

Schema versions: the schema is the numbered list ``MIGRATIONS``. Opening a store applies the ones it
lacks, in one transaction under a lock (so instances starting together migrate once), and records
them in ``schema_migrations``. A store made by release 0.1.0 (no versions yet) is upgraded in place.
How to add a migration: see the comment above ``Dialect`` below.

Feedback carries no patient id, so the issued-card row is what ties a card uuid back to its patient
and trial. That row *is* the screening log (one row per card) — there is no second copy. What a user
records in the screening worksheet is a row of the same table (``source`` = ``worksheet``, with the
user's ``fhirUser``), and a decision is feedback on that row: the screening log and the silencing
of cards read both alike. Patient ids live only here, and only for ``store.retention_days``
(:meth:`Store.purge_if_due`). Nothing secret (tokens, JWTs) is stored in the clear: a worksheet
session's access token is in its ``sealed`` blob, encrypted by the worksheet before it gets here, and
deleted with the session.

Concurrency model: one connection per thread, opened lazily and owned by the process that opened it.
Gunicorn forks workers after the app (and its store) is created, so a process never uses a connection
it inherited: it notices the pid change, abandons the inherited connections without closing them and
opens its own. SQLite connections that are idle when the process forks are closed just before the
fork (SQLite must not have a connection open across ``fork()``). Every write is one transaction (the
items of one feedback message, or the cards of one hook answer, go together: all or none) and every
insert is ``ON CONFLICT DO NOTHING``, so client retries are harmless.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CSV_COLUMNS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Feedback",
    "IssuedCard",
    "Migration",
    "OverrideInfo",
    "PostgresStore",
    "ScreeningEvent",
    "ScreeningLogRow",
    "SqliteStore",
    "Store",
    "WorksheetSessionRow",
    "export_screening_csv",
    "open_store",
]

log = logging.getLogger(__name__)

OUTCOMES = ("accepted", "overridden")
#: Where a screening-log row comes from: a card the hook returned, or a record made in the worksheet.
SOURCE_HOOK, SOURCE_WORKSHEET = "hook", "worksheet"
#: A worksheet launch (between the redirect to the EHR's authorization server and the way back) is
#: forgotten after this many seconds.
WORKSHEET_LAUNCH_SECONDS = 600.0
#: The reason code the service stores on accepted feedback that accepted the referral suggestion.
REFERRAL_REASON = "referral"
#: A remembered ``jti`` stays a replay for this long after the ``expires_at`` it was stored with.
JTI_GRACE_SECONDS = 600.0
#: Expired ``jti`` rows are purged at most this often (seconds) per store and process …
JTI_PURGE_INTERVAL = 300.0
#: … or after this many ``remember_jti`` calls, whichever comes first.
JTI_PURGE_EVERY = 1000
#: Retention purges (``store.retention_days``) run at most this often (seconds) per store and process.
RETENTION_PURGE_INTERVAL = 3600.0
SQLITE_BUSY_TIMEOUT_MS = 15_000
#: Below the hook deadline (3 s by default); libpq's smallest effective value is 2 s.
PG_CONNECT_TIMEOUT_SECONDS = 2
_PG_SCHEMA_LOCK_KEY = 0x0C_D5_5E_97  # pg_advisory_xact_lock key serialising schema creation


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class IssuedCard:
    """A card the service returned; ``status`` is the trial status at issue time."""

    card_uuid: str
    patient_id: str
    trial_id: str
    hook_instance: str
    issued_at: float  # epoch seconds, UTC
    status: str  # "eligible" | "possibly_eligible" | "upcoming"
    criteria_unmet: list[str] = field(default_factory=list)
    criteria_unknown: list[str] = field(default_factory=list)
    criteria_to_confirm: list[str] = field(default_factory=list)
    #: ``hook`` (a card the service returned) or ``worksheet`` (what a user recorded in the screening
    #: worksheet: the trial's status as the worksheet showed it, with who recorded it and the bedside
    #: checklist items they confirmed).
    source: str = SOURCE_HOOK
    recorded_by: str = ""  # the user's fhirUser (worksheet rows)
    checklist_confirmed: list[str] = field(default_factory=list)  # criterion ids (worksheet rows)
    #: Content hashes of the trial file and of the mapping files the decision was made with, so a
    #: coordinator auditing it later knows which rules made it ("" on rows of older releases).
    trial_version: str = ""
    mappings_version: str = ""


#: One screening-log entry per issued card: the same record, the same row.
ScreeningEvent = IssuedCard


@dataclass(frozen=True)
class Feedback:
    """One entry of a CDS Hooks feedback message, keyed by (card_uuid, outcome, outcome_timestamp)."""

    card_uuid: str
    outcome: str  # "accepted" | "overridden"
    outcome_timestamp: float  # epoch seconds, UTC
    received_at: float
    reason_code: str | None = None
    reason_display: str | None = None
    user_comment: str | None = None
    accepted_suggestions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OverrideInfo:
    """The latest override of a card for one patient and trial; ``status`` is the card's status."""

    card_uuid: str
    status: str
    time: float  # outcome timestamp, epoch seconds
    reason_code: str | None = None
    reason_display: str | None = None
    user_comment: str | None = None
    outcome: str = "overridden"  # "accepted" only from :meth:`Store.last_override_or_referral`

    @property
    def reason(self) -> str | None:
        return _reason_text(self.reason_code, self.reason_display, self.user_comment)


@dataclass(frozen=True)
class ScreeningLogRow:
    """One issued card joined with its latest feedback (``outcome`` is None when there is none)."""

    time: float
    patient_id: str
    trial_id: str
    status: str
    criteria_unmet: list[str]
    criteria_unknown: list[str]
    criteria_to_confirm: list[str]
    card_uuid: str
    outcome: str | None = None
    reason: str | None = None
    outcome_time: float | None = None
    source: str = SOURCE_HOOK
    recorded_by: str = ""
    checklist_confirmed: list[str] = field(default_factory=list)
    trial_version: str = ""
    mappings_version: str = ""


@dataclass(frozen=True)
class WorksheetSessionRow:
    """A worksheet session as stored: times in the clear, everything else in ``sealed`` (encrypted by
    the worksheet with its Fernet keys: the store never sees a token or a patient id in the clear)."""

    id_hash: str
    created_at: float
    last_seen: float
    expires_at: float
    sealed: str


def _override_info(
    card_uuid: str,
    status: str,
    outcome_ts: float,
    code: str | None,
    display: str | None,
    comment: str | None,
    outcome: str = "overridden",
) -> OverrideInfo:
    """An override (or referral) row of the store's queries."""
    return OverrideInfo(
        card_uuid=card_uuid,
        status=status,
        time=float(outcome_ts),
        reason_code=code,
        reason_display=display,
        user_comment=comment,
        outcome=outcome,
    )


def _reason_text(code: str | None, display: str | None, comment: str | None) -> str | None:
    base = display or code
    if comment:
        return f"{base} ({comment})" if base else comment
    return base


def _log_row(row: Sequence[Any]) -> ScreeningLogRow:
    """A row of the ``_SCREENING_LOG`` query as a :class:`ScreeningLogRow`."""
    issued_at, patient, trial, status, unmet, unknown, confirm, card_uuid, outcome, code, display = row[:11]
    comment, outcome_ts, source, recorded_by, checklist = row[11:16]
    trial_version, mappings_version = row[16:18] if len(row) >= 18 else ("", "")
    return ScreeningLogRow(
        time=float(issued_at),
        patient_id=patient,
        trial_id=trial,
        status=status,
        criteria_unmet=_load_list(unmet),
        criteria_unknown=_load_list(unknown),
        criteria_to_confirm=_load_list(confirm),
        card_uuid=card_uuid,
        outcome=outcome,
        reason=_reason_text(code, display, comment),
        outcome_time=None if outcome_ts is None else float(outcome_ts),
        source=source or SOURCE_HOOK,
        recorded_by=recorded_by or "",
        checklist_confirmed=_load_list(checklist),
        trial_version=trial_version or "",
        mappings_version=mappings_version or "",
    )


def _card_params(card: IssuedCard) -> tuple[Any, ...]:
    return (
        card.card_uuid,
        card.patient_id,
        card.trial_id,
        card.hook_instance,
        float(card.issued_at),
        card.status,
        _dump_list(card.criteria_unmet),
        _dump_list(card.criteria_unknown),
        _dump_list(card.criteria_to_confirm),
        card.source,
        card.recorded_by or None,
        _dump_list(card.checklist_confirmed) if card.source == SOURCE_WORKSHEET else None,
        card.trial_version or None,
        card.mappings_version or None,
    )


def _feedback_params(fb: Feedback) -> tuple[Any, ...]:
    return (
        fb.card_uuid,
        fb.outcome,
        float(fb.outcome_timestamp),
        float(fb.received_at),
        fb.reason_code,
        fb.reason_display,
        fb.user_comment,
        _dump_list(fb.accepted_suggestions),
    )


def _dump_list(items: Sequence[str]) -> str:
    return json.dumps([str(item) for item in items], ensure_ascii=False)


def _load_list(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [str(item) for item in value] if isinstance(value, list) else []


# ----------------------------------------------------------------------------------------------- SQL

_INSERT_CARD = """
INSERT INTO issued_card (card_uuid, patient_id, trial_id, hook_instance, issued_at, status,
                         criteria_unmet, criteria_unknown, criteria_to_confirm, source, recorded_by,
                         checklist_confirmed, trial_version, mappings_version)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (card_uuid) DO NOTHING
"""

_CARD_COLUMNS = """card_uuid, patient_id, trial_id, hook_instance, issued_at, status,
                   criteria_unmet, criteria_unknown, criteria_to_confirm, source, recorded_by,
                   checklist_confirmed, trial_version, mappings_version"""

_SELECT_CARD = f"SELECT {_CARD_COLUMNS} FROM issued_card WHERE card_uuid = ?"

_INSERT_FEEDBACK = """
INSERT INTO card_feedback (card_uuid, outcome, outcome_timestamp, received_at, reason_code,
                           reason_display, user_comment, accepted_suggestions)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (card_uuid, outcome, outcome_timestamp) DO NOTHING
"""

_SELECT_FEEDBACK = """
SELECT card_uuid, outcome, outcome_timestamp, received_at, reason_code, reason_display, user_comment,
       accepted_suggestions
FROM card_feedback WHERE card_uuid = ? ORDER BY outcome_timestamp, id
"""

# The silence look-ups start from the feedback given since the cut-off, newest first, and stop at the
# first one on this patient's card for this trial: their cost is bounded by the feedback given
# within the silence window across the site (clinicians act on few cards), not by how often this
# chart was opened within the retention period, as it was when they started from the patient's
# cards (every chart-open issues one per trial shown). `CROSS JOIN` keeps that order in SQLite,
# whose planner has no statistics and would start from the patient; PostgreSQL reads it as an inner
# join and plans it from its own.
_LAST_OVERRIDE = """
SELECT c.card_uuid, c.status, f.outcome_timestamp, f.reason_code, f.reason_display, f.user_comment
FROM card_feedback f CROSS JOIN issued_card c
WHERE f.outcome_timestamp >= ? AND f.outcome = 'overridden'
  AND c.card_uuid = f.card_uuid AND c.patient_id = ? AND c.trial_id = ?
ORDER BY f.outcome_timestamp DESC, f.id DESC
LIMIT 1
"""

_LAST_OVERRIDE_OR_REFERRAL = """
SELECT c.card_uuid, c.status, f.outcome_timestamp, f.reason_code, f.reason_display, f.user_comment,
       f.outcome
FROM card_feedback f CROSS JOIN issued_card c
WHERE f.outcome_timestamp >= ?
  AND (f.outcome = 'overridden' OR (f.outcome = 'accepted' AND f.reason_code = ?))
  AND c.card_uuid = f.card_uuid AND c.patient_id = ? AND c.trial_id = ?
ORDER BY f.outcome_timestamp DESC, f.id DESC
LIMIT 1
"""

# A row whose expiry (plus grace) has passed may be taken over by a new token with the same jti.
_REMEMBER_JTI = """
INSERT INTO jwt_jti (issuer, jti, expires_at) VALUES (?, ?, ?)
ON CONFLICT (issuer, jti) DO UPDATE SET expires_at = excluded.expires_at
WHERE jwt_jti.expires_at < ?
"""

_PURGE_JTI = "DELETE FROM jwt_jti WHERE expires_at < ?"

# Retention: feedback received before the cut-off or given on a card issued before it, then the cards.
_PURGE_FEEDBACK = """
DELETE FROM card_feedback
WHERE received_at < ? OR card_uuid IN (SELECT card_uuid FROM issued_card WHERE issued_at < ?)
"""
_PURGE_CARDS = "DELETE FROM issued_card WHERE issued_at < ?"

_SCREENING_LOG = """
SELECT c.issued_at, c.patient_id, c.trial_id, c.status, c.criteria_unmet, c.criteria_unknown,
       c.criteria_to_confirm, c.card_uuid, f.outcome, f.reason_code, f.reason_display, f.user_comment,
       f.outcome_timestamp, c.source, c.recorded_by, c.checklist_confirmed, c.trial_version,
       c.mappings_version
FROM issued_card c
LEFT JOIN (
    SELECT card_uuid, outcome, reason_code, reason_display, user_comment, outcome_timestamp,
           ROW_NUMBER() OVER (PARTITION BY card_uuid ORDER BY outcome_timestamp DESC, id DESC) AS rn
    FROM card_feedback
) f ON f.card_uuid = c.card_uuid AND f.rn = 1
{where}
ORDER BY c.issued_at, c.card_uuid
"""

# The latest worksheet record for a patient and trial, with its feedback (the decision) if any.
_LATEST_WORKSHEET_RECORD = """
SELECT c.issued_at, c.patient_id, c.trial_id, c.status, c.criteria_unmet, c.criteria_unknown,
       c.criteria_to_confirm, c.card_uuid, f.outcome, f.reason_code, f.reason_display, f.user_comment,
       f.outcome_timestamp, c.source, c.recorded_by, c.checklist_confirmed
FROM issued_card c LEFT JOIN card_feedback f ON f.card_uuid = c.card_uuid
WHERE c.patient_id = ? AND c.trial_id = ? AND c.source = ?
ORDER BY c.issued_at DESC, f.outcome_timestamp DESC
LIMIT ?
"""

_INSERT_WORKSHEET_LAUNCH = "INSERT INTO worksheet_launch (state_hash, created_at, sealed) VALUES (?, ?, ?)"
_SELECT_WORKSHEET_LAUNCH = "SELECT created_at, sealed FROM worksheet_launch WHERE state_hash = ?"
_DELETE_WORKSHEET_LAUNCH = "DELETE FROM worksheet_launch WHERE state_hash = ?"
_PURGE_WORKSHEET_LAUNCHES = "DELETE FROM worksheet_launch WHERE created_at < ?"
_INSERT_WORKSHEET_SESSION = """
INSERT INTO worksheet_session (id_hash, created_at, last_seen, expires_at, sealed) VALUES (?, ?, ?, ?, ?)
"""
_SELECT_WORKSHEET_SESSION = """
SELECT id_hash, created_at, last_seen, expires_at, sealed FROM worksheet_session WHERE id_hash = ?
"""
_TOUCH_WORKSHEET_SESSION = "UPDATE worksheet_session SET last_seen = ? WHERE id_hash = ?"
_DELETE_WORKSHEET_SESSION = "DELETE FROM worksheet_session WHERE id_hash = ?"
_PURGE_WORKSHEET_SESSIONS = "DELETE FROM worksheet_session WHERE last_seen < ? OR expires_at < ?"


# ------------------------------------------------------------------------------- schema migrations
#
# The schema is a numbered list of migrations, applied in order and recorded in ``schema_migrations``
# (one row per applied version). A new store runs all of them; a store of an earlier release runs
# the ones it lacks, in place, when the service opens it. Both backends run the same list.
#
# How to add a migration (a table, a column, an index):
#   1. Write a function ``_vN_what_it_adds(d: Dialect) -> list[str]`` returning the statements for
#      both backends; use ``d.real`` for floating-point columns and ``d.id_column`` for a surrogate
#      key (the only differences between SQLite and PostgreSQL so far). Each statement runs once,
#      inside the migration's transaction, under the schema lock: no ``IF NOT EXISTS`` needed.
#   2. Append ``Migration(N, "what it adds and why", _vN_what_it_adds)`` to ``MIGRATIONS``, N being
#      the last version + 1. Never edit or reorder a migration that has been released: stores
#      out there have already run it.
#   3. Keep it additive (new tables, new nullable columns or columns with a DEFAULT, new indexes):
#      several instances share one PostgreSQL store, and during a rolling upgrade the instances of
#      the previous release keep running on the upgraded schema.
#   4. tests/test_store_migrations.py upgrades a store made by release 0.1.0 to the latest version
#      on both backends and compares it with a new store: extend its row checks when the migration
#      moves data.


@dataclass(frozen=True)
class Dialect:
    """What differs between the backends in DDL."""

    name: str  # "sqlite" | "postgresql"
    real: str  # floating-point column type
    id_column: str  # an auto-incremented surrogate primary key


SQLITE_DIALECT = Dialect("sqlite", "REAL", "INTEGER PRIMARY KEY AUTOINCREMENT")
POSTGRES_DIALECT = Dialect(
    "postgresql", "DOUBLE PRECISION", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: Callable[[Dialect], list[str]]


def _v1_initial(d: Dialect) -> list[str]:
    """Release 0.1.0: issued cards (the screening log), card feedback, the jti replay cache."""
    return [
        f"""CREATE TABLE IF NOT EXISTS issued_card (
            card_uuid TEXT PRIMARY KEY,
            patient_id TEXT NOT NULL,
            trial_id TEXT NOT NULL,
            hook_instance TEXT,
            issued_at {d.real} NOT NULL,
            status TEXT NOT NULL,
            criteria_unmet TEXT NOT NULL,
            criteria_unknown TEXT NOT NULL,
            criteria_to_confirm TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS issued_card_patient_trial ON issued_card (patient_id, trial_id)",
        "CREATE INDEX IF NOT EXISTS issued_card_issued_at ON issued_card (issued_at)",
        f"""CREATE TABLE IF NOT EXISTS card_feedback (
            id {d.id_column},
            card_uuid TEXT NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('accepted', 'overridden')),
            outcome_timestamp {d.real} NOT NULL,
            received_at {d.real} NOT NULL,
            reason_code TEXT,
            reason_display TEXT,
            user_comment TEXT,
            accepted_suggestions TEXT NOT NULL,
            UNIQUE (card_uuid, outcome, outcome_timestamp)
        )""",
        f"""CREATE TABLE IF NOT EXISTS jwt_jti (
            issuer TEXT NOT NULL,
            jti TEXT NOT NULL,
            expires_at {d.real} NOT NULL,
            PRIMARY KEY (issuer, jti)
        )""",
        "CREATE INDEX IF NOT EXISTS jwt_jti_expires_at ON jwt_jti (expires_at)",
    ]


def _v2_retention(d: Dialect) -> list[str]:
    """Retention purges feedback by the time it was received (``store.retention_days``)."""
    return ["CREATE INDEX card_feedback_received_at ON card_feedback (received_at)"]


def _v3_worksheet(d: Dialect) -> list[str]:
    """The screening worksheet (SMART app): its sessions and pending launches, each an encrypted blob
    beside the times that expire it; and screening-log rows recorded in the worksheet, with the user
    (fhirUser) and the bedside checklist items confirmed. The new columns are nullable: rows of
    earlier releases, and of instances still on the previous release, are hook cards."""
    return [
        f"""CREATE TABLE worksheet_session (
            id_hash TEXT PRIMARY KEY,
            created_at {d.real} NOT NULL,
            last_seen {d.real} NOT NULL,
            expires_at {d.real} NOT NULL,
            sealed TEXT NOT NULL
        )""",
        "CREATE INDEX worksheet_session_last_seen ON worksheet_session (last_seen)",
        f"""CREATE TABLE worksheet_launch (
            state_hash TEXT PRIMARY KEY,
            created_at {d.real} NOT NULL,
            sealed TEXT NOT NULL
        )""",
        "ALTER TABLE issued_card ADD COLUMN source TEXT",
        "ALTER TABLE issued_card ADD COLUMN recorded_by TEXT",
        "ALTER TABLE issued_card ADD COLUMN checklist_confirmed TEXT",
    ]


def _v4_rules_versions(d: Dialect) -> list[str]:
    """Issue 14: each screening-log row records the content hash of the trial file and of the mapping
    files it was decided with. Nullable: rows of earlier releases have none, and instances of the
    previous release keep writing rows without them during a rolling upgrade."""
    return [
        "ALTER TABLE issued_card ADD COLUMN trial_version TEXT",
        "ALTER TABLE issued_card ADD COLUMN mappings_version TEXT",
    ]


def _v5_feedback_by_outcome_time(d: Dialect) -> list[str]:
    """Issue 17: the silence look-ups read the feedback given since a cut-off, newest first (its
    order, ties by id: in SQLite the id is the rowid every index ends with)."""
    return ["CREATE INDEX card_feedback_outcome_timestamp ON card_feedback (outcome_timestamp, id)"]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "issued cards, card feedback and the jti replay cache (release 0.1.0)", _v1_initial),
    Migration(2, "index feedback by time received, for retention purges", _v2_retention),
    Migration(3, "screening worksheet: sessions, launches, records with their user", _v3_worksheet),
    Migration(
        4, "the trial-file and mappings versions each screening decision was made with", _v4_rules_versions
    ),
    Migration(5, "index feedback by outcome time, for the silence look-ups", _v5_feedback_by_outcome_time),
)
#: The schema version this code writes and expects.
SCHEMA_VERSION = MIGRATIONS[-1].version

_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at {real} NOT NULL
)"""


class SchemaError(RuntimeError):
    """The store's schema cannot be brought to :data:`SCHEMA_VERSION`."""


def _pending_migrations(current: int) -> list[Migration]:
    return [m for m in MIGRATIONS if m.version > current]


def _table_exists(execute: Callable[..., Any], dialect: Dialect, table: str) -> bool:
    if dialect is SQLITE_DIALECT:
        rows = execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchall()
        return bool(rows)
    return execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is not None


def _schema_version(execute: Callable[..., Any], dialect: Dialect) -> int:
    """The highest applied migration; 0 for a new store and for one made by release 0.1.0."""
    if not _table_exists(execute, dialect, "schema_migrations"):
        return 0
    value = execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]
    return int(value or 0)


def _migrate(execute: Callable[..., Any], dialect: Dialect, where: str) -> list[int]:
    """Apply the pending migrations; the caller holds the schema lock inside one transaction."""
    placeholder = "?" if dialect is SQLITE_DIALECT else "%s"
    execute(_MIGRATIONS_TABLE.format(real=dialect.real))
    current = _schema_version(execute, dialect)
    applied: list[int] = []
    for migration in _pending_migrations(current):
        for statement in migration.statements(dialect):
            execute(statement)
        execute(
            "INSERT INTO schema_migrations (version, description, applied_at) "
            f"VALUES ({placeholder}, {placeholder}, {placeholder})",
            (migration.version, migration.description, time.time()),
        )
        applied.append(migration.version)
    if applied:
        log.info(
            "store schema upgraded",
            extra={"fields": {"store": where, "from_version": current, "to_version": applied[-1]}},
        )
    return applied


def _warn_if_newer(version: int, where: str) -> None:
    if version > SCHEMA_VERSION:
        # Migrations are additive, so this release can still run on it (a rolling upgrade or a rollback).
        log.warning(
            "store schema is newer than this release knows; running on it",
            extra={"fields": {"store": where, "version": version, "known_version": SCHEMA_VERSION}},
        )


# ------------------------------------------------------------------------------------ connections

# Connections inherited through fork(): kept referenced so they are never finalised (closed) in the
# child, which would disturb the parent's session or SQLite's file locks.
_ABANDONED: list[Any] = []
_FORK_LOCK = threading.Lock()


def _renew_fork_lock() -> None:
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()


class _Conn:
    """One thread's connection. ``lock`` is held while it is in use (and while it is being closed)."""

    __slots__ = ("closed", "lock", "raw", "thread")

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.thread = threading.current_thread()
        self.lock = threading.Lock()
        self.closed = False


class Store(ABC):
    """The service's persistent state. Thread-safe and fork-safe; see the module docstring."""

    #: "sqlite" or "postgresql"
    kind: str = ""
    _placeholder = "?"

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._local = threading.local()
        self._conns: list[_Conn] = []
        self._conns_lock = threading.Lock()
        self._jti_calls = 0
        self._last_purge = time.time()
        self._last_retention_purge = float("-inf")  # the first hook of a process purges

    # -- backend hooks ---------------------------------------------------------------------------

    @abstractmethod
    def _open(self) -> Any:
        """A new raw connection, ready for use (schema already ensured by the constructor)."""

    @abstractmethod
    def _write_raw(self, conn: Any, batch: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        """Run the statements in one transaction; the number of rows each changed."""

    @abstractmethod
    def _read_raw(self, conn: Any, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run one query and return all its rows."""

    def _is_broken(self, conn: Any, exc: Exception) -> bool:
        """Whether ``exc`` means ``conn`` is unusable and the statement may be retried on a new one."""
        return False

    # -- connection management -----------------------------------------------------------------

    def _check_pid(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with _FORK_LOCK:
            if self._pid == pid:
                return
            _ABANDONED.extend(holder.raw for holder in self._conns if not holder.closed)
            self._conns = []
            self._conns_lock = threading.Lock()
            self._local = threading.local()
            self._pid = pid

    def _holder(self) -> _Conn:
        self._check_pid()
        holder: _Conn | None = getattr(self._local, "conn", None)
        if holder is None or holder.closed:
            holder = _Conn(self._open())
            self._local.conn = holder
            with self._conns_lock:
                stale = [h for h in self._conns if h.closed or not h.thread.is_alive()]
                self._conns = [h for h in self._conns if h not in stale] + [holder]
            for old in stale:
                self._close_holder(old, blocking=False)
        return holder

    @contextlib.contextmanager
    def _connection(self) -> Iterator[_Conn]:
        while True:
            holder = self._holder()
            with holder.lock:
                if holder.closed:  # closed by close() or the pre-fork hook meanwhile
                    continue
                yield holder
                return

    def _close_holder(self, holder: _Conn, blocking: bool = True) -> bool:
        if not holder.lock.acquire(blocking=blocking):
            return False
        try:
            if not holder.closed:
                holder.closed = True
                with contextlib.suppress(Exception):
                    holder.raw.close()
            return True
        finally:
            holder.lock.release()

    def _run(self, write: bool, batch: Sequence[tuple[str, Sequence[Any]]]) -> Any:
        if self._placeholder != "?":
            batch = [(sql.replace("?", self._placeholder), params) for sql, params in batch]
        for attempt in range(2):
            with self._connection() as holder:
                try:
                    if write:
                        return self._write_raw(holder.raw, batch)
                    ((sql, params),) = batch
                    return self._read_raw(holder.raw, sql, params)
                except Exception as exc:
                    if attempt == 0 and self._is_broken(holder.raw, exc):
                        holder.closed = True
                        with contextlib.suppress(Exception):
                            holder.raw.close()
                        continue
                    raise
        raise AssertionError("unreachable")

    def _write(self, sql: str, params: Sequence[Any]) -> int:
        return int(self._run(True, [(sql, params)])[0])

    def _write_all(self, batch: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        """Several statements in one transaction: all of them are stored, or none."""
        return [int(changed) for changed in self._run(True, batch)] if batch else []

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._run(False, [(sql, params)]))

    @property
    def schema_version(self) -> int:
        """The highest migration applied to this store (see ``MIGRATIONS``)."""
        rows = self._read("SELECT MAX(version) FROM schema_migrations")
        return int(rows[0][0] or 0)

    def close(self) -> None:
        """Close this process's connections. The store stays usable: later calls reconnect."""
        self._check_pid()
        with self._conns_lock:
            holders, self._conns = self._conns, []
        for holder in holders:
            self._close_holder(holder)
        self._local = threading.local()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- cards and the screening log -----------------------------------------------------------

    def record_card(self, card: IssuedCard) -> None:
        """Remember an issued card (and so log the screening). Recording the same uuid again is a no-op."""
        self.record_cards([card])

    def record_cards(self, cards: Sequence[IssuedCard]) -> None:
        """Remember the cards of one hook answer in one transaction (idempotent per uuid)."""
        self._write_all([(_INSERT_CARD, _card_params(card)) for card in cards])

    def log_screening(self, row: ScreeningEvent) -> None:
        """Log an evaluation that produced a card: the issued-card row is the log row (idempotent)."""
        self.record_card(row)

    def get_card(self, card_uuid: str) -> IssuedCard | None:
        rows = self._read(_SELECT_CARD, (card_uuid,))
        if not rows:
            return None
        uuid_, patient, trial, hook_instance, issued_at, status, unmet, unknown, confirm = rows[0][:9]
        source, recorded_by, checklist, trial_version, mappings_version = rows[0][9:14]
        return IssuedCard(
            card_uuid=uuid_,
            patient_id=patient,
            trial_id=trial,
            hook_instance=hook_instance or "",
            issued_at=float(issued_at),
            status=status,
            criteria_unmet=_load_list(unmet),
            criteria_unknown=_load_list(unknown),
            criteria_to_confirm=_load_list(confirm),
            source=source or SOURCE_HOOK,
            recorded_by=recorded_by or "",
            checklist_confirmed=_load_list(checklist),
            trial_version=trial_version or "",
            mappings_version=mappings_version or "",
        )

    def screening_log(self, since: float | None = None, trial_id: str | None = None) -> list[ScreeningLogRow]:
        """Issued cards (oldest first) with their latest feedback; ``since`` filters on issue time."""
        conditions: list[str] = []
        params: list[Any] = []
        if since is not None:
            conditions.append("c.issued_at >= ?")
            params.append(float(since))
        if trial_id is not None:
            conditions.append("c.trial_id = ?")
            params.append(trial_id)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        return [_log_row(row) for row in self._read(_SCREENING_LOG.format(where=where), params)]

    # -- feedback --------------------------------------------------------------------------------

    def record_feedback(self, fb: Feedback) -> bool:
        """Store one feedback entry; False when the same (card, outcome, outcome time) is already stored.

        Feedback for a card uuid the store does not know is stored too (it never shows in the
        screening log, which starts from issued cards); callers may check :meth:`get_card` first.
        """
        return self.record_feedback_items([fb])[0]

    def record_feedback_items(self, items: Sequence[Feedback]) -> list[bool]:
        """Store the entries of one feedback message in one transaction: all of them, or none.

        Returns, per entry, False when the same (card, outcome, outcome time) was already stored.
        """
        for fb in items:
            if fb.outcome not in OUTCOMES:
                raise ValueError(f"feedback outcome must be one of {OUTCOMES}, not {fb.outcome!r}")
        changed = self._write_all([(_INSERT_FEEDBACK, _feedback_params(fb)) for fb in items])
        return [count > 0 for count in changed]

    def feedback_for_card(self, card_uuid: str) -> list[Feedback]:
        """Every stored feedback entry for one card, oldest outcome first."""
        return [
            Feedback(
                card_uuid=uuid_,
                outcome=outcome,
                outcome_timestamp=float(outcome_ts),
                received_at=float(received_at),
                reason_code=code,
                reason_display=display,
                user_comment=comment,
                accepted_suggestions=_load_list(accepted),
            )
            for uuid_, outcome, outcome_ts, received_at, code, display, comment, accepted in self._read(
                _SELECT_FEEDBACK, (card_uuid,)
            )
        ]

    def last_override(self, patient_id: str, trial_id: str, since: float) -> OverrideInfo | None:
        """The most recent override (outcome time >= ``since``) of any card for this patient and trial."""
        rows = self._read(_LAST_OVERRIDE, (float(since), patient_id, trial_id))
        return _override_info(*rows[0]) if rows else None

    def last_override_or_referral(self, patient_id: str, trial_id: str, since: float) -> OverrideInfo | None:
        """The latest override, or acceptance recorded as a referral (reason code :data:`REFERRAL_REASON`),
        with outcome time >= ``since``, of any card for this patient and trial."""
        rows = self._read(_LAST_OVERRIDE_OR_REFERRAL, (float(since), REFERRAL_REASON, patient_id, trial_id))
        return _override_info(*rows[0]) if rows else None

    # -- JWT replay cache -----------------------------------------------------------------------

    def remember_jti(self, issuer: str, jti: str, expires_at: float) -> bool:
        """Atomically remember a token id: True the first time, False for a replay.

        Pass the token's ``exp`` plus the allowed clock skew. A row counts as a replay until
        ``expires_at + JTI_GRACE_SECONDS``; expired rows are purged now and then.
        """
        now = time.time()
        fresh = self._write(_REMEMBER_JTI, (issuer, jti, float(expires_at), now - JTI_GRACE_SECONDS)) > 0
        self._jti_calls += 1  # a lost increment under a race only delays the purge
        if self._jti_calls >= JTI_PURGE_EVERY or now - self._last_purge >= JTI_PURGE_INTERVAL:
            self._jti_calls = 0
            self._last_purge = now
            self.purge_expired_jti(now)
        return fresh

    def purge_expired_jti(self, now: float | None = None) -> int:
        """Delete ``jti`` rows past their expiry plus grace; returns how many went."""
        now = time.time() if now is None else now
        return self._write(_PURGE_JTI, (now - JTI_GRACE_SECONDS,))

    # -- retention ------------------------------------------------------------------------------

    def purge_before(self, cutoff: float) -> tuple[int, int]:
        """Delete the cards issued before ``cutoff`` (the screening log's rows, with their patient ids)
        and the feedback received before it or given on those cards, in one transaction.

        Returns (cards, feedback items) deleted.
        """
        feedback_count, card_count = self._write_all(
            [(_PURGE_FEEDBACK, (float(cutoff), float(cutoff))), (_PURGE_CARDS, (float(cutoff),))]
        )
        if card_count or feedback_count:
            log.info(
                "retention purge",
                extra={"fields": {"cards": card_count, "feedback": feedback_count}},
            )
        return card_count, feedback_count

    def purge_if_due(self, retention_days: float, now: float | None = None) -> bool:
        """Run :meth:`purge_before` (now − ``retention_days``) at most once per
        :data:`RETENTION_PURGE_INTERVAL` per store and process; True when it ran."""
        now = time.time() if now is None else now
        if now - self._last_retention_purge < RETENTION_PURGE_INTERVAL:
            return False
        self._last_retention_purge = now  # a race only runs one more (idempotent) purge
        self.purge_before(now - float(retention_days) * 86400.0)
        return True

    # -- the screening worksheet --------------------------------------------------------------------

    def record_worksheet_entry(self, record: IssuedCard, feedback: Feedback | None = None) -> None:
        """What a user recorded in the worksheet, in one transaction: its screening-log row (source
        ``worksheet``, with the user and the checklist items confirmed) and, for a decision, a feedback
        entry on that row. The feedback is what silences the trial's cards for the patient, exactly as
        a clinician's feedback on a card does (:meth:`last_override_or_referral`)."""
        if record.source != SOURCE_WORKSHEET:
            raise ValueError("a worksheet record has source 'worksheet'")
        batch: list[tuple[str, Sequence[Any]]] = [(_INSERT_CARD, _card_params(record))]
        if feedback is not None:
            if feedback.card_uuid != record.card_uuid or feedback.outcome not in OUTCOMES:
                raise ValueError("the decision must be feedback on the worksheet record itself")
            batch.append((_INSERT_FEEDBACK, _feedback_params(feedback)))
        self._write_all(batch)

    def latest_worksheet_records(
        self, patient_id: str, trial_id: str, limit: int = 1
    ) -> list[ScreeningLogRow]:
        """The latest worksheet records for a patient and trial (newest first), with their decision."""
        rows = self._read(_LATEST_WORKSHEET_RECORD, (patient_id, trial_id, SOURCE_WORKSHEET, int(limit)))
        return [_log_row(row) for row in rows]

    def save_worksheet_launch(self, state_hash: str, created_at: float, sealed: str) -> None:
        """Remember a launch on its way to the authorization server, under the hash of its ``state``."""
        self._write(_INSERT_WORKSHEET_LAUNCH, (state_hash, float(created_at), sealed))

    def take_worksheet_launch(self, state_hash: str, now: float | None = None) -> tuple[float, str] | None:
        """The launch stored under ``state_hash``, removed so that it is used once (None when unknown,
        already used or older than :data:`WORKSHEET_LAUNCH_SECONDS`)."""
        now = time.time() if now is None else now
        rows = self._read(_SELECT_WORKSHEET_LAUNCH, (state_hash,))
        if not rows or self._write(_DELETE_WORKSHEET_LAUNCH, (state_hash,)) == 0:
            return None  # unknown, or another request took it first
        created_at, sealed = rows[0]
        if float(created_at) < now - WORKSHEET_LAUNCH_SECONDS:
            return None
        return float(created_at), sealed

    def create_worksheet_session(self, row: WorksheetSessionRow) -> None:
        self._write(
            _INSERT_WORKSHEET_SESSION,
            (row.id_hash, float(row.created_at), float(row.last_seen), float(row.expires_at), row.sealed),
        )

    def get_worksheet_session(self, id_hash: str) -> WorksheetSessionRow | None:
        rows = self._read(_SELECT_WORKSHEET_SESSION, (id_hash,))
        if not rows:
            return None
        id_, created_at, last_seen, expires_at, sealed = rows[0]
        return WorksheetSessionRow(id_, float(created_at), float(last_seen), float(expires_at), sealed)

    def touch_worksheet_session(self, id_hash: str, now: float) -> None:
        self._write(_TOUCH_WORKSHEET_SESSION, (float(now), id_hash))

    def delete_worksheet_session(self, id_hash: str) -> bool:
        """End a session: its row, with the encrypted tokens, is deleted. True when it existed."""
        return self._write(_DELETE_WORKSHEET_SESSION, (id_hash,)) > 0

    def purge_worksheet(self, now: float, idle_seconds: float) -> tuple[int, int]:
        """Delete sessions idle longer than ``idle_seconds`` or past their absolute end, and launches
        never completed; returns (sessions, launches) deleted."""
        sessions, launches = self._write_all(
            [
                (_PURGE_WORKSHEET_SESSIONS, (float(now) - float(idle_seconds), float(now))),
                (_PURGE_WORKSHEET_LAUNCHES, (float(now) - WORKSHEET_LAUNCH_SECONDS,)),
            ]
        )
        return sessions, launches


# ------------------------------------------------------------------------------------------- SQLite

_SQLITE_STORES: weakref.WeakSet[SqliteStore] = weakref.WeakSet()


class SqliteStore(Store):
    """SQLite in WAL mode; safe with several processes and threads (one connection per thread)."""

    kind = "sqlite"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            self._retry_locked(lambda: self._init_schema(conn))
        finally:
            conn.close()  # no connection stays open here: the app may fork right after this
        _SQLITE_STORES.add(self)

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # autocommit; transactions are explicit
            check_same_thread=False,  # only its own thread uses it, but close() may come from another
        )
        conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL mode (got {mode!r})")
        version = _schema_version(conn.execute, SQLITE_DIALECT)
        _warn_if_newer(version, str(self.path))
        if version >= SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")  # the schema lock: one process migrates, the others wait
        try:
            _migrate(conn.execute, SQLITE_DIALECT, str(self.path))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _retry_locked(action: Any, attempts: int = 5) -> Any:
        """Retry on 'database is locked' beyond the busy timeout (journal-mode switches, start-up)."""
        for attempt in range(attempts):
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or attempt == attempts - 1:
                    raise
                time.sleep(min(0.05 * (attempt + 1), 0.5))
        raise AssertionError("unreachable")

    def _open(self) -> sqlite3.Connection:
        return self._connect()

    def _write_raw(self, conn: sqlite3.Connection, batch: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        def attempt() -> list[int]:
            conn.execute("BEGIN IMMEDIATE")  # take the write lock up front: no deadlock on upgrade
            try:
                changed = [conn.execute(sql, params).rowcount for sql, params in batch]
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return changed

        return list(self._retry_locked(attempt))

    def _read_raw(self, conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._retry_locked(lambda: conn.execute(sql, params).fetchall())

    def _close_idle_before_fork(self) -> None:
        if self._pid != os.getpid():
            return
        with self._conns_lock:
            holders = list(self._conns)
        for holder in holders:
            self._close_holder(holder, blocking=False)  # one busy in another thread is abandoned


def _close_sqlite_before_fork() -> None:
    for store in list(_SQLITE_STORES):
        with contextlib.suppress(Exception):
            store._close_idle_before_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_close_sqlite_before_fork, after_in_child=_renew_fork_lock)


# --------------------------------------------------------------------------------------- PostgreSQL


class PostgresStore(Store):
    """PostgreSQL through psycopg 3: one autocommit connection per thread, schema created if missing."""

    kind = "postgresql"
    _placeholder = "%s"

    def __init__(self, url: str) -> None:
        import psycopg  # imported here so SQLite-only deployments never need libpq

        super().__init__()
        self._psycopg = psycopg
        self.url = url
        conn = self._open_unchecked()
        try:
            version = _schema_version(conn.execute, POSTGRES_DIALECT)
            _warn_if_newer(version, repr(self))
            if version < SCHEMA_VERSION:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK_KEY,))
                    _migrate(conn.execute, POSTGRES_DIALECT, repr(self))
        except BaseException:
            conn.close()
            raise
        self._adopt(conn)

    def __repr__(self) -> str:
        info = self._psycopg.conninfo.conninfo_to_dict(self.url)
        where = f"{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"
        return f"PostgresStore({where!r})"

    def _adopt(self, conn: Any) -> None:
        holder = _Conn(conn)
        self._local.conn = holder
        with self._conns_lock:
            self._conns.append(holder)

    def _open_unchecked(self) -> Any:
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in self.url:
            kwargs["connect_timeout"] = PG_CONNECT_TIMEOUT_SECONDS
        return self._psycopg.connect(self.url, **kwargs)

    def _open(self) -> Any:
        return self._open_unchecked()

    def _write_raw(self, conn: Any, batch: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        if len(batch) == 1:  # autocommit: one statement is its own transaction
            ((sql, params),) = batch
            return [int(conn.execute(sql, params).rowcount)]
        with conn.transaction():
            return [int(conn.execute(sql, params).rowcount) for sql, params in batch]

    def _read_raw(self, conn: Any, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return list(conn.execute(sql, params).fetchall())

    def _is_broken(self, conn: Any, exc: Exception) -> bool:
        return isinstance(exc, self._psycopg.OperationalError) and (conn.closed or conn.broken)


# ------------------------------------------------------------------------------------------ factory


def open_store(url: str) -> Store:
    """Open (creating if needed) the store named by ``url``.

    ``sqlite:///var/x.sqlite3`` is relative to the current directory (its parent folder is created),
    ``sqlite:////abs/x.sqlite3`` absolute; ``postgresql://`` / ``postgres://`` URLs go to libpq as-is.
    """
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path or path == ":memory:" or path.startswith("file:"):
            raise ValueError(f"store url {url!r}: give a database file path (in-memory SQLite is not shared)")
        return SqliteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    raise ValueError(f"store url {url!r}: expected sqlite:///path or postgresql://user@host:port/db")


# ---------------------------------------------------------------------------------------------- CSV

CSV_COLUMNS = (
    "time",
    "patient_id",
    "trial",
    "status",
    "criteria_unmet",
    "criteria_unknown",
    "criteria_to_confirm",
    "card_uuid",
    "outcome",
    "reason",
    "outcome_time",
    "source",
    "recorded_by",
    "checklist_confirmed",
    "trial_version",
    "mappings_version",
)

_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _free_text(text: str | None) -> str:
    """Free text typed by users must not become a spreadsheet formula when the CSV is opened."""
    if not text:
        return ""
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


def export_screening_csv(rows: Iterable[ScreeningLogRow], stream: IO[str]) -> int:
    """Write the screening log as CSV (header :data:`CSV_COLUMNS`); returns the number of data rows.

    Times are ISO 8601 UTC (``2024-05-01T13:45:00Z``), lists are joined with ``"; "``, a missing
    outcome is an empty cell. Open ``stream`` with ``newline=""``.
    """
    writer = csv.writer(stream)
    writer.writerow(CSV_COLUMNS)
    count = 0
    for row in rows:
        writer.writerow(
            (
                _iso(row.time),
                row.patient_id,
                row.trial_id,
                row.status,
                "; ".join(row.criteria_unmet),
                "; ".join(row.criteria_unknown),
                "; ".join(row.criteria_to_confirm),
                row.card_uuid,
                row.outcome or "",
                _free_text(row.reason),
                _iso(row.outcome_time),
                row.source,
                _free_text(row.recorded_by),
                "; ".join(row.checklist_confirmed),
                row.trial_version,
                row.mappings_version,
            )
        )
        count += 1
    return count
