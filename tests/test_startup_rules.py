"""Safe defaults at start-up: the service refuses to run OPEN outside loopback unless
``security.allow_open`` says so (a container binds 0.0.0.0, so the container configuration must say
what it needs), ``make run`` stays open on loopback with its warning, and plain http where CDS Hooks
requires TLS gets a warning (loopback excepted). The container files are checked without a Docker
engine: their effective configuration is built the way the container would build it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cds_service.app import create_app
from cds_service.base.config import (
    ConfigError,
    check_open_binding,
    is_loopback,
    load_settings,
    startup_warnings,
)
from cds_service.tools.fhir_server import free_port
from tests.conftest import make_settings
from tests.test_deploy import (
    COMPOSE,
    SANDBOX_OVERRIDE,
    dockerfile_env,
    dockerfile_instructions,
    environment,
    exec_form,
    load_compose,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("cds.example-hospital.org", False),
    ],
)
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _open(tmp_path: Path, **server: Any) -> Any:
    return make_settings(tmp_path, server=server)


def test_open_mode_is_refused_outside_loopback(tmp_path: Path) -> None:
    check_open_binding(_open(tmp_path, host="127.0.0.1"))  # make run: fine
    with pytest.raises(ConfigError, match=r"refusing to serve OPEN .* on 0\.0\.0\.0.*allow_open"):
        check_open_binding(_open(tmp_path, host="0.0.0.0"))
    with pytest.raises(ConfigError, match="refusing to serve OPEN"):
        check_open_binding(_open(tmp_path), host="10.0.0.7")
    allowed = make_settings(tmp_path, server={"host": "0.0.0.0"}, security={"allow_open": True})
    check_open_binding(allowed)
    trusted = make_settings(
        tmp_path,
        server={"host": "0.0.0.0", "public_url": "https://cds.example.org"},
        security={
            "trusted_clients": {"https://ehr.example.org": {"jku_allow": ["https://ehr.example.org/k/"]}}
        },
    )
    check_open_binding(trusted)


def _serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "cds-service"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "cds_service.cli"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    return subprocess.run(
        [*command, "serve", *args], env={**base, **env}, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_serve_refuses_to_start_open_on_all_addresses(tmp_path: Path) -> None:
    """The real command, as the container runs it: it stops before binding anything."""
    result = _serve(
        "--host",
        "0.0.0.0",
        "--port",
        str(free_port()),
        env={"CDS_STORE_URL": f"sqlite:///{tmp_path}/s.sqlite3"},
    )
    assert result.returncode == 2  # bad input: the configuration (cli.py)
    assert "refusing to serve OPEN" in result.stderr and "CDS_SECURITY_ALLOW_OPEN=true" in result.stderr
    assert "Listening at" not in result.stderr


def _container_settings(env: dict[str, str]) -> Any:
    """The settings a container with this environment builds (image ENV, then the service's)."""
    environ = {**dockerfile_env(), **env}
    config = environ.pop("CDS_CONFIG", None)
    if config is not None:
        compose = load_compose(COMPOSE)
        mounts = {
            str(v).split(":")[1]: str(v).split(":")[0] for v in compose["services"]["cds-service"]["volumes"]
        }
        config = str(COMPOSE.parent / mounts[config])
    return load_settings(config, environ=environ)


def _container_host() -> str:
    instructions = dockerfile_instructions()
    cmd = exec_form(next(args for keyword, args in instructions if keyword == "CMD"))
    return cmd[cmd.index("--host") + 1]


def test_the_bare_image_refuses_open_mode() -> None:
    assert not is_loopback(_container_host())
    with pytest.raises(ConfigError, match="refusing to serve OPEN"):
        check_open_binding(_container_settings({}), host=_container_host())


def test_the_compose_demo_says_explicitly_that_it_runs_open() -> None:
    compose = load_compose(COMPOSE)
    settings = _container_settings(environment(compose["services"]["cds-service"]))
    assert not settings.auth_enabled and settings.section("security")["allow_open"] is True
    check_open_binding(settings, host=_container_host())


def test_the_sandbox_override_trusts_the_sandbox_so_it_is_not_open() -> None:
    compose, override = load_compose(COMPOSE), load_compose(SANDBOX_OVERRIDE)
    env = {
        **environment(compose["services"]["cds-service"]),
        **environment(override["services"]["cds-service"]),
    }
    settings = _container_settings(env)
    assert settings.auth_enabled
    check_open_binding(settings, host=_container_host())


def test_plain_http_where_tls_is_required_gets_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        tmp_path,
        server={"public_url": "http://cds.example-hospital.org"},
        security={
            "trusted_clients": {
                "https://ehr.example.org": {"jku_allow": ["http://keys.example.org/jwks/"]},
                "https://local.example.org": {"jwks_url": "http://127.0.0.1:9999/jwks.json"},
            }
        },
    )
    warnings = startup_warnings(settings)
    assert len(warnings) == 2
    assert "server.public_url 'http://cds.example-hospital.org' is plain http" in warnings[0]
    assert "http://keys.example.org/jwks/" in warnings[1]
    with caplog.at_level(logging.WARNING, logger="cds_service.app"):
        create_app(settings)
    assert "CDS Hooks requires TLS" in caplog.text
    loopback = make_settings(tmp_path, server={"public_url": "http://localhost:8080"})
    assert startup_warnings(loopback) == []
    tls = make_settings(tmp_path, server={"public_url": "https://cds.example-hospital.org"})
    assert startup_warnings(tls) == []


def test_make_run_stays_open_on_loopback_with_its_warning(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "HOST ?= 127.0.0.1" in makefile and "serve --host $(HOST)" in makefile
    settings = make_settings(tmp_path)  # the embedded defaults
    assert settings.section("server")["host"] == "127.0.0.1" and not settings.auth_enabled
    check_open_binding(settings)
    with caplog.at_level(logging.WARNING, logger="cds_service.app"):
        create_app(settings)
    assert "RUNNING OPEN" in caplog.text
