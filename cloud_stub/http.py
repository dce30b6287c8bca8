"""HTTP/1.1 front door of the relay: REST calls and WebSocket upgrades on one port.

The websockets library parses only bodiless GET handshakes, and the REST API
needs request bodies, so h11 (a sans-I/O HTTP/1.1 parser) reads every request
first. A request that asks for a WebSocket upgrade is re-serialized and handed
to a websockets ``ServerProtocol``; from then on a ``WsLink`` owns the
transport. Everything else becomes a ``HttpRequest`` for the router.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11
from websockets.http11 import Request as WsRequest
from websockets.server import ServerProtocol

from app.core.wslink import WsLink

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
# A client must send its request head within this time.
HEADER_TIMEOUT_S = 10.0


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    segments: list[str]
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    peer: str = ""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


class HttpError(Exception):
    """An error answered as JSON: ``{"error": code, "message": message}``."""

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
    """Reads requests with h11 and dispatches them; see the module docstring."""

    def __init__(
        self,
        *,
        on_request: RequestHandler,
        on_upgrade: UpgradeHandler,
        max_message_size: int,
        tasks: set[asyncio.Task[Any]],
    ) -> None:
        self._on_request = on_request
        self._on_upgrade = on_upgrade
        self._max_message_size = max_message_size
        self._tasks = tasks
        self._transport: asyncio.Transport | None = None
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._busy = False
        self._peer = ""
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._header_timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT_S, self._on_header_timeout)

    def data_received(self, data: bytes) -> None:
        self._conn.receive_data(data)
        self._drive()

    def eof_received(self) -> bool:
        self._conn.receive_data(b"")
        self._drive()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()

    def _on_header_timeout(self) -> None:
        if self._transport is not None and self._request is None and not self._busy:
            logger.info("HTTP client %s sent no complete request in %.0f s; closing", self._peer, HEADER_TIMEOUT_S)
            self._transport.abort()

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
                self._send_error_and_close(HttpError(status, "bad_request", f"invalid HTTP request: {exc}"))
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                self._cancel_header_timer()
                self._request = event
                self._body.clear()
                if _is_websocket_upgrade(event):
                    self._upgrade(event)
                    return
                length = _content_length(event)
                if length is not None and length > MAX_BODY_BYTES:
                    self._send_error_and_close(
                        HttpError(413, "body_too_large", f"request body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}")
                    )
                    return
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > MAX_BODY_BYTES:
                    self._send_error_and_close(
                        HttpError(413, "body_too_large", f"request body exceeds the limit of {MAX_BODY_BYTES} bytes")
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
        assert self._request is not None
        request = _to_http_request(self._request, bytes(self._body), self._peer)
        self._busy = True
        task = asyncio.ensure_future(self._respond(request))
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
        try:
            data = self._conn.send(h11.Response(status_code=response.status, headers=headers))
            data = (data or b"") + (self._conn.send(h11.Data(data=response.body)) or b"")
            data += self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            transport.close()
            return
        transport.write(data)
        self._busy = False
        if self._conn.our_state is h11.MUST_CLOSE or self._conn.their_state is not h11.DONE:
            transport.close()
            return
        self._conn.start_next_cycle()
        self._request = None
        self._drive()

    def _send_error_and_close(self, error: HttpError) -> None:
        transport = self._transport
        if transport is None:
            return
        response = error.response()
        head = (
            f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        transport.write(head + response.body)
        transport.close()

    def _upgrade(self, event: h11.Request) -> None:
        transport = self._transport
        assert transport is not None
        request = _to_http_request(event, b"", self._peer)

        # Hand the handshake to websockets: it validates the upgrade headers
        # and builds the 101 answer. h11 lower-cases header names, which
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


def _is_websocket_upgrade(event: h11.Request) -> bool:
    for name, value in event.headers:
        if name == b"upgrade" and value.strip().lower() == b"websocket":
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
