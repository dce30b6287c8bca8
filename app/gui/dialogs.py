"""The settings dialog and the About box. Both open with ``show()``, so the event loop keeps running."""

from __future__ import annotations

import logging
import platform
import sys
from dataclasses import replace
from importlib import metadata

import PySide6
import qasync
import shiboken6
import websockets
from PySide6.QtCore import Qt, qVersion
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app import __version__
from app.core.config import AgentConfig, validate_relay_url
from app.core.errors import ConfigError, DeskbridgeError
from app.core.models import MAX_HISTORY_EVENTS, MIN_HISTORY_EVENTS, GuiSettings

from .controller import AppController
from .icons import app_icon
from .targets_editor import TargetsEditor, transparent_scroll_area
from .tasks import TaskSet
from .wizard import MessageLabel

logger = logging.getLogger(__name__)

NOTE_TEXT_STYLE = "color: #57606a;"


class SettingsDialog(QDialog):
    """Relay, device name, targets, start at login, notifications and history size."""

    def __init__(self, controller: AppController, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.tasks = TaskSet()
        self.setWindowTitle("Deskbridge settings")
        self.setMinimumSize(600, 560)
        config, settings = controller.config, controller.settings

        self.relay_edit = QLineEdit(config.relay_url)
        self.relay_edit.setAccessibleName("Relay URL")
        self.relay_note = QLabel("Changing the relay signs you out; you then sign in to the new relay.")
        self.relay_note.setWordWrap(True)
        self.relay_note.setStyleSheet(NOTE_TEXT_STYLE)
        self.account_label = QLabel(config.account or "not signed in")
        self.device_edit = QLineEdit(config.device)
        self.device_edit.setAccessibleName("Device name")
        connection = QFormLayout()
        connection.addRow("Relay URL:", self.relay_edit)
        connection.addRow("", self.relay_note)
        connection.addRow("Account:", self.account_label)
        connection.addRow("This computer's name:", self.device_edit)
        connection_box = QGroupBox("Connection")
        connection_box.setLayout(connection)

        self.targets_editor = TargetsEditor(list(config.targets.values()))
        scroll = transparent_scroll_area(self.targets_editor)
        targets_layout = QVBoxLayout()
        targets_layout.addWidget(scroll)
        targets_box = QGroupBox("Targets the cloud may reach")
        targets_box.setLayout(targets_layout)

        self.autostart_box = QCheckBox("Start Deskbridge when I log in to this computer")
        self.autostart_box.setChecked(controller.autostart_enabled)
        self.notifications_box = QCheckBox("Show a notification when the connection drops or returns, or a sign-in is needed")
        self.notifications_box.setChecked(settings.notifications)
        self.history_spin = QSpinBox()
        self.history_spin.setRange(MIN_HISTORY_EVENTS, MAX_HISTORY_EVENTS)
        self.history_spin.setSingleStep(10_000)
        self.history_spin.setGroupSeparatorShown(True)
        self.history_spin.setSuffix(" events")
        self.history_spin.setValue(settings.history_events)
        self.history_spin.setAccessibleName("Traffic history size")
        history_row = QHBoxLayout()
        history_row.addWidget(QLabel("Keep the latest"))
        history_row.addWidget(self.history_spin)
        history_row.addWidget(QLabel("in the traffic view"))
        history_row.addStretch(1)
        desktop = QVBoxLayout()
        desktop.addWidget(self.autostart_box)
        desktop.addWidget(self.notifications_box)
        desktop.addLayout(history_row)
        desktop_box = QGroupBox("This computer")
        desktop_box.setLayout(desktop)

        self.message = MessageLabel()
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(self.save)
        self.buttons.rejected.connect(self.reject)

        layout = QVBoxLayout(self)
        layout.addWidget(connection_box)
        layout.addWidget(targets_box, 1)
        layout.addWidget(desktop_box)
        layout.addWidget(self.message)
        layout.addWidget(self.buttons)
        self.finished.connect(lambda _result: self._stop())

    def collect(self) -> tuple[AgentConfig, GuiSettings]:
        """Return the edited config and window settings, or raise ConfigError for an invalid field."""
        relay = validate_relay_url(self.relay_edit.text())
        device = self.device_edit.text().strip()
        if not device:
            raise ConfigError("enter a name for this computer")
        targets = self.targets_editor.targets()
        config = AgentConfig(relay, self.controller.config.account, device, targets)
        settings = replace(
            self.controller.settings,
            start_at_login=self.autostart_box.isChecked(),
            notifications=self.notifications_box.isChecked(),
            history_events=self.history_spin.value(),
        )
        return config, settings

    def save(self) -> None:
        try:
            config, settings = self.collect()
        except ConfigError as exc:
            self.message.show_error(str(exc))
            return
        self.buttons.setEnabled(False)
        self.message.show_message("Saving…")
        self.tasks.spawn(self._save(config, settings), "saving settings")

    async def _save(self, config: AgentConfig, settings: GuiSettings) -> None:
        try:
            await self.controller.apply_settings(config, settings)
        except (OSError, DeskbridgeError) as exc:
            logger.error("saving the settings failed: %s", exc)
            if shiboken6.isValid(self):
                self.message.show_error(f"saving the settings failed: {exc}")
                self.buttons.setEnabled(True)
            return
        if shiboken6.isValid(self):
            self.accept()

    def _stop(self) -> None:
        self.targets_editor.stop()
        self.tasks.cancel()


def versions() -> list[tuple[str, str]]:
    """Return the versions of Deskbridge and the libraries it is built on."""

    def installed(name: str, fallback: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return fallback

    return [
        ("Deskbridge", __version__),
        ("Python", platform.python_version()),
        ("Qt", qVersion()),
        ("PySide6", PySide6.__version__),
        ("websockets", getattr(websockets, "__version__", installed("websockets", "unknown"))),
        ("qasync", getattr(qasync, "__version__", installed("qasync", "unknown"))),
        ("Operating system", f"{platform.system()} {platform.release()} ({sys.platform})"),
    ]


class AboutDialog(QDialog):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("About Deskbridge")
        icon = QLabel()
        icon.setPixmap(app_icon().pixmap(64, 64))
        title = QLabel(f"<h2>Deskbridge {__version__}</h2>")
        summary = QLabel(
            "Lets cloud systems reach a desktop application's local socket API "
            "through one outbound WebSocket to a relay."
        )
        summary.setWordWrap(True)
        header = QHBoxLayout()
        header.addWidget(icon, 0, Qt.AlignmentFlag.AlignTop)
        text = QVBoxLayout()
        text.addWidget(title)
        text.addWidget(summary)
        header.addLayout(text, 1)

        table = QFormLayout()
        self.version_labels: dict[str, QLabel] = {}
        for name, version in versions():
            label = QLabel(version)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.version_labels[name] = label
            table.addRow(f"{name}:", label)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(header)
        layout.addSpacing(8)
        layout.addLayout(table)
        layout.addWidget(buttons)
        self.setMinimumWidth(420)
