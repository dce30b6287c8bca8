"""The main job end to end: a cloud client reaches an echo server through the tunnel."""

from __future__ import annotations

import asyncio


async def test_echo_through_exposed_port(start_relay, start_agent, echo_port):
    relay = await start_relay(expose=("echo",))
    await start_agent(relay.url, {"echo": ("127.0.0.1", echo_port)})

    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port_of("echo"))
    writer.write(b"hello through the tunnel\n")
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()

    assert reply == b"hello through the tunnel\n"
