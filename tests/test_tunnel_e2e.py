"""End-to-end tunnel tests: cloud client, relay, agent and desktop application.

The relay and the agent run in this process, as the conftest fixtures start
them. A cloud client connects to a TCP port the relay exposes, the relay opens
a stream over the agent's WebSocket, and the agent connects to a desktop
application: a real redis-server or a small asyncio server defined here.
Everything listens on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from app.core.bridge import WRITE_HIGH_WATER, SocketBridge
from app.core.frames import MAX_DATA_PAYLOAD
from app.core.session import DEFAULT_WINDOW
from app.core.tunnel import Tunnel
from conftest import ACCOUNT, DEVICE, AgentHandle, RelayHandle, environment_timeout

TIMEOUT = environment_timeout(10.0)
LONG_TIMEOUT = environment_timeout(120.0)
MIB = 1024 * 1024

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# Data -----------------------------------------------------------------------


def pattern_chunks(label: str, size: int, chunk_size: int = MIB) -> Iterator[bytes]:
    """Yield ``size`` pseudo-random bytes derived from ``label``, one chunk at a time."""
    for index, offset in enumerate(range(0, size, chunk_size)):
        yield hashlib.shake_256(f"{label}:{index}".encode()).digest(min(chunk_size, size - offset))


def pattern(label: str, size: int) -> bytes:
    return b"".join(pattern_chunks(label, size))


# Waiting --------------------------------------------------------------------


async def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Poll ``condition`` until it is true, or return False once ``timeout`` seconds have passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), TIMEOUT)
    except ConnectionError:
        pass


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# Desktop applications -------------------------------------------------------


class AppServer:
    """A loopback TCP server that plays the desktop application.

    It keeps its connection tasks so that ``close`` can cancel the ones still
    running, such as a slow reader that would otherwise outlive the test.
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.server = await asyncio.start_server(self._serve, host, port)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handler(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


@pytest.fixture
async def app_server() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    """Start a desktop application that runs a handler per connection, and return its port."""
    servers: list[AppServer] = []

    async def start(handler: Handler, host: str = "127.0.0.1") -> int:
        server = AppServer(handler)
        servers.append(server)
        return await server.start(host)

    yield start
    for server in servers:
        await server.close()


# Tunnel ---------------------------------------------------------------------


async def open_tunnel(
    start_relay: Callable[..., Awaitable[RelayHandle]],
    start_agent: Callable[..., Awaitable[AgentHandle]],
    targets: dict[str, tuple[str, int]],
) -> tuple[RelayHandle, AgentHandle]:
    """Start a relay that exposes every target and an agent that serves them."""
    relay = await start_relay(expose=tuple(targets))
    agent = await start_agent(relay.url, targets)
    # The agent counts as connected once the relay's HELLO arrived, but the
    # relay takes cloud clients only after the agent's HELLO arrived too.
    ready = await wait_until(lambda: relay.relay.find_agent(ACCOUNT) is not None)
    assert ready, "the relay never saw the agent's HELLO"
    return relay, agent


def relay_tunnel(relay: RelayHandle) -> Tunnel:
    return relay.relay.agents[(ACCOUNT, DEVICE)].tunnel


def agent_tunnel(agent: AgentHandle) -> Tunnel:
    tunnel = agent.agent.tunnel
    assert tunnel is not None, "the agent has no tunnel"
    return tunnel


def bridges_of(tunnel: Tunnel, target: str) -> list[SocketBridge]:
    return [h for h in tunnel.handlers.values() if isinstance(h, SocketBridge) and h.target == target]


async def connect(relay: RelayHandle, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", relay.port_of(target)), TIMEOUT)


# redis-server as the desktop application ------------------------------------


@pytest.fixture
async def redis_client(start_relay, start_agent, redis_server) -> AsyncIterator[aioredis.Redis]:
    relay, _agent = await open_tunnel(start_relay, start_agent, {"redis": ("127.0.0.1", redis_server)})
    client = aioredis.Redis(host="127.0.0.1", port=relay.port_of("redis"), socket_timeout=TIMEOUT)
    yield client
    await client.aclose()


async def test_redis_set_get(redis_client):
    assert await redis_client.set("greeting", "hello through the tunnel") is True
    assert await redis_client.get("greeting") == b"hello through the tunnel"


async def test_redis_ten_mib_value(redis_client):
    value = pattern("redis value", 10 * MIB)

    assert await redis_client.set("large", value) is True
    stored = await redis_client.get("large")

    assert stored is not None, "the value is missing"
    assert len(stored) == len(value), "the value came back with another length"
    assert stored == value, "the value came back with other bytes"


async def test_redis_ten_thousand_pipelined(redis_client):
    # ECHO replies name their command and INCR replies count, so every reply
    # shows both that it is right and that it is in its place.
    count = 10_000
    expected: list[object] = []
    async with redis_client.pipeline(transaction=False) as pipe:
        for index in range(count):
            if index % 2 == 0:
                pipe.echo(f"command {index}")
                expected.append(f"command {index}".encode())
            else:
                pipe.incr("counter")
                expected.append(index // 2 + 1)
        replies = await pipe.execute()

    assert len(replies) == count
    mismatches = [(i, r, e) for i, (r, e) in enumerate(zip(replies, expected)) if r != e]
    assert not mismatches, f"{len(mismatches)} replies are wrong or out of order; first: {mismatches[:3]}"


# 100 MiB each way on one stream ---------------------------------------------


class StreamDigest:
    """SHA-256 and byte count of everything that went one way."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)

    @property
    def result(self) -> tuple[int, str]:
        return self.size, self.sha.hexdigest()


async def send_pattern(writer: asyncio.StreamWriter, label: str, size: int, digest: StreamDigest) -> None:
    for chunk in pattern_chunks(label, size):
        digest.update(chunk)
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()


async def receive_all(reader: asyncio.StreamReader, digest: StreamDigest) -> None:
    while data := await reader.read(MIB):
        digest.update(data)


@pytest.mark.slow
async def test_hundred_mib_each_way(start_relay, start_agent, app_server):
    size = 100 * MIB
    app_sent, app_received = StreamDigest(), StreamDigest()
    app_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def source_and_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(send_pattern(writer, "to the cloud", size, app_sent))
            group.create_task(receive_all(reader, app_received))
        app_done.set_result(None)

    port = await app_server(source_and_sink)
    relay, _agent = await open_tunnel(start_relay, start_agent, {"bulk": ("127.0.0.1", port)})
    client_sent, client_received = StreamDigest(), StreamDigest()

    reader, writer = await connect(relay, "bulk")
    async with asyncio.timeout(LONG_TIMEOUT):
        async with asyncio.TaskGroup() as group:
            group.create_task(send_pattern(writer, "to the desktop", size, client_sent))
            group.create_task(receive_all(reader, client_received))
        await app_done
    await close_writer(writer)

    assert client_sent.size == size
    assert app_sent.size == size
    assert app_received.result == client_sent.result, "the desktop application received other bytes than the client sent"
    assert client_received.result == app_sent.result, "the client received other bytes than the desktop application sent"


# A slow desktop application stalls only its own stream ----------------------


class SlowReader:
    """A desktop application that reads 1 KiB per second and never replies."""

    def __init__(self) -> None:
        self.received = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            self.received += len(data)
            await asyncio.sleep(1.0)


# Bytes of one stalled stream that this process may hold. The relay keeps at
# most one socket read in its backlog, sends at most one window ahead, and the
# agent's socket write buffer grows to at most a window plus its high-water
# mark. That adds up to about 1 MiB, so 2 MiB leaves room to spare.
STREAM_BUFFER_BOUND = 2 * MIB


class StalledStream:
    """A cloud client that writes to a slow desktop application until the tunnel stalls it.

    ``start`` returns once the back-pressure reached the client: the relay
    stopped reading the client's socket and the agent's socket write buffer is
    above its high-water mark, so the agent grants no more credit.
    """

    def __init__(self, relay: RelayHandle, agent: AgentHandle, target: str) -> None:
        self.relay = relay
        self.agent = agent
        self.target = target
        self.written = 0

    async def start(self) -> None:
        _reader, self.writer = await connect(self.relay, self.target)
        self.writing = asyncio.ensure_future(self._keep_writing())
        assert await wait_until(self._both_ends_connected), "the slow stream never connected on both sides"
        self.relay_end = bridges_of(relay_tunnel(self.relay), self.target)[0]
        self.agent_end = bridges_of(agent_tunnel(self.agent), self.target)[0]

        await wait_until(lambda: self.stalled() or self.writing.done(), timeout=environment_timeout(30.0))
        assert self.stalled(), (
            f"back-pressure never reached the cloud client: relay read {self.relay_end.bytes_from_socket} bytes, "
            f"agent wrote {self.agent_end.bytes_to_socket}, client wrote {self.written}"
        )

    async def stop(self) -> None:
        self.writing.cancel()
        await asyncio.gather(self.writing, return_exceptions=True)
        self.writer.transport.abort()

    async def _keep_writing(self) -> None:
        chunk = pattern("slow stream", MAX_DATA_PAYLOAD)
        # Bounded so a tunnel without flow control ends the loop, not the machine.
        while self.written < 64 * MIB:
            self.writer.write(chunk)
            self.written += len(chunk)
            await self.writer.drain()

    def _both_ends_connected(self) -> bool:
        ends = bridges_of(relay_tunnel(self.relay), self.target) + bridges_of(agent_tunnel(self.agent), self.target)
        return len(ends) == 2 and all(end.transport is not None for end in ends)

    def stalled(self) -> bool:
        relay_transport, agent_transport = self.relay_end.transport, self.agent_end.transport
        assert relay_transport is not None and agent_transport is not None
        return not relay_transport.is_reading() and agent_transport.get_write_buffer_size() >= WRITE_HIGH_WATER

    def held_in_process(self) -> int:
        """Count the bytes that the relay read from the client and the desktop socket did not take yet."""
        assert self.agent_end.transport is not None
        in_flight = self.relay_end.bytes_from_socket - self.agent_end.bytes_to_socket
        return in_flight + self.agent_end.transport.get_write_buffer_size()

    def max_backlog(self) -> int:
        relay_backlog = relay_tunnel(self.relay).session.backlog_size(self.relay_end.stream_id)
        agent_backlog = agent_tunnel(self.agent).session.backlog_size(self.agent_end.stream_id)
        return max(relay_backlog, agent_backlog)


async def test_slow_app_stalls_only_its_stream(start_relay, start_agent, app_server, echo_port):
    slow = SlowReader()
    slow_port = await app_server(slow.handle)
    relay, agent = await open_tunnel(
        start_relay, start_agent, {"slow": ("127.0.0.1", slow_port), "echo": ("127.0.0.1", echo_port)}
    )
    stream = StalledStream(relay, agent, "slow")
    try:
        await stream.start()
        accepted_at_stall = stream.relay_end.bytes_from_socket
        max_held, max_backlog = stream.held_in_process(), stream.max_backlog()

        # The other stream keeps echoing while the slow one is stalled.
        echo_reader, echo_writer = await connect(relay, "echo")
        for index in range(200):
            message = f"round trip {index}\n".encode()
            echo_writer.write(message)
            reply = await asyncio.wait_for(echo_reader.readexactly(len(message)), TIMEOUT)
            assert reply == message, f"round trip {index} came back as {reply!r}"
            max_held = max(max_held, stream.held_in_process())
            max_backlog = max(max_backlog, stream.max_backlog())
        await close_writer(echo_writer)

        accepted = stream.relay_end.bytes_from_socket
        # The writer task yields only where drain() blocks, so while it runs
        # the client's socket rejects data and the rest waits in its buffer.
        assert not stream.writing.done(), f"the tunnel took all {stream.written} bytes the cloud client wrote"
        assert stream.writer.transport.get_write_buffer_size() > 0, "the cloud client's socket still takes data"
        # WINDOW frames already on their way at the stall may add one window.
        assert accepted <= accepted_at_stall + DEFAULT_WINDOW, (
            f"the tunnel kept reading the stalled client: {accepted_at_stall} bytes at the stall, {accepted} later"
        )
        assert max_held <= STREAM_BUFFER_BOUND, f"the tunnel held up to {max_held} bytes of one stalled stream"
        assert max_backlog <= STREAM_BUFFER_BOUND, f"a session backlog of the stalled stream reached {max_backlog} bytes"
        assert slow.received < DEFAULT_WINDOW, f"the slow application read {slow.received} bytes, so it did not stall the stream"
    finally:
        await stream.stop()


async def test_client_reset_while_stalled(start_relay, start_agent, app_server):
    """A cloud client that resets its connection ends its stream even while the stream is stalled."""
    slow = SlowReader()
    slow_port = await app_server(slow.handle)
    relay, agent = await open_tunnel(start_relay, start_agent, {"slow": ("127.0.0.1", slow_port)})
    stream = StalledStream(relay, agent, "slow")
    try:
        await stream.start()
        sid = stream.relay_end.stream_id

        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        client_socket = stream.writer.get_extra_info("socket")
        client_socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.stop()

        relay_dropped = await wait_until(lambda: sid not in relay_tunnel(relay).handlers)
        assert relay_dropped, "the relay kept the stream of a cloud client that reset its connection"
        agent_dropped = await wait_until(lambda: sid not in agent_tunnel(agent).handlers)
        assert agent_dropped, "the agent kept the stream of a cloud client that reset its connection"
        assert stream.agent_end.transport is not None and stream.agent_end.transport.is_closing(), (
            "the agent kept its connection to the desktop application open"
        )
    finally:
        await stream.stop()


# Half-close in both directions ----------------------------------------------


async def test_client_half_close_gets_reply(start_relay, start_agent, app_server):
    request = pattern("request", 64 * 1024)
    reply = pattern("reply", 4 * MIB)
    received = bytearray()

    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.read())
        writer.write(reply)
        await writer.drain()

    port = await app_server(reply_after_eof)
    relay, _agent = await open_tunnel(start_relay, start_agent, {"app": ("127.0.0.1", port)})

    reader, writer = await connect(relay, "app")
    writer.write(request)
    writer.write_eof()
    answer = await read_to_eof(reader)
    await close_writer(writer)

    assert bytes(received) == request, "the desktop application did not get the whole request"
    assert len(answer) == len(reply), "the client got a reply of another length after its half-close"
    assert answer == reply, "the client got other bytes after its half-close"


async def test_app_half_close_still_receives(start_relay, start_agent, app_server):
    greeting = b"the desktop application is done talking\n"
    payload = pattern("after the application's EOF", 2 * MIB)
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        writer.write_eof()
        await writer.drain()
        received.set_result(await reader.read())

    port = await app_server(greet_then_listen)
    relay, _agent = await open_tunnel(start_relay, start_agent, {"app": ("127.0.0.1", port)})

    reader, writer = await connect(relay, "app")
    greeting_received = await read_to_eof(reader)
    writer.write(payload)
    writer.write_eof()
    await writer.drain()
    got = await asyncio.wait_for(received, TIMEOUT)
    await close_writer(writer)

    assert greeting_received == greeting
    assert len(got) == len(payload), "the desktop application got another length after its own EOF"
    assert got == payload, "the desktop application got other bytes after its own EOF"


# A desktop application that speaks first and closes at once -----------------


GREETING = b"220 desktop application ready; goodbye\r\n" * 100


async def greet_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(GREETING)
    writer.close()


async def fetch_greeting(relay: RelayHandle) -> bytes:
    reader, writer = await connect(relay, "greeter")
    try:
        return await read_to_eof(reader)
    finally:
        await close_writer(writer)


async def test_greeting_then_close_sequential(start_relay, start_agent, app_server):
    port = await app_server(greet_and_close)
    relay, _agent = await open_tunnel(start_relay, start_agent, {"greeter": ("127.0.0.1", port)})

    for run in range(200):
        received = await fetch_greeting(relay)
        assert received == GREETING, f"run {run}: the client got {len(received)} of {len(GREETING)} bytes"


async def test_greeting_then_close_concurrent(start_relay, start_agent, app_server):
    port = await app_server(greet_and_close)
    relay, _agent = await open_tunnel(start_relay, start_agent, {"greeter": ("127.0.0.1", port)})

    for batch in range(4):
        greetings = await asyncio.gather(*(fetch_greeting(relay) for _ in range(50)))
        short = [len(greeting) for greeting in greetings if greeting != GREETING]
        assert not short, f"batch {batch}: {len(short)} of 50 clients got a cut greeting, lengths {short[:5]}"


# Closing one end closes the other -------------------------------------------


async def test_client_close_reaches_app(start_relay, start_agent, app_server):
    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def read_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(await reader.read())

    port = await app_server(read_until_eof)
    relay, _agent = await open_tunnel(start_relay, start_agent, {"app": ("127.0.0.1", port)})

    _reader, writer = await connect(relay, "app")
    writer.write(b"last words")
    await close_writer(writer)

    assert await asyncio.wait_for(seen, TIMEOUT) == b"last words"


async def test_app_close_reaches_client(start_relay, start_agent, app_server):
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(b"answer to " + line)

    port = await app_server(answer_once)
    relay, _agent = await open_tunnel(start_relay, start_agent, {"app": ("127.0.0.1", port)})

    reader, writer = await connect(relay, "app")
    writer.write(b"question\n")
    reply = await read_to_eof(reader)
    await close_writer(writer)

    assert reply == b"answer to question\n"


async def test_short_connections_leave_nothing(start_relay, start_agent, echo_port):
    relay, agent = await open_tunnel(start_relay, start_agent, {"echo": ("127.0.0.1", echo_port)})
    fds_before = open_fd_count()

    async def round_trips(worker: int, count: int) -> None:
        for index in range(count):
            reader, writer = await connect(relay, "echo")
            message = f"worker {worker} connection {index}\n".encode()
            writer.write(message)
            reply = await asyncio.wait_for(reader.readexactly(len(message)), TIMEOUT)
            await close_writer(writer)
            assert reply == message

    await asyncio.gather(*(round_trips(worker, 50) for worker in range(10)))

    relay_side, agent_side = relay_tunnel(relay), agent_tunnel(agent)
    relay_clear = await wait_until(lambda: not relay_side.handlers and not relay_side.session.stream_ids)
    assert relay_clear, f"the relay still has streams {relay_side.session.stream_ids}, handlers {relay_side.handlers}"
    agent_clear = await wait_until(lambda: not agent_side.handlers and not agent_side.session.stream_ids)
    assert agent_clear, f"the agent still has streams {agent_side.session.stream_ids}, handlers {agent_side.handlers}"
    fds_back = await wait_until(lambda: open_fd_count() <= fds_before)
    assert fds_back, f"{open_fd_count() - fds_before} more file descriptors are open than before the connections"


# The agent tries every address of a host name -------------------------------


def loopback_available(family: socket.AddressFamily, host: str) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True


def localhost_addresses() -> set[str]:
    return {str(info[4][0]) for info in socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)}


async def greet_with_address(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    host = writer.get_extra_info("sockname")[0]
    writer.write(f"listening on {host}\n".encode())
    await writer.drain()


@pytest.mark.parametrize("listen_host", ["127.0.0.1", "::1"])
async def test_localhost_target_one_family(start_relay, start_agent, app_server, listen_host):
    family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
    if not loopback_available(family, listen_host):
        pytest.skip(f"this machine has no {listen_host} loopback address")
    if listen_host not in localhost_addresses():
        pytest.skip(f"'localhost' does not resolve to {listen_host} on this machine (see /etc/hosts)")
    port = await app_server(greet_with_address, host=listen_host)
    relay, _agent = await open_tunnel(start_relay, start_agent, {"app": ("localhost", port)})

    reader, writer = await connect(relay, "app")
    greeting_received = await read_to_eof(reader)
    await close_writer(writer)

    assert greeting_received == f"listening on {listen_host}\n".encode()


@pytest.mark.parametrize(("listen_host", "other_host"), [("127.0.0.1", "::1"), ("::1", "127.0.0.1")])
async def test_localhost_falls_back_to_next_address(
    start_relay, start_agent, app_server, monkeypatch, listen_host, other_host
):
    """'localhost' resolves to both loopback addresses, the one without a listener first.

    The machine's resolver may list only one address for 'localhost', so the
    loop's getaddrinfo returns both for that name, in this order. Every socket
    is real.
    """
    for host in (listen_host, other_host):
        if not loopback_available(socket.AF_INET6 if ":" in host else socket.AF_INET, host):
            pytest.skip(f"this machine has no {host} loopback address")
    port = await app_server(greet_with_address, host=listen_host)
    # A socket that is bound but does not listen makes sure that connecting to
    # the other address is refused, whatever else runs on this machine.
    other_family = socket.AF_INET6 if ":" in other_host else socket.AF_INET
    placeholder = socket.socket(other_family, socket.SOCK_STREAM)
    try:
        placeholder.bind((other_host, port))
        loop = asyncio.get_running_loop()
        system_getaddrinfo = loop.getaddrinfo

        async def both_loopbacks(host, port, *args, **kwargs):
            if host != "localhost":
                return await system_getaddrinfo(host, port, *args, **kwargs)
            first = await system_getaddrinfo(other_host, port, *args, **kwargs)
            second = await system_getaddrinfo(listen_host, port, *args, **kwargs)
            return first + second

        monkeypatch.setattr(loop, "getaddrinfo", both_loopbacks)
        relay, _agent = await open_tunnel(start_relay, start_agent, {"app": ("localhost", port)})

        reader, writer = await connect(relay, "app")
        greeting_received = await read_to_eof(reader)
        await close_writer(writer)
    finally:
        placeholder.close()

    assert greeting_received == f"listening on {listen_host}\n".encode()
