"""Cloud-side ends of tunnel streams that are not plain TCP sockets.

``WebSocketStream`` carries a cloud client's raw binary WebSocket, and
``Exchange`` runs one REST request/reply. ``Drain`` takes over a stream whose
cloud end went away after sending FIN: it discards what the desktop side
still sends, granting credit back, until that side finishes too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from websockets.http11 import Request as WsRequest
from websockets.server import ServerProtocol

from app.core.frames import CloseCode, ErrorCode
from app.core.tunnel import Tunnel
from app.core.wslink import Message, WsLink

logger = logging.getLogger(__name__)

# How long a drained stream may stay open before it is reset.
DRAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class OpenFailure:
    """Report of a failed stream open to a cloud client: HTTP status, error code and message."""

    status: int
    code: str
    message: str


def describe_open_failure(code: int, reason: str, target: str) -> OpenFailure:
    if code == ErrorCode.UNKNOWN_TARGET:
        return OpenFailure(404, "unknown_target", reason or f"the agent has no target named {target!r}")
    if code == ErrorCode.CONNECTION_REFUSED:
        return OpenFailure(502, "target_refused", reason or f"target {target!r} refused the connection")
    if code == ErrorCode.CONNECT_TIMEOUT:
        return OpenFailure(504, "timed_out", reason or f"connecting to target {target!r} timed out")
    if code == ErrorCode.LIMIT_EXCEEDED:
        return OpenFailure(429, "limit_exceeded", reason)
    if code == ErrorCode.SESSION_CLOSED:
        return OpenFailure(503, "agent_offline", reason or "the agent disconnected")
    return OpenFailure(502, "target_unreachable", reason or f"target {target!r} could not be reached")


class Drain:
    """Discards the rest of a stream whose cloud end has gone."""

    def __init__(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id
        self.bytes_to_desktop = 0
        self.bytes_to_cloud = 0
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(DRAIN_TIMEOUT_S, self._expire)

    def _expire(self) -> None:
        self.tunnel.reset(self.stream_id, ErrorCode.CANCELLED, "cloud client went away")

    def on_opened(self) -> None:
        pass

    def on_open_failed(self, code: int, reason: str) -> None:
        self._timer.cancel()

    def on_data(self, data: memoryview) -> None:
        self.tunnel.consume(self.stream_id, len(data))

    def on_end(self) -> None:
        pass

    def on_reset(self, code: int, reason: str) -> None:
        self._timer.cancel()

    def on_closed(self) -> None:
        self._timer.cancel()

    def on_credit(self) -> None:
        pass


def finish_stream(tunnel: Tunnel, stream_id: int) -> None:
    """End the cloud side of a stream politely: FIN, then drain the rest."""
    if not tunnel.session.is_active(stream_id):
        return
    drain = Drain(tunnel, stream_id)
    tunnel.attach(stream_id, drain)
    if tunnel.can_send(stream_id):
        tunnel.send_fin(stream_id)


class WebSocketStream:
    """A cloud client's binary WebSocket joined to one tunnel stream.

    Each binary message from the client becomes stream data and each chunk
    from the desktop becomes one binary message. WebSocket has no half-close,
    so the desktop side's FIN closes the WebSocket with code 1000 once
    everything before it was sent, and the client's close sends FIN.
    """

    def __init__(self, link: WsLink, request: WsRequest, target: str, on_done: Callable[["WebSocketStream"], None]) -> None:
        self.link = link
        self.request = request
        self.target = target
        self.tunnel: Tunnel | None = None
        self.stream_id = 0
        self.bytes_to_desktop = 0
        self.bytes_to_cloud = 0
        self._unconsumed = 0
        self._on_done = on_done
        self._finished = False
        link.set_message_handler(self._on_client_message)
        link.on_close = self._on_client_close
        link.on_writable = self._on_writable
        # Until the stream opens there is nowhere to send data, and the
        # websockets parser would buffer whatever the client sends.
        link.pause_reading()

    def bind(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id

    def reject(self, failure: OpenFailure) -> None:
        import json

        protocol = self.link.protocol
        assert isinstance(protocol, ServerProtocol)
        response = protocol.reject(failure.status, json.dumps({"error": failure.code, "message": failure.message}) + "\n")
        # Assigning to websockets Headers appends, so drop reject()'s text/plain first.
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        self.link.respond(response)
        # Read again so that the client's close is seen without waiting for the close timer.
        self.link.resume_reading()
        self._finish()

    # Tunnel side ---------------------------------------------------------------

    def on_opened(self) -> None:
        protocol = self.link.protocol
        assert isinstance(protocol, ServerProtocol)
        self.link.respond(protocol.accept(self.request))
        self.link.resume_reading()

    def on_open_failed(self, code: int, reason: str) -> None:
        self.reject(describe_open_failure(code, reason, self.target))

    def on_data(self, data: memoryview) -> None:
        size = len(data)
        self.bytes_to_cloud += size
        self.link.send(bytes(data))
        assert self.tunnel is not None
        if self.link.writing_paused:
            self._unconsumed += size
        else:
            self.tunnel.consume(self.stream_id, size)

    def on_end(self) -> None:
        self.link.close(CloseCode.NORMAL, "target closed the stream")

    def on_reset(self, code: int, reason: str) -> None:
        self.link.close(CloseCode.INTERNAL_ERROR, f"stream reset: {reason}")
        self._finish()

    def on_closed(self) -> None:
        self.link.close(CloseCode.NORMAL, "stream closed")
        self._finish()

    def on_credit(self) -> None:
        self.link.resume_reading()

    # Client side ---------------------------------------------------------------

    def _on_client_message(self, message: Message) -> None:
        tunnel = self.tunnel
        if tunnel is None or not message or not tunnel.can_send(self.stream_id):
            return
        self.bytes_to_desktop += len(message)
        if tunnel.send_data(self.stream_id, message) <= 0:
            self.link.pause_reading()

    def _on_client_close(self, code: int, reason: str) -> None:
        tunnel = self.tunnel
        if tunnel is not None and tunnel.handlers.get(self.stream_id) is self:
            finish_stream(tunnel, self.stream_id)
        self._finish()

    def _on_writable(self) -> None:
        if self._unconsumed and self.tunnel is not None:
            size, self._unconsumed = self._unconsumed, 0
            self.tunnel.consume(self.stream_id, size)

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._on_done(self)


class ExchangeError(Exception):
    def __init__(self, failure: OpenFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class Exchange:
    """One request/reply over a fresh stream, for the REST exchange call.

    The reply ends at the first newline (``until="newline"``), after
    ``count`` bytes (``until="bytes"``), after ``idle`` seconds without data
    (``until="idle"``) or when the target closes its side (``until="eof"``).
    """

    def __init__(self, target: str, *, until: str, count: int, idle: float, max_reply: int) -> None:
        self.target = target
        self.until = until
        self.count = count
        self.idle = idle
        self.max_reply = max_reply
        self.tunnel: Tunnel | None = None
        self.stream_id = 0
        self.reply = bytearray()
        self.bytes_to_desktop = 0
        self.bytes_to_cloud = 0
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[bytes] = loop.create_future()
        self._idle_timer: asyncio.TimerHandle | None = None

    def bind(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id

    def on_opened(self) -> None:
        if not self.opened.done():
            self.opened.set_result(None)
        if self.until == "idle":
            self._arm_idle()

    def on_open_failed(self, code: int, reason: str) -> None:
        self._fail(describe_open_failure(code, reason, self.target))

    def on_data(self, data: memoryview) -> None:
        assert self.tunnel is not None
        self.bytes_to_cloud += len(data)
        self.tunnel.consume(self.stream_id, len(data))
        if self.done.done():
            return
        self.reply += data
        if self.until == "newline":
            end = self.reply.find(b"\n")
            if end >= 0:
                self._complete(bytes(self.reply[: end + 1]))
                return
        elif self.until == "bytes" and len(self.reply) >= self.count:
            self._complete(bytes(self.reply[: self.count]))
            return
        if len(self.reply) > self.max_reply:
            self._fail(OpenFailure(502, "reply_too_large", f"the reply exceeded {self.max_reply} bytes; ask for fewer with until=bytes"))
            return
        if self.until == "idle":
            self._arm_idle()

    def on_end(self) -> None:
        if self.until in ("eof", "idle"):
            self._complete(bytes(self.reply))
        elif not self.done.done():
            self._fail(OpenFailure(502, "target_closed", f"the target closed the connection after {len(self.reply)} bytes, before the reply was complete"))

    def on_reset(self, code: int, reason: str) -> None:
        if not self.done.done():
            if not self.opened.done():
                self._fail(describe_open_failure(code, reason, self.target))
            else:
                self._fail(OpenFailure(502, "stream_reset", f"the stream was reset: {reason}"))

    def on_closed(self) -> None:
        self.on_end()

    def on_credit(self) -> None:
        pass

    def _arm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(self.idle, self._on_idle)

    def _on_idle(self) -> None:
        self._complete(bytes(self.reply))

    def _complete(self, reply: bytes) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if not self.done.done():
            self.done.set_result(reply)
        if not self.opened.done():
            self.opened.set_result(None)

    def _fail(self, failure: OpenFailure) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if not self.opened.done():
            self.opened.set_exception(ExchangeError(failure))
            self.opened.exception()
        if not self.done.done():
            self.done.set_exception(ExchangeError(failure))
            self.done.exception()
