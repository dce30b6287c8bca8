"""Sign-in endpoints of the relay: login, refresh and logout.

Login checks the password and, for accounts that have one, a TOTP code. It
returns a short-lived access token, which the agent sends in its WebSocket
handshake and renews in-band, and an opaque refresh token that rotates on
every use (see ``cloud_stub.tokens``). Failed sign-ins are counted per user
name and per client address; past the limit the relay responds with 429 and
``Retry-After`` until the window has passed.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .accounts import Accounts, TokenClaims, TokenError, TokenSigner
from .http import HttpError, HttpRequest, HttpResponse, json_response
from .tokens import FailureLimiter, RefreshError, RefreshTokenStore

logger = logging.getLogger(__name__)

LOGIN_MAX_FAILURES = 5
LOGIN_WINDOW_S = 300.0


class SignIn:
    """Accounts, tokens and the sign-in rate limit of one relay."""

    def __init__(
        self,
        accounts: Accounts,
        data_dir: Path,
        *,
        access_ttl: float,
        refresh_ttl: float,
        max_failures: int = LOGIN_MAX_FAILURES,
        failure_window: float = LOGIN_WINDOW_S,
    ) -> None:
        self.accounts = accounts
        self.signer = TokenSigner.from_key_file(data_dir / "token-signing.key", access_ttl=access_ttl)
        self.refresh_tokens = RefreshTokenStore(data_dir / "refresh-tokens.json", refresh_ttl)
        self._by_user = FailureLimiter(max_failures, failure_window)
        self._by_address = FailureLimiter(max_failures * 4, failure_window)

    def __repr__(self) -> str:
        return f"<SignIn accounts={self.accounts.names}>"

    def check_access(self, token: str) -> TokenClaims:
        """Return the claims of a valid access token whose sign-in is still active."""
        claims = self.signer.check(token)
        if claims.account not in self.accounts:
            raise TokenError("token names an unknown account")
        if not self.refresh_tokens.is_active(claims.family):
            raise TokenError("this sign-in was revoked")
        return claims

    def login(self, request: HttpRequest) -> HttpResponse:
        body = json_body(request)
        username, password, code = body.get("username"), body.get("password"), body.get("code")
        if not isinstance(username, str) or not isinstance(password, str):
            raise HttpError(400, "invalid_request", "send a JSON object with string fields 'username' and 'password'")
        if code is not None and not isinstance(code, str):
            raise HttpError(400, "invalid_request", "'code' must be a string of digits")
        address = request.peer.rpartition(":")[0] or request.peer
        self._check_rate(username, address)

        if not self.accounts.verify(username, password):
            self._failed(username, address, "wrong password or unknown user")
            raise HttpError(401, "invalid_credentials", "wrong user name or password")
        if self.accounts.needs_code(username):
            if not code:
                # Not a failure: the client learns that it must ask for a code.
                raise HttpError(401, "code_required", "this account needs the 6-digit code from its authenticator app")
            if not self.accounts.verify_code(username, code):
                self._failed(username, address, "wrong one-time code")
                raise HttpError(401, "invalid_code", "the one-time code is wrong or already used; wait for the next code and try again")

        self._by_user.clear(username)
        issued = self.refresh_tokens.start_family(username)
        logger.info("account %r signed in from %s", username, request.peer)
        return json_response(200, self._token_payload(username, issued.family, issued.token))

    def refresh(self, request: HttpRequest) -> HttpResponse:
        token = _refresh_token_field(request)
        try:
            issued = self.refresh_tokens.rotate(token)
        except RefreshError as exc:
            raise HttpError(401, "invalid_token", f"refresh token rejected: {exc}; sign in again") from None
        if issued.account not in self.accounts:
            raise HttpError(401, "invalid_token", "refresh token names an unknown account; sign in again")
        return json_response(200, self._token_payload(issued.account, issued.family, issued.token))

    def logout(self, request: HttpRequest) -> tuple[HttpResponse, str | None]:
        """Revoke the sign-in family of a refresh token; return the response and the family."""
        token = _refresh_token_field(request)
        family = self.refresh_tokens.revoke(token)
        if family is not None:
            logger.info("sign-in family %s of account %r signed out", family, self.refresh_tokens.account_of(family))
        return json_response(200, {"status": "signed_out"}), family

    def _token_payload(self, account: str, family: str, refresh_token: str) -> dict[str, Any]:
        access, ttl = self.signer.issue(account, family)
        return {
            "account": account,
            "token_type": "Bearer",
            "access_token": access,
            "expires_in": int(ttl),
            "refresh_token": refresh_token,
        }

    def _check_rate(self, username: str, address: str) -> None:
        wait = max(self._by_user.retry_after(username), self._by_address.retry_after(address))
        if wait > 0:
            seconds = math.ceil(wait)
            raise HttpError(
                429,
                "too_many_attempts",
                f"too many failed sign-ins; try again in {seconds} s",
                [("Retry-After", str(seconds))],
            )

    def _failed(self, username: str, address: str, reason: str) -> None:
        self._by_user.fail(username)
        self._by_address.fail(address)
        logger.info("sign-in failed for %r from %s: %s", username, address, reason)


def json_body(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HttpError(400, "invalid_json", f"request body is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "invalid_json", "request body must be a JSON object")
    return body


def _refresh_token_field(request: HttpRequest) -> str:
    token = json_body(request).get("refresh_token")
    if not isinstance(token, str) or not token:
        raise HttpError(400, "invalid_request", "send a JSON object with a string field 'refresh_token'")
    return token
