"""Outbound connections to the relay: proxies, TLS and certificate pinning.

Every connection the agent makes to the relay (the WebSocket and the REST
calls for sign-in) goes through ``Connector.open``, so proxies, TLS settings
and error messages are the same for both.

- **Proxies**: HTTP CONNECT and SOCKS5, with user name and password, through
  python-socks. By default they come from the system settings as the Python
  standard library reads them with ``urllib.request.getproxies``: environment
  variables everywhere, the registry on Windows, System Configuration on
  macOS. ``no_proxy`` is honoured. Settings can also name a proxy or turn
  proxies off. In system mode a relay on this machine (``localhost``, a name
  under it, or a loopback address) is always reached directly. HTTP proxy
  credentials are sent as UTF-8 (RFC 7617); SOCKS5 credentials must be ASCII,
  because python-socks 3.2 encodes them so.
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
_X509_IP_ADDRESS_MISMATCH = 64
_X509_UNTRUSTED = {2, 18, 19, 20, 21, 27}


class ProxyFailure(DeskbridgeError):
    """The proxy refused the tunnel, or rejected its credentials."""


class TlsFailure(DeskbridgeError):
    """The relay's certificate or key was rejected; the message names the check that failed."""


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Proxy choice: the ``system`` settings, ``none``, or a ``manual`` URL with credentials."""

    mode: str = "system"
    url: str = ""
    username: str = ""
    password: str = ""

    def __repr__(self) -> str:
        secret = ", password=***" if self.password else ""
        return f"ProxySettings(mode={self.mode!r}, url={_without_credentials(self.url)!r}, username={self.username!r}{secret})"


PROXY_MODES = ("system", "none", "manual")
# RFC 1929 gives the SOCKS5 user name and password one length byte each.
SOCKS5_MAX_CREDENTIAL_BYTES = 255


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
    """Return ``url`` with everything before its last ``@`` after the scheme replaced by ``***``.

    It also works on text that is not a valid URL (no scheme, a bad port, an
    unencoded ``/`` in the password), so a repr or an error message never
    shows a password.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    _userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{separator}***@{host}"


def _is_loopback(host: str) -> bool:
    """Tell whether ``host`` is this machine: ``localhost``, a name under it (RFC 6761), or a loopback address."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # Python 3.11 calls ::ffff:127.0.0.1 not loopback, but it reaches 127.0.0.1.
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _parse_proxy_url(proxy_url: str) -> tuple[ProxyType, str, int]:
    """Return the type, host and port of a proxy URL; a URL without a scheme is an HTTP proxy."""
    parts = urlsplit(proxy_url if "://" in proxy_url else f"http://{proxy_url}")
    # NOTE: an https:// proxy URL is taken as a plain HTTP proxy, as many
    # HTTPS_PROXY settings mean it; TLS to the proxy itself is not supported.
    kinds = {"http": ProxyType.HTTP, "https": ProxyType.HTTP, "socks5": ProxyType.SOCKS5, "socks5h": ProxyType.SOCKS5}
    kind = kinds.get(parts.scheme.lower())
    try:
        port = parts.port
    except ValueError:
        port = None
        kind = None
    if kind is None or not parts.hostname:
        raise ConfigError(f"invalid proxy {_without_credentials(proxy_url)!r}: use http://HOST:PORT or socks5://HOST:PORT")
    default_port = 1080 if kind is ProxyType.SOCKS5 else 8080
    return kind, parts.hostname, port or default_port


def _http_credentials(username: str, password: str) -> tuple[str, str]:
    """Prepare credentials for python-socks' HTTP Basic authentication so that they go out as UTF-8.

    python-socks 3.2 encodes ``user:password`` as Latin-1. Proxies such as
    Squid compare the UTF-8 bytes that browsers and curl send (RFC 7617), so
    the UTF-8 bytes are handed over as the Latin-1 characters with those codes.
    """
    if ":" in username:
        raise ConfigError(
            f"invalid proxy user name {username!r}: HTTP proxies cannot take a ':' in the user name "
            "(Basic authentication, RFC 7617); a ':' in the password is fine"
        )
    return username.encode("utf-8").decode("latin-1"), password.encode("utf-8").decode("latin-1")


def _check_socks5_credentials(username: str, password: str) -> None:
    for label, value in (("user name", username), ("password", password)):
        if not value.isascii():
            # NOTE: RFC 1929 allows any bytes, but python-socks 3.2 encodes them as ASCII.
            raise ConfigError(f"invalid SOCKS5 proxy {label}: use ASCII characters only, because python-socks sends it as ASCII")
        if len(value) > SOCKS5_MAX_CREDENTIAL_BYTES:
            raise ConfigError(f"invalid SOCKS5 proxy {label}: it has {len(value)} characters; SOCKS5 allows at most {SOCKS5_MAX_CREDENTIAL_BYTES}")


class Connector:
    """Opens TCP or TLS connections to the relay, through a proxy when one applies."""

    def __init__(self, proxy: ProxySettings | None = None, tls: TlsSettings | None = None) -> None:
        self.proxy = proxy or ProxySettings()
        self.tls = tls or TlsSettings()
        if self.proxy.mode not in PROXY_MODES:
            raise ConfigError(f"invalid proxy mode {self.proxy.mode!r}: use one of {', '.join(PROXY_MODES)}")
        if self.proxy.mode == "manual":
            if not self.proxy.url:
                raise ConfigError("the proxy mode is manual but no proxy URL is set; set it, for example http://proxy.example:3128")
            _parse_proxy_url(self.proxy.url)
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
        assert self._pin is not None
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der or spki_sha256(der) != self._pin:
            transport.abort()
            pinned = base64.b64encode(self._pin).decode()
            seen = f"sha256/{base64.b64encode(spki_sha256(der)).decode()}" if der else "missing"
            raise TlsFailure(
                f"the public key of {host} is {seen}, which does not match the pinned key sha256/{pinned}. "
                "If the relay's key was changed on purpose, update the pin in the settings. "
                "A TLS-inspecting proxy between this computer and the relay also causes this."
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
            has_credentials = bool(self._proxy_credentials(proxy_url)[0])
            raise _describe_proxy_error(exc, where, has_credentials, f"{host}:{port}") from None

    def _proxy_credentials(self, proxy_url: str) -> tuple[str, str]:
        if self.proxy.mode == "manual" and self.proxy.username:
            return self.proxy.username, self.proxy.password
        parts = urlsplit(proxy_url if "://" in proxy_url else f"http://{proxy_url}")
        return unquote(parts.username or ""), unquote(parts.password or "")

    def _make_proxy(self, proxy_url: str) -> Proxy:
        kind, proxy_host, proxy_port = _parse_proxy_url(proxy_url)
        username, password = self._proxy_credentials(proxy_url)
        if username and kind is ProxyType.HTTP:
            username, password = _http_credentials(username, password)
        elif username:
            _check_socks5_credentials(username, password)
        return Proxy(
            kind,
            proxy_host,
            proxy_port,
            username=username or None,
            password=password if username else None,
            rdns=True,
        )


def _describe_proxy_error(exc: ProxyError, where: str, has_credentials: bool, destination: str) -> ProxyFailure:
    """Explain a proxy's refusal: authentication required or failed, or no tunnel to the relay."""
    # The response to CONNECT comes from the proxy itself, so a 401 is about
    # the proxy login too. tinyproxy 1.11 sends 401 for wrong credentials and
    # 407 for missing ones.
    if exc.error_code in (401, 407):
        status = f"HTTP {exc.error_code}"
        if has_credentials:
            return ProxyFailure(f"proxy authentication failed at {where} ({status}): check the proxy user name and password")
        return ProxyFailure(f"proxy authentication required by {where} ({status}): set the proxy user name and password")
    # python-socks 3.2 raises SOCKS5 authentication errors ("Username and
    # password authentication failure", "No acceptable authentication methods
    # were offered") without a code, so only their text sets them apart. The
    # coded SOCKS5 errors are replies to the CONNECT request (RFC 1928).
    if exc.error_code is None and "authentication" in str(exc).lower():
        if has_credentials:
            return ProxyFailure(f"proxy authentication failed at {where} ({exc}): check the proxy user name and password")
        return ProxyFailure(f"proxy authentication required by {where} ({exc}): set the proxy user name and password")
    return ProxyFailure(f"the proxy {where} refused to connect to {destination}: {str(exc) or 'it closed the connection'}")


def describe_verification_error(exc: ssl.SSLCertVerificationError, host: str) -> TlsFailure:
    """Explain a failed certificate check: untrusted, wrong name or expired."""
    code = exc.verify_code
    if code == _X509_EXPIRED:
        return TlsFailure(f"the certificate of {host} has expired; the relay's operator must renew it")
    if code == _X509_NOT_YET_VALID:
        return TlsFailure(f"the certificate of {host} is not valid yet; check this computer's clock")
    if code == _X509_HOSTNAME_MISMATCH:
        return TlsFailure(f"the certificate of the relay does not match the name {host}; check the relay URL")
    if code == _X509_IP_ADDRESS_MISMATCH:
        return TlsFailure(
            f"the certificate of the relay does not match the address {host}; "
            "use the host name that the certificate names in the relay URL"
        )
    if code in _X509_UNTRUSTED:
        return TlsFailure(
            f"the certificate of {host} is not trusted (issued by an unknown authority); "
            "install the issuing CA in the system's trust store or set an extra CA file in the settings"
        )
    return TlsFailure(f"the certificate of {host} was rejected: {exc.verify_message or exc}")


def connector_from_settings(
    proxy_mode: str, proxy_url: str, proxy_username: str, proxy_password: str, ca_file: str, pin_sha256: str
) -> Connector:
    """Build the agent's connector from its saved settings; raises ConfigError for invalid ones."""
    return Connector(
        ProxySettings(mode=proxy_mode, url=proxy_url, username=proxy_username, password=proxy_password),
        TlsSettings(ca_file=ca_file, pin_sha256=pin_sha256),
    )
