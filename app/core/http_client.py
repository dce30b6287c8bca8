"""A small HTTP/1.1 client for the relay's REST API, over ``net.Connector``.

The agent's REST calls (sign-in, refresh, sign-out, health check) must take
the same proxy and TLS path as its WebSocket, which the standard library's
urllib cannot do for SOCKS proxies or pinned keys. h11 does the HTTP framing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import h11

from .net import Connector

MAX_RESPONSE_BYTES = 1024 * 1024


class NotHttpError(ConnectionError):
    """The server's reply is not HTTP/1.1, so it is not the service that was expected."""


async def request_json(
    connector: Connector,
    method: str,
    url: str,
    payload: dict[str, Any] | None = None,
    *,
    timeout: float,
) -> tuple[int, dict[str, Any]]:
    """Send one request and return the status and the JSON object of the response ({} if none)."""
    # asyncio.timeout runs the request in this task; wait_for would wrap it in
    # another task whose late exception nobody retrieves if this one is cancelled.
    async with asyncio.timeout(timeout):
        status, body = await _request(connector, method, url, payload, timeout)
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return status, {}
    return status, value if isinstance(value, dict) else {}


async def _request(
    connector: Connector, method: str, url: str, payload: dict[str, Any] | None, timeout: float
) -> tuple[int, bytes]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_RESPONSE_BYTES, loop=loop)
    transport, protocol = await connector.open(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), url, timeout)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    try:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = json.dumps(payload).encode() if payload is not None else b""
        headers = [
            ("Host", parts.netloc.rpartition("@")[2]),
            ("Accept", "application/json"),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
        ]
        if payload is not None:
            headers.append(("Content-Type", "application/json"))
        connection = h11.Connection(h11.CLIENT)
        data = connection.send(h11.Request(method=method, target=target, headers=headers)) or b""
        data += connection.send(h11.Data(data=body)) or b"" if body else b""
        data += connection.send(h11.EndOfMessage()) or b""
        writer.write(data)

        status = 0
        received = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                chunk = await reader.read(65536)
                connection.receive_data(chunk)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                received += event.data
                if len(received) > MAX_RESPONSE_BYTES:
                    raise ConnectionError(f"the relay's response exceeds {MAX_RESPONSE_BYTES} bytes")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        return status, bytes(received)
    except h11.RemoteProtocolError as exc:
        raise NotHttpError(f"the server at {url} did not respond with valid HTTP: {exc}") from None
    finally:
        writer.close()
