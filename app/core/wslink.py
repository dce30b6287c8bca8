"""asyncio transport glue around the websockets library's sans-I/O protocol.

The agent and the relay both move tunnel frames through ``WsLink``. It is an
``asyncio.Protocol`` that feeds received bytes to a ``websockets`` protocol
object and writes out what that object returns, with no coroutine per message:
a binary message is handed to ``on_message`` from ``data_received``, and
``send`` writes a frame straight to the transport. This keeps the hot path to
plain callbacks, which matters because the tunnel's throughput is bounded by
per-message overhead in Python, not by framing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Iterable

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from .errors import HandshakeError
from .frames import CloseCode
from .net import Connector

logger = logging.getLogger(__name__)

# How long to wait for the peer to finish the closing handshake before the
# TCP connection is dropped.
CLOSE_TIMEOUT_S = 5.0

# websockets types Frame.data as any of these. At runtime an unmasked frame
# (relay to agent) arrives as bytearray and a masked one as bytes.
Message = bytes | bytearray | memoryview
MessageHandler = Callable[[Message], None]
CloseHandler = Callable[[int, str], None]


class WsLink(asyncio.Protocol):
    """One WebSocket connection driven by callbacks; see the module docstring."""

    def __init__(
        self,
        protocol: ClientProtocol | ServerProtocol,
        *,
        max_message_size: int,
        on_request: Callable[["WsLink", Request], None] | None = None,
    ) -> None:
        self.protocol = protocol
        self.transport: asyncio.Transport | None = None
        # Messages that arrive before a handler is set (the server's first
        # frames often come in the same read as its 101 answer) wait here.
        self._early: list[Message] = []
        self.on_message: MessageHandler = self._early.append
        self.on_close: CloseHandler = _ignore_close
        self.on_request = on_request
        # Called when the transport's write buffer drains below its low-water mark.
        self.on_writable: Callable[[], None] | None = None
        self.handshake: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self._max_message_size = max_message_size
        self._fragments: list[Message] = []
        self._fragments_size = 0
        self._close_timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    # asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._write_pending()

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self.protocol.receive_eof()
        self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for waiter in self._pings.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("connection closed"))
                # Mark it retrieved in case no check is waiting on it any more.
                waiter.exception()
        if self.protocol.state is not State.CLOSED:
            self.protocol.state = State.CLOSED
        sent, received = self.protocol.close_sent, self.protocol.close_rcvd
        if self.close_code is None and sent is not None and received is None:
            # The websockets protocol failed the connection on its own, for
            # example on a message over the size limit, so report the code it sent.
            self.close_code, self.close_reason = sent.code, sent.reason
        code = self.protocol.close_code if self.protocol.close_code is not None else 1006
        reason = self.protocol.close_reason or (str(exc) if exc else "")
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        if not self.handshake.done():
            self.handshake.set_exception(
                ConnectionError(f"connection closed during the WebSocket handshake: {reason or 'EOF'}")
            )
            # Nobody may be waiting for it any more; mark it retrieved.
            self.handshake.exception()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        self.on_close(self.close_code, self.close_reason)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self.on_writable is not None:
            self.on_writable()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # Sending ---------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.protocol.state is State.OPEN and self.transport is not None

    def send(self, message: bytes) -> None:
        if self.protocol.state is not State.OPEN:
            return
        self.protocol.send_binary(message)
        self._write_pending()

    def send_many(self, messages: Iterable[bytes]) -> None:
        if self.protocol.state is not State.OPEN:
            return
        for message in messages:
            self.protocol.send_binary(message)
        self._write_pending()

    def ping(self, payload: bytes) -> None:
        if self.protocol.state is State.OPEN:
            self.protocol.send_ping(payload)
            self._write_pending()

    def set_message_handler(self, handler: MessageHandler) -> None:
        """Route messages to ``handler``, first replaying any that arrived early."""
        self.on_message = handler
        early, self._early = self._early, []
        for message in early:
            handler(message)

    def set_max_message_size(self, size: int) -> None:
        self.protocol.max_message_size = size
        self._max_message_size = size

    @property
    def writing_paused(self) -> bool:
        return self._paused

    def pause_reading(self) -> None:
        if self.transport is not None and self.transport.is_reading():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self.transport.is_reading():
            self.transport.resume_reading()

    # Liveness ----------------------------------------------------------------

    def start_heartbeat(self, interval: float, timeout: float) -> None:
        """Ping every ``interval`` seconds and drop the connection if a pong takes over ``timeout``.

        A link that died without a FIN or RST (a sleeping laptop, a middlebox
        that forgot the connection) is then detected in at most
        ``interval + timeout`` seconds.
        """
        if self._heartbeat is None:
            self._heartbeat = asyncio.ensure_future(self._beat(interval, timeout))

    async def _beat(self, interval: float, timeout: float) -> None:
        while self.is_open:
            await asyncio.sleep(interval)
            if not self.is_open:
                return
            if not await self.check_alive(timeout):
                self.drop(f"no answer to a heartbeat ping within {timeout:g} s")
                return

    async def check_alive(self, timeout: float) -> bool:
        """Send a ping and tell whether its pong came back within ``timeout`` seconds."""
        if not self.is_open:
            return False
        payload = os.urandom(8)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[payload] = waiter
        self.ping(payload)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
            return True
        except (asyncio.TimeoutError, ConnectionError):
            return False
        finally:
            self._pings.pop(payload, None)

    def drop(self, reason: str) -> None:
        """Abort a connection that is considered dead; it closes with code 1006."""
        logger.warning("dropping the WebSocket connection: %s", reason)
        if self.close_code is None:
            self.close_code, self.close_reason = 1006, reason
        self.abort()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if not self._paused or self.transport is None or self.transport.is_closing():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake; the TCP connection ends shortly after."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason[:120])
            self._write_pending()
            self._arm_close_timer()
        elif self.transport is not None and self.protocol.state is State.CONNECTING:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # Server handshake --------------------------------------------------------

    def respond(self, response: Response) -> None:
        """Send the server's handshake answer (101 to accept, anything else to reject)."""
        assert isinstance(self.protocol, ServerProtocol)
        self.protocol.send_response(response)
        self._write_pending()
        if response.status_code == 101:
            if not self.handshake.done():
                self.handshake.set_result(response)
        else:
            self._arm_close_timer()

    # Internals ---------------------------------------------------------------

    def _process(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self._on_frame(event)
            elif isinstance(event, Response):
                self._on_response(event)
            elif isinstance(event, Request):
                if self.on_request is not None:
                    self.on_request(self, event)
        self._write_pending()
        if self.protocol.close_expected():
            self._arm_close_timer()

    def _on_response(self, response: Response) -> None:
        if self.handshake.done():
            return
        exc = self.protocol.handshake_exc
        if exc is None:
            self.handshake.set_result(response)
        else:
            error = _HandshakeFailed(response)
            error.__cause__ = exc
            self.handshake.set_exception(error)

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.BINARY:
            if frame.fin:
                self.on_message(frame.data)
            else:
                self._fragments = [frame.data]
                self._fragments_size = len(frame.data)
        elif opcode is Opcode.CONT:
            self._fragments.append(frame.data)
            self._fragments_size += len(frame.data)
            if self._fragments_size > self._max_message_size:
                self._fail(CloseCode.MESSAGE_TOO_BIG, "fragmented message is too big")
            elif frame.fin:
                message = b"".join(self._fragments)
                self._fragments = []
                self._fragments_size = 0
                self.on_message(message)
        elif opcode is Opcode.TEXT:
            self._fail(CloseCode.UNSUPPORTED_DATA, "text messages are not supported; send binary")
        elif opcode is Opcode.PONG:
            waiter = self._pings.get(bytes(frame.data))
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif opcode is Opcode.CLOSE:
            if self.close_code is None:
                close = self.protocol.close_rcvd
                self.close_code = close.code if close is not None else 1005
                self.close_reason = close.reason if close is not None else ""

    def _fail(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.protocol.fail(code, reason)
        self._write_pending()
        self._arm_close_timer()

    def _write_pending(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.protocol.data_to_send():
            if data is SEND_EOF or data == b"":
                if transport.can_write_eof():
                    transport.write_eof()
            else:
                transport.write(data)
        if self.protocol.state is State.CLOSED:
            transport.close()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and self.transport is not None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT_S, self._close_timeout)

    def _close_timeout(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            logger.debug("closing handshake timed out; dropping the TCP connection")
            self.transport.abort()


class _HandshakeFailed(Exception):
    """The server answered the handshake with something other than 101."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def handshake_failure_response(exc: BaseException) -> Response | None:
    """Return the server's HTTP response if ``exc`` is a failed handshake."""
    if isinstance(exc, _HandshakeFailed):
        return exc.response
    return None


def _ignore_close(code: int, reason: str) -> None:
    pass



async def connect(
    url: str,
    headers: dict[str, str],
    *,
    timeout: float,
    max_message_size: int,
    connector: Connector | None = None,
) -> WsLink:
    """Open a WebSocket to ``url`` and return the link once the handshake succeeded.

    Raises HandshakeError when the server answers with an HTTP error,
    TlsFailure or ProxyFailure for a rejected certificate or proxy, and
    OSError or TimeoutError when the relay cannot be reached.
    """
    uri = parse_uri(url)
    protocol = ClientProtocol(uri, max_size=max_message_size)
    link = WsLink(protocol, max_message_size=max_message_size)
    connector = connector or Connector()

    async def open_and_handshake() -> None:
        await connector.open(lambda: link, url, timeout)
        request = protocol.connect()
        for name, value in headers.items():
            request.headers[name] = value
        protocol.send_request(request)
        link._write_pending()
        await link.handshake

    try:
        await asyncio.wait_for(open_and_handshake(), timeout)
    except _HandshakeFailed as exc:
        link.abort()
        raise HandshakeError(exc.response.status_code, _error_message(exc.response)) from None
    except BaseException:
        link.abort()
        raise
    return link


def _error_message(response: Response) -> str:
    body = bytes(response.body)
    try:
        payload = json.loads(body.decode("utf-8"))
        message = payload.get("message") if isinstance(payload, dict) else None
        if isinstance(message, str):
            return message
    except (UnicodeDecodeError, ValueError):
        pass
    text = body.decode("utf-8", "replace").strip()
    return text[:300] or response.reason_phrase
