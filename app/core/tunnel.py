"""Thin asyncio layer that joins a sans-I/O ``Session`` to a ``WsLink``.

``Tunnel`` turns session events into calls on one ``StreamHandler`` per
stream and flushes queued frames after every command. The agent and the relay
both use it; they differ only in who opens streams and what a handler
connects to (a desktop socket, a cloud socket, a WebSocket, an HTTP request).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from . import session as s
from .frames import CloseCode, ErrorCode
from .wslink import Message, WsLink

logger = logging.getLogger(__name__)


class StreamHandler(Protocol):
    """What a tunnel stream's far end must do; every call runs on the loop."""

    def on_opened(self) -> None: ...

    def on_open_failed(self, code: int, reason: str) -> None: ...

    def on_data(self, data: memoryview) -> None: ...

    def on_end(self) -> None: ...

    def on_reset(self, code: int, reason: str) -> None: ...

    def on_closed(self) -> None: ...

    def on_credit(self) -> None: ...


OpenRequestHandler = Callable[["Tunnel", int, str], None]


class Tunnel:
    """One tunnel session over one WebSocket connection."""

    def __init__(
        self,
        session: s.Session,
        link: WsLink,
        *,
        on_open_request: OpenRequestHandler | None = None,
        on_hello: Callable[[s.HelloReceived], None] | None = None,
        on_end: Callable[[int, str], None] | None = None,
        on_auth: Callable[[s.AuthReceived | s.AuthAccepted], None] | None = None,
        label: str = "tunnel",
    ) -> None:
        self.session = session
        self.link = link
        self.label = label
        self.handlers: dict[int, StreamHandler] = {}
        self.peer_info: dict[str, Any] = {}
        self.ended = False
        self._on_open_request = on_open_request
        self._on_hello = on_hello
        self._on_end = on_end
        self._on_auth = on_auth
        link.on_close = self._on_link_closed
        link.set_message_handler(self._on_message)

    def __repr__(self) -> str:
        return f"<Tunnel {self.label} streams={len(self.handlers)}>"

    @property
    def ready(self) -> bool:
        return self.session.state is s.SessionState.OPEN and not self.ended

    def flush(self) -> None:
        out = self.session.data_to_send()
        if out:
            self.link.send_many(out)

    # Commands ----------------------------------------------------------------

    def open(self, target: str, handler: StreamHandler) -> int:
        sid = self.session.open_stream(target)
        self.handlers[sid] = handler
        self.flush()
        return sid

    def accept(self, stream_id: int, handler: StreamHandler) -> None:
        self.handlers[stream_id] = handler
        self.session.accept_stream(stream_id)
        self.flush()

    def attach(self, stream_id: int, handler: StreamHandler) -> None:
        """Register the handler of a requested stream before accepting it."""
        self.handlers[stream_id] = handler

    def reject(self, stream_id: int, code: int, reason: str) -> None:
        self.handlers.pop(stream_id, None)
        if self.session.is_active(stream_id):
            self.session.reject_stream(stream_id, code, reason)
            self.flush()

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Send data; a result of 0 or less asks the caller to pause reading."""
        credit = self.session.send_data(stream_id, data)
        self.flush()
        return credit

    def can_send(self, stream_id: int) -> bool:
        return self.ready and self.session.can_send(stream_id)

    def send_fin(self, stream_id: int) -> None:
        events = self.session.send_fin(stream_id)
        self.flush()
        self._dispatch(events)

    def reset(self, stream_id: int, code: int, reason: str) -> None:
        self.handlers.pop(stream_id, None)
        if self.session.is_active(stream_id):
            self.session.reset_stream(stream_id, code, reason)
            self.flush()

    def consume(self, stream_id: int, size: int) -> None:
        self.session.consume(stream_id, size)
        self.flush()

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """End the session: reset every stream and start the closing handshake."""
        self.link.close(code, reason)
        self._end(code, reason or "tunnel closed")

    # Input -------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        events = self.session.receive(message)
        self._dispatch(events)
        self.flush()

    def _dispatch(self, events: list[s.Event]) -> None:
        handlers = self.handlers
        for event in events:
            if isinstance(event, s.DataReceived):
                handler = handlers.get(event.stream_id)
                if handler is not None:
                    handler.on_data(event.data)
            elif isinstance(event, s.CreditAvailable):
                handler = handlers.get(event.stream_id)
                if handler is not None:
                    handler.on_credit()
            elif isinstance(event, s.StreamOpenRequested):
                if self._on_open_request is None:
                    self.session.reject_stream(
                        event.stream_id, ErrorCode.UNKNOWN_TARGET, "this side accepts no streams"
                    )
                else:
                    self._on_open_request(self, event.stream_id, event.target)
            elif isinstance(event, s.StreamOpened):
                handler = handlers.get(event.stream_id)
                if handler is not None:
                    handler.on_opened()
            elif isinstance(event, s.StreamOpenFailed):
                handler = handlers.pop(event.stream_id, None)
                if handler is not None:
                    handler.on_open_failed(event.code, event.reason)
            elif isinstance(event, s.StreamEnded):
                handler = handlers.get(event.stream_id)
                if handler is not None:
                    handler.on_end()
            elif isinstance(event, s.StreamClosed):
                handler = handlers.pop(event.stream_id, None)
                if handler is not None:
                    handler.on_closed()
            elif isinstance(event, s.StreamReset):
                handler = handlers.pop(event.stream_id, None)
                if handler is not None:
                    handler.on_reset(event.code, event.reason)
            elif isinstance(event, s.HelloReceived):
                self.peer_info = event.info
                if self._on_hello is not None:
                    self._on_hello(event)
            elif isinstance(event, (s.AuthReceived, s.AuthAccepted)):
                if self._on_auth is not None:
                    self._on_auth(event)
            elif isinstance(event, s.SessionFailed):
                self.link.close(event.close_code, event.reason)
                self._end(event.close_code, event.reason)

    def _on_link_closed(self, code: int, reason: str) -> None:
        self._end(code, reason or "connection lost")

    def _end(self, code: int, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        stream_reason = f"tunnel connection ended: {reason}" if reason else "tunnel connection ended"
        self.session.abort_streams(ErrorCode.SESSION_CLOSED, stream_reason)
        handlers, self.handlers = self.handlers, {}
        for handler in handlers.values():
            try:
                handler.on_reset(ErrorCode.SESSION_CLOSED, stream_reason)
            except Exception:
                logger.exception("%s: stream handler failed while the tunnel ended", self.label)
        if self._on_end is not None:
            self._on_end(code, reason)
