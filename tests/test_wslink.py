"""WsLink's own framing and parsing against the websockets library's protocol.

``WsLink`` frames and parses binary messages itself and hands every other
frame to the websockets library. These tests run it against the library's
own sans-I/O protocol on the other end, with the bytes in between cut at
random places, so that every frame, header and handshake is split across
reads somewhere.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from app.core.frames import CloseCode
from app.core.wslink import WsLink

MAX_SIZE = 256 * 1024


class MemoryTransport(asyncio.Transport):
    """Collects what a protocol writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.eof = False
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.eof, "write after write_eof"
        self.written += data

    def writelines(self, list_of_data: object) -> None:
        for data in list_of_data:  # type: ignore[attr-defined]
            self.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data


def feed_in_pieces(link: WsLink, data: bytes, rng: random.Random) -> None:
    """Pass ``data`` to the link in pieces of random sizes, 1 byte up to 100 KiB."""
    pos = 0
    while pos < len(data):
        size = rng.choice((1, 2, 3, 7, 13, 100, 4096, 65536, 100_000))
        link.data_received(data[pos : pos + size])
        pos += size


def open_server_link(rng: random.Random) -> tuple[WsLink, MemoryTransport, ClientProtocol, list[object]]:
    """Return an open relay-side link, its transport, the library client talking to it, and the messages received."""
    client = ClientProtocol(parse_uri("ws://127.0.0.1/v1/agent"), max_size=MAX_SIZE)
    requests: list[Request] = []
    link = WsLink(ServerProtocol(max_size=MAX_SIZE), max_message_size=MAX_SIZE, on_request=lambda _link, request: requests.append(request))
    transport = MemoryTransport()
    link.connection_made(transport)
    client.send_request(client.connect())
    feed_in_pieces(link, b"".join(client.data_to_send()), rng)
    assert len(requests) == 1
    server = link.protocol
    assert isinstance(server, ServerProtocol)
    link.respond(server.accept(requests[0]))
    client.receive_data(transport.take())
    assert client.state is State.OPEN
    received: list[object] = []
    link.set_message_handler(received.append)
    return link, transport, client, received


async def frames_written(link: WsLink, transport: MemoryTransport, peer: ClientProtocol | ServerProtocol) -> list[Frame]:
    """Return the frames the link wrote, parsed by ``peer``, after its corked writes went out."""
    await asyncio.sleep(0)
    peer.receive_data(transport.take())
    return [event for event in peer.events_received() if isinstance(event, Frame)]


def close_code_of(frames: list[Frame]) -> int:
    closes = [frame for frame in frames if frame.opcode is Opcode.CLOSE]
    assert len(closes) == 1, f"expected one close frame, got {len(closes)}"
    return Close.parse(closes[0].data).code


@pytest.mark.parametrize("seed", range(20))
async def test_server_link_parses_split_frames(seed):
    rng = random.Random(seed)
    link, transport, client, received = open_server_link(rng)
    expected: list[bytes] = []
    for index in range(30):
        size = rng.choice((1, 5, 125, 126, 127, 65535, 65536, 65541, 200_000))
        payload = rng.randbytes(size)
        expected.append(payload)
        client.send_binary(payload)
        if index % 7 == 3:
            client.send_ping(b"ping %d" % index)
    feed_in_pieces(link, b"".join(client.data_to_send()), rng)

    assert [bytes(message) for message in received] == expected
    pongs = [frame for frame in await frames_written(link, transport, client) if frame.opcode is Opcode.PONG]
    assert [bytes(frame.data) for frame in pongs] == [b"ping 3", b"ping 10", b"ping 17", b"ping 24"]


@pytest.mark.parametrize("seed", range(10))
async def test_server_link_joins_fragmented_message(seed):
    rng = random.Random(seed)
    link, _transport, client, received = open_server_link(rng)
    client.send_binary(b"first", fin=False)
    client.send_ping(b"between fragments")
    client.send_continuation(b"second" * 20_000, fin=False)
    client.send_continuation(b"third", fin=True)
    client.send_binary(b"after")
    feed_in_pieces(link, b"".join(client.data_to_send()), rng)

    assert [bytes(message) for message in received] == [b"first" + b"second" * 20_000 + b"third", b"after"]


async def test_server_link_echoes_close_and_stops_parsing():
    rng = random.Random(1)
    link, transport, client, received = open_server_link(rng)
    client.send_binary(b"before close")
    client.send_close(CloseCode.GOING_AWAY, "agent is shutting down")
    feed_in_pieces(link, b"".join(client.data_to_send()), rng)

    assert [bytes(message) for message in received] == [b"before close"]
    assert link.close_code == CloseCode.GOING_AWAY
    assert link.close_reason == "agent is shutting down"
    assert close_code_of(await frames_written(link, transport, client)) == CloseCode.GOING_AWAY
    assert transport.eof


@pytest.mark.parametrize(
    ("send", "code"),
    [
        (lambda client: client.send_text(b"text"), CloseCode.UNSUPPORTED_DATA),
        (lambda client: client.send_binary(b"x" * (MAX_SIZE + 1)), CloseCode.MESSAGE_TOO_BIG),
        (lambda client: client.send_continuation(b"no start", fin=True), CloseCode.PROTOCOL_ERROR),
    ],
    ids=["text", "too-big", "stray-continuation"],
)
async def test_server_link_fails_on_bad_frame(send, code):
    rng = random.Random(2)
    link, transport, client, received = open_server_link(rng)
    client.send_binary(b"before the bad frame")
    if code is CloseCode.PROTOCOL_ERROR:
        # The library refuses to send a stray continuation frame unless it expects one.
        client.expect_continuation_frame = True
    send(client)
    feed_in_pieces(link, b"".join(client.data_to_send()), rng)

    assert [bytes(message) for message in received] == [b"before the bad frame"]
    assert close_code_of(await frames_written(link, transport, client)) == code


async def test_server_link_rejects_unmasked_frame():
    rng = random.Random(3)
    link, transport, client, received = open_server_link(rng)
    # A server's frames are unmasked; a client must mask every frame (RFC 6455, section 5.1).
    unmasked = ServerProtocol()
    unmasked.state = State.OPEN
    unmasked.send_binary(b"unmasked")
    link.data_received(b"".join(unmasked.data_to_send()))

    assert received == []
    assert close_code_of(await frames_written(link, transport, client)) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("seed", range(20))
async def test_client_link_parses_frames_after_handshake_response(seed):
    rng = random.Random(seed)
    link = WsLink(ClientProtocol(parse_uri("ws://127.0.0.1/v1/agent"), max_size=MAX_SIZE), max_message_size=MAX_SIZE)
    transport = MemoryTransport()
    link.connection_made(transport)
    client = link.protocol
    assert isinstance(client, ClientProtocol)
    client.send_request(client.connect())
    link._write_pending()

    server = ServerProtocol(max_size=MAX_SIZE)
    server.receive_data(transport.take())
    request = server.events_received()[0]
    assert isinstance(request, Request)
    server.send_response(server.accept(request))
    expected: list[bytes] = []
    for _ in range(20):
        payload = rng.randbytes(rng.choice((0, 1, 126, 65536, 65541, 150_000)))
        if payload:
            expected.append(payload)
            server.send_binary(payload)
        else:
            server.send_ping(b"")
    # The 101 response and the first frames arrive together, as they often do.
    feed_in_pieces(link, b"".join(server.data_to_send()), rng)

    assert link.handshake.done()
    assert link.handshake.exception() is None
    assert [bytes(message) for message in link._early] == expected


async def test_links_exchange_messages_both_ways():
    rng = random.Random(4)
    link, transport, client, received = open_server_link(rng)
    link.send_many([b"one", b"two" * 40_000, b"three"])
    link.send(b"four")

    frames = await frames_written(link, transport, client)
    assert [bytes(frame.data) for frame in frames] == [b"one", b"two" * 40_000, b"three", b"four"]
    assert all(frame.opcode is Opcode.BINARY and frame.fin for frame in frames)
