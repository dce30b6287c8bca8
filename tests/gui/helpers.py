"""Helpers for the GUI tests: the test loop, a relay thread, sign-in presets and redis.

They live here, not in conftest.py, so test modules can import them by name.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import qasync
import redis

from app.core.auth import login
from app.core.config import AgentConfig, Target
from app.core.credentials import MemoryStore
from app.gui.controller import Preset
from cloud_stub.relay import Relay, RelayConfig
from tests.conftest import ACCOUNT, PASSWORD

START_TIMEOUT_S = 15.0


class QLoop:
    """The test's qasync loop; ``run`` drives a coroutine to its end with qtbot's waits."""

    def __init__(self, loop: qasync.QEventLoop, qtbot: Any) -> None:
        self.loop = loop
        self.qtbot = qtbot
        self.errors: list[dict[str, Any]] = []

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 15.0) -> Any:
        task = asyncio.ensure_future(coroutine)
        self.qtbot.waitUntil(task.done, timeout=int(timeout * 1000))
        return task.result()

    def record_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(context)
        logging.getLogger("tests.gui").error("event loop error: %s", context.get("message"), exc_info=context.get("exception"))


class ThreadRelay:
    """A relay on its own asyncio loop in a background thread."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.relay: Relay | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="test relay", daemon=True)

    def start(self) -> "ThreadRelay":
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise AssertionError(f"the relay did not start within {START_TIMEOUT_S:.0f} s")
        if self.error is not None:
            raise self.error
        return self

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        relay = Relay(self.config)
        try:
            await relay.start()
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            return
        self.relay = relay
        self._ready.set()
        await self._stop.wait()
        await relay.stop()

    @property
    def url(self) -> str:
        assert self.relay is not None
        return self.relay.url

    def port_of(self, target: str) -> int:
        assert self.relay is not None
        return self.relay.expose_ports[f"{ACCOUNT}/{target}"]

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


def signed_in_preset(qloop: QLoop, relay_url: str, targets: dict[str, Target], device: str = "gui-test") -> Preset:
    """Sign in to the relay and return a preset, so the app connects without the wizard."""
    tokens = qloop.run(login(relay_url, ACCOUNT, PASSWORD))
    assert tokens.refresh_token is not None
    store = MemoryStore()
    qloop.run(store.set(relay_url, ACCOUNT, tokens.refresh_token))
    return Preset(AgentConfig(relay_url, ACCOUNT, device, targets), store)


def redis_client(port: int) -> redis.Redis:
    """A redis-py client that sends only the test's commands, without CLIENT SETINFO first."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py before 7 names these options directly
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=10, lib_name=None, lib_version=None)
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=10, driver_info=DriverInfo(name=None, lib_version=None))


@dataclass
class RedisProcess:
    port: int
    process: subprocess.Popen[bytes]


def start_redis(port: int, folder: Path) -> RedisProcess:
    """Start redis-server on ``port`` and wait until it accepts connections."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--protected-mode", "no"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if b"Ready to accept connections" in line:
            return RedisProcess(port, process)
    process.wait(10)
    pytest.fail(f"redis-server on port {port} exited before it was ready")
