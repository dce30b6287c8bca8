"""Refresh tokens with rotation and reuse detection, and a sign-in rate limiter.

A sign-in starts a token *family*. Every refresh marks the presented refresh
token as used and issues a new one in the same family. Presenting a used token
again means two parties hold it (a copy was stolen, or a client lost an
update), so the whole family is revoked and the person must sign in again.
The one exception is a retry: a used token presented again within 60 s while
its successor was never used. The client most likely lost the response, so
the unused successor is replaced instead.
This follows the refresh token rotation advice of the OAuth 2.0 Security Best
Current Practice (RFC 9700, section 4.14.2).

Refresh tokens are random and opaque. Only their SHA-256 hashes are kept, in a
JSON file in the relay's data folder, so a relay restart keeps everyone signed
in and a leaked state file grants nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Used tokens kept per family to detect reuse; older ones are forgotten, and
# presenting one of those is rejected as unknown without revoking the family.
USED_TOKENS_KEPT = 32
# A used token presented again within this time, while its successor is still
# unused, is a retry after a lost response rather than theft.
RETRY_WINDOW_S = 60.0
# Keys (user names, addresses) the limiter tracks at once; the oldest go first.
LIMITER_MAX_KEYS = 10_000


class RefreshError(Exception):
    """A refresh token was rejected; ``reused`` is true when its family was revoked."""

    def __init__(self, message: str, *, reused: bool = False) -> None:
        super().__init__(message)
        self.reused = reused


@dataclass(slots=True)
class _TokenRecord:
    family: str
    expires_at: float
    used_at: float | None = None
    # Hash of the token this one was rotated into.
    successor: str | None = None


@dataclass(slots=True)
class _Family:
    account: str
    created_at: float
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class IssuedRefresh:
    token: str
    account: str
    family: str
    expires_at: float

    def __repr__(self) -> str:
        return f"<IssuedRefresh account={self.account!r} family={self.family}>"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RefreshTokenStore:
    """Issues, rotates and revokes refresh tokens; see the module docstring."""

    def __init__(self, path: Path | None, ttl: float) -> None:
        self.path = path
        self.ttl = ttl
        self._tokens: dict[str, _TokenRecord] = {}
        self._families: dict[str, _Family] = {}
        if path is not None:
            self._load(path)

    def __repr__(self) -> str:
        return f"<RefreshTokenStore families={len(self._families)} tokens={len(self._tokens)}>"

    def start_family(self, account: str) -> IssuedRefresh:
        family = secrets.token_hex(8)
        self._families[family] = _Family(account, time.time())
        return self._issue(family)

    def rotate(self, token: str) -> IssuedRefresh:
        """Use up ``token`` and return its successor in the same family."""
        record = self._tokens.get(_hash(token))
        if record is None:
            raise RefreshError("refresh token is unknown or expired")
        family = self._families.get(record.family)
        if family is None or family.revoked:
            raise RefreshError("this sign-in was revoked")
        if record.used_at is not None and self._is_retry(record):
            # The client never received the successor (the response was
            # lost), so it retries with the same token: replace the unused
            # successor instead of treating the retry as theft.
            assert record.successor is not None
            del self._tokens[record.successor]
            record.used_at = time.time()
            return self._issue(record.family, record)
        if record.used_at is not None:
            family.revoked = True
            self._save()
            logger.warning("refresh token reuse detected for account %r; revoked sign-in family %s", family.account, record.family)
            raise RefreshError("refresh token was already used, so this sign-in is revoked for safety", reused=True)
        if record.expires_at < time.time():
            raise RefreshError("refresh token has expired")
        record.used_at = time.time()
        return self._issue(record.family, record)

    def _is_retry(self, record: _TokenRecord) -> bool:
        """Tell whether reusing ``record`` is a retry: recent, and its successor never used."""
        if record.used_at is None or record.successor is None:
            return False
        successor = self._tokens.get(record.successor)
        recent = time.time() - record.used_at <= RETRY_WINDOW_S
        return recent and successor is not None and successor.used_at is None

    def revoke(self, token: str) -> str | None:
        """Revoke the family of ``token``; return the family id, or None if unknown."""
        record = self._tokens.get(_hash(token))
        if record is None:
            return None
        family = self._families.get(record.family)
        if family is not None:
            family.revoked = True
        self._save()
        return record.family

    def is_active(self, family: str) -> bool:
        entry = self._families.get(family)
        return entry is not None and not entry.revoked

    def account_of(self, family: str) -> str | None:
        entry = self._families.get(family)
        return entry.account if entry is not None else None

    def _issue(self, family: str, predecessor: _TokenRecord | None = None) -> IssuedRefresh:
        token = secrets.token_urlsafe(32)
        expires_at = time.time() + self.ttl
        self._tokens[_hash(token)] = _TokenRecord(family, expires_at)
        if predecessor is not None:
            predecessor.successor = _hash(token)
        self._prune(family)
        self._save()
        return IssuedRefresh(token, self._families[family].account, family, expires_at)

    def _prune(self, family: str) -> None:
        now = time.time()
        for key in [k for k, r in self._tokens.items() if r.expires_at < now]:
            del self._tokens[key]
        used = sorted(
            ((r.used_at, k) for k, r in self._tokens.items() if r.family == family and r.used_at is not None),
            reverse=True,
        )
        for _used_at, key in used[USED_TOKENS_KEPT:]:
            del self._tokens[key]
        live = {r.family for r in self._tokens.values()}
        for name in [f for f in self._families if f not in live]:
            del self._families[name]

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            for key, item in data.get("tokens", {}).items():
                self._tokens[key] = _TokenRecord(
                    str(item["family"]), float(item["expires_at"]), item.get("used_at"), item.get("successor")
                )
            for name, item in data.get("families", {}).items():
                self._families[name] = _Family(str(item["account"]), float(item["created_at"]), bool(item["revoked"]))
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.error("token state %s is unreadable (%s); starting empty, so every agent must sign in again", path, exc)
            self._tokens.clear()
            self._families.clear()

    def _save(self) -> None:
        if self.path is None:
            return
        data: dict[str, Any] = {
            "tokens": {
                k: {"family": r.family, "expires_at": r.expires_at, "used_at": r.used_at, "successor": r.successor}
                for k, r in self._tokens.items()
            },
            "families": {k: {"account": f.account, "created_at": f.created_at, "revoked": f.revoked} for k, f in self._families.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, temp = tempfile.mkstemp(prefix=".tokens-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(data, file)
            os.chmod(temp, 0o600)
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


class FailureLimiter:
    """Counts failures per key in a sliding window and blocks keys over the limit."""

    def __init__(self, max_failures: int, window: float) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, key: str) -> float:
        """Return the seconds until ``key`` may try again, 0 when it may now."""
        times = self._failures.get(key)
        if not times:
            return 0.0
        now = time.monotonic()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0.0
        if len(times) < self.max_failures:
            return 0.0
        return times[0] + self.window - now

    def fail(self, key: str) -> None:
        if key not in self._failures and len(self._failures) >= LIMITER_MAX_KEYS:
            del self._failures[next(iter(self._failures))]
        times = self._failures.setdefault(key, deque())
        times.append(time.monotonic())
        # Keep memory per key bounded however often it fails.
        while len(times) > self.max_failures:
            times.popleft()

    def clear(self, key: str) -> None:
        self._failures.pop(key, None)
