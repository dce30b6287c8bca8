"""Refresh tokens in the OS keyring: Keychain, Credential Manager or Secret Service.

Only tokens are stored, one entry per relay and account, never a password.
Every keyring call runs in a worker thread because the OS may block it, for
example while it shows an unlock prompt. A keyring that cannot keep secrets
(none found, or one that writes plaintext files) is an error: Deskbridge never
falls back to a file.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import keyring
import keyring.backend
import keyring.errors

from .errors import CredentialError

SERVICE = "Deskbridge"

# Backends that do not protect secrets; the person must install a real one.
_INSECURE_BACKENDS = ("keyring.backends.fail", "keyrings.alt.file", "keyrings.alt.Gnome")


def entry_name(relay_url: str, account: str) -> str:
    return f"{account}@{relay_url}"


def proxy_entry(proxy_url: str) -> str:
    """Return the keyring key under which a proxy's password is kept, with the proxy user as account."""
    return f"proxy {proxy_url}"


class CredentialStore(Protocol):
    async def get(self, relay_url: str, account: str) -> str | None: ...

    async def set(self, relay_url: str, account: str, token: str) -> None: ...

    async def delete(self, relay_url: str, account: str) -> None: ...


class MemoryStore:
    """Keeps tokens for this run only, for when no keyring is usable."""

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<MemoryStore entries={len(self._tokens)}>"

    async def get(self, relay_url: str, account: str) -> str | None:
        return self._tokens.get(entry_name(relay_url, account))

    async def set(self, relay_url: str, account: str, token: str) -> None:
        self._tokens[entry_name(relay_url, account)] = token

    async def delete(self, relay_url: str, account: str) -> None:
        self._tokens.pop(entry_name(relay_url, account), None)


class KeyringStore:
    """Stores tokens through the keyring library's active backend."""

    def __init__(self, backend: keyring.backend.KeyringBackend | None = None) -> None:
        self._backend = backend

    def __repr__(self) -> str:
        return f"<KeyringStore backend={type(self.backend).__module__}>"

    @property
    def backend(self) -> keyring.backend.KeyringBackend:
        return self._backend or keyring.get_keyring()

    def check_backend(self) -> None:
        """Raise CredentialError when the active backend cannot keep secrets safely."""
        backend = self.backend
        module = type(backend).__module__
        if module.startswith(_INSECURE_BACKENDS) or getattr(backend, "priority", 1) <= 0:
            raise CredentialError(
                f"no secure OS keyring is available (keyring backend {module}.{type(backend).__name__}). "
                "On Linux, install and unlock a Secret Service provider such as gnome-keyring or KWallet; "
                "on macOS and Windows the system keychain is used. Until then, sign in for this run only."
            )

    async def get(self, relay_url: str, account: str) -> str | None:
        return await asyncio.to_thread(self._get, entry_name(relay_url, account))

    async def set(self, relay_url: str, account: str, token: str) -> None:
        await asyncio.to_thread(self._set, entry_name(relay_url, account), token)

    async def delete(self, relay_url: str, account: str) -> None:
        await asyncio.to_thread(self._delete, entry_name(relay_url, account))

    def _get(self, name: str) -> str | None:
        self.check_backend()
        try:
            value = self.backend.get_password(SERVICE, name)
        except keyring.errors.KeyringError as exc:
            raise CredentialError(f"reading the sign-in token from the OS keyring failed: {exc}") from None
        if value == "":
            raise CredentialError("the OS keyring returned an empty sign-in token; sign in again")
        return value

    def _set(self, name: str, token: str) -> None:
        self.check_backend()
        try:
            self.backend.set_password(SERVICE, name, token)
            stored = self.backend.get_password(SERVICE, name)
        except keyring.errors.KeyringError as exc:
            raise CredentialError(f"saving the sign-in token in the OS keyring failed: {exc}") from None
        if stored != token:
            raise CredentialError("the OS keyring returned a different token than was saved; the keyring is not usable")

    def _delete(self, name: str) -> None:
        self.check_backend()
        try:
            self.backend.delete_password(SERVICE, name)
        except keyring.errors.PasswordDeleteError:
            pass
        except keyring.errors.KeyringError as exc:
            raise CredentialError(f"deleting the sign-in token from the OS keyring failed: {exc}") from None
