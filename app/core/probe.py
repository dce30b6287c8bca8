"""Reachability checks for the setup wizard and the window: the relay and each target.

``check_relay_async`` requests the relay's ``GET /healthz`` through the
agent's connection path (proxy, TLS) and words what failed: the host name did not resolve, the connection was refused
or timed out, TLS failed, or the server responded but is not a Deskbridge
relay. ``probe_target`` opens a TCP connection to a target and closes it at
once, to tell whether its desktop application is listening.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from .auth import http_base
from .config import Target, validate_relay_url
from .errors import ConfigError, describe_os_error
from .http_client import NotHttpError, request_json
from .net import Connector, ProxyFailure, TlsFailure

RELAY_TIMEOUT_S = 5.0
TARGET_TIMEOUT_S = 3.0
HEALTH_PATH = "/healthz"


class Problem(enum.Enum):
    INVALID_URL = "invalid URL"
    DNS = "host name not found"
    REFUSED = "connection refused"
    TIMED_OUT = "timed out"
    TLS = "TLS failed"
    NOT_RELAY = "not a Deskbridge relay"
    NETWORK = "network error"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """A check's outcome; ``reason`` is the cause alone, without the address, for a target probe."""

    ok: bool
    message: str
    problem: Problem | None = None
    reason: str = ""


async def check_relay_async(relay_url: str, timeout: float = RELAY_TIMEOUT_S, connector: Connector | None = None) -> ProbeResult:
    """Request the relay's health endpoint and word the outcome.

    The request takes the same proxy and TLS path as the agent, so a
    passing check means the agent can reach the relay too.
    """
    try:
        url = validate_relay_url(relay_url)
    except ConfigError as exc:
        return ProbeResult(False, str(exc), Problem.INVALID_URL)
    parts = urlsplit(url)
    where = parts.netloc
    try:
        status, body = await request_json(connector or Connector(), "GET", http_base(url) + HEALTH_PATH, timeout=timeout)
    except TlsFailure as exc:
        return ProbeResult(False, f"TLS with {where} failed: {exc}.", Problem.TLS)
    except ProxyFailure as exc:
        return ProbeResult(False, f"Cannot reach {where}: {exc}.", Problem.NETWORK)
    except (OSError, EOFError) as exc:
        return describe_failure(exc, parts.hostname or where, where, timeout)
    if status != 200:
        return ProbeResult(
            False,
            f"{where} answered HTTP {status} for {HEALTH_PATH}, so it is not a Deskbridge relay. Check the URL.",
            Problem.NOT_RELAY,
        )
    if body.get("status") != "ok":
        return ProbeResult(
            False,
            f"{where} answered {HEALTH_PATH}, but not as a Deskbridge relay does. Check the URL.",
            Problem.NOT_RELAY,
        )
    return ProbeResult(True, f"The relay at {where} is reachable.")


def check_relay(relay_url: str, timeout: float = RELAY_TIMEOUT_S, connector: Connector | None = None) -> ProbeResult:
    """Run ``check_relay_async`` on a fresh event loop; for callers without one."""
    return asyncio.run(check_relay_async(relay_url, timeout, connector))


def describe_failure(exc: BaseException, host: str, where: str, timeout: float) -> ProbeResult:
    """Word a failed relay check by its cause, with what to check next."""
    if isinstance(exc, socket.gaierror):
        return ProbeResult(
            False,
            f"The host name {host!r} was not found ({exc.strerror}). Check its spelling and your network.",
            Problem.DNS,
        )
    if isinstance(exc, ConnectionRefusedError):
        return ProbeResult(
            False,
            f"{where} refused the connection: no relay is listening there. Check the port and that the relay runs.",
            Problem.REFUSED,
        )
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return ProbeResult(
            False,
            f"{where} did not answer within {timeout:g} s. Check the address, your network and any firewall.",
            Problem.TIMED_OUT,
        )
    if isinstance(exc, ssl.SSLError):
        return ProbeResult(False, f"TLS with {where} failed: {exc.reason or exc}. Check the wss:// URL and the certificate.", Problem.TLS)
    if isinstance(exc, (NotHttpError, ConnectionResetError, EOFError)):
        return ProbeResult(
            False,
            f"{where} did not answer HTTP, so it is not a Deskbridge relay. Check the port.",
            Problem.NOT_RELAY,
        )
    if isinstance(exc, OSError):
        return ProbeResult(False, f"Cannot reach {where}: {describe_os_error(exc)}.", Problem.NETWORK)
    return ProbeResult(False, f"Cannot reach {where}: {exc}.", Problem.NETWORK)


async def probe_target(target: Target, timeout: float = TARGET_TIMEOUT_S) -> ProbeResult:
    """Tell whether something listens on the target's address, trying each address its host resolves to.

    The probe connects and closes the connection at once without sending
    anything; a desktop application may log it as a short client visit.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        reason = f"host {target.host!r} not found ({exc.strerror})"
        return ProbeResult(False, f"The host {target.host!r} was not found ({exc.strerror}).", Problem.DNS, reason)

    failures: list[tuple[str, str]] = []
    problems: set[Problem] = set()
    seen: set[tuple[int, str]] = set()
    for family, _type, _proto, _name, sockaddr in infos:
        host = str(sockaddr[0])
        if (family, host) in seen:
            continue
        seen.add((family, host))
        shown = f"[{host}]:{target.port}" if ":" in host else f"{host}:{target.port}"
        try:
            transport, _protocol = await asyncio.wait_for(
                loop.create_connection(asyncio.Protocol, host, target.port, family=family), timeout
            )
        except asyncio.TimeoutError:
            problems.add(Problem.TIMED_OUT)
            failures.append((shown, f"timed out after {timeout:g} s"))
            continue
        except OSError as exc:
            problems.add(Problem.REFUSED if isinstance(exc, ConnectionRefusedError) else Problem.NETWORK)
            failures.append((shown, describe_os_error(exc)))
            continue
        transport.close()
        return ProbeResult(True, f"Listening on {shown}.")

    problem = problems.pop() if len(problems) == 1 else Problem.NETWORK
    message = "; ".join(f"{address}: {reason}" for address, reason in failures)
    reason = failures[0][1] if len(failures) == 1 else message
    return ProbeResult(False, message + ".", problem, reason)
