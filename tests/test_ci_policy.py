"""CI cannot go green with its infrastructure skipped, and one slow registry answer does not fail it.

- A skip is a failure in CI (``CI`` set): any skip, through the hooks in ``tests/conftest.py``; and
  no test may call ``pytest.skip`` / ``importorskip`` / ``mark.skip(if)`` itself: tests that need
  infrastructure call ``needs_infrastructure`` (``tests/infrastructure.py``).
- Every run ends with one line counting the skips.
- ``make postgres-bin`` fails in CI when PostgreSQL cannot be installed (it only warns elsewhere).
- Every download in the Makefile (pip, apt-get, npm) goes through ``.ci/retry``; apt-get waits for
  another installer's dpkg lock.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cds_service.base.config import PROJECT_ROOT

TESTS = PROJECT_ROOT / "tests"
MAKEFILE = PROJECT_ROOT / "Makefile"
RETRY = PROJECT_ROOT / ".ci" / "retry"


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without make's own variables (this may run under `make test`) or CI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS", "CI"))}
    env.update(extra)
    return env


# -- skips ----------------------------------------------------------------------------------------------


SKIPPING_TESTS = """
import pytest
from tests.conftest import needs_infrastructure


def test_passes():
    pass


def test_bare_skip():
    pytest.skip("no unicorn")


@pytest.fixture
def unicorn():
    needs_infrastructure("a unicorn", False, "ask the lead")


def test_needs_a_unicorn(unicorn):
    pass


@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False
"""


def _run_pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_skipping.py").write_text(SKIPPING_TESTS, encoding="utf-8")
    env = _clean_env(PYTHONPATH=str(PROJECT_ROOT))
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_skipping.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_skips_pass_locally_and_the_run_ends_with_their_count(tmp_path: Path) -> None:
    result = _run_pytest(tmp_path, ci=None)
    assert result.returncode == 0, result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("skips: 2 (in CI each would be a failure)"), last
    assert "no unicorn" in last and "needs a unicorn: ask the lead" in last


@pytest.mark.parametrize("ci", ["true", "1"])
def test_every_skip_fails_in_ci(tmp_path: Path, ci: str) -> None:
    result = _run_pytest(tmp_path, ci=ci)
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 passed, 1 xfailed, 1 error" in result.stdout, result.stdout
    assert "skipped in CI, where no test may skip: no unicorn" in result.stdout
    assert "needs a unicorn: ask the lead — missing in CI" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("skips: 2 (CI accepts none: FAILED)")


def test_ci_false_is_not_ci(tmp_path: Path) -> None:
    assert _run_pytest(tmp_path, ci="false").returncode == 0


_SKIP_CALL = re.compile(r"pytest\.(skip\s*\(|importorskip\s*\(|mark\.skip(if)?\b)")


def test_no_test_skips_by_itself() -> None:
    """Only ``needs_infrastructure`` may skip: it fails in CI, and says how to get what is missing."""
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name in ("infrastructure.py", Path(__file__).name):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _SKIP_CALL.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, (
        "use `needs_infrastructure(what, available, how_to_get_it)` from tests.conftest instead:\n"
        + "\n".join(offenders)
    )


# -- PostgreSQL in CI -----------------------------------------------------------------------------------


@pytest.fixture
def failing_apt(tmp_path: Path) -> Path:
    """A folder with an `apt-get` that always fails (as when the registry or the lock is unavailable)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "apt-get"
    script.write_text('#!/bin/sh\necho "apt-get $*" >> "$(dirname "$0")/calls"\nexit 100\n', encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


def _postgres_bin(failing_apt: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = _clean_env(PATH=f"{failing_apt}:{os.environ['PATH']}", RETRY_PAUSE="0", RETRY_ATTEMPTS="2")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        ["make", "--no-print-directory", "postgres-bin", "POSTGRES_INITDB=/nonexistent/*/bin/initdb"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_postgres_bin_fails_ci_when_postgresql_cannot_be_installed(failing_apt: Path) -> None:
    result = _postgres_bin(failing_apt, ci="true")
    assert result.returncode != 0, result.stdout + result.stderr
    assert "could not install PostgreSQL, which CI needs" in result.stderr
    calls = (failing_apt / "calls").read_text().splitlines()
    assert len(calls) == 2 and all("update" in c for c in calls), calls  # retried, then gave up
    assert all("DPkg::Lock::Timeout" in c for c in calls)  # waits for another installer's lock


def test_postgres_bin_only_warns_on_a_developers_machine(failing_apt: Path) -> None:
    result = _postgres_bin(failing_apt, ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING: could not install PostgreSQL" in result.stdout


# -- downloads retry ------------------------------------------------------------------------------------


def test_retry_runs_again_after_a_pause_then_gives_up(tmp_path: Path) -> None:
    counter = tmp_path / "attempts"
    flaky = f'n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; [ "$n" -ge 3 ]'
    env = _clean_env(RETRY_PAUSE="0", RETRY_ATTEMPTS="4")
    result = subprocess.run(
        [str(RETRY), "sh", "-c", flaky], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and counter.read_text().strip() == "3", result.stderr
    assert result.stderr.count("failed") == 2
    counter.unlink()
    result = subprocess.run(
        [str(RETRY), "sh", "-c", f"{flaky}; exit 7"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 7 and counter.read_text().strip() == "4"
    assert "giving up after 4 attempts" in result.stderr


def test_every_download_in_the_makefile_retries() -> None:
    recipes = [
        line.strip() for line in MAKEFILE.read_text(encoding="utf-8").splitlines() if line.startswith("\t")
    ]
    downloads = [
        line
        for line in recipes
        if re.search(r"pip install|apt-get|\$\(APT_GET\)|npm (ci|install)|npx ", line)
    ]
    assert downloads, "no downloads found: the pattern is out of date"
    for line in downloads:
        for command in re.split(r"&&|\|\||;|\bthen\b|\bif !?\s*\{?", line):
            if re.search(r"pip install|apt-get|\$\(APT_GET\)|npm (ci|install)", command):
                assert command.strip().startswith("$(RETRY) "), (
                    f"a download without $(RETRY): {command.strip()}"
                )
    apt = re.search(r"^APT_GET :?= (.*)$", MAKEFILE.read_text(encoding="utf-8"), re.MULTILINE)
    assert apt and "DPkg::Lock::Timeout" in apt.group(1) and "Acquire::Retries" in apt.group(1)
