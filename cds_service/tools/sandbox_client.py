"""Tokens exactly as the public CDS Hooks sandbox signs them, read from its vendored build.

The sandbox (``../shared/vendor/cds-hooks-sandbox/build/``) is a browser page: it signs every call
in the browser, so its signing key, key id, ``jku`` and claims are in ``app.bundle.js``. This module
reads them from there (never from a copy of ours) and signs the same ES384 JWT:

    header  {"alg": "ES384", "typ": "JWT", "kid": "44823f3d-…", "jku": "https://sandbox.cds-hooks.org/…"}
    claims  {"iss": "https://sandbox.cds-hooks.org", "aud": <the service URL called>, "exp": now + 300,
             "iat": now, "jti": <uuid>}

The ``jku`` points at the sandbox's public host, which cannot be reached here: the service trusts
these tokens offline only with the sandbox's public key pinned (``jwks_file`` = the build's
``.well-known/jwks.json``; docs/security.md). Used by the tests and ``make probe``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt

from ..base.config import PROJECT_ROOT

#: The vendored sandbox build (``../shared`` beside the repository, as in CI).
SANDBOX_BUILD = PROJECT_ROOT.parent / "shared" / "vendor" / "cds-hooks-sandbox" / "build"

_SIGN_CALL = re.compile(
    r"JSON\.stringify\(\{iss:\"(?P<iss>[^\"]+)\",aud:\w+,exp:[^}]*\}\),\w+=JSON\.stringify\("
    r"\{alg:\"(?P<alg>[A-Z0-9]+)\",typ:\"JWT\",kid:\"(?P<kid>[^\"]+)\",jku:\"(?P<jku>[^\"]+)\"\}\)"
)
_PEM = re.compile(
    r"-----BEGIN PRIVATE KEY-----(?:\\n|\n)(?P<body>[A-Za-z0-9+/=\\n]+?)-----END PRIVATE KEY-----"
)


class SandboxBuildError(RuntimeError):
    """The sandbox build is missing or no longer signs the way this module reads it."""


@dataclass(frozen=True)
class SandboxSigner:
    """Signs CDS Hooks client JWTs the way the sandbox build does."""

    issuer: str
    alg: str
    kid: str
    jku: str
    private_key_pem: str
    jwks_path: Path

    @classmethod
    def from_build(cls, build: Path = SANDBOX_BUILD) -> SandboxSigner:
        bundle_path = build / "app.bundle.js"
        jwks_path = build / ".well-known" / "jwks.json"
        if not bundle_path.is_file() or not jwks_path.is_file():
            raise SandboxBuildError(f"the CDS Hooks sandbox build is not at {build} (../shared/vendor)")
        bundle = bundle_path.read_text(encoding="utf-8", errors="replace")
        call = _SIGN_CALL.search(bundle)
        if call is None:
            raise SandboxBuildError(f"{bundle_path}: the JWT header and claims were not found")
        pem = _PEM.search(bundle[call.end() : call.end() + 4000])
        if pem is None:
            raise SandboxBuildError(f"{bundle_path}: the signing key was not found next to the claims")
        body = pem.group("body").replace("\\n", "\n").strip()
        return cls(
            issuer=call.group("iss"),
            alg=call.group("alg"),
            kid=call.group("kid"),
            jku=call.group("jku"),
            private_key_pem=f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n",
            jwks_path=jwks_path,
        )

    def published_kids(self) -> list[str]:
        """The key ids in the build's public key set (what a site pins)."""
        return [str(key.get("kid")) for key in json.loads(self.jwks_path.read_text())["keys"]]

    def token(self, audience: str, now: float | None = None) -> str:
        now = time.time() if now is None else now
        claims = {
            "iss": self.issuer,
            "aud": audience,
            "exp": round(now + 300),
            "iat": round(now),
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(
            claims,
            self.private_key_pem,
            algorithm=self.alg,
            headers={"typ": "JWT", "kid": self.kid, "jku": self.jku},
        )
