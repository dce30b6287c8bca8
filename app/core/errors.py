"""Exceptions shared by the agent and the relay.

The hierarchy is flat on purpose::

    DeskbridgeError
    ├── ConfigError            a setting or command-line value is invalid
    ├── CredentialError        the keyring cannot store or return a token
    ├── SignInError            the relay rejected a sign-in or a token
    ├── HandshakeError         the WebSocket handshake with the relay failed
    └── LocalProtocolError     this process misused the tunnel session API

A peer that breaks the tunnel protocol never raises: the session stores the
cause and reports it as a ``SessionFailed`` event (see ``app.core.session``).
``is_retryable`` is the one place that decides whether a failed connection
attempt is worth another try.
"""

from __future__ import annotations

import errno
import ssl
import urllib.error


class DeskbridgeError(Exception):
    """Base class for every error this project raises on purpose."""


class ConfigError(DeskbridgeError):
    """A setting or command-line value is invalid; the message names it."""


class CredentialError(DeskbridgeError):
    """The OS keyring could not store, read or delete a token."""


class SignInError(DeskbridgeError):
    """The relay rejected the credentials or token; signing in again may help."""


class HandshakeError(DeskbridgeError):
    """The relay rejected the WebSocket handshake with an HTTP error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"relay rejected the connection with HTTP {status}: {message}")
        self.status = status
        self.message = message


class LocalProtocolError(DeskbridgeError):
    """This side called the session API in a way the protocol forbids."""


def is_retryable(exc: BaseException) -> bool:
    """Tell whether a failed connection attempt should be tried again later.

    Network failures and server errors are temporary. A rejected token is not
    retried as such: the caller must fetch a new token or ask the person to
    sign in, which ``SignInError`` signals.
    """
    if isinstance(exc, SignInError):
        return False
    if type(exc).__name__ in ("TlsFailure", "ProxyFailure"):
        # A rejected certificate or proxy login needs a settings change; the
        # agent keeps trying, but only at its slowest pace.
        return False
    if isinstance(exc, HandshakeError):
        return exc.status >= 500 or exc.status in (408, 429)
    if isinstance(exc, ssl.SSLCertVerificationError):
        # A wrong certificate does not fix itself, but the relay may be
        # mid-deployment; retrying keeps the agent alive and logging the cause.
        return True
    if isinstance(exc, (OSError, TimeoutError, EOFError, ConnectionError)):
        return True
    return False


def describe_os_error(exc: OSError) -> str:
    """Return a short, human wording for a socket error."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        # urllib wraps the socket error; describe the cause instead.
        if isinstance(exc.reason, OSError):
            return describe_os_error(exc.reason)
        return str(exc.reason)
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return "connection refused"
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return "timed out"
    if exc.errno == errno.EHOSTUNREACH:
        return "host unreachable"
    if exc.errno == errno.ENETUNREACH:
        return "network unreachable"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available"
    return exc.strerror or str(exc) or type(exc).__name__
