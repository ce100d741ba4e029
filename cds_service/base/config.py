"""Service configuration: embedded defaults, one optional YAML file, environment overrides.

Precedence (lowest first): the defaults below → the file given by ``--config`` or ``CDS_CONFIG``
→ environment variables ``CDS_<SECTION>_<KEY>`` (e.g. ``CDS_FHIR_DEADLINE_SECONDS=2.5``).
With no file at all the service screens every shipped trial, runs open (no JWT check) on
127.0.0.1:8080 and keeps its store in ``var/cds-service.sqlite3``.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from cerberus import Validator

from .datafiles import dotted_errors

#: The repository root: the shipped data folders (mappings/, trials/, cards/) live here.
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # cds_service/base/config.py → two folders up

DEFAULTS: dict[str, Any] = {
    "server": {
        "host": "127.0.0.1",
        "port": 8080,
        "workers": 0,  # 0 = one worker process per core
        # Threads per worker (gunicorn gthread): hooks waiting on FHIR, slow clients and /health each
        # take one; the screening itself is CPU-bound and uses the worker's core (docs/deploy.md).
        "threads": 16,
        "max_body_bytes": 64 * 1024 * 1024,
        # The URL clients use to reach this service (JWT `aud` is checked against it + the route).
        "public_url": "",
    },
    "data": {
        # Folder holding mappings/, trials/ and cards/. Empty = the repository root.
        "dir": "",
    },
    "screening": {
        # NCT ids to screen; empty = every trial file in trials/.
        "trials": [],
        # Minutes before the enrollment window closes at which an eligible card turns `warning`.
        "closing_soon_minutes": 120,
        # Hours a card the clinician overrode or accepted (referred) stays silent for that patient and
        # trial, unless the trial status rises from possibly eligible to eligible (docs/cards.md).
        "override_silence_hours": 24,
        # Site protocol / screening app linked from every card ("" = none). `{trial_id}` in the URL is
        # replaced by the trial's NCT id. `smart` = a SMART app launch URL (no appContext is sent),
        # `absolute` = a plain page (e.g. a protocol document).
        "site_link_url": "",
        "site_link_label": "Site screening protocol",
        "site_link_type": "smart",
        # Who receives the "Refer to the research team" request (reference: e.g. CareTeam/icu-research).
        "research_team_display": "ICU research team",
        "research_team_reference": "",
        # FHIR resources the referral suggestion creates (docs/cards.md).
        "referral_resources": ["ServiceRequest", "ResearchSubject"],
        # Code system of the card's overrideReasons (codes: declined, not-appropriate, …).
        "override_reason_system": "https://cds-service.example.org/override-reason",
        # IANA time zone of the times shown to clinicians on cards ("today 14:30"); instants in the
        # card's machine-readable extension stay in UTC.
        "timezone": "UTC",
        # Cards for trials whose registry status is not `recruiting` (completed, unknown, …): shown,
        # saying so, with a referral that is not recommended; false hides them altogether.
        "show_not_recruiting": True,
    },
    "fhir": {
        # Base URLs the bearer token may be sent to; empty = any https server (and http if allowed).
        "allowed_servers": [],
        "allow_http": False,
        "deadline_seconds": 3.0,
        "lookback_hours": 72,
        "page_size": 1000,
        "max_pages": 20,
        "max_workers": 8,
        # All FHIR responses of one hook together (each query, each page) may hold at most this many
        # bytes; a body is read as a stream and cut at the limit (the hook then gets 412).
        "max_response_bytes": 32 * 1024 * 1024,
    },
    "store": {
        # sqlite:///path or postgresql://user@host:port/db
        "url": "sqlite:///var/cds-service.sqlite3",
        # Issued cards (the screening log, with patient ids) and feedback older than this are purged.
        "retention_days": 365,
        # The longest a hook waits for the store (silence check, recording its cards) before answering.
        "hook_timeout_seconds": 0.2,
    },
    "security": {
        # issuer -> {jwks_file: path} or {jwks_url: url} ; jku_allow: list of URL prefixes
        "trusted_clients": {},
        # With no trusted clients the service runs OPEN. It refuses to do so on an address other than
        # loopback (a container binds 0.0.0.0) unless this is set: a deliberate choice, never a default.
        "allow_open": False,
        "clock_skew_seconds": 60,
        "jwks_timeout_seconds": 2.0,
        "jwks_cache_seconds": 3600,
    },
    "worksheet": {
        # The screening worksheet: a SMART on FHIR app served by this service (docs/worksheet.md).
        # When on, every card links to it and carries the count of bedside items; the worksheet the list.
        "enabled": False,
        # The URL users reach this service at ("" = server.public_url): the launch URL is
        # <public_url>/worksheet/launch and the redirect URI <public_url>/worksheet/callback.
        "public_url": "",
        # The client id the EHR gave the app; a secret makes it a confidential client (client_secret_basic).
        "client_id": "",
        "client_secret": "",
        # FHIR base URLs (`iss`) the app may be launched from (or below one of them).
        "issuers": [],
        # The FHIR base of a standalone launch (no `iss` given); "" = standalone launch needs `iss`.
        "standalone_iss": "",
        # SMART v2 scopes (patient/Observation.rs …) or v1 (patient/Observation.read …).
        "scope_version": "v2",
        # Fernet keys (cryptography) encrypting tokens at rest: the first encrypts, all decrypt (rotation).
        "token_keys": [],
        # A session ends after this long without a request, and after max_hours whatever happens.
        "idle_minutes": 30,
        "max_hours": 8,
        # The app's own time limits: the EHR's authorization server (each call) and its FHIR data.
        "auth_timeout_seconds": 5.0,
        "fhir_deadline_seconds": 10.0,
        # The session cookie's SameSite: Lax; None when the EHR shows the app in a cross-site frame.
        "cookie_samesite": "Lax",
        # Origins allowed to frame the pages (CSP frame-ancestors); empty = none.
        "frame_ancestors": [],
        "link_label": "Open the screening worksheet",
    },
    "logging": {
        "level": "INFO",
    },
}

_TRUSTED_CLIENT_SCHEMA = {
    "type": "dict",
    "schema": {
        "jwks_file": {"type": "string", "empty": False},
        "jwks_url": {"type": "string", "regex": r"^https?://.+"},
        "jku_allow": {"type": "list", "schema": {"type": "string", "regex": r"^https?://.+"}},
    },
}


def _time_zone_ok(field: str, value: Any, error: Any) -> None:
    """An IANA zone name the zoneinfo database knows (tzdata is a dependency: no system files needed)."""
    try:
        ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError):
        error(field, f"unknown IANA time zone {value!r} (e.g. UTC, Europe/Paris, America/Chicago)")


def _fernet_key_ok(field: str, value: Any, error: Any) -> None:
    """A Fernet key: 32 bytes, url-safe base64 (``Fernet.generate_key()``). Never echoed back."""
    try:
        if len(base64.urlsafe_b64decode(str(value).encode("ascii"))) == 32:
            return
    except (ValueError, UnicodeEncodeError):
        pass
    error(field, "not a Fernet key (32 bytes, url-safe base64: Fernet.generate_key())")


SCHEMA: dict[str, Any] = {
    "server": {
        "type": "dict",
        "schema": {
            "host": {"type": "string", "empty": False},
            "port": {"type": "integer", "min": 1, "max": 65535},
            "workers": {"type": "integer", "min": 0, "max": 64},
            "threads": {"type": "integer", "min": 1, "max": 256},
            "max_body_bytes": {"type": "integer", "min": 1024},
            "public_url": {"type": "string"},
        },
    },
    "data": {"type": "dict", "schema": {"dir": {"type": "string"}}},
    "screening": {
        "type": "dict",
        "schema": {
            "trials": {"type": "list", "schema": {"type": "string", "regex": r"^NCT\d{8}$"}},
            "closing_soon_minutes": {"type": "integer", "min": 0},
            "override_silence_hours": {"type": "number", "min": 0},
            "site_link_url": {"type": "string", "regex": r"^(https?://.+)?$"},
            "site_link_label": {"type": "string", "empty": False},
            "site_link_type": {"type": "string", "allowed": ["smart", "absolute"]},
            "research_team_display": {"type": "string", "empty": False},
            "research_team_reference": {"type": "string", "regex": r"^([A-Za-z]+/[A-Za-z0-9\-.]{1,64})?$"},
            "referral_resources": {
                "type": "list",
                "minlength": 1,
                "schema": {"type": "string", "allowed": ["ServiceRequest", "ResearchSubject"]},
            },
            "override_reason_system": {"type": "string", "regex": r"^(https?|urn):.+"},
            "timezone": {"type": "string", "check_with": _time_zone_ok},
            "show_not_recruiting": {"type": "boolean"},
        },
    },
    "fhir": {
        "type": "dict",
        "schema": {
            "allowed_servers": {"type": "list", "schema": {"type": "string", "regex": r"^https?://.+"}},
            "allow_http": {"type": "boolean"},
            "deadline_seconds": {"type": "number", "min": 0.1, "max": 60},
            "lookback_hours": {"type": "number", "min": 1, "max": 24 * 30},
            "page_size": {"type": "integer", "min": 1, "max": 10000},
            "max_pages": {"type": "integer", "min": 1, "max": 1000},
            "max_workers": {"type": "integer", "min": 1, "max": 32},
            "max_response_bytes": {"type": "integer", "min": 1024},
        },
    },
    "store": {
        "type": "dict",
        "schema": {
            "url": {"type": "string", "regex": r"^(sqlite|postgresql|postgres)://.*"},
            "retention_days": {"type": "number", "min": 1, "max": 36500},
            "hook_timeout_seconds": {"type": "number", "min": 0.01, "max": 10},
        },
    },
    "security": {
        "type": "dict",
        "schema": {
            "trusted_clients": {
                "type": "dict",
                "keysrules": {"type": "string"},
                "valuesrules": _TRUSTED_CLIENT_SCHEMA,
            },
            "allow_open": {"type": "boolean"},
            "clock_skew_seconds": {"type": "integer", "min": 0, "max": 600},
            "jwks_timeout_seconds": {"type": "number", "min": 0.1, "max": 30},
            "jwks_cache_seconds": {"type": "integer", "min": 0},
        },
    },
    "worksheet": {
        "type": "dict",
        "schema": {
            "enabled": {"type": "boolean"},
            "public_url": {"type": "string", "regex": r"^(https?://[^\s/]+(/[^\s]*)?)?$"},
            "client_id": {"type": "string"},
            "client_secret": {"type": "string"},
            "issuers": {"type": "list", "schema": {"type": "string", "regex": r"^https?://[^\s]+$"}},
            "standalone_iss": {"type": "string", "regex": r"^(https?://[^\s]+)?$"},
            "scope_version": {"type": "string", "allowed": ["v1", "v2"]},
            "token_keys": {"type": "list", "schema": {"type": "string", "check_with": _fernet_key_ok}},
            "idle_minutes": {"type": "number", "min": 1, "max": 24 * 60},
            "max_hours": {"type": "number", "min": 0.1, "max": 7 * 24},
            "auth_timeout_seconds": {"type": "number", "min": 0.1, "max": 60},
            "fhir_deadline_seconds": {"type": "number", "min": 0.1, "max": 120},
            "cookie_samesite": {"type": "string", "allowed": ["Lax", "Strict", "None"]},
            "frame_ancestors": {
                "type": "list",
                "schema": {"type": "string", "regex": r"^https?://[^\s;,']+$"},
            },
            "link_label": {"type": "string", "empty": False, "maxlength": 70},
        },
    },
    "logging": {
        "type": "dict",
        "schema": {"level": {"type": "string", "allowed": ["DEBUG", "INFO", "WARNING", "ERROR"]}},
    },
}


class ConfigError(ValueError):
    """The configuration file or environment is invalid; the message names the file and key."""


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "trusted_clients":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _coerce_env(raw: str, default: Any) -> Any:
    """Environment values are strings; give them the type of the default they replace."""
    if isinstance(default, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, list):
        return [item.strip() for item in raw.split(",") if item.strip()]
    if isinstance(default, dict):
        loaded = yaml.safe_load(raw)
        return loaded if isinstance(loaded, dict) else {}
    return raw


def _env_overrides(environ: os._Environ[str] | dict[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for section, keys in DEFAULTS.items():
        for key, default in keys.items():
            name = f"CDS_{section}_{key}".upper()
            if name in environ:
                try:
                    overrides.setdefault(section, {})[key] = _coerce_env(environ[name], default)
                except ValueError as exc:
                    raise ConfigError(f"environment variable {name}: {exc}") from exc
    return overrides


@dataclass(frozen=True)
class Settings:
    """Validated configuration. Sections are plain dicts; use the properties for derived values."""

    raw: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULTS))
    source: str = "embedded defaults"

    def section(self, name: str) -> dict[str, Any]:
        return self.raw[name]

    @property
    def data_dir(self) -> Path:
        configured = self.raw["data"]["dir"]
        return Path(configured).resolve() if configured else PROJECT_ROOT

    @property
    def workers(self) -> int:
        return self.raw["server"]["workers"] or (os.cpu_count() or 1)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.raw["security"]["trusted_clients"])

    @property
    def worksheet_url(self) -> str:
        """Where users reach the worksheet's routes: ``worksheet.public_url`` or ``server.public_url``."""
        worksheet = self.raw["worksheet"]
        return str(worksheet["public_url"] or self.raw["server"]["public_url"]).rstrip("/")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _http_not_loopback(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme.lower() == "http" and not is_loopback(parts.hostname or "")


def startup_warnings(settings: Settings) -> list[str]:
    """What is worth a WARNING line at start-up: plain http where CDS Hooks 2.0 requires TLS."""
    warnings: list[str] = []
    public_url = settings.section("server")["public_url"]
    if public_url and _http_not_loopback(public_url):
        warnings.append(
            f"server.public_url {public_url!r} is plain http: CDS Hooks requires TLS between the EHR "
            "and the service (terminate it in front of the service, docs/deploy.md)"
        )
    for issuer, entry in settings.section("security")["trusted_clients"].items():
        for url in [entry.get("jwks_url") or "", *(entry.get("jku_allow") or [])]:
            if url and _http_not_loopback(url):
                warnings.append(
                    f"security.trusted_clients[{issuer!r}]: key set URL {url!r} is plain http: anyone on "
                    "the path could swap the keys"
                )
    return warnings


def check_open_binding(settings: Settings, host: str | None = None) -> None:
    """Refuse to serve OPEN (no trusted clients) on an address other than loopback, unless
    ``security.allow_open`` says so. Raises :class:`ConfigError` naming the way out."""
    host = host if host is not None else settings.section("server")["host"]
    if settings.auth_enabled or is_loopback(host) or settings.section("security")["allow_open"]:
        return
    raise ConfigError(
        f"{settings.source}: refusing to serve OPEN (no security.trusted_clients) on {host}, which is not "
        "a loopback address: anyone who can reach it could make the service fetch patient records with "
        "the token they send. Configure trusted clients (docs/security.md), bind to 127.0.0.1, or set "
        "security.allow_open: true (CDS_SECURITY_ALLOW_OPEN=true) for synthetic data only."
    )


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: os._Environ[str] | dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Build the settings from defaults, an optional file, the environment and explicit overrides."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("CDS_CONFIG") or None
    raw = copy.deepcopy(DEFAULTS)
    source = "embedded defaults"
    if path:
        file_path = Path(path)
        try:
            loaded = yaml.safe_load(file_path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"{file_path}: cannot read configuration: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{file_path}: not valid YAML{where}: {problem}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file_path}: the configuration must be a mapping of sections")
        raw = _merge(raw, loaded)
        source = str(file_path)
    raw = _merge(raw, _env_overrides(environ))
    if overrides:
        raw = _merge(raw, overrides)
    validator = Validator(SCHEMA)
    if not validator.validate(raw):
        problems = "; ".join(f"{path}: {message}" for path, message in dotted_errors(validator.errors))
        raise ConfigError(f"{source}: invalid configuration: {problems}")
    if raw["security"]["trusted_clients"] and not raw["server"]["public_url"]:
        raise ConfigError(
            f"{source}: server.public_url is required when security.trusted_clients is set "
            "(a client's JWT `aud` must equal the exact URL it called)"
        )
    _check_worksheet(raw["worksheet"], raw["server"], source)
    return Settings(raw=raw, source=source)


def is_loopback_url(url: str) -> bool:
    """True for a URL whose host is a loopback address or ``localhost``."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_worksheet(worksheet: dict[str, Any], server: dict[str, Any], source: str) -> None:
    """A switched-on worksheet needs its URL, client id, keys and issuers; over https off loopback."""
    if not worksheet["enabled"]:
        return
    public_url = worksheet["public_url"] or server["public_url"]
    missing = [
        name
        for name, value in (
            ("worksheet.public_url (or server.public_url)", public_url),
            ("worksheet.client_id", worksheet["client_id"]),
            ("worksheet.token_keys", worksheet["token_keys"]),
            ("worksheet.issuers", worksheet["issuers"]),
        )
        if not value
    ]
    if missing:
        raise ConfigError(f"{source}: worksheet.enabled needs {', '.join(missing)} (docs/worksheet.md)")
    if public_url.startswith("http://") and not is_loopback_url(public_url):
        raise ConfigError(
            f"{source}: worksheet public URL {public_url!r}: https is required off loopback "
            "(the session cookie is Secure)"
        )
    if worksheet["cookie_samesite"] == "None" and public_url.startswith("http://"):
        raise ConfigError(f"{source}: worksheet.cookie_samesite None needs an https public URL")
