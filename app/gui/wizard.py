"""The setup wizard: relay, sign-in and targets; finishing it saves the settings and connects.

Each page checks its input over the network before it lets the person go
on. ``QWizardPage.validatePage`` must return at once, so a page starts its
check as a task, returns False, and moves the wizard on by itself when the
check passes. The wizard is never run with ``exec()``: the tunnel and
everything else keep running while it is open.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import shiboken6
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QVBoxLayout,
    QWidget,
    QWizard,
    QWizardPage,
)

from app.core.auth import CodeRequired, Tokens, login
from app.core.config import validate_relay_url
from app.core.errors import ConfigError, CredentialError, DeskbridgeError, HandshakeError, SignInError, describe_os_error
from app.core.probe import check_relay_async

from .controller import AppController, SetupResult
from .tasks import TaskSet
from .targets_editor import TargetsEditor, transparent_scroll_area

logger = logging.getLogger(__name__)

RELAY_PAGE, SIGN_IN_PAGE, TARGETS_PAGE = range(3)
ERROR_STYLE = "color: palette(text); background: #fdecea; border: 1px solid #f5c2c0; border-radius: 4px; padding: 6px;"
OK_STYLE = "color: palette(text); background: #e6f4ea; border: 1px solid #b7dfc2; border-radius: 4px; padding: 6px;"
NOTE_STYLE = "color: palette(text); background: #fff8e1; border: 1px solid #f0dca0; border-radius: 4px; padding: 6px;"


def sentence(text: str) -> str:
    """Start a message with a capital letter and end it with a full stop."""
    text = text.strip()
    if not text:
        return text
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


class MessageLabel(QLabel):
    """A word-wrapped label for a check's outcome: working, passed, failed or a note."""

    def __init__(self) -> None:
        super().__init__()
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.hide()

    def show_message(self, text: str, style: str = "") -> None:
        self.setStyleSheet(style)
        self.setText(text)
        self.setVisible(bool(text))

    def show_error(self, text: str) -> None:
        self.show_message(sentence(text), ERROR_STYLE)

    def show_ok(self, text: str) -> None:
        self.show_message(sentence(text), OK_STYLE)

    def show_note(self, text: str) -> None:
        self.show_message(sentence(text), NOTE_STYLE)


class CheckedPage(QWizardPage):
    """A page whose input is checked by a coroutine before the wizard moves on."""

    def __init__(self, tasks: TaskSet) -> None:
        super().__init__()
        self.tasks = tasks
        self.busy = False
        self._passed: Any = None

    def check_key(self) -> Any:
        """Return what the check depends on; a passed check counts only while this stays equal."""
        raise NotImplementedError

    async def check(self) -> bool:
        raise NotImplementedError

    def busy_text(self) -> str:
        return "Checking…"

    def validatePage(self) -> bool:
        key = self.check_key()
        if self._passed is not None and self._passed == key:
            return True
        if not self.busy:
            self.busy = True
            self.set_message(self.busy_text(), "")
            self.tasks.spawn(self._run_check(key), f"{type(self).__name__} check")
        return False

    async def _run_check(self, key: Any) -> None:
        try:
            passed = await self.check()
        finally:
            self.busy = False
        if not shiboken6.isValid(self) or not passed or self.check_key() != key:
            return
        self._passed = key
        wizard = self.wizard()
        if wizard is None or wizard.currentPage() is not self:
            return
        if self.isFinalPage():
            wizard.accept()
        else:
            wizard.next()

    def set_message(self, text: str, style: str) -> None:
        raise NotImplementedError


class RelayPage(CheckedPage):
    def __init__(self, tasks: TaskSet, relay_url: str) -> None:
        super().__init__(tasks)
        self.setTitle("Relay")
        self.setSubTitle("Deskbridge connects out to a relay in the cloud; cloud services reach this computer through it.")
        self.url_edit = QLineEdit(relay_url)
        self.url_edit.setPlaceholderText("wss://relay.example.com")
        self.url_edit.setAccessibleName("Relay URL")
        self.registerField("relay_url*", self.url_edit)
        hint = QLabel("Ask whoever runs the relay for its address. It starts with ws:// or wss://.")
        hint.setWordWrap(True)
        self.result = MessageLabel()

        form = QFormLayout()
        form.addRow("Relay URL:", self.url_edit)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(hint)
        layout.addSpacing(8)
        layout.addWidget(self.result)
        layout.addStretch(1)
        self.url_edit.textChanged.connect(lambda _text: self.result.show_message(""))

    def check_key(self) -> Any:
        return self.url_edit.text().strip()

    def busy_text(self) -> str:
        return "Checking the relay…"

    def set_message(self, text: str, style: str) -> None:
        self.result.show_message(text, style)

    @property
    def relay_url(self) -> str:
        return validate_relay_url(self.url_edit.text())

    async def check(self) -> bool:
        try:
            url = self.relay_url
        except ConfigError as exc:
            self.result.show_error(str(exc))
            return False
        result = await check_relay_async(url)
        if result.ok:
            self.result.show_ok(result.message)
        else:
            self.result.show_error(result.message)
        return result.ok


class SignInPage(CheckedPage):
    def __init__(self, tasks: TaskSet, controller: AppController, account: str) -> None:
        super().__init__(tasks)
        self.controller = controller
        self.tokens: Tokens | None = None
        self.setTitle("Sign in")
        self.username_edit = QLineEdit(account)
        self.username_edit.setAccessibleName("User name")
        self.password_edit = QLineEdit()
        self.password_edit.setEchoMode(QLineEdit.EchoMode.Password)
        self.password_edit.setAccessibleName("Password")
        self.code_edit = QLineEdit()
        self.code_edit.setPlaceholderText("6-digit code")
        self.code_edit.setMaxLength(10)
        self.code_edit.setAccessibleName("One-time code")
        self.code_label = QLabel("One-time code:")
        self.remember_box = QCheckBox("Remember me on this computer")
        self.remember_box.setChecked(controller.settings.remember_sign_in)
        self.remember_box.setToolTip("Keeps the sign-in in the system keyring, never in a file. The password is never saved.")
        self.keyring_note = MessageLabel()
        self.result = MessageLabel()
        self.registerField("username*", self.username_edit)
        self.registerField("password*", self.password_edit)

        self.form = QFormLayout()
        self.form.addRow("User name:", self.username_edit)
        self.form.addRow("Password:", self.password_edit)
        self.form.addRow(self.code_label, self.code_edit)
        layout = QVBoxLayout(self)
        layout.addLayout(self.form)
        layout.addWidget(self.remember_box)
        layout.addWidget(self.keyring_note)
        layout.addSpacing(8)
        layout.addWidget(self.result)
        layout.addStretch(1)
        self.set_code_visible(False)
        self.remember_box.toggled.connect(self._remember_toggled)

    def set_code_visible(self, visible: bool) -> None:
        self.form.setRowVisible(self.code_edit, visible)

    @property
    def relay_url(self) -> str:
        wizard = self.wizard()
        assert isinstance(wizard, SetupWizard)
        return wizard.relay_url

    def initializePage(self) -> None:
        self.setSubTitle(f"Sign in to the relay at {self.relay_url} with your account.")
        if self.remember_box.isChecked():
            self.tasks.spawn(self._check_keyring(), "keyring check")

    def _remember_toggled(self, checked: bool) -> None:
        self.keyring_note.show_message("")
        if checked:
            self.tasks.spawn(self._check_keyring(), "keyring check")

    async def _check_keyring(self) -> None:
        """Tell the person up front when the sign-in cannot be remembered."""
        try:
            await asyncio.to_thread(self.controller.keyring.check_backend)
        except CredentialError as exc:
            logger.warning("%s", exc)
            self.remember_box.setChecked(False)
            self.remember_box.setEnabled(False)
            self.keyring_note.show_note(f"Remember me is not available, so this sign-in lasts until Deskbridge quits. {exc}")

    def check_key(self) -> Any:
        return (self.relay_url, self.username_edit.text().strip(), self.password_edit.text(), self.code_edit.text().strip())

    def busy_text(self) -> str:
        return "Signing in…"

    def set_message(self, text: str, style: str) -> None:
        self.result.show_message(text, style)

    async def check(self) -> bool:
        relay, username, password, code = self.check_key()
        try:
            self.tokens = await login(relay, username, password, code or None)
        except CodeRequired as exc:
            self.set_code_visible(True)
            self.code_edit.setFocus()
            self.result.show_note(str(exc))
            return False
        except SignInError as exc:
            message = str(exc)
            self.result.show_error(message.removeprefix("sign-in failed: "))
            if "code" in message:
                self.code_edit.selectAll()
                self.code_edit.setFocus()
            else:
                self.password_edit.selectAll()
                self.password_edit.setFocus()
            return False
        except HandshakeError as exc:
            self.result.show_error(f"the relay could not sign you in: {exc.message}")
            return False
        except OSError as exc:
            self.result.show_error(f"cannot reach the relay at {relay}: {describe_os_error(exc)}")
            return False
        except DeskbridgeError as exc:
            self.result.show_error(str(exc))
            return False
        self.result.show_ok(f"Signed in as {self.tokens.account}.")
        return True


class TargetsPage(CheckedPage):
    def __init__(self, tasks: TaskSet, controller: AppController) -> None:
        super().__init__(tasks)
        self.controller = controller
        self.setTitle("Targets")
        self.setSubTitle(
            "Choose the desktop applications the cloud may reach. Deskbridge connects only to the targets listed here."
        )
        config = controller.config
        self.device_edit = QLineEdit(config.device)
        self.device_edit.setAccessibleName("Device name")
        self.device_edit.setToolTip("How this computer appears at the relay")
        self.editor = TargetsEditor(list(config.targets.values()))
        if not self.editor.rows:
            self.editor.add_row("", "127.0.0.1", 7497)
        scroll = transparent_scroll_area(self.editor)
        self.result = MessageLabel()

        form = QFormLayout()
        form.addRow("This computer's name:", self.device_edit)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(scroll, 1)
        layout.addWidget(self.result)
        self.editor.changed.connect(lambda: self.result.show_message(""))

    def check_key(self) -> Any:
        rows = tuple((row.name_edit.text(), row.host_edit.text(), row.port_spin.value()) for row in self.editor.rows)
        return (self.device_edit.text().strip(), rows)

    def busy_text(self) -> str:
        return "Saving and connecting…"

    def set_message(self, text: str, style: str) -> None:
        self.result.show_message(text, style)

    async def check(self) -> bool:
        wizard = self.wizard()
        assert isinstance(wizard, SetupWizard)
        device = self.device_edit.text().strip()
        if not device:
            self.result.show_error("enter a name for this computer, for example its host name")
            return False
        try:
            targets = self.editor.targets()
        except ConfigError as exc:
            self.result.show_error(str(exc))
            return False
        tokens = wizard.sign_in_page.tokens
        if tokens is None or tokens.refresh_token is None:
            self.result.show_error("sign in first: go back to the sign-in page")
            return False
        result = SetupResult(
            relay_url=wizard.relay_url,
            account=tokens.account,
            refresh_token=tokens.refresh_token,
            remember=wizard.sign_in_page.remember_box.isChecked(),
            targets=targets,
            device=device,
        )
        try:
            warning = await self.controller.complete_setup(result)
        except (OSError, DeskbridgeError) as exc:
            logger.error("saving the setup failed: %s", exc)
            self.result.show_error(f"saving the settings failed: {exc}")
            return False
        if warning:
            self.controller.notice.emit("Sign-in not remembered", warning)
        return True


class SetupWizard(QWizard):
    """Relay, sign-in and targets in three pages; opened with ``show()``, never ``exec()``."""

    setup_done = Signal()

    def __init__(self, controller: AppController, *, start_at_sign_in: bool = False, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.tasks = TaskSet()
        self.setWindowTitle("Set up Deskbridge")
        self.setWizardStyle(QWizard.WizardStyle.ModernStyle)
        self.setOption(QWizard.WizardOption.NoBackButtonOnStartPage, True)
        self.setButtonText(QWizard.WizardButton.FinishButton, "Finish and connect")
        self.setMinimumSize(620, 520)
        config = controller.config
        self.relay_page = RelayPage(self.tasks, config.relay_url)
        self.sign_in_page = SignInPage(self.tasks, controller, config.account)
        self.targets_page = TargetsPage(self.tasks, controller)
        self.setPage(RELAY_PAGE, self.relay_page)
        self.setPage(SIGN_IN_PAGE, self.sign_in_page)
        self.setPage(TARGETS_PAGE, self.targets_page)
        if start_at_sign_in and config.relay_url:
            self.setStartId(SIGN_IN_PAGE)
        self.finished.connect(self._finished)

    @property
    def relay_url(self) -> str:
        try:
            return self.relay_page.relay_url
        except ConfigError:
            return self.controller.config.relay_url

    def _finished(self, result: int) -> None:
        self.targets_page.editor.stop()
        self.tasks.cancel()
        if result == QWizard.DialogCode.Accepted:
            self.setup_done.emit()
