"""The main window: connection state, targets, and the traffic and app log tabs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from PySide6.QtCore import QSize, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCloseEvent, QFont, QKeySequence
from PySide6.QtWidgets import (
    QAbstractItemView,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMainWindow,
    QPushButton,
    QSplitter,
    QTabWidget,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.core.models import Health, LogBuffer, ViewState, format_bytes, format_duration, format_rate

from .controller import AppController
from .dialogs import AboutDialog, SettingsDialog
from .icons import app_icon, dot_icon, state_icon
from .log_view import LogPanel
from .tasks import TaskSet
from .traffic_view import TrafficPanel
from .wizard import SetupWizard

logger = logging.getLogger(__name__)

REFRESH_INTERVAL_MS = 1_000
HEALTH_DOTS = {Health.REACHABLE: "ok", Health.UNREACHABLE: "problem", Health.UNKNOWN: "unknown"}


def selectable(label: QLabel) -> QLabel:
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


class MainWindow(QMainWindow):
    """Displays the controller's state and forwards the person's commands to it."""

    quit_requested = Signal()

    def __init__(self, controller: AppController, log_buffer: LogBuffer, log_dir: Path, *, tray_available: bool) -> None:
        super().__init__()
        self.controller = controller
        self.tray_available = tray_available
        self.tasks = TaskSet()
        self.wizard: SetupWizard | None = None
        self.settings_dialog: SettingsDialog | None = None
        self.about_dialog: AboutDialog | None = None
        self.quitting = False
        self._told_about_tray = False
        self.setWindowTitle("Deskbridge")
        self.setWindowIcon(app_icon())
        self.resize(1000, 720)

        self.traffic_panel = TrafficPanel(controller.history)
        self.log_panel = LogPanel(log_buffer, log_dir)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.traffic_panel, "Traffic")
        self.tabs.addTab(self.log_panel, "App log")

        top = QWidget()
        top_layout = QHBoxLayout(top)
        top_layout.setContentsMargins(0, 0, 0, 0)
        top_layout.addWidget(self._build_status_box(), 3)
        top_layout.addWidget(self._build_targets_box(), 2)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(top)
        splitter.addWidget(self.tabs)
        splitter.setStretchFactor(1, 1)
        splitter.setChildrenCollapsible(False)
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.addWidget(splitter)
        self.setCentralWidget(central)
        self._build_menus()

        controller.status_changed.connect(self.refresh_status)
        controller.config_changed.connect(self.refresh_config)
        controller.health_changed.connect(self.refresh_health)
        controller.history_resized.connect(self.traffic_panel.history_resized)
        controller.sign_in_needed.connect(self._sign_in_needed)
        self.timer = QTimer(self)
        self.timer.setInterval(REFRESH_INTERVAL_MS)
        self.timer.timeout.connect(self.tick)
        self.timer.start()
        self.refresh_config()
        self.refresh_status()

    # Layout ------------------------------------------------------------------------

    def _build_status_box(self) -> QGroupBox:
        self.state_icon = QLabel()
        self.state_icon.setFixedSize(QSize(32, 32))
        self.state_title = QLabel()
        title_font = QFont(self.font())
        title_font.setPointSizeF(title_font.pointSizeF() * 1.35)
        title_font.setBold(True)
        self.state_title.setFont(title_font)
        self.state_title.setAccessibleName("Connection state")
        self.state_detail = selectable(QLabel())
        self.state_detail.setWordWrap(True)

        self.connect_button = QPushButton("Connect")
        self.retry_button = QPushButton("Retry now")
        self.retry_button.setToolTip("Skip the wait and try to connect now")
        self.sign_out_button = QPushButton("Sign out")
        self.settings_button = QPushButton("Settings…")
        self.connect_button.clicked.connect(self._connect_clicked)
        self.retry_button.clicked.connect(self.controller.connect_agent)
        self.sign_out_button.clicked.connect(self.sign_out)
        self.settings_button.clicked.connect(self.open_settings)

        heading = QHBoxLayout()
        heading.addWidget(self.state_icon)
        heading.addWidget(self.state_title, 1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.connect_button)
        buttons.addWidget(self.retry_button)
        buttons.addWidget(self.sign_out_button)
        buttons.addStretch(1)
        buttons.addWidget(self.settings_button)

        self.relay_label = selectable(QLabel())
        self.account_label = selectable(QLabel())
        self.device_label = selectable(QLabel())
        self.uptime_label = QLabel()
        self.to_desktop_label = QLabel()
        self.to_cloud_label = QLabel()
        self.streams_label = QLabel()
        facts = QGridLayout()
        facts.setHorizontalSpacing(12)
        facts.setVerticalSpacing(4)
        pairs = (
            ("Relay:", self.relay_label, "Account:", self.account_label),
            ("This computer:", self.device_label, "Connected for:", self.uptime_label),
            ("Cloud → desktop:", self.to_desktop_label, "Desktop → cloud:", self.to_cloud_label),
            ("Streams opened:", self.streams_label, "", QLabel()),
        )
        for row, (left_text, left, right_text, right) in enumerate(pairs):
            facts.addWidget(QLabel(left_text), row, 0)
            facts.addWidget(left, row, 1)
            facts.addWidget(QLabel(right_text), row, 2)
            facts.addWidget(right, row, 3)
        facts.setColumnStretch(1, 3)
        facts.setColumnStretch(3, 2)

        box = QGroupBox("Connection")
        layout = QVBoxLayout(box)
        layout.addLayout(heading)
        layout.addWidget(self.state_detail)
        layout.addLayout(buttons)
        layout.addLayout(facts)
        layout.addStretch(1)
        return box

    def _build_targets_box(self) -> QGroupBox:
        self.targets_tree = QTreeWidget()
        self.targets_tree.setHeaderLabels(["Target", "Address", "Application"])
        self.targets_tree.setRootIsDecorated(False)
        self.targets_tree.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.targets_tree.setWordWrap(True)
        self.targets_tree.setAccessibleName("Targets")
        header = self.targets_tree.header()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.target_advice = selectable(QLabel())
        self.target_advice.setWordWrap(True)
        self.target_advice.hide()
        box = QGroupBox("Targets")
        layout = QVBoxLayout(box)
        layout.addWidget(self.targets_tree, 1)
        layout.addWidget(self.target_advice)
        return box

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        self.setup_action = QAction("Run &setup again…", self)
        self.setup_action.triggered.connect(lambda: self.open_wizard())
        self.settings_action = QAction("S&ettings…", self)
        self.settings_action.setShortcut(QKeySequence.StandardKey.Preferences)
        self.settings_action.triggered.connect(self.open_settings)
        self.quit_action = QAction("&Quit", self)
        self.quit_action.setShortcut(QKeySequence.StandardKey.Quit)
        self.quit_action.triggered.connect(self.controller.request_quit)
        file_menu.addAction(self.setup_action)
        file_menu.addAction(self.settings_action)
        file_menu.addSeparator()
        file_menu.addAction(self.quit_action)

        connection_menu = self.menuBar().addMenu("&Connection")
        self.connect_action = QAction("&Connect", self)
        self.connect_action.triggered.connect(self.controller.connect_agent)
        self.disconnect_action = QAction("&Disconnect", self)
        self.disconnect_action.triggered.connect(self.disconnect_agent)
        self.sign_out_action = QAction("Sign &out", self)
        self.sign_out_action.triggered.connect(self.sign_out)
        connection_menu.addAction(self.connect_action)
        connection_menu.addAction(self.disconnect_action)
        connection_menu.addSeparator()
        connection_menu.addAction(self.sign_out_action)

        help_menu = self.menuBar().addMenu("&Help")
        self.open_logs_action = QAction("Open &log folder", self)
        self.open_logs_action.triggered.connect(self.log_panel.open_folder)
        self.about_action = QAction("&About Deskbridge", self)
        self.about_action.triggered.connect(self.open_about)
        help_menu.addAction(self.open_logs_action)
        help_menu.addAction(self.about_action)

    # Refresh -----------------------------------------------------------------------

    def tick(self) -> None:
        self.refresh_status()
        self.refresh_health()

    def refresh_status(self) -> None:
        controller = self.controller
        view = controller.view()
        self.state_icon.setPixmap(state_icon(view.state).pixmap(QSize(32, 32)))
        self.state_title.setText(view.title)
        self.state_detail.setText(view.detail)
        self.state_detail.setVisible(bool(view.detail))

        running = controller.running
        if running:
            self.connect_button.setText("Disconnect")
        elif controller.signed_in:
            self.connect_button.setText("Connect")
        elif controller.needs_setup:
            self.connect_button.setText("Set up…")
        else:
            self.connect_button.setText("Sign in…")
        self.retry_button.setVisible(running and view.state is ViewState.RECONNECTING)
        self.sign_out_button.setEnabled(controller.signed_in)
        self.connect_action.setEnabled(not running or view.state is ViewState.RECONNECTING)
        self.disconnect_action.setEnabled(running)
        self.sign_out_action.setEnabled(controller.signed_in)

        status = controller.agent_status
        if view.state is ViewState.CONNECTED and status.connected_since is not None:
            self.uptime_label.setText(format_duration(time.time() - status.connected_since))
        else:
            self.uptime_label.setText("not connected")
        history = controller.history
        rates = history.sample_rates()
        self.to_desktop_label.setText(f"{format_bytes(history.bytes_to_desktop)}  ({format_rate(rates.to_desktop)})")
        self.to_cloud_label.setText(f"{format_bytes(history.bytes_to_cloud)}  ({format_rate(rates.to_cloud)})")
        self.streams_label.setText(f"{history.streams_opened:,}")
        self.setWindowTitle(f"Deskbridge: {view.title}")

    def refresh_config(self) -> None:
        config = self.controller.config
        self.relay_label.setText(config.relay_url or "not set up")
        self.account_label.setText(config.account or "not signed in")
        self.device_label.setText(config.device)
        self.traffic_panel.set_known_targets(sorted(config.targets))
        self.refresh_health()

    def refresh_health(self) -> None:
        tree = self.targets_tree
        statuses = list(self.controller.health)
        while tree.topLevelItemCount() > len(statuses):
            tree.takeTopLevelItem(tree.topLevelItemCount() - 1)
        advice = []
        now = time.time()
        for index, status in enumerate(statuses):
            item = tree.topLevelItem(index)
            if item is None:
                item = QTreeWidgetItem()
                tree.addTopLevelItem(item)
            item.setText(0, status.target.name)
            item.setText(1, status.target.address)
            item.setText(2, status.summary)
            item.setIcon(2, dot_icon(HEALTH_DOTS[status.health]))
            checked = f"Checked {max(0, round(now - status.checked_at))} s ago." if status.checked_at else "Not checked yet."
            item.setToolTip(2, f"{status.detail}\n{checked}".strip())
            if status.advice:
                advice.append(status.advice)
        if not statuses:
            self.target_advice.setText("No targets yet. Add the applications the cloud may reach in Settings.")
        else:
            self.target_advice.setText("\n".join(advice))
        self.target_advice.setVisible(bool(self.target_advice.text()))

    # Commands ----------------------------------------------------------------------

    def _connect_clicked(self) -> None:
        controller = self.controller
        if controller.running:
            self.disconnect_agent()
        elif controller.signed_in:
            controller.connect_agent()
        else:
            self.open_wizard(start_at_sign_in=not controller.needs_setup)

    def disconnect_agent(self) -> None:
        self.tasks.spawn(self.controller.disconnect_agent(), "disconnect")

    def sign_out(self) -> None:
        self.tasks.spawn(self.controller.sign_out(), "sign out")

    def _sign_in_needed(self) -> None:
        if self.isVisible():
            self.open_wizard(start_at_sign_in=True)

    def open_wizard(self, start_at_sign_in: bool = False) -> SetupWizard:
        if self.wizard is not None and self.wizard.isVisible():
            self.wizard.raise_()
            self.wizard.activateWindow()
            return self.wizard
        wizard = SetupWizard(self.controller, start_at_sign_in=start_at_sign_in, parent=self)
        wizard.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        wizard.destroyed.connect(self._wizard_destroyed)
        self.wizard = wizard
        wizard.show()
        return wizard

    def _wizard_destroyed(self) -> None:
        self.wizard = None

    def open_settings(self) -> SettingsDialog:
        if self.settings_dialog is not None and self.settings_dialog.isVisible():
            self.settings_dialog.raise_()
            self.settings_dialog.activateWindow()
            return self.settings_dialog
        dialog = SettingsDialog(self.controller, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.destroyed.connect(self._settings_destroyed)
        self.settings_dialog = dialog
        dialog.show()
        return dialog

    def _settings_destroyed(self) -> None:
        self.settings_dialog = None

    def open_about(self) -> AboutDialog:
        if self.about_dialog is None:
            self.about_dialog = AboutDialog(self)
        self.about_dialog.show()
        self.about_dialog.raise_()
        return self.about_dialog

    def bring_to_front(self) -> None:
        self.show()
        self.setWindowState(self.windowState() & ~Qt.WindowState.WindowMinimized)
        self.raise_()
        self.activateWindow()

    # Closing -------------------------------------------------------------------------

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.quitting:
            event.accept()
            return
        event.ignore()
        if self.tray_available:
            self.hide()
            if not self._told_about_tray:
                self._told_about_tray = True
                self.controller.notice.emit(
                    "Deskbridge is still running",
                    "The tunnel stays up in the background. Use the tray icon to open the window or quit.",
                )
            return
        self.controller.request_quit()

    def stop(self) -> None:
        """Stop timers and window tasks and close child windows; call before the window goes away."""
        self.quitting = True
        self.timer.stop()
        self.traffic_panel.stop()
        self.log_panel.stop()
        self.tasks.cancel()
        for child in (self.wizard, self.settings_dialog, self.about_dialog):
            if child is not None:
                child.close()
