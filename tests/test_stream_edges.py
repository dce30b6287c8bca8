"""Edge cases of stream set-up and tear-down that a new user found."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from websockets.asyncio.client import connect as ws_connect

from app.core.agent import AgentState
from app.core.backoff import Backoff
from app.core.config import validate_device_name
from app.core.errors import ConfigError
from tests.conftest import ACCOUNT, API_KEY
from tests.helpers_ws import exchange, wait_until

GREETING = b"HELLO from a speak-first application\n"


async def start_greeter() -> tuple[asyncio.Server, int]:
    """A desktop app that greets first, then echoes, like many trading terminals."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_websocket_stream_keeps_greeting(start_relay, start_agent):
    server, port = await start_greeter()
    relay = await start_relay()
    await start_agent(relay.url, {"greeter": ("127.0.0.1", port)})
    url = f"{relay.url}/v1/agents/{ACCOUNT}/targets/greeter/stream"

    for attempt in range(20):
        async with ws_connect(url, additional_headers={"Authorization": f"Bearer {API_KEY}"}, proxy=None) as ws:
            first = await asyncio.wait_for(ws.recv(), 5)
            assert first == GREETING, f"attempt {attempt}: the greeting was lost"
    server.close()


async def test_failed_exchange_leaves_no_stream(start_relay, start_agent, echo_port):
    async def closer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(100)
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(closer, "127.0.0.1", 0)
    relay = await start_relay()
    handle = await start_agent(relay.url, {"closer": ("127.0.0.1", server.sockets[0].getsockname()[1])})

    for _ in range(5):
        reply = await exchange(relay.relay.port, "closer", b"QUIT\n", query="until=bytes&bytes=1000")
        assert reply.status == 502, reply.body

    entry = relay.relay.agents[(ACCOUNT, "laptop")]
    await wait_until(lambda: not entry.tunnel.handlers, "the relay to forget the failed streams")
    await wait_until(lambda: not handle.agent.tunnel.handlers, "the agent to close the desktop sockets")
    server.close()


async def test_abandoned_exchange_resets_stream(start_relay, start_agent):
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    relay = await start_relay()
    handle = await start_agent(relay.url, {"silent": ("127.0.0.1", server.sockets[0].getsockname()[1])})
    request = (
        f"POST /v1/agents/{ACCOUNT}/targets/silent/exchange?until=eof&timeout_ms=600000 HTTP/1.1\r\n"
        f"Host: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 4\r\n\r\nPING"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.relay.port)
    writer.write(request)
    await wait_until(lambda: bool(handle.agent.tunnel.handlers), "the exchange to open its stream")

    # A client that vanishes (killed, or its network gone) resets the connection.
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()

    await wait_until(lambda: not handle.agent.tunnel.handlers, "the agent to drop the abandoned stream")
    server.close()


async def test_cut_transfer_resets_cloud_socket(start_relay, start_agent):
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"x" * 65536
        try:
            while True:
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    relay = await start_relay(expose=("endless",))
    handle = await start_agent(relay.url, {"endless": ("127.0.0.1", server.sockets[0].getsockname()[1])})
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port_of("endless"))
    await reader.readexactly(1 << 20)

    await handle.agent.stop()

    with pytest.raises(ConnectionResetError):
        while await asyncio.wait_for(reader.read(1 << 20), 10):
            pass
    writer.close()
    server.close()


async def test_routes_to_agent_with_target(start_relay, start_agent, echo_port):
    relay = await start_relay(expose=("echo",))
    await start_agent(relay.url, {"echo": ("127.0.0.1", echo_port)}, device="desk-a")
    await start_agent(relay.url, {"other": ("127.0.0.1", echo_port)}, device="desk-b")

    reply = await exchange(relay.relay.port, "echo", b"hi\n")

    assert reply.status == 200, reply.body
    assert reply.body == b"hi\n"


async def test_relay_rejects_invalid_target_name(start_relay, start_agent, echo_port):
    relay = await start_relay()
    await start_agent(relay.url, {"echo": ("127.0.0.1", echo_port)})

    reply = await exchange(relay.relay.port, "x" * 300, b"hi\n")

    assert reply.status == 400, reply.body
    assert b"invalid target name" in reply.body


@pytest.mark.parametrize("name", ["ПК офис", "桌面", "💻laptop", "Büro-PC", "a/b", " lead", "trail "])
def test_device_name_rejects_non_ascii(name):
    with pytest.raises(ConfigError, match="invalid device name"):
        validate_device_name(name)


def test_device_name_accepts_plain():
    assert validate_device_name("Trading Laptop-2") == "Trading Laptop-2"


def test_abort_with_reset_sends_rst():
    # Plain sockets show the difference that asyncio's abort() alone hides.
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()

    class FakeTransport:
        def get_extra_info(self, name: str) -> socket.socket:
            return peer

        def abort(self) -> None:
            peer.close()

    from app.core.bridge import abort_with_reset

    abort_with_reset(FakeTransport())  # type: ignore[arg-type]
    with pytest.raises(ConnectionResetError):
        client.recv(10)
    client.close()
    server.close()


async def test_check_connection_skips_backoff(start_relay, start_agent, echo_port):
    relay = await start_relay()
    port = relay.relay.port
    handle = await start_agent(relay.url, {"echo": ("127.0.0.1", echo_port)}, backoff=Backoff(base=60, cap=60))
    await relay.relay.stop()
    await wait_until(lambda: handle.agent.status.state is AgentState.WAITING, "the agent to wait out its backoff")
    await start_relay(port=port)

    await handle.agent.check_connection("after the network changed")

    await wait_until(lambda: handle.agent.status.state is AgentState.CONNECTED, "the agent to reconnect at once")
