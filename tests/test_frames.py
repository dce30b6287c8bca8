"""Wire format of the tunnel protocol: encoding, decoding and payload checks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core import frames
from app.core.frames import (
    HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    MAX_REASON_BYTES,
    MAX_TARGET_NAME_BYTES,
    Frame,
    FrameError,
    FrameType,
)

CONTROL_TYPES = [t for t in FrameType if t is not FrameType.DATA]
UNKNOWN_TYPE = max(FrameType) + 1


def hello_payload(version: int, window: int, meta: bytes = b"") -> bytes:
    return struct.pack("!HI", version, window) + meta


# Round trips -----------------------------------------------------------------


def test_header_layout_big_endian():
    message = frames.encode(FrameType.DATA, 0x01020304, b"xy")

    assert message == b"\x05\x01\x02\x03\x04xy"


def test_hello_round_trip():
    info = {"device": "laptop", "targets": ["redis", "ünïcode"], "version": "1.2"}
    frame = frames.decode(frames.encode_hello(1, 512 * 1024, info))

    assert frame.type is FrameType.HELLO
    assert frame.stream_id == 0
    assert frames.parse_hello(frame.payload) == (1, 512 * 1024, info)


def test_hello_empty_metadata_round_trip():
    frame = frames.decode(frames.encode(FrameType.HELLO, 0, hello_payload(7, 1)))

    assert frames.parse_hello(frame.payload) == (7, 1, {})


def test_open_round_trip():
    frame = frames.decode(frames.encode(FrameType.OPEN, 3, "redis-ü".encode()))

    assert frame.type is FrameType.OPEN
    assert frame.stream_id == 3
    assert frames.parse_target(frame.payload) == "redis-ü"


@pytest.mark.parametrize("frame_type", [FrameType.OPENED, FrameType.FIN])
def test_empty_frame_round_trip(frame_type):
    frame = frames.decode(frames.encode(frame_type, 2**32 - 1))

    assert frame.type is frame_type
    assert frame.stream_id == 2**32 - 1
    assert bytes(frame.payload) == b""


@pytest.mark.parametrize("frame_type", [FrameType.OPEN_FAILED, FrameType.RESET])
def test_code_reason_round_trip(frame_type):
    frame = frames.decode(frames.encode_code_reason(frame_type, 5, 65535, "connection refused: ✗"))

    assert frame.type is frame_type
    assert frame.stream_id == 5
    assert frames.parse_code_reason(frame.payload) == (65535, "connection refused: ✗")


def test_data_round_trip():
    payload = bytes(range(256)) * 256
    frame = frames.decode(frames.encode(FrameType.DATA, 9, payload))

    assert frame.type is FrameType.DATA
    assert frame.stream_id == 9
    assert bytes(frame.payload) == payload


def test_data_payload_is_view():
    message = bytearray(frames.encode(FrameType.DATA, 1, b"abc"))
    frame = frames.decode(message)
    message[HEADER_SIZE] = ord("z")

    assert isinstance(frame.payload, memoryview)
    assert bytes(frame.payload) == b"zbc"


def test_window_round_trip():
    frame = frames.decode(frames.encode_window(4, 2**32 - 1))

    assert frame.type is FrameType.WINDOW
    assert frame.stream_id == 4
    assert frames.parse_window(frame.payload) == 2**32 - 1


def test_auth_round_trip():
    frame = frames.decode(frames.encode(FrameType.AUTH, 0, b"eyJhbGciOi.payload.sig"))

    assert frame.type is FrameType.AUTH
    assert frame.stream_id == 0
    assert frames.parse_auth(frame.payload) == "eyJhbGciOi.payload.sig"


def test_auth_ok_round_trip():
    frame = frames.decode(frames.encode_auth_ok(900))

    assert frame.type is FrameType.AUTH_OK
    assert frame.stream_id == 0
    assert frames.parse_auth_ok(frame.payload) == 900


@pytest.mark.parametrize(("expires_in", "encoded"), [(-5, 0), (2**40, 2**32 - 1)])
def test_auth_ok_clamps_expiry(expires_in, encoded):
    frame = frames.decode(frames.encode_auth_ok(expires_in))

    assert frames.parse_auth_ok(frame.payload) == encoded


def test_long_reason_cut_to_limit():
    message = frames.encode_code_reason(FrameType.RESET, 1, 7, "é" * 600)
    code, reason = frames.parse_code_reason(frames.decode(message).payload)

    assert code == 7
    assert reason == "é" * (MAX_REASON_BYTES // 2)


def test_cut_reason_drops_split_character():
    # "€" is 3 bytes, so 1024 bytes end inside the 342nd character.
    message = frames.encode_code_reason(FrameType.OPEN_FAILED, 1, 7, "€" * 400)
    _code, reason = frames.parse_code_reason(frames.decode(message).payload)

    assert reason == "€" * (MAX_REASON_BYTES // 3)


def test_decode_accepts_all_buffer_types():
    message = frames.encode(FrameType.FIN, 6)

    for value in (message, bytearray(message), memoryview(message)):
        assert frames.decode(value) == Frame(FrameType.FIN, 6, memoryview(b""))


def test_error_code_parse_keeps_unknown():
    assert frames.ErrorCode.parse(2) is frames.ErrorCode.CONNECTION_REFUSED
    assert frames.ErrorCode.parse(999) == 999


# Decode errors -----------------------------------------------------------------


@pytest.mark.parametrize("size", range(HEADER_SIZE))
def test_short_frame_rejected(size):
    with pytest.raises(FrameError) as caught:
        frames.decode(b"\x05" * size)

    assert str(caught.value) == f"frame of {size} bytes is shorter than the 5-byte header"


@pytest.mark.parametrize("type_value", [0x00, UNKNOWN_TYPE, 0x7F, 0xFF])
def test_unknown_type_rejected(type_value):
    with pytest.raises(FrameError) as caught:
        frames.decode(bytes([type_value]) + b"\x00\x00\x00\x01payload")

    assert str(caught.value) == f"unknown frame type 0x{type_value:02x}"


def test_data_at_limit_accepted():
    frame = frames.decode(frames.encode(FrameType.DATA, 1, b"x" * MAX_DATA_PAYLOAD))

    assert len(frame.payload) == MAX_DATA_PAYLOAD


def test_oversized_data_rejected():
    with pytest.raises(FrameError) as caught:
        frames.decode(frames.encode(FrameType.DATA, 1, b"x" * (MAX_DATA_PAYLOAD + 1)))

    assert str(caught.value) == "DATA frame payload of 65537 bytes exceeds the limit of 65536"


@pytest.mark.parametrize("frame_type", CONTROL_TYPES)
def test_control_at_limit_accepted(frame_type):
    frame = frames.decode(frames.encode(frame_type, 1, b"x" * MAX_CONTROL_PAYLOAD))

    assert len(frame.payload) == MAX_CONTROL_PAYLOAD


@pytest.mark.parametrize("frame_type", CONTROL_TYPES)
def test_oversized_control_rejected(frame_type):
    with pytest.raises(FrameError) as caught:
        frames.decode(frames.encode(frame_type, 1, b"x" * (MAX_CONTROL_PAYLOAD + 1)))

    expected = f"{frame_type.name} frame payload of 16385 bytes exceeds the limit of 16384"
    assert str(caught.value) == expected


# Payload errors ------------------------------------------------------------------


def test_reason_bad_utf8_rejected():
    with pytest.raises(FrameError, match="^reason is not valid UTF-8$"):
        frames.parse_code_reason(b"\x00\x01ok\xff")


def test_reason_over_limit_rejected():
    with pytest.raises(FrameError, match="^reason of 1025 bytes exceeds 1024$"):
        frames.parse_code_reason(b"\x00\x01" + b"r" * (MAX_REASON_BYTES + 1))


@pytest.mark.parametrize("payload", [b"", b"\x00"])
def test_code_reason_short_rejected(payload):
    with pytest.raises(FrameError, match="^code and reason payload is shorter than 2 bytes$"):
        frames.parse_code_reason(payload)


def test_empty_reason_accepted():
    assert frames.parse_code_reason(b"\x00\x09") == (9, "")


def test_target_bad_utf8_rejected():
    with pytest.raises(FrameError, match="^target name is not valid UTF-8$"):
        frames.parse_target(b"redis\xc3")


def test_target_empty_rejected():
    with pytest.raises(FrameError, match="^target name must be 1 to 255 bytes, got 0$"):
        frames.parse_target(b"")


def test_target_over_limit_rejected():
    with pytest.raises(FrameError, match="^target name must be 1 to 255 bytes, got 256$"):
        frames.parse_target(b"t" * (MAX_TARGET_NAME_BYTES + 1))


def test_target_at_limit_accepted():
    assert frames.parse_target(b"t" * MAX_TARGET_NAME_BYTES) == "t" * MAX_TARGET_NAME_BYTES


def test_window_zero_rejected():
    with pytest.raises(FrameError, match="^WINDOW increment must be positive$"):
        frames.parse_window(b"\x00\x00\x00\x00")


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"])
def test_window_wrong_size_rejected(payload):
    with pytest.raises(FrameError, match=f"^WINDOW payload must be 4 bytes, got {len(payload)}$"):
        frames.parse_window(payload)


def test_auth_empty_rejected():
    with pytest.raises(FrameError, match="^AUTH carries an empty token$"):
        frames.parse_auth(b"")


def test_auth_non_ascii_rejected():
    with pytest.raises(FrameError, match="^AUTH token is not ASCII$"):
        frames.parse_auth("tökén".encode())


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"])
def test_auth_ok_wrong_size_rejected(payload):
    with pytest.raises(FrameError, match=f"^AUTH_OK payload must be 4 bytes, got {len(payload)}$"):
        frames.parse_auth_ok(payload)


def test_hello_short_rejected():
    with pytest.raises(FrameError, match="^HELLO payload is shorter than 6 bytes$"):
        frames.parse_hello(b"\x00\x01\x00\x00\x00")


@pytest.mark.parametrize("meta", [b"{", b"{'a': 1}", b"nul", b'{"a": 1} x'])
def test_hello_bad_json_rejected(meta):
    with pytest.raises(FrameError, match="^HELLO metadata is not valid UTF-8 JSON: "):
        frames.parse_hello(hello_payload(1, 100, meta))


def test_hello_bad_utf8_rejected():
    with pytest.raises(FrameError, match="^HELLO metadata is not valid UTF-8 JSON: "):
        frames.parse_hello(hello_payload(1, 100, b'{"a": "\xff"}'))


def test_hello_deep_nesting_rejected():
    # The C JSON decoder raises RecursionError past the recursion limit.
    meta = b"[" * (MAX_CONTROL_PAYLOAD - 6)

    with pytest.raises(FrameError, match="^HELLO metadata is not valid UTF-8 JSON: "):
        frames.parse_hello(hello_payload(1, 100, meta))


@pytest.mark.parametrize("meta", [b"[]", b"3", b'"text"', b"null"])
def test_hello_non_object_rejected(meta):
    with pytest.raises(FrameError, match="^HELLO metadata must be a JSON object$"):
        frames.parse_hello(hello_payload(1, 100, meta))


# Properties ------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2 * MAX_CONTROL_PAYLOAD))
def test_decode_arbitrary_bytes(message):
    try:
        frame = frames.decode(message)
    except FrameError:
        return

    assert isinstance(frame, Frame)
    assert frames.encode(frame.type, frame.stream_id, frame.payload) == message


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(list(FrameType)),
    st.integers(0, frames.MAX_STREAM_ID),
    st.binary(max_size=MAX_CONTROL_PAYLOAD),
)
def test_encode_decode_round_trip(frame_type, stream_id, payload):
    frame = frames.decode(frames.encode(frame_type, stream_id, payload))

    assert frame.type is frame_type
    assert frame.stream_id == stream_id
    assert bytes(frame.payload) == payload


PARSERS = [
    (frames.parse_hello, tuple),
    (frames.parse_code_reason, tuple),
    (frames.parse_window, int),
    (frames.parse_target, str),
    (frames.parse_auth, str),
    (frames.parse_auth_ok, int),
]


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(PARSERS),
    st.one_of(
        st.binary(max_size=64),
        st.builds(lambda head, text: head + text.encode(), st.binary(max_size=6), st.text(max_size=40)),
    ),
)
def test_payload_parsers_raise_only_frame_error(parser, payload):
    parse, result_type = parser
    try:
        result = parse(payload)
    except FrameError:
        return

    assert isinstance(result, result_type)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 65535), st.text(max_size=MAX_REASON_BYTES))
def test_code_reason_always_parses(code, reason):
    message = frames.encode_code_reason(FrameType.RESET, 1, code, reason)
    parsed_code, parsed_reason = frames.parse_code_reason(frames.decode(message).payload)

    assert parsed_code == code
    assert reason.encode("utf-8", "replace").decode().startswith(parsed_reason)
