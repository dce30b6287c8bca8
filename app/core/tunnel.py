"""Thin asyncio layer that joins a sans-I/O ``Session`` to a ``WsLink``.

``Tunnel`` turns session events into calls on one ``StreamHandler`` per
stream and flushes queued frames after every command. The agent and the relay
both use it; they differ only in who opens streams and what a handler
connects to (a desktop socket, a cloud socket, a WebSocket, an HTTP request).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from . import session as s
from .frames import CloseCode, ErrorCode
from .wslink import Message, WsLink

logger = logging.getLogger(__name__)


class StreamHandler(Protocol):
    """Interface of a tunnel stream's far end; every call runs on the event loop."""

    def on_opened(self) -> None: ...

    def on_open_failed(self, code: int, reason: str) -> None: ...

    def on_data(self, data: memoryview) -> None: ...

    def on_end(self) -> None: ...

    def on_reset(self, code: int, reason: str) -> None: ...

    def on_closed(self) -> None: ...

    def on_credit(self) -> None: ...


OpenRequestHandler = Callable[["Tunnel", int, str], None]


# How long received messages may wait for an acknowledgement when input goes
# quiet; busy sessions acknowledge every few messages anyway.
ACK_DELAY_S = 0.1

# The close code of a connection that ended without a closing handshake:
# the network failed or a heartbeat gave up. Only these sessions are kept for
# resumption; a deliberate close (shutdown, replacement, protocol error, sign-out)
# ends the session.
CONNECTION_LOST = 1006


class Tunnel:
    """One tunnel session over a WebSocket connection, resumable on a new one.

    With a ``grace`` period above 0, losing a connection without a closing
    handshake only detaches the tunnel. Streams and their sockets stay open,
    new frames wait in the session's resend log, and ``resume_on`` continues
    on a new connection. If no new connection comes within the grace
    period, every stream is reset.
    """

    def __init__(
        self,
        session: s.Session,
        link: WsLink,
        *,
        on_open_request: OpenRequestHandler | None = None,
        on_hello: Callable[[s.HelloReceived], None] | None = None,
        on_end: Callable[[int, str], None] | None = None,
        on_auth: Callable[[s.AuthReceived | s.AuthAccepted], None] | None = None,
        on_detach: Callable[[int, str], None] | None = None,
        grace: float = 0.0,
        label: str = "tunnel",
        buffer_limit: int = 0,
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
        self._on_detach = on_detach
        self.grace = grace
        # Largest resend log, in bytes, before the session is closed; 0 turns the check off.
        self.buffer_limit = buffer_limit
        self._over_limit = False
        self.detached = False
        self.resumes = 0
        self.bytes_resent = 0
        self._grace_timer: asyncio.TimerHandle | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        self._hook(link)

    def _hook(self, link: WsLink) -> None:
        link.on_close = lambda code, reason: self._on_link_closed(link, code, reason)
        link.set_message_handler(self._on_message)

    def __repr__(self) -> str:
        return f"<Tunnel {self.label} streams={len(self.handlers)}>"

    @property
    def ready(self) -> bool:
        return self.session.state is s.SessionState.OPEN and not self.ended

    def flush(self) -> None:
        out = self.session.data_to_send()
        if out and not self.detached:
            self.link.send_many(out)
        if self.buffer_limit and self.session.unacked_bytes > self.buffer_limit and not self._over_limit:
            # Close from the event loop: flush runs inside stream handlers,
            # which must not see the tunnel end under them.
            self._over_limit = True
            asyncio.get_running_loop().call_soon(self._close_over_limit)

    def _close_over_limit(self) -> None:
        size = self.session.unacked_bytes
        logger.warning(
            "%s: the peer has not acknowledged %d bytes, above the limit of %d; closing the session",
            self.label, size, self.buffer_limit,
        )
        self.close(
            CloseCode.POLICY_VIOLATION,
            f"{size} bytes sent and not acknowledged, above the relay's limit of {self.buffer_limit}",
        )

    # Resumption --------------------------------------------------------------

    def resume_on(self, link: WsLink, peer_received: int) -> int:
        """Continue the session on a new connection; return the stream bytes resent.

        Raises LocalProtocolError when the peer's count cannot be served from
        the resend log; the session must then be ended.
        """
        old = self.link
        if old is not link and not old.closed.done():
            # The old connection may still look open here (a half-open TCP
            # connection); it must not detach or end anything when it closes.
            old.on_close = _ignore_close
            old.drop("replaced by a resumed connection")
        resent = self.session.resume(peer_received)
        self.link = link
        self.detached = False
        self.resumes += 1
        self.bytes_resent += resent
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        # Resend before handling messages that already arrived on the new
        # link, because handling them may queue new frames behind the resent ones.
        self.flush()
        self._hook(link)
        return resent

    def _detach(self, code: int, reason: str) -> None:
        self.detached = True
        self.session.detach()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        loop = asyncio.get_running_loop()
        self._grace_timer = loop.call_later(self.grace, self._grace_expired)
        logger.info("%s: connection lost (%s); keeping %d streams open for %g s", self.label, reason, len(self.handlers), self.grace)
        if self._on_detach is not None:
            self._on_detach(code, reason)

    def abandon(self, reason: str) -> None:
        """End a detached session for good, resetting its streams with ``reason``."""
        self._end(CONNECTION_LOST, reason)

    def _grace_expired(self) -> None:
        self._grace_timer = None
        reason = f"the tunnel was down for longer than the grace period of {self.grace:g} s"
        logger.warning("%s: %s; resetting %d streams", self.label, reason, len(self.handlers))
        self._end(CONNECTION_LOST, reason)

    def _send_ack(self) -> None:
        self._ack_timer = None
        if not self.ended and not self.detached:
            self.session.send_ack()
            self.flush()

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
        """Send data; a result of 0 or less means the caller should pause reading."""
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
        try:
            self._dispatch(events)
        except Exception:
            # Let through, the error would fail the WebSocket transport (1006),
            # and a resumed session would replay the same frame into the same bug.
            logger.exception("%s: a stream handler failed; ending the session", self.label)
            self.close(CloseCode.INTERNAL_ERROR, "internal error while handling a tunnel frame")
            return
        self.flush()
        if self.session.ack_pending and self._ack_timer is None and not self.ended:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY_S, self._send_ack)

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

    def _on_link_closed(self, link: WsLink, code: int, reason: str) -> None:
        if self.ended or link is not self.link:
            return
        if self.grace > 0 and code == CONNECTION_LOST and self.session.state is s.SessionState.OPEN:
            self._detach(code, reason or "connection lost")
            return
        self._end(code, reason or "connection lost")

    def _end(self, code: int, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        for timer in (self._grace_timer, self._ack_timer):
            if timer is not None:
                timer.cancel()
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


def _ignore_close(code: int, reason: str) -> None:
    pass
