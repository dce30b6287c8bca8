"""Sign-in calls to the relay's REST API, and the agent's access tokens.

The HTTP calls use urllib in a worker thread: they are rare (sign-in and one
refresh per access-token lifetime), so a dedicated HTTP client library would
add weight without benefit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .credentials import CredentialStore
from .errors import DeskbridgeError, HandshakeError, SignInError

logger = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 15.0
# Refresh the access token this long before it expires.
EXPIRY_MARGIN_S = 30.0


@dataclass(frozen=True, slots=True)
class Tokens:
    account: str
    access_token: str
    expires_at: float
    refresh_token: str | None

    def __repr__(self) -> str:
        return f"<Tokens account={self.account!r} expires_at={self.expires_at:.0f}>"


def http_base(relay_url: str) -> str:
    """Map ``ws://host:port/...`` to ``http://host:port`` (``wss`` to ``https``)."""
    parts = urlsplit(relay_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def _post_json(url: str, payload: dict[str, Any], ssl_context: ssl.SSLContext | None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S, context=ssl_context) as response:
            return response.status, _parse_json(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _parse_json(exc.read())


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _tokens_from(body: dict[str, Any], fallback_refresh: str | None = None) -> Tokens:
    try:
        return Tokens(
            account=str(body["account"]),
            access_token=str(body["access_token"]),
            expires_at=time.time() + float(body["expires_in"]),
            refresh_token=str(body["refresh_token"]) if body.get("refresh_token") else fallback_refresh,
        )
    except (KeyError, TypeError, ValueError):
        raise DeskbridgeError("the relay's sign-in answer is missing fields; is the URL a Deskbridge relay?") from None


async def login(relay_url: str, username: str, password: str, ssl_context: ssl.SSLContext | None = None) -> Tokens:
    """Sign in with a password and return fresh tokens."""
    url = http_base(relay_url) + "/v1/auth/login"
    status, body = await asyncio.to_thread(_post_json, url, {"username": username, "password": password}, ssl_context)
    if status == 200:
        return _tokens_from(body)
    message = str(body.get("message") or f"HTTP {status}")
    if status in (400, 401, 403):
        raise SignInError(f"sign-in failed: {message}")
    raise HandshakeError(status, message)


async def refresh(relay_url: str, refresh_token: str, ssl_context: ssl.SSLContext | None = None) -> Tokens:
    """Exchange a refresh token for a new access token."""
    url = http_base(relay_url) + "/v1/auth/refresh"
    status, body = await asyncio.to_thread(_post_json, url, {"refresh_token": refresh_token}, ssl_context)
    if status == 200:
        return _tokens_from(body, refresh_token)
    message = str(body.get("message") or f"HTTP {status}")
    if status in (400, 401, 403):
        raise SignInError(f"the relay rejected the saved sign-in: {message}")
    raise HandshakeError(status, message)


class RelayTokens:
    """Access tokens for the agent, refreshed from the token in a credential store."""

    def __init__(
        self,
        relay_url: str,
        account: str,
        store: CredentialStore,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.relay_url = relay_url
        self.account = account
        self._store = store
        self._ssl = ssl_context
        self._current: Tokens | None = None

    def __repr__(self) -> str:
        return f"<RelayTokens account={self.account!r} relay={self.relay_url!r}>"

    def invalidate(self) -> None:
        self._current = None

    async def access_token(self) -> str:
        current = self._current
        if current is not None and current.expires_at - EXPIRY_MARGIN_S > time.time():
            return current.access_token
        saved = await self._store.get(self.relay_url, self.account)
        if not saved:
            raise SignInError(
                f"not signed in to {self.relay_url} as {self.account!r}; "
                f"run: deskbridge login --relay {self.relay_url} --username {self.account}"
            )
        tokens = await refresh(self.relay_url, saved, self._ssl)
        if tokens.refresh_token and tokens.refresh_token != saved:
            await self._store.set(self.relay_url, self.account, tokens.refresh_token)
        self._current = tokens
        return tokens.access_token
