"""The settings dialog and the About box. Both open with ``show()``, so the event loop keeps running."""

from __future__ import annotations

import asyncio
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
    QButtonGroup,
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app import __version__
from app.core.config import AgentConfig, validate_relay_url
from app.core.errors import ConfigError, DeskbridgeError
from app.core.net import Connector, connector_from_settings
from app.core.models import MAX_HISTORY_EVENTS, MIN_HISTORY_EVENTS, GuiSettings

from .controller import AppController
from .icons import app_icon
from .targets_editor import TargetsEditor, transparent_scroll_area
from .tasks import TaskSet
from .wizard import MessageLabel

logger = logging.getLogger(__name__)

NOTE_TEXT_STYLE = "color: #57606a;"


class SettingsDialog(QDialog):
    """Relay, device name, network, targets, start at login, notifications and history size."""

    def __init__(self, controller: AppController, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.tasks = TaskSet()
        self.setWindowTitle("Deskbridge settings")
        self.setMinimumSize(600, 760)
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

        self.network = NetworkSettings(config, controller.proxy_password)

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
        layout.addWidget(self.network)
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
        config = replace(self.controller.config, relay_url=relay, device=device, targets=targets)
        settings = replace(
            self.controller.settings,
            start_at_login=self.autostart_box.isChecked(),
            notifications=self.notifications_box.isChecked(),
            history_events=self.history_spin.value(),
        )
        return config, settings

    def save(self) -> None:
        self.network.message.hide()
        try:
            config, settings = self.collect()
        except ConfigError as exc:
            self.message.show_error(str(exc))
            return
        try:
            config, connector = self.network.apply_to(config)
        except ConfigError as exc:
            self.network.message.show_error(str(exc))
            self.message.show_error("Check the network settings.")
            return
        self.buttons.setEnabled(False)
        self.message.show_message("Saving…")
        proxy_password = self.network.proxy_password_edit.text()
        self.tasks.spawn(self._save(config, settings, connector, proxy_password), "saving settings")

    async def _save(self, config: AgentConfig, settings: GuiSettings, connector: Connector, proxy_password: str) -> None:
        # Loading the CA file reads the disk, so it runs in a worker thread.
        try:
            await asyncio.to_thread(connector.ssl_context)
        except ConfigError as exc:
            if shiboken6.isValid(self):
                self.network.message.show_error(str(exc))
                self.message.show_error("Check the network settings.")
                self.buttons.setEnabled(True)
            return
        try:
            warning = await self.controller.apply_settings(config, settings, proxy_password)
        except (OSError, DeskbridgeError) as exc:
            logger.error("saving the settings failed: %s", exc)
            if shiboken6.isValid(self):
                self.message.show_error(f"saving the settings failed: {exc}")
                self.buttons.setEnabled(True)
            return
        if warning:
            self.controller.notice.emit("Proxy password not saved", warning)
        if shiboken6.isValid(self):
            self.accept()

    def _stop(self) -> None:
        self.targets_editor.stop()
        self.network.close_file_dialog()
        self.tasks.cancel()


class NetworkSettings(QGroupBox):
    """The proxy, an extra CA file and a pin of the relay's public key."""

    def __init__(self, config: AgentConfig, proxy_password: str) -> None:
        super().__init__("Network")
        self.system_proxy = QRadioButton("Use the system settings")
        self.no_proxy = QRadioButton("No proxy")
        self.manual_proxy = QRadioButton("This proxy:")
        self.proxy_choice = QButtonGroup(self)
        for button in (self.system_proxy, self.no_proxy, self.manual_proxy):
            self.proxy_choice.addButton(button)
        modes = {"system": self.system_proxy, "none": self.no_proxy, "manual": self.manual_proxy}
        modes.get(config.proxy_mode, self.system_proxy).setChecked(True)

        self.proxy_url_edit = QLineEdit(config.proxy_url)
        self.proxy_url_edit.setPlaceholderText("http://proxy.example:3128 or socks5://proxy.example:1080")
        self.proxy_url_edit.setAccessibleName("Proxy URL")
        self.proxy_user_edit = QLineEdit(config.proxy_username)
        self.proxy_user_edit.setPlaceholderText("only if the proxy asks for a sign-in")
        self.proxy_user_edit.setAccessibleName("Proxy user name")
        self.proxy_password_edit = QLineEdit(proxy_password)
        self.proxy_password_edit.setEchoMode(QLineEdit.EchoMode.Password)
        self.proxy_password_edit.setAccessibleName("Proxy password")
        proxy_fields = QFormLayout()
        proxy_fields.setContentsMargins(24, 0, 0, 0)
        proxy_fields.addRow("URL:", self.proxy_url_edit)
        proxy_fields.addRow("User name:", self.proxy_user_edit)
        proxy_fields.addRow("Password:", self.proxy_password_edit)
        self.manual_proxy.toggled.connect(self._update_proxy_fields)
        self._update_proxy_fields()

        self.ca_file_edit = QLineEdit(config.ca_file)
        self.ca_file_edit.setPlaceholderText("none: the system's trusted CAs only")
        self.ca_file_edit.setAccessibleName("Extra CA file")
        self.ca_browse_button = QPushButton("Browse…")
        self.ca_browse_button.clicked.connect(self.browse_ca_file)
        self.file_dialog: QFileDialog | None = None
        ca_row = QHBoxLayout()
        ca_row.addWidget(self.ca_file_edit, 1)
        ca_row.addWidget(self.ca_browse_button)
        self.pin_edit = QLineEdit(config.pin_sha256)
        self.pin_edit.setPlaceholderText("none: any trusted certificate")
        self.pin_edit.setAccessibleName("Relay key pin")
        pin_note = QLabel("The SHA-256 of the relay's public key, in base64. With a pin, only that key is accepted.")
        pin_note.setWordWrap(True)
        pin_note.setStyleSheet(NOTE_TEXT_STYLE)
        tls_fields = QFormLayout()
        tls_fields.addRow("Extra CA file (PEM):", ca_row)
        tls_fields.addRow("Relay key pin:", self.pin_edit)
        tls_fields.addRow("", pin_note)

        self.message = MessageLabel()
        layout = QVBoxLayout(self)
        layout.addWidget(self.system_proxy)
        layout.addWidget(self.no_proxy)
        layout.addWidget(self.manual_proxy)
        layout.addLayout(proxy_fields)
        layout.addLayout(tls_fields)
        layout.addWidget(self.message)

    @property
    def proxy_mode(self) -> str:
        if self.manual_proxy.isChecked():
            return "manual"
        return "none" if self.no_proxy.isChecked() else "system"

    def apply_to(self, config: AgentConfig) -> tuple[AgentConfig, Connector]:
        """Return ``config`` with these settings and a connector built from them, or raise ConfigError.

        The CA file is not read here, because that reads the disk. The caller loads it with ``Connector.ssl_context``.
        """
        mode = self.proxy_mode
        url = self.proxy_url_edit.text().strip()
        username = self.proxy_user_edit.text().strip()
        password = self.proxy_password_edit.text()
        if mode == "manual" and password and not username:
            raise ConfigError("enter the proxy user name that goes with the password, or clear the password")
        network = replace(
            config,
            proxy_mode=mode,
            proxy_url=url,
            proxy_username=username,
            ca_file=self.ca_file_edit.text().strip(),
            pin_sha256=self.pin_edit.text().strip(),
        )
        connector = connector_from_settings(mode, url, username, password, network.ca_file, network.pin_sha256)
        return network, connector

    def browse_ca_file(self) -> None:
        """Open a file dialog without blocking the event loop; the chosen path fills the CA file field."""
        if self.file_dialog is None:
            self.file_dialog = QFileDialog(self, "Choose the extra CA file", "", "Certificates (*.pem *.crt *.cer);;All files (*)")
            self.file_dialog.setFileMode(QFileDialog.FileMode.ExistingFile)
            self.file_dialog.fileSelected.connect(self.ca_file_edit.setText)
        self.file_dialog.open()

    def close_file_dialog(self) -> None:
        if self.file_dialog is not None:
            self.file_dialog.reject()

    def _update_proxy_fields(self) -> None:
        for edit in (self.proxy_url_edit, self.proxy_user_edit, self.proxy_password_edit):
            edit.setEnabled(self.manual_proxy.isChecked())


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
