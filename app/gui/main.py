"""Start the desktop app: QApplication, single-instance check, qasync loop, window.

The agent and the window share one qasync event loop in the main thread.
``run_gui`` returns the process exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import qasync
from PySide6.QtWidgets import QApplication

from app import __version__
from app.core.logs import LOG_FORMAT, configure_logging
from app.core.models import BufferHandler, LogBuffer
from app.core.paths import AppDirs

from .application import GuiApp
from .controller import Preset
from .icons import app_icon
from .single_instance import instance_key, notify_running

logger = logging.getLogger("deskbridge.gui")

PresetFactory = Callable[[], AbstractAsyncContextManager[Preset]]


def display_problem() -> str:
    """Return why no window can open here, or an empty string if one can."""
    if sys.platform.startswith("linux") and not os.environ.get("QT_QPA_PLATFORM"):
        if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
            return (
                "no display found (DISPLAY and WAYLAND_DISPLAY are unset); "
                "run with --headless, or set QT_QPA_PLATFORM=offscreen to run the window without a screen"
            )
    return ""


def install_log_buffer(buffer: LogBuffer) -> BufferHandler:
    """Copy every log record to ``buffer`` in the log file's format."""
    handler = BufferHandler(buffer, logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def run_gui(
    dirs: AppDirs,
    *,
    minimized: bool = False,
    log_level: str = "INFO",
    log_file: str = "deskbridge.log",
    preset_factory: PresetFactory | None = None,
) -> int:
    """Run the window until the person quits; return the exit code."""
    problem = display_problem()
    if problem:
        print(f"deskbridge: {problem}", file=sys.stderr)
        return 2
    dirs.create()
    configure_logging(log_level, dirs.logs, log_file)
    buffer = LogBuffer()
    install_log_buffer(buffer)

    QApplication.setApplicationName("Deskbridge")
    QApplication.setApplicationVersion(__version__)
    QApplication.setDesktopFileName("deskbridge")
    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    app.setQuitOnLastWindowClosed(False)
    app.setWindowIcon(app_icon())

    key = instance_key(dirs)
    if notify_running(key):
        print("Deskbridge is already running; its window was brought to the front.")
        return 0

    logger.info("Deskbridge %s window starting; settings in %s", __version__, dirs.config)
    with asyncio.Runner(loop_factory=lambda: qasync.QEventLoop(app)) as runner:
        runner.run(_run(dirs, buffer, key, minimized, preset_factory))
    logger.info("Deskbridge window stopped")
    return 0


async def _run(dirs: AppDirs, buffer: LogBuffer, key: str, minimized: bool, preset_factory: PresetFactory | None) -> None:
    async with contextlib.AsyncExitStack() as stack:
        preset = await stack.enter_async_context(preset_factory()) if preset_factory is not None else None
        gui = GuiApp(dirs, buffer, preset=preset, instance_key=key)
        _quit_on_signals(gui)
        await gui.run(minimized=minimized)


def _quit_on_signals(gui: GuiApp) -> None:
    """Quit cleanly on Ctrl-C and SIGTERM, where the loop supports signal handlers."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, gui.controller.request_quit)

