"""The tray icon: the connection state at a glance, a small menu and notifications."""

from __future__ import annotations

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QMenu, QSystemTrayIcon

from app.core.models import ViewState

from .icons import state_icon

NOTICE_MS = 8_000


class Tray(QObject):
    """Wraps ``QSystemTrayIcon``: an icon per state, Show, Connect or Disconnect, and Quit."""

    show_requested = Signal()
    connect_requested = Signal()
    disconnect_requested = Signal()
    quit_requested = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.icon = QSystemTrayIcon(state_icon(ViewState.DISCONNECTED))
        self.menu = QMenu()
        self.show_action = QAction("Show Deskbridge", self.menu)
        self.connect_action = QAction("Connect", self.menu)
        self.quit_action = QAction("Quit Deskbridge", self.menu)
        self.menu.addAction(self.show_action)
        self.menu.addAction(self.connect_action)
        self.menu.addSeparator()
        self.menu.addAction(self.quit_action)
        self.icon.setContextMenu(self.menu)
        self._connected_action = False
        self.messages: list[tuple[str, str]] = []

        self.show_action.triggered.connect(self.show_requested)
        self.connect_action.triggered.connect(self._connect_triggered)
        self.quit_action.triggered.connect(self.quit_requested)
        self.icon.activated.connect(self._activated)

    def _activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason in (QSystemTrayIcon.ActivationReason.Trigger, QSystemTrayIcon.ActivationReason.DoubleClick):
            self.show_requested.emit()

    def _connect_triggered(self) -> None:
        if self._connected_action:
            self.disconnect_requested.emit()
        else:
            self.connect_requested.emit()

    def update_state(self, state: ViewState, title: str, running: bool) -> None:
        """Show the state's icon and tooltip; the middle action disconnects while the agent runs."""
        self.icon.setIcon(state_icon(state))
        self.icon.setToolTip(f"Deskbridge: {title}")
        self._connected_action = running
        self.connect_action.setText("Disconnect" if running else "Connect")

    def notify(self, title: str, message: str) -> None:
        self.messages.append((title, message))
        if self.icon.isVisible() and self.icon.supportsMessages():
            self.icon.showMessage(title, message, state_icon(ViewState.CONNECTED), NOTICE_MS)

    def show(self) -> None:
        self.icon.show()

    def hide(self) -> None:
        self.icon.hide()
