"""Wire format of the tunnel protocol: one frame per binary WebSocket message.

Every frame starts with a 5-byte header, big-endian::

    +--------+----------------------+-------------------------+
    | type   | stream id            | payload                 |
    | 1 byte | 4 bytes, unsigned    | rest of the message     |
    +--------+----------------------+-------------------------+

The payload layout depends on the type; ``docs/protocol.md`` is the full
specification. This module only encodes and decodes; the rules about which
frame may arrive when live in ``app.core.session``.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1

HEADER = struct.Struct("!BI")
HEADER_SIZE = HEADER.size

# A DATA frame never carries more than this, whatever a socket read returned,
# so a peer's WebSocket message size limit is never reached.
MAX_DATA_PAYLOAD = 64 * 1024

# Control payloads (hello metadata, reasons, target names) are small.
MAX_CONTROL_PAYLOAD = 16 * 1024
MAX_REASON_BYTES = 1024
MAX_TARGET_NAME_BYTES = 255

# The largest message a conforming peer ever sends.
MAX_MESSAGE_SIZE = HEADER_SIZE + MAX_DATA_PAYLOAD

MAX_STREAM_ID = 2**32 - 1
MAX_WINDOW = 2**31 - 1

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_HELLO = struct.Struct("!HI")


class FrameType(enum.IntEnum):
    HELLO = 0x01
    OPEN = 0x02
    OPENED = 0x03
    OPEN_FAILED = 0x04
    DATA = 0x05
    WINDOW = 0x06
    FIN = 0x07
    RESET = 0x08
    AUTH = 0x09
    AUTH_OK = 0x0A
    ACK = 0x0B


class ErrorCode(enum.IntEnum):
    """Reason codes carried by OPEN_FAILED and RESET frames."""

    UNKNOWN_TARGET = 1
    CONNECTION_REFUSED = 2
    CONNECT_TIMEOUT = 3
    CONNECT_FAILED = 4
    CANCELLED = 5
    SESSION_CLOSED = 6
    INTERNAL_ERROR = 7
    LIMIT_EXCEEDED = 8
    CONNECTION_LOST = 9

    @classmethod
    def parse(cls, value: int) -> "ErrorCode | int":
        """Return the known code, or the bare number for codes from newer peers."""
        try:
            return cls(value)
        except ValueError:
            return value


class CloseCode(enum.IntEnum):
    """WebSocket close codes that end a whole tunnel session."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    # The peer broke a limit of this side, such as the relay's cap on unacknowledged data.
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    # Application codes, 4000-4999 (RFC 6455, section 7.4.2).
    SESSION_REPLACED = 4001
    UNSUPPORTED_VERSION = 4002
    TOKEN_EXPIRED = 4003
    TOKEN_REJECTED = 4004
    SIGNED_OUT = 4005


class FrameError(ValueError):
    """A message is not a valid frame; the text says what was wrong."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    stream_id: int
    # A view into the received message, so decoding copies nothing.
    payload: memoryview = memoryview(b"")


def encode(frame_type: FrameType, stream_id: int, payload: bytes | memoryview = b"") -> bytes:
    """Serialize one frame into a WebSocket message."""
    return HEADER.pack(frame_type, stream_id) + payload


def encode_hello(version: int, window: int, info: dict[str, Any]) -> bytes:
    meta = json.dumps(info, separators=(",", ":"), ensure_ascii=False).encode()
    return encode(FrameType.HELLO, 0, _HELLO.pack(version, window) + meta)


def encode_code_reason(frame_type: FrameType, stream_id: int, code: int, reason: str) -> bytes:
    text = reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
    # Cutting may split a multi-byte character; drop the broken tail.
    text = text.decode("utf-8", "ignore").encode()
    return encode(frame_type, stream_id, _U16.pack(code) + text)


def encode_auth_ok(expires_in: int) -> bytes:
    return encode(FrameType.AUTH_OK, 0, _U32.pack(max(0, min(expires_in, 2**32 - 1))))


def parse_auth(payload: bytes | memoryview) -> str:
    raw = bytes(payload)
    if not raw:
        raise FrameError("AUTH carries an empty token")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("AUTH token is not ASCII") from None


def parse_auth_ok(payload: bytes | memoryview) -> int:
    if len(payload) != _U32.size:
        raise FrameError(f"AUTH_OK payload must be 4 bytes, got {len(payload)}")
    (expires_in,) = _U32.unpack_from(payload)
    return int(expires_in)


def encode_ack(count: int) -> bytes:
    return encode(FrameType.ACK, 0, _U64.pack(count))


def parse_ack(payload: bytes | memoryview) -> int:
    if len(payload) != _U64.size:
        raise FrameError(f"ACK payload must be 8 bytes, got {len(payload)}")
    (count,) = _U64.unpack_from(payload)
    return int(count)


def encode_window(stream_id: int, increment: int) -> bytes:
    return encode(FrameType.WINDOW, stream_id, _U32.pack(increment))


def decode(message: bytes | bytearray | memoryview) -> Frame:
    """Parse one WebSocket message into a frame, or raise FrameError."""
    size = len(message)
    if size < HEADER_SIZE:
        raise FrameError(f"frame of {size} bytes is shorter than the {HEADER_SIZE}-byte header")
    type_value, stream_id = HEADER.unpack_from(message)
    try:
        frame_type = FrameType(type_value)
    except ValueError:
        raise FrameError(f"unknown frame type 0x{type_value:02x}") from None
    payload = memoryview(message)[HEADER_SIZE:]
    limit = MAX_DATA_PAYLOAD if frame_type is FrameType.DATA else MAX_CONTROL_PAYLOAD
    if len(payload) > limit:
        raise FrameError(
            f"{frame_type.name} frame payload of {len(payload)} bytes exceeds the limit of {limit}"
        )
    return Frame(frame_type, stream_id, payload)


def parse_hello(payload: bytes | memoryview) -> tuple[int, int, dict[str, Any]]:
    """Return (version, window, metadata) from a HELLO payload."""
    if len(payload) < _HELLO.size:
        raise FrameError("HELLO payload is shorter than 6 bytes")
    version, window = _HELLO.unpack_from(payload)
    raw = bytes(payload[_HELLO.size :])
    info: Any = {}
    if raw:
        try:
            info = json.loads(raw.decode("utf-8"))
        # json raises RecursionError for nesting deeper than the recursion
        # limit, which 16 KiB of "[" easily reaches.
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise FrameError(f"HELLO metadata is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(info, dict):
            raise FrameError("HELLO metadata must be a JSON object")
    return version, window, info


def parse_code_reason(payload: bytes | memoryview) -> tuple[int, str]:
    if len(payload) < 2:
        raise FrameError("code and reason payload is shorter than 2 bytes")
    (code,) = _U16.unpack_from(payload)
    raw = bytes(payload[2:])
    if len(raw) > MAX_REASON_BYTES:
        raise FrameError(f"reason of {len(raw)} bytes exceeds {MAX_REASON_BYTES}")
    try:
        reason = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("reason is not valid UTF-8") from None
    return code, reason


def parse_window(payload: bytes | memoryview) -> int:
    if len(payload) != _U32.size:
        raise FrameError(f"WINDOW payload must be 4 bytes, got {len(payload)}")
    (increment,) = _U32.unpack_from(payload)
    if increment == 0:
        raise FrameError("WINDOW increment must be positive")
    return int(increment)


def parse_target(payload: bytes | memoryview) -> str:
    raw = bytes(payload)
    if not raw or len(raw) > MAX_TARGET_NAME_BYTES:
        raise FrameError(f"target name must be 1 to {MAX_TARGET_NAME_BYTES} bytes, got {len(raw)}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("target name is not valid UTF-8") from None
