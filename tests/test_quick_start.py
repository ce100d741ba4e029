"""The README's and examples/README.md's quick starts, run command by command, for real.

Every shell command of the README's "Quick start" section and of examples/README.md runs as
written, in ``bash``, from the repository root: ``make run`` and ``make demo`` are started in the
background (as a newcomer starts them in a terminal) and stopped with SIGINT to their process
group (Ctrl-C), the other commands run to completion against them. Only the ports differ: ``PORT``
and ``FHIR_PORT`` are set in the environment (the Makefile's ``make run``, ``make demo`` and
``make harness`` read them) and the documented ``127.0.0.1:8080`` / ``:8090`` in the commands are
replaced by those free ports, so the suite can run beside a developer's own ``make run`` and
other test runs on the same machine. ``make test`` itself is the one command not run (this is it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from cds_service.base.config import PROJECT_ROOT
from cds_service.tools.demo import DemoAddresses, curl_command, sandbox_url
from cds_service.tools.fhir_server import free_port, sekmet_binary
from tests.conftest import needs_infrastructure

README = PROJECT_ROOT / "README.md"
EXAMPLES_README = PROJECT_ROOT / "examples" / "README.md"
#: `make demo` must be up within this long once the installs are done (the issue's acceptance).
DEMO_UP_WITHIN_SECONDS = 60.0
STARTERS = ("make run", "make demo")


def shell_blocks(markdown: str) -> list[list[str]]:
    """The commands of each fenced ``sh`` block (continuation lines joined, comment lines dropped)."""
    blocks = []
    for body in re.findall(r"^```sh\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL):
        commands, pending = [], ""
        for line in body.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                commands.append(command)
        blocks.append(commands)
    return blocks


def section(markdown: str, heading: str) -> str:
    start = markdown.index(heading)
    end = markdown.find("\n## ", start + len(heading))
    return markdown[start : end if end >= 0 else len(markdown)]


def quick_start_commands() -> list[str]:
    readme = section(README.read_text(encoding="utf-8"), "## Quick start")
    examples = EXAMPLES_README.read_text(encoding="utf-8")
    return [c for block in shell_blocks(readme) + shell_blocks(examples) for c in block]


def test_the_quick_start_is_two_commands_then_the_demo() -> None:
    readme = section(README.read_text(encoding="utf-8"), "## Quick start")
    first = shell_blocks(readme)[0]
    assert [c.split("#")[0].strip() for c in first] == ["make run", "make test"]
    commands = quick_start_commands()
    assert any(c.startswith("make demo") for c in commands), "the README must show `make demo`"
    assert any(c.split("#")[0].strip() == "make harness" for c in commands)
    # What the README shows is what the demo prints (same curl, same sandbox URL).
    text = README.read_text(encoding="utf-8")
    assert curl_command(DemoAddresses()) in text
    assert sandbox_url(DemoAddresses()) in text
    for command in commands:  # the installed command, not a bare `cds-service` (not on PATH)
        assert not re.match(r"^cds-service\b", command), command


# -- running them -------------------------------------------------------------------------------------


@dataclass
class Background:
    """``make run`` or ``make demo`` in its own process group, its output in a file."""

    command: str
    process: subprocess.Popen[bytes]
    log: Path
    started: float
    pids: list[int] = field(default_factory=list)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the process group, as a terminal sends it; returns make's exit status."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            raise AssertionError(
                f"`{self.command}` did not stop on Ctrl-C:\n{self.output()[-2000:]}"
            ) from None


@contextlib.contextmanager
def ctrl_c_as_in_a_terminal() -> Iterator[None]:
    """Children started meanwhile get Ctrl-C's default action, as in a newcomer's terminal.

    A background job of a non-interactive shell (``make test &`` in a script) starts with SIGINT
    ignored, and an ignored signal stays ignored across exec: ``make demo`` would then never see the
    test's Ctrl-C. A handler set here is reset to the default in each exec'd child instead.
    """
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def port_free(port: int) -> bool:
    """Nothing listens there (a connection is refused)."""
    with socket.socket() as sock:
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            return True
    return False


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class QuickStart:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.fhir_port = free_port()
        while self.fhir_port == self.port:
            self.fhir_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CDS_", "MAKE", "MFLAGS"))}
        env.update(PORT=str(self.port), FHIR_PORT=str(self.fhir_port))
        self.env = env
        self.server: Background | None = None
        self.results: list[tuple[str, str]] = []

    def localise(self, command: str) -> str:
        return command.replace("127.0.0.1:8080", f"127.0.0.1:{self.port}").replace(
            "127.0.0.1:8090", f"127.0.0.1:{self.fhir_port}"
        )

    def start(self, command: str) -> None:
        self.stop()
        log = self.tmp_path / f"{command.split()[1]}.log"
        with open(log, "wb") as out, ctrl_c_as_in_a_terminal():
            process = subprocess.Popen(
                ["bash", "-c", self.localise(command)],
                cwd=PROJECT_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: SIGINT reaches it like Ctrl-C
            )
        self.server = Background(command, process, log, time.monotonic())
        if command.startswith("make demo"):
            self._wait(lambda: "Ctrl-C stops everything" in self.server.output(), DEMO_UP_WITHIN_SECONDS)
            found = re.search(r"FHIR server pid (\d+), service pid (\d+)", self.server.output())
            assert found, self.server.output()
            self.server.pids = [int(found.group(1)), int(found.group(2))]
        else:
            self._wait(lambda: self._health_ok(), 60)

    def _health_ok(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def _wait(self, ready: object, seconds: float) -> None:
        assert self.server is not None
        while time.monotonic() - self.server.started < seconds:
            if ready():  # type: ignore[operator]
                return
            if self.server.process.poll() is not None:
                raise AssertionError(f"`{self.server.command}` exited:\n{self.server.output()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(
            f"`{self.server.command}` not up within {seconds:g} s:\n{self.server.output()[-3000:]}"
        )

    def run(self, command: str) -> str:
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", self.localise(command)],
            cwd=PROJECT_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, (
            f"`{command}` failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        self.results.append((command, result.stdout))
        return result.stdout

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        status = server.interrupt()
        assert status in (0, 2, 130, -2), (
            f"`{server.command}` exit {status} on Ctrl-C:\n{server.output()[-2000:]}"
        )
        # Ctrl-C stops everything it started: the ports are free, the servers' processes gone.
        deadline = time.monotonic() + 15
        ports = [self.port, self.fhir_port] if server.command.startswith("make demo") else [self.port]
        while time.monotonic() < deadline and not all(port_free(p) for p in ports):
            time.sleep(0.2)
        assert all(port_free(p) for p in ports), f"`{server.command}` left a port open after Ctrl-C"
        assert not [pid for pid in server.pids if alive(pid)], f"`{server.command}` left {server.pids}"


@pytest.fixture
def quick_start(tmp_path: Path) -> Iterator[QuickStart]:
    needs_infrastructure(
        "make, bash and curl", all(shutil.which(t) for t in ("make", "bash", "curl")), "install them"
    )
    needs_infrastructure(
        "the FHIR server (sekmet) in .fhir-venv",
        sekmet_binary().is_file(),
        "run `make test` (it installs it)",
    )
    runner = QuickStart(tmp_path)
    try:
        yield runner
    finally:
        with contextlib.suppress(AssertionError):
            runner.stop()


@pytest.mark.fhir
def test_every_quick_start_command_works_as_written(quick_start: QuickStart) -> None:
    commands = quick_start_commands()
    assert "make test" in [c.split("#")[0].strip() for c in commands]
    for command in commands:
        bare = command.split("#")[0].strip()
        if bare == "make test":
            continue  # this test runs inside it
        if bare.startswith(STARTERS):
            quick_start.start(command)
            continue
        output = quick_start.run(command)
        if bare.startswith("curl") and "septic-shock-trial-screening" in bare:
            cards = json.loads(output)["cards"]
            assert cards, f"the demo's curl shows no card: {output[:500]}"
            assert any("NCT01849237" in json.dumps(card) for card in cards)
        elif bare.startswith("curl"):
            assert json.loads(output)["services"][0]["hook"] == "patient-view"
        elif " evaluate " in f" {bare} ":
            assert json.loads(output)["cards"], f"{command}: no card"
        elif bare == "make harness":
            passed = re.search(r"harness run \w+: [1-9]\d* checks, 0 failed — all passed", output)
            assert passed, output[-2000:]
        elif "scenarios check" in bare:
            assert re.search(r"\b[1-9]\d* scenario file\(s\), 0 mismatch", output), output[-500:]
        elif "scenarios load" in bare:
            assert re.search(r"loaded (\d+) of \1 scenario patients", output), output
    ran = [c for c, _ in quick_start.results]
    assert any("make harness" in c for c in ran) and any("evaluate" in c for c in ran)
    quick_start.stop()
