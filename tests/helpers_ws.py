"""Hand-made clients for the relay: plain HTTP/1.1, an agent's WebSocket, condition waits.

The HTTP client writes requests by hand so tests can send what urllib will
not, such as a Content-Length with no body. Every connection goes to
127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.core import frames
from app.core.auth import login
from app.core.session import DEFAULT_WINDOW
from conftest import ACCOUNT, API_KEY, PASSWORD

HOST = "127.0.0.1"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


def parse_http_reply(raw: bytes) -> HttpReply:
    """Parse one HTTP/1.1 response that ends at EOF and has a Content-Length."""
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete HTTP response head in {raw[:200]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _phrase = status_line.split(" ", 2)
    assert version == "HTTP/1.1", f"unexpected status line {status_line!r}"
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "-1"))
    assert length == len(body), f"Content-Length is {length} but the body has {len(body)} bytes"
    return HttpReply(int(status), headers, body)


async def send_raw_http(port: int, data: bytes, *, timeout: float = 10.0) -> HttpReply:
    """Send raw request bytes, read the response until the server closes, and parse it."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return parse_http_reply(raw)


async def http_request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> HttpReply:
    """Make one HTTP/1.1 request with ``Connection: close`` and return the response."""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {HOST}:{port}",
        "Connection: close",
        f"Content-Length: {len(body)}",
    ]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return await send_raw_http(port, head + body, timeout=timeout)


async def exchange(
    port: int, target: str, body: bytes, query: str = "", *, account: str = ACCOUNT, timeout: float = 10.0
) -> HttpReply:
    """Call the REST exchange endpoint of ``target`` with the test API key."""
    path = f"/v1/agents/{account}/targets/{target}/exchange"
    if query:
        path += "?" + query
    return await http_request(port, "POST", path, body=body, headers=AUTH, timeout=timeout)


async def wait_until(condition: Callable[[], bool], description: str, timeout: float = 5.0) -> None:
    """Poll ``condition`` every 10 ms until it is true, and fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {description}")
        await asyncio.sleep(0.01)


# Hand-made agent -----------------------------------------------------------


def hello_message(device: str, targets: tuple[str, ...] = ()) -> bytes:
    """Return the HELLO frame a real agent with these targets would send."""
    info = {"device": device, "targets": list(targets), "version": "test"}
    return frames.encode_hello(frames.PROTOCOL_VERSION, DEFAULT_WINDOW, info)


async def connect_as_agent(relay_url: str, device: str, *, token: str | None = None) -> ClientConnection:
    """Open the agent WebSocket with a fresh access token, without sending HELLO."""
    if token is None:
        token = (await login(relay_url, ACCOUNT, PASSWORD)).access_token
    headers = {"Authorization": f"Bearer {token}", "Deskbridge-Device": device}
    return await connect(
        relay_url + "/v1/agent",
        additional_headers=headers,
        open_timeout=5,
        close_timeout=5,
        proxy=None,
    )


async def receive_frame(ws: ClientConnection, timeout: float = 5.0) -> frames.Frame:
    """Receive one binary message and decode it as a tunnel frame."""
    message = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(message, bytes), f"relay sent a text message: {message!r}"
    return frames.decode(message)


async def wait_closed(ws: ClientConnection, timeout: float = 5.0) -> tuple[int | None, str | None]:
    """Discard messages until the connection closes, then return its close code and reason."""

    async def drain() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _message in ws:
                pass
        await ws.wait_closed()

    await asyncio.wait_for(drain(), timeout)
    return ws.close_code, ws.close_reason
