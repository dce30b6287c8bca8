"""The settings dialog: saved across restarts, and harmless to traffic while open."""

from __future__ import annotations

import json
import logging
import socket

from PySide6.QtWidgets import QDialogButtonBox

from app.core.agent import AgentState
from app.core.config import AgentConfig, Target, save_config
from app.core.models import load_gui_settings
from tests.gui.helpers import signed_in_preset
from tests.processes import thread_echo_port  # noqa: F401  (fixture)

WAIT_MS = 15_000
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
