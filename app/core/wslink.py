"""asyncio transport glue around the websockets library's sans-I/O protocol.

The agent and the relay both move tunnel frames through ``WsLink``, an
``asyncio.BufferedProtocol`` driven by callbacks with no coroutine per
message: a binary message is handed to ``on_message`` as soon as it is parsed,
and ``send_many`` writes frames to the transport by the end of the event loop
iteration (see ``_start_cork``). This keeps the hot path to plain callbacks,
which matters because per-message overhead in Python is a large part of the
tunnel's cost.

The ``websockets`` library's sans-I/O protocol object runs the opening
handshake, pings, the closing handshake and every error case. Binary
messages, which carry all tunnel traffic, are framed and parsed here instead,
because the library's parser copies each payload twice through its buffer and
builds several objects per frame. Every other frame (control frames,
fragmented or oversized messages, anything invalid) goes to the library
whole, so the library receives a sequence of complete frames and applies its
own checks and state changes to them.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterable

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import SEND_EOF, Side, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets installed without its C extension
    from websockets.utils import apply_mask

from .errors import HandshakeError
from .frames import CloseCode
from .net import Connector

logger = logging.getLogger(__name__)

# How long to wait for the peer to finish the closing handshake before the
# TCP connection is dropped.
CLOSE_TIMEOUT_S = 5.0

# WebSocket frame header fields (RFC 6455, section 5.2), for binary messages
# framed here instead of by the websockets library.
_FIN_BINARY = 0x82  # FIN set, reserved bits clear, opcode 2 (binary)
_MASKED = 0x80
_HEADER_7 = struct.Struct("!BB")
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
# Largest write made by joining small frames, which then cost one system call.
JOIN_BYTES = 64 * 1024
_MAX_HEADER = 14
# Masking keys are sliced from os.urandom output fetched this many bytes at a
# time, one system call per 1024 frames. RFC 6455 (section 5.3) requires keys
# that a peer cannot predict, which holds for any slice of that output.
_MASK_KEY_POOL = 4096
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
# Size of one socket read.
RECEIVE_SIZE = 256 * 1024

_receive_buffers = threading.local()


def _shared_receive_buffer() -> memoryview:
    """Return the receive buffer of the calling thread's links.

    Sharing is safe because asyncio fills the buffer and calls
    ``buffer_updated`` with no other callback in between, and the parser
    copies whatever it keeps.
    """
    view: memoryview | None = getattr(_receive_buffers, "view", None)
    if view is None:
        view = _receive_buffers.view = memoryview(bytearray(RECEIVE_SIZE))
    return view

# Received messages are bytes or bytearray objects that the handler may keep;
# memoryview is accepted for sending.
Message = bytes | bytearray | memoryview
MessageHandler = Callable[[Message], None]
CloseHandler = Callable[[int, str], None]


class WsLink(asyncio.BufferedProtocol):
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
        # frames often come in the same read as its 101 response) wait here.
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
        # Bytes that may wait in the transport's write buffer before the peer
        # counts as not reading and the connection is dropped; 0 means no limit.
        self.max_write_buffer = 0
        self._fragments: list[Message] = []
        self._fragments_size = 0
        # Receiving: the library parses everything until the handshake is
        # done, then frames are parsed here (see _parse) unless the library
        # already received bytes past the handshake.
        self._receive_view = _shared_receive_buffer()
        self._expect_masked = protocol.side is Side.SERVER
        self._head_seen = False
        self._head_tail = b""
        self._parsing = False
        self._library_only = False
        # A frame split across reads: its header, or its header and payload so far.
        self._header = bytearray()
        self._body: bytearray | None = None
        self._body_filled = 0
        self._frame_head = b""
        self._frame_key: bytes | None = None
        self._frame_fast = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._loop = asyncio.get_running_loop()
        # Frames that wait until the end of this event loop iteration, to go
        # out in one system call; see _start_cork.
        self._corked = False
        self._cork: list[bytes] = []
        self._cork_size = 0
        self._eof_written = False
        self._mask_keys = b""
        self._mask_key_offset = 0
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    # asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._write_pending()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._receive_view

    def buffer_updated(self, nbytes: int) -> None:
        self._receive(self._receive_view[:nbytes])

    def data_received(self, data: bytes | bytearray) -> None:
        """Process received bytes; the relay's HTTP front passes the handshake request here."""
        self._receive(memoryview(data))

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
            # No caller may wait for it any more, so mark it retrieved.
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
        self.send_many((message,))

    def send_many(self, messages: Iterable[bytes]) -> None:
        """Send each message as one binary frame."""
        protocol = self.protocol
        if protocol.state is not State.OPEN:
            return
        if protocol.extensions:
            for message in messages:
                protocol.send_binary(message)
            self._write_pending()
            return
        # Framing here does what protocol.send_binary does for a connection
        # without extensions, minus its per-frame objects and copies.
        masked = protocol.side is Side.CLIENT
        mask_bit = _MASKED if masked else 0
        started = self._start_cork()
        for message in messages:
            length = len(message)
            if length < 126:
                head = _HEADER_7.pack(_FIN_BINARY, mask_bit | length)
            elif length < 65536:
                head = _HEADER_16.pack(_FIN_BINARY, mask_bit | 126, length)
            else:
                head = _HEADER_64.pack(_FIN_BINARY, mask_bit | 127, length)
            if masked:
                key = self._mask_key()
                self._write(head + key + apply_mask(message, key))
            else:
                self._write(head + message)
        if started:
            self._flush_cork()

    def _mask_key(self) -> bytes:
        offset = self._mask_key_offset
        if offset >= len(self._mask_keys):
            self._mask_keys = os.urandom(_MASK_KEY_POOL)
            offset = 0
        self._mask_key_offset = offset + 4
        return self._mask_keys[offset : offset + 4]

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
        """Send the server's handshake response (101 to accept, anything else to reject)."""
        assert isinstance(self.protocol, ServerProtocol)
        self.protocol.send_response(response)
        self._write_pending()
        if response.status_code == 101:
            self._start_parsing()
            if not self.handshake.done():
                self.handshake.set_result(response)
        else:
            self._arm_close_timer()

    # Receiving ---------------------------------------------------------------

    def _receive(self, data: memoryview) -> None:
        if self._parsing:
            self._parse(data)
        elif self._head_seen or self.protocol.state is not State.CONNECTING:
            self._feed_library(data)
        else:
            self._receive_handshake(data)

    def _receive_handshake(self, data: memoryview) -> None:
        """Feed the library the handshake up to the end of the HTTP head, then parse frames here if it succeeded.

        The library consumes exactly the head of a 101 response or of a
        request, so it stops at a frame boundary with nothing buffered, and
        the frames after the head can be parsed here.
        """
        window = self._head_tail + bytes(data)
        end = window.find(b"\r\n\r\n")
        if end < 0:
            self._head_tail = window[-3:]
            self.protocol.receive_data(bytes(data))
            self._process()
            return
        cut = end + 4 - len(self._head_tail)
        self._head_seen = True
        self.protocol.receive_data(bytes(data[:cut]))
        self._process()
        self._start_parsing()
        if cut < len(data):
            self._receive(data[cut:])

    def _start_parsing(self) -> None:
        protocol = self.protocol
        if self._head_seen and not self._library_only and protocol.state is State.OPEN and not protocol.extensions:
            self._parsing = True

    def _feed_library(self, data: memoryview) -> None:
        """Let the library parse ``data`` and everything received after it."""
        self._parsing = False
        self._library_only = True
        self.protocol.receive_data(bytes(data))
        self._process()

    def _parse(self, data: memoryview) -> None:
        """Parse the frames in ``data``: binary messages go to on_message, other frames to the library."""
        pos = 0
        end = len(data)
        while pos < end:
            if not self._parsing:
                # A frame closed or failed the connection; the library parses the rest.
                self._feed_library(data[pos:])
                return
            body = self._body
            if body is None:
                pos = self._parse_frame(data, pos, end)
                continue
            filled = self._body_filled
            take = min(len(body) - filled, end - pos)
            body[filled : filled + take] = data[pos : pos + take]
            pos += take
            self._body_filled = filled + take
            if self._body_filled == len(body):
                self._body = None
                if self._frame_fast:
                    key = self._frame_key
                    self._deliver(apply_mask(body, key) if key is not None else body)
                else:
                    self._hand_to_library(self._frame_head + body)

    def _parse_frame(self, data: memoryview, pos: int, end: int) -> int:
        """Parse the frame that starts at ``pos`` (or earlier, in self._header); return where parsing continues."""
        if self._header:
            # The header began in an earlier read; it is at most 14 bytes long.
            joined = bytes(self._header) + bytes(data[pos : pos + _MAX_HEADER])
            parsed = _parse_header(joined, 0, len(joined))
            if parsed is None:
                self._header += data[pos:end]
                return end
            size, first, length, key = parsed
            head: bytes | memoryview = joined[:size]
            pos += size - len(self._header)
            self._header.clear()
        else:
            parsed = _parse_header(data, pos, end)
            if parsed is None:
                self._header += data[pos:end]
                return end
            size, first, length, key = parsed
            head = data[pos : pos + size]
            pos += size

        complete = end - pos >= length
        if (
            first == _FIN_BINARY
            and (key is not None) == self._expect_masked
            and length <= self._max_message_size
            and not self._fragments
        ):
            if complete:
                payload = data[pos : pos + length]
                self._deliver(apply_mask(payload, key) if key is not None else bytes(payload))
                return pos + length
            self._start_body(length, True, key, b"")
            return pos
        if length > self._max_message_size:
            # The library fails the connection on this header alone (close code 1009).
            self._feed_library(memoryview(bytes(head) + bytes(data[pos:end])))
            return end
        if complete:
            self._hand_to_library(bytes(head) + bytes(data[pos : pos + length]))
            return pos + length
        self._start_body(length, False, key, bytes(head))
        return pos

    def _start_body(self, length: int, fast: bool, key: bytes | None, head: bytes) -> None:
        self._body = bytearray(length)
        self._body_filled = 0
        self._frame_fast = fast
        self._frame_key = key
        self._frame_head = head

    def _deliver(self, message: bytes | bytearray) -> None:
        self.on_message(message)
        if self.protocol.state is not State.OPEN:
            self._parsing = False

    def _hand_to_library(self, frame: bytes) -> None:
        """Let the library process one whole frame; it takes over if the frame ends the connection."""
        self.protocol.receive_data(frame)
        self._process()
        if self.protocol.state is not State.OPEN:
            self._parsing = False
            self._library_only = True

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
        writes = self.protocol.data_to_send()
        if writes:
            # Frames that send_many holds back go out first.
            self._flush_cork()
        for data in writes:
            if data is SEND_EOF or data == b"":
                if transport.can_write_eof():
                    transport.write_eof()
                    self._eof_written = True
            else:
                transport.write(data)
        if self._check_write_buffer():
            return
        if self.protocol.state is State.CLOSED:
            self._flush_cork()
            transport.close()

    def _start_cork(self) -> bool:
        """Hold back writes until the end of this event loop iteration; return whether this call started it.

        A relay serving many streams reads many sockets in one iteration and
        sends frames for each. The send_many call that starts the cork writes
        its own frames as soon as it has framed them, so a lone message waits
        for nothing. The frames of later calls wait until the end of the
        iteration and go out joined, as one system call and one wake-up of
        the peer. Frames from the library (handshake, pong, close) are never
        held back.
        """
        if self._corked:
            return False
        self._corked = True
        self._loop.call_soon(self._uncork)
        return True

    def _write(self, frame: bytes) -> None:
        """Add ``frame`` to the cork; a frame too large to join goes out at once, after what waits."""
        transport = self.transport
        if transport is None or self._eof_written or transport.is_closing():
            return
        if self._cork_size + len(frame) > JOIN_BYTES:
            self._flush_cork()
            if len(frame) > JOIN_BYTES:
                transport.write(frame)
                self._check_write_buffer()
                return
        self._cork.append(frame)
        self._cork_size += len(frame)

    def _uncork(self) -> None:
        self._corked = False
        self._flush_cork()

    def _flush_cork(self) -> None:
        frames, self._cork = self._cork, []
        self._cork_size = 0
        transport = self.transport
        if not frames or transport is None or self._eof_written or transport.is_closing():
            return
        # Joined writes stay below 128 KiB, above which glibc serves each
        # buffer from mmap and every write would cost page faults.
        transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
        self._check_write_buffer()

    def _check_write_buffer(self) -> bool:
        """Drop the connection if the peer leaves more than max_write_buffer unread; return whether it did."""
        transport = self.transport
        if self.max_write_buffer and transport is not None and transport.get_write_buffer_size() > self.max_write_buffer:
            self.drop(
                f"the peer left {transport.get_write_buffer_size()} bytes unread, above the limit of {self.max_write_buffer}"
            )
            return True
        return False

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and self.transport is not None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT_S, self._close_timeout)

    def _close_timeout(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            logger.debug("closing handshake timed out; dropping the TCP connection")
            self.transport.abort()


class _HandshakeFailed(Exception):
    """The server responded to the handshake with something other than 101."""

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


# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_allocator_tuned = False


def tune_allocator() -> None:
    """Make glibc keep freed tunnel buffers for reuse instead of returning them to the kernel.

    A busy stream allocates and frees 64 KiB buffers thousands of times a
    second. By default glibc gives memory back whenever 128 KiB at the top of
    its heap are free, so the next buffers are page-faulted in again. In
    bench/bench_tunnel.py on 2 vCPUs that cost the agent about a sixth of its
    CPU time in a download. With this, up to 4 MiB of free heap is kept, and
    blocks of 1 MiB or more (such as scrypt's 16 MiB at sign-in) still come
    from mmap and go back at once. The settings apply to the whole process;
    on other C libraries this does nothing.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return
    mallopt(_M_TRIM_THRESHOLD, 4 * 1024 * 1024)
    mallopt(_M_MMAP_THRESHOLD, 1024 * 1024)


def _parse_header(
    buffer: bytes | memoryview, pos: int, end: int
) -> tuple[int, int, int, bytes | None] | None:
    """Return the header size, first byte, payload length and mask key of the frame at ``pos``.

    Returns None when the header is not complete before ``end``.
    """
    if end - pos < 2:
        return None
    first = buffer[pos]
    second = buffer[pos + 1]
    length = second & 0x7F
    size = 2
    if length == 126:
        size = 4
    elif length == 127:
        size = 10
    if second & _MASKED:
        size += 4
    if end - pos < size:
        return None
    if length == 126:
        (length,) = _U16.unpack_from(buffer, pos + 2)
    elif length == 127:
        (length,) = _U64.unpack_from(buffer, pos + 2)
    key = bytes(buffer[pos + size - 4 : pos + size]) if second & _MASKED else None
    return size, first, length, key



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
    tune_allocator()
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
