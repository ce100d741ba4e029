"""Worksheet sessions and launches, kept server-side in the store and sealed with Fernet.

- **The cookie holds a random session id only** (256 bits). The store keeps its SHA-256, so neither
  a copy of the store nor its backups let anyone take over a session.
- **Everything else is sealed**: the access token, the patient id, the user, the CSRF token and the
  FHIR base are one JSON document encrypted with the first of ``worksheet.token_keys`` (Fernet:
  AES-128-CBC + HMAC-SHA256, from ``cryptography``); every key of the list can open it, so keys
  rotate by putting a new one first. Nothing of it reaches the cookie or the log.
- **Limits**: a session ends after ``worksheet.idle_minutes`` without a request and
  ``worksheet.max_hours`` after it began, and when the EHR's access token expires. An ended session's
  row, with its sealed tokens, is deleted on the spot; rows nobody comes back for are purged.
- **Launches** (the trip to the authorization server and back) are stored the same way under the
  SHA-256 of their ``state``, with a second random value the browser keeps in a short-lived cookie:
  a callback is accepted once, within ten minutes, and only in the browser that started it.

Instances sharing one store (PostgreSQL) share the sessions: any instance can serve any request,
provided they have the same ``worksheet.token_keys``.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..store import Store, WorksheetSessionRow

#: Purges of abandoned sessions and launches run at most this often per process (seconds).
PURGE_INTERVAL = 60.0


class SessionProblem(Exception):
    """No usable session. ``reason`` chooses the page: ``none`` (no cookie or unknown session),
    ``idle``, ``expired`` (the absolute limit), ``token_expired`` (the EHR's access token),
    ``unreadable`` (sealed with a key no longer configured)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LaunchProblem(Exception):
    """The callback does not match a launch this browser started (unknown, reused, expired state)."""


def digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


class Sealer:
    """Fernet encryption with key rotation: the first key seals, every key opens."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("worksheet.token_keys is empty")
        self._fernet = MultiFernet([Fernet(key.encode("ascii")) for key in keys])

    def seal(self, payload: dict[str, Any]) -> str:
        return self._fernet.encrypt(orjson.dumps(payload)).decode("ascii")

    def open(self, sealed: str) -> dict[str, Any] | None:
        try:
            value = orjson.loads(self._fernet.decrypt(sealed.encode("ascii")))
        except (InvalidToken, ValueError, orjson.JSONDecodeError):
            return None
        return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class WorksheetSession:
    """A user's session: who, which patient, which FHIR server, and the EHR's access token."""

    id_hash: str
    created_at: float
    iss: str
    patient_id: str
    user: str  # fhirUser of the id_token
    access_token: str
    token_expires_at: float
    scope: str
    csrf: str
    trial: str | None  # the trial the launch was about (appContext), if any
    need_patient_banner: bool
    encounter_id: str | None = None

    def __repr__(self) -> str:  # never the token or the patient id
        return f"WorksheetSession(user={self.user!r})"

    def sealed_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        del fields["id_hash"], fields["created_at"]
        return fields


@dataclass(frozen=True)
class Cookies:
    """Cookie names and flags: ``__Host-`` names when Secure (no Domain, Path=/, HTTPS only)."""

    secure: bool
    samesite: str

    @property
    def session(self) -> str:
        return "__Host-worksheet-session" if self.secure else "worksheet-session"

    @property
    def launch(self) -> str:
        return "__Host-worksheet-launch" if self.secure else "worksheet-launch"

    def flags(self) -> dict[str, Any]:
        return {"secure": self.secure, "httponly": True, "samesite": self.samesite, "path": "/"}


class Sessions:
    """Creates, finds and ends sessions and launches in the store."""

    def __init__(
        self,
        store: Callable[[], Store],
        sealer: Sealer,
        idle_seconds: float,
        max_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.sealer = sealer
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.clock = clock  # tests move time forward through this
        self._last_purge = float("-inf")

    @property
    def store(self) -> Store:
        return self._store()

    def purge_if_due(self) -> None:
        now = self.clock()
        if now - self._last_purge >= PURGE_INTERVAL:
            self._last_purge = now
            self.store.purge_worksheet(now, self.idle_seconds)

    # -- launches ---------------------------------------------------------------------------------

    def begin_launch(self, payload: dict[str, Any]) -> tuple[str, str]:
        """Store a launch; returns (state for the authorization request, the browser's binding value)."""
        state, binding = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        sealed = self.sealer.seal({**payload, "binding": digest(binding)})
        self.store.save_worksheet_launch(digest(state), self.clock(), sealed)
        self.purge_if_due()
        return state, binding

    def finish_launch(self, state: str, binding: str | None) -> dict[str, Any]:
        """The launch ``state`` belongs to, once, in the browser that started it (else LaunchProblem)."""
        if not state or len(state) > 200:
            raise LaunchProblem("no state")
        taken = self.store.take_worksheet_launch(digest(state), self.clock())
        if taken is None:
            raise LaunchProblem("unknown, used or expired state")
        payload = self.sealer.open(taken[1])
        if payload is None:
            raise LaunchProblem("unreadable launch")
        if not binding or not secrets.compare_digest(str(payload.get("binding", "")), digest(binding)):
            raise LaunchProblem("the launch was started in another browser")
        return payload

    # -- sessions ---------------------------------------------------------------------------------

    def create(self, fields: dict[str, Any]) -> tuple[str, WorksheetSession]:
        """A new session from the launch's outcome; returns (cookie value, session)."""
        cookie = secrets.token_urlsafe(32)
        now = self.clock()
        session = WorksheetSession(
            id_hash=digest(cookie), created_at=now, csrf=secrets.token_urlsafe(32), **fields
        )
        self.store.create_worksheet_session(
            WorksheetSessionRow(
                id_hash=session.id_hash,
                created_at=now,
                last_seen=now,
                expires_at=now + self.max_seconds,
                sealed=self.sealer.seal(session.sealed_fields()),
            )
        )
        return cookie, session

    def load(self, cookie: str | None) -> WorksheetSession:
        """The session of this cookie, touched; SessionProblem when there is none or it has ended
        (an ended session is deleted, with its tokens, on the spot)."""
        if not cookie or len(cookie) > 200:
            raise SessionProblem("none")
        id_hash = digest(cookie)
        row = self.store.get_worksheet_session(id_hash)
        if row is None:
            raise SessionProblem("none")
        now = self.clock()
        ended = None
        if now >= row.expires_at:
            ended = "expired"
        elif now - row.last_seen > self.idle_seconds:
            ended = "idle"
        fields = self.sealer.open(row.sealed) if ended is None else None
        if ended is None and fields is None:
            ended = "unreadable"
        if ended is None and fields is not None and float(fields["token_expires_at"]) <= now:
            ended = "token_expired"
        if ended is not None or fields is None:
            self.store.delete_worksheet_session(id_hash)
            raise SessionProblem(ended or "unreadable")
        self.store.touch_worksheet_session(id_hash, now)
        self.purge_if_due()
        return WorksheetSession(id_hash=id_hash, created_at=row.created_at, **fields)

    def end(self, cookie: str | None) -> bool:
        """End the session of this cookie (its row and tokens are deleted); True if there was one."""
        if not cookie or len(cookie) > 200:
            return False
        return self.store.delete_worksheet_session(digest(cookie))
