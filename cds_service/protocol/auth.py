"""Authentication of CDS clients: the CDS Hooks 2.0 bearer JWT.

Every call from a CDS client carries ``Authorization: Bearer <JWT>``, signed by the client with an
asymmetric key. :class:`JwtVerifier` checks it against the ``security`` configuration section:

* the issuer (``iss``) must be a configured trusted client;
* ``alg`` must be ES384, RS384, ES256 or RS256 (``none`` and HMAC are refused before any key work)
  and must fit the key type and curve;
* keys come from the issuer's ``jwks_file``, its ``jwks_url``, or the token's ``jku`` header. A key
  pinned in ``jwks_file`` whose ``kid`` matches is used first, whatever the ``jku`` says: nothing is
  fetched (a site can trust the public sandbox, or its EHR, offline). Otherwise the ``jku`` is used
  only when it equals ``jwks_url`` or sits under one of the issuer's ``jku_allow`` prefixes; a
  ``jku`` off the allow-list is refused and never fetched; ``x5u``/``jwk`` headers are ignored;
* remote key sets are fetched with a timeout, no redirects and a size cap, cached for
  ``jwks_cache_seconds`` and refreshed once when a ``kid`` is unknown (at most once per
  :attr:`JwtVerifier.MIN_REFRESH_SECONDS` per URL). Limits are per URL and follow failures: a URL
  whose fetch failed is not fetched again for that interval. So a caller without a key who names a
  trusted issuer and made-up ``jku`` URLs costs one failed fetch per made-up URL and cannot use up
  anything the real client's URL needs;
* ``aud`` must be the exact URL called, ``exp``/``iat``/``jti`` are required, ``nbf`` is honoured,
  all with ``clock_skew_seconds`` of leeway, and each (``iss``, ``jti``) is accepted once.

Failures raise :class:`AuthError`. Its ``reason`` is short, fixed text meant for the log; it never
contains the token or any part of it, and the HTTP answer (401) should say nothing at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import jwt
import requests

from ..base.config import ConfigError

log = logging.getLogger(__name__)

#: ``(replay_key, expires_at_epoch) -> True`` the first time the key is seen, ``False`` on a replay.
ReplayGuard = Callable[[str, float], bool]

#: The only signature algorithms accepted (CDS Hooks recommends ES384 and RS384).
ALLOWED_ALGORITHMS: frozenset[str] = frozenset({"ES384", "RS384", "ES256", "RS256"})
_EC_CURVES: dict[str, str] = {"ES256": "P-256", "ES384": "P-384"}

MAX_AUTHORIZATION_CHARS = 16 * 1024
MAX_JTI_CHARS = 255
MAX_JWKS_BYTES = 512 * 1024
#: Distinct remote key-set URLs kept in the cache (least recently used are dropped).
MAX_CACHED_URLS = 32
#: A token living longer than this is accepted but noted once per issuer in the log.
LONG_LIFETIME_SECONDS = 3600

_PUBLIC_MEMBERS: dict[str, tuple[str, ...]] = {
    "RSA": ("kty", "n", "e", "kid", "alg", "use", "key_ops"),
    "EC": ("kty", "crv", "x", "y", "kid", "alg", "use", "key_ops"),
}


class AuthError(Exception):
    """Any authentication failure. `reason` is for the log (no token content); the HTTP body says nothing."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason: str = reason


class _FetchError(Exception):
    """A remote key set could not be obtained (the message is for the log)."""


@dataclass(frozen=True)
class _TrustedClient:
    issuer: str
    jwks_file: str | None
    jwks_url: str | None
    jku_allow: tuple[str, ...]

    def jku_permitted(self, jku: str) -> bool:
        """True when the token's ``jku`` may be fetched for this issuer."""
        if self.jwks_url is not None and jku == self.jwks_url:
            return True
        return any(url_under_prefix(jku, prefix) for prefix in self.jku_allow)


@dataclass
class _UrlEntry:
    keys: list[dict[str, Any]] | None = None
    fetched_at: float | None = None  # the last successful fetch
    failed_at: float | None = None  # the last failed fetch, if later than the last success
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _FileEntry:
    mtime_ns: int
    keys: list[dict[str, Any]]


def url_under_prefix(url: str, prefix: str) -> bool:
    """True when ``url`` is on the same scheme, host and port as ``prefix`` and its path lies under it.

    Compared after parsing, not as raw strings, so ``https://good.org.evil.com``,
    ``https://good.org@evil.com`` and ``https://good.org/keys/../other`` do not pass for the prefix
    ``https://good.org/keys``. A prefix path without a trailing slash matches whole path segments.
    """
    if not url or any(ch.isspace() or ord(ch) < 0x20 or ch == "\\" for ch in url):
        return False
    try:
        target, allowed = urlsplit(url), urlsplit(prefix)
        target_port, allowed_port = target.port, allowed.port
    except ValueError:
        return False
    scheme = target.scheme.lower()
    if scheme not in ("https", "http") or scheme != allowed.scheme.lower():
        return False
    if target.username is not None or target.password is not None:
        return False
    default_port = 443 if scheme == "https" else 80
    if not target.hostname or target.hostname != allowed.hostname:
        return False
    if (target_port or default_port) != (allowed_port or default_port):
        return False
    path = target.path or "/"
    if "%" in path or any(part in (".", "..") for part in path.split("/")):
        return False
    allowed_path = allowed.path or "/"
    if allowed_path.endswith("/"):
        return path.startswith(allowed_path)
    return path == allowed_path or path.startswith(allowed_path + "/")


def replay_key(issuer: str, jti: str) -> str:
    """The key handed to the replay guard: a fixed-length digest of (issuer, jti)."""
    return hashlib.sha256(f"{issuer}\x00{jti}".encode()).hexdigest()


def _parse_jwks(document: Any) -> list[dict[str, Any]]:
    """The public RSA/EC signing keys of a JWKS document (other members and key types dropped)."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (expected an object with a 'keys' list)")
    keys: list[dict[str, Any]] = []
    for raw in document["keys"]:
        if not isinstance(raw, Mapping):
            continue
        members = _PUBLIC_MEMBERS.get(raw.get("kty"))  # type: ignore[arg-type]
        if members is None:
            continue
        if raw.get("use", "sig") != "sig":
            continue
        key_ops = raw.get("key_ops")
        if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
            continue
        keys.append({name: raw[name] for name in members if name in raw})
    return keys


def _load_jwks_file(path: str) -> list[dict[str, Any]]:
    with open(path, "rb") as handle:
        data = handle.read(MAX_JWKS_BYTES + 1)
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError("key set file too large")
    return _parse_jwks(json.loads(data))


def _key_fits(key: Mapping[str, Any], alg: str) -> bool:
    """The key type (and curve) matches the algorithm, and the key's own ``alg`` (if any) agrees."""
    if key.get("alg") not in (None, alg):
        return False
    if alg.startswith("RS"):
        return key.get("kty") == "RSA"
    return key.get("kty") == "EC" and key.get("crv") == _EC_CURVES[alg]


def _pick_key(keys: list[dict[str, Any]], kid: str | None, alg: str) -> dict[str, Any] | None:
    """The key for ``kid`` (or the only key when there is no kid); None when the kid is unknown."""
    if kid is None:
        if len(keys) != 1:
            raise AuthError("no kid and the key set does not hold exactly one key")
        candidates = keys
    else:
        candidates = [key for key in keys if key.get("kid") == kid]
        if not candidates:
            return None
    for key in candidates:
        if _key_fits(key, alg):
            return key
    raise AuthError("alg does not match key")


def _numeric_claim(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim as a float, None when absent; AuthError when it is not a finite number."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthError(f"malformed {name}")
    return float(value)


class JwtVerifier:
    """Verifies CDS Hooks client JWTs against the ``security`` configuration section.

    Build one per process at start-up (it reads ``jwks_file`` key sets immediately and raises
    :class:`~cds_service.base.config.ConfigError` when the section is unusable) and share it: it is
    thread-safe and holds the key-set caches.
    """

    #: Minimum time between two fetches of the same key-set URL (unknown-kid refreshes included).
    MIN_REFRESH_SECONDS: float = 30.0

    def __init__(
        self,
        security: dict[str, Any],
        replay_guard: ReplayGuard,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._replay_guard = replay_guard
        self._session = session if session is not None else requests.Session()
        self._clock = clock
        self._skew = float(security.get("clock_skew_seconds", 60))
        self._timeout = float(security.get("jwks_timeout_seconds", 2.0))
        self._cache_seconds = float(security.get("jwks_cache_seconds", 3600))
        self._clients = self._read_clients(security.get("trusted_clients") or {})
        self._jws = jwt.PyJWS()
        self._lock = threading.Lock()
        self._url_cache: OrderedDict[str, _UrlEntry] = OrderedDict()
        self._file_cache: dict[str, _FileEntry] = {}
        self._long_lived_noted: set[str] = set()
        for client in self._clients.values():
            if client.jwks_file is not None:
                try:
                    mtime_ns = os.stat(client.jwks_file).st_mtime_ns
                    keys = _load_jwks_file(client.jwks_file)
                except (OSError, ValueError) as exc:
                    raise ConfigError(
                        f"security.trusted_clients[{client.issuer!r}].jwks_file: cannot load "
                        f"{client.jwks_file}: {exc}"
                    ) from exc
                self._file_cache[client.jwks_file] = _FileEntry(mtime_ns, keys)

    @property
    def issuers(self) -> frozenset[str]:
        """The trusted issuers (empty = nobody can authenticate)."""
        return frozenset(self._clients)

    @staticmethod
    def _read_clients(section: Mapping[str, Any]) -> dict[str, _TrustedClient]:
        clients: dict[str, _TrustedClient] = {}
        for issuer, entry in section.items():
            where = f"security.trusted_clients[{issuer!r}]"
            if not isinstance(issuer, str) or not issuer or not isinstance(entry, Mapping):
                raise ConfigError(f"{where}: expected an issuer string mapped to a key source")
            jku_allow = tuple(entry.get("jku_allow") or ())
            for prefix in jku_allow:
                parts = urlsplit(prefix)
                if parts.scheme not in ("https", "http") or not parts.hostname:
                    raise ConfigError(f"{where}.jku_allow: {prefix!r} is not an http(s) URL prefix")
            client = _TrustedClient(
                issuer=issuer,
                jwks_file=entry.get("jwks_file") or None,
                jwks_url=entry.get("jwks_url") or None,
                jku_allow=jku_allow,
            )
            if client.jwks_file is None and client.jwks_url is None and not client.jku_allow:
                raise ConfigError(f"{where}: give jwks_file, jwks_url or jku_allow")
            clients[issuer] = client
        return clients

    # -- the public entry point -------------------------------------------------------------

    def verify(self, authorization: str | None, audience: str) -> dict[str, Any]:
        """Verify the ``Authorization`` header value for a call to ``audience`` (the exact URL).

        Returns the verified claims; raises :class:`AuthError` on any failure.
        """
        token = self._bearer_token(authorization)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise AuthError("algorithm not allowed")
        if "crit" in header or header.get("b64", True) is not True:
            raise AuthError("unsupported critical header")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed kid")
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        issuer = unverified.get("iss")
        if not isinstance(issuer, str) or not issuer:
            raise AuthError("missing iss")
        client = self._clients.get(issuer)
        if client is None:
            raise AuthError("unknown issuer")

        key = self._select_key(client, header.get("jku"), kid, alg)
        claims = self._verified_claims(token, key, alg)
        if claims.get("iss") != issuer:
            raise AuthError("issuer mismatch")
        self._check_claims(claims, issuer, audience)
        return claims

    # -- steps ------------------------------------------------------------------------------

    @staticmethod
    def _bearer_token(authorization: str | None) -> str:
        if not authorization or not authorization.strip():
            raise AuthError("missing authorization")
        if len(authorization) > MAX_AUTHORIZATION_CHARS:
            raise AuthError("authorization header too large")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise AuthError("not a bearer token")
        token = token.strip()
        if not token or not token.isascii() or any(ch.isspace() for ch in token):
            raise AuthError("malformed token")
        return token

    def _select_key(self, client: _TrustedClient, jku: Any, kid: str | None, alg: str) -> dict[str, Any]:
        if client.jwks_file is not None and kid is not None:
            # A pinned key with this kid: used whatever the jku says, and nothing is fetched.
            key = _pick_key(self._file_keys(client.jwks_file), kid, alg)
            if key is not None:
                return key
        if jku is not None:
            if not isinstance(jku, str) or not client.jku_permitted(jku):
                raise AuthError("jku not allow-listed")
            return self._key_from_url(jku, kid, alg)
        if client.jwks_file is not None:
            key = _pick_key(self._file_keys(client.jwks_file), kid, alg)
            if key is not None:
                return key
        if client.jwks_url is not None:
            return self._key_from_url(client.jwks_url, kid, alg)
        if client.jwks_file is None:
            raise AuthError("no jku and no configured key set")
        raise AuthError("unknown kid")

    def _verified_claims(self, token: str, key: dict[str, Any], alg: str) -> dict[str, Any]:
        try:
            public_key = jwt.PyJWK(key, algorithm=alg)
        except jwt.PyJWTError:
            raise AuthError("unusable key") from None
        try:
            decoded = self._jws.decode_complete(
                token,
                key=public_key,
                algorithms=[alg],
                options={"verify_signature": True, "enforce_minimum_key_length": True},
            )
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("alg does not match key") from None
        except jwt.InvalidKeyError:
            raise AuthError("key too weak") from None
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        try:
            claims = json.loads(decoded["payload"])
        except (ValueError, RecursionError):
            raise AuthError("malformed claims") from None
        if not isinstance(claims, dict):
            raise AuthError("malformed claims")
        return claims

    def _check_claims(self, claims: dict[str, Any], issuer: str, audience: str) -> None:
        now = self._clock()
        leeway = self._skew
        aud = claims.get("aud")
        if isinstance(aud, str):
            audience_ok = aud == audience
        elif isinstance(aud, list):
            audience_ok = any(isinstance(item, str) and item == audience for item in aud)
        else:
            raise AuthError("missing aud")
        if not audience or not audience_ok:
            raise AuthError("wrong audience")
        exp = _numeric_claim(claims, "exp")
        iat = _numeric_claim(claims, "iat")
        nbf = _numeric_claim(claims, "nbf")
        if exp is None:
            raise AuthError("missing exp")
        if iat is None:
            raise AuthError("missing iat")
        if exp <= now - leeway:
            raise AuthError("expired")
        if iat > now + leeway:
            raise AuthError("issued in the future")
        if nbf is not None and nbf > now + leeway:
            raise AuthError("not yet valid")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise AuthError("missing jti")
        if len(jti) > MAX_JTI_CHARS:
            raise AuthError("jti too long")
        if exp - iat > LONG_LIFETIME_SECONDS and issuer not in self._long_lived_noted:
            self._long_lived_noted.add(issuer)
            log.info(
                "issuer %s signs tokens living longer than %d s (accepted)", issuer, LONG_LIFETIME_SECONDS
            )
        # Remember the jti until the token could no longer be accepted anyway.
        if not self._replay_guard(replay_key(issuer, jti), exp + leeway):
            raise AuthError("replayed jti")

    # -- key sets ---------------------------------------------------------------------------

    def _file_keys(self, path: str) -> list[dict[str, Any]]:
        """The keys of a JWKS file, re-read when its modification time changes."""
        with self._lock:
            entry = self._file_cache.get(path)
            try:
                mtime_ns = os.stat(path).st_mtime_ns
                if entry is None or entry.mtime_ns != mtime_ns:
                    entry = _FileEntry(mtime_ns, _load_jwks_file(path))
                    self._file_cache[path] = entry
            except (OSError, ValueError) as exc:
                if entry is None:
                    log.error("key set file %s cannot be read: %s", path, exc)
                    raise AuthError("jwks unavailable") from None
                log.warning("key set file %s cannot be re-read (%s); keeping the previous keys", path, exc)
            return entry.keys

    def _key_from_url(self, url: str, kid: str | None, alg: str) -> dict[str, Any]:
        entry = self._url_entry(url)
        key = _pick_key(self._url_keys(url, entry, refresh=False), kid, alg)
        if key is None:
            # Unknown kid: the client may have rotated its keys. Refresh once (rate-limited).
            key = _pick_key(self._url_keys(url, entry, refresh=True), kid, alg)
        if key is None:
            raise AuthError("unknown kid")
        return key

    def _url_entry(self, url: str) -> _UrlEntry:
        """The cache entry of ``url``, created on first use.

        The cache holds :data:`MAX_CACHED_URLS` URLs. When it is full, an entry without keys (a URL
        that never answered: a made-up ``jku``) goes first, so such URLs cannot push a working key
        set out.
        """
        with self._lock:
            entry = self._url_cache.get(url)
            if entry is not None:
                self._url_cache.move_to_end(url)
                return entry
            entry = self._url_cache[url] = _UrlEntry()
            while len(self._url_cache) > MAX_CACHED_URLS:
                keyless = next((u for u, e in self._url_cache.items() if e.keys is None and u != url), None)
                if keyless is not None:
                    del self._url_cache[keyless]
                else:
                    self._url_cache.popitem(last=False)
            return entry

    def _url_keys(self, url: str, entry: _UrlEntry, refresh: bool) -> list[dict[str, Any]]:
        """Cached keys of a remote JWKS; fetched when missing or stale, or on refresh (unknown kid).

        Per URL: after a failed fetch, no new attempt for :attr:`MIN_REFRESH_SECONDS`; a refresh of
        a working key set (an unknown ``kid``) at most once per that interval.
        """
        with entry.lock:
            now = self._clock()
            fresh = entry.fetched_at is not None and now - entry.fetched_at < self._cache_seconds
            if entry.keys is not None and fresh and not refresh:
                return entry.keys
            backing_off = entry.failed_at is not None and now - entry.failed_at < self.MIN_REFRESH_SECONDS
            refreshed_lately = (
                refresh and entry.fetched_at is not None and now - entry.fetched_at < self.MIN_REFRESH_SECONDS
            )
            if backing_off or refreshed_lately:
                if entry.keys is not None:
                    return entry.keys
                raise AuthError("jwks unavailable")
            try:
                keys = self._fetch(url)
            except _FetchError as exc:
                entry.failed_at = now
                log.warning("key set %s could not be fetched: %s", url, exc)
                if entry.keys is not None:
                    return entry.keys
                raise AuthError("jwks unavailable") from None
            entry.keys, entry.fetched_at, entry.failed_at = keys, now, None
            return keys

    def _fetch(self, url: str) -> list[dict[str, Any]]:
        started = time.monotonic()
        try:
            response = self._session.get(
                url,
                timeout=self._timeout,
                allow_redirects=False,
                stream=True,
                headers={"Accept": "application/json"},
            )
        except requests.RequestException as exc:
            raise _FetchError(type(exc).__name__) from None
        try:
            if response.status_code != 200:
                raise _FetchError(f"HTTP {response.status_code}")
            body = bytearray()
            for chunk in response.iter_content(chunk_size=16384):
                body.extend(chunk)
                if len(body) > MAX_JWKS_BYTES:
                    raise _FetchError("response too large")
                if time.monotonic() - started > 2 * self._timeout:
                    raise _FetchError("response too slow")
            return _parse_jwks(json.loads(bytes(body)))
        except requests.RequestException as exc:
            raise _FetchError(type(exc).__name__) from None
        except (ValueError, RecursionError) as exc:
            raise _FetchError(f"invalid key set: {exc}") from None
        finally:
            response.close()
