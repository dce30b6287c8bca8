"""Relay accounts, password hashes, one-time codes and signed access tokens.

Passwords are kept only as salted scrypt hashes (RFC 7914) from the standard
library. An account may also have a TOTP secret (RFC 6238), the same codes
authenticator apps show. Access tokens are HMAC-SHA256 signed and carry their
own expiry and sign-in family, so they stay valid across a relay restart as
long as the signing key does; the key lives in a file readable only by the
relay's user. Refresh tokens are opaque and live in ``cloud_stub.tokens``.
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
from typing import Any

import pyotp

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

    def encode(self) -> str:
        return f"scrypt${base64.b64encode(self.salt).decode()}${base64.b64encode(self.digest).decode()}"

    @classmethod
    def parse(cls, text: str, where: str) -> "PasswordHash":
        scheme, _, rest = text.partition("$")
        salt_text, _, digest_text = rest.partition("$")
        try:
            if scheme != "scrypt":
                raise ValueError("unknown scheme")
            return cls(base64.b64decode(salt_text, validate=True), base64.b64decode(digest_text, validate=True))
        except ValueError:
            raise ConfigError(
                f"{where}: password_hash must look like scrypt$SALT$DIGEST; make one with 'deskbridge-relay --hash-password'"
            ) from None


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )


# A hash to check against for unknown user names, so a failed sign-in takes
# the same time whether or not the account exists.
_DUMMY_HASH = PasswordHash(b"\0" * SALT_BYTES, b"\0" * 32)


# A code from the previous or next 30-second step is accepted too, for clock
# drift between the relay and the person's phone (RFC 6238, section 5.2).
TOTP_VALID_STEPS = 1


class Accounts:
    """User names, their password hashes and optional TOTP secrets."""

    def __init__(self) -> None:
        self._hashes: dict[str, PasswordHash] = {}
        self._totp: dict[str, pyotp.TOTP] = {}
        # The last time step whose code each account used: a code works once.
        self._last_step: dict[str, int] = {}

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

    def set_totp(self, name: str, secret: str) -> None:
        if name not in self._hashes:
            raise ConfigError(f"--totp names account {name!r}, which has no --user entry")
        secret = secret.strip().replace(" ", "").upper()
        try:
            totp = pyotp.TOTP(secret)
            totp.now()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"the TOTP secret of account {name!r} is not valid base32: {exc}") from None
        if len(secret) < 16:
            raise ConfigError(f"the TOTP secret of account {name!r} must be at least 16 base32 characters (80 bits)")
        self._totp[name] = totp

    def add_totp_spec(self, spec: str) -> None:
        """Add a second factor from a ``NAME:BASE32SECRET`` command-line value."""
        name, sep, secret = spec.partition(":")
        if not sep:
            raise ConfigError("--totp expects NAME:BASE32SECRET")
        self.set_totp(name, secret)

    def load_file(self, path: Path) -> None:
        """Add accounts from a JSON file: a list of objects with ``name``,
        ``password`` or ``password_hash``, and an optional ``totp_secret``."""
        try:
            entries: Any = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read users file {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"users file {path} is not valid JSON: {exc}") from None
        if not isinstance(entries, list):
            raise ConfigError(f"users file {path} must hold a JSON list of accounts")
        for index, entry in enumerate(entries):
            where = f"users file {path}, entry {index + 1}"
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ConfigError(f"{where}: expected an object with a string 'name'")
            name = entry["name"]
            if isinstance(entry.get("password_hash"), str):
                self.add_hash(name, PasswordHash.parse(entry["password_hash"], where))
            elif isinstance(entry.get("password"), str):
                self.add(name, entry["password"])
            else:
                raise ConfigError(f"{where}: give 'password' or 'password_hash' for account {name!r}")
            if entry.get("totp_secret"):
                self.set_totp(name, str(entry["totp_secret"]))

    def add_hash(self, name: str, password_hash: "PasswordHash") -> None:
        if not name or "/" in name or len(name) > 64:
            raise ConfigError(f"invalid account name {name!r}: use 1 to 64 characters without '/'")
        self._hashes[name] = password_hash

    def needs_code(self, name: str) -> bool:
        return name in self._totp

    def verify_code(self, name: str, code: str) -> bool:
        """Check a one-time code; each accepted code works only once."""
        totp = self._totp.get(name)
        if totp is None:
            return True
        code = code.strip().replace(" ", "")
        now = time.time()
        step = int(now // totp.interval)
        for offset in range(-TOTP_VALID_STEPS, TOTP_VALID_STEPS + 1):
            candidate = step + offset
            expected = totp.generate_otp(candidate)
            if hmac.compare_digest(expected, code) and candidate > self._last_step.get(name, -1):
                self._last_step[name] = candidate
                return True
        return False

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
    family: str = ""


class TokenSigner:
    """Issues and checks HMAC-signed access tokens."""

    def __init__(self, key: bytes, *, access_ttl: float = ACCESS_TOKEN_TTL_S) -> None:
        if len(key) < 32:
            raise ConfigError("the token signing key must be at least 32 bytes")
        self._key = key
        self.access_ttl = access_ttl

    def __repr__(self) -> str:
        return f"<TokenSigner access_ttl={self.access_ttl}>"

    @classmethod
    def from_key_file(cls, path: Path, *, access_ttl: float = ACCESS_TOKEN_TTL_S) -> "TokenSigner":
        """Load the signing key, creating it (mode 0600) on first use."""
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = secrets.token_bytes(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(key)
        return cls(key, access_ttl=access_ttl)

    def issue(self, account: str, family: str) -> tuple[str, float]:
        """Return a new access token of a sign-in family and its lifetime in seconds."""
        expires_at = time.time() + self.access_ttl
        claims = {"sub": account, "typ": "access", "exp": expires_at, "jti": secrets.token_urlsafe(12), "fam": family}
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())
        return f"{body}.{signature}", self.access_ttl

    def check(self, token: str) -> TokenClaims:
        """Return the claims of a valid, unexpired access token, or raise TokenError."""
        body, sep, signature = token.partition(".")
        if not sep or not body or not signature:
            raise TokenError("token is malformed")
        expected = _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(expected, signature):
            raise TokenError("token signature is invalid")
        try:
            claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            account, kind, expires_at = claims["sub"], claims["typ"], float(claims["exp"])
            token_id, family = claims["jti"], claims.get("fam", "")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TokenError("token is malformed") from None
        if kind != "access":
            raise TokenError(f"expected an access token, got a {kind} token")
        if expires_at < time.time():
            raise TokenError("token has expired")
        return TokenClaims(str(account), str(kind), expires_at, str(token_id), str(family))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
