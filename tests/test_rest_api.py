"""The relay's REST API and its raw WebSocket stream endpoint, against real targets."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from conftest import ACCOUNT, API_KEY, RelayHandle
from helpers_ws import AUTH, exchange, http_request, send_raw_http, wait_until

PROMPTLY_S = 5.0
MIB = 1024 * 1024


@pytest.fixture
async def tunnel(start_relay, start_agent, echo_port) -> RelayHandle:
    """A relay exposing "echo" and an agent that serves it."""
    relay = await start_relay(expose=("echo",))
    await start_agent(relay.url, {"echo": ("127.0.0.1", echo_port)})
    return relay


@dataclass
class SilentServer:
    """A TCP server that reads every connection and never sends a byte back."""

    port: int = 0
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def silent_server() -> AsyncIterator[SilentServer]:
    state = SilentServer()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connected.set()
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            state.disconnected.set()
            writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    yield state
    server.close()
    await server.wait_closed()


def stream_url(relay: RelayHandle, target: str, account: str = ACCOUNT) -> str:
    return f"{relay.url}/v1/agents/{account}/targets/{target}/stream"


async def open_stream(relay: RelayHandle, target: str, headers: dict[str, str] | None = None) -> ClientConnection:
    return await connect(
        stream_url(relay, target),
        additional_headers=AUTH if headers is None else headers,
        open_timeout=PROMPTLY_S,
        proxy=None,
    )


async def receive_bytes(ws: ClientConnection, size: int) -> bytes:
    """Collect binary messages until ``size`` bytes arrived."""
    received = bytearray()
    while len(received) < size:
        message = await asyncio.wait_for(ws.recv(), PROMPTLY_S)
        assert isinstance(message, bytes), f"the relay sent a text message: {message!r}"
        received += message
    return bytes(received)


# GET /v1/agents ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing API key"),
        ({"Authorization": "Bearer wrong-key"}, "invalid API key"),
        ({"X-Api-Key": "wrong-key"}, "invalid API key"),
        ({"Authorization": f"Basic {API_KEY}"}, "missing API key"),
    ],
    ids=["missing", "wrong_bearer", "wrong_header", "basic_scheme"],
)
async def test_agents_rejects_bad_key(headers, message, tunnel):
    reply = await http_request(tunnel.relay.port, "GET", "/v1/agents", headers=headers)

    assert reply.status == 401
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"] == "unauthorized"
    assert message in reply.json()["message"]


async def test_agents_without_configured_keys(start_relay):
    relay = await start_relay(api_keys=[])

    reply = await http_request(relay.relay.port, "GET", "/v1/agents", headers=AUTH)

    assert reply.status == 403
    assert reply.json()["error"] == "forbidden"


@pytest.mark.parametrize("headers", [AUTH, {"X-Api-Key": API_KEY}], ids=["bearer", "x_api_key"])
async def test_agents_lists_agent_and_targets(headers, tunnel):
    reply = await http_request(tunnel.relay.port, "GET", "/v1/agents", headers=headers)

    assert reply.status == 200
    agents = reply.json()["agents"]
    assert [(agent["account"], agent["device"]) for agent in agents] == [(ACCOUNT, "laptop")]
    assert agents[0]["targets"] == [
        {"name": "echo", "advertised": True, "streams_total": 0, "bytes_to_desktop": 0, "bytes_to_cloud": 0}
    ]
    assert agents[0]["streams_open"] == 0


async def test_agents_counters_grow_with_traffic(tunnel):
    port = tunnel.relay.port
    reply = await exchange(port, "echo", b"hello\n")
    assert reply.status == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port_of("echo"))
    payload = random.Random(7).randbytes(4096)
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), PROMPTLY_S) == payload

    agent = (await http_request(port, "GET", "/v1/agents", headers=AUTH)).json()["agents"][0]
    writer.close()
    await writer.wait_closed()
    entry = tunnel.relay.agents[(ACCOUNT, "laptop")]
    await wait_until(lambda: not entry.tunnel.handlers, "the TCP stream to end")
    after_close = (await http_request(port, "GET", "/v1/agents", headers=AUTH)).json()["agents"][0]

    expected = 6 + len(payload)
    assert agent["bytes_to_desktop"] == expected
    assert agent["bytes_to_cloud"] == expected
    assert agent["streams_open"] == 1, "the TCP stream is still open"
    target = agent["targets"][0]
    assert target["streams_total"] == 2
    assert target["bytes_to_desktop"] == expected, "target counters must include the open stream"
    assert target["bytes_to_cloud"] == expected
    closed_target = after_close["targets"][0]
    assert closed_target["bytes_to_desktop"] == expected, "closing the stream changed the target counters"
    assert closed_target["bytes_to_cloud"] == expected
    assert closed_target["streams_total"] == 2


# POST exchange -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "body", "expected"),
    [
        ("until=newline", b"first line\nsecond line\n", b"first line\n"),
        ("", b"default stops at newline\nnot this\n", b"default stops at newline\n"),
        ("until=bytes&bytes=5", b"abcdefgh", b"abcde"),
        ("until=idle&idle_ms=200", b"no newline at all", b"no newline at all"),
    ],
    ids=["newline", "default", "bytes", "idle"],
)
async def test_exchange_with_echo(query, body, expected, tunnel):
    reply = await exchange(tunnel.relay.port, "echo", body, query)

    assert reply.status == 200, reply.body
    assert reply.body == expected
    assert reply.headers["content-type"] == "application/octet-stream"
    assert reply.headers["deskbridge-stream"].isdigit()


@pytest.mark.parametrize(
    ("query", "body", "expected"),
    [
        ("until=newline", b"PING\r\n", b"+PONG\r\n"),
        ("until=eof", b"PING\r\nQUIT\r\n", b"+PONG\r\n+OK\r\n"),
    ],
    ids=["newline", "eof"],
)
async def test_exchange_with_redis(query, body, expected, start_relay, start_agent, redis_server):
    relay = await start_relay()
    await start_agent(relay.url, {"redis": ("127.0.0.1", redis_server)})

    reply = await exchange(relay.relay.port, "redis", body, query)

    assert reply.status == 200, reply.body
    assert reply.body == expected


async def test_exchange_carries_max_body(tunnel):
    body = random.Random(3).randbytes(MIB)

    reply = await exchange(tunnel.relay.port, "echo", body, f"until=bytes&bytes={MIB}", timeout=20)

    assert reply.status == 200, reply.body[:300]
    assert len(reply.body) == MIB
    assert reply.body == body, "the echoed reply differs from the body sent"


async def test_exchange_reports_early_close(start_relay, start_agent, redis_server):
    relay = await start_relay()
    await start_agent(relay.url, {"redis": ("127.0.0.1", redis_server)})

    reply = await exchange(relay.relay.port, "redis", b"QUIT\r\n", "until=bytes&bytes=100")

    assert reply.status == 502
    assert reply.json()["error"] == "target_closed"
    assert "after 5 bytes" in reply.json()["message"]


async def test_exchange_names_offline_device(tunnel):
    reply = await exchange(tunnel.relay.port, "echo", b"hello\n", "device=desktop-2")

    assert reply.status == 503
    assert reply.json()["error"] == "agent_offline"
    assert "desktop-2" in reply.json()["message"]


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("until=forever", "until"),
        ("until=bytes", "bytes=N"),
        ("until=bytes&bytes=abc", "bytes"),
        ("until=bytes&bytes=0", "bytes=N"),
        ("until=bytes&bytes=16777217", "bytes"),
        ("until=idle&idle_ms=0", "idle_ms"),
        ("timeout_ms=-5", "timeout_ms"),
        ("timeout_ms=600001", "timeout_ms"),
    ],
)
async def test_exchange_rejects_bad_parameters(query, parameter, tunnel):
    reply = await exchange(tunnel.relay.port, "echo", b"hello\n", query)

    assert reply.status == 400
    assert reply.json()["error"] == "invalid_request"
    assert parameter in reply.json()["message"], "the message should name the bad parameter"


async def test_exchange_times_out_on_silent_target(start_relay, start_agent, silent_server):
    relay = await start_relay()
    await start_agent(relay.url, {"silent": ("127.0.0.1", silent_server.port)})

    reply = await exchange(relay.relay.port, "silent", b"anyone there?\n", "timeout_ms=300")

    assert reply.status == 504
    assert reply.json()["error"] == "timed_out"
    assert "0.3 s" in reply.json()["message"]
    assert silent_server.connected.is_set()
    await asyncio.wait_for(silent_server.disconnected.wait(), PROMPTLY_S)


async def test_exchange_requires_api_key(tunnel):
    path = f"/v1/agents/{ACCOUNT}/targets/echo/exchange"

    reply = await http_request(tunnel.relay.port, "POST", path, body=b"hello\n")

    assert reply.status == 401
    assert reply.json()["error"] == "unauthorized"


# Routing and request errors ------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/nothing", "/", f"/v1/agents/{ACCOUNT}/targets/echo/nothing"])
async def test_unknown_endpoint_returns_404(path, tunnel):
    reply = await http_request(tunnel.relay.port, "GET", path, headers=AUTH)

    assert reply.status == 404
    assert reply.json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", f"/v1/agents/{ACCOUNT}/targets/echo/exchange", "POST"),
        ("DELETE", "/v1/agents", "GET"),
        ("GET", "/v1/auth/login", "POST"),
        ("PUT", "/v1/nothing", None),
    ],
)
async def test_wrong_method_returns_405(method, path, allow, tunnel):
    reply = await http_request(tunnel.relay.port, method, path, headers=AUTH)

    assert reply.status == 405
    assert reply.json()["error"] == "method_not_allowed"
    if allow is not None:
        assert reply.headers.get("allow") == allow


async def test_oversized_declared_body_returns_413(tunnel):
    port = tunnel.relay.port
    head = (
        f"POST /v1/agents/{ACCOUNT}/targets/echo/exchange HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Length: {MIB + 1}\r\n\r\n"
    )

    reply = await send_raw_http(port, head.encode())

    assert reply.status == 413
    assert reply.json()["error"] == "body_too_large"


async def test_oversized_chunked_body_returns_413(tunnel):
    port = tunnel.relay.port
    head = (
        f"POST /v1/agents/{ACCOUNT}/targets/echo/exchange HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    # Send one chunk just over the limit and leave out its trailing CRLF.
    # The relay has then read every byte when it responds, so it closes with
    # no unread data and the client receives the 413 rather than a reset.
    size = MIB + 1
    chunk = f"{size:x}\r\n".encode() + bytes(size)

    reply = await send_raw_http(port, head.encode() + chunk)

    assert reply.status == 413
    assert reply.json()["error"] == "body_too_large"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (json.dumps({"username": ACCOUNT}).encode(), "invalid_request"),
        (json.dumps({"username": ACCOUNT, "password": 5}).encode(), "invalid_request"),
    ],
    ids=["syntax", "not_utf8", "array", "no_password", "number_password"],
)
async def test_login_rejects_malformed_body(body, error, start_relay):
    relay = await start_relay()

    reply = await http_request(
        relay.relay.port, "POST", "/v1/auth/login", body=body, headers={"Content-Type": "application/json"}
    )

    assert reply.status == 400
    assert reply.json()["error"] == error
    assert reply.json()["message"]


async def test_healthz_returns_ok(tunnel):
    reply = await http_request(tunnel.relay.port, "GET", "/healthz")

    assert reply.status == 200
    assert reply.json()["status"] == "ok"
    assert reply.json()["agents"] == 1


# WebSocket stream endpoint ------------------------------------------------------


async def test_stream_echoes_binary_messages(tunnel):
    ws = await open_stream(tunnel, "echo")
    try:
        for message in (b"first", b"\x00\xffbinary\r\n", b"x" * 70_000):
            await ws.send(message)
            assert await receive_bytes(ws, len(message)) == message
    finally:
        await ws.close()


async def test_stream_round_trips_one_mib(tunnel):
    payload = random.Random(1).randbytes(MIB)
    chunk = 48 * 1024
    ws = await open_stream(tunnel, "echo")

    async def send_all() -> None:
        for offset in range(0, len(payload), chunk):
            await ws.send(payload[offset : offset + chunk])

    try:
        sender = asyncio.ensure_future(send_all())
        received = await asyncio.wait_for(receive_bytes(ws, len(payload)), 20)
        await sender
    finally:
        await ws.close()

    assert len(received) == len(payload)
    assert received == payload, "the echoed bytes differ from the bytes sent"


async def test_stream_closes_when_target_closes(start_relay, start_agent, redis_server):
    relay = await start_relay()
    await start_agent(relay.url, {"redis": ("127.0.0.1", redis_server)})
    ws = await open_stream(relay, "redis")

    await ws.send(b"QUIT\r\n")
    reply = await receive_bytes(ws, 5)
    await asyncio.wait_for(ws.wait_closed(), PROMPTLY_S)

    assert reply == b"+OK\r\n"
    assert ws.close_code == 1000, f"close reason: {ws.close_reason!r}"


@pytest.mark.parametrize(
    ("message", "code"),
    [("text is not allowed", 1003), (bytes(MIB + 1), 1009)],
    ids=["text", "over_one_mib"],
)
async def test_stream_closes_on_bad_message(message, code, tunnel):
    ws = await open_stream(tunnel, "echo")

    await ws.send(message)
    await asyncio.wait_for(ws.wait_closed(), PROMPTLY_S)

    assert ws.close_code == code, f"close reason: {ws.close_reason!r}"
    entry = tunnel.relay.agents[(ACCOUNT, "laptop")]
    await wait_until(lambda: not entry.tunnel.handlers, "the relay to end the tunnel stream")


async def test_stream_rejects_unknown_endpoint(tunnel):
    with pytest.raises(InvalidStatus) as failure:
        await connect(f"{tunnel.url}/v1/nothing", additional_headers=AUTH, open_timeout=PROMPTLY_S, proxy=None)

    assert failure.value.response.status_code == 404
    assert json.loads(failure.value.response.body)["error"] == "not_found"


async def test_stream_rejects_unknown_target(tunnel):
    with pytest.raises(InvalidStatus) as failure:
        await open_stream(tunnel, "ghost")

    response = failure.value.response
    assert response.status_code == 404
    assert response.headers.get_all("Content-Type") == ["application/json"]
    assert json.loads(response.body)["error"] == "unknown_target"


async def test_stream_rejects_offline_agent(start_relay):
    relay = await start_relay()

    with pytest.raises(InvalidStatus) as failure:
        await open_stream(relay, "echo")

    response = failure.value.response
    assert response.status_code == 503
    assert response.headers.get_all("Content-Type") == ["application/json"]
    assert json.loads(response.body)["error"] == "agent_offline"


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-key"}], ids=["missing", "wrong"]
)
async def test_stream_rejects_bad_key(headers, tunnel):
    with pytest.raises(InvalidStatus) as failure:
        await open_stream(tunnel, "echo", headers)

    response = failure.value.response
    assert response.status_code == 401
    assert response.headers.get_all("Content-Type") == ["application/json"]
    assert response.headers.get("WWW-Authenticate") == "Bearer"
    assert json.loads(response.body)["error"] == "unauthorized"
    await wait_until(lambda: not tunnel.relay.agents[(ACCOUNT, "laptop")].tunnel.handlers, "no stream to be open")
