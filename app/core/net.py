"""Outbound connections to the relay: proxies, TLS and certificate pinning.

Every connection the agent makes to the relay (the WebSocket and the REST
calls for sign-in) goes through ``Connector.open``, so proxies, TLS settings
and error messages are the same for both.

- **Proxies**: HTTP CONNECT and SOCKS5, with user name and password, through
  python-socks. By default they come from the system settings as the Python
  standard library reads them (``urllib.request.getproxies``: environment
  variables everywhere, the registry on Windows, System Configuration on
  macOS), honouring ``no_proxy``; settings can name one explicitly or turn
  proxies off.
- **TLS**: verification is always on, against the OS trust store through
  truststore (so a company CA installed in the OS works without
  configuration), plus an optional extra CA file and an optional pin of the
  relay's public key (SHA-256 of its SubjectPublicKeyInfo, base64, as in
  RFC 7469).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import socket
import ssl
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import truststore
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from .errors import ConfigError, DeskbridgeError

P = TypeVar("P", bound=asyncio.BaseProtocol)

# OpenSSL verification codes (include/openssl/x509_vfy.h) that Deskbridge
# explains in its own words.
_X509_EXPIRED = 10
_X509_NOT_YET_VALID = 9
_X509_HOSTNAME_MISMATCH = 62
_X509_UNTRUSTED = {2, 18, 19, 20, 21, 27}


class ProxyFailure(DeskbridgeError):
    """The proxy refused the tunnel, or rejected its credentials."""


class TlsFailure(DeskbridgeError):
    """The relay's certificate or key was not accepted; the text says which check failed."""


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Which proxy to use: ``system`` settings, ``none``, or an explicit ``url``."""

    mode: str = "system"
    url: str = ""
    username: str = ""
    password: str = ""

    def __repr__(self) -> str:
        secret = ", password=***" if self.password else ""
        return f"ProxySettings(mode={self.mode!r}, url={_without_credentials(self.url)!r}, username={self.username!r}{secret})"


@dataclass(frozen=True, slots=True)
class TlsSettings:
    ca_file: str = ""
    pin_sha256: str = ""


def parse_pin(pin: str) -> bytes:
    """Decode a public-key pin given as base64 (optionally ``sha256/``-prefixed) or hex."""
    text = pin.strip()
    if text.startswith("sha256/"):
        text = text[len("sha256/"):]
    for decode in (lambda t: base64.b64decode(t, validate=True), bytes.fromhex):
        try:
            digest = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(digest) == 32:
            return digest
    raise ConfigError(f"invalid public-key pin {pin!r}: expected the SHA-256 of the key as base64 (44 characters) or hex (64)")


def spki_sha256(der_certificate: bytes) -> bytes:
    """Return the SHA-256 of a certificate's SubjectPublicKeyInfo."""
    certificate = x509.load_der_x509_certificate(der_certificate)
    spki = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://***@{host}{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Connector:
    """Opens TCP or TLS connections to the relay, through a proxy when one applies."""

    def __init__(self, proxy: ProxySettings | None = None, tls: TlsSettings | None = None) -> None:
        self.proxy = proxy or ProxySettings()
        self.tls = tls or TlsSettings()
        self._pin = parse_pin(self.tls.pin_sha256) if self.tls.pin_sha256 else None
        self._context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"<Connector proxy={self.proxy!r} ca_file={self.tls.ca_file!r} pinned={self._pin is not None}>"

    def ssl_context(self) -> ssl.SSLContext:
        if self._context is None:
            context = truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if self.tls.ca_file:
                try:
                    context.load_verify_locations(cafile=self.tls.ca_file)
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(f"cannot load the extra CA file {self.tls.ca_file}: {exc}") from None
            self._context = context
        return self._context

    def proxy_for(self, scheme: str, host: str) -> str:
        """Return the proxy URL to use for a relay URL's scheme and host, or ""."""
        if self.proxy.mode == "none" or _is_loopback(host) and self.proxy.mode == "system":
            return ""
        if self.proxy.mode == "manual":
            return self.proxy.url
        if urllib.request.proxy_bypass(host):
            return ""
        proxies = urllib.request.getproxies()
        key = "https" if scheme in ("wss", "https") else "http"
        return proxies.get(key) or proxies.get("all") or ""

    async def open(
        self,
        protocol_factory: Callable[[], P],
        url: str,
        timeout: float,
    ) -> tuple[asyncio.Transport, P]:
        """Connect to the host of ``url`` (ws, wss, http or https) and return transport and protocol."""
        parts = urlsplit(url)
        secure = parts.scheme in ("wss", "https")
        host = parts.hostname or ""
        port = parts.port or (443 if secure else 80)
        loop = asyncio.get_running_loop()
        context = self.ssl_context() if secure else None
        proxy_url = self.proxy_for(parts.scheme, host)

        sock = await self._through_proxy(proxy_url, host, port, timeout) if proxy_url else None
        try:
            if sock is None:
                transport, protocol = await asyncio.wait_for(
                    loop.create_connection(protocol_factory, host, port, ssl=context, server_hostname=host if secure else None),
                    timeout,
                )
            else:
                transport, protocol = await asyncio.wait_for(
                    loop.create_connection(protocol_factory, sock=sock, ssl=context, server_hostname=host if secure else None),
                    timeout,
                )
        except ssl.SSLCertVerificationError as exc:
            if sock is not None:
                sock.close()
            raise describe_verification_error(exc, host) from None
        assert isinstance(transport, asyncio.Transport)
        if secure and self._pin is not None:
            self._check_pin(transport, host)
        return transport, protocol

    def _check_pin(self, transport: asyncio.Transport, host: str) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der or spki_sha256(der) != self._pin:
            transport.abort()
            seen = base64.b64encode(spki_sha256(der)).decode() if der else "none"
            raise TlsFailure(
                f"the public key of {host} does not match the pinned key (the relay's key is sha256/{seen}); "
                "if the relay's key was changed on purpose, update the pin in the settings"
            )

    async def _through_proxy(self, proxy_url: str, host: str, port: int, timeout: float) -> socket.socket:
        proxy = self._make_proxy(proxy_url)
        where = _without_credentials(proxy_url)
        try:
            return await proxy.connect(dest_host=host, dest_port=port, timeout=timeout)
        except ProxyTimeoutError:
            raise TimeoutError(f"the proxy {where} did not connect to {host}:{port} within {timeout:g} s") from None
        except ProxyConnectionError as exc:
            raise ConnectionError(f"cannot reach the proxy {where}: {exc}") from None
        except ProxyError as exc:
            if exc.error_code == 407:
                if self._proxy_credentials(proxy_url)[0]:
                    raise ProxyFailure(f"proxy authentication failed at {where}: check the proxy user name and password") from None
                raise ProxyFailure(f"proxy authentication required by {where}: set the proxy user name and password") from None
            if exc.error_code in (1, 2):
                # SOCKS5 authentication failures (RFC 1929 status, or no acceptable method).
                raise ProxyFailure(f"proxy authentication failed at {where}: {exc}") from None
            raise ProxyFailure(f"the proxy {where} refused to connect to {host}:{port}: {exc}") from None

    def _proxy_credentials(self, proxy_url: str) -> tuple[str, str]:
        if self.proxy.mode == "manual" and self.proxy.username:
            return self.proxy.username, self.proxy.password
        parts = urlsplit(proxy_url)
        return unquote(parts.username or ""), unquote(parts.password or "")

    def _make_proxy(self, proxy_url: str) -> Proxy:
        parts = urlsplit(proxy_url if "://" in proxy_url else f"http://{proxy_url}")
        kinds = {"http": ProxyType.HTTP, "https": ProxyType.HTTP, "socks5": ProxyType.SOCKS5, "socks5h": ProxyType.SOCKS5}
        kind = kinds.get(parts.scheme)
        if kind is None or not parts.hostname:
            raise ConfigError(f"invalid proxy {_without_credentials(proxy_url)!r}: use http://HOST:PORT or socks5://HOST:PORT")
        username, password = self._proxy_credentials(proxy_url)
        default_port = 1080 if kind is ProxyType.SOCKS5 else 8080
        return Proxy(
            kind,
            parts.hostname,
            parts.port or default_port,
            username=username or None,
            password=password if username else None,
            rdns=True,
        )


def describe_verification_error(exc: ssl.SSLCertVerificationError, host: str) -> TlsFailure:
    """Explain a failed certificate check: untrusted, wrong name or expired."""
    code = exc.verify_code
    if code == _X509_EXPIRED:
        return TlsFailure(f"the certificate of {host} has expired; the relay's operator must renew it")
    if code == _X509_NOT_YET_VALID:
        return TlsFailure(f"the certificate of {host} is not valid yet; check this computer's clock")
    if code == _X509_HOSTNAME_MISMATCH:
        return TlsFailure(f"the certificate of the relay does not match the name {host}; check the relay URL")
    if code in _X509_UNTRUSTED:
        return TlsFailure(
            f"the certificate of {host} is not trusted (issued by an unknown authority); "
            "install the issuing CA in the system's trust store or set an extra CA file in the settings"
        )
    return TlsFailure(f"the certificate of {host} was rejected: {exc.verify_message or exc}")
