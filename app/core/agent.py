"""The desktop agent: one outbound WebSocket, many streams to local targets.

``Agent.run`` keeps a tunnel session to the relay up for as long as it runs.
It connects, authenticates in the WebSocket handshake with an access token,
and serves every stream the relay opens by connecting to the named target
from the local allowlist; the relay names a target and never a host or port.
A failed or lost connection is retried with exponential backoff and full
jitter; the loop never ends on its own.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from app import __version__

from . import frames
from . import session as s
from .auth import Tokens
from .backoff import Backoff
from .bridge import SocketBridge
from .config import Target, is_loopback_host
from .errors import ConfigError, HandshakeError, LocalProtocolError, SignInError, describe_os_error, is_retryable
from .frames import CloseCode, ErrorCode
from .net import Connector, ProxyFailure, TlsFailure
from .traffic import Direction, Kind, TrafficRecord, TrafficSink, now
from .tunnel import Tunnel
from .wslink import WsLink, connect

logger = logging.getLogger(__name__)

AGENT_PATH = "/v1/agent"
CONNECT_TIMEOUT_S = 15.0
TARGET_CONNECT_TIMEOUT_S = 10.0
# A session that lasted this long resets the backoff to its base delay.
STABLE_SESSION_S = 10.0
STOP_TIMEOUT_S = 5.0
# Heartbeat: a ping every interval whose pong must arrive within the timeout,
# so a link that died silently is found in at most 25 s.
PING_INTERVAL_S = 15.0
PING_TIMEOUT_S = 10.0
# How long streams and desktop sockets are kept while the relay is unreachable.
GRACE_S = 120.0
# A wall clock that moved this much more than the monotonic clock between two
# checks means the machine slept (the monotonic clock stops during sleep).
CLOCK_JUMP_S = 5.0
CLOCK_CHECK_S = 1.0
# Renew the access token once this fraction of its remaining lifetime passed.
RENEW_AT_FRACTION = 0.5
# How long the relay may take to confirm a renewed token.
RENEW_CONFIRM_TIMEOUT_S = 10.0
RENEW_RETRY_BASE_S = 0.2
RENEW_RETRY_CAP_S = 5.0


class AgentState(enum.Enum):
    STOPPED = "stopped"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting to reconnect"
    SIGNED_OUT = "signed out"


@dataclass(frozen=True, slots=True)
class AgentStatus:
    state: AgentState
    detail: str = ""
    retry_at: float | None = None
    connected_since: float | None = None


class TokenSource(Protocol):
    async def access_token(self) -> Tokens: ...

    async def renew(self) -> Tokens: ...

    def invalidate(self) -> None: ...


class DuplicateDevice(Exception):
    """The relay replaced this session with another agent's of the same device name."""


class TargetUnreachable(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


async def connect_target(bridge: SocketBridge, target: Target, timeout: float = TARGET_CONNECT_TIMEOUT_S) -> None:
    """Connect ``bridge`` to the target, trying every address its host resolves to.

    ``localhost`` may resolve to ::1 before 127.0.0.1 or the other way round,
    and a desktop application often listens on only one of them, so each
    address is tried in turn and every failure is reported.
    """
    loop = asyncio.get_running_loop()
    where = f"target {target.name!r} at {target.address}"
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TargetUnreachable(ErrorCode.CONNECT_FAILED, f"cannot resolve the host of {where}: {exc.strerror}") from None

    failures: list[str] = []
    refused = timeouts = 0
    seen: set[tuple[int, str]] = set()
    for family, _type, _proto, _name, sockaddr in infos:
        host = str(sockaddr[0])
        if (family, host) in seen:
            continue
        seen.add((family, host))
        if not target.allow_remote and not is_loopback_host(host):
            # The name may resolve elsewhere than this computer; only the
            # person's explicit consent in the settings allows that.
            failures.append(f"{host}: not on this computer, and remote targets are not allowed for {target.name!r}")
            continue
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: bridge, host, target.port, family=family), timeout
            )
            return
        except asyncio.TimeoutError:
            timeouts += 1
            failures.append(f"{host}: timed out after {timeout:g} s")
        except OSError as exc:
            if isinstance(exc, ConnectionRefusedError):
                refused += 1
            failures.append(f"{host}: {describe_os_error(exc)}")

    if refused == len(failures):
        code = ErrorCode.CONNECTION_REFUSED
    elif timeouts == len(failures):
        code = ErrorCode.CONNECT_TIMEOUT
    else:
        code = ErrorCode.CONNECT_FAILED
    raise TargetUnreachable(
        code,
        f"cannot connect to {where} ({'; '.join(failures)}); "
        "start the desktop application and log in to it",
    )


class Agent:
    """Keeps a tunnel to the relay and serves the allowlisted targets."""

    def __init__(
        self,
        *,
        relay_url: str,
        device: str,
        targets: Mapping[str, Target],
        tokens: TokenSource,
        traffic: TrafficSink | None = None,
        on_status: Callable[[AgentStatus], None] | None = None,
        backoff: Backoff | None = None,
        window: int = s.DEFAULT_WINDOW,
        connector: Connector | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        ping_interval: float = PING_INTERVAL_S,
        ping_timeout: float = PING_TIMEOUT_S,
        grace: float = GRACE_S,
    ) -> None:
        self.relay_url = relay_url.rstrip("/")
        self.device = device
        self.targets = dict(targets)
        self.tokens = tokens
        self.traffic = traffic
        self.backoff = backoff or Backoff()
        self.window = window
        self.status = AgentStatus(AgentState.STOPPED)
        self.tunnel: Tunnel | None = None
        self.sessions_started = 0
        self.token_renewals = 0
        self._on_status = on_status
        self.connector = connector or Connector()
        self._connect_timeout = connect_timeout
        self._stopping = False
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._connected = asyncio.Event()
        self._auth_waiter: asyncio.Future[int] | None = None
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.grace = grace
        self._session_id = ""
        self._resume_secret = ""

    def __repr__(self) -> str:
        return f"<Agent device={self.device!r} relay={self.relay_url!r} state={self.status.state.value}>"

    # Public API --------------------------------------------------------------

    async def run(self) -> None:
        """Connect and reconnect until ``stop`` is called."""
        self._stopping = False
        watcher = asyncio.ensure_future(self._watch_clock())
        try:
            await self._run_loop()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _watch_clock(self) -> None:
        """Notice the machine waking from sleep and check the link or retry at once."""
        wall, mono = time.time(), time.monotonic()
        while True:
            await asyncio.sleep(CLOCK_CHECK_S)
            new_wall, new_mono = time.time(), time.monotonic()
            jump = (new_wall - wall) - (new_mono - mono)
            wall, mono = new_wall, new_mono
            if jump < CLOCK_JUMP_S:
                continue
            logger.info("the clock jumped %.0f s ahead, so the machine probably slept; checking the connection", jump)
            await self.check_connection("after waking from sleep")

    async def check_connection(self, why: str) -> None:
        """Retry at once if waiting, or ping the relay and drop a link whose pong does not arrive.

        The window calls this when the OS reports that the network came back;
        the clock watcher calls it after sleep.
        """
        self.wake()
        tunnel = self.tunnel
        if tunnel is not None and not tunnel.detached and not tunnel.ended:
            link = tunnel.link
            if not await link.check_alive(self.ping_timeout):
                link.drop(f"no answer to a ping {why}")

    async def _run_loop(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            self._set_status(AgentStatus(AgentState.CONNECTING, f"connecting to {self.relay_url}"))
            delay_floor = 0.0
            try:
                await self._serve_once()
            except asyncio.CancelledError:
                raise
            except SignInError as exc:
                logger.error("%s", exc)
                self._set_status(AgentStatus(AgentState.SIGNED_OUT, str(exc)))
                delay_floor = self.backoff.cap
            except DuplicateDevice as exc:
                logger.error("%s", exc)
                delay_floor = self.backoff.cap
            except Exception as exc:
                self._log_failure(exc)
                if not is_retryable(exc):
                    delay_floor = self.backoff.cap
            if self._stopping:
                break
            if time.monotonic() - started >= STABLE_SESSION_S:
                self.backoff.reset()
            delay = max(self.backoff.next_delay(), delay_floor)
            detail = self.status.detail if self.status.state is AgentState.SIGNED_OUT else f"reconnecting in {delay:.1f} s"
            state = AgentState.SIGNED_OUT if self.status.state is AgentState.SIGNED_OUT else AgentState.WAITING
            self._set_status(AgentStatus(state, detail, retry_at=time.time() + delay))
            await self._sleep(delay)
        self._set_status(AgentStatus(AgentState.STOPPED))

    def wake(self) -> None:
        """Skip the current backoff delay, for example after the network came back."""
        self._wake.set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def stop(self) -> None:
        """Close the tunnel, then cancel connection attempts still running."""
        self._stopping = True
        self._wake.set()
        tunnel = self.tunnel
        if tunnel is not None and not tunnel.ended and tunnel.detached:
            tunnel.abandon("agent is shutting down")
        elif tunnel is not None and not tunnel.ended:
            tunnel.close(CloseCode.GOING_AWAY, "agent is shutting down")
            try:
                await asyncio.wait_for(asyncio.shield(tunnel.link.closed), STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.warning("relay did not finish the closing handshake in %.0f s", STOP_TIMEOUT_S)
                tunnel.link.abort()
        pending = [task for task in self._tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            logger.info("cancelled %d target connection attempts at shutdown", len(pending))

    # One session -------------------------------------------------------------

    async def _serve_once(self) -> None:
        """Connect once, resuming the previous session if one is waiting, and serve until the link closes."""
        previous = self.tunnel if self.tunnel is not None and self.tunnel.detached and not self.tunnel.ended else None
        resume: dict[str, str] = {}
        if previous is not None:
            resume = {
                "Deskbridge-Resume": self._session_id,
                "Deskbridge-Resume-Secret": self._resume_secret,
                "Deskbridge-Received": str(previous.session.received_count),
            }
        link, tokens = await self._open_link(resume)
        headers = link.handshake.result().headers
        self._session_id = headers.get("Deskbridge-Session", "")
        self._resume_secret = headers.get("Deskbridge-Resume-Secret", "")
        link.start_heartbeat(self.ping_interval, self.ping_timeout)

        tunnel = self._resume(previous, link, headers) if previous is not None else None
        if tunnel is None:
            tunnel = await self._start_session(link)
        if tunnel is not None:
            since = time.time()
            self._set_status(AgentStatus(AgentState.CONNECTED, f"connected to {self.relay_url}", connected_since=since))
            self._connected.set()
            renewer = asyncio.ensure_future(self._keep_token_fresh(tunnel, tokens.expires_at))
            try:
                await asyncio.shield(link.closed)
            finally:
                self._connected.clear()
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
        else:
            await asyncio.shield(link.closed)
        self._after_close(link)

    async def _start_session(self, link: WsLink) -> Tunnel | None:
        """Begin a new tunnel session on ``link``; return it once the relay's HELLO arrived."""
        info = {"device": self.device, "targets": sorted(self.targets), "version": __version__}
        session = s.Session(s.Role.AGENT, window=self.window, info=info)
        hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_hello(_hello: s.HelloReceived) -> None:
            if not hello.done():
                hello.set_result(None)

        tunnel = Tunnel(
            session,
            link,
            on_open_request=self._on_open_request,
            on_hello=on_hello,
            on_auth=self._on_auth,
            on_detach=self._on_detach,
            on_end=self._on_tunnel_end,
            grace=self.grace,
            label=f"relay {self.relay_url}",
        )
        self.tunnel = tunnel
        self.sessions_started += 1
        tunnel.flush()
        closed = asyncio.ensure_future(asyncio.shield(link.closed))
        try:
            await asyncio.wait([hello, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not hello.done():
                hello.cancel()
        if hello.cancelled():
            return None
        logger.info("connected to %s as device %r; serving targets %s", self.relay_url, self.device, ", ".join(sorted(self.targets)) or "(none)")
        self._record_session("connected to the relay; new session")
        return tunnel

    def _resume(self, tunnel: Tunnel, link: WsLink, headers: Mapping[str, str]) -> Tunnel | None:
        """Continue ``tunnel`` on ``link`` if the relay agreed; else end its streams and return None."""
        streams = len(tunnel.handlers)
        if headers.get("Deskbridge-Resumed") != "1":
            failure = headers.get("Deskbridge-Resume-Failure", "the relay started a new session")
            logger.warning("the relay could not resume the session (%s); resetting %d streams", failure, streams)
            self._record_session(f"session not resumed: {failure}; {streams} streams reset")
            tunnel.abandon(f"the relay could not resume the session: {failure}")
            return None
        try:
            resent = tunnel.resume_on(link, int(headers.get("Deskbridge-Received", "")))
        except (ValueError, LocalProtocolError) as exc:
            link.close(CloseCode.PROTOCOL_ERROR, "session resumption failed")
            tunnel.abandon(f"the session could not be resumed: {exc}")
            raise ConnectionError(f"the relay's resume response is unusable: {exc}") from None
        logger.info("resumed the session with %s: %d streams kept, %d bytes resent", self.relay_url, streams, resent)
        self._record_session(f"session resumed: {streams} streams kept, {resent} bytes resent")
        return tunnel

    def _on_detach(self, code: int, reason: str) -> None:
        self._record_session(f"connection lost ({reason}); streams kept for {self.grace:g} s")

    def _on_tunnel_end(self, code: int, reason: str) -> None:
        if not self._stopping:
            self._record_session(f"session ended: {reason}")

    def _after_close(self, link: WsLink) -> None:
        """Log why the link closed and raise for closes that need more than a plain retry."""
        code, reason = link.close_code, link.close_reason
        if not self._stopping:
            logger.warning("tunnel to %s closed (code %s): %s", self.relay_url, code, reason or "connection lost")
        if code in (CloseCode.TOKEN_EXPIRED, CloseCode.TOKEN_REJECTED, CloseCode.SIGNED_OUT):
            self.tokens.invalidate()
        if code == CloseCode.SIGNED_OUT:
            raise SignInError("the relay signed this agent out; sign in again with 'deskbridge login'")
        if code == CloseCode.SESSION_REPLACED:
            # A live session was replaced, so another agent uses this device
            # name; reconnecting at once would make the two evict each other.
            raise DuplicateDevice(
                f"another agent connected as device {self.device!r} and replaced this one; "
                "give each computer its own device name (--device)"
            )

    def _record_session(self, detail: str) -> None:
        self._record(TrafficRecord(now(), Kind.SESSION, 0, "", detail=detail))

    def _on_auth(self, event: s.AuthReceived | s.AuthAccepted) -> None:
        waiter = self._auth_waiter
        if isinstance(event, s.AuthAccepted) and waiter is not None and not waiter.done():
            waiter.set_result(event.expires_in)

    async def _keep_token_fresh(self, tunnel: Tunnel, expires_at: float) -> None:
        """Renew the access token on the open session before it expires, for as long as it is open.

        A refresh that fails for a temporary reason (a 5xx response, a time-out,
        a network error) is retried with backoff. Only an explicit rejection
        ends the renewals and marks the agent signed out; the relay then
        closes the session when the current token expires.
        """
        loop = asyncio.get_running_loop()
        while not tunnel.ended:
            await asyncio.sleep(max(0.0, (expires_at - time.time()) * RENEW_AT_FRACTION))
            retry = RENEW_RETRY_BASE_S
            while True:
                try:
                    tokens = await self.tokens.renew()
                    break
                except SignInError as exc:
                    logger.error("renewing the access token was rejected: %s", exc)
                    self._set_status(AgentStatus(AgentState.SIGNED_OUT, f"signed out: sign in again ({exc})"))
                    return
                except (OSError, asyncio.TimeoutError, HandshakeError) as exc:
                    logger.warning("renewing the access token failed (%s); retrying in %.1f s", exc, retry)
                    await asyncio.sleep(retry)
                    retry = min(retry * 2, RENEW_RETRY_CAP_S)
            if tunnel.ended:
                return
            self._auth_waiter = loop.create_future()
            tunnel.session.send_auth(tokens.access_token)
            tunnel.flush()
            try:
                expires_in = await asyncio.wait_for(self._auth_waiter, RENEW_CONFIRM_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.warning("the relay did not confirm the renewed access token within %.0f s", RENEW_CONFIRM_TIMEOUT_S)
                expires_in = int(tokens.expires_at - time.time())
            finally:
                self._auth_waiter = None
            expires_at = time.time() + expires_in
            self.token_renewals += 1
            logger.debug("access token renewed; valid for %d s", expires_in)

    async def _open_link(self, extra_headers: Mapping[str, str]) -> tuple[WsLink, Tokens]:
        url = self.relay_url + AGENT_PATH
        for attempt in range(2):
            tokens = await self.tokens.access_token()
            headers = {"Authorization": f"Bearer {tokens.access_token}", "Deskbridge-Device": self.device, **extra_headers}
            try:
                link = await connect(
                    url,
                    headers,
                    timeout=self._connect_timeout,
                    max_message_size=frames.MAX_MESSAGE_SIZE * 4,
                    connector=self.connector,
                )
                return link, tokens
            except HandshakeError as exc:
                if exc.status != 401:
                    raise
                # The access token may have expired; fetch a new one once.
                self.tokens.invalidate()
                if attempt == 1:
                    raise SignInError(f"the relay rejected this agent's sign-in: {exc.message}") from None
        raise AssertionError("unreachable")

    def _on_open_request(self, tunnel: Tunnel, stream_id: int, name: str) -> None:
        target = self.targets.get(name)
        if target is None:
            reason = f"target {name!r} is not in this agent's allowlist"
            logger.warning("stream %d rejected: %s", stream_id, reason)
            self._record(TrafficRecord(now(), Kind.ERROR, stream_id, name, detail=reason))
            tunnel.reject(stream_id, ErrorCode.UNKNOWN_TARGET, reason)
            return
        bridge = SocketBridge(
            target=name, inbound=Direction.TO_DESKTOP, traffic=self.traffic, label="desktop application", hold_reading=True
        )
        tunnel.attach(stream_id, bridge)
        bridge.bind(tunnel, stream_id)
        task = asyncio.ensure_future(self._connect_stream(tunnel, stream_id, bridge, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_stream(self, tunnel: Tunnel, stream_id: int, bridge: SocketBridge, target: Target) -> None:
        try:
            await connect_target(bridge, target)
        except TargetUnreachable as exc:
            logger.warning("stream %d: %s", stream_id, exc.reason)
            if tunnel.handlers.get(stream_id) is bridge:
                tunnel.reject(stream_id, exc.code, exc.reason)
            bridge.on_open_failed(exc.code, exc.reason)
            return
        if tunnel.handlers.get(stream_id) is not bridge or not tunnel.ready:
            # The cloud side gave up while the local connection was opening.
            if bridge.transport is not None:
                bridge.transport.close()
            return
        tunnel.accept(stream_id, bridge)
        bridge.release()
        logger.debug("stream %d connected to %s", stream_id, target.address)

    # Helpers -----------------------------------------------------------------

    async def _sleep(self, delay: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except asyncio.TimeoutError:
            pass

    def _set_status(self, status: AgentStatus) -> None:
        self.status = status
        if self._on_status is not None:
            self._on_status(status)

    def _record(self, item: TrafficRecord) -> None:
        if self.traffic is not None:
            self.traffic.record(item)

    def _log_failure(self, exc: Exception) -> None:
        if isinstance(exc, HandshakeError):
            logger.warning("relay %s rejected the connection: HTTP %d: %s", self.relay_url, exc.status, exc.message)
        elif isinstance(exc, (TlsFailure, ProxyFailure, ConfigError)):
            logger.error("cannot connect to relay %s: %s", self.relay_url, exc)
        elif isinstance(exc, ssl.SSLError):
            logger.warning("TLS with relay %s failed: %s", self.relay_url, exc)
        elif isinstance(exc, OSError):
            logger.warning("cannot reach relay %s: %s", self.relay_url, describe_os_error(exc))
        elif isinstance(exc, asyncio.TimeoutError):
            logger.warning("connecting to relay %s timed out after %.0f s", self.relay_url, self._connect_timeout)
        else:
            logger.error("connecting to relay %s failed unexpectedly", self.relay_url, exc_info=exc)
