"""The container files, checked without a Docker engine (none runs in CI or on these machines).

What can be checked here is checked: docker/compose.yaml (and the sandbox override) parse and name
files that exist, images, services, ports and configuration fit together; the Dockerfile installs the
project the way the Makefile does, runs as a non-root user, has a HEALTHCHECK, and every COPY source
exists and passes the .dockerignore; the probe script the image uses works against real HTTP servers;
docs/deploy.md lists every metric the service exports.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from cds_service.base.config import DEFAULTS, load_settings
from cds_service.base.metrics import Metrics
from cds_service.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
SANDBOX_OVERRIDE = DOCKER / "compose.sandbox.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
PROBE = DOCKER / "probe.py"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
LOADER_COMMAND = ["cds-service", "scenarios", "load", "--fhir"]
#: Environment variables the service reads that are not CDS_<SECTION>_<KEY> settings.
OTHER_CDS_VARIABLES = {"CDS_CONFIG"}


# -- parsing helpers -------------------------------------------------------------------------------


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (`!reset`, `!override`): keep the value, note the tag."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _tagged)
ComposeLoader.add_constructor("!override", _tagged)


def load_compose(path: Path) -> dict[str, Any]:
    document = yaml.load(path.read_text(encoding="utf-8"), Loader=ComposeLoader)  # a SafeLoader subclass
    assert isinstance(document, dict) and isinstance(document.get("services"), dict), path
    return document


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict (Compose allows a mapping or a list of NAME=value)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port."""
    out = []
    for entry in service.get("ports") or []:
        parts = str(entry).split(":")
        assert len(parts) == 3, f"publish with an explicit host address: {entry!r}"
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, rest = whole.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "a continuation line runs off the end of the Dockerfile"
    return instructions


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def pip_install_arguments(command: str) -> list[str]:
    """The arguments of the `pip install` in a shell command, without verbosity/cache/download options
    (the Makefile's `$(PIP_DOWNLOAD)`: retries and timeouts)."""
    words = shlex.split(command)
    for index, word in enumerate(words):
        if Path(word).name.startswith("pip") and words[index + 1 : index + 2] == ["install"]:
            args = []
            for arg in words[index + 2 :]:
                if arg in ("&&", ";", "||"):
                    break
                if arg in (
                    "--quiet",
                    "-q",
                    "--no-cache-dir",
                    "--disable-pip-version-check",
                    "$(PIP_DOWNLOAD)",
                ):
                    continue
                args.append(arg)
            return args
    raise AssertionError(f"no `pip install` in {command!r}")


def makefile_install_recipe() -> str:
    """The recipe of the Makefile rule that installs the project (the `install` target's file)."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    install = re.search(r"^install:\s*(\S+)", text, re.MULTILINE)
    assert install, "the Makefile has no `install` target"
    target = install.group(1)
    rule = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)", text, re.MULTILINE)
    assert rule, f"no rule for {target} in the Makefile"
    lines = [line.strip() for line in rule.group(1).splitlines()]
    return next(line for line in lines if "pip install" in line)


def env_settings_problems(env: dict[str, str]) -> list[str]:
    """CDS_* names that the configuration does not know (a typo would be silently ignored)."""
    known = {f"CDS_{section}_{key}".upper() for section, keys in DEFAULTS.items() for key in keys}
    return sorted(name for name in env if name.startswith("CDS_") and name not in known | OTHER_CDS_VARIABLES)


def dockerignore_allows(path: str) -> bool:
    """Whether the .dockerignore next to the Dockerfile lets `path` into the build context."""
    allowed = True
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*") or path == pattern:
            allowed = negate
    return allowed


# -- compose -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


def test_compose_has_hapi_loader_and_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"hapi", "loader", "cds-service", "harness"}
    assert services["harness"]["profiles"] == ["harness"], "`up` must not start the harness"
    hapi = services["hapi"]
    assert re.fullmatch(r"hapiproject/hapi:v\d+\.\d+\.\d+", hapi["image"]), "pin the HAPI FHIR version"
    assert environment(hapi)["hapi.fhir.fhir_version"] == "R4"
    assert [p[2] for p in ports(hapi)] == [8080]
    for name in ("loader", "cds-service"):
        service = services[name]
        assert service["depends_on"]["hapi"]["condition"] in ("service_started", "service_healthy")
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
    # Every published port is on loopback (the demo runs open), and no host port is used twice.
    published = [p for service in services.values() for p in ports(service)]
    assert all(address == "127.0.0.1" for address, _, _ in published)
    assert len({host for _, host, _ in published}) == len(published)


def test_compose_references_files_that_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == ROOT, name
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes") or []:
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"
            else:
                assert source in (compose.get("volumes") or {}), f"{name}: undeclared volume {source}"


def test_loader_waits_for_hapi_then_runs_the_scenario_loader(compose: dict[str, Any]) -> None:
    loader = compose["services"]["loader"]
    hapi_base = f"http://hapi:{ports(compose['services']['hapi'])[0][2]}/fhir"
    command = loader["command"]
    assert command == [*LOADER_COMMAND, hapi_base]
    entrypoint = loader["entrypoint"]
    assert entrypoint[:2] == ["python", "/app/docker/probe.py"] and entrypoint[-1] == "--"
    assert f"{hapi_base}/metadata" in entrypoint
    assert loader.get("restart", "no") == "no"
    args = build_parser().parse_args(command[1:])
    assert callable(args.func)


def test_service_configuration_file_and_environment_are_valid(compose: dict[str, Any]) -> None:
    service = compose["services"]["cds-service"]
    env = environment(service)
    assert env_settings_problems(env) == []
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in service["volumes"]}
    config_file = COMPOSE.parent / mounts[env["CDS_CONFIG"]]
    settings = load_settings(config_file, environ={k: v for k, v in env.items() if k != "CDS_CONFIG"})
    hapi_base = f"http://hapi:{ports(compose['services']['hapi'])[0][2]}/fhir"
    fhir = settings.section("fhir")
    assert fhir["allowed_servers"] == [hapi_base] and fhir["allow_http"] is True
    # The container port published is the one the service listens on (the image sets 8080).
    image_env = dockerfile_env()
    port = int(env.get("CDS_SERVER_PORT", image_env["CDS_SERVER_PORT"]))
    assert [p[2] for p in ports(service)] == [port]
    host_port = ports(service)[0][1]
    assert settings.section("server")["public_url"] == f"http://localhost:{host_port}"
    assert settings.workers == int(env["CDS_SERVER_WORKERS"])
    assert not settings.auth_enabled, "the demo runs open (synthetic data only)"


def test_sandbox_override_shares_hapis_network_and_trusts_the_sandbox(compose: dict[str, Any]) -> None:
    override = load_compose(SANDBOX_OVERRIDE)
    assert set(override["services"]) <= set(compose["services"])
    service = override["services"]["cds-service"]
    assert service["network_mode"] == "service:hapi" and service["ports"] == []
    assert "!reset" in SANDBOX_OVERRIDE.read_text(encoding="utf-8")
    env = {**environment(compose["services"]["cds-service"]), **environment(service)}
    assert env_settings_problems(env) == []
    mounts = {
        str(v).split(":")[1]: str(v).split(":")[0] for v in compose["services"]["cds-service"]["volumes"]
    }
    settings = load_settings(
        COMPOSE.parent / mounts[env["CDS_CONFIG"]],
        environ={k: v for k, v in env.items() if k != "CDS_CONFIG"},
    )
    port = settings.section("server")["port"]
    assert ("127.0.0.1", port, port) in ports(override["services"]["hapi"])
    assert settings.section("server")["public_url"] == f"http://localhost:{port}"
    assert settings.section("fhir")["allowed_servers"] == ["http://localhost:8080/fhir"]
    clients = settings.section("security")["trusted_clients"]
    assert clients == {
        "https://sandbox.cds-hooks.org": {
            "jku_allow": ["https://sandbox.cds-hooks.org/.well-known/jwks.json"]
        }
    }


# -- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            for word in shlex.split(args):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def test_dockerfile_installs_like_the_makefile() -> None:
    instructions = dockerfile_instructions()
    runs = [args for keyword, args in instructions if keyword == "RUN" and "pip install" in args]
    assert len(runs) == 1, runs
    assert pip_install_arguments(runs[0]) == pip_install_arguments(makefile_install_recipe()) == ["-e", "."]
    base = next(args for keyword, args in instructions if keyword == "FROM")
    assert re.fullmatch(r"python:\$\{PYTHON_VERSION\}-slim|python:3\.\d+-slim(-\w+)?", base), base
    arg = next(
        args for keyword, args in instructions if keyword == "ARG" and args.startswith("PYTHON_VERSION")
    )
    assert arg.split("=", 1)[1] >= "3.11"


def test_dockerfile_copies_the_source_and_data_folders() -> None:
    instructions = dockerfile_instructions()
    workdir = next(args for keyword, args in instructions if keyword == "WORKDIR")
    copied: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "COPY":
            *sources, destination = shlex.split(args)
            for source in sources:
                copied[source.rstrip("/")] = destination
    for needed in (
        "pyproject.toml",
        "README.md",
        "cds_service",
        "mappings",
        "trials",
        "cards",
        "docker/probe.py",
    ):
        assert needed in copied, f"the image needs {needed}"
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert dockerignore_allows(source), f"COPY {source}: excluded by {DOCKERIGNORE.name}"
    for excluded in (".venv", ".fhir-venv", "var", ".git", "tests"):
        assert not dockerignore_allows(excluded), f"{excluded} would enter the build context"
    # The data folders are found: data.dir is where they were copied.
    env = dockerfile_env()
    assert env["CDS_DATA_DIR"] == workdir
    assert all(
        copied[folder] in (f"{folder}/", f"{workdir}/{folder}/") for folder in ("mappings", "trials", "cards")
    )
    assert env_settings_problems(env) == []
    assert load_settings(environ=env).data_dir == Path(workdir).resolve()


def test_dockerfile_runs_as_non_root_with_healthcheck_and_the_production_server() -> None:
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert keywords.index("USER") > max(i for i, (k, a) in enumerate(instructions) if k == "RUN")
    healthcheck = next(args for keyword, args in instructions if keyword == "HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD")
    assert "--interval" in options and "--timeout" in options
    assert exec_form(command.strip()) == ["python", "/app/docker/probe.py"]
    entrypoint = exec_form(next(args for keyword, args in instructions if keyword == "ENTRYPOINT"))
    cmd = exec_form(next(args for keyword, args in instructions if keyword == "CMD"))
    assert entrypoint + cmd == ["cds-service", "serve", "--host", "0.0.0.0"]
    exposed = next(args for keyword, args in instructions if keyword == "EXPOSE")
    assert exposed == dockerfile_env()["CDS_SERVER_PORT"]
    assert dockerfile_env()["CDS_STORE_URL"].startswith("sqlite:////var/lib/cds-service/")
    assert '"/var/lib/cds-service"' in next(args for keyword, args in instructions if keyword == "VOLUME")


# -- the probe, for real ---------------------------------------------------------------------------


class _Health:
    def __init__(self) -> None:
        self.status = 200
        self.body = b'{"status": "ok"}'
        self.fail_first = 0
        self.hits = 0


@pytest.fixture
def health_server() -> Iterator[tuple[str, _Health]]:
    state = _Health()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits += 1
            status = 503 if state.hits <= state.fail_first else state.status
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()


def run_probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    return subprocess.run(
        [sys.executable, str(PROBE), *args],
        env={**base_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_probe_checks_the_services_own_health_port(health_server: tuple[str, _Health]) -> None:
    base, state = health_server
    port = base.rsplit(":", 1)[1]
    assert run_probe(env={"CDS_SERVER_PORT": port}).returncode == 0
    state.body = b'{"status": "degraded"}'
    result = run_probe(env={"CDS_SERVER_PORT": port})
    assert result.returncode == 1 and "degraded" in result.stderr
    state.status = 503
    assert run_probe(f"{base}/health").returncode == 1
    closed = run_probe("http://127.0.0.1:9/health")
    assert closed.returncode == 1 and "unreachable" in closed.stderr


def test_probe_waits_then_runs_the_command(health_server: tuple[str, _Health]) -> None:
    base, state = health_server
    state.body = b'{"resourceType": "CapabilityStatement"}'
    state.fail_first = 2
    result = run_probe(
        "--wait", "30", "--interval", "0.1", f"{base}/fhir/metadata", "--",
        sys.executable, "-c", "print('loader ran')",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loader ran"
    assert state.hits == 3 and result.stderr.count("waiting for") == 2
    state.fail_first = 10**6
    gave_up = run_probe(
        "--wait", "0.3", "--interval", "0.1", f"{base}/x", "--", sys.executable, "-c", "print(1)"
    )
    assert gave_up.returncode == 1 and gave_up.stdout == ""


# -- the harness against the compose demo --------------------------------------------------------


def shell_commands(markdown: str) -> list[str]:
    """The commands of the fenced sh/bash blocks of a Markdown text (continuation lines joined)."""
    commands: list[str] = []
    for block in re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL):
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def harness_invocation(command: str) -> tuple[list[str], dict[str, Any] | None, dict[str, Any] | None]:
    """The `cds-service harness` arguments a documented command runs, with the compose document and
    service it runs in (None, None when it runs on the host)."""
    words = shlex.split(command.split(" #")[0])
    if words[:2] == ["docker", "compose"]:
        files = [words[i + 1] for i, word in enumerate(words) if word == "-f"]
        assert files, f"name the compose file: {command}"
        document: dict[str, Any] = {"services": {}}
        for file in files:  # later files override earlier ones, service by service (enough here)
            for name, service in load_compose(ROOT / file)["services"].items():
                document["services"].setdefault(name, {}).update(service)
        run = words.index("run")
        options_and_service = [w for w in words[run + 1 :] if not w.startswith("-")]
        name, extra = options_and_service[0], options_and_service[1:]
        service = document["services"][name]
        harness_command = extra or service["command"]
        assert harness_command[:2] == ["cds-service", "harness"], f"{command}: not the harness"
        return harness_command[2:], document, service
    assert words[:2] == ["cds-service", "harness"] or words[-2:] == ["make", "harness"], command
    return words[2:], None, None


def _option(arguments: list[str], name: str) -> str:
    assert name in arguments, f"{name} missing in {arguments}"
    return arguments[arguments.index(name) + 1]


def compose_service_settings(document: dict[str, Any]) -> Any:
    """The settings the cds-service container starts with: its mounted file, then its environment."""
    service = document["services"]["cds-service"]
    env = {**dockerfile_env(), **environment(service)}
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in service.get("volumes") or []}
    config_file = COMPOSE.parent / mounts[env["CDS_CONFIG"]] if "CDS_CONFIG" in env else None
    return load_settings(config_file, environ={k: v for k, v in env.items() if k != "CDS_CONFIG"})


def test_the_documented_compose_harness_command_fits_the_compose_configuration() -> None:
    """docs/deploy.md's harness command, run as documented: the fhirServer it sends is a server the
    service container is allowed to read, and the service URL is the service on the compose network."""
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    commands = [c for c in shell_commands(text) if re.search(r"(cds-service harness|run --rm harness)", c)]
    assert commands, "docs/deploy.md shows no harness command for the compose demo"
    for command in commands:
        arguments, document, service = harness_invocation(command)
        assert document is not None and service is not None, (
            f"{command}: a harness on the host sends a fhirServer the service container cannot reach"
        )
        args = build_parser().parse_args(["harness", *arguments])
        assert args.func.__name__ == "cmd_harness"
        settings = compose_service_settings(document)
        fhir = settings.section("fhir")
        assert args.fhir.rstrip("/") in [s.rstrip("/") for s in fhir["allowed_servers"]], (
            f"{command}: the service allows {fhir['allowed_servers']}, the harness sends {args.fhir}"
        )
        assert not args.fhir.startswith("http://") or fhir["allow_http"]
        # The FHIR server and the service are reached by their compose names and container ports.
        fhir_host, fhir_port = re.match(r"http://([^:/]+):(\d+)/", args.fhir).groups()  # type: ignore[union-attr]
        assert fhir_host in document["services"] and int(fhir_port) in [
            p[2] for p in ports(document["services"][fhir_host])
        ]
        service_host, service_port = re.match(r"http://([^:/]+):(\d+)$", args.service).groups()  # type: ignore[union-attr]
        assert service_host == "cds-service"
        assert int(service_port) == int(settings.section("server")["port"])
        entrypoint = service["entrypoint"]  # waits for the service before running the harness
        assert entrypoint[-2:] == [f"{args.service}/health", "--"] and "--wait" in entrypoint
        # The loader fills the same FHIR server the harness loads into.
        assert document["services"]["loader"]["command"][-1] == args.fhir


def test_readme_and_deploy_guide_give_the_same_compose_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    deploy = DEPLOY_DOC.read_text(encoding="utf-8")
    commands = re.findall(r"`(docker compose [^`]+)`", readme)
    assert commands, "the README names no compose command"
    for command in commands:
        assert command in deploy, f"README's `{command}` is not the one docs/deploy.md gives"
        files = [w for i, w in enumerate(command.split()) if command.split()[i - 1] == "-f"]
        assert files and all((ROOT / f).is_file() for f in files), command


# -- docs ------------------------------------------------------------------------------------------


def test_deploy_guide_lists_every_metric_and_says_containers_are_not_started_in_ci() -> None:
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    names = {metric.name for metric in Metrics().registry.collect()}
    assert names
    for name in names:
        assert re.search(rf"`{re.escape(name)}(_total)?`", text), f"docs/deploy.md does not list {name}"
    assert "not started in CI" in text
    for variable in set(re.findall(r"\bCDS_[A-Z_]+\b", text)):
        assert not env_settings_problems({variable: ""}), (
            f"docs/deploy.md names an unknown setting {variable}"
        )
