"""The cloud relay: agents connect in, cloud services reach their targets.

One HTTP port (see ``cloud_stub.http``) serves:

- ``GET /v1/agent``: an agent's WebSocket, authenticated by an access token;
- ``GET /v1/agents/{account}/targets/{target}/stream``: a raw binary
  WebSocket stream to a target, for cloud services (API key);
- the REST API in ``docs/openapi.yaml``: sign-in, listing agents, exchange.

Each ``--expose ACCOUNT/TARGET=PORT`` adds a TCP listener whose connections
become streams to that target.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import secrets
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from websockets.http11 import Request as WsRequest
from websockets.server import ServerProtocol

from app import __version__
from app.core import frames
from app.core import session as s
from app.core.bridge import SocketBridge
from app.core.config import DEVICE_NAME, TARGET_NAME
from app.core.errors import ConfigError
from app.core.frames import CloseCode, ErrorCode
from app.core.traffic import Direction, LoggingSink
from app.core.tunnel import Tunnel
from app.core.wslink import WsLink, tune_allocator

from .accounts import Accounts, TokenClaims, TokenError
from .http import HttpError, HttpFront, HttpLimits, HttpRequest, HttpResponse, json_response
from .limits import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_AGENT_BUFFER,
    DEFAULT_MAX_AGENT_MESSAGE,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS_PER_MINUTE,
    DEFAULT_MAX_EXCHANGE_REPLY,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_PENDING_CONNECTIONS,
    DEFAULT_MAX_STREAM_MESSAGE,
    DEFAULT_MAX_STREAMS_PER_AGENT,
    DEFAULT_SEND_TIMEOUT_S,
    ConnectionGate,
    ConnectionRateLimiter,
    LogThrottle,
    PendingConnections,
)
from .signin import LOGIN_MAX_FAILURES, LOGIN_WINDOW_S, SignIn
from .streams import Exchange, ExchangeError, WebSocketStream, finish_stream

logger = logging.getLogger(__name__)


# Defaults of RelayConfig.max_agent_message, max_stream_message and max_exchange_reply.
AGENT_MAX_MESSAGE = DEFAULT_MAX_AGENT_MESSAGE
CLOUD_MAX_MESSAGE = DEFAULT_MAX_STREAM_MESSAGE
MAX_EXCHANGE_REPLY = DEFAULT_MAX_EXCHANGE_REPLY
DEFAULT_EXCHANGE_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
PING_INTERVAL_S = 15.0
PING_TIMEOUT_S = 10.0
# How long a lost agent's streams and cloud sockets are kept for it to resume.
GRACE_S = 120.0


@dataclass(frozen=True, slots=True)
class Exposure:
    account: str
    device: str | None
    target: str
    host: str
    port: int

    @property
    def name(self) -> str:
        device = f"{self.device}/" if self.device else ""
        return f"{self.account}/{device}{self.target}"

    @classmethod
    def parse(cls, spec: str, default_host: str = "127.0.0.1") -> "Exposure":
        """Parse ``ACCOUNT/[DEVICE/]TARGET=[HOST:]PORT``."""
        path, sep, address = spec.partition("=")
        parts = path.split("/")
        if not sep or len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(f"invalid --expose {spec!r}: expected ACCOUNT/TARGET=PORT or ACCOUNT/DEVICE/TARGET=HOST:PORT")
        host, _, port_text = address.rpartition(":")
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"invalid --expose {spec!r}: port {port_text!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"invalid --expose {spec!r}: port must be 0 to 65535")
        device = parts[1] if len(parts) == 3 else None
        return cls(parts[0], device, parts[-1], host.strip("[]") or default_host, port)


@dataclass
class RelayConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    accounts: Accounts = field(default_factory=Accounts)
    api_keys: list[str] = field(default_factory=list)
    exposures: list[Exposure] = field(default_factory=list)
    data_dir: Path = Path(".")
    access_ttl: float = 15 * 60
    refresh_ttl: float = 30 * 24 * 3600
    login_max_failures: int = LOGIN_MAX_FAILURES
    login_window: float = LOGIN_WINDOW_S
    window: int = s.DEFAULT_WINDOW
    ping_interval: float = PING_INTERVAL_S
    ping_timeout: float = PING_TIMEOUT_S
    grace: float = GRACE_S
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Limits against hostile clients; docs/relay.md describes each one.
    max_streams_per_agent: int = DEFAULT_MAX_STREAMS_PER_AGENT
    max_agent_buffer: int = DEFAULT_MAX_AGENT_BUFFER
    max_agent_message: int = DEFAULT_MAX_AGENT_MESSAGE
    max_stream_message: int = DEFAULT_MAX_STREAM_MESSAGE
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_exchange_reply: int = DEFAULT_MAX_EXCHANGE_REPLY
    max_connections_per_minute: int = DEFAULT_MAX_CONNECTIONS_PER_MINUTE
    max_pending_connections: int = DEFAULT_MAX_PENDING_CONNECTIONS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    send_timeout: float = DEFAULT_SEND_TIMEOUT_S

    def __repr__(self) -> str:
        return f"<RelayConfig {self.host}:{self.port} accounts={self.accounts.names} exposures={len(self.exposures)}>"


@dataclass
class TargetTotals:
    streams: int = 0
    bytes_to_desktop: int = 0
    bytes_to_cloud: int = 0


class AgentEntry:
    """A connected agent: its tunnel, identity and counters."""

    tunnel: Tunnel

    def __init__(self, account: str, device: str, remote: str) -> None:
        self.account = account
        self.device = device
        self.remote = remote
        self.connected_at = time.time()
        self.ready = asyncio.get_running_loop().create_future()
        self.targets: list[str] = []
        self.totals: dict[str, TargetTotals] = {}
        self.family = ""
        self.access_expires_at = 0.0
        self.session_id = secrets.token_hex(8)
        self.resume_secret = secrets.token_urlsafe(32)
        self._active: dict[object, str] = {}
        self._expiry_timer: asyncio.TimerHandle | None = None

    def set_access(self, claims: TokenClaims) -> None:
        """Record the session's access token; the session ends when it expires unrenewed."""
        self.family = claims.family
        self.access_expires_at = claims.expires_at
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        delay = max(0.0, claims.expires_at - time.time())
        self._expiry_timer = asyncio.get_running_loop().call_later(delay, self._on_access_expired)

    def _on_access_expired(self) -> None:
        logger.info("access token of agent %s/%s expired without renewal; closing its session", self.account, self.device)
        self.tunnel.close(CloseCode.TOKEN_EXPIRED, "access token expired; renew it before it expires")

    def cancel_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None

    def __repr__(self) -> str:
        return f"<AgentEntry {self.account}/{self.device} from {self.remote}>"

    @property
    def identity(self) -> tuple[str, str]:
        return (self.account, self.device)

    def streams_in_use(self) -> int:
        """Return the streams counted against --max-streams-per-agent.

        That is the larger of the cloud clients this agent serves (open or
        waiting for the stream to open) and the tunnel's open streams, which
        also include streams still draining after their cloud end left.
        """
        return max(len(self._active), len(self.tunnel.handlers))

    def buffered_bytes(self) -> int:
        """Return the bytes the session keeps for the agent: its resend log and the data waiting for credit."""
        session = self.tunnel.session
        return session.unacked_bytes + sum(session.backlog_size(sid) for sid in session.stream_ids)

    def track(self, handler: Any, target: str) -> None:
        self._active[handler] = target
        # Count only names the agent offers, so clients asking for random
        # names cannot grow this table.
        if target in self.targets or target in self.totals:
            self.totals.setdefault(target, TargetTotals()).streams += 1

    def untrack(self, handler: Any) -> None:
        target = self._active.pop(handler, None)
        if target is not None and (target in self.targets or target in self.totals):
            totals = self.totals.setdefault(target, TargetTotals())
            totals.bytes_to_desktop += handler.bytes_to_desktop
            totals.bytes_to_cloud += handler.bytes_to_cloud

    def describe(self) -> dict[str, Any]:
        live: dict[str, tuple[int, int]] = {}
        for handler, target in self._active.items():
            down, up = live.get(target, (0, 0))
            live[target] = (down + getattr(handler, "bytes_to_desktop", 0), up + getattr(handler, "bytes_to_cloud", 0))
        names = list(dict.fromkeys([*self.targets, *self.totals]))
        targets = []
        for name in names:
            totals = self.totals.get(name, TargetTotals())
            down, up = live.get(name, (0, 0))
            targets.append({
                "name": name,
                "advertised": name in self.targets,
                "streams_total": totals.streams,
                "bytes_to_desktop": totals.bytes_to_desktop + down,
                "bytes_to_cloud": totals.bytes_to_cloud + up,
            })
        session = self.tunnel.session
        return {
            "account": self.account,
            "device": self.device,
            "state": "reconnecting" if self.tunnel.detached else "connected",
            "resumes": self.tunnel.resumes,
            "connected_at": datetime.fromtimestamp(self.connected_at, timezone.utc).isoformat(),
            "remote_address": self.remote,
            "agent_version": str(self.tunnel.peer_info.get("version", "")),
            "streams_open": len(self.tunnel.handlers),
            "bytes_to_desktop": session.bytes_sent,
            "bytes_to_cloud": session.bytes_received,
            "targets": targets,
        }


class CloudSocket(SocketBridge):
    """A cloud client's TCP connection on an exposed port."""

    def __init__(self, relay: "Relay", exposure: Exposure) -> None:
        super().__init__(target=exposure.target, inbound=Direction.TO_CLOUD, traffic=relay.traffic, label="cloud client")
        self._relay = relay
        self._exposure = exposure
        self._entry: AgentEntry | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        relay = self._relay
        exposure = self._exposure
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        # TCP has no way to say why, so every rejection here is a plain close.
        if relay.expose_gate.admit(address, f"exposed port of {exposure.name}") is not None:
            self.transport.close()
            return
        entry = relay.find_agent(exposure.account, exposure.device, exposure.target)
        if entry is None:
            relay.log_throttle.warning(
                ("offline", exposure.name), "cloud client %s for %s: agent offline; closing", address, exposure.name
            )
            self.transport.close()
            return
        limit = relay.stream_limit_error(entry)
        if limit is not None:
            self.transport.close()
            return
        self._entry = entry
        entry.track(self, exposure.target)
        self.done.add_done_callback(lambda _f: entry.untrack(self))
        assert self.transport is not None
        if not entry.ready.done():
            # Nothing may be read before the stream exists to carry it.
            self.transport.pause_reading()
        self._relay.open_when_ready(entry, exposure.target, self)

    def bind(self, tunnel: Tunnel, stream_id: int) -> None:
        super().bind(tunnel, stream_id)
        if self.transport is not None and not self.transport.is_closing() and not self.transport.is_reading():
            self.transport.resume_reading()


class Relay:
    """The relay server; ``start`` binds its ports and ``stop`` ends every session."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.signin = SignIn(
            config.accounts,
            config.data_dir,
            access_ttl=config.access_ttl,
            refresh_ttl=config.refresh_ttl,
            max_failures=config.login_max_failures,
            failure_window=config.login_window,
        )
        self.agents: dict[tuple[str, str], AgentEntry] = {}
        self.log_throttle = LogThrottle(logger)
        rate = ConnectionRateLimiter(config.max_connections_per_minute)
        self.pending = PendingConnections(config.max_pending_connections)
        # Both gates share one rate limiter, so a client address has one
        # budget over the HTTP port and every exposed port.
        self.http_gate = ConnectionGate(rate, self.pending, self.log_throttle)
        self.expose_gate = ConnectionGate(rate, None, self.log_throttle)
        self._http_limits = HttpLimits(
            max_header_bytes=config.max_header_bytes,
            max_body_bytes=config.max_body_bytes,
            header_timeout=config.header_timeout,
            send_timeout=config.send_timeout,
        )
        self.traffic = LoggingSink(logger)
        self.port = 0
        self.expose_ports: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._links: set[WsLink] = set()
        self._fronts: set[HttpFront] = set()

    def __repr__(self) -> str:
        return f"<Relay port={self.port} agents={len(self.agents)}>"

    @property
    def http_connections(self) -> int:
        """Open connections on the HTTP port that are not WebSockets."""
        return len(self._fronts)

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self.config.tls_cert else "ws"
        return f"{scheme}://{host}:{self.port}"

    # Lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        tune_allocator()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._make_front, self.config.host, self.config.port, ssl=self._tls_context())
        self._servers.append(server)
        self.port = server.sockets[0].getsockname()[1]
        logger.info("relay listening on %s (HTTP and WebSocket)", self.url)
        for exposure in self.config.exposures:
            try:
                listener = await loop.create_server(functools.partial(CloudSocket, self, exposure), exposure.host, exposure.port)
            except OSError as exc:
                await self.stop()
                raise ConfigError(f"cannot listen on {exposure.host}:{exposure.port} for {exposure.name}: {exc.strerror}") from exc
            self._servers.append(listener)
            port = listener.sockets[0].getsockname()[1]
            self.expose_ports[exposure.name] = port
            logger.info("exposing %s on TCP %s:%d", exposure.name, exposure.host, port)

    def _tls_context(self) -> ssl.SSLContext | None:
        cert, key = self.config.tls_cert, self.config.tls_key
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate {cert} and key {key}: {exc}") from None
        return context

    async def stop(self) -> None:
        """Stop listening, close every agent session, then cancel leftovers."""
        for server in self._servers:
            server.close()
        for entry in list(self.agents.values()):
            entry.tunnel.close(CloseCode.GOING_AWAY, "relay is shutting down")
        for link in list(self._links):
            link.close(CloseCode.GOING_AWAY, "relay is shutting down")
        waits = [asyncio.ensure_future(link.closed) for link in self._links]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=STOP_TIMEOUT_S)
            for link in list(self._links):
                link.abort()
            if pending:
                logger.warning("%d connections did not close in %.0f s; aborted them", len(pending), STOP_TIMEOUT_S)
        for front in list(self._fronts):
            front.abort()
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            server.close()
            await server.wait_closed()
        self._servers.clear()
        logger.info("relay stopped")

    def _make_front(self) -> HttpFront:
        return HttpFront(
            on_request=self._handle_request,
            on_upgrade=self._handle_upgrade,
            max_message_size=self.config.max_stream_message,
            tasks=self._tasks,
            limits=self._http_limits,
            gate=self.http_gate,
            log=self.log_throttle,
            registry=self._fronts,
        )

    # Agents ------------------------------------------------------------------

    def find_agent(self, account: str, device: str | None = None, target: str | None = None) -> AgentEntry | None:
        """Return the agent for an account: the named device, else the newest one offering ``target``.

        Agents whose HELLO listed the target come first, so an account with
        several desktops reaches the one that has it. An agent whose
        connection is lost but still within the grace period counts: streams
        opened meanwhile start once it resumes.
        """
        if device is not None:
            entry = self.agents.get((account, device))
            return entry if entry is not None and not entry.tunnel.ended else None
        candidates = [e for e in self.agents.values() if e.account == account and not e.tunnel.ended]
        if target is not None:
            offering = [e for e in candidates if target in e.targets]
            candidates = offering or candidates
        return max(candidates, key=lambda e: e.connected_at, default=None)

    def stream_limit_error(self, entry: AgentEntry) -> HttpError | None:
        """Return the error for a new stream to an agent at one of its limits, and log it.

        The limits are --max-streams-per-agent and --max-buffered-bytes-per-agent.
        """
        agent_name = f"{entry.account}/{entry.device}"
        in_use = entry.streams_in_use()
        if in_use >= self.config.max_streams_per_agent:
            self.log_throttle.warning(
                ("streams", agent_name), "rejected a stream to agent %s: it has %d streams, the limit", agent_name, in_use,
            )
            return HttpError(
                429,
                "limit_exceeded",
                f"the agent {agent_name} has {in_use} streams open, the relay's limit; close some and try again",
                [("Retry-After", "1")],
            )
        # O(streams), which is fine once per stream open.
        buffered = entry.buffered_bytes()
        if buffered >= self.config.max_agent_buffer:
            self.log_throttle.warning(
                ("buffered", agent_name), "rejected a stream to agent %s: it has %d bytes buffered, above the limit", agent_name, buffered,
            )
            return HttpError(
                429,
                "limit_exceeded",
                f"the relay buffers {buffered} bytes for the agent {agent_name}, above its limit; try again once the agent catches up",
                [("Retry-After", "1")],
            )
        return None

    def open_when_ready(self, entry: AgentEntry, target: str, handler: Any) -> None:
        """Open a stream for ``handler`` once the agent's HELLO has arrived, then bind it."""

        def open_stream(_ready: object = None) -> None:
            if entry.tunnel.ended or entry.ready.cancelled():
                handler.on_open_failed(ErrorCode.SESSION_CLOSED, "the agent disconnected")
                return
            sid = entry.tunnel.open(target, handler)
            handler.bind(entry.tunnel, sid)

        if entry.ready.done():
            open_stream()
        else:
            entry.ready.add_done_callback(open_stream)

    def _accept_agent(self, request: HttpRequest, link: WsLink, ws_request: WsRequest) -> None:
        protocol = link.protocol
        assert isinstance(protocol, ServerProtocol)
        claims = self._authenticate_agent(request, link)
        if claims is None:
            return
        request.mark_authenticated()
        account = claims.account
        device = (request.header("deskbridge-device") or "").strip()
        if not DEVICE_NAME.match(device):
            _reject(link, HttpError(400, "invalid_device", "header Deskbridge-Device must be 1 to 64 letters, digits, spaces, '.', '_' or '-'"))
            return

        link.set_max_message_size(self.config.max_agent_message)
        # Frames the agent does not read wait in this buffer; past the limit
        # the connection is dropped like a lost one.
        link.max_write_buffer = self.config.max_agent_buffer
        failure = ""
        if request.header("deskbridge-resume") is not None:
            failure = self._resume_agent(request, link, ws_request, claims, device)
            if not failure:
                return

        # Hand the connection to the tunnel before responding, so that the
        # agent's first frames find a session.
        session = s.Session(s.Role.RELAY, window=self.config.window, info={"version": __version__})
        entry = AgentEntry(account, device, request.peer)
        entry.tunnel = Tunnel(
            session,
            link,
            on_hello=lambda hello: self._on_agent_hello(entry, hello),
            on_end=lambda code, reason: self._on_agent_end(entry, code, reason),
            on_auth=lambda event: self._on_agent_auth(entry, event),
            on_detach=lambda code, reason: self._on_agent_detach(entry, reason),
            grace=self.config.grace,
            label=f"{account}/{device}",
            buffer_limit=self.config.max_agent_buffer,
        )
        entry.set_access(claims)

        response = protocol.accept(ws_request)
        response.headers["Deskbridge-Session"] = entry.session_id
        response.headers["Deskbridge-Resume-Secret"] = entry.resume_secret
        response.headers["Deskbridge-Resumed"] = "0"
        if failure:
            response.headers["Deskbridge-Resume-Failure"] = failure
            logger.info("agent %s/%s could not resume its session: %s", account, device, failure)
        link.respond(response)
        link.start_heartbeat(self.config.ping_interval, self.config.ping_timeout)
        previous = self.agents.get(entry.identity)
        self.agents[entry.identity] = entry
        if previous is not None:
            logger.info("agent %s/%s reconnected from %s; replacing its previous session", account, device, request.peer)
            previous.tunnel.close(CloseCode.SESSION_REPLACED, "replaced by a newer session of the same device")
        entry.tunnel.flush()
        logger.info("agent %s/%s connected from %s", account, device, request.peer)

    def _resume_agent(self, request: HttpRequest, link: WsLink, ws_request: WsRequest, claims: TokenClaims, device: str) -> str:
        """Continue a lost session on this connection; return why not, or "" when resumed."""
        entry = self.agents.get((claims.account, device))
        if entry is None or entry.tunnel.ended or entry.session_id != request.header("deskbridge-resume"):
            return "the relay has no such session: it restarted, or the grace period ended"
        secret = request.header("deskbridge-resume-secret") or ""
        if not hmac.compare_digest(secret.encode(), entry.resume_secret.encode()):
            return "the resume secret does not match"
        try:
            received = int(request.header("deskbridge-received") or "")
        except ValueError:
            return "the Deskbridge-Received header is not a number"
        session = entry.tunnel.session
        if not session.can_resume_from(received):
            return "the relay no longer holds the data this agent is missing"

        protocol = link.protocol
        assert isinstance(protocol, ServerProtocol)
        entry.resume_secret = secrets.token_urlsafe(32)
        response = protocol.accept(ws_request)
        response.headers["Deskbridge-Session"] = entry.session_id
        response.headers["Deskbridge-Resume-Secret"] = entry.resume_secret
        response.headers["Deskbridge-Resumed"] = "1"
        response.headers["Deskbridge-Received"] = str(session.received_count)
        link.respond(response)
        link.start_heartbeat(self.config.ping_interval, self.config.ping_timeout)

        entry.remote = request.peer
        entry.set_access(claims)
        resent = entry.tunnel.resume_on(link, received)
        logger.info(
            "agent %s/%s resumed its session from %s with %d streams open; resent %d bytes",
            entry.account, entry.device, request.peer, len(entry.tunnel.handlers), resent,
        )
        return ""

    def _on_agent_detach(self, entry: AgentEntry, reason: str) -> None:
        logger.warning(
            "agent %s/%s lost its connection (%s); keeping %d streams for %g s",
            entry.account, entry.device, reason, len(entry.tunnel.handlers), self.config.grace,
        )

    def _authenticate_agent(self, request: HttpRequest, link: WsLink) -> TokenClaims | None:
        token = _bearer(request)
        if token is None:
            _reject(link, HttpError(401, "unauthorized", "missing access token: send 'Authorization: Bearer <token>'"))
            return None
        try:
            return self.signin.check_access(token)
        except TokenError as exc:
            _reject(link, HttpError(401, "invalid_token", f"access token rejected: {exc}; refresh it or sign in again"))
            return None

    def _on_agent_auth(self, entry: AgentEntry, event: s.AuthReceived | s.AuthAccepted) -> None:
        """Accept a renewed access token on the open session, or end the session."""
        if not isinstance(event, s.AuthReceived):
            return
        try:
            claims = self.signin.check_access(event.token)
        except TokenError as exc:
            logger.warning("agent %s/%s sent a rejected access token: %s", entry.account, entry.device, exc)
            entry.tunnel.close(CloseCode.TOKEN_REJECTED, f"access token rejected: {exc}")
            return
        if claims.account != entry.account:
            entry.tunnel.close(CloseCode.TOKEN_REJECTED, "the renewed token belongs to another account")
            return
        entry.set_access(claims)
        entry.tunnel.session.send_auth_ok(int(max(0, claims.expires_at - time.time())))
        entry.tunnel.flush()
        logger.debug("agent %s/%s renewed its access token", entry.account, entry.device)

    def _on_agent_hello(self, entry: AgentEntry, hello: s.HelloReceived) -> None:
        raw_targets = hello.info.get("targets", [])
        entry.targets = [str(t) for t in raw_targets if isinstance(t, str)] if isinstance(raw_targets, list) else []
        if not entry.ready.done():
            entry.ready.set_result(None)
        logger.info("agent %s/%s ready with targets %s", entry.account, entry.device, ", ".join(entry.targets) or "(none)")

    def _on_agent_end(self, entry: AgentEntry, code: int, reason: str) -> None:
        entry.cancel_expiry()
        if not entry.ready.done():
            entry.ready.cancel()
        if self.agents.get(entry.identity) is entry:
            del self.agents[entry.identity]
        logger.info("agent %s/%s disconnected (code %s): %s", entry.account, entry.device, code, reason or "no reason given")

    # HTTP ----------------------------------------------------------------------

    def _handle_upgrade(self, request: HttpRequest, link: WsLink, ws_request: WsRequest) -> None:
        self._links.add(link)
        link.closed.add_done_callback(lambda _f: self._links.discard(link))
        segments = request.segments
        try:
            _check_handshake(link, ws_request)
            if segments == ["v1", "agent"]:
                self._accept_agent(request, link, ws_request)
            elif len(segments) == 6 and segments[:2] == ["v1", "agents"] and segments[3] == "targets" and segments[5] == "stream":
                self._require_api_key(request)
                self._open_websocket_stream(request, link, ws_request, segments[2], segments[4])
            else:
                raise HttpError(404, "not_found", f"no WebSocket endpoint at {request.path}")
        except HttpError as exc:
            _reject(link, exc)

    def _open_websocket_stream(self, request: HttpRequest, link: WsLink, ws_request: WsRequest, account: str, target: str) -> None:
        entry = self._require_agent(account, request.query.get("device"), target)
        limit = self.stream_limit_error(entry)
        if limit is not None:
            raise limit
        # The relay sends at most one window of stream data unread by the
        # client (flow control), plus pongs and the close frame.
        link.max_write_buffer = self.config.window + self.config.max_stream_message
        stream = WebSocketStream(link, ws_request, target, on_done=lambda st: entry.untrack(st))
        entry.track(stream, target)
        self.open_when_ready(entry, target, stream)
        logger.info("cloud WebSocket from %s asks for a stream to %s/%s", request.peer, account, target)

    async def _handle_request(self, request: HttpRequest) -> HttpResponse:
        segments = request.segments
        method = request.method
        if segments == ["healthz"]:
            _require_method(request, "GET")
            return json_response(200, {"status": "ok", "agents": len(self.agents)})
        if segments[:2] == ["v1", "auth"] and len(segments) == 3:
            _require_method(request, "POST")
            # Both raise HttpError unless the credentials were valid.
            if segments[2] == "login":
                response = self.signin.login(request)
                request.mark_authenticated()
                return response
            if segments[2] == "refresh":
                response = self.signin.refresh(request)
                request.mark_authenticated()
                return response
            if segments[2] == "logout":
                response, family = self.signin.logout(request)
                if family is not None:
                    self._close_family(family)
                return response
        if segments == ["v1", "agents"]:
            _require_method(request, "GET")
            self._require_api_key(request)
            agents = [entry.describe() for entry in self.agents.values() if entry.ready.done() and not entry.tunnel.ended]
            return json_response(200, {"agents": agents})
        if len(segments) == 6 and segments[:2] == ["v1", "agents"] and segments[3] == "targets" and segments[5] == "exchange":
            _require_method(request, "POST")
            self._require_api_key(request)
            return await self._exchange(request, segments[2], segments[4])
        if method not in ("GET", "POST"):
            raise HttpError(405, "method_not_allowed", f"method {method} is not supported")
        raise HttpError(404, "not_found", f"no endpoint at {request.path}; see docs/openapi.yaml")

    def _require_api_key(self, request: HttpRequest) -> None:
        supplied = _bearer(request) or request.header("x-api-key")
        if not self.config.api_keys:
            raise HttpError(403, "forbidden", "this relay has no API keys configured; start it with --api-key")
        if supplied is None:
            raise HttpError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
        valid = False
        for key in self.config.api_keys:
            # Check every key so the time taken does not reveal which one matched.
            valid |= hmac.compare_digest(supplied.encode(), key.encode())
        if not valid:
            raise HttpError(401, "unauthorized", "invalid API key")
        request.mark_authenticated()

    def _require_agent(self, account: str, device: str | None, target: str | None = None) -> AgentEntry:
        if target is not None and not TARGET_NAME.match(target):
            raise HttpError(
                400, "invalid_request", "invalid target name: use 1 to 64 ASCII letters, digits, '.', '_' or '-'"
            )
        entry = self.find_agent(account, device, target)
        if entry is None:
            who = f"{account}/{device}" if device else f"account {account!r}"
            raise HttpError(503, "agent_offline", f"no agent of {who} is connected; start the Deskbridge agent on the desktop")
        return entry

    def _close_family(self, family: str) -> None:
        for entry in list(self.agents.values()):
            if entry.family == family:
                entry.tunnel.close(CloseCode.SIGNED_OUT, "signed out; sign in again to reconnect")

    async def _exchange(self, request: HttpRequest, account: str, target: str) -> HttpResponse:
        query = request.query
        until = query.get("until", "newline")
        if until not in ("newline", "bytes", "idle", "eof"):
            raise HttpError(400, "invalid_request", f"invalid until={until!r}: use newline, bytes, idle or eof")
        max_reply = self.config.max_exchange_reply
        count = _int_param(query, "bytes", 0, 0, max_reply)
        if until == "bytes" and count <= 0:
            raise HttpError(400, "invalid_request", f"until=bytes needs bytes=N with N from 1 to {max_reply}")
        if count <= 0 and query.get("bytes"):
            raise HttpError(400, "invalid_request", f"bytes=0 is invalid: bytes=N takes N from 1 to {max_reply}")
        idle = _int_param(query, "idle_ms", 500, 1, 600_000) / 1000
        timeout = _int_param(query, "timeout_ms", int(DEFAULT_EXCHANGE_TIMEOUT_S * 1000), 1, 600_000) / 1000

        entry = self._require_agent(account, query.get("device"), target)
        if not entry.ready.done():
            try:
                await asyncio.wait_for(asyncio.shield(entry.ready), timeout)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                raise HttpError(503, "agent_offline", f"the agent of account {account!r} did not finish connecting") from None
        tunnel = entry.tunnel
        if tunnel.ended:
            raise HttpError(503, "agent_offline", f"the agent of account {account!r} disconnected")
        limit = self.stream_limit_error(entry)
        if limit is not None:
            raise limit
        exchange = Exchange(target, until=until, count=count, idle=idle, max_reply=max_reply)
        entry.track(exchange, target)
        sid = tunnel.open(target, exchange)
        exchange.bind(tunnel, sid)
        # Every way out of this block must end the stream, or the desktop
        # application's connection stays open: a failed or timed-out
        # exchange, and a client that disconnects (its task is cancelled).
        completed = False
        try:
            if request.body:
                exchange.bytes_to_desktop += len(request.body)
                tunnel.send_data(sid, request.body)
            reply = await asyncio.wait_for(asyncio.shield(exchange.done), timeout)
            completed = True
        except ExchangeError as exc:
            failure = exc.failure
            raise HttpError(failure.status, failure.code, failure.message) from None
        except asyncio.TimeoutError:
            raise HttpError(504, "timed_out", f"no complete reply from target {target!r} within {timeout:g} s") from None
        finally:
            entry.untrack(exchange)
            if not completed:
                tunnel.reset(sid, ErrorCode.CANCELLED, "the exchange ended without a complete reply")
        finish_stream(tunnel, sid)
        return HttpResponse(200, reply, "application/octet-stream", [("Deskbridge-Stream", str(sid))])


def _reject(link: WsLink, error: HttpError) -> None:
    protocol = link.protocol
    assert isinstance(protocol, ServerProtocol)
    response = protocol.reject(error.status, json.dumps({"error": error.code, "message": error.message}) + "\n")
    # Assigning to websockets Headers appends, so drop reject()'s text/plain first.
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    link.respond(response)


def _check_handshake(link: WsLink, ws_request: WsRequest) -> None:
    """Raise HttpError if the WebSocket handshake request is invalid, before any stream opens for it."""
    protocol = link.protocol
    assert isinstance(protocol, ServerProtocol)
    # accept() only builds the response; nothing is sent until respond().
    response = protocol.accept(ws_request)
    if response.status_code != 101:
        detail = bytes(response.body).decode("utf-8", "replace").strip() or response.reason_phrase
        raise HttpError(response.status_code, "invalid_handshake", f"invalid WebSocket handshake: {detail}")


def _bearer(request: HttpRequest) -> str | None:
    value = request.header("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _require_method(request: HttpRequest, method: str) -> None:
    if request.method != method:
        raise HttpError(405, "method_not_allowed", f"{request.path} accepts {method}, not {request.method}", [("Allow", method)])


def _int_param(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HttpError(400, "invalid_request", f"{name}={raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise HttpError(400, "invalid_request", f"{name}={value} is outside {low} to {high}")
    return value


def parse_exposures(specs: Iterable[str], default_host: str) -> list[Exposure]:
    return [Exposure.parse(spec, default_host) for spec in specs]
