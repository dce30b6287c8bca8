"""HTTP/1.1 front door of the relay: REST calls and WebSocket upgrades on one port.

The websockets library parses only bodiless GET handshakes, and the REST API
needs request bodies, so h11 (a sans-I/O HTTP/1.1 parser) reads every request
first. A request for a WebSocket upgrade is re-serialized and handed
to a websockets ``ServerProtocol``; from then on a ``WsLink`` owns the
transport. Everything else becomes a ``HttpRequest`` for the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11
from websockets.http11 import Request as WsRequest
from websockets.server import ServerProtocol

from app.core.wslink import WsLink

from .limits import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_SEND_TIMEOUT_S,
    ConnectionGate,
    LogThrottle,
    Rejection,
)

logger = logging.getLogger(__name__)

# After an error response the relay reads and discards input for up to this
# long before it closes, so that the client gets the response instead of a
# reset caused by its unread request bytes.
LINGER_S = 1.0


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Limits of one HTTP connection; the defaults are those of the relay's flags."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Time to send a request head and then its body; also the idle time of a
    # keep-alive connection between requests.
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    # Time a client may read none of a pending response before it is dropped.
    send_timeout: float = DEFAULT_SEND_TIMEOUT_S


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    segments: list[str]
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    peer: str = ""
    # Called once the request passed authentication (an API key, an access
    # token or a sign-in), so that the connection no longer counts as pending.
    on_authenticated: Callable[[], None] | None = field(default=None, repr=False)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def mark_authenticated(self) -> None:
        if self.on_authenticated is not None:
            self.on_authenticated()


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


class HttpError(Exception):
    """An error sent as JSON: ``{"error": code, "message": message}``."""

    def __init__(self, status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []

    def response(self) -> HttpResponse:
        return json_response(self.status, {"error": self.code, "message": self.message}, self.headers)


def json_response(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    body = json.dumps(payload, ensure_ascii=False, indent=None).encode() + b"\n"
    return HttpResponse(status, body, "application/json", headers or [])


RequestHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]
UpgradeHandler = Callable[[HttpRequest, WsLink, WsRequest], None]


class HttpFront(asyncio.Protocol):
    """Reads requests with h11 and dispatches them; see the module docstring.

    One request is handled at a time. The connection reads nothing while a
    request is handled and while its response waits in the write buffer above
    the high-water mark. So a client that pipelines requests or reads no
    responses makes the relay keep at most one request and one response.
    """

    def __init__(
        self,
        *,
        on_request: RequestHandler,
        on_upgrade: UpgradeHandler,
        max_message_size: int,
        tasks: set[asyncio.Task[Any]],
        limits: HttpLimits = HttpLimits(),
        gate: ConnectionGate | None = None,
        log: LogThrottle | None = None,
        registry: set["HttpFront"] | None = None,
    ) -> None:
        self._on_request = on_request
        self._on_upgrade = on_upgrade
        self._max_message_size = max_message_size
        self._tasks = tasks
        self._task: asyncio.Task[Any] | None = None
        self._buffered_while_busy = 0
        self._limits = limits
        self._gate = gate
        self._log = log or LogThrottle(logger)
        self._transport: asyncio.Transport | None = None
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._busy = False
        self._peer = ""
        self._address = ""
        self._header_timer: asyncio.TimerHandle | None = None
        # Admitted by the gate and not yet authenticated or closed.
        self._pending = False
        # Input is discarded until the connection closes after an error response.
        self._discarding = False
        self._writing_paused = False
        # A response was written and the next request waits for it to drain.
        self._awaiting_drain = False
        self._send_timer: asyncio.TimerHandle | None = None
        self._unsent = 0
        # Open connections of the server, so that it can abort them on shutdown.
        self._registry = registry if registry is not None else set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._registry.add(self)
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        if self._gate is not None:
            rejection = self._gate.admit(self._address, "the HTTP port")
            if rejection is not None:
                self._reject_connection(rejection)
                return
            self._pending = True
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._conn.receive_data(data)
        if self._busy:
            # h11 keeps what a pipelining client sends meanwhile; stop reading
            # once that exceeds one request head, so it stays bounded.
            self._buffered_while_busy += len(data)
            if self._buffered_while_busy > self._limits.max_header_bytes and self._transport is not None:
                self._transport.pause_reading()
            return
        self._drive()

    def eof_received(self) -> bool:
        if self._discarding:
            return False
        self._conn.receive_data(b"")
        self._drive()
        # Keep the transport open: a client may half-close after its request
        # and still read the response. _drive and _send close it.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        # A client that goes away cancels its request, which ends any
        # stream the request opened.
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._registry.discard(self)
        self._cancel_header_timer()
        self._cancel_send_timer()
        self._release_pending()

    def abort(self) -> None:
        """Drop the connection at once, for example when the server shuts down."""
        if self._transport is not None:
            self._transport.abort()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._cancel_send_timer()
        if self._awaiting_drain:
            self._awaiting_drain = False
            self._next_request()

    def _release_pending(self) -> None:
        if self._pending:
            self._pending = False
            assert self._gate is not None
            self._gate.release()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = asyncio.get_running_loop().call_later(self._limits.header_timeout, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        transport = self._transport
        if transport is None or self._busy or transport.is_closing():
            return
        if self._conn.their_state is h11.IDLE and not self._conn.trailing_data[0]:
            logger.debug("HTTP client %s sent no request for %g s; closing", self._peer, self._limits.header_timeout)
        else:
            self._log.warning(
                ("header timeout", self._address),
                "HTTP client %s sent no complete request in %g s; closing",
                self._peer, self._limits.header_timeout,
            )
        transport.close()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _drive(self) -> None:
        while not self._busy and self._transport is not None and not self._transport.is_closing():
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                if status == 400 and "exceeded" in str(exc):
                    status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
                # h11 hints 501 for a transfer coding other than chunked (RFC 9112, section 6.1).
                code = "not_implemented" if status == HTTPStatus.NOT_IMPLEMENTED else "bad_request"
                self._log.warning(("invalid request", self._address), "invalid HTTP request from %s: %s", self._peer, exc)
                self._send_error_and_close(HttpError(status, code, f"invalid HTTP request: {exc}"))
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                self._request = event
                self._body.clear()
                # h11 checks max_incomplete_event_size only while a head is
                # incomplete, so a large head that arrives in one read passes it.
                if event.http_version not in (b"1.0", b"1.1"):
                    # h11 parses any HTTP/d.d request line.
                    version = event.http_version.decode("ascii", "replace")
                    self._send_error_and_close(HttpError(400, "bad_request", f"HTTP/{version} is not supported; send HTTP/1.1"))
                    return
                head_size = _head_size(event)
                if head_size > self._limits.max_header_bytes:
                    self._send_error_and_close(HttpError(
                        431, "bad_request", f"request head of {head_size} bytes exceeds the limit of {self._limits.max_header_bytes}",
                    ))
                    return
                if _is_websocket_upgrade(event):
                    if _has_body(event):
                        # websockets would fail such a request without any response.
                        self._send_error_and_close(
                            HttpError(400, "invalid_handshake", "a WebSocket handshake request must not have a body")
                        )
                        return
                    self._cancel_header_timer()
                    self._upgrade(event)
                    return
                length = _content_length(event)
                limit = self._limits.max_body_bytes
                if length is not None and length > limit:
                    self._send_error_and_close(
                        HttpError(413, "body_too_large", f"request body of {length} bytes exceeds the limit of {limit}")
                    )
                    return
            elif isinstance(event, h11.Data):
                self._body += event.data
                limit = self._limits.max_body_bytes
                if len(self._body) > limit:
                    self._send_error_and_close(
                        HttpError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
                    )
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
                return
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                if self._transport is not None:
                    self._transport.close()
                return

    def _dispatch(self) -> None:
        assert self._request is not None and self._transport is not None
        self._cancel_header_timer()
        request = _to_http_request(self._request, bytes(self._body), self._peer)
        request.on_authenticated = self._release_pending
        self._body.clear()
        self._busy = True
        # Keep reading while the request runs, so a client that resets the
        # connection cancels it; data_received bounds what is buffered.
        self._buffered_while_busy = 0
        task = asyncio.ensure_future(self._respond(request))
        self._task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respond(self, request: HttpRequest) -> None:
        try:
            response = await self._on_request(request)
        except HttpError as exc:
            response = exc.response()
        except Exception:
            logger.exception("request %s %s from %s failed", request.method, request.path, self._peer)
            response = HttpError(500, "internal_error", "the relay failed to handle this request; see its log").response()
        self._send(response)

    def _send(self, response: HttpResponse) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            *response.headers,
        ]
        # A response to HEAD has the headers of the GET response but no body
        # (RFC 9110, section 9.3.2); h11 raises if one is sent.
        is_head = self._request is not None and self._request.method == b"HEAD"
        try:
            data = self._conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
            if not is_head:
                data += self._conn.send(h11.Data(data=response.body)) or b""
            data += self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            transport.close()
            return
        transport.write(data)
        self._busy = False
        if self._conn.our_state is h11.MUST_CLOSE or self._conn.their_state is not h11.DONE:
            self._close_after_write()
            return
        self._conn.start_next_cycle()
        self._request = None
        if self._writing_paused:
            # The client is not reading; wait for it before taking the next request.
            self._awaiting_drain = True
            self._arm_send_timer()
            return
        self._next_request()

    def _next_request(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.resume_reading()
        self._arm_header_timer()
        self._drive()

    def _close_after_write(self) -> None:
        """Close once the write buffer is sent, dropping a client that stops reading it."""
        transport = self._transport
        assert transport is not None
        if transport.get_write_buffer_size():
            self._arm_send_timer()
        transport.close()

    def _arm_send_timer(self) -> None:
        transport = self._transport
        if self._send_timer is not None or transport is None:
            return
        self._unsent = transport.get_write_buffer_size()
        self._send_timer = asyncio.get_running_loop().call_later(self._limits.send_timeout, self._check_send_progress)

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _check_send_progress(self) -> None:
        """Drop the connection if the client read nothing of the response since the last check."""
        self._send_timer = None
        transport = self._transport
        if transport is None:
            return
        unsent = transport.get_write_buffer_size()
        if unsent == 0:
            return
        if unsent < self._unsent:
            self._arm_send_timer()
            return
        self._log.warning(
            ("send timeout", self._address),
            "HTTP client %s read none of the %d response bytes waiting for it in %g s; dropping the connection",
            self._peer, unsent, self._limits.send_timeout,
        )
        reset_connection(transport)

    def _reject_connection(self, rejection: Rejection) -> None:
        error = HttpError(rejection.status, rejection.code, rejection.message, [("Retry-After", str(rejection.retry_after))])
        self._send_error_and_close(error)

    def _send_error_and_close(self, error: HttpError) -> None:
        transport = self._transport
        if transport is None:
            return
        response = error.response()
        extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
        head = (
            f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(response.body)}\r\n"
            f"{extra}Connection: close\r\n\r\n"
        ).encode()
        transport.write(head + response.body)
        self._linger_close()

    def _linger_close(self) -> None:
        """Half-close after a response, discard input briefly, then close.

        Closing at once while the client's request bytes sit unread makes the
        kernel respond with a reset, which can destroy the response before the
        client reads it.
        """
        transport = self._transport
        assert transport is not None
        self._cancel_header_timer()
        self._discarding = True
        if not transport.can_write_eof():
            self._close_after_write()
            return
        transport.write_eof()
        transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_S, self._close_after_write)

    def _upgrade(self, event: h11.Request) -> None:
        transport = self._transport
        assert transport is not None
        request = _to_http_request(event, b"", self._peer)
        request.on_authenticated = self._release_pending

        # Hand the handshake to websockets: it validates the upgrade headers
        # and builds the 101 response. h11 lower-cases header names, which
        # HTTP allows (RFC 9110, section 5.1).
        raw = bytearray(b"GET " + event.target + b" HTTP/1.1\r\n")
        for name, value in event.headers:
            raw += name + b": " + value + b"\r\n"
        raw += b"\r\n"
        trailing, _closed = self._conn.trailing_data

        protocol = ServerProtocol(max_size=self._max_message_size)
        upgraded: list[WsRequest] = []
        link = WsLink(protocol, max_message_size=self._max_message_size, on_request=lambda _link, ws_request: upgraded.append(ws_request))
        self._busy = True
        # The link owns the transport from here, so this protocol hears of no
        # close any more: count the connection as pending until the link ends.
        link.closed.add_done_callback(lambda _closed: self._release_pending())
        self._registry.discard(self)
        transport.set_protocol(link)
        link.connection_made(transport)
        link.data_received(bytes(raw))
        if not upgraded:
            transport.close()
            return
        link.on_request = None
        self._on_upgrade(request, link, upgraded[0])
        if trailing:
            link.data_received(bytes(trailing))


def reset_connection(transport: asyncio.Transport) -> None:
    """Abort with a TCP reset, so the kernel frees the unsent data at once.

    A plain close leaves the socket to the kernel, which keeps the data that
    the client does not read for minutes while it probes the closed window.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _is_websocket_upgrade(event: h11.Request) -> bool:
    # A WebSocket handshake is a GET (RFC 6455, section 4.1); other methods
    # with an Upgrade header are answered as plain requests.
    if event.method != b"GET":
        return False
    for name, value in event.headers:
        if name == b"upgrade" and value.strip().lower() == b"websocket":
            return True
    return False


def _head_size(event: h11.Request) -> int:
    """Return the size of the request line and headers as sent, give or take whitespace."""
    size = len(event.method) + len(event.target) + len(b"  HTTP/1.1\r\n\r\n")
    for name, value in event.headers.raw_items():
        size += len(name) + len(value) + len(b": \r\n")
    return size


def _has_body(event: h11.Request) -> bool:
    for name, value in event.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _content_length(event: h11.Request) -> int | None:
    for name, value in event.headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _to_http_request(event: h11.Request, body: bytes, peer: str) -> HttpRequest:
    target = event.target.decode("ascii", "replace")
    parts = urlsplit(target)
    segments = [unquote(part) for part in parts.path.split("/") if part]
    query = {key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
    headers: dict[str, str] = {}
    for name, value in event.headers:
        headers[name.decode("latin-1")] = value.decode("latin-1")
    return HttpRequest(event.method.decode("ascii", "replace"), parts.path, segments, query, headers, body, peer)
