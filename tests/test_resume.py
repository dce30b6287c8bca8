"""Session resumption: streams outlive lost connections, sleep and relay restarts.

A fault proxy (``faultproxy.FaultProxy``) sits between the agent and the
relay. It cuts connections with a TCP reset or blackholes them, dropping
every byte without closing anything, the way a sleeping laptop or a middlebox
that lost its state does. Cloud clients talk to the relay directly and desktop
applications to the agent, so only the agent's WebSocket suffers the faults.

Most tests use a 1 s heartbeat (ping every second, pong within a second) on
both sides, so a blackholed link is found in about 2 s. They also give the
agent a 2 s connect time-out, because a connection attempt into a blackhole
hangs until that time-out. Two tests last a minute or more on purpose: a 60 s
blackhole under an interactive session, and an agent that starts while the
relay is unreachable for a minute.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from app.core import agent as agent_module
from app.core.agent import AgentState
from app.core.backoff import Backoff
from app.core.traffic import Kind, TrafficRecord
from app.core.tunnel import Tunnel
from app.demo_app import GREETING, DemoServer, QuoteFeed, format_price
from conftest import ACCOUNT, DEVICE, AgentHandle, RelayHandle, environment_timeout, free_port
from faultproxy import FaultProxy, fault_proxy, start_fault_proxy  # noqa: F401 (fault_proxy is a fixture)
from helpers_ws import AUTH, http_request, wait_until

TIMEOUT = environment_timeout(10.0)
LONG_TIMEOUT = environment_timeout(120.0)
MIB = 1024 * 1024

# Heartbeat and connect time-out of the fast tests, as the module docstring explains.
PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 2.0
# Time allowed after a link returns for the agent to reconnect and resume:
# a connection attempt stuck in the blackhole, a backoff delay of at most
# 0.5 s (the fixture's cap), the handshake and the resend.
RESUME_TIMEOUT = environment_timeout(CONNECT_TIMEOUT_S + 0.5 + 5.0)

GRACE_REASON = "the tunnel was down for longer than the grace period"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# Desktop applications ---------------------------------------------------------


class DesktopApp:
    """A loopback TCP server that plays the desktop application and counts its connections."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.connections = 0
        self.closed_connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> "DesktopApp":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            await self._handler(reader, writer)
        except* ConnectionError:
            pass
        finally:
            self.closed_connections += 1
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)

    def all_closed(self) -> bool:
        return self.closed_connections == self.connections

    async def close(self) -> None:
        """Stop listening and abort every open connection, which ends its handler."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        # Handlers are cancelled only as a last resort, because the done callback
        # of Python 3.11's start_server logs an error for a cancelled handler.
        pending: set[asyncio.Task[None]] = set()
        if self._tasks:
            _done, pending = await asyncio.wait(list(self._tasks), timeout=TIMEOUT)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


@pytest.fixture
async def desktop_app() -> AsyncIterator[Callable[[Handler], Awaitable[DesktopApp]]]:
    apps: list[DesktopApp] = []

    async def start(handler: Handler) -> DesktopApp:
        app = await DesktopApp(handler).start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()


# The agent, the proxy and the relay --------------------------------------------


@dataclass
class Rig:
    relay: RelayHandle
    proxy: FaultProxy
    agent: AgentHandle

    @property
    def agent_tunnel(self) -> Tunnel:
        tunnel = self.agent.agent.tunnel
        assert tunnel is not None, "the agent has no tunnel"
        return tunnel

    @property
    def relay_tunnel(self) -> Tunnel:
        entry = self.relay.relay.agents.get((ACCOUNT, DEVICE))
        assert entry is not None, "the relay has no session of the agent"
        return entry.tunnel

    def link_up(self) -> bool:
        """Tell whether the agent is connected and neither side waits for a resume."""
        entry = self.relay.relay.agents.get((ACCOUNT, DEVICE))
        tunnel = self.agent.agent.tunnel
        return (
            self.agent.agent.status.state is AgentState.CONNECTED
            and tunnel is not None
            and not tunnel.detached
            and entry is not None
            and entry.ready.done()
            and not entry.tunnel.detached
        )

    async def wait_link_up(self, timeout: float = RESUME_TIMEOUT) -> None:
        await wait_until(self.link_up, "the agent's link to the relay to be up on both sides", timeout)

    async def wait_resumed(self, resumes_before: int, timeout: float = RESUME_TIMEOUT) -> None:
        """Wait until both sides resumed the session once more than ``resumes_before`` times."""
        await wait_until(
            lambda: self.agent_tunnel.resumes > resumes_before and self.link_up(),
            f"the session to resume (resumes before the fault: {resumes_before})",
            timeout,
        )

    def cut(self) -> None:
        killed = self.proxy.cut()
        assert killed == 1, f"the cut reset {killed} connections, expected the agent's one"

    async def blackhole(self, seconds: float) -> None:
        self.proxy.blackhole()
        await asyncio.sleep(seconds)
        self.proxy.restore()

    def records(self, kind: Kind) -> list[TrafficRecord]:
        assert self.agent.traffic is not None, "the agent was started without record=True"
        return [record for record in self.agent.traffic.records if record.kind is kind]


StartRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
def start_rig(start_relay, start_agent, fault_proxy) -> StartRig:
    """Start a relay, a fault proxy in front of it, and an agent that connects through the proxy.

    Keywords ``relay`` and ``agent`` hold options for the relay's config and
    the agent; both default to the short heartbeat.
    """

    async def start(
        targets: dict[str, tuple[str, int]],
        *,
        relay: dict[str, object] | None = None,
        agent: dict[str, object] | None = None,
    ) -> Rig:
        relay_options: dict[str, object] = {"ping_interval": PING_INTERVAL_S, "ping_timeout": PING_TIMEOUT_S}
        relay_options.update(relay or {})
        agent_options: dict[str, object] = {
            "ping_interval": PING_INTERVAL_S,
            "ping_timeout": PING_TIMEOUT_S,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "record": True,
        }
        agent_options.update(agent or {})
        relay_handle = await start_relay(expose=tuple(targets), **relay_options)
        proxy = await start_fault_proxy(fault_proxy, relay_handle.relay.port)
        agent_handle = await start_agent(proxy.url, targets, **agent_options)
        rig = Rig(relay_handle, proxy, agent_handle)
        await rig.wait_link_up(TIMEOUT)
        return rig

    return start


async def connect_cloud(relay: RelayHandle, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", relay.port_of(target)), TIMEOUT)


async def read_line(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> str:
    line = await asyncio.wait_for(reader.readline(), timeout)
    return line.decode().rstrip("\n")


def relay_log_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("cloud_stub") and text in r.getMessage()]


def stream_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Return the relay's log lines of streams that ended with an error."""
    return relay_log_lines(caplog, "ended with an error")


# 200 MiB each way across cuts and blackholes -------------------------------------


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


def pattern_chunks(label: str, size: int, chunk_size: int = MIB) -> Iterator[bytes]:
    """Yield ``size`` pseudo-random bytes derived from ``label``, one chunk at a time."""
    for index, offset in enumerate(range(0, size, chunk_size)):
        yield hashlib.shake_256(f"{label}:{index}".encode()).digest(min(chunk_size, size - offset))


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
async def test_bulk_survives_cuts_and_blackholes(start_rig, desktop_app, caplog):
    caplog.set_level(logging.INFO)
    size = 200 * MIB
    faults = ["cut", "cut", "blackhole", "cut", "cut", "blackhole", "cut"]
    app_sent, app_received = StreamDigest(), StreamDigest()
    app_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def source_and_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(send_pattern(writer, "to the cloud", size, app_sent))
            group.create_task(receive_all(reader, app_received))
        app_done.set_result(None)

    app = await desktop_app(source_and_sink)
    rig = await start_rig({"bulk": ("127.0.0.1", app.port)})
    client_sent, client_received = StreamDigest(), StreamDigest()

    def progress() -> int:
        return client_received.size + app_received.size

    progress_at_fault: list[int] = []

    async def inject_faults() -> None:
        for index, fault in enumerate(faults):
            mark = 2 * size * (index + 1) // (len(faults) + 1)
            await wait_until(lambda: progress() >= mark, f"{mark} bytes to arrive before fault {index}", LONG_TIMEOUT)
            await rig.wait_link_up()
            resumes = rig.agent_tunnel.resumes
            progress_at_fault.append(progress())
            if fault == "cut":
                rig.cut()
            else:
                await rig.blackhole(10.0)
            await rig.wait_resumed(resumes)

    reader, writer = await connect_cloud(rig.relay, "bulk")
    async with asyncio.timeout(environment_timeout(240.0)):
        async with asyncio.TaskGroup() as group:
            group.create_task(send_pattern(writer, "to the desktop", size, client_sent))
            group.create_task(receive_all(reader, client_received))
            group.create_task(inject_faults())
        await app_done
    writer.close()

    assert len(progress_at_fault) == len(faults), f"only {len(progress_at_fault)} of {len(faults)} faults were injected"
    assert max(progress_at_fault) < 2 * size, f"a fault came after the transfer ended: progress {progress_at_fault}"
    assert client_received.size == size, f"the cloud client got EOF after {client_received.size} of {size} bytes"
    assert app_received.size == size, f"the desktop application got EOF after {app_received.size} of {size} bytes"
    assert app_received.result == client_sent.result, "the desktop application received other bytes than the client sent"
    assert client_received.result == app_sent.result, "the client received other bytes than the desktop application sent"
    assert app.connections == 1, f"the desktop application saw {app.connections} connections, expected 1"
    assert rig.agent.agent.sessions_started == 1, f"the agent started {rig.agent.agent.sessions_started} sessions, expected 1"
    assert rig.agent_tunnel.resumes >= len(faults), f"the agent resumed {rig.agent_tunnel.resumes} times"
    assert rig.relay_tunnel.resumes >= len(faults), f"the relay resumed {rig.relay_tunnel.resumes} times"
    assert rig.agent_tunnel.bytes_resent > 0, "the agent resent no bytes, so no fault hit data in flight"
    assert rig.relay_tunnel.bytes_resent > 0, "the relay resent no bytes, so no fault hit data in flight"
    errors = rig.records(Kind.ERROR)
    assert not errors, f"the agent recorded stream errors: {[e.detail for e in errors]}"
    assert not stream_errors(caplog), f"the relay logged stream errors: {stream_errors(caplog)}"


# redis through a cut ----------------------------------------------------------------


async def test_redis_pipeline_across_cut(start_rig, redis_server):
    rig = await start_rig({"redis": ("127.0.0.1", redis_server)})
    client = aioredis.Redis(
        host="127.0.0.1", port=rig.relay.port_of("redis"), single_connection_client=True, socket_timeout=RESUME_TIMEOUT
    )
    try:
        client_id = await client.client_id()
        batches, batch_size = 20, 500
        counter = 0
        cut_done = False
        for batch in range(batches):
            expected: list[object] = []
            async with client.pipeline(transaction=False) as pipe:
                for index in range(batch_size):
                    if index % 2 == 0:
                        pipe.echo(f"batch {batch} command {index}")
                        expected.append(f"batch {batch} command {index}".encode())
                    else:
                        counter += 1
                        pipe.incr("counter")
                        expected.append(counter)
                execution = asyncio.ensure_future(pipe.execute())
                if batch == batches // 2:
                    # Cut once the relay has read some of this batch from the
                    # client, so the cut lands while commands are in flight.
                    sent_before = rig.relay_tunnel.session.bytes_sent
                    await wait_until(
                        lambda: rig.relay_tunnel.session.bytes_sent > sent_before or execution.done(),
                        "the relay to forward part of the batch",
                    )
                    rig.cut()
                    cut_done = True
                replies = await asyncio.wait_for(execution, RESUME_TIMEOUT)
            mismatches = [(i, r, e) for i, (r, e) in enumerate(zip(replies, expected)) if r != e]
            assert len(replies) == batch_size, f"batch {batch} got {len(replies)} replies"
            assert not mismatches, f"batch {batch}: {len(mismatches)} replies wrong or out of order; first: {mismatches[:3]}"

        assert cut_done, "the cut never happened"
        assert rig.agent_tunnel.resumes >= 1, "the agent never resumed the session"
        assert await client.client_id() == client_id, "the redis client reconnected: its connection id changed"
        assert int(await client.get("counter")) == counter, "INCR ran another number of times than sent"
        assert not rig.records(Kind.ERROR), "the agent recorded a stream error"
    finally:
        await client.aclose()


# An interactive session through a 60 s blackhole ------------------------------------


async def test_interactive_session_survives_minute_blackhole(start_rig, desktop_app, caplog):
    caplog.set_level(logging.INFO)
    demo = DemoServer(QuoteFeed(seed=7))
    app = await desktop_app(demo.handle)
    rig = await start_rig({"quotes": ("127.0.0.1", app.port)})
    reader, writer = await connect_cloud(rig.relay, "quotes")
    try:
        assert await read_line(reader) == GREETING, "the demo application's greeting did not arrive"
        writer.write(b"ECHO before the blackhole\n")
        assert await read_line(reader) == "ECHO before the blackhole", "the command before the blackhole got a wrong answer"

        resumes = rig.agent_tunnel.resumes
        rig.proxy.blackhole()
        await wait_until(lambda: rig.agent_tunnel.detached, "the agent to notice the blackhole", TIMEOUT)
        # A command typed while the link is down waits in the resend log.
        writer.write(b"ECHO during the blackhole\n")
        await asyncio.sleep(60.0)
        rig.proxy.restore()
        await rig.wait_resumed(resumes)

        assert await read_line(reader) == "ECHO during the blackhole", "the command sent during the blackhole got a wrong answer"
        writer.write(b"QUOTE AAPL\n")
        expected_quote = f"QUOTE AAPL {format_price('AAPL', demo.feed.prices['AAPL'])}"
        assert await read_line(reader) == expected_quote, "the command after the blackhole got a wrong answer"
        writer.write(b"ECHO after the blackhole\n")
        assert await read_line(reader) == "ECHO after the blackhole", "the second command after the blackhole got a wrong answer"
    finally:
        writer.close()

    assert app.connections == 1, f"the demo application saw {app.connections} connections, expected 1"
    assert not rig.records(Kind.ERROR), f"the agent recorded stream errors: {[r.detail for r in rig.records(Kind.ERROR)]}"
    assert not stream_errors(caplog), f"the relay logged stream errors: {stream_errors(caplog)}"


# Half-open links and half-closed streams ------------------------------------------------


async def test_resume_drops_half_open_link(start_rig, desktop_app, caplog):
    caplog.set_level(logging.INFO)
    app = await desktop_app(echo)
    # A slow relay heartbeat keeps the old connection open on the relay's side
    # until the agent resumes on a new one.
    rig = await start_rig({"echo": ("127.0.0.1", app.port)}, relay={"ping_interval": 60.0, "ping_timeout": 30.0})
    reader, writer = await connect_cloud(rig.relay, "echo")
    writer.write(b"before\n")
    assert await read_line(reader) == "before", "the echo before the blackhole failed"

    resumes = rig.agent_tunnel.resumes
    rig.proxy.blackhole()
    await wait_until(lambda: rig.agent_tunnel.detached, "the agent to notice the blackhole", TIMEOUT)
    relay_noticed = rig.relay_tunnel.detached
    rig.proxy.restore()
    await rig.wait_resumed(resumes)
    writer.write(b"after\n")
    assert await read_line(reader) == "after", "the echo after the resume failed"
    writer.close()

    assert not relay_noticed, "the relay noticed the blackhole itself, so its old connection was not half-open"
    replaced = [r for r in caplog.records if "replaced by a resumed connection" in r.getMessage()]
    assert replaced, "the relay did not drop the half-open connection"
    assert rig.relay_tunnel.resumes == 1, f"the relay resumed {rig.relay_tunnel.resumes} times, expected 1"
    assert app.connections == 1, f"the desktop application saw {app.connections} connections"


async def test_half_close_during_blackhole(start_rig, desktop_app):
    async def count_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(f"received {len(data)} bytes\n".encode())
        await writer.drain()
        writer.write_eof()

    app = await desktop_app(count_then_reply)
    rig = await start_rig({"count": ("127.0.0.1", app.port)})
    reader, writer = await connect_cloud(rig.relay, "count")
    writer.write(b"a" * 100_000)
    await writer.drain()

    resumes = rig.agent_tunnel.resumes
    rig.proxy.blackhole()
    await wait_until(lambda: rig.agent_tunnel.detached, "the agent to notice the blackhole", TIMEOUT)
    # The rest of the data and the FIN cross the gap in the resend log.
    writer.write(b"b" * 100_000)
    writer.write_eof()
    await writer.drain()
    rig.proxy.restore()
    await rig.wait_resumed(resumes)
    reply = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()

    assert reply == b"received 200000 bytes\n", f"the desktop application answered {reply!r}"
    assert app.connections == 1, f"the desktop application saw {app.connections} connections"
    assert not rig.records(Kind.ERROR), f"the agent recorded stream errors: {[r.detail for r in rig.records(Kind.ERROR)]}"
    assert rig.records(Kind.CLOSED), "the stream did not end with a clean close on the agent"


# Token renewal during a network fault ----------------------------------------------------


async def test_lost_refresh_reply_keeps_signin(start_rig, desktop_app):
    app = await desktop_app(echo)
    # Access tokens of 4 s make the agent renew about every 2 s.
    rig = await start_rig({"echo": ("127.0.0.1", app.port)}, relay={"access_ttl": 4.0})
    agent = rig.agent.agent
    reader, writer = await connect_cloud(rig.relay, "echo")
    writer.write(b"before\n")
    assert await read_line(reader) == "before", "the echo before the lost reply failed"

    renewals = agent.token_renewals
    rig.proxy.lose_reply_to = b"POST /v1/auth/refresh"
    await wait_until(lambda: rig.proxy.replies_lost == 1, "a refresh reply to be lost", TIMEOUT)
    # Two more renewals outlive the access token that was current when the reply was lost.
    await wait_until(
        lambda: agent.token_renewals >= renewals + 2 or agent.status.state is AgentState.SIGNED_OUT,
        "two more renewals or a sign-out",
        TIMEOUT,
    )
    state = agent.status.state
    writer.close()

    assert state is not AgentState.SIGNED_OUT, f"one lost refresh reply signed the agent out: {agent.status.detail}"
    assert agent.sessions_started == 1, f"the agent started {agent.sessions_started} sessions, expected 1"


# Longer than the grace period -----------------------------------------------------------


async def test_gap_beyond_grace_resets(start_rig, desktop_app, caplog):
    caplog.set_level(logging.INFO)
    app_closed = asyncio.Event()

    async def echo_and_report(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await echo(reader, writer)
        finally:
            app_closed.set()

    app = await desktop_app(echo_and_report)
    rig = await start_rig({"echo": ("127.0.0.1", app.port)}, relay={"grace": 2.0}, agent={"grace": 2.0})
    reader, writer = await connect_cloud(rig.relay, "echo")
    writer.write(b"ping\n")
    assert await read_line(reader) == "ping", "the echo before the blackhole failed"

    rig.proxy.blackhole()
    # Detection takes up to 2 s on each side, then the grace period 2 s.
    try:
        tail = await asyncio.wait_for(reader.read(), TIMEOUT)
        client_outcome = f"EOF after {len(tail)} bytes"
    except ConnectionResetError:
        client_outcome = "reset"
    await asyncio.wait_for(app_closed.wait(), TIMEOUT)
    writer.close()

    assert client_outcome in ("reset", "EOF after 0 bytes"), f"the cloud client saw {client_outcome}"
    relay_lines = relay_log_lines(caplog, GRACE_REASON)
    assert relay_lines, "the relay did not log that the grace period ended"
    agent_errors = [r.detail for r in rig.records(Kind.ERROR)]
    assert any(GRACE_REASON in detail for detail in agent_errors), f"the agent's stream errors lack the reason: {agent_errors}"
    agent_lines = [r.getMessage() for r in caplog.records if r.name.startswith("app.") and GRACE_REASON in r.getMessage()]
    assert agent_lines, "the agent did not log that the grace period ended"

    # After the link returns the agent starts a new session and streams work again.
    rig.proxy.restore()
    await wait_until(lambda: rig.agent.agent.sessions_started == 2 and rig.link_up(), "a new session", RESUME_TIMEOUT)
    reader, writer = await connect_cloud(rig.relay, "echo")
    writer.write(b"again\n")
    assert await read_line(reader) == "again", "a new stream after the grace period failed"
    writer.close()


# Relay restarts -------------------------------------------------------------------------


async def crash_relay(rig: Rig) -> None:
    """Stop the relay the way a crash would: the agent's connection is reset with no closing handshake."""
    rig.cut()
    await rig.relay.relay.stop()


async def test_relay_restart_resets_streams(start_relay, start_rig, desktop_app, caplog):
    caplog.set_level(logging.INFO)
    app = await desktop_app(echo)
    port = free_port()
    # A 4 s cap in place of the default 30 s keeps the test short. The check
    # is the same: the agent is back within one cap of the relay's return.
    backoff = Backoff(base=0.5, cap=4.0)
    rig = await start_rig({"echo": ("127.0.0.1", app.port)}, relay={"port": port}, agent={"backoff": backoff})
    reader, writer = await connect_cloud(rig.relay, "echo")
    writer.write(b"before\n")
    assert await read_line(reader) == "before", "the echo before the restart failed"

    await crash_relay(rig)
    # Down long enough for the backoff to reach its cap.
    await asyncio.sleep(2 * backoff.cap)
    restarted_at = time.monotonic()
    rig.relay = await start_relay(expose=("echo",), port=port, ping_interval=PING_INTERVAL_S, ping_timeout=PING_TIMEOUT_S)
    await wait_until(
        lambda: rig.agent.agent.sessions_started == 2 and rig.link_up(),
        "the agent to connect to the restarted relay",
        backoff.cap + TIMEOUT,
    )
    back_after = time.monotonic() - restarted_at
    await wait_until(app.all_closed, "the desktop application to see its connection closed", TIMEOUT)
    writer.close()

    assert back_after <= backoff.cap + CONNECT_TIMEOUT_S, f"the agent came back {back_after:.1f} s after the restart"
    errors = [r.detail for r in rig.records(Kind.ERROR)]
    assert len(errors) == 1, f"the agent recorded {len(errors)} stream errors, expected 1: {errors}"
    assert "could not resume" in errors[0], f"the stream reset reason does not say the relay could not resume: {errors[0]}"
    assert "restarted" in errors[0], f"the stream reset reason does not name the restart: {errors[0]}"
    sessions = [r.detail for r in rig.records(Kind.SESSION)]
    assert any(d.startswith("session not resumed") for d in sessions), f"no 'session not resumed' record: {sessions}"

    reader, writer = await connect_cloud(rig.relay, "echo")
    writer.write(b"after\n")
    assert await read_line(reader) == "after", "a new stream after the restart failed"
    writer.close()


async def test_reconnects_spread_after_restart(start_relay, start_agent, fault_proxy, caplog):
    caplog.set_level(logging.INFO, logger="cloud_stub.relay")
    agents = 50
    port = free_port()
    relay = await start_relay(port=port)
    proxy = await start_fault_proxy(fault_proxy, port)
    handles = []
    for index in range(agents):
        handles.append(await start_agent(proxy.url, {}, device=f"agent-{index:02d}", backoff=Backoff()))
    await wait_until(lambda: len(relay.relay.agents) == agents, f"{agents} agents on the relay", LONG_TIMEOUT)

    killed = proxy.cut()
    assert killed == agents, f"the cut reset {killed} connections, expected {agents}"
    await relay.relay.stop()
    restarted_at = time.time()
    relay = await start_relay(port=port)
    await wait_until(
        lambda: all(h.agent.sessions_started == 2 for h in handles), "every agent to reconnect", LONG_TIMEOUT
    )

    # The relay logs each declined resume, which is every agent's first
    # connection that reached the new relay.
    first_arrival: dict[str, float] = {}
    for record in caplog.records:
        match = re.match(r"agent alice/(agent-\d+) could not resume", record.getMessage())
        if match and record.created >= restarted_at:
            first_arrival.setdefault(match.group(1), record.created)
    times = sorted(first_arrival.values())
    spread = times[-1] - times[0]
    busiest = max(sum(1 for t in times if start <= t < start + 0.1) for start in times)
    print(f"\n{len(times)} agents reached the new relay over {spread:.3f} s; at most {busiest} within 100 ms")

    assert len(times) == agents, f"only {len(times)} of {agents} agents tried to resume at the new relay"
    assert busiest < agents, f"all {agents} agents reconnected within the same 100 ms"


# Unreachable relay at start ----------------------------------------------------------------


async def test_agent_waits_out_unreachable_relay(start_relay, start_agent, fault_proxy, echo_port):
    relay = await start_relay(expose=("echo",))
    proxy = await start_fault_proxy(fault_proxy, relay.relay.port)
    backoff = Backoff()
    # The fixture signs in through the proxy before the blackhole. The agent's
    # own first request runs only after this test yields, so it meets the blackhole.
    handle = await start_agent(proxy.url, {"echo": ("127.0.0.1", echo_port)}, wait=False, backoff=backoff)
    proxy.blackhole()
    await asyncio.sleep(60.0)
    connected_early = [s for s in handle.statuses if getattr(s, "state", None) is AgentState.CONNECTED]
    proxy.restore()
    restored_at = time.monotonic()
    # An attempt in flight at the restore hangs until its 15 s time-out (the
    # token refresh or the WebSocket connect), then the backoff waits at most its cap.
    await asyncio.wait_for(handle.agent.wait_connected(), environment_timeout(15.0 + backoff.cap + 15.0))
    back_after = time.monotonic() - restored_at
    print(f"\nthe agent connected {back_after:.1f} s after the relay became reachable")

    assert not connected_early, "the agent reported connected while the relay was unreachable"
    assert handle.agent.sessions_started == 1, "the agent did not start exactly one session"
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port_of("echo"))
    writer.write(b"hello\n")
    assert await read_line(reader) == "hello", "a stream after the relay became reachable failed"
    writer.close()


# Heartbeat and sleep -----------------------------------------------------------------------


async def test_heartbeat_detects_blackhole(start_rig, echo_port):
    rig = await start_rig({"echo": ("127.0.0.1", echo_port)})
    statuses = rig.agent.statuses
    rig.proxy.blackhole()
    started = time.monotonic()
    await wait_until(lambda: rig.agent.agent.status.state is not AgentState.CONNECTED, "the agent to leave CONNECTED", TIMEOUT)
    detected_after = time.monotonic() - started
    seen = len(statuses)
    # Stay in the blackhole for a few more heartbeat and connect time-outs.
    await asyncio.sleep(3 * CONNECT_TIMEOUT_S)
    later = statuses[seen:]
    state_during = rig.agent.agent.status.state
    rig.proxy.restore()
    await rig.wait_link_up()

    limit = PING_INTERVAL_S + PING_TIMEOUT_S + 1.0
    assert detected_after <= limit, f"the blackhole was detected after {detected_after:.2f} s, limit {limit:g} s"
    assert state_during is not AgentState.CONNECTED, "the agent reports connected on a dead link"
    assert all(s.state is not AgentState.CONNECTED for s in later), "the agent reported connected during the blackhole"
    assert rig.agent_tunnel.resumes == 1, f"the agent resumed {rig.agent_tunnel.resumes} times, expected 1"


class JumpingClock:
    """A stand-in for the agent's ``time`` module whose wall clock can jump ahead, as after sleep."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


async def test_wake_from_sleep_checks_link(start_rig, desktop_app, monkeypatch):
    clock = JumpingClock()
    monkeypatch.setattr(agent_module, "time", clock)
    app = await desktop_app(echo)
    # The heartbeat alone would take 30 s, and the wake check must be much faster.
    rig = await start_rig({"echo": ("127.0.0.1", app.port)}, agent={"ping_interval": 30.0})
    reader, writer = await connect_cloud(rig.relay, "echo")
    writer.write(b"before sleep\n")
    assert await read_line(reader) == "before sleep", "the echo before the sleep failed"

    resumes = rig.agent_tunnel.resumes
    rig.proxy.blackhole()
    clock.offset += 600.0
    started = time.monotonic()
    await wait_until(lambda: rig.agent_tunnel.detached, "the agent to drop the link after waking", TIMEOUT)
    detected_after = time.monotonic() - started
    rig.proxy.restore()
    await rig.wait_resumed(resumes)
    writer.write(b"after sleep\n")
    assert await read_line(reader) == "after sleep", "the echo after the sleep failed"
    writer.close()

    # One clock check interval (1 s) plus the ping time-out, with slack.
    limit = 1.0 + PING_TIMEOUT_S + 1.5
    assert detected_after <= limit, f"the dead link was found {detected_after:.2f} s after waking, limit {limit:g} s"
    assert app.connections == 1, f"the desktop application saw {app.connections} connections"


# Traffic records and the relay's listing ---------------------------------------------------


async def test_records_and_listing_show_resume(start_rig, desktop_app):
    async def ticker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Keeps writing, so the agent has unacknowledged data when the link dies.
        for index in range(1000):
            writer.write(f"tick {index}\n".encode())
            await writer.drain()
            await asyncio.sleep(0.05)

    app = await desktop_app(ticker)
    rig = await start_rig({"ticks": ("127.0.0.1", app.port)})
    reader, writer = await connect_cloud(rig.relay, "ticks")
    assert await read_line(reader) == "tick 0", "the first tick did not arrive"

    async def listing_state() -> str:
        reply = await http_request(rig.relay.relay.port, "GET", "/v1/agents", headers=AUTH)
        agents = [a for a in reply.json()["agents"] if a["device"] == DEVICE]
        return agents[0]["state"] if agents else "missing"

    assert await listing_state() == "connected", "the relay does not list the agent as connected"
    resumes = rig.agent_tunnel.resumes
    rig.proxy.blackhole()
    states: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and "reconnecting" not in states:
        states.append(await listing_state())
        await asyncio.sleep(0.1)
    rig.proxy.restore()
    await rig.wait_resumed(resumes)
    state_after = await listing_state()

    # Every tick arrives once and in order across the gap.
    lines = [await read_line(reader) for _ in range(60)]
    writer.close()

    assert "reconnecting" in states, f"the relay never listed the agent as reconnecting; saw {sorted(set(states))}"
    assert state_after == "connected", f"the relay lists the agent as {state_after} after the resume"
    assert lines == [f"tick {i}" for i in range(1, 61)], "ticks were lost, repeated or reordered"
    sessions = [r.detail for r in rig.records(Kind.SESSION)]
    lost = [d for d in sessions if d.startswith("connection lost")]
    assert lost, f"no 'connection lost' record: {sessions}"
    resumed = [re.match(r"session resumed: (\d+) streams kept, (\d+) bytes resent", d) for d in sessions]
    resumed_matches = [m for m in resumed if m]
    assert resumed_matches, f"no 'session resumed ... bytes resent' record: {sessions}"
    assert int(resumed_matches[0].group(1)) == 1, f"the resume kept {resumed_matches[0].group(1)} streams, expected 1"
    assert int(resumed_matches[0].group(2)) > 0, "the resume resent no bytes although the application kept writing"
