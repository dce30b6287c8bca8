"""Relay accounts, password hashes and signed tokens.

Passwords are kept only as salted scrypt hashes (RFC 7914) from the standard
library. Tokens are HMAC-SHA256 signed and carry their own expiry, so they
stay valid across a relay restart as long as the signing key does; the key
lives in a file readable only by the relay's user.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import ConfigError

# scrypt cost: n=2**14, r=8 takes about 50 ms and 16 MiB per check, which slows
# guessing without making sign-in feel slow.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16

ACCESS_TOKEN_TTL_S = 15 * 60
REFRESH_TOKEN_TTL_S = 30 * 24 * 3600


@dataclass(frozen=True, slots=True)
class PasswordHash:
    salt: bytes
    digest: bytes

    def __repr__(self) -> str:
        return "<PasswordHash scrypt>"

    @classmethod
    def create(cls, password: str) -> "PasswordHash":
        salt = secrets.token_bytes(SALT_BYTES)
        return cls(salt, _scrypt(password, salt))

    def matches(self, password: str) -> bool:
        return hmac.compare_digest(self.digest, _scrypt(password, self.salt))


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )


# A hash to check against for unknown user names, so a failed sign-in takes
# the same time whether or not the account exists.
_DUMMY_HASH = PasswordHash(b"\0" * SALT_BYTES, b"\0" * 32)


class Accounts:
    """User names and their password hashes."""

    def __init__(self) -> None:
        self._hashes: dict[str, PasswordHash] = {}

    def __repr__(self) -> str:
        return f"<Accounts {sorted(self._hashes)}>"

    def add(self, name: str, password: str) -> None:
        if not name or "/" in name or len(name) > 64:
            raise ConfigError(f"invalid account name {name!r}: use 1 to 64 characters without '/'")
        if not password:
            raise ConfigError(f"account {name!r} needs a non-empty password")
        self._hashes[name] = PasswordHash.create(password)

    def add_spec(self, spec: str) -> None:
        """Add an account from a ``NAME:PASSWORD`` command-line value."""
        name, sep, password = spec.partition(":")
        if not sep:
            raise ConfigError("--user expects NAME:PASSWORD (the password may contain ':')")
        self.add(name, password)

    def verify(self, name: str, password: str) -> bool:
        stored = self._hashes.get(name)
        if stored is None:
            _DUMMY_HASH.matches(password)
            return False
        return stored.matches(password)

    def __contains__(self, name: object) -> bool:
        return name in self._hashes

    @property
    def names(self) -> list[str]:
        return sorted(self._hashes)


class TokenError(Exception):
    """A token is malformed, has a bad signature, the wrong kind or has expired."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    account: str
    kind: str
    expires_at: float
    token_id: str


class TokenSigner:
    """Issues and checks HMAC-signed tokens."""

    def __init__(self, key: bytes, *, access_ttl: float = ACCESS_TOKEN_TTL_S, refresh_ttl: float = REFRESH_TOKEN_TTL_S) -> None:
        if len(key) < 32:
            raise ConfigError("the token signing key must be at least 32 bytes")
        self._key = key
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl

    def __repr__(self) -> str:
        return f"<TokenSigner access_ttl={self.access_ttl} refresh_ttl={self.refresh_ttl}>"

    @classmethod
    def from_key_file(cls, path: Path, **ttls: float) -> "TokenSigner":
        """Load the signing key, creating it (mode 0600) on first use."""
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            key = secrets.token_bytes(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(key)
        return cls(key, **ttls)

    def issue(self, account: str, kind: str) -> tuple[str, float]:
        ttl = self.access_ttl if kind == "access" else self.refresh_ttl
        expires_at = time.time() + ttl
        claims = {"sub": account, "typ": kind, "exp": expires_at, "jti": secrets.token_urlsafe(12)}
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())
        return f"{body}.{signature}", ttl

    def check(self, token: str, kind: str) -> TokenClaims:
        body, sep, signature = token.partition(".")
        if not sep or not body or not signature:
            raise TokenError("token is malformed")
        expected = _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(expected, signature):
            raise TokenError("token signature is invalid")
        try:
            claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            account, token_kind, expires_at, token_id = claims["sub"], claims["typ"], float(claims["exp"]), claims["jti"]
        except (ValueError, KeyError, TypeError):
            raise TokenError("token is malformed") from None
        if token_kind != kind:
            raise TokenError(f"expected an {kind} token, got a {token_kind} token")
        if expires_at < time.time():
            raise TokenError("token has expired")
        return TokenClaims(str(account), str(token_kind), expires_at, str(token_id))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
