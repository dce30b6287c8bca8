"""Sign-in calls to the relay's REST API, and the agent's access tokens.

The calls go through ``net.Connector``, so they take the same proxy and TLS
path as the agent's WebSocket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .credentials import CredentialStore
from .http_client import request_json
from .net import Connector
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


async def _post_json(url: str, payload: dict[str, Any], connector: Connector | None) -> tuple[int, dict[str, Any]]:
    return await request_json(connector or Connector(), "POST", url, payload, timeout=HTTP_TIMEOUT_S)


def _tokens_from(body: dict[str, Any], fallback_refresh: str | None = None) -> Tokens:
    try:
        return Tokens(
            account=str(body["account"]),
            access_token=str(body["access_token"]),
            expires_at=time.time() + float(body["expires_in"]),
            refresh_token=str(body["refresh_token"]) if body.get("refresh_token") else fallback_refresh,
        )
    except (KeyError, TypeError, ValueError):
        raise DeskbridgeError("the relay's sign-in response is missing fields; check that the URL points to a Deskbridge relay") from None


class CodeRequired(SignInError):
    """The account has a second factor: sign in again with its one-time code."""


def _raise_for(status: int, body: dict[str, Any], context: str) -> None:
    """Raise SignInError for an explicit rejection, HandshakeError for a response that may be temporary."""
    message = str(body.get("message") or f"HTTP {status}")
    code = body.get("error")
    if code == "code_required":
        raise CodeRequired(message)
    if status == 429:
        raise HandshakeError(status, message)
    if status in (400, 401, 403):
        raise SignInError(f"{context}: {message}")
    raise HandshakeError(status, message)


async def login(
    relay_url: str,
    username: str,
    password: str,
    code: str | None = None,
    connector: Connector | None = None,
) -> Tokens:
    """Sign in with a password (and a one-time code if the account needs one)."""
    url = http_base(relay_url) + "/v1/auth/login"
    payload = {"username": username, "password": password}
    if code:
        payload["code"] = code
    status, body = await _post_json(url, payload, connector)
    if status != 200:
        _raise_for(status, body, "sign-in failed")
    return _tokens_from(body)


async def refresh(relay_url: str, refresh_token: str, connector: Connector | None = None) -> Tokens:
    """Exchange a refresh token for new tokens; the old refresh token is used up."""
    url = http_base(relay_url) + "/v1/auth/refresh"
    status, body = await _post_json(url, {"refresh_token": refresh_token}, connector)
    if status != 200:
        _raise_for(status, body, "the relay rejected the saved sign-in")
    return _tokens_from(body, refresh_token)


async def logout(relay_url: str, refresh_token: str, connector: Connector | None = None) -> None:
    """Revoke a sign-in on the relay."""
    url = http_base(relay_url) + "/v1/auth/logout"
    status, body = await _post_json(url, {"refresh_token": refresh_token}, connector)
    if status != 200:
        _raise_for(status, body, "sign-out failed")


class RelayTokens:
    """The agent's access tokens, refreshed with the refresh token in a credential store.

    Every refresh rotates the refresh token, so the new one is saved before
    the access token is used. A lock keeps two refreshes from presenting the
    same old token, because the relay would take that for theft.
    """

    def __init__(
        self,
        relay_url: str,
        account: str,
        store: CredentialStore,
        connector: Connector | None = None,
    ) -> None:
        self.relay_url = relay_url
        self.account = account
        self._store = store
        self._connector = connector
        self._current: Tokens | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<RelayTokens account={self.account!r} relay={self.relay_url!r}>"

    def invalidate(self) -> None:
        self._current = None

    async def access_token(self) -> Tokens:
        """Return tokens whose access token is valid for a while yet, refreshing if needed."""
        current = self._current
        if current is not None and current.expires_at - EXPIRY_MARGIN_S > time.time():
            return current
        return await self.renew()

    async def renew(self) -> Tokens:
        """Fetch a new access token now, rotating the saved refresh token."""
        async with self._lock:
            saved = await self._store.get(self.relay_url, self.account)
            if not saved:
                raise SignInError(
                    f"not signed in to {self.relay_url} as {self.account!r}; "
                    f"run: deskbridge login --relay {self.relay_url} --username {self.account}"
                )
            tokens = await refresh(self.relay_url, saved, self._connector)
            if tokens.refresh_token and tokens.refresh_token != saved:
                await self._store.set(self.relay_url, self.account, tokens.refresh_token)
            self._current = tokens
            return tokens
