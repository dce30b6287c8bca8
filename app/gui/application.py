"""The whole desktop app in one object: controller, window, tray, single instance and error dialogs.

``run_gui`` in ``app.gui.main`` builds one for a person; tests build it with
their own folders, keyring and tray setting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from PySide6.QtNetwork import QNetworkInformation
from PySide6.QtWidgets import QSystemTrayIcon

from app.core.autostart import Autostart
from app.core.backoff import Backoff
from app.core.credentials import KeyringStore
from app.core.models import LogBuffer
from app.core.paths import AppDirs

from .controller import PROBE_INTERVAL_S, AppController, Preset
from .errors import ErrorReporter
from .main_window import MainWindow
from .single_instance import InstanceServer
from .tray import Tray

logger = logging.getLogger(__name__)

NOTICE_STATUS_MS = 15_000


class GuiApp:
    """Wires the controller to the window and the tray and runs them until Quit."""

    def __init__(
        self,
        dirs: AppDirs,
        log_buffer: LogBuffer,
        *,
        tray_available: bool | None = None,
        keyring: KeyringStore | None = None,
        autostart: Autostart | None = None,
        backoff_factory: Callable[[], Backoff] = Backoff,
        probe_interval: float = PROBE_INTERVAL_S,
        preset: Preset | None = None,
        instance_key: str | None = None,
        report_errors: bool = True,
    ) -> None:
        if tray_available is None:
            tray_available = QSystemTrayIcon.isSystemTrayAvailable()
        self.dirs = dirs
        self.controller = AppController(
            dirs,
            keyring=keyring,
            autostart=autostart,
            backoff_factory=backoff_factory,
            probe_interval=probe_interval,
            preset=preset,
        )
        self.window = MainWindow(self.controller, log_buffer, dirs.logs, tray_available=tray_available)
        self.tray = Tray() if tray_available else None
        self.instance = InstanceServer(instance_key) if instance_key else None
        self.reporter = ErrorReporter(dirs.logs, self.window) if report_errors else None
        self.quit_event = asyncio.Event()

        controller = self.controller
        controller.quit_requested.connect(self.quit_event.set)
        controller.notice.connect(self._notice)
        controller.status_changed.connect(self._update_tray)
        self.window.timer.timeout.connect(self._update_tray)
        if self.tray is not None:
            self.tray.show_requested.connect(self.window.bring_to_front)
            self.tray.connect_requested.connect(self._tray_connect)
            self.tray.disconnect_requested.connect(self.window.disconnect_agent)
            self.tray.quit_requested.connect(controller.request_quit)
        if self.instance is not None:
            self.instance.show_requested.connect(self.window.bring_to_front)
        self._watch_network()

    def _watch_network(self) -> None:
        """Tell the controller when the OS reports the network back, so it retries at once."""
        if not QNetworkInformation.loadDefaultBackend():
            logger.info("no network information backend on this system; relying on the heartbeat")
            return
        info = QNetworkInformation.instance()
        if info is None:
            return
        online = QNetworkInformation.Reachability.Online
        info.reachabilityChanged.connect(lambda reachability: self.controller.network_changed(reachability == online))

    async def start(self, *, minimized: bool = False) -> None:
        """Show the window (or only the tray icon), load the settings and connect if signed in."""
        if self.reporter is not None:
            self.reporter.install(asyncio.get_running_loop())
        if self.instance is not None:
            self.instance.listen()
        if self.tray is not None:
            self.tray.show()
        if not minimized or self.tray is None:
            self.window.show()
        await self.controller.start()
        self._update_tray()
        if self.controller.needs_setup and self.controller.preset is None:
            self.window.open_wizard()

    async def run(self, *, minimized: bool = False) -> None:
        """Start, wait until the person quits, then shut down."""
        await self.start(minimized=minimized)
        await self.quit_event.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """End every task and timer, close the windows and remove the tray icon."""
        logger.info("shutting down")
        self.window.stop()
        await self.controller.shutdown()
        if self.tray is not None:
            self.tray.hide()
        if self.instance is not None:
            self.instance.close()
        self.window.close()
        if self.reporter is not None:
            self.reporter.uninstall()

    def _update_tray(self) -> None:
        if self.tray is None:
            return
        view = self.controller.view()
        self.tray.update_state(view.state, view.title, self.controller.running)

    def _tray_connect(self) -> None:
        if self.controller.signed_in:
            self.controller.connect_agent()
        else:
            self.window.bring_to_front()
            self.window.open_wizard(start_at_sign_in=not self.controller.needs_setup)

    def _notice(self, title: str, message: str) -> None:
        self.window.statusBar().showMessage(f"{title}: {message}", NOTICE_STATUS_MS)
        if self.tray is not None and self.controller.settings.notifications:
            self.tray.notify(title, message)
