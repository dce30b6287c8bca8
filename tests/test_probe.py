"""Relay and target reachability checks against real sockets on loopback."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from app.core.config import Target
from app.core.probe import Problem, check_relay, check_relay_async, describe_failure, probe_target
from tests.conftest import free_port


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def plain_http_port() -> Iterator[int]:
    """An HTTP server that responds 404 to everything, like a web server that is not a relay."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener accepts connections into its backlog and never responds."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


async def test_relay_check_passes(start_relay):
    relay = await start_relay()

    result = await check_relay_async(relay.url)

    assert result.ok, result.message
    assert result.problem is None


def test_relay_check_refused():
    result = check_relay(f"ws://127.0.0.1:{free_port()}")

    assert result.problem is Problem.REFUSED
    assert "refused" in result.message


def test_relay_check_not_relay(plain_http_port):
    result = check_relay(f"ws://127.0.0.1:{plain_http_port}")

    assert result.problem is Problem.NOT_RELAY
    assert "HTTP 404" in result.message


def test_relay_check_times_out(silent_port):
    result = check_relay(f"ws://127.0.0.1:{silent_port}", timeout=0.5)

    assert result.problem is Problem.TIMED_OUT
    assert "did not answer within 0.5 s" in result.message


def test_relay_check_non_http(redis_server):
    result = check_relay(f"ws://127.0.0.1:{redis_server}", timeout=5)

    assert result.problem is Problem.NOT_RELAY


def test_relay_check_invalid_url():
    result = check_relay("http://example.com")

    assert result.problem is Problem.INVALID_URL
    assert "ws://" in result.message


def test_dns_failure_wording():
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    result = describe_failure(error, "relay.example.invalid", "relay.example.invalid:8765", 5.0)

    assert result.problem is Problem.DNS
    assert "'relay.example.invalid' was not found" in result.message


async def test_target_probe_listening(echo_port):
    result = await probe_target(Target("echo", "127.0.0.1", echo_port))

    assert result.ok
    assert f"127.0.0.1:{echo_port}" in result.message


async def test_target_probe_refused():
    port = free_port()

    result = await probe_target(Target("quotes", "127.0.0.1", port))

    assert not result.ok
    assert result.problem is Problem.REFUSED
    assert f"127.0.0.1:{port}: connection refused" in result.message


async def test_target_probe_closes_connection():
    """The probe connects and leaves without sending a byte."""
    received: list[bytes] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())
        writer.close()
        done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await probe_target(Target("app", "127.0.0.1", port))
        await asyncio.wait_for(done.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()

    assert result.ok
    assert received == [b""]
