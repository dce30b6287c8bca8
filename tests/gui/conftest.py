"""GUI fixtures: a qasync loop per test, a relay in a background thread, and the app itself.

The tests are plain functions, not coroutines. The ``qloop`` fixture makes a
qasync event loop the running loop for the test, and qtbot's waits spin the
Qt event loop, which runs the asyncio callbacks too. So the agent, the
window and the test's own coroutines all run on the main thread as in the
real app, and qtbot.waitUntil works as usual. The relay runs on its own
asyncio loop in a background thread, and cloud-side clients run in worker
threads, because a blocking client on the main thread would stall the agent
it talks to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keyring.backends.fail
import pytest
import qasync

from app.core.autostart import XdgAutostart
from app.core.backoff import Backoff
from app.core.credentials import KeyringStore
from app.core.logs import LOG_FORMAT
from app.core.models import BufferHandler, LogBuffer
from app.core.paths import AppDirs, app_dirs
from app.gui.application import GuiApp
from cloud_stub.accounts import Accounts
from cloud_stub.relay import Exposure, RelayConfig
from tests.conftest import ACCOUNT, PASSWORD
from tests.gui.helpers import QLoop, RedisProcess, ThreadRelay, start_redis

# Windows render off screen unless the person running the tests picks a platform;
# set before pytest-qt creates the QApplication, and inherited by subprocesses.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

TEARDOWN_TIMEOUT_MS = 15_000


@pytest.fixture
def qloop(qapp: Any, qtbot: Any) -> Iterator[QLoop]:
    """A qasync loop that is the running loop for the whole test.

    ``asyncio.events._set_running_loop`` is what qasync itself calls when its
    loop runs; the test sets it because qtbot, not ``run_forever``, spins Qt.
    At teardown every task still on the loop is cancelled and awaited, and
    the test fails if any task was left or the loop reported an error.
    """
    loop = qasync.QEventLoop(qapp)
    helper = QLoop(loop, qtbot)
    loop.set_exception_handler(helper.record_error)
    asyncio.events._set_running_loop(loop)
    try:
        yield helper
        leftovers = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in leftovers:
            task.cancel()
        qtbot.waitUntil(lambda: all(task.done() for task in leftovers), timeout=TEARDOWN_TIMEOUT_MS)
        gc.collect()
        qtbot.wait(1)
    finally:
        asyncio.events._set_running_loop(None)
        loop.close()
    assert not leftovers, f"tasks left running at teardown: {leftovers}"
    assert not helper.errors, f"event loop errors: {[context.get('message') for context in helper.errors]}"


@pytest.fixture
def log_buffer() -> Iterator[LogBuffer]:
    buffer = LogBuffer()
    handler = BufferHandler(buffer, logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    yield buffer
    root.removeHandler(handler)


@pytest.fixture
def dirs(deskbridge_home: Path) -> AppDirs:
    return app_dirs().create()


@pytest.fixture
def autostart_entry(tmp_path: Path) -> XdgAutostart:
    return XdgAutostart(tmp_path / "xdg-config")


@pytest.fixture
def no_keyring() -> KeyringStore:
    """A keyring store whose backend cannot keep secrets, as on a desktop without one."""
    return KeyringStore(keyring.backends.fail.Keyring())


@pytest.fixture
def make_gui(qloop: QLoop, qtbot: Any, dirs: AppDirs, log_buffer: LogBuffer, no_keyring: KeyringStore, autostart_entry: XdgAutostart) -> Iterator[Callable[..., GuiApp]]:
    """Build and start GuiApp instances; each is shut down at the end of the test."""
    apps: list[GuiApp] = []

    def make(*, start: bool = True, tray_available: bool = False, **overrides: Any) -> GuiApp:
        options: dict[str, Any] = {
            "tray_available": tray_available,
            "keyring": no_keyring,
            "autostart": autostart_entry,
            "backoff_factory": lambda: Backoff(base=0.05, cap=0.5),
            "probe_interval": 0.3,
            "report_errors": False,
        }
        options.update(overrides)
        gui = GuiApp(dirs, log_buffer, **options)
        apps.append(gui)
        if start:
            qloop.run(gui.start())
        return gui

    yield make
    for gui in apps:
        if not gui.window.quitting:
            qloop.run(gui.shutdown())
        gui.window.deleteLater()
        if gui.tray is not None:
            gui.tray.menu.deleteLater()
    qtbot.wait(1)


# Relay in a background thread -------------------------------------------------------------


@pytest.fixture
def thread_relay(tmp_path: Path) -> Iterator[Callable[..., ThreadRelay]]:
    """Start relays in background threads; ``expose`` names targets of ACCOUNT that get a TCP port."""
    relays: list[ThreadRelay] = []

    def start(expose: tuple[str, ...] = (), **overrides: Any) -> ThreadRelay:
        accounts = Accounts()
        accounts.add(ACCOUNT, PASSWORD)
        config = RelayConfig(
            port=0,
            accounts=accounts,
            api_keys=["gui-test-api-key"],
            exposures=[Exposure(ACCOUNT, None, name, "127.0.0.1", 0) for name in expose],
            data_dir=tmp_path / f"relay-data-{len(relays)}",
        )
        for key, value in overrides.items():
            setattr(config, key, value)
        relay = ThreadRelay(config)
        relays.append(relay)
        return relay.start()

    yield start
    for relay in relays:
        relay.stop()


@pytest.fixture
def workers() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """Threads for cloud-side clients, which block while the agent on the main thread works."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="cloud client")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


# Desktop applications -----------------------------------------------------------------------


@pytest.fixture
def redis_later(tmp_path: Path) -> Iterator[Callable[[int], RedisProcess]]:
    """Start redis-server on a chosen port during the test; stopped by PID at the end."""
    started: list[RedisProcess] = []

    def start(port: int) -> RedisProcess:
        server = start_redis(port, tmp_path / f"redis-{port}")
        started.append(server)
        return server

    yield start
    for server in started:
        server.process.terminate()
        server.process.wait(10)
        if server.process.stdout is not None:
            server.process.stdout.close()

