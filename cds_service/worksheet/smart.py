"""The worksheet's SMART App Launch 2.x client: discovery, authorization code with PKCE S256, the
token exchange, and the ``id_token`` verified against the server's JWKS.

The flow (https://hl7.org/fhir/smart-app-launch/app-launch.html):

1. The EHR opens ``/worksheet/launch?iss=<FHIR base>&launch=<opaque>`` (EHR launch), or a user opens
   it with ``iss`` only, or nothing when ``worksheet.standalone_iss`` is set (standalone launch: the
   authorization server asks for the patient).
2. ``iss`` must be one of ``worksheet.issuers`` (or below one): the app never talks to a server it was
   not told to trust, so a crafted link cannot make it fetch from anywhere or trust a look-alike
   authorization server.
3. ``{iss}/.well-known/smart-configuration`` gives the endpoints; the browser is sent to the
   authorization endpoint with ``response_type=code``, ``client_id``, ``redirect_uri``, ``scope``,
   ``state``, ``aud`` = ``iss``, ``launch`` (EHR launch), ``nonce`` and ``code_challenge`` (S256).
4. The code comes back to ``/worksheet/callback`` with ``state``; it is exchanged at the token
   endpoint with the ``code_verifier`` (and HTTP Basic client authentication for a confidential
   client). The answer must carry an access token, a ``patient`` and an ``id_token``.
5. The ``id_token``'s signature is checked with the key of its ``kid`` from the server's JWKS
   (asymmetric algorithms only: never ``none`` or HMAC), and its ``iss`` (the server's OpenID issuer),
   ``aud`` (our client id), ``exp``, ``iat`` and ``nonce``. The user is its ``fhirUser`` claim.

Every failure is a :class:`SmartError` whose ``kind`` chooses the page the user sees; its ``detail``
never holds a token, a code or a patient id. Network calls have explicit timeouts
(``worksheet.auth_timeout_seconds``) and read at most :data:`MAX_RESPONSE_BYTES`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import jwt
import requests

from ..patient_data.fhir_client import FhirClient, ServerNotAllowed

log = logging.getLogger(__name__)

SMART_CONFIGURATION = ".well-known/smart-configuration"
OPENID_CONFIGURATION = ".well-known/openid-configuration"
#: Signature algorithms accepted on an id_token: asymmetric only (RS256 is the one OIDC requires).
ID_TOKEN_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")
#: Discovery documents and key sets are kept this long per process.
DISCOVERY_CACHE_SECONDS = 3600.0
#: A key set is fetched again for an unknown ``kid`` (key rotation) at most this often.
JWKS_REFRESH_SECONDS = 60.0
#: The most read from any answer of the authorization server.
MAX_RESPONSE_BYTES = 1024 * 1024
CLOCK_SKEW_SECONDS = 60
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
#: A fhirUser: a reference to the user's own resource, relative or absolute.
FHIR_USER = re.compile(
    r"^(?:https?://\S+/)?(Practitioner|PractitionerRole|Patient|RelatedPerson|Person)/[A-Za-z0-9\-.]{1,64}$"
)


class SmartError(Exception):
    """A launch that cannot go on. ``kind`` is one of :data:`KINDS`; ``detail`` is safe to show and log."""

    KINDS = (
        "bad_launch",  # the launch request itself is malformed (no iss, bad parameters)
        "not_allowed",  # iss is not an issuer this site trusts
        "unreachable",  # the authorization server did not answer (down, timed out, 5xx)
        "bad_server",  # its answer is unusable (bad discovery document, no PKCE S256)
        "denied",  # the user or the server refused the authorization (error on the callback)
        "token_refused",  # the token endpoint refused the code (invalid_grant, invalid_client …)
        "identity",  # the id_token is missing or does not verify
    )

    def __init__(self, kind: str, detail: str) -> None:
        assert kind in self.KINDS, kind
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class SmartServer:
    """What discovery says about a FHIR server's authorization server."""

    iss: str  # the FHIR base the app was launched with (the `aud` of the authorization request)
    issuer: str  # the OpenID issuer: the id_token's `iss`
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str

    def as_dict(self) -> dict[str, str]:
        return {
            "iss": self.iss,
            "issuer": self.issuer,
            "authorization_endpoint": self.authorization_endpoint,
            "token_endpoint": self.token_endpoint,
            "jwks_uri": self.jwks_uri,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SmartServer:
        return cls(**{key: str(data[key]) for key in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TokenGrant:
    """The token endpoint's answer, checked. Never logged (``__repr__`` hides the token)."""

    access_token: str
    expires_at: float
    scope: str
    patient_id: str
    id_token: str
    app_context: str | None
    need_patient_banner: bool
    encounter_id: str | None

    def __repr__(self) -> str:
        return "TokenGrant(<hidden>)"


def code_verifier() -> str:
    """A PKCE code verifier: 86 characters of url-safe randomness (RFC 7636 allows 43 to 128)."""
    return secrets.token_urlsafe(64)


def code_challenge(verifier: str) -> str:
    """The S256 challenge: base64url (no padding) of SHA-256 of the verifier."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def scopes(resource_types: list[str], version: str, standalone: bool) -> str:
    """The scopes the worksheet asks for: launch context, the user's identity, read and search of
    each resource type the screening reads (SMART v2 ``.rs`` or v1 ``.read``)."""
    suffix = ".rs" if version == "v2" else ".read"
    wanted = ["launch/patient" if standalone else "launch", "openid", "fhirUser"]
    wanted += [f"patient/{kind}{suffix}" for kind in dict.fromkeys(resource_types)]
    return " ".join(wanted)


def _read_json(response: requests.Response, what: str) -> Any:
    """A JSON answer read to at most MAX_RESPONSE_BYTES."""
    body = b""
    for chunk in response.iter_content(64 * 1024):
        body += chunk
        if len(body) > MAX_RESPONSE_BYTES:
            raise SmartError("bad_server", f"{what}: answer larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise SmartError("bad_server", f"{what}: the answer is not JSON") from None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


class SmartClient:
    """Talks to the EHR's authorization server for the worksheet. Thread-safe; one per process."""

    def __init__(
        self,
        worksheet: dict[str, Any],
        fhir_client: FhirClient,
        redirect_uri: str,
        resource_types: list[str],
        session: requests.Session | None = None,
    ) -> None:
        self.client_id: str = worksheet["client_id"]
        self.client_secret: str = worksheet["client_secret"]
        self.scope_version: str = worksheet["scope_version"]
        self.timeout = float(worksheet["auth_timeout_seconds"])
        self.standalone_iss: str = str(worksheet["standalone_iss"]).rstrip("/")
        self.redirect_uri = redirect_uri
        self.resource_types = resource_types
        #: Its allow-list is worksheet.issuers: the same check decides where the FHIR token may go.
        self.fhir_client = fhir_client
        self.allow_http = fhir_client.allow_http
        self._session = session or requests.Session()
        self._session.headers["Accept"] = "application/json"
        self._lock = threading.Lock()
        self._servers: dict[str, tuple[float, SmartServer]] = {}
        self._key_sets: dict[str, tuple[float, jwt.PyJWKSet]] = {}
        self._key_refreshed: dict[str, float] = {}

    @property
    def confidential(self) -> bool:
        return bool(self.client_secret)

    # -- the issuer -------------------------------------------------------------------------------

    def check_iss(self, iss: str) -> str:
        """``iss`` without a trailing slash, if it is a FHIR base this site trusts; else SmartError."""
        iss = iss.strip().rstrip("/")
        if not iss:
            raise SmartError("bad_launch", "the launch has no iss (the FHIR server to use)")
        try:
            self.fhir_client.check_server(iss)
        except ServerNotAllowed as exc:
            raise SmartError("not_allowed", f"iss {_origin(iss)}: {exc.reason}") from None
        return iss

    def _check_endpoint(self, url: Any, name: str) -> str:
        if not isinstance(url, str) or not url:
            raise SmartError("bad_server", f"the SMART configuration has no {name}")
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise SmartError("bad_server", f"the SMART configuration's {name} is not an http(s) URL")
        if parts.scheme == "http" and not self.allow_http:
            raise SmartError("bad_server", f"the SMART configuration's {name} uses plain http")
        return url

    # -- HTTP -----------------------------------------------------------------------------------

    def _get_json(self, url: str, what: str) -> Any:
        try:
            response = self._session.get(url, timeout=self.timeout, stream=True, allow_redirects=False)
        except requests.Timeout:
            raise SmartError("unreachable", f"{what}: no answer within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise SmartError("unreachable", f"{what}: {type(exc).__name__}") from None
        with response:
            if response.status_code >= 500:
                raise SmartError("unreachable", f"{what}: HTTP {response.status_code}")
            if response.status_code != 200:
                raise SmartError("bad_server", f"{what}: HTTP {response.status_code}")
            return _read_json(response, what)

    # -- discovery ------------------------------------------------------------------------------

    def discover(self, iss: str) -> SmartServer:
        """The endpoints of ``iss``'s authorization server (cached for an hour per process)."""
        now = time.monotonic()
        with self._lock:
            cached = self._servers.get(iss)
        if cached and cached[0] > now:
            return cached[1]
        document = self._get_json(f"{iss}/{SMART_CONFIGURATION}", "SMART configuration")
        if not isinstance(document, dict):
            raise SmartError("bad_server", "the SMART configuration is not a JSON object")
        methods = document.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise SmartError("bad_server", "the authorization server does not support PKCE S256")
        issuer, jwks_uri = document.get("issuer"), document.get("jwks_uri")
        if not issuer or not jwks_uri:
            # SMART 2.x puts them in smart-configuration for sso-openid-connect; older servers only
            # publish them in the OpenID configuration.
            openid = self._get_json(f"{iss}/{OPENID_CONFIGURATION}", "OpenID configuration")
            if isinstance(openid, dict):
                issuer, jwks_uri = issuer or openid.get("issuer"), jwks_uri or openid.get("jwks_uri")
        server = SmartServer(
            iss=iss,
            issuer=self._check_endpoint(issuer, "issuer"),
            authorization_endpoint=self._check_endpoint(
                document.get("authorization_endpoint"), "authorization_endpoint"
            ),
            token_endpoint=self._check_endpoint(document.get("token_endpoint"), "token_endpoint"),
            jwks_uri=self._check_endpoint(jwks_uri, "jwks_uri"),
        )
        with self._lock:
            self._servers[iss] = (now + DISCOVERY_CACHE_SECONDS, server)
        return server

    # -- authorization ---------------------------------------------------------------------------

    def authorize_url(
        self, server: SmartServer, *, launch: str | None, state: str, nonce: str, verifier: str
    ) -> str:
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": scopes(self.resource_types, self.scope_version, standalone=launch is None),
            "state": state,
            "aud": server.iss,
            "nonce": nonce,
            "code_challenge": code_challenge(verifier),
            "code_challenge_method": "S256",
        }
        if launch is not None:
            params["launch"] = launch
        separator = "&" if "?" in server.authorization_endpoint else "?"
        return f"{server.authorization_endpoint}{separator}{urlencode(params)}"

    def exchange_code(self, server: SmartServer, code: str, verifier: str, now: float) -> TokenGrant:
        """Trade the authorization code for tokens; the answer is checked, the id_token not yet."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": verifier,
        }
        auth = None
        if self.confidential:
            auth = (self.client_id, self.client_secret)  # client_secret_basic
        else:
            form["client_id"] = self.client_id
        try:
            response = self._session.post(
                server.token_endpoint,
                data=form,
                auth=auth,
                timeout=self.timeout,
                stream=True,
                allow_redirects=False,
            )
        except requests.Timeout:
            raise SmartError("unreachable", f"token endpoint: no answer within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise SmartError("unreachable", f"token endpoint: {type(exc).__name__}") from None
        with response:
            if response.status_code >= 500:
                raise SmartError("unreachable", f"token endpoint: HTTP {response.status_code}")
            try:
                body = _read_json(response, "token endpoint")
            except SmartError:
                if response.status_code != 200:
                    raise SmartError(
                        "token_refused", f"token endpoint: HTTP {response.status_code}"
                    ) from None
                raise
        if response.status_code != 200 or not isinstance(body, dict) or "error" in body:
            error = body.get("error") if isinstance(body, dict) else None
            code_text = error if isinstance(error, str) and re.fullmatch(r"[a-z_]{1,40}", error) else None
            raise SmartError(
                "token_refused",
                f"token endpoint: HTTP {response.status_code}" + (f" ({code_text})" if code_text else ""),
            )
        return self._grant(body, now)

    @staticmethod
    def _grant(body: dict[str, Any], now: float) -> TokenGrant:
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise SmartError("bad_server", "the token answer has no access_token")
        if str(body.get("token_type", "")).lower() != "bearer":
            raise SmartError("bad_server", "the token answer's token_type is not Bearer")
        patient = body.get("patient")
        if not isinstance(patient, str) or not FHIR_ID.match(patient):
            raise SmartError("bad_server", "the token answer names no patient (launch context)")
        id_token = body.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise SmartError("identity", "the token answer has no id_token (openid fhirUser not granted)")
        expires_in = body.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else 300.0
        app_context = body.get("appContext")
        encounter = body.get("encounter")
        return TokenGrant(
            access_token=access_token,
            expires_at=now + lifetime,
            scope=str(body.get("scope", "")),
            patient_id=patient,
            id_token=id_token,
            app_context=app_context if isinstance(app_context, str) else None,
            need_patient_banner=body.get("need_patient_banner") is not False,
            encounter_id=encounter if isinstance(encounter, str) and FHIR_ID.match(encounter) else None,
        )

    # -- the id_token ------------------------------------------------------------------------------

    def _key_set(self, server: SmartServer, refresh: bool = False) -> jwt.PyJWKSet:
        now = time.monotonic()
        with self._lock:
            cached = self._key_sets.get(server.jwks_uri)
            last_refresh = self._key_refreshed.get(server.jwks_uri, float("-inf"))
            refresh = refresh and now - last_refresh >= JWKS_REFRESH_SECONDS  # forged kids cannot flood it
            if refresh:
                self._key_refreshed[server.jwks_uri] = now
        if cached and cached[0] > now and not refresh:
            return cached[1]
        document = self._get_json(server.jwks_uri, "JWKS")
        try:
            key_set = jwt.PyJWKSet.from_dict(document)
        except (jwt.PyJWKSetError, jwt.InvalidKeyError, TypeError, ValueError, KeyError):
            raise SmartError("bad_server", "the server's JWKS holds no usable key") from None
        with self._lock:
            self._key_sets[server.jwks_uri] = (now + DISCOVERY_CACHE_SECONDS, key_set)
        return key_set

    @staticmethod
    def _pick(key_set: jwt.PyJWKSet, kid: str | None, alg: str) -> jwt.PyJWK | None:
        family = {"R": "RSA", "P": "RSA", "E": "EC"}[alg[0]]
        usable = [
            key
            for key in key_set.keys
            if key.key_type == family and (getattr(key, "public_key_use", None) in (None, "sig"))
        ]
        if kid is not None:
            usable = [key for key in usable if key.key_id == kid]
        return usable[0] if len(usable) == 1 or (kid is not None and usable) else None

    def verify_id_token(self, server: SmartServer, id_token: str, nonce: str) -> str:
        """Verify the id_token and return the user (its ``fhirUser``); SmartError("identity") if not."""
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise SmartError("identity", "the id_token is not a JWT") from None
        alg = header.get("alg")
        if alg not in ID_TOKEN_ALGORITHMS:
            raise SmartError("identity", f"the id_token's algorithm {str(alg)[:10]!r} is not accepted")
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None
        key = self._pick(self._key_set(server), kid, alg)
        if key is None:  # a key published since we fetched the set (rotation)
            key = self._pick(self._key_set(server, refresh=True), kid, alg)
        if key is None:
            raise SmartError("identity", "no key of the server's JWKS matches the id_token")
        try:
            claims = jwt.decode(
                id_token,
                key.key,
                algorithms=[alg],
                audience=self.client_id,
                issuer=server.issuer,
                leeway=CLOCK_SKEW_SECONDS,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise SmartError("identity", "the id_token has expired") from None
        except jwt.InvalidAudienceError:
            raise SmartError("identity", "the id_token is for another client (aud)") from None
        except jwt.InvalidIssuerError:
            raise SmartError("identity", "the id_token comes from another issuer (iss)") from None
        except jwt.PyJWTError as exc:
            raise SmartError("identity", f"the id_token does not verify ({type(exc).__name__})") from None
        if not isinstance(claims.get("nonce"), str) or not secrets.compare_digest(claims["nonce"], nonce):
            raise SmartError("identity", "the id_token's nonce is not the one this launch sent")
        audience = claims.get("aud")
        if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != self.client_id:
            raise SmartError("identity", "the id_token's azp is not this client")
        user = claims.get("fhirUser") or claims.get("profile")
        if not isinstance(user, str) or not FHIR_USER.match(user):
            raise SmartError("identity", "the id_token names no fhirUser")
        return user
