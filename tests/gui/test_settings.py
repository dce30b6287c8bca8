"""The settings dialog: saved across restarts, and harmless to traffic while open."""

from __future__ import annotations

import datetime
import json
import logging
import socket
from pathlib import Path

import keyring.backend
import keyring.errors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PySide6.QtWidgets import QDialogButtonBox

from app.core.agent import AgentState
from app.core.config import AgentConfig, Target, save_config
from app.core.credentials import SERVICE, KeyringStore, entry_name, proxy_entry
from app.core.models import load_gui_settings
from tests.gui.helpers import signed_in_preset
from tests.processes import thread_echo_port  # noqa: F401  (fixture)

WAIT_MS = 15_000
# A proxy on this computer's discard port, which is normally closed, so the agent's attempts stay on loopback.
PROXY_URL = "http://127.0.0.1:9"
PROXY_USER = "desk-proxy"
PROXY_PASSWORD = "s3cret pass"
# The SHA-256 of b"relay key", in base64.
PIN = "WCEfb2L50+kyg2a8TbVPMo++mf1dmakvdriP6aRWNHg="
ROUNDS = 400
ROUND_BYTES = 64 * 1024


def save_button(dialog):
    return dialog.buttons.button(QDialogButtonBox.StandardButton.Save)


def test_settings_survive_restart(make_gui, dirs, autostart_entry, qtbot):
    save_config(dirs.config, AgentConfig("ws://127.0.0.1:9", "alice", "old-name", {"quotes": Target("quotes", "127.0.0.1", 7497)}))
    first = make_gui()
    dialog = first.window.open_settings()
    assert dialog.device_edit.text() == "old-name"
    assert not dialog.autostart_box.isChecked()

    dialog.device_edit.setText("trading-desk")
    dialog.history_spin.setValue(20_000)
    dialog.notifications_box.setChecked(False)
    dialog.autostart_box.setChecked(True)
    dialog.targets_editor.add_row("redis", "127.0.0.1", 6379)
    save_button(dialog).click()
    qtbot.waitUntil(lambda: first.window.settings_dialog is None, timeout=WAIT_MS)
    first.controller.request_quit()
    assert first.quit_event.is_set()

    second = make_gui()

    config, settings = second.controller.config, second.controller.settings
    assert config.device == "trading-desk"
    assert sorted(config.targets) == ["quotes", "redis"]
    assert settings.history_events == 20_000
    assert settings.notifications is False
    assert second.controller.autostart_enabled
    assert autostart_entry.is_enabled()
    assert "run --minimized" in autostart_entry.path.read_text(encoding="utf-8")
    assert second.controller.history.max_events == 20_000
    assert load_gui_settings(dirs.config).history_events == 20_000
    saved = json.loads((dirs.config / "config.json").read_text(encoding="utf-8"))
    assert saved["device"] == "trading-desk"
    reopened = second.window.open_settings()
    assert reopened.history_spin.value() == 20_000
    assert reopened.autostart_box.isChecked()
    assert not reopened.notifications_box.isChecked()


def test_settings_reject_invalid_target(make_gui, dirs, qtbot):
    save_config(dirs.config, AgentConfig("ws://127.0.0.1:9", "alice", "desk", {"quotes": Target("quotes", "127.0.0.1", 7497)}))
    gui = make_gui()
    dialog = gui.window.open_settings()

    dialog.targets_editor.add_row("quotes", "127.0.0.1", 7498)
    save_button(dialog).click()

    assert dialog.isVisible()
    assert "used twice" in dialog.message.text()
    assert (dirs.config / "config.json").read_text(encoding="utf-8").count('"quotes"') == 1


def test_remote_target_needs_consent(make_gui, dirs, qtbot):
    save_config(dirs.config, AgentConfig("ws://127.0.0.1:9", "alice", "desk", {"quotes": Target("quotes", "127.0.0.1", 7497)}))
    gui = make_gui()
    dialog = gui.window.open_settings()

    # 192.0.2.0/24 is reserved for documentation; nothing is sent there without consent.
    row = dialog.targets_editor.add_row("office", "192.0.2.10", 7000)
    qtbot.waitUntil(lambda: "is not this computer" in row.status_label.text(), timeout=WAIT_MS)
    save_button(dialog).click()

    assert row.remote_box.isVisibleTo(dialog)
    assert "on another computer" in dialog.message.text()
    assert "office" not in (dirs.config / "config.json").read_text(encoding="utf-8")


def echo_rounds(port: int) -> int:
    """Send ROUNDS chunks through the echo target, reading each back; return the bytes echoed."""
    block = b"d" * ROUND_BYTES
    echoed = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for _ in range(ROUNDS):
            sock.sendall(block)
            remaining = ROUND_BYTES
            while remaining:
                chunk = sock.recv(remaining)
                if not chunk:
                    raise AssertionError(f"connection closed after {echoed} bytes")
                remaining -= len(chunk)
                echoed += len(chunk)
    return echoed


def test_dialog_open_during_traffic(make_gui, thread_relay, thread_echo_port, workers, log_buffer, qloop, qtbot):
    relay = thread_relay(expose=("echo",))
    preset = signed_in_preset(qloop, relay.url, {"echo": Target("echo", "127.0.0.1", thread_echo_port)})
    gui = make_gui(preset=preset)
    controller = gui.controller
    qtbot.waitUntil(lambda: controller.agent_status.state is AgentState.CONNECTED, timeout=WAIT_MS)
    dialog = gui.window.open_settings()
    assert dialog.isVisible()
    before = controller.history.bytes_to_cloud

    echoed = workers.submit(echo_rounds, relay.port_of("echo"))
    qtbot.waitUntil(echoed.done, timeout=60_000)

    assert dialog.isVisible()
    assert echoed.result() == ROUNDS * ROUND_BYTES
    assert controller.history.bytes_to_cloud - before >= ROUNDS * ROUND_BYTES

    dialog.reject()
    _lines, first_quit_line = log_buffer.read_since(0)
    controller.request_quit()
    assert gui.quit_event.is_set()
    qloop.run(gui.shutdown())

    assert not controller.running
    assert controller.agent_status.state is AgentState.STOPPED
    assert len(controller.tasks) == 0
    late_lines, _next = log_buffer.read_since(first_quit_line)
    problems = [line.text for line in late_lines if line.level >= logging.WARNING]
    assert problems == []


# Network settings ------------------------------------------------------------------------------------


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A keyring backend that keeps passwords in a dict, so tests never touch the user's keyring."""

    priority = 1

    def __init__(self) -> None:
        super().__init__()
        self.passwords: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.passwords.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.passwords[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.passwords.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError(f"no password for {username}")


@pytest.fixture
def memory_keyring() -> MemoryKeyring:
    return MemoryKeyring()


def signed_in_config(dirs, memory_keyring: MemoryKeyring) -> AgentConfig:
    """Save a config and a refresh token, so the app starts its agent against a relay that is not running."""
    config = AgentConfig("ws://127.0.0.1:9", "alice", "desk", {"quotes": Target("quotes", "127.0.0.1", 7497)})
    save_config(dirs.config, config)
    memory_keyring.set_password(SERVICE, entry_name(config.relay_url, config.account), "refresh-token")
    return config


def fill_manual_proxy(dialog, ca_file: str = "") -> None:
    network = dialog.network
    network.manual_proxy.setChecked(True)
    network.proxy_url_edit.setText(PROXY_URL)
    network.proxy_user_edit.setText(PROXY_USER)
    network.proxy_password_edit.setText(PROXY_PASSWORD)
    network.ca_file_edit.setText(ca_file)
    network.pin_edit.setText(PIN)


def ca_certificate(tmp_path: Path) -> Path:
    """Write a self-signed CA certificate in PEM and return its path."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Deskbridge test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "extra-ca.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


def test_network_settings_round_trip(make_gui, dirs, memory_keyring, tmp_path, qtbot):
    signed_in_config(dirs, memory_keyring)
    ca_file = str(ca_certificate(tmp_path))
    first = make_gui(keyring=KeyringStore(memory_keyring))
    dialog = first.window.open_settings()
    assert dialog.network.system_proxy.isChecked()
    assert not dialog.network.proxy_url_edit.isEnabled()

    fill_manual_proxy(dialog, ca_file)
    save_button(dialog).click()
    qtbot.waitUntil(lambda: first.window.settings_dialog is None, timeout=WAIT_MS)
    first.controller.request_quit()

    text = (dirs.config / "config.json").read_text(encoding="utf-8")
    saved = json.loads(text)
    assert saved["proxy_mode"] == "manual"
    assert saved["proxy_url"] == PROXY_URL
    assert saved["proxy_username"] == PROXY_USER
    assert saved["ca_file"] == ca_file
    assert saved["pin_sha256"] == PIN
    assert PROXY_PASSWORD not in text
    assert memory_keyring.get_password(SERVICE, entry_name(proxy_entry(PROXY_URL), PROXY_USER)) == PROXY_PASSWORD

    second = make_gui(keyring=KeyringStore(memory_keyring))
    reopened = second.window.open_settings()
    network = reopened.network
    assert network.manual_proxy.isChecked()
    assert network.proxy_url_edit.text() == PROXY_URL
    assert network.proxy_user_edit.text() == PROXY_USER
    assert network.proxy_password_edit.text() == PROXY_PASSWORD
    assert network.ca_file_edit.text() == ca_file
    assert network.pin_edit.text() == PIN
    # The password read from the keyring at start reaches the agent's first connector.
    assert second.controller.agent is not None
    assert second.controller.agent.connector.proxy.password == PROXY_PASSWORD
    assert second.controller.agent.connector.tls.ca_file == ca_file


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("proxy_url_edit", "ftp://proxy.example:21", "invalid proxy"),
        ("proxy_url_edit", "", "no proxy URL is set"),
        ("pin_edit", "not-a-pin", "invalid public-key pin"),
        ("ca_file_edit", "missing-ca.pem", "cannot load the extra CA file"),
        ("ca_file_edit", "not-a-certificate.pem", "cannot load the extra CA file"),
        ("proxy_user_edit", "", "enter the proxy user name"),
    ],
)
def test_network_settings_reject_invalid(make_gui, dirs, memory_keyring, tmp_path, qtbot, field, value, expected):
    save_config(dirs.config, AgentConfig("ws://127.0.0.1:9", "alice", "desk", {"quotes": Target("quotes", "127.0.0.1", 7497)}))
    before = (dirs.config / "config.json").read_text(encoding="utf-8")
    (tmp_path / "not-a-certificate.pem").write_text("this is not a certificate\n", encoding="utf-8")
    gui = make_gui(keyring=KeyringStore(memory_keyring))
    dialog = gui.window.open_settings()

    fill_manual_proxy(dialog)
    if field == "ca_file_edit":
        value = str(tmp_path / value)
    getattr(dialog.network, field).setText(value)
    save_button(dialog).click()

    qtbot.waitUntil(lambda: expected.lower() in dialog.network.message.text().lower(), timeout=WAIT_MS)
    assert dialog.isVisible()
    assert save_button(dialog).isEnabled()
    assert "network settings" in dialog.message.text()
    assert (dirs.config / "config.json").read_text(encoding="utf-8") == before
    assert memory_keyring.passwords == {}


def test_manual_proxy_reaches_agent(make_gui, dirs, memory_keyring, qtbot):
    signed_in_config(dirs, memory_keyring)
    gui = make_gui(keyring=KeyringStore(memory_keyring))
    controller = gui.controller
    assert controller.running
    first_agent = controller.agent
    assert first_agent is not None
    assert first_agent.connector.proxy.mode == "system"

    dialog = gui.window.open_settings()
    fill_manual_proxy(dialog)
    save_button(dialog).click()
    qtbot.waitUntil(lambda: gui.window.settings_dialog is None, timeout=WAIT_MS)

    assert controller.running
    assert controller.agent is not first_agent
    proxy = controller.agent.connector.proxy
    assert proxy.mode == "manual"
    assert proxy.url == PROXY_URL
    assert proxy.username == PROXY_USER
    assert proxy.password == PROXY_PASSWORD


def test_proxy_password_without_keyring(make_gui, dirs, no_keyring, qtbot):
    config = AgentConfig("ws://127.0.0.1:9", "alice", "desk", {"quotes": Target("quotes", "127.0.0.1", 7497)})
    save_config(dirs.config, config)
    gui = make_gui(keyring=no_keyring)
    notices: list[tuple[str, str]] = []
    gui.controller.notice.connect(lambda title, message: notices.append((title, message)))
    dialog = gui.window.open_settings()

    fill_manual_proxy(dialog)
    save_button(dialog).click()
    qtbot.waitUntil(lambda: gui.window.settings_dialog is None, timeout=WAIT_MS)

    assert gui.controller.proxy_password == PROXY_PASSWORD
    assert [title for title, _message in notices] == ["Proxy password not saved"]
    assert "until Deskbridge quits" in notices[0][1]
    assert PROXY_PASSWORD not in (dirs.config / "config.json").read_text(encoding="utf-8")


def test_ca_file_browse_does_not_block(make_gui, dirs, tmp_path, qtbot):
    save_config(dirs.config, AgentConfig("ws://127.0.0.1:9", "alice", "desk", {"quotes": Target("quotes", "127.0.0.1", 7497)}))
    ca_file = ca_certificate(tmp_path)
    gui = make_gui()
    dialog = gui.window.open_settings()

    dialog.network.ca_browse_button.click()
    file_dialog = dialog.network.file_dialog
    assert file_dialog is not None
    qtbot.waitUntil(file_dialog.isVisible, timeout=WAIT_MS)
    file_dialog.fileSelected.emit(str(ca_file))

    assert dialog.network.ca_file_edit.text() == str(ca_file)
    dialog.reject()
    assert not file_dialog.isVisible()
