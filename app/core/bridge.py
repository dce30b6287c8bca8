"""Bridge between one TCP socket and one tunnel stream.

The agent uses it for desktop-side sockets and the relay for cloud-side
sockets. Each direction is tracked on its own: the socket's EOF becomes a FIN
on the stream and the stream's FIN becomes a TCP half-close (``write_eof``),
so a half-closed connection is never turned into a reset.

Reading uses ``asyncio.BufferedProtocol`` with one 256 KiB buffer shared by
every bridge of a thread. So a socket read costs no allocation, an open
stream costs no buffer memory, and the session copies each chunk once, into
the frames it sends. A read takes at most the stream's send credit, or one DATA
frame when the credit is smaller, so reads above 64 KiB never add to the
session's backlog. Reading pauses when the credit runs out and resumes on
``on_credit``. Bytes from the tunnel are written to the socket and
credit is granted back only while the socket's write buffer is below its
high-water mark, so a slow reader keeps at most one window plus that buffer in memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading

from .errors import describe_os_error
from .frames import MAX_DATA_PAYLOAD, ErrorCode
from .traffic import PREVIEW_BYTES, Direction, Kind, TrafficRecord, TrafficSink, now
from .tunnel import Tunnel

logger = logging.getLogger(__name__)

WRITE_HIGH_WATER = 256 * 1024
# How often a socket whose reading is paused is checked for a reset.
PAUSED_SOCKET_CHECK_S = 1.0
WRITE_LOW_WATER = 64 * 1024
# Largest socket read. Reads above one DATA frame save system calls and event
# loop iterations when a stream is busy; the session splits them into frames.
READ_SIZE = 4 * MAX_DATA_PAYLOAD

_read_buffers = threading.local()


def _shared_read_buffer() -> memoryview:
    """Return the read buffer of the calling thread's bridges.

    Sharing is safe because asyncio fills the buffer and calls
    ``buffer_updated`` with no other callback in between, and
    ``buffer_updated`` copies whatever it keeps.
    """
    view: memoryview | None = getattr(_read_buffers, "view", None)
    if view is None:
        view = _read_buffers.view = memoryview(bytearray(READ_SIZE))
    return view


def abort_with_reset(transport: asyncio.Transport) -> None:
    """Close a socket with a TCP RST, so its peer gets an error instead of a clean EOF.

    ``transport.abort()`` alone closes the socket normally, which sends a FIN
    and makes a cut-short transfer look complete.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class SocketBridge(asyncio.BufferedProtocol):
    """Carries bytes between a socket and a stream in both directions."""

    def __init__(
        self,
        *,
        target: str,
        inbound: Direction,
        traffic: TrafficSink | None = None,
        label: str = "socket",
        hold_reading: bool = False,
    ) -> None:
        self.target = target
        self.label = label
        self.transport: asyncio.Transport | None = None
        self.tunnel: Tunnel | None = None
        self.stream_id = 0
        self.bytes_to_socket = 0
        self.bytes_from_socket = 0
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        # Direction of bytes written to the socket; the other one is read.
        self._inbound = inbound
        self._outbound = Direction.TO_CLOUD if inbound is Direction.TO_DESKTOP else Direction.TO_DESKTOP
        self._traffic = traffic
        self._record_data = traffic is not None and traffic.wants_data
        self._view = _shared_read_buffer()

        # The side that accepts a stream must send OPENED before any DATA,
        # so its socket is not read until ``release`` (after the accept).
        self._holding = hold_reading
        self._pending: list[memoryview] = []
        self._end_pending = False
        self._reading_paused = False
        self._paused_check: asyncio.TimerHandle | None = None
        self._writing_paused = False
        self._unconsumed = 0
        self._socket_eof = False
        self._stream_ended = False
        self._socket_gone = False
        self._finished = False

    def __repr__(self) -> str:
        return f"<SocketBridge {self.label} stream={self.stream_id} target={self.target!r}>"

    def bind(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id
        self._emit(Kind.OPENED)

    # Socket side (asyncio.BufferedProtocol) ----------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if self._holding:
            transport.pause_reading()
        pending, self._pending = self._pending, []
        for chunk in pending:
            self._write(chunk)
        if self._end_pending:
            self._end_pending = False
            self._write_eof()

    def release(self) -> None:
        """Start reading the socket once the stream was accepted."""
        self._holding = False
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self._reading_paused:
            transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        tunnel = self.tunnel
        credit = tunnel.session.send_credit(self.stream_id) if tunnel is not None else 0
        if credit >= READ_SIZE:
            return self._view
        return self._view[: max(credit, MAX_DATA_PAYLOAD)]

    def buffer_updated(self, nbytes: int) -> None:
        tunnel = self.tunnel
        if tunnel is None or not tunnel.can_send(self.stream_id):
            return
        chunk = self._view[:nbytes]
        self.bytes_from_socket += nbytes
        if self._record_data:
            self._emit(Kind.DATA, self._outbound, nbytes, bytes(chunk[:PREVIEW_BYTES]))
        credit = tunnel.send_data(self.stream_id, chunk)
        if credit <= 0 and self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
            self._watch_paused_socket()

    def _watch_paused_socket(self) -> None:
        """Check a paused socket for a pending error, such as a reset by its peer.

        asyncio stops polling a socket whose reading is paused, so a peer that
        resets the connection while the stream waits for credit would go
        unnoticed until the credit came back, which may be never. The socket
        is checked when reading pauses and then every PAUSED_SOCKET_CHECK_S
        while it stays paused. A busy stream pauses thousands of times a
        second, so one timer per bridge covers all of its pauses.
        """
        if not self._reading_paused or self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if sock is not None else 0
        if error:
            self.transport.abort()
            self.connection_lost(OSError(error, os.strerror(error)))
            return
        if self._paused_check is None:
            self._paused_check = asyncio.get_running_loop().call_later(PAUSED_SOCKET_CHECK_S, self._on_paused_check)

    def _on_paused_check(self) -> None:
        self._paused_check = None
        self._watch_paused_socket()

    def eof_received(self) -> bool:
        self._socket_eof = True
        self._emit(Kind.HALF_CLOSE, self._outbound)
        tunnel = self.tunnel
        if tunnel is not None and tunnel.can_send(self.stream_id):
            tunnel.send_fin(self.stream_id)
        # Keep the transport open: the other direction may still carry data.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._socket_gone = True
        if self._finished:
            return
        tunnel = self.tunnel
        if tunnel is None or self.stream_id not in tunnel.handlers:
            self._finish(Kind.ERROR, f"{self.label} connection lost")
            return
        if exc is None and self._socket_eof:
            # The socket closed after its EOF, which a peer that closes both
            # directions at once does. Its data and FIN are already queued;
            # what still arrives for it is dropped until the stream's FIN.
            return
        reason = f"{self.label} connection lost: {describe_os_error(exc)}" if isinstance(exc, OSError) else f"{self.label} connection closed"
        tunnel.reset(self.stream_id, ErrorCode.CONNECTION_LOST, reason)
        self._finish(Kind.ERROR, reason)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._unconsumed and self.tunnel is not None:
            size, self._unconsumed = self._unconsumed, 0
            self.tunnel.consume(self.stream_id, size)

    # Stream side (tunnel.StreamHandler) --------------------------------------

    def on_opened(self) -> None:
        pass

    def on_open_failed(self, code: int, reason: str) -> None:
        self._finish(Kind.ERROR, reason)
        if self.transport is not None:
            abort_with_reset(self.transport)

    def on_data(self, data: memoryview) -> None:
        size = len(data)
        if self._record_data:
            self._emit(Kind.DATA, self._inbound, size, bytes(data[:PREVIEW_BYTES]))
        if self.transport is None and not self._socket_gone:
            self._pending.append(data)
            return
        self._write(data)

    def on_end(self) -> None:
        self._stream_ended = True
        self._emit(Kind.HALF_CLOSE, self._inbound)
        if self.transport is None and not self._socket_gone:
            self._end_pending = True
        else:
            self._write_eof()

    def on_reset(self, code: int, reason: str) -> None:
        self._finish(Kind.ERROR, reason)
        transport = self.transport
        if transport is None:
            return
        if self._stream_ended:
            # Every byte of the other direction arrived; let the socket send
            # it before closing instead of discarding it with a reset.
            transport.close()
        else:
            abort_with_reset(transport)

    def on_closed(self) -> None:
        self._finish(Kind.CLOSED, "")
        if self.transport is not None:
            self.transport.close()

    def on_credit(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # Helpers -----------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Reset the stream from this side and close the socket."""
        if self.tunnel is not None:
            self.tunnel.reset(self.stream_id, ErrorCode.CANCELLED, reason)
        self._finish(Kind.ERROR, reason)
        if self.transport is not None:
            abort_with_reset(self.transport)

    def _write(self, data: memoryview) -> None:
        size = len(data)
        transport = self.transport
        tunnel = self.tunnel
        if transport is None or transport.is_closing():
            # The socket is gone; drop the bytes but keep the peer's credit flowing.
            if tunnel is not None:
                tunnel.consume(self.stream_id, size)
            return
        transport.write(data)
        self.bytes_to_socket += size
        if tunnel is None:
            return
        if self._writing_paused:
            self._unconsumed += size
        else:
            tunnel.consume(self.stream_id, size)

    def _write_eof(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            return
        try:
            transport.write_eof()
        except OSError as exc:
            # shutdown() fails when the peer reset the socket before asyncio
            # noticed. Raised here it would escape into the tunnel's
            # WebSocket callback and take down every stream of the session.
            transport.abort()
            self.connection_lost(exc)

    def _emit(self, kind: Kind, direction: Direction | None = None, size: int = 0, preview: bytes = b"", detail: str = "") -> None:
        if self._traffic is None:
            return
        to_desktop, to_cloud = self._totals()
        self._traffic.record(
            TrafficRecord(now(), kind, self.stream_id, self.target, direction, size, preview, detail, to_desktop, to_cloud)
        )

    @property
    def bytes_to_desktop(self) -> int:
        return self._totals()[0]

    @property
    def bytes_to_cloud(self) -> int:
        return self._totals()[1]

    def _totals(self) -> tuple[int, int]:
        if self._inbound is Direction.TO_DESKTOP:
            return self.bytes_to_socket, self.bytes_from_socket
        return self.bytes_from_socket, self.bytes_to_socket

    def _finish(self, kind: Kind, detail: str) -> None:
        if self._finished:
            return
        self._finished = True
        self._emit(kind, detail=detail)
        if not self.done.done():
            self.done.set_result(detail or "closed")
