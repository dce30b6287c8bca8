"""Shared fixtures: an in-process relay, agents, and real servers as desktop apps.

Everything listens on 127.0.0.1 with ports the OS picks. ``DESKBRIDGE_HOME``
points at a per-test folder so no test touches the person's own settings.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.core.agent import Agent
from app.core.auth import RelayTokens, login
from app.core.backoff import Backoff
from app.core.config import Target
from app.core.credentials import MemoryStore
from app.core.traffic import TrafficRecord
from cloud_stub.accounts import Accounts
from cloud_stub.relay import Exposure, Relay, RelayConfig

ACCOUNT = "alice"
PASSWORD = "correct horse battery staple"
API_KEY = "test-api-key-0123456789"
DEVICE = "laptop"


@pytest.fixture(autouse=True)
def deskbridge_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "deskbridge-home"
    monkeypatch.setenv("DESKBRIDGE_HOME", str(home))
    return home


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RecordingSink:
    """Collects traffic records, DATA included."""

    wants_data = True

    def __init__(self) -> None:
        self.records: list[TrafficRecord] = []

    def record(self, item: TrafficRecord) -> None:
        self.records.append(item)


@dataclass
class RelayHandle:
    relay: Relay
    config: RelayConfig

    @property
    def url(self) -> str:
        return self.relay.url

    @property
    def http(self) -> str:
        return self.relay.url.replace("ws://", "http://")

    def port_of(self, target: str, account: str = ACCOUNT) -> int:
        return self.relay.expose_ports[f"{account}/{target}"]


@pytest.fixture
async def start_relay(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RelayHandle]]]:
    """Start relays on free ports; all of them stop at the end of the test.

    ``expose`` lists target names of ACCOUNT that get a TCP listener each.
    """
    started: list[Relay] = []

    async def start(expose: tuple[str, ...] = (), port: int = 0, **overrides: object) -> RelayHandle:
        accounts = Accounts()
        accounts.add(ACCOUNT, PASSWORD)
        config = RelayConfig(
            port=port,
            accounts=accounts,
            api_keys=[API_KEY],
            exposures=[Exposure(ACCOUNT, None, name, "127.0.0.1", 0) for name in expose],
            data_dir=tmp_path / "relay-data",
        )
        for key, value in overrides.items():
            setattr(config, key, value)
        relay = Relay(config)
        await relay.start()
        started.append(relay)
        return RelayHandle(relay, config)

    yield start
    for relay in started:
        await relay.stop()


@dataclass
class AgentHandle:
    agent: Agent
    task: asyncio.Task[None]
    store: MemoryStore
    traffic: RecordingSink | None = None
    statuses: list[object] = field(default_factory=list)


@pytest.fixture
async def start_agent() -> AsyncIterator[Callable[..., Awaitable[AgentHandle]]]:
    """Sign in to a relay and run an agent against it until the test ends."""
    handles: list[AgentHandle] = []

    async def start(
        relay_url: str,
        targets: dict[str, tuple[str, int]],
        *,
        device: str = DEVICE,
        wait: bool = True,
        record: bool = False,
        backoff: Backoff | None = None,
        sign_in: bool = True,
        **options: Any,
    ) -> AgentHandle:
        store = MemoryStore()
        # The agent's connector (proxy and TLS settings) is used for signing in too.
        connector = options.get("connector")
        if sign_in:
            tokens = await login(relay_url, ACCOUNT, PASSWORD, connector=connector)
            assert tokens.refresh_token is not None
            await store.set(relay_url, ACCOUNT, tokens.refresh_token)
        sink = RecordingSink() if record else None
        statuses: list[object] = []
        agent = Agent(
            relay_url=relay_url,
            device=device,
            targets={name: Target(name, host, port) for name, (host, port) in targets.items()},
            tokens=RelayTokens(relay_url, ACCOUNT, store, connector),
            traffic=sink,
            on_status=statuses.append,
            backoff=backoff or Backoff(base=0.05, cap=0.5),
            **options,
        )
        task = asyncio.ensure_future(agent.run())
        handle = AgentHandle(agent, task, store, sink, statuses)
        handles.append(handle)
        if wait:
            await asyncio.wait_for(agent.wait_connected(), 10)
        return handle

    yield start
    for handle in handles:
        await handle.agent.stop()
        handle.task.cancel()
        await asyncio.gather(handle.task, return_exceptions=True)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[int]:
    """A real redis-server on a free loopback port, as the desktop application."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--protected-mode", "no"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if b"Ready to accept connections" in line:
                break
        else:
            pytest.fail("redis-server exited before it was ready")
        yield port
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


async def start_echo_server() -> tuple[asyncio.Server, int]:
    """A TCP server that echoes everything and half-closes after the client does."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server, port = await start_echo_server()
    yield port
    server.close()
    await server.wait_closed()


def environment_timeout(seconds: float) -> float:
    """Scale a test timeout by DESKBRIDGE_TEST_TIMEOUT_SCALE for slow machines."""
    return seconds * float(os.environ.get("DESKBRIDGE_TEST_TIMEOUT_SCALE", "1"))
