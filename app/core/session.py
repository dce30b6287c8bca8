"""Sans-I/O tunnel session: many byte streams over one message channel.

Theory of operation
-------------------

A ``Session`` sits between a WebSocket connection and the sockets at either
end. It does no I/O. The owner feeds it each binary message it receives
(``receive``), gets back a list of events, and writes out whatever
``data_to_send`` returns. Commands (``open_stream``, ``send_data``,
``send_fin``, ``reset_stream``, ``consume``) queue frames the same way.

Both sides send HELLO first. Nothing else is valid until the peer's HELLO has
arrived, because it carries the protocol version and the per-stream receive
window the peer grants.

Streams are opened by either side. The relay uses odd ids and the agent even
ids, each strictly increasing, so the two never collide and a reused id is
detectable. Each direction of a stream closes on its own with FIN, so a
half-closed TCP connection stays half-closed across the tunnel. RESET ends
both directions at once.

Flow control is per stream and credit based. A side may send DATA only up to
the credit the receiver granted: the HELLO window at first, then every WINDOW
increment. The receiver grants credit back with ``consume`` once it has
handed the bytes on (written them to its socket), so a slow reader stalls its
own stream and no buffer grows beyond one window. Data the owner passes to
``send_data`` beyond the current credit waits in a per-stream backlog; the
return value tells the owner to stop reading its socket until a
``CreditAvailable`` event.

A peer that sends a malformed frame, breaks the flow-control window or sends a
frame its stream's state does not allow fails the session: ``receive`` returns
a ``SessionFailed`` event with a WebSocket close code and a reason, and every
later call is ignored. The session never raises because of peer input.
Frames for a stream that this side already ended (reset, refused or fully
closed) are dropped silently, since the peer may have sent them before it
learned of the end.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Union

from . import frames
from .errors import LocalProtocolError
from .frames import CloseCode, ErrorCode, FrameError, FrameType

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 512 * 1024


# Frames that count towards the resumption sequence: everything about streams.
# HELLO, AUTH, AUTH_OK and ACK belong to one WebSocket connection and are
# never resent.
NUMBERED = frozenset(
    {
        FrameType.OPEN,
        FrameType.OPENED,
        FrameType.OPEN_FAILED,
        FrameType.DATA,
        FrameType.WINDOW,
        FrameType.FIN,
        FrameType.RESET,
    }
)

# Acknowledge at least after this many numbered messages; the owner also
# calls ``send_ack`` when input goes quiet.
ACK_EVERY = 32

_DATA = int(FrameType.DATA)
_WINDOW = int(FrameType.WINDOW)
_ACK = int(FrameType.ACK)
_MAX_DATA_MESSAGE = frames.HEADER_SIZE + frames.MAX_DATA_PAYLOAD
_WINDOW_MESSAGE = frames.HEADER_SIZE + 4
_ACK_MESSAGE = frames.HEADER_SIZE + 8
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class Role(enum.Enum):
    AGENT = "agent"
    RELAY = "relay"


class SessionState(enum.IntEnum):
    AWAITING_HELLO = 1
    OPEN = 2
    FAILED = 3


# Events ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloReceived:
    version: int
    window: int
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamOpenRequested:
    stream_id: int
    target: str


@dataclass(frozen=True, slots=True)
class StreamOpened:
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamOpenFailed:
    stream_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent FIN: it will send no more data on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """Both directions finished with FIN and every queued byte was sent."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class CreditAvailable:
    """The backlog drained and the stream may send again."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class AuthReceived:
    """The agent presented a new access token on the open session (relay side)."""

    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthAccepted:
    """The relay accepted the renewed token, valid for ``expires_in`` seconds (agent side)."""

    expires_in: int


@dataclass(frozen=True, slots=True)
class SessionFailed:
    close_code: int
    reason: str


Event = Union[
    HelloReceived,
    StreamOpenRequested,
    StreamOpened,
    StreamOpenFailed,
    DataReceived,
    StreamEnded,
    StreamReset,
    StreamClosed,
    CreditAvailable,
    AuthReceived,
    AuthAccepted,
    SessionFailed,
]


class _PeerError(Exception):
    """Internal: the peer broke the protocol; carries the close code."""

    def __init__(self, reason: str, close_code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.close_code = close_code


@dataclass(slots=True)
class _Stream:
    id: int
    target: str
    opened_locally: bool
    accepted: bool
    send_credit: int
    receive_remaining: int
    backlog: bytearray = field(default_factory=bytearray)
    fin_queued: bool = False
    fin_sent: bool = False
    fin_received: bool = False
    ungranted: int = 0


class Session:
    """One side of a tunnel session; see the module docstring."""

    def __init__(
        self,
        role: Role,
        *,
        window: int = DEFAULT_WINDOW,
        info: dict[str, Any] | None = None,
    ) -> None:
        if not 0 < window <= frames.MAX_WINDOW:
            raise ValueError(f"window must be between 1 and {frames.MAX_WINDOW} bytes")
        self.role = role
        self.state = SessionState.AWAITING_HELLO
        self.window = window
        self.peer_window = 0
        self.peer_info: dict[str, Any] = {}
        self.failure: SessionFailed | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

        self._streams: dict[int, _Stream] = {}
        parity = 1 if role is Role.RELAY else 0
        self._next_local_id = parity if parity else 2
        self._last_remote_id = 0
        self._grant_threshold = max(1, window // 4)
        self._out: list[bytes] = [frames.encode_hello(frames.PROTOCOL_VERSION, window, info or {})]

        # Resumption: numbered messages sent and received, and the sent ones
        # the peer has not acknowledged yet, oldest first.
        self.sent_count = 0
        self.received_count = 0
        self._acked_received = 0
        self._log: deque[bytes] = deque()
        self._log_base = 0
        self._log_bytes = 0

    def __repr__(self) -> str:
        return f"<Session {self.role.value} {self.state.name} streams={len(self._streams)}>"

    # Queries -----------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """Return the messages queued since the last call, in order."""
        out, self._out = self._out, []
        return out

    @property
    def stream_ids(self) -> list[int]:
        return list(self._streams)

    def is_active(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def can_send(self, stream_id: int) -> bool:
        """Tell whether ``send_data`` is allowed: the stream is open for writing."""
        stream = self._streams.get(stream_id)
        return stream is not None and not stream.fin_queued and (stream.opened_locally or stream.accepted)

    def send_credit(self, stream_id: int) -> int:
        """Return how many bytes may be sent now without queueing."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.backlog:
            return 0
        return max(0, stream.send_credit)

    def backlog_size(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return len(stream.backlog) if stream is not None else 0

    # Input -------------------------------------------------------------------

    def receive(self, message: bytes | bytearray | memoryview) -> list[Event]:
        """Process one WebSocket message and return the events it caused."""
        if self.state is SessionState.OPEN:
            common = self._receive_common(message)
            if common is not None:
                return common
        if self.state is SessionState.FAILED:
            return []
        events: list[Event] = []
        try:
            frame = frames.decode(message)
            if frame.type in NUMBERED:
                self.received_count += 1
            elif frame.type is FrameType.ACK:
                self._on_ack(frame)
                return events
            self._handle(frame, events)
            if self.received_count - self._acked_received >= ACK_EVERY:
                self.send_ack()
        except (FrameError, _PeerError) as exc:
            code = getattr(exc, "close_code", CloseCode.PROTOCOL_ERROR)
            events.append(self._fail(code, str(exc)))
        return events

    def _receive_common(self, message: bytes | bytearray | memoryview) -> list[Event] | None:
        """Handle a valid DATA, WINDOW or ACK frame, or return None to leave the message to the full path.

        These three are nearly all traffic. The checks of _on_data,
        _on_window and _on_ack are made here without building a Frame, with
        the same effects. A frame that fails one of them, and every other
        frame, goes through the full path in ``receive``, which reports the error.
        """
        size = len(message)
        if not frames.HEADER_SIZE < size <= _MAX_DATA_MESSAGE:
            return None
        kind, stream_id = frames.HEADER.unpack_from(message)
        events: list[Event]
        if kind == _DATA:
            stream = self._streams.get(stream_id)
            size -= frames.HEADER_SIZE
            if stream is None or stream.fin_received or size > stream.receive_remaining:
                return None
            self.received_count += 1
            stream.receive_remaining -= size
            self.bytes_received += size
            events = [DataReceived(stream_id, memoryview(message)[frames.HEADER_SIZE :])]
        elif kind == _WINDOW and size == _WINDOW_MESSAGE:
            stream = self._streams.get(stream_id)
            (increment,) = _U32.unpack_from(message, frames.HEADER_SIZE)
            if stream is None or increment == 0 or stream.send_credit + increment > frames.MAX_WINDOW:
                return None
            self.received_count += 1
            stream.send_credit += increment
            events = []
            self._credit_added(stream, events)
        elif kind == _ACK and size == _ACK_MESSAGE and stream_id == 0:
            (count,) = _U64.unpack_from(message, frames.HEADER_SIZE)
            if count > self.sent_count:
                return None
            self._trim_log(count)
            return []
        else:
            return None
        if self.received_count - self._acked_received >= ACK_EVERY:
            self.send_ack()
        return events

    def _handle(self, frame: frames.Frame, events: list[Event]) -> None:
        kind = frame.type
        if self.state is SessionState.AWAITING_HELLO:
            if kind is not FrameType.HELLO:
                raise _PeerError(f"expected HELLO first, got {kind.name}")
            self._on_hello(frame, events)
            return

        if kind is FrameType.DATA:
            self._on_data(frame, events)
        elif kind is FrameType.WINDOW:
            self._on_window(frame, events)
        elif kind is FrameType.OPEN:
            self._on_open(frame, events)
        elif kind is FrameType.OPENED:
            self._on_opened(frame, events)
        elif kind is FrameType.OPEN_FAILED:
            self._on_open_failed(frame, events)
        elif kind is FrameType.FIN:
            self._on_fin(frame, events)
        elif kind is FrameType.RESET:
            self._on_reset(frame, events)
        elif kind is FrameType.AUTH or kind is FrameType.AUTH_OK:
            self._on_auth(frame, events)
        else:
            raise _PeerError("HELLO received twice")

    def _on_hello(self, frame: frames.Frame, events: list[Event]) -> None:
        if frame.stream_id != 0:
            raise _PeerError("HELLO must use stream id 0")
        version, window, info = frames.parse_hello(frame.payload)
        if version != frames.PROTOCOL_VERSION:
            raise _PeerError(
                f"peer speaks tunnel protocol version {version}, "
                f"this side speaks {frames.PROTOCOL_VERSION}; update the older side",
                CloseCode.UNSUPPORTED_VERSION,
            )
        if not 0 < window <= frames.MAX_WINDOW:
            raise _PeerError(f"HELLO window {window} is outside 1 to {frames.MAX_WINDOW}")
        self.peer_window = window
        self.peer_info = info
        self.state = SessionState.OPEN
        events.append(HelloReceived(version, window, info))

    def _lookup(self, frame: frames.Frame) -> _Stream | None:
        """Return the active stream, None for an ended one, or fail for a never-used id."""
        stream = self._streams.get(frame.stream_id)
        if stream is not None:
            return stream
        if self._was_used(frame.stream_id):
            return None
        raise _PeerError(f"{frame.type.name} for stream {frame.stream_id}, which was never opened")

    def _was_used(self, stream_id: int) -> bool:
        if stream_id == 0:
            return False
        if self._is_local_id(stream_id):
            return stream_id < self._next_local_id
        return stream_id <= self._last_remote_id

    def _is_local_id(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == (self.role is Role.RELAY)

    def _on_open(self, frame: frames.Frame, events: list[Event]) -> None:
        sid = frame.stream_id
        if sid == 0 or self._is_local_id(sid):
            raise _PeerError(f"OPEN with stream id {sid}, which belongs to this side")
        if sid <= self._last_remote_id:
            raise _PeerError(f"OPEN reuses stream id {sid}; ids must increase")
        target = frames.parse_target(frame.payload)
        self._last_remote_id = sid
        self._streams[sid] = _Stream(
            id=sid,
            target=target,
            opened_locally=False,
            accepted=False,
            send_credit=self.peer_window,
            receive_remaining=self.window,
        )
        events.append(StreamOpenRequested(sid, target))

    def _on_opened(self, frame: frames.Frame, events: list[Event]) -> None:
        stream = self._lookup(frame)
        if stream is None:
            return
        if not stream.opened_locally or stream.accepted:
            raise _PeerError(f"unexpected OPENED for stream {stream.id}")
        stream.accepted = True
        events.append(StreamOpened(stream.id))

    def _on_open_failed(self, frame: frames.Frame, events: list[Event]) -> None:
        stream = self._lookup(frame)
        code, reason = frames.parse_code_reason(frame.payload)
        if stream is None:
            return
        if not stream.opened_locally or stream.accepted:
            raise _PeerError(f"unexpected OPEN_FAILED for stream {stream.id}")
        del self._streams[stream.id]
        events.append(StreamOpenFailed(stream.id, code, reason))

    def _on_data(self, frame: frames.Frame, events: list[Event]) -> None:
        stream = self._lookup(frame)
        size = len(frame.payload)
        if size == 0:
            raise _PeerError(f"empty DATA frame on stream {frame.stream_id}")
        if stream is None:
            return
        if stream.fin_received:
            raise _PeerError(f"DATA after FIN on stream {stream.id}")
        if size > stream.receive_remaining:
            raise _PeerError(
                f"DATA of {size} bytes exceeds the remaining window of "
                f"{stream.receive_remaining} on stream {stream.id}"
            )
        stream.receive_remaining -= size
        self.bytes_received += size
        events.append(DataReceived(stream.id, frame.payload))

    def _on_window(self, frame: frames.Frame, events: list[Event]) -> None:
        increment = frames.parse_window(frame.payload)
        stream = self._lookup(frame)
        if stream is None:
            return
        stream.send_credit += increment
        if stream.send_credit > frames.MAX_WINDOW:
            raise _PeerError(f"WINDOW overflows the credit of stream {stream.id}")
        self._credit_added(stream, events)

    def _credit_added(self, stream: _Stream, events: list[Event]) -> None:
        """Send what waited for credit, and report when the stream may send again."""
        if stream.backlog or stream.fin_queued and not stream.fin_sent:
            self._flush(stream)
        if not stream.backlog and not stream.fin_queued and stream.send_credit > 0:
            events.append(CreditAvailable(stream.id))
        self._maybe_closed(stream, events)

    def _on_fin(self, frame: frames.Frame, events: list[Event]) -> None:
        stream = self._lookup(frame)
        if stream is None:
            return
        if stream.fin_received:
            raise _PeerError(f"FIN received twice on stream {stream.id}")
        stream.fin_received = True
        events.append(StreamEnded(stream.id))
        self._maybe_closed(stream, events)

    def _on_reset(self, frame: frames.Frame, events: list[Event]) -> None:
        code, reason = frames.parse_code_reason(frame.payload)
        stream = self._lookup(frame)
        if stream is None:
            return
        del self._streams[stream.id]
        events.append(StreamReset(stream.id, code, reason))

    def _on_auth(self, frame: frames.Frame, events: list[Event]) -> None:
        if frame.stream_id != 0:
            raise _PeerError(f"{frame.type.name} must use stream id 0")
        if frame.type is FrameType.AUTH:
            if self.role is not Role.RELAY:
                raise _PeerError("AUTH is sent by the agent only")
            events.append(AuthReceived(frames.parse_auth(frame.payload)))
        else:
            if self.role is not Role.AGENT:
                raise _PeerError("AUTH_OK is sent by the relay only")
            events.append(AuthAccepted(frames.parse_auth_ok(frame.payload)))

    def _on_ack(self, frame: frames.Frame) -> None:
        if self.state is SessionState.AWAITING_HELLO:
            raise _PeerError("expected HELLO first, got ACK")
        if frame.stream_id != 0:
            raise _PeerError("ACK must use stream id 0")
        count = frames.parse_ack(frame.payload)
        if count > self.sent_count:
            raise _PeerError(f"ACK of {count} messages, but only {self.sent_count} were sent")
        self._trim_log(count)

    # Resumption --------------------------------------------------------------

    @property
    def unacked_messages(self) -> int:
        return len(self._log)

    @property
    def unacked_bytes(self) -> int:
        """Size of the resend log: numbered messages sent and not yet acknowledged, in bytes."""
        return self._log_bytes

    @property
    def ack_pending(self) -> bool:
        return self.received_count > self._acked_received

    def send_ack(self) -> None:
        """Queue an ACK of every numbered message received so far, if any is new."""
        if self.received_count > self._acked_received and self.state is SessionState.OPEN:
            self._acked_received = self.received_count
            self._out.append(frames.encode_ack(self.received_count))

    def can_resume_from(self, peer_received: int) -> bool:
        """Tell whether the log still contains every message after ``peer_received``."""
        return self._log_base <= peer_received <= self.sent_count

    def detach(self) -> None:
        """Drop what was queued for a connection that is gone; the resend log stays."""
        self._out.clear()

    def resume(self, peer_received: int) -> int:
        """Queue every numbered message the peer has not received; return the DATA bytes resent.

        ``peer_received`` is the count of numbered messages the peer reported
        in the reconnect handshake. Raises LocalProtocolError if it cannot be
        served from the log, in which case the session cannot be resumed.
        """
        if not self._log_base <= peer_received <= self.sent_count:
            raise LocalProtocolError(
                f"the peer received {peer_received} messages, but this side can resend only from "
                f"{self._log_base} to {self.sent_count}"
            )
        self._trim_log(peer_received)
        self._out.clear()
        resent = 0
        for message in self._log:
            if message[0] == FrameType.DATA:
                resent += len(message) - frames.HEADER_SIZE
            self._out.append(message)
        # Our own acknowledgements may have been lost with the old connection.
        self._acked_received = 0
        self.send_ack()
        return resent

    def _send(self, message: bytes) -> None:
        self._out.append(message)
        self._log.append(message)
        self._log_bytes += len(message)
        self.sent_count += 1

    def _trim_log(self, count: int) -> None:
        log = self._log
        while self._log_base < count:
            self._log_bytes -= len(log.popleft())
            self._log_base += 1

    # Commands ----------------------------------------------------------------

    def send_auth(self, token: str) -> None:
        """Queue a renewed access token for the relay (agent side)."""
        self._require_open()
        if self.role is not Role.AGENT:
            raise LocalProtocolError("only the agent sends AUTH")
        encoded = token.encode("ascii")
        if not encoded or len(encoded) > frames.MAX_CONTROL_PAYLOAD:
            raise LocalProtocolError("access token must be 1 to 16384 ASCII characters")
        self._out.append(frames.encode(FrameType.AUTH, 0, encoded))

    def send_auth_ok(self, expires_in: int) -> None:
        """Confirm a renewed access token (relay side)."""
        self._require_open()
        if self.role is not Role.RELAY:
            raise LocalProtocolError("only the relay sends AUTH_OK")
        self._out.append(frames.encode_auth_ok(expires_in))

    def open_stream(self, target: str) -> int:
        """Queue an OPEN frame for ``target`` and return the new stream id."""
        self._require_open()
        encoded = target.encode()
        if not encoded or len(encoded) > frames.MAX_TARGET_NAME_BYTES:
            raise LocalProtocolError(
                f"target name must be 1 to {frames.MAX_TARGET_NAME_BYTES} bytes of UTF-8"
            )
        sid = self._next_local_id
        if sid > frames.MAX_STREAM_ID:
            raise LocalProtocolError("stream ids are exhausted; reconnect to start a new session")
        self._next_local_id += 2
        self._streams[sid] = _Stream(
            id=sid,
            target=target,
            opened_locally=True,
            accepted=False,
            send_credit=self.peer_window,
            receive_remaining=self.window,
        )
        self._send(frames.encode(FrameType.OPEN, sid, encoded))
        return sid

    def accept_stream(self, stream_id: int) -> None:
        stream = self._require_stream(stream_id)
        if stream.opened_locally or stream.accepted:
            raise LocalProtocolError(f"stream {stream_id} is not waiting to be accepted")
        stream.accepted = True
        self._send(frames.encode(FrameType.OPENED, stream_id))

    def reject_stream(self, stream_id: int, code: int, reason: str) -> None:
        stream = self._require_stream(stream_id)
        if stream.opened_locally or stream.accepted:
            raise LocalProtocolError(f"stream {stream_id} is not waiting to be accepted")
        del self._streams[stream_id]
        self._send(frames.encode_code_reason(FrameType.OPEN_FAILED, stream_id, code, reason))

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue ``data`` on a stream and return the credit left afterwards.

        Bytes beyond the current credit wait in the stream's backlog and go
        out as WINDOW frames arrive. A return value of 0 or less means the
        caller should stop reading its source until ``CreditAvailable``.
        """
        stream = self._require_stream(stream_id)
        if stream.fin_queued:
            raise LocalProtocolError(f"stream {stream_id} already sent FIN")
        if not stream.opened_locally and not stream.accepted:
            raise LocalProtocolError(f"stream {stream_id} must be accepted before it carries data")
        if stream.backlog:
            stream.backlog += data
            return -len(stream.backlog)

        view = memoryview(data)
        size = len(view)
        sendable = min(size, max(0, stream.send_credit))
        offset = 0
        send = self._send
        while offset < sendable:
            end = min(offset + frames.MAX_DATA_PAYLOAD, sendable)
            send(frames.encode(FrameType.DATA, stream_id, view[offset:end]))
            offset = end
        stream.send_credit -= sendable
        self.bytes_sent += sendable
        if sendable < size:
            stream.backlog += view[sendable:]
            return -len(stream.backlog)
        return stream.send_credit

    def send_fin(self, stream_id: int) -> list[Event]:
        """Queue FIN after any backlog; return StreamClosed if that ends the stream."""
        stream = self._require_stream(stream_id)
        if stream.fin_queued:
            raise LocalProtocolError(f"stream {stream_id} already sent FIN")
        stream.fin_queued = True
        self._flush(stream)
        events: list[Event] = []
        self._maybe_closed(stream, events)
        return events

    def reset_stream(self, stream_id: int, code: int, reason: str) -> None:
        """Queue RESET and forget the stream; later frames for it are dropped."""
        if stream_id not in self._streams:
            return
        del self._streams[stream_id]
        if self.state is SessionState.OPEN:
            self._send(frames.encode_code_reason(FrameType.RESET, stream_id, code, reason))

    def consume(self, stream_id: int, size: int) -> None:
        """Report that ``size`` received bytes were handed on, granting credit back."""
        stream = self._streams.get(stream_id)
        # A size of 0 must not reach the grant below: with the window used up
        # it would send a WINDOW of 0, which the peer rejects.
        if stream is None or stream.fin_received or size <= 0:
            return
        stream.ungranted += size
        if stream.ungranted >= self._grant_threshold or stream.receive_remaining == 0:
            increment, stream.ungranted = stream.ungranted, 0
            stream.receive_remaining += increment
            # Acknowledge first, so the peer trims its resend log before it
            # spends the new credit; that keeps the log within one window.
            self.send_ack()
            self._send(frames.encode_window(stream_id, increment))

    def fail(self, close_code: int, reason: str) -> SessionFailed:
        """End the session from this side, for example when shutting down."""
        if self.failure is not None:
            return self.failure
        return self._fail(close_code, reason)

    def abort_streams(self, code: int, reason: str) -> list[StreamReset]:
        """Forget every stream after the channel is gone; return one reset each."""
        resets = [StreamReset(sid, code, reason) for sid in self._streams]
        self._streams.clear()
        return resets

    # Internals ---------------------------------------------------------------

    def _require_open(self) -> None:
        if self.state is not SessionState.OPEN:
            raise LocalProtocolError(f"session is {self.state.name}, not OPEN")

    def _require_stream(self, stream_id: int) -> _Stream:
        self._require_open()
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not active")
        return stream

    def _flush(self, stream: _Stream) -> None:
        backlog = stream.backlog
        if backlog and stream.send_credit > 0:
            sendable = min(len(backlog), stream.send_credit)
            view = memoryview(backlog)
            offset = 0
            while offset < sendable:
                end = min(offset + frames.MAX_DATA_PAYLOAD, sendable)
                self._send(frames.encode(FrameType.DATA, stream.id, view[offset:end]))
                offset = end
            view.release()
            del backlog[:sendable]
            stream.send_credit -= sendable
            self.bytes_sent += sendable
        if stream.fin_queued and not stream.fin_sent and not backlog:
            stream.fin_sent = True
            self._send(frames.encode(FrameType.FIN, stream.id))

    def _maybe_closed(self, stream: _Stream, events: list[Event]) -> None:
        if stream.fin_sent and stream.fin_received and stream.id in self._streams:
            del self._streams[stream.id]
            events.append(StreamClosed(stream.id))

    def _fail(self, close_code: int, reason: str) -> SessionFailed:
        logger.warning("tunnel session failed (close code %d): %s", close_code, reason)
        self.state = SessionState.FAILED
        self.failure = SessionFailed(close_code, reason)
        return self.failure


__all__ = [
    "AuthAccepted",
    "AuthReceived",
    "CloseCode",
    "CreditAvailable",
    "DataReceived",
    "ErrorCode",
    "Event",
    "HelloReceived",
    "Role",
    "Session",
    "SessionFailed",
    "SessionState",
    "StreamClosed",
    "StreamEnded",
    "StreamOpenFailed",
    "StreamOpenRequested",
    "StreamOpened",
    "StreamReset",
]
