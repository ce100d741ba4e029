"""Structured logging: JSON lines, a per-call correlation id and redaction of credentials.

``configure_logging()`` installs one root handler that writes one JSON object per line::

    {"ts": "2024-05-01T12:00:00.123Z", "level": "INFO", "logger": "cds_service.protocol.api",
     "message": "screened", "hook_instance": "d1577c69-...", "trials": 3}

``hook_instance`` is present while the record is logged inside ``with hook_context(...)``; extra
fields come from ``logger.info("...", extra={"fields": {...}})``.

:class:`RedactingFilter` scrubs JWTs, ``Bearer``/``Basic`` credentials, ``Authorization`` header
values and ``access_token``-like values from messages, arguments, extra fields and tracebacks.
It is defence in depth only: code must never log tokens or patient identifiers in the first place.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import IO, Any

import orjson

REDACTED = "[REDACTED]"
_MAX_HOOK_INSTANCE_CHARS = 128
_HANDLER_MARK = "_cds_service_json_handler"

_hook_instance: contextvars.ContextVar[str | None] = contextvars.ContextVar("hook_instance", default=None)

#: Field names whose values are always replaced, whatever they hold (compared case-insensitively).
SENSITIVE_KEYS: frozenset[str] = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "authorization",
        "fhirauthorization",
        "token",
        "jwt",
        "client_secret",
        "client_assertion",
        "password",
    }
)

_TOKEN_CHARS = r"[A-Za-z0-9._~+/=-]"
_B64URL = r"[A-Za-z0-9_-]"


def _credential_after_scheme(match: re.Match[str]) -> str:
    """``Bearer <credential>``: redacted when the word after the scheme looks like a credential —
    it has a digit or a token symbol, or is long — so "not a bearer token" stays readable."""
    scheme, space, word = match.group(1), match.group(2), match.group(3)
    if len(word) >= 16 or re.search(r"[0-9._~+/=-]", word):
        return f"{scheme}{space}{REDACTED}"
    return match.group(0)


_PATTERNS: tuple[tuple[re.Pattern[str], Any], ...] = (
    # Authorization header values, whatever the scheme: `Authorization: Bearer x`, `'authorization': 'x'`.
    (re.compile(r"""(?i)(\bauthorization["']?\s*[:=]\s*["']?)[^"'\r\n,;}]+"""), r"\1" + REDACTED),
    # `Bearer <anything token-like>` and `Basic <base64>` (not plain words: "a bearer token").
    (re.compile(rf"(?i)\b(bearer|basic)(\s+)({_TOKEN_CHARS}+)"), _credential_after_scheme),
    # access_token=..., "refresh_token": "...", client_secret: ...
    (
        re.compile(
            r"""(?i)(\b(?:access_token|refresh_token|id_token|client_secret|client_assertion|password)"""
            r"""["']?\s*[:=]\s*["']?)[^"'\s,&;}]+"""
        ),
        r"\1" + REDACTED,
    ),
    # A compact JWS/JWE: the header is base64url JSON, so it starts with "ey".
    (re.compile(rf"\bey{_B64URL}{{6,}}\.{_B64URL}{{6,}}\.{_B64URL}*"), REDACTED),
    # Any other three long base64url segments joined by dots (opaque signed tokens).
    (re.compile(rf"(?<![A-Za-z0-9_.-]){_B64URL}{{20,}}\.{_B64URL}{{20,}}\.{_B64URL}{{20,}}"), REDACTED),
)


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``[REDACTED]``."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {
            key: REDACTED if str(key).lower() in SENSITIVE_KEYS else _redact_value(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(item) for item in value]
    return value


def _timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds and a ``Z`` suffix."""
    return datetime.fromtimestamp(created, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class RedactingFilter(logging.Filter):
    """Scrubs credentials from a record before any formatter sees it; never drops the record.

    The message is rendered (``msg % args``) and redacted as a whole, so a token split between
    the template and an argument is caught too; ``args`` is then cleared. ``fields`` (the extra
    fields), the formatted traceback and the stack are redacted as well.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record (nor leak its arguments)
            message = f"{record.msg} (unformattable arguments: {record.args!r})"
        record.msg = redact(message)
        record.args = None
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            record.fields = _redact_value(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class CorrelationFilter(logging.Filter):
    """Stamps ``record.hook_instance`` with the current :func:`hook_context` value (may be None)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "hook_instance", None) is None:
            record.hook_instance = _hook_instance.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, hook_instance?, extra fields, exc?."""

    RESERVED: frozenset[str] = frozenset(
        {"ts", "level", "logger", "message", "hook_instance", "exc", "stack"}
    )

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        hook_instance = getattr(record, "hook_instance", None)
        if hook_instance is None:
            hook_instance = _hook_instance.get()
        if hook_instance is not None:
            entry["hook_instance"] = hook_instance
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                name = str(key)
                entry[f"field_{name}" if name in self.RESERVED else name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self.formatException(record.exc_info))
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except (orjson.JSONEncodeError, TypeError):  # e.g. integers beyond 64 bits
            return json.dumps(entry, default=str, ensure_ascii=False)


#: Third-party loggers that write request URLs (patient identifiers) at DEBUG / INFO.
_URL_LOGGERS = ("urllib3", "requests", "werkzeug", "gunicorn.access")


def configure_logging(level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Send every log record to ``stream`` (default: standard error) as JSON lines.

    Idempotent: a second call replaces the handler installed by the first (new level and stream)
    instead of adding another one. Handlers installed by others are left alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(CorrelationFilter())
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    # HTTP libraries log request URLs at DEBUG, and a FHIR query URL holds the patient id:
    # keep them at WARNING whatever level the service runs at.
    for name in _URL_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def current_hook_instance() -> str | None:
    """The correlation id of the CDS call being handled, or None outside :func:`hook_context`."""
    return _hook_instance.get()


@contextlib.contextmanager
def hook_context(hook_instance: str | None) -> Iterator[str | None]:
    """Tag every record logged inside the block with ``hook_instance`` (restored on exit).

    The value comes from the client, so it is coerced to a string and truncated to 128 characters.
    Context variables do not follow work into thread pools by themselves: submit with
    ``contextvars.copy_context().run`` to keep the id in worker threads.
    """
    value = None if hook_instance is None else str(hook_instance)[:_MAX_HOOK_INSTANCE_CHARS]
    token = _hook_instance.set(value)
    try:
        yield value
    finally:
        _hook_instance.reset(token)
