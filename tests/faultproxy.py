"""A fault-injecting TCP proxy for putting between the agent and the relay.

Modes: pass traffic through (optionally with added delay), cut every
connection with a TCP reset, or blackhole: drop everything in both directions
without closing anything, the way a sleeping laptop or a middlebox that lost
its state does. Connections that lived through a blackhole stay dead after it
ends, because the bytes dropped meanwhile cannot be delivered any more; new
connections work again. ``lose_reply_to`` loses one reply instead: the request
reaches the server, and the client's connection is reset once the reply starts.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import pytest

CHUNK = 64 * 1024


class _Connection:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.dead = False
        self.tasks: list[asyncio.Task[None]] = []


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.delay = 0.0
        self.blackholed = False
        self.connections_accepted = 0
        self.cuts = 0
        # The next new connection whose first bytes start with this prefix
        # gets no reply, and the prefix is cleared after that.
        self.lose_reply_to: bytes | None = None
        self.replies_lost = 0
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> "FaultProxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            self._kill(connection)
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self) -> int:
        """Reset every open connection in both directions; return how many."""
        count = 0
        for connection in list(self._connections):
            if not connection.dead:
                count += 1
            self._kill(connection)
        self.cuts += 1
        return count

    def blackhole(self) -> None:
        """Drop all traffic both ways from now on, closing nothing."""
        self.blackholed = True
        for connection in self._connections:
            connection.dead = True

    def restore(self) -> None:
        """Pass traffic again on new connections; blackholed ones stay dead."""
        self.blackholed = False

    def _kill(self, connection: _Connection) -> None:
        connection.dead = True
        _reset(connection.client)
        if connection.upstream is not None:
            _reset(connection.upstream)
        for task in connection.tasks:
            task.cancel()
        self._connections.discard(connection)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        connection = _Connection(writer)
        connection.dead = self.blackholed
        self._connections.add(connection)
        try:
            if connection.dead:
                # Swallow whatever the client sends; never connect upstream.
                while await reader.read(CHUNK):
                    pass
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            except OSError:
                _reset(writer)
                return
            connection.upstream = up_writer
            if self.lose_reply_to is not None:
                first = await reader.read(CHUNK)
                up_writer.write(first)
                if first.startswith(self.lose_reply_to):
                    self.lose_reply_to = None
                    # The rest of the request (a body after the head) still goes upstream.
                    connection.tasks = [asyncio.ensure_future(self._pipe(connection, reader, up_writer))]
                    await up_reader.read(CHUNK)
                    self.replies_lost += 1
                    self._kill(connection)
                    return
            connection.tasks = [
                asyncio.ensure_future(self._pipe(connection, reader, up_writer)),
                asyncio.ensure_future(self._pipe(connection, up_reader, writer)),
            ]
            await asyncio.gather(*connection.tasks, return_exceptions=True)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(connection)
            if not writer.transport.is_closing():
                writer.transport.abort()
            if connection.upstream is not None and not connection.upstream.transport.is_closing():
                connection.upstream.transport.abort()

    async def _pipe(self, connection: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if connection.dead:
                    if not data:
                        # One end gave up on a dead connection; the other end
                        # must find out on its own, as it would on a real network.
                        await asyncio.Event().wait()
                    continue
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                    if connection.dead:
                        continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            if not connection.dead:
                self._kill(connection)


@pytest.fixture
async def fault_proxy() -> AsyncIterator[list[FaultProxy]]:
    """Proxies started by the test; all of them stop at the end."""
    proxies: list[FaultProxy] = []
    yield proxies
    for proxy in proxies:
        await proxy.stop()


async def start_fault_proxy(registry: list[FaultProxy], upstream_port: int, port: int = 0) -> FaultProxy:
    proxy = await FaultProxy(upstream_port).start(port)
    registry.append(proxy)
    return proxy
