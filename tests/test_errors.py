"""Error paths: unreachable targets, an offline agent, a relay that starts late,
broken tunnel frames, replaced sessions and a rejected sign-in.

Every case checks both what the cloud client receives and that the agent or relay
keeps serving the good traffic around it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from app.core import frames
from app.core.agent import AgentState
from app.core.auth import login
from app.core.errors import SignInError
from app.core.frames import FrameType
from cloud_stub.relay import AGENT_MAX_MESSAGE, Exposure
from conftest import ACCOUNT, DEVICE, PASSWORD, AgentHandle, RelayHandle
from helpers_ws import (
    AUTH,
    connect_as_agent,
    exchange,
    hello_message,
    http_request,
    receive_frame,
    wait_closed,
    wait_until,
)

PROMPTLY_S = 5.0


async def echo_round_trip(port: int, payload: bytes) -> bytes:
    """Send ``payload`` through an exposed port and read the same number of bytes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), PROMPTLY_S)
    finally:
        writer.close()
        await writer.wait_closed()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Read to EOF, counting a reset as closed too, and fail if the socket stays open."""
    try:
        return await asyncio.wait_for(reader.read(), PROMPTLY_S)
    except ConnectionResetError:
        return b""
    except asyncio.TimeoutError:
        pytest.fail(f"the relay kept the cloud client's connection open for {PROMPTLY_S:g} s")


@pytest.fixture
def refused_port() -> Iterator[int]:
    """Return a loopback port that refuses connections because it is bound but not listening.

    Binding keeps other processes from taking the port during the test.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


# Stream open failures --------------------------------------------------------


@dataclass(frozen=True)
class FailingTarget:
    relay: RelayHandle
    agent: AgentHandle
    name: str
    status: int
    error: str
    log_text: str


@pytest.fixture(params=["refused", "unknown", "not_allowlisted"])
async def failing_target(request, start_relay, start_agent, echo_port, refused_port) -> FailingTarget:
    """A relay exposing "echo" and one target whose streams cannot open.

    refused: the agent allows the target but nothing listens on its port.
    unknown: the relay exposes a name the agent has never heard of.
    not_allowlisted: the relay names a real, listening address instead of a
    target name; the agent must not connect to it.
    """
    case = request.param
    if case == "refused":
        name, status, error, log_text = "dead", 502, "target_refused", "connection refused"
    elif case == "unknown":
        name, status, error, log_text = "ghost", 404, "unknown_target", "not in this agent's allowlist"
    else:
        name, status, error, log_text = f"127.0.0.1:{echo_port}", 404, "unknown_target", "not in this agent's allowlist"
    relay = await start_relay(expose=("echo", name))
    targets = {"echo": ("127.0.0.1", echo_port), "dead": ("127.0.0.1", refused_port)}
    agent = await start_agent(relay.url, targets)
    return FailingTarget(relay, agent, name, status, error, log_text)


async def test_exposed_port_closes_on_open_failure(failing_target):
    port = failing_target.relay.port_of(failing_target.name)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PING\r\n")

    data = await read_until_closed(reader)
    writer.close()

    assert data == b"", f"the cloud client received {data!r} from a stream that never opened"


async def test_exchange_reports_open_failure(failing_target):
    reply = await exchange(failing_target.relay.relay.port, failing_target.name, b"PING\r\n")
    payload = reply.json()

    if ":" in failing_target.name:
        # The relay rejects an address in place of a target name before any
        # agent sees it; only an exposed port (configured by the operator) can name one.
        assert reply.status == 400, payload
        assert payload["error"] == "invalid_request", payload
        return
    assert reply.status == failing_target.status, payload
    assert payload["error"] == failing_target.error, payload
    assert repr(failing_target.name) in payload["message"], "the message should name the target"
    assert failing_target.log_text in payload["message"]


async def test_agent_logs_and_survives_failure(failing_target, caplog):
    caplog.set_level(logging.INFO)
    relay, agent = failing_target.relay, failing_target.agent
    if ":" in failing_target.name:
        _reader, writer = await asyncio.open_connection("127.0.0.1", relay.port_of(failing_target.name))
        writer.write(b"PING\r\n")
        await read_until_closed(_reader)
        writer.close()
    else:
        await exchange(relay.relay.port, failing_target.name, b"PING\r\n")

    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.name == "app.core.agent" and record.levelno == logging.WARNING
    ]
    assert any(
        repr(failing_target.name) in text and failing_target.log_text in text for text in warnings
    ), f"no agent warning about {failing_target.name!r}: {warnings}"

    reply = await echo_round_trip(relay.port_of("echo"), b"still serving\n")
    assert reply == b"still serving\n"
    assert agent.agent.status.state is AgentState.CONNECTED
    assert agent.agent.sessions_started == 1, "the agent reconnected instead of keeping its session"
    assert not agent.task.done()


# Agent offline ---------------------------------------------------------------


@pytest.mark.parametrize("history", ["never_connected", "stopped"])
async def test_offline_agent_closes_and_returns_503(history, start_relay, start_agent, echo_port, caplog):
    caplog.set_level(logging.INFO)
    relay = await start_relay(expose=("echo",))
    if history == "stopped":
        handle = await start_agent(relay.url, {"echo": ("127.0.0.1", echo_port)})
        await handle.agent.stop()
        await wait_until(lambda: not relay.relay.agents, "the relay to drop the stopped agent")

    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port_of("echo"))
    data = await read_until_closed(reader)
    writer.close()
    reply = await exchange(relay.relay.port, "echo", b"PING\r\n")

    assert data == b""
    assert reply.status == 503
    assert reply.json()["error"] == "agent_offline"
    assert any("agent offline" in record.getMessage() for record in caplog.records if record.name == "cloud_stub.relay")


# Relay down at agent start -----------------------------------------------------


async def test_agent_waits_for_late_relay(start_relay, start_agent, echo_port, caplog):
    caplog.set_level(logging.INFO)
    first = await start_relay()
    url, port = first.url, first.relay.port
    tokens = await login(url, ACCOUNT, PASSWORD)
    await first.relay.stop()

    handle = await start_agent(url, {"echo": ("127.0.0.1", echo_port)}, wait=False, sign_in=False)
    assert tokens.refresh_token is not None
    await handle.store.set(url, ACCOUNT, tokens.refresh_token)
    await wait_until(
        lambda: sum(status.state is AgentState.WAITING for status in handle.statuses) >= 2,
        "two failed connection attempts",
    )
    second = await start_relay(expose=("echo",), port=port)
    await asyncio.wait_for(handle.agent.wait_connected(), 10)

    states = [status.state for status in handle.statuses]
    assert states[0] is AgentState.CONNECTING
    assert states[-1] is AgentState.CONNECTED
    assert AgentState.WAITING in states
    assert AgentState.SIGNED_OUT not in states, f"a refused connection was treated as a sign-in failure: {states}"
    assert AgentState.STOPPED not in states
    assert not handle.task.done(), "the agent's run loop ended"
    assert any(
        "cannot reach relay" in record.getMessage() for record in caplog.records if record.name == "app.core.agent"
    ), "the agent should log each failed attempt"
    reply = await echo_round_trip(second.port_of("echo"), b"late relay\n")
    assert reply == b"late relay\n"


# Broken frames from a hand-made agent ------------------------------------------

BAD_DEVICE = "intruder"
HELLO = hello_message(BAD_DEVICE, ("echo",))
# (messages sent after the WebSocket opens, expected close code, text in the reason)
BAD_SESSIONS = {
    "truncated": ([HELLO, b"\x05\x00\x00"], 1002, "shorter than the 5-byte header"),
    "unknown_type": ([HELLO, b"\x7f\x00\x00\x00\x02payload"], 1002, "unknown frame type 0x7f"),
    "oversized_data": (
        [HELLO, frames.encode(FrameType.DATA, 2, bytes(frames.MAX_DATA_PAYLOAD + 1))],
        1002,
        "exceeds the limit of 65536",
    ),
    "unopened_stream": ([HELLO, frames.encode(FrameType.DATA, 2, b"x")], 1002, "never opened"),
    "before_hello": ([frames.encode(FrameType.DATA, 2, b"x")], 1002, "expected HELLO first"),
    "hello_twice": ([HELLO, HELLO], 1002, "HELLO received twice"),
    "wrong_version": ([frames.encode_hello(99, 65536, {})], 4002, "version 99"),
    "text_message": ([HELLO, "hello"], 1003, "text messages are not supported"),
    "way_oversized": (
        [HELLO, frames.encode(FrameType.DATA, 2, bytes(AGENT_MAX_MESSAGE + 1))],
        1009,
        "exceeds limit",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SESSIONS))
async def test_relay_ends_broken_agent_session(case, start_relay, start_agent, echo_port, caplog):
    caplog.set_level(logging.INFO)
    messages, expected_code, reason_text = BAD_SESSIONS[case]
    # Pin the exposure to the real agent so that new streams reach it even
    # while the hand-made agent of the same account is connected.
    relay = await start_relay(exposures=[Exposure(ACCOUNT, DEVICE, "echo", "127.0.0.1", 0)])
    echo = relay.relay.expose_ports[f"{ACCOUNT}/{DEVICE}/echo"]
    await start_agent(relay.url, {"echo": ("127.0.0.1", echo_port)})
    reader, writer = await asyncio.open_connection("127.0.0.1", echo)
    writer.write(b"before\n")
    assert await asyncio.wait_for(reader.readexactly(7), PROMPTLY_S) == b"before\n"

    ws = await connect_as_agent(relay.url, BAD_DEVICE)
    hello = await receive_frame(ws)
    assert hello.type is FrameType.HELLO
    assert await echo_round_trip(echo, b"during\n") == b"during\n"
    for message in messages:
        await ws.send(message)
    code, reason = await wait_closed(ws)

    assert code == expected_code, f"close reason: {reason!r}"
    assert reason_text in (reason or "")
    await wait_until(
        lambda: (ACCOUNT, BAD_DEVICE) not in relay.relay.agents, "the relay to forget the broken session"
    )
    logged = [
        record.getMessage()
        for record in caplog.records
        if record.name == "cloud_stub.relay" and f"{ACCOUNT}/{BAD_DEVICE} disconnected" in record.getMessage()
    ]
    assert logged, "the relay did not log the end of the broken session"
    assert f"(code {expected_code})" in logged[-1]
    assert reason_text in logged[-1]

    writer.write(b"after\n")
    assert await asyncio.wait_for(reader.readexactly(6), PROMPTLY_S) == b"after\n", "an open stream broke"
    writer.close()
    await writer.wait_closed()
    assert await echo_round_trip(echo, b"new stream\n") == b"new stream\n"


# Session replacement -------------------------------------------------------------


async def test_second_session_replaces_first(start_relay):
    relay = await start_relay()
    first = await connect_as_agent(relay.url, "twin")
    await first.send(hello_message("twin"))
    await receive_frame(first)
    await wait_until(lambda: (ACCOUNT, "twin") in relay.relay.agents, "the first session to register")

    second = await connect_as_agent(relay.url, "twin")
    await second.send(hello_message("twin"))
    await receive_frame(second)
    code, reason = await wait_closed(first)

    assert code == 4001, f"close reason: {reason!r}"
    assert "replaced" in (reason or "")
    await wait_until(lambda: relay.relay.find_agent(ACCOUNT, "twin") is not None, "the second session to be ready")
    listing = (await http_request(relay.relay.port, "GET", "/v1/agents", headers=AUTH)).json()
    twins = [agent for agent in listing["agents"] if agent["device"] == "twin"]
    assert len(twins) == 1, listing
    assert twins[0]["remote_address"] == "127.0.0.1:%d" % second.local_address[1], "the listed session is not the newer one"
    await second.close()


# Sign-in -----------------------------------------------------------------------


@pytest.mark.parametrize(("username", "password"), [(ACCOUNT, "wrong password"), ("mallory", PASSWORD)])
async def test_login_rejects_bad_credentials(username, password, start_relay):
    relay = await start_relay()

    with pytest.raises(SignInError) as failure:
        await login(relay.url, username, password)

    assert "wrong user name or password" in str(failure.value)
