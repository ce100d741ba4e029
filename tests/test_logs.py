"""Structured logging (cds_service.base.logs): JSON lines, correlation id, credential redaction."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from cds_service.base.logs import (
    REDACTED,
    RedactingFilter,
    configure_logging,
    current_hook_instance,
    hook_context,
    redact,
)

JWT = (
    "eyJhbGciOiJFUzM4NCIsInR5cCI6IkpXVCIsImtpZCI6IjEifQ"
    ".eyJpc3MiOiJodHRwczovL3NhbmRib3guY2RzLWhvb2tzLm9yZyIsImF1ZCI6Imh0dHBzOi8vZXhhbXBsZSJ9"
    ".MEUCIQDx3vZ2bVb2_sig-nature_part-that-is-long"
)


@pytest.fixture
def root_state() -> Iterator[None]:
    """Restore the root logger (handlers and level) after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def stream(root_state: None) -> io.StringIO:
    buffer = io.StringIO()
    configure_logging("DEBUG", stream=buffer)
    return buffer


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def ours(root: logging.Logger) -> list[logging.Handler]:
    return [
        handler for handler in root.handlers if any(isinstance(f, RedactingFilter) for f in handler.filters)
    ]


# -- JSON lines --------------------------------------------------------------------------------


def test_each_record_is_one_json_line(stream: io.StringIO) -> None:
    log = logging.getLogger("cds_service.test")
    log.info("screened %d trials", 3)
    log.warning("multi\nline")
    records = lines(stream)
    assert len(records) == 2
    first = records[0]
    assert first["message"] == "screened 3 trials"
    assert first["level"] == "INFO"
    assert first["logger"] == "cds_service.test"
    assert first["ts"].endswith("Z") and first["ts"][10] == "T" and len(first["ts"]) == 24
    assert "hook_instance" not in first
    assert records[1]["message"] == "multi\nline"


def test_extra_fields_are_merged_without_overwriting_reserved_keys(stream: io.StringIO) -> None:
    logging.getLogger("x").info(
        "done", extra={"fields": {"trials": 3, "elapsed_ms": 12.5, "level": "spoofed", "when": object()}}
    )
    (record,) = lines(stream)
    assert record["trials"] == 3
    assert record["elapsed_ms"] == 12.5
    assert record["level"] == "INFO"
    assert record["field_level"] == "spoofed"
    assert record["when"].startswith("<object")


def test_exceptions_are_included(stream: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed")
    (record,) = lines(stream)
    assert record["level"] == "ERROR"
    assert "ValueError: boom" in record["exc"]


def test_level_is_applied(stream: io.StringIO) -> None:
    configure_logging("WARNING", stream=stream)
    logging.getLogger("x").info("hidden")
    logging.getLogger("x").warning("shown")
    assert [r["message"] for r in lines(stream)] == ["shown"]


def test_configure_logging_is_idempotent(root_state: None) -> None:
    root = logging.getLogger()
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", stream=first)
    configure_logging("INFO", stream=second)
    configure_logging("INFO", stream=second)
    assert len(ours(root)) == 1
    logging.getLogger("x").info("once")
    assert first.getvalue() == ""
    assert [r["message"] for r in lines(second)] == ["once"]


def test_foreign_handlers_are_left_alone(root_state: None) -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    configure_logging("INFO", stream=io.StringIO())
    configure_logging("INFO", stream=io.StringIO())
    assert foreign in root.handlers


# -- correlation id ----------------------------------------------------------------------------


def test_hook_instance_present_inside_the_context_only(stream: io.StringIO) -> None:
    log = logging.getLogger("cds_service.protocol.api")
    log.info("before")
    with hook_context("d1577c69-dfbe-44ad-ba6d-3e05e953b2ea") as value:
        assert value == current_hook_instance() == "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"
        log.info("inside")
        with hook_context("nested"):
            log.info("nested")
        log.info("inside again")
    log.info("after")
    assert current_hook_instance() is None
    got = [(r["message"], r.get("hook_instance")) for r in lines(stream)]
    assert got == [
        ("before", None),
        ("inside", "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"),
        ("nested", "nested"),
        ("inside again", "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"),
        ("after", None),
    ]


def test_hook_instance_is_restored_after_an_exception() -> None:
    with pytest.raises(RuntimeError), hook_context("abc"):
        raise RuntimeError
    assert current_hook_instance() is None


def test_hook_instance_is_per_thread(stream: io.StringIO) -> None:
    barrier = threading.Barrier(2)

    def work(name: str) -> None:
        with hook_context(name):
            barrier.wait()
            logging.getLogger("worker").info(name)

    threads = [threading.Thread(target=work, args=(name,)) for name in ("call-a", "call-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {(r["message"], r["hook_instance"]) for r in lines(stream)} == {
        ("call-a", "call-a"),
        ("call-b", "call-b"),
    }


def test_client_supplied_hook_instance_is_bounded() -> None:
    with hook_context("x" * 10_000) as value:
        assert value is not None and len(value) == 128


# -- redaction ---------------------------------------------------------------------------------


def test_jwt_in_message_and_args_is_redacted(stream: io.StringIO) -> None:
    log = logging.getLogger("x")
    log.info(f"token {JWT} seen")
    log.info("token %s seen", JWT)
    log.info("header %r", {"Authorization": f"Bearer {JWT}"})
    out = stream.getvalue()
    assert JWT.split(".")[1] not in out
    assert JWT.split(".")[2] not in out
    messages = [r["message"] for r in lines(stream)]
    assert messages[:2] == [f"token {REDACTED} seen"] * 2
    assert REDACTED in messages[2]


def test_bearer_in_message_and_args_is_redacted(stream: io.StringIO) -> None:
    log = logging.getLogger("x")
    log.warning("got Bearer abc.def from client")
    log.warning("got %s from client", "Bearer abc.def")
    log.warning("got %s %s from client", "Bearer", "abc.def")  # split between arguments
    for record in lines(stream):
        assert "abc.def" not in record["message"]
        assert record["message"] == f"got Bearer {REDACTED} from client"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("GET /Patient?access_token=s3cr3t-value&_count=5", "s3cr3t-value"),
        ('{"access_token": "s3cr3t-value", "token_type": "Bearer"}', "s3cr3t-value"),
        ("fhirAuthorization={'access_token': 's3cr3t-value'}", "s3cr3t-value"),
        ("refresh_token=s3cr3t-value", "s3cr3t-value"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ("authorization=Bearer s3cr3t-value", "s3cr3t-value"),
        ("bearer  s3cr3t-value", "s3cr3t-value"),
        ("Bearer abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvwxyz"),  # long, letters only
        ("Bearer opaque1", "opaque1"),
        (f"jku in {JWT}", JWT[:40]),
        (
            "opaque aaaaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbb.cccccccccccccccccccccccc x",
            "bbbbbbbbbbbbbbbbbbbbb",
        ),
    ],
)
def test_redact_scrubs_credentials(text: str, secret: str) -> None:
    scrubbed = redact(text)
    assert secret not in scrubbed
    assert REDACTED in scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "issuer https://sandbox.cds-hooks.org unknown",
        "module cds_service.patient_data.gather.gather took 12.5 ms",
        "authorization failed: unknown issuer",
        "trial NCT01234567 evaluated; Observation/abc-123 used",
        "version 1.2.3 of fhir.resources",
        "client authentication failed: not a bearer token",
        "Basic authentication is not supported",
    ],
)
def test_redact_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text) == text


def test_extra_fields_and_tracebacks_are_redacted(stream: io.StringIO) -> None:
    log = logging.getLogger("x")
    log.info(
        "call",
        extra={
            "fields": {"access_token": "s3cr3t", "nested": {"Authorization": "Bearer s3cr3t"}, "url": JWT}
        },
    )
    try:
        raise PermissionError(f"rejected {JWT}")
    except PermissionError:
        log.exception("auth")
    out = stream.getvalue()
    assert "s3cr3t" not in out
    assert JWT.split(".")[1] not in out
    first, second = lines(stream)
    assert first["access_token"] == REDACTED
    assert first["nested"] == {"Authorization": REDACTED}
    assert first["url"] == REDACTED
    assert "PermissionError: rejected [REDACTED]" in second["exc"]


def test_redacting_filter_works_alone() -> None:
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Capture()
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("standalone")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("Bearer %s and %s", "abc.def", JWT)
        log.warning("count %d of %s", 3, "x")
        log.warning("broken %d", "not-a-number-" + JWT)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert records[0].getMessage() == f"Bearer {REDACTED} and {REDACTED}"
    assert not records[0].args
    assert records[1].getMessage() == "count 3 of x"
    assert JWT.split(".")[1] not in records[2].getMessage()  # unformattable args are still scrubbed
