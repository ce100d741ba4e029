"""Every command answers bad input with one line on stderr and exit status 2 — never a traceback.

Each case runs the real command in a subprocess (``python -m cds_service.cli …``, as the
``cds-service`` script does), so what is checked is exactly what a user sees.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cds_service.base.config import PROJECT_ROOT
from cds_service.cli import build_parser
from cds_service.tools.scenarios import EXAMPLES_DIR

HOOK_REQUEST = PROJECT_ROOT / "examples" / "hook-request-msc-eligible.json"
SCENARIO = PROJECT_ROOT / "examples" / "scenarios" / "msc-eligible.json"


def run_command(
    *args: str, module: str = "cds_service.cli", cwd: Path = PROJECT_ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)},  # no CDS_* settings from the caller
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr, result.stdout[-500:])
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-input")
    made = {
        "malformed.json": '{"hook": "patient-view", ',
        "array.json": "[1, 2, 3]",
        "string.json": '"patient-view"',
        "not-a-hook.json": '{"patient": "cdsh-1"}',
        "other-hook.json": json.dumps(
            {
                "hook": "order-select",
                "hookInstance": "x",
                "context": {"userId": "Practitioner/1", "patientId": "p"},
            }
        ),
        "two-patients.json": json.dumps(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": {"resourceType": "Patient", "id": str(i)}} for i in range(2)],
            }
        ),
        "bad-scenario.json": json.dumps(
            {"name": "x", "story": "", "evaluatedAt": "2026-01-01T00:00:00Z", "expected": {}, "bundle": {}}
        ),
        "bad-config.yaml": "server: [this is not a mapping",
        "not-a-key.pem": "no key here",
    }
    paths = {}
    for name, text in made.items():
        paths[name] = folder / name
        paths[name].write_text(text, encoding="utf-8")
    paths["empty-folder"] = folder / "empty"
    paths["empty-folder"].mkdir()
    paths["folder"] = folder
    return paths


EVALUATE_CASES = {
    "missing file": (["evaluate", "{missing}"], "no such file"),
    "a folder": (["evaluate", "{folder}"], "is a folder"),
    "unreadable (a path through a file)": (["evaluate", "{array.json}/x.json"], "cannot read"),
    "malformed JSON": (["evaluate", "{malformed.json}"], "not JSON"),
    "a JSON array": (["evaluate", "{array.json}"], "a JSON list, expected an object"),
    "a JSON string": (["evaluate", "{string.json}"], "a JSON str, expected an object"),
    "an object that is no hook request": (
        ["evaluate", "{not-a-hook.json}"],
        "not a patient-view hook request",
    ),
    "another hook": (["evaluate", "{other-hook.json}"], "not a patient-view hook request"),
    "a Bundle of two patients": (["evaluate", "{two-patients.json}"], "exactly one Patient"),
    "a broken scenario file": (["evaluate", "{bad-scenario.json}"], "expected"),
    "--at yesterday": (["evaluate", str(HOOK_REQUEST), "--at", "yesterday"], "not an ISO 8601 time"),
    "--at without an offset": (["evaluate", str(HOOK_REQUEST), "--at", "2026-11-21T12:00"], "offset"),
    "an unknown option": (["evaluate", str(HOOK_REQUEST), "--color"], "unrecognized arguments"),
    "no file": (["evaluate"], "required: file"),
    "an unreadable configuration": (
        ["evaluate", str(HOOK_REQUEST), "--config", "{missing}"],
        "configuration",
    ),
    "a malformed configuration": (["check", "--config", "{bad-config.yaml}"], "not valid YAML at line 1"),
}
OTHER_CASES = {
    "no command": ([], "required: COMMAND"),
    "an unknown command": (["evaluat"], "invalid choice"),
    "serve --port 99999": (["serve", "--port", "99999"], "not a TCP port"),
    "screening-log --trial NCT9999": (["screening-log", "--trial", "NCT9999"], "not an NCT id"),
    "screening-log --trial of an unknown trial": (
        ["screening-log", "--trial", "NCT99999999", "--config", "{log-config}"],
        "NCT99999999: no such trial",
    ),
    "screening-log --since yesterday": (["screening-log", "--since", "yesterday"], "not an ISO 8601 time"),
    "scenarios check of a missing folder": (["scenarios", "check", "/nonexistent"], "no such file or folder"),
    "scenarios check of an empty folder": (
        ["scenarios", "check", "{empty-folder}"],
        "no *.json scenario files",
    ),
    "scenarios check of a broken file": (["scenarios", "check", "{bad-scenario.json}"], "expected"),
    "scenarios write --at yesterday": (
        ["scenarios", "write", "{empty-folder}", "--at", "yesterday"],
        "ISO 8601",
    ),
    "scenarios write into a file": (["scenarios", "write", "{array.json}/sub"], "array.json"),
    "scenarios load --fhir that is no URL": (
        ["scenarios", "load", "--fhir", "localhost:8090"],
        "http(s) URL",
    ),
    "scenarios load --files of a missing folder": (
        ["scenarios", "load", "--fhir", "http://127.0.0.1:9/fhir", "--files", "/nonexistent"],
        "no such file or folder",
    ),
    "scenarios without a command": (["scenarios"], "required: COMMAND"),
    "harness without --service": (["harness", "--fhir", "http://127.0.0.1:9/fhir"], "--service and --fhir"),
    "harness --mode all": (["harness", "--mode", "all"], "invalid choice"),
    "harness --scenarios of a missing folder": (
        [
            "harness",
            "--service",
            "http://127.0.0.1:9",
            "--fhir",
            "http://127.0.0.1:9/fhir",
            "--scenarios",
            "/nonexistent",
        ],
        "no such file or directory",
    ),
    "harness --jwt-key that is no key": (
        ["harness", "--jwt-key", "{not-a-key.pem}", "--print-jwks"],
        "not a PEM private key",
    ),
    "harness --run-id with capitals": (
        [
            "harness",
            "--service",
            "http://127.0.0.1:9",
            "--fhir",
            "http://127.0.0.1:9/fhir",
            "--run-id",
            "ABC",
        ],
        "--run-id",
    ),
    "demo --fhir-port abc": (["demo", "--fhir-port", "abc"], "not a TCP port"),
    "demo on a port in use": (["demo", "--port", "{taken-port}", "--fhir-port", "{free-port}"], "is in use"),
}


@pytest.fixture(scope="module")
def substitutions(
    files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    log_config = tmp_path_factory.mktemp("log") / "config.yaml"
    log_config.write_text(
        f"store:\n  url: sqlite:///{log_config.parent / 'store.sqlite3'}\n", encoding="utf-8"
    )
    with socket.socket() as taken, socket.socket() as free:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free.bind(("127.0.0.1", 0))
        free_port = free.getsockname()[1]
        free.close()
        yield {
            **{f"{{{name}}}": str(path) for name, path in files.items()},
            "{missing}": str(files["folder"] / "missing.json"),
            "{log-config}": str(log_config),
            "{taken-port}": str(taken.getsockname()[1]),
            "{free-port}": str(free_port),
        }


def _expand(args: list[str], substitutions: dict[str, str]) -> list[str]:
    expanded = []
    for arg in args:
        for key, value in substitutions.items():
            arg = arg.replace(key, value)
        expanded.append(arg)
    return expanded


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES | OTHER_CASES))
def test_bad_input_gets_one_line_and_exit_2(case: str, substitutions: dict[str, str]) -> None:
    args, expected = (EVALUATE_CASES | OTHER_CASES)[case]
    line = assert_one_line_error(run_command(*_expand(args, substitutions)), expected)
    assert "parse_at" not in line and "ArgumentTypeError" not in line  # no internal names


def test_every_subcommand_has_bad_input_cases_and_is_named_in_the_help() -> None:
    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    covered = {args[0] for args, _ in (EVALUATE_CASES | OTHER_CASES).values() if args}
    assert subcommands <= covered, f"no bad-input case for {subcommands - covered}"
    first_line = (parser.description or "").splitlines()[0]
    help_text = run_command("--help").stdout
    for name in subcommands:
        assert name in first_line, f"`cds-service --help` does not name {name} in its first line"
        assert name in help_text


def test_the_good_cases_still_work(tmp_path: Path) -> None:
    """The same commands with good input: exit 0, cards on stdout."""
    result = run_command("evaluate", str(HOOK_REQUEST), "--at", "2026-11-21T12:00:00Z")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cards"]
    result = run_command("scenarios", "check", str(SCENARIO))
    assert result.returncode == 0 and "0 mismatch" in result.stdout, result.stdout


def _examples_fingerprint() -> str:
    digest = hashlib.sha256()
    for path in sorted(EXAMPLES_DIR.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path}:{stat.st_mtime_ns}:{stat.st_size}".encode())
    return digest.hexdigest()


def test_the_scenario_module_honours_help_and_writes_nothing_without_a_command() -> None:
    module = "cds_service.tools.scenarios"
    before = _examples_fingerprint()
    help_result = run_command("--help", module=module)
    assert help_result.returncode == 0 and "examples" in help_result.stdout and "usage:" in help_result.stdout
    assert_one_line_error(run_command(module=module), "required: COMMAND")
    assert_one_line_error(run_command("examples", "--dry-run", module=module), "unrecognized arguments")
    assert_one_line_error(run_command("check", "/nonexistent", module=module), "no such file or folder")
    assert _examples_fingerprint() == before, "examples/ changed without an explicit command"
