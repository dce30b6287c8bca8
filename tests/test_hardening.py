"""The relay against hostile clients: every limit, and a suite of bad input.

The first part reaches each limit of docs/relay.md with an in-process relay
and checks that the offending client gets a clear error, that the rejection
is logged, and that a real agent's stream keeps echoing meanwhile.

The second part runs the relay as a subprocess and throws garbage at its
HTTP port and an exposed port. The garbage is random bytes, oversized and
malformed headers, invalid UTF-8, huge and deeply nested JSON, unfinished
WebSocket handshakes, slowloris clients and clients that read nothing. The relay must
not crash, its peak memory must stay bounded, and agents and cloud clients
must keep working throughout. Attack traffic comes from 127.0.0.2, so the
per-address connection limit never throttles the checks from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.core import frames
from app.core.frames import FrameType
from cloud_stub.relay import Exposure
from conftest import ACCOUNT, API_KEY, PASSWORD, RelayHandle
from helpers_ws import (
    AUTH,
    HttpReply,
    connect_as_agent,
    exchange,
    http_request,
    parse_http_reply,
    receive_frame,
    wait_closed,
    wait_until,
)
from processes import Child, python_module, spawn  # noqa: F401  (spawn is a fixture)

HOST = "127.0.0.1"
# Source address of attack traffic: loopback, but another client address.
ATTACKER = "127.0.0.2"
PROMPTLY_S = 5.0
MIB = 1024 * 1024


# Helpers ---------------------------------------------------------------------


class EchoWatch:
    """Round trips through an exposed port in the background, to show the relay keeps serving."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.rounds = 0
        self.failure: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    def __repr__(self) -> str:
        return f"<EchoWatch port={self.port} rounds={self.rounds}>"

    async def __aenter__(self) -> "EchoWatch":
        reader, self._writer = await asyncio.open_connection(HOST, self.port)
        self._task = asyncio.ensure_future(self._loop(reader, self._writer))
        await self.expect_progress()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None and self._writer is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def _loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = 0
        try:
            while True:
                line = f"watch {index}\n".encode()
                writer.write(line)
                echoed = await asyncio.wait_for(reader.readexactly(len(line)), PROMPTLY_S)
                if echoed != line:
                    self.failure = f"round {index} came back as {echoed!r}"
                    return
                self.rounds += 1
                index += 1
                await asyncio.sleep(0.01)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            self.failure = f"round {index} failed: {exc!r}"

    async def expect_progress(self, rounds: int = 3) -> None:
        """Wait until ``rounds`` more round trips succeeded; fail if one failed."""
        target = self.rounds + rounds
        await wait_until(lambda: self.rounds >= target or self.failure is not None, f"{rounds} echo round trips", PROMPTLY_S * 2)
        assert self.failure is None, f"the echo stream failed: {self.failure}"


async def open_from(address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to 127.0.0.1:``port`` from the loopback source ``address``."""
    return await asyncio.open_connection(HOST, port, local_addr=(address, 0))


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = PROMPTLY_S) -> bytes:
    """Read to EOF, counting a reset as closed too; fail if the relay keeps the connection open."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""
    except asyncio.TimeoutError:
        pytest.fail(f"the relay kept the connection open for {timeout:g} s")


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> HttpReply:
    """Read one response with a Content-Length from a keep-alive connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PROMPTLY_S)
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), PROMPTLY_S)
    return parse_http_reply(head + body)


def keep_alive_request(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def stream_url(relay: RelayHandle, target: str, query: str = "") -> str:
    url = f"{relay.url}/v1/agents/{ACCOUNT}/targets/{target}/stream"
    return f"{url}?{query}" if query else url


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if text in record.getMessage()]


@dataclass
class Firehose:
    """A desktop application that sends ``size`` bytes to every connection and counts connections."""

    port: int
    size: int
    connections: int = 0


@pytest.fixture
async def firehose() -> AsyncIterator[Firehose]:
    hose = Firehose(0, 2 * MIB)
    block = bytes(range(256)) * 256
    writers: list[asyncio.StreamWriter] = []

    async def pour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hose.connections += 1
        writers.append(writer)
        try:
            sent = 0
            while sent < hose.size:
                chunk = block[: hose.size - sent]
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
            await reader.read()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(pour, HOST, 0)
    hose.port = server.sockets[0].getsockname()[1]
    yield hose
    server.close()
    # A handler may wait in drain() for a reader that is gone.
    for writer in writers:
        writer.transport.abort()
    await server.wait_closed()


# Stream limit ----------------------------------------------------------------


async def test_stream_limit_per_agent(start_relay, start_agent, echo_port, caplog):
    caplog.set_level(logging.INFO)
    relay = await start_relay(expose=("echo",), max_streams_per_agent=4)
    # The other device connects first, so the exposed port picks the laptop,
    # the newest agent of the account.
    await start_agent(relay.url, {"echo": (HOST, echo_port)}, device="desktop-2")
    await start_agent(relay.url, {"echo": (HOST, echo_port)}, device="laptop")
    laptop = relay.relay.agents[(ACCOUNT, "laptop")]
    port = relay.port_of("echo")

    async with EchoWatch(port) as watch:
        held = [await asyncio.open_connection(HOST, port) for _ in range(3)]
        await wait_until(lambda: laptop.streams_in_use() == 4, "four open streams")

        reply = await exchange(relay.relay.port, "echo", b"over\n", "device=laptop")
        assert reply.status == 429, reply.body
        assert reply.json()["error"] == "limit_exceeded", reply.body
        assert "laptop" in reply.json()["message"], "the message should name the agent"
        assert reply.headers.get("retry-after") == "1", reply.headers

        with pytest.raises(InvalidStatus) as failure:
            async with connect(stream_url(relay, "echo", "device=laptop"), additional_headers=AUTH, proxy=None):
                pass
        assert failure.value.response.status_code == 429
        assert json.loads(failure.value.response.body)["error"] == "limit_exceeded"

        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"dropped\n")
        assert await read_until_closed(reader) == b"", "a TCP stream above the limit carried data"
        await close_writer(writer)

        other = await exchange(relay.relay.port, "echo", b"other device\n", "device=desktop-2")
        assert other.status == 200, "the limit of one agent blocked another agent"
        await watch.expect_progress()

        await close_writer(held.pop()[1])
        await wait_until(lambda: laptop.streams_in_use() < 4, "a free stream slot")
        again = await exchange(relay.relay.port, "echo", b"again\n", "device=laptop")
        assert again.status == 200, again.body
        await watch.expect_progress()

    for _reader, writer in held:
        await close_writer(writer)
    assert logged(caplog, "rejected a stream to agent"), "the rejected streams were not logged"


# Agent buffer limit ----------------------------------------------------------


async def test_agent_buffer_limit(start_relay, start_agent, echo_port, caplog):
    caplog.set_level(logging.INFO)
    relay = await start_relay(
        max_agent_buffer=1 * MIB,
        exposures=[
            Exposure(ACCOUNT, None, "echo", HOST, 0),
            Exposure(ACCOUNT, "hoarder", "sink", HOST, 0),
        ],
    )
    # An agent that grants a 64 MiB window and never acknowledges anything,
    # so the relay's resend log could only grow.
    hoarder = await connect_as_agent(relay.url, "hoarder")
    await hoarder.send(frames.encode_hello(frames.PROTOCOL_VERSION, 64 * MIB, {"targets": ["sink"]}))
    await start_agent(relay.url, {"echo": (HOST, echo_port)})

    async with EchoWatch(relay.port_of("echo")) as watch:
        reader, writer = await asyncio.open_connection(HOST, relay.relay.expose_ports[f"{ACCOUNT}/hoarder/sink"])
        try:
            hello = await receive_frame(hoarder)
            assert hello.type is FrameType.HELLO, hello
            opened = await receive_frame(hoarder)
            assert opened.type is FrameType.OPEN, opened
            await hoarder.send(frames.encode(FrameType.OPENED, opened.stream_id))
            writer.write(os.urandom(4 * MIB))

            code, reason = await wait_closed(hoarder, timeout=10)
            assert code == frames.CloseCode.POLICY_VIOLATION, (code, reason)
            assert "not acknowledged" in (reason or ""), reason
            assert await read_until_closed(reader) == b"", "the sink's cloud client got data"
        finally:
            await close_writer(writer)
        await watch.expect_progress()

    assert logged(caplog, "has not acknowledged"), "the closed session was not logged"


async def test_agent_buffer_rejects_streams(start_relay, start_agent, echo_port, caplog):
    caplog.set_level(logging.INFO)
    relay = await start_relay(expose=("echo",), max_agent_buffer=1 * MIB)
    # An agent that grants 1 KiB of credit per stream and never more, so data
    # from cloud clients waits in the relay's backlogs.
    miser = await connect_as_agent(relay.url, "miser")
    await miser.send(frames.encode_hello(frames.PROTOCOL_VERSION, 1024, {"targets": ["sink"]}))
    await start_agent(relay.url, {"echo": (HOST, echo_port)})
    entry = relay.relay.agents[(ACCOUNT, "miser")]
    sink_url = stream_url(relay, "sink", "device=miser")

    async def accept_opens() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in miser:
                frame = frames.decode(message)
                if frame.type is FrameType.OPEN:
                    await miser.send(frames.encode(FrameType.OPENED, frame.stream_id))

    acceptor = asyncio.ensure_future(accept_opens())
    streams: list[ClientConnection] = []
    try:
        async with EchoWatch(relay.port_of("echo")) as watch:
            for _ in range(2):
                stream = await connect(sink_url, additional_headers=AUTH, proxy=None)
                streams.append(stream)
                await stream.send(bytes(600 * 1024))
            await wait_until(lambda: entry.buffered_bytes() >= MIB, "1 MiB buffered for the agent")

            with pytest.raises(InvalidStatus) as failure:
                async with connect(sink_url, additional_headers=AUTH, proxy=None):
                    pass
            assert failure.value.response.status_code == 429
            payload = json.loads(failure.value.response.body)
            assert payload["error"] == "limit_exceeded", payload
            assert "bytes" in payload["message"], payload

            reply = await exchange(relay.relay.port, "echo", b"other agent\n", "device=laptop")
            assert reply.status == 200, "the buffer limit of one agent blocked another agent"
            await watch.expect_progress()
    finally:
        # The relay reads nothing more from these stalled streams, so a
        # closing handshake would wait for its time-out.
        for stream in streams:
            stream.transport.abort()
        acceptor.cancel()
        await asyncio.gather(acceptor, return_exceptions=True)
        miser.transport.abort()
    assert logged(caplog, "bytes buffered, above the limit"), "the rejected stream was not logged"


# Message size limits ---------------------------------------------------------


async def test_agent_message_limit(start_relay, start_agent, echo_port):
    relay = await start_relay(expose=("echo",), max_agent_message=70_000)
    # The real agent connects last, so the exposed port picks it.
    rogue = await connect_as_agent(relay.url, "rogue")
    await start_agent(relay.url, {"echo": (HOST, echo_port)})

    async with EchoWatch(relay.port_of("echo")) as watch:
        await rogue.send(bytes(70_001))
        code, _reason = await wait_closed(rogue)
        assert code == 1009, f"the oversized agent message closed the session with {code}"
        await watch.expect_progress()


async def test_stream_message_limit(start_relay, start_agent, echo_port):
    relay = await start_relay(expose=("echo",), max_stream_message=4096)
    await start_agent(relay.url, {"echo": (HOST, echo_port)})

    async with EchoWatch(relay.port_of("echo")) as watch:
        async with connect(stream_url(relay, "echo"), additional_headers=AUTH, proxy=None) as ws:
            await ws.send(bytes(4096))
            received = 0
            while received < 4096:
                received += len(await asyncio.wait_for(ws.recv(), PROMPTLY_S))
            await ws.send(bytes(4097))
            code, _reason = await wait_closed(ws)
        assert code == 1009, f"the oversized stream message closed the WebSocket with {code}"
        await watch.expect_progress()


async def test_stream_unread_pongs_dropped(start_relay, start_agent, echo_port, caplog):
    """A cloud WebSocket that sends pings and reads nothing is dropped at the write-buffer cap."""
    caplog.set_level(logging.INFO)
    relay = await start_relay(expose=("echo",), max_stream_message=4096)
    await start_agent(relay.url, {"echo": (HOST, echo_port)})

    async with EchoWatch(relay.port_of("echo")) as watch:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        sock.bind((ATTACKER, 0))
        await asyncio.get_running_loop().sock_connect(sock, (HOST, relay.relay.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(keep_alive_request("GET", f"/v1/agents/{ACCOUNT}/targets/echo/stream", {
            **AUTH, "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13",
        }))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PROMPTLY_S)
        assert head.startswith(b"HTTP/1.1 101"), head

        # Masked pings of 125 bytes; their pongs fill the relay's write buffer.
        mask = os.urandom(4)
        payload = bytes(125)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        ping = struct.pack("!BB", 0x89, 0x80 | len(payload)) + mask + masked
        dropped = False
        for _ in range(4000):
            try:
                writer.write(ping * 64)
                await asyncio.wait_for(writer.drain(), PROMPTLY_S)
            except (ConnectionError, asyncio.TimeoutError):
                dropped = True
                break
            if writer.transport.is_closing() or reader.at_eof():
                dropped = True
                break
        writer.transport.abort()
        assert dropped, "the relay kept buffering pongs for a client that reads nothing"
        await wait_until(lambda: bool(logged(caplog, "bytes unread")), "the log line about the unread bytes")
        await watch.expect_progress()


# HTTP size limits ------------------------------------------------------------


async def test_header_limit(start_relay, start_agent, echo_port):
    relay = await start_relay(expose=("echo",), max_header_bytes=4096)
    await start_agent(relay.url, {"echo": (HOST, echo_port)})

    async with EchoWatch(relay.port_of("echo")) as watch:
        reply = await http_request(relay.relay.port, "GET", "/healthz", headers={"X-Padding": "a" * 5000})
        assert reply.status == 431, reply.body
        assert reply.json()["error"] == "bad_request", reply.body

        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "X-Padding": "a" * 5000}
        reply = await http_request(relay.relay.port, "GET", "/v1/agent", headers=upgrade)
        assert reply.status == 431, reply.body

        ok = await http_request(relay.relay.port, "GET", "/healthz", headers={"X-Padding": "a" * 3000})
        assert ok.status == 200, ok.body
        await watch.expect_progress()


async def test_body_limit(start_relay, start_agent, echo_port):
    relay = await start_relay(expose=("echo",), max_body_bytes=2048)
    await start_agent(relay.url, {"echo": (HOST, echo_port)})

    async with EchoWatch(relay.port_of("echo")) as watch:
        declared = await http_request(relay.relay.port, "POST", "/v1/auth/login", body=b"x" * 2049)
        assert declared.status == 413, declared.body
        assert declared.json()["error"] == "body_too_large", declared.body
        assert "2048" in declared.json()["message"], "the message should give the limit"

        chunk = b"y" * 1500
        chunked = (
            b"POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
            + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection(HOST, relay.relay.port)
        writer.write(chunked)
        reply = parse_http_reply(await read_until_closed(reader))
        await close_writer(writer)
        assert reply.status == 413, reply.body

        fits = await exchange(relay.relay.port, "echo", b"z" * 2047 + b"\n")
        assert fits.status == 200, fits.body
        await watch.expect_progress()


async def test_exchange_reply_limit(start_relay, start_agent, echo_port):
    relay = await start_relay(expose=("echo",), max_exchange_reply=1000)
    await start_agent(relay.url, {"echo": (HOST, echo_port)})

    async with EchoWatch(relay.port_of("echo")) as watch:
        reply = await exchange(relay.relay.port, "echo", b"r" * 2000, "until=idle&idle_ms=300")
        assert reply.status == 502, reply.body
        assert reply.json()["error"] == "reply_too_large", reply.body

        too_many = await exchange(relay.relay.port, "echo", b"r", "until=bytes&bytes=1001")
        assert too_many.status == 400, too_many.body

        fits = await exchange(relay.relay.port, "echo", b"r" * 1000, "until=bytes&bytes=1000")
        assert fits.status == 200, fits.body
        assert len(fits.body) == 1000
        await watch.expect_progress()


# Connection limits -----------------------------------------------------------


async def test_connection_rate_limit(start_relay, start_agent, echo_port, caplog):
    caplog.set_level(logging.INFO)
    relay = await start_relay(expose=("echo",), max_connections_per_minute=20)
    await start_agent(relay.url, {"echo": (HOST, echo_port)})
    port = relay.relay.port

    async with EchoWatch(relay.port_of("echo")) as watch:
        statuses = []
        for _ in range(30):
            reader, writer = await open_from(ATTACKER, port)
            writer.write(keep_alive_request("GET", "/healthz") [:-4] + b"\r\nConnection: close\r\n\r\n")
            statuses.append(parse_http_reply(await read_until_closed(reader)))
            await close_writer(writer)
        assert statuses[0].status == 200, statuses[0].body
        limited = [reply for reply in statuses if reply.status == 429]
        assert len(limited) >= 10, f"only {len(limited)} of 30 connections were limited"
        assert limited[0].json()["error"] == "too_many_connections", limited[0].body
        assert int(limited[0].headers["retry-after"]) >= 1, limited[0].headers

        reader, writer = await open_from(ATTACKER, relay.port_of("echo"))
        writer.write(b"limited\n")
        assert await read_until_closed(reader) == b"", "an exposed port carried data above the rate limit"
        await close_writer(writer)

        healthy = await http_request(port, "GET", "/healthz")
        assert healthy.status == 200, "another address was limited too"
        await watch.expect_progress()

    # 20 or more rejections within seconds log a few lines, not one each.
    assert 1 <= len(logged(caplog, "connections per minute from that address")) <= 2, caplog.text


async def test_pending_connection_limit(start_relay, start_agent, echo_port, caplog):
    caplog.set_level(logging.INFO)
    relay = await start_relay(expose=("echo",), max_pending_connections=4)
    await start_agent(relay.url, {"echo": (HOST, echo_port)})
    port = relay.relay.port
    pending = relay.relay.pending

    async with EchoWatch(relay.port_of("echo")) as watch:
        # An authenticated keep-alive connection no longer counts as pending.
        api_reader, api_writer = await asyncio.open_connection(HOST, port)
        api_writer.write(keep_alive_request("GET", "/v1/agents", AUTH))
        assert (await read_response(api_reader)).status == 200
        await wait_until(lambda: pending.count == 0, "no pending connections")

        idle = [await open_from(ATTACKER, port) for _ in range(4)]
        await wait_until(lambda: pending.count == 4, "four pending connections")

        reader, writer = await open_from(ATTACKER, port)
        writer.write(keep_alive_request("GET", "/healthz"))
        reply = parse_http_reply(await read_until_closed(reader))
        await close_writer(writer)
        assert reply.status == 503, reply.body
        assert reply.json()["error"] == "too_many_pending_connections", reply.body
        assert reply.headers.get("retry-after") == "1", reply.headers

        api_writer.write(keep_alive_request("GET", "/v1/agents", AUTH))
        assert (await read_response(api_reader)).status == 200, "the authenticated connection stopped working"
        await watch.expect_progress()

        for _reader, idle_writer in idle:
            await close_writer(idle_writer)
        await wait_until(lambda: pending.count == 0, "the idle connections to be released")
        healthy = await http_request(port, "GET", "/healthz")
        assert healthy.status == 200, healthy.body
        await close_writer(api_writer)

    assert logged(caplog, "have not authenticated yet"), "the rejected connection was not logged"


# Time limits -----------------------------------------------------------------


async def test_header_timeout(start_relay, start_agent, echo_port):
    relay = await start_relay(expose=("echo",), header_timeout=0.5)
    await start_agent(relay.url, {"echo": (HOST, echo_port)})
    port = relay.relay.port

    async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
        with contextlib.suppress(ConnectionError):
            for byte in data:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

    async with EchoWatch(relay.port_of("echo")) as watch:
        silent = await open_from(ATTACKER, port)
        slow_head = await open_from(ATTACKER, port)
        slow_body = await open_from(ATTACKER, port)
        half_upgrade = await open_from(ATTACKER, port)
        keep_alive = await open_from(ATTACKER, port)

        slow_head[1].write(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        trickles = [
            asyncio.ensure_future(trickle(slow_head[1], b"a" * 200)),
            asyncio.ensure_future(trickle(slow_body[1], b"POST /v1/auth/login HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"{" * 100)),
        ]
        half_upgrade[1].write(b"GET /v1/agent HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n")
        keep_alive[1].write(keep_alive_request("GET", "/healthz"))
        assert (await read_response(keep_alive[0])).status == 200

        for name, (reader, _writer) in {
            "a silent client": silent,
            "a slowloris head": slow_head,
            "a slowloris body": slow_body,
            "an unfinished WebSocket handshake": half_upgrade,
            "an idle keep-alive connection": keep_alive,
        }.items():
            try:
                rest = await asyncio.wait_for(reader.read(), PROMPTLY_S)
            except ConnectionResetError:
                rest = b""
            except asyncio.TimeoutError:
                pytest.fail(f"the relay kept {name} open for {PROMPTLY_S:g} s")
            assert rest == b"", f"{name} got {rest[:100]!r}"

        for task in trickles:
            task.cancel()
        await asyncio.gather(*trickles, return_exceptions=True)
        for _reader, writer in (silent, slow_head, slow_body, half_upgrade, keep_alive):
            await close_writer(writer)
        await watch.expect_progress()


async def test_unread_responses_dropped(start_relay, start_agent, echo_port, firehose, caplog):
    """Pipelined requests from a client that reads nothing: one at a time, then dropped."""
    caplog.set_level(logging.INFO)
    relay = await start_relay(expose=("echo",), send_timeout=0.5)
    await start_agent(relay.url, {"echo": (HOST, echo_port), "hose": (HOST, firehose.port)})
    baseline = relay.relay.http_connections

    async with EchoWatch(relay.port_of("echo")) as watch:
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            sock.bind((ATTACKER, 0))
            await asyncio.get_running_loop().sock_connect(sock, (HOST, relay.relay.port))
            request = keep_alive_request("POST", f"/v1/agents/{ACCOUNT}/targets/hose/exchange?until=bytes&bytes={2 * MIB}", AUTH)
            await asyncio.get_running_loop().sock_sendall(sock, request * 20)

            await wait_until(lambda: firehose.connections >= 1, "the first exchange to reach the target")
            await wait_until(lambda: relay.relay.http_connections == baseline, "the relay to drop the client", 10)
        finally:
            sock.close()
        # The kernel's socket buffers take up to tcp_wmem's maximum (4 MiB by
        # default on Linux) of replies before the relay notices the stall,
        # so up to three of the 2 MiB replies may go out; without the stall
        # check the relay would answer all 20.
        assert firehose.connections <= 3, f"the relay answered {firehose.connections} requests of a client that read none"
        await watch.expect_progress()

    assert logged(caplog, "read none of the"), "the dropped client was not logged"


# Bad input against a relay subprocess ----------------------------------------

# Peak resident memory the attacks may add to the relay process: generous,
# but far below what unbounded buffering of the attacks would take (the
# unread-responses attack alone would buffer 8 x 40 x 2 MiB).
MEMORY_BOUND = 150 * MIB


@dataclass
class RelayProcess:
    child: Child
    port: int
    echo_port: int
    hose_port: int

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    def memory(self, field_name: str) -> int:
        """Return VmRSS or VmHWM (peak) of the relay process, in bytes."""
        status = Path(f"/proc/{self.child.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field_name} in /proc/{self.child.pid}/status")

    def reset_peak(self) -> None:
        """Reset VmHWM to the current RSS (Linux 4.0 and later)."""
        Path(f"/proc/{self.child.pid}/clear_refs").write_text("5")


@pytest.fixture
async def relay_process(spawn, tmp_path, start_agent, echo_port, firehose) -> RelayProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = spawn(python_module(
        "cloud_stub",
        "--port", "0",
        "--user", f"{ACCOUNT}:{PASSWORD}",
        "--api-key", API_KEY,
        "--expose", f"{ACCOUNT}/echo=0",
        "--expose", f"{ACCOUNT}/hose=0",
        "--data-dir", str(tmp_path / "relay-data"),
        "--header-timeout", "1",
        "--send-timeout", "1",
        "--log-level", "WARNING",
    ), env)
    url = child.stdout.wait_for(r"relay ready on (ws://\S+)").group(1)
    exposed = {}
    for _ in range(2):
        match = child.stdout.wait_for(r"exposed \S+/(\w+) on port (\d+)", occurrence=len(exposed) + 1)
        exposed[match.group(1)] = int(match.group(2))
    await start_agent(url, {"echo": (HOST, echo_port), "hose": (HOST, firehose.port)})
    return RelayProcess(child, int(url.rsplit(":", 1)[1]), exposed["echo"], exposed["hose"])


async def send_and_close(port: int, data: bytes, *, read: bool = True, timeout: float = PROMPTLY_S) -> bytes:
    """Send ``data`` from the attacker address, half-close, and read until the relay closes."""
    reader, writer = await open_from(ATTACKER, port)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        if not read:
            return b""
        try:
            return await asyncio.wait_for(reader.read(), timeout)
        except ConnectionResetError:
            return b""
    finally:
        writer.transport.abort()


def expect_client_error(raw: bytes, what: str) -> None:
    """Assert that ``raw`` is empty (closed) or one response with a client error and a JSON body.

    501 counts as one for a transfer coding the relay does not implement,
    the status that RFC 9112 (section 6.1) recommends.
    """
    if not raw:
        return
    reply = parse_http_reply(raw)
    payload = reply.json()
    client_error = 400 <= reply.status < 500 or (reply.status == 501 and payload.get("error") == "not_implemented")
    assert client_error, f"{what}: status {reply.status}: {reply.body[:200]!r}"
    assert isinstance(payload.get("error"), str) and isinstance(payload.get("message"), str), f"{what}: {payload!r}"


async def attack_random_bytes(relay: RelayProcess) -> None:
    rng = random.Random(1)
    for index in range(150):
        data = rng.randbytes(rng.randint(1, 8192))
        expect_client_error(await send_and_close(relay.port, data), f"random bytes {index}")
    for _ in range(150):
        await send_and_close(relay.echo_port, rng.randbytes(rng.randint(1, 8192)), read=False)


async def attack_oversized_headers(relay: RelayProcess) -> None:
    cases = {
        "a 1 MiB request line": b"GET /" + b"a" * MIB + b" HTTP/1.1\r\n\r\n",
        "a 100 KiB header": b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n",
        "5000 headers": b"GET /healthz HTTP/1.1\r\n" + b"X-H: v\r\n" * 5000 + b"\r\n",
        "a 100 KiB upgrade header": b"GET /v1/agent HTTP/1.1\r\nUpgrade: websocket\r\nX-Big: " + b"c" * 100_000 + b"\r\n\r\n",
        "200 upgrade headers": b"GET /v1/agent HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" + b"X-H: v\r\n" * 200 + b"\r\n",
    }
    for name, data in cases.items():
        expect_client_error(await send_and_close(relay.port, data), name)


async def attack_malformed_headers(relay: RelayProcess) -> None:
    cases = [
        b"GET /healthz HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nSpace Before : x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\n\r\n",
        b"GET /healthz\r\n\r\n",
        b"GET  /healthz  HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\nX: lf only\n\n",
        b"GET /healthz HTTP/1.1\rX: cr only\r\r",
        b"GET /health\x00z HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nX: nul\x00byte\r\n\r\n",
        b"POST /v1/auth/login HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/auth/login HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST /v1/auth/login HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"POST /v1/auth/login HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/auth/login HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"POST /v1/auth/login HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        b"GET /v1/agent HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"GET /v1/agent HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 4\r\n\r\nbody",
        b"\r\n\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),
    ]
    for index, data in enumerate(cases):
        expect_client_error(await send_and_close(relay.port, data), f"malformed request {index}: {data[:40]!r}")


async def attack_invalid_utf8(relay: RelayProcess) -> None:
    key = base64.b64encode(os.urandom(16))
    upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n"
    cases = [
        b"GET /\xff\xfe\xfd HTTP/1.1\r\n\r\n",
        b"G\xc3\x28T /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nX-Bad: \xc3\x28\xa0\xa1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nX-\xff: value\r\n\r\n",
        b"GET /v1/agents HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\xfd\r\n\r\n",
        b"GET /v1/agents HTTP/1.1\r\nX-Api-Key: \xed\xa0\x80\r\n\r\n",
        b"GET /v1/agent HTTP/1.1\r\n" + upgrade + b"Authorization: Bearer \xc3\x28\r\n\r\n",
        b"GET /v1/agent HTTP/1.1\r\n" + upgrade + b"Authorization: Bearer x\r\nDeskbridge-Device: \xff\xfe\r\n\r\n",
        b"GET /v1/agents/\xff/targets/echo/stream HTTP/1.1\r\n" + upgrade + b"\r\n",
        b"GET /v1/agents/%FF%FE/targets/%C3%28/stream HTTP/1.1\r\n" + upgrade + b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n",
        b"POST /v1/agents/%FF/targets/%C3%28/exchange HTTP/1.1\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 0\r\n\r\n",
        b"POST /v1/auth/login HTTP/1.1\r\nContent-Length: 6\r\n\r\n\xff\xfe\xfd\xfc\xfb\xfa",
        b'POST /v1/auth/login HTTP/1.1\r\nContent-Length: 36\r\n\r\n{"username": "\xc3\x28", "password": "x"}',
    ]
    for index, data in enumerate(cases):
        raw = await send_and_close(relay.port, data)
        if raw and parse_http_reply(raw).status >= 500:
            # The stream and exchange calls name an agent that is offline:
            # the one documented 5xx, with its JSON error.
            assert parse_http_reply(raw).json()["error"] == "agent_offline", f"invalid UTF-8 case {index}: {raw[:300]!r}"
            continue
        expect_client_error(raw, f"invalid UTF-8 case {index}: {data[:40]!r}")


async def attack_huge_json(relay: RelayProcess) -> None:
    def login(body: bytes) -> bytes:
        return b"POST /v1/auth/login HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body

    cases = {
        "100,000 '['": b"[" * 100_000,
        "100,000 nested objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        "a 1 MiB string": b'{"username": "' + b"u" * (MIB - 40) + b'", "password": "p"}',
        "a body over 1 MiB": b"[" + b"1," * (MIB // 2) + b"1]",
        "a 100,000-digit number": b'{"username": "a", "password": "b", "code": ' + b"9" * 100_000 + b"}",
        "200,000 keys": b"{" + b",".join(b'"k%d": 1' % index for index in range(200_000))[: MIB - 10] + b"}",
    }
    for name, body in cases.items():
        for path in (b"/v1/auth/login", b"/v1/auth/refresh"):
            data = login(body).replace(b"/v1/auth/login", path, 1)
            expect_client_error(await send_and_close(relay.port, data), f"{name} to {path.decode()}")


async def attack_unfinished_handshakes(relay: RelayProcess) -> None:
    partial = b"GET /v1/agent HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    clients = [await open_from(ATTACKER, relay.port) for _ in range(100)]
    for _reader, writer in clients:
        writer.write(partial)
    try:
        for reader, _writer in clients:
            # --header-timeout is 1 s.
            assert await read_until_closed(reader) == b"", "an unfinished handshake got a response"
    finally:
        for _reader, writer in clients:
            writer.transport.abort()


async def attack_slowloris(relay: RelayProcess) -> None:
    clients = [await open_from(ATTACKER, relay.port) for _ in range(100)]
    for _reader, writer in clients:
        writer.write(b"GET /healthz HTTP/1.1\r\n")

    async def trickle(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(40):
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)

    tasks = [asyncio.ensure_future(trickle(writer)) for _reader, writer in clients]
    try:
        for reader, _writer in clients:
            # Each keeps sending for 4 s, but --header-timeout of 1 s ends it first.
            assert await read_until_closed(reader, timeout=3.5) == b"", "a slowloris client got a response"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _reader, writer in clients:
            writer.transport.abort()


async def attack_unread_responses(relay: RelayProcess) -> None:
    loop = asyncio.get_running_loop()
    request = keep_alive_request("POST", f"/v1/agents/{ACCOUNT}/targets/hose/exchange?until=bytes&bytes={2 * MIB}", AUTH)
    sockets = []
    for _ in range(8):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        sock.bind((ATTACKER, 0))
        await loop.sock_connect(sock, (HOST, relay.port))
        await loop.sock_sendall(sock, request * 40)
        sockets.append(sock)
    try:
        # --send-timeout is 1 s: each connection is reset once it stalls.
        await wait_until(
            lambda: not any(relay_side_open(relay.port, sock.getsockname()) for sock in sockets),
            "the relay to drop every client that reads nothing",
            15,
        )
    finally:
        for sock in sockets:
            sock.close()


def relay_side_open(server_port: int, client: tuple[str, int]) -> bool:
    """Tell whether the kernel still has the relay's end of a connection from ``client``.

    Reads /proc/net/tcp (Linux), because a client whose receive window is
    full may never see the relay's reset.
    """
    local = f"0100007F:{server_port:04X}"
    address, port = client
    remote = "".join(f"{int(part):02X}" for part in reversed(address.split("."))) + f":{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return True
    return False


async def attack_garbage_after_handshake(relay: RelayProcess) -> None:
    rng = random.Random(2)
    for index in range(10):
        agent = await connect_as_agent(relay.url, f"garbage-{index}")
        agent.transport.write(rng.randbytes(4096))
        code, _reason = await wait_closed(agent)
        assert code in (1002, 1006, 1009), f"garbage after the agent handshake closed with {code}"
    for index in range(10):
        async with connect(
            f"{relay.url}/v1/agents/{ACCOUNT}/targets/echo/stream", additional_headers=AUTH, proxy=None
        ) as stream:
            stream.transport.write(rng.randbytes(4096))
            code, _reason = await wait_closed(stream)
            assert code in (1002, 1003, 1006, 1007, 1009), f"garbage on stream {index} closed with {code}"


async def attack_resets_on_exposed_port(relay: RelayProcess) -> None:
    for _ in range(300):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.setblocking(False)
        sock.bind((ATTACKER, 0))
        await asyncio.get_running_loop().sock_connect(sock, (HOST, relay.echo_port))
        sock.close()


ATTACKS: dict[str, Callable[[RelayProcess], Awaitable[None]]] = {
    "random bytes": attack_random_bytes,
    "oversized headers": attack_oversized_headers,
    "malformed headers": attack_malformed_headers,
    "invalid UTF-8": attack_invalid_utf8,
    "huge JSON": attack_huge_json,
    "unfinished handshakes": attack_unfinished_handshakes,
    "slowloris": attack_slowloris,
    "unread responses": attack_unread_responses,
    "garbage after handshake": attack_garbage_after_handshake,
    "resets on exposed port": attack_resets_on_exposed_port,
}


async def check_relay_serves(relay: RelayProcess) -> None:
    health = await http_request(relay.port, "GET", "/healthz")
    assert health.status == 200, health.body
    assert health.json()["agents"] == 1, f"the relay lists {health.json()['agents']} agents"
    reply = await exchange(relay.port, "echo", b"after the attack\n")
    assert reply.status == 200, reply.body
    assert reply.body == b"after the attack\n"
    async with connect(f"{relay.url}/v1/agents/{ACCOUNT}/targets/echo/stream", additional_headers=AUTH, proxy=None) as stream:
        await stream.send(b"stream")
        assert await asyncio.wait_for(stream.recv(), PROMPTLY_S) == b"stream"


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_bad_input(attack, relay_process):
    relay = relay_process
    await check_relay_serves(relay)
    relay.reset_peak()
    baseline = relay.memory("VmRSS")

    async with EchoWatch(relay.echo_port) as watch:
        await asyncio.wait_for(ATTACKS[attack](relay), 60)
        await watch.expect_progress()

    assert relay.child.process.poll() is None, f"the relay exited: {relay.child.output()}"
    peak = relay.memory("VmHWM")
    assert peak - baseline < MEMORY_BOUND, f"the relay's peak memory grew by {(peak - baseline) / MIB:.0f} MiB"
    await check_relay_serves(relay)
    assert "Traceback" not in relay.child.stderr.text, relay.child.stderr.text
