"""The main window's parts: traffic view, app log tab, About, error dialog and buttons."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket

from PySide6.QtCore import QObject, QUrl, Slot
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QMessageBox

from app.core.agent import AgentState
from app.core.auth import logout
from app.core.config import Target
from app.core.models import ViewState
from app.core.traffic import PREVIEW_BYTES, Direction, Kind, TrafficRecord
from app.gui.errors import ErrorReporter
from tests.conftest import ACCOUNT
from tests.gui.helpers import signed_in_preset
from tests.processes import python_module, spawn, thread_echo_port  # noqa: F401  (fixtures)

WAIT_MS = 15_000


def record(stream: int, kind: Kind = Kind.DATA, direction: Direction | None = Direction.TO_DESKTOP, target: str = "quotes", payload: bytes = b"QUOTE AAPL\n") -> TrafficRecord:
    """A traffic record as the agent's bridge makes it: the preview contains the first PREVIEW_BYTES bytes."""
    if kind is not Kind.DATA:
        return TrafficRecord(1_700_000_000.0 + stream, kind, stream, target)
    return TrafficRecord(1_700_000_000.0 + stream, kind, stream, target, direction, len(payload), payload[:PREVIEW_BYTES])


def fill_history(gui) -> None:
    history = gui.controller.history
    history.record(record(1, Kind.OPENED))
    history.record(record(1, payload=b"QUOTE AAPL\n"))
    history.record(record(1, direction=Direction.TO_CLOUD, payload=b"QUOTE AAPL 231.40\n" * 20))
    history.record(record(2, Kind.OPENED, target="redis"))
    history.record(record(2, target="redis", payload=b"*1\r\n$4\r\nPING\r\n"))


def test_traffic_filters_rows(make_gui, qtbot):
    gui = make_gui()
    fill_history(gui)
    panel = gui.window.traffic_panel
    qtbot.waitUntil(lambda: panel.model.rowCount() == 5, timeout=WAIT_MS)

    panel.target_combo.setCurrentIndex(panel.target_combo.findText("redis"))
    assert panel.model.rowCount() == 2
    panel.target_combo.setCurrentIndex(0)
    panel.direction_combo.setCurrentIndex(panel.direction_combo.findData(Direction.TO_CLOUD))
    assert [r.stream_id for r in panel.model.rows.rows] == [1]
    panel.direction_combo.setCurrentIndex(0)
    qtbot.keyClicks(panel.filter_edit, "ping")
    qtbot.waitUntil(lambda: panel.model.rowCount() == 1, timeout=WAIT_MS)
    assert panel.model.rows.rows[0].target == "redis"
    assert "1 rows shown" in panel.count_label.text()


def test_traffic_details_show_hex(make_gui, qtbot):
    gui = make_gui()
    fill_history(gui)
    panel = gui.window.traffic_panel
    qtbot.waitUntil(lambda: panel.model.rowCount() == 5, timeout=WAIT_MS)

    panel.table.selectRow(2)

    assert panel.details.hex_view.toPlainText().startswith("00000000  51 55 4f 54 45 20 41 41")
    assert "QUOTE AAPL 231.40" in panel.details.text_view.toPlainText()
    assert "the first 256 of 360 bytes" in panel.details.heading.text()
    assert panel.model.data(panel.model.index(2, 4)) == "desktop → cloud"
    assert panel.model.data(panel.model.index(2, 5)) == "360"


def test_traffic_pause_and_clear(make_gui, qtbot):
    gui = make_gui()
    panel = gui.window.traffic_panel
    history = gui.controller.history
    panel.pause_button.click()
    assert panel.pause_button.text() == "Resume"

    fill_history(gui)
    qtbot.waitUntil(lambda: "paused" in panel.count_label.text() and "5 of" in panel.count_label.text(), timeout=WAIT_MS)
    assert panel.model.rowCount() == 0
    panel.pause_button.click()
    assert panel.model.rowCount() == 5

    panel.clear_button.click()
    assert panel.model.rowCount() == 0
    assert len(history) == 0
    history.record(record(3))
    qtbot.waitUntil(lambda: panel.model.rowCount() == 1, timeout=WAIT_MS)


def test_traffic_export_jsonl(make_gui, qloop, tmp_path):
    gui = make_gui()
    fill_history(gui)
    panel = gui.window.traffic_panel
    panel.apply_batch()
    path = tmp_path / "traffic.jsonl"

    count = qloop.run(panel.export_to(path))

    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert count == 5
    assert [line["kind"] for line in lines] == ["opened", "data", "data", "opened", "data"]
    assert lines[2]["bytes"] == 360
    assert lines[2]["preview_complete"] is False
    assert "Exported 5 rows" in panel.status_label.text()


def test_log_tab_live_and_filtered(make_gui, qtbot):
    gui = make_gui()
    panel = gui.window.log_panel
    log = logging.getLogger("deskbridge.gui-test")
    log.setLevel(logging.INFO)

    log.warning("relay unreachable for the test")
    log.info("ordinary progress for the test")
    qtbot.waitUntil(lambda: "ordinary progress for the test" in panel.view.toPlainText(), timeout=WAIT_MS)
    assert "WARNING deskbridge.gui-test: relay unreachable for the test" in panel.view.toPlainText()

    panel.level_combo.setCurrentIndex(panel.level_combo.findData(logging.WARNING))
    assert "relay unreachable for the test" in panel.view.toPlainText()
    assert "ordinary progress for the test" not in panel.view.toPlainText()


class UrlCatcher(QObject):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[QUrl] = []

    @Slot(QUrl)
    def open(self, url: QUrl) -> None:
        self.urls.append(url)


def test_open_log_folder(make_gui, dirs):
    gui = make_gui()
    catcher = UrlCatcher()
    QDesktopServices.setUrlHandler("file", catcher, "open")
    try:
        gui.window.log_panel.open_button.click()
    finally:
        QDesktopServices.unsetUrlHandler("file")

    assert [url.toLocalFile() for url in catcher.urls] == [str(dirs.logs)]


def test_about_lists_versions(make_gui):
    gui = make_gui()

    about = gui.window.open_about()

    assert about.isVisible()
    for name in ("Deskbridge", "Python", "Qt", "PySide6", "websockets", "qasync"):
        assert about.version_labels[name].text() not in ("", "unknown"), name


def test_error_in_task_shows_dialog(make_gui, dirs, qloop, qtbot):
    gui = make_gui()
    reporter = ErrorReporter(dirs.logs, gui.window)
    reporter.install(qloop.loop)
    try:

        async def broken() -> None:
            raise ValueError("the test broke this on purpose")

        gui.controller.tasks.spawn(broken(), "broken test task")
        qtbot.waitUntil(lambda: reporter.dialog is not None and reporter.dialog.isVisible(), timeout=WAIT_MS)
        dialog = reporter.dialog
        assert isinstance(dialog, QMessageBox)
        assert "the test broke this on purpose" in dialog.informativeText()
        assert str(dirs.logs) in dialog.informativeText()
        assert "ValueError" in dialog.detailedText()
        dialog.close()
    finally:
        reporter.uninstall()
        qloop.loop.set_exception_handler(qloop.record_error)
    assert reporter.count == 1


def test_buttons_disconnect_and_sign_out(make_gui, thread_relay, thread_echo_port, qloop, qtbot):
    relay = thread_relay()
    gui = make_gui(preset=signed_in_preset(qloop, relay.url, {"echo": Target("echo", "127.0.0.1", thread_echo_port)}))
    window = gui.window
    qtbot.waitUntil(lambda: window.state_title.text() == "Connected", timeout=WAIT_MS)
    assert window.connect_button.text() == "Disconnect"
    assert window.uptime_label.text().startswith("0:00:")
    assert "ws://127.0.0.1" in window.relay_label.text()

    window.connect_button.click()
    qtbot.waitUntil(lambda: window.state_title.text() == "Disconnected", timeout=WAIT_MS)
    assert window.connect_button.text() == "Connect"
    window.connect_button.click()
    qtbot.waitUntil(lambda: window.state_title.text() == "Connected", timeout=WAIT_MS)

    window.sign_out_button.click()
    qtbot.waitUntil(lambda: window.state_title.text() == "Signed out", timeout=WAIT_MS)
    assert window.connect_button.text() == "Sign in…"
    assert not window.sign_out_button.isEnabled()
    assert gui.controller.view().state is ViewState.SIGNED_OUT


def test_signed_out_relay_needs_sign_in(make_gui, thread_relay, thread_echo_port, qloop, qtbot):
    """A sign-in revoked elsewhere turns the window to Signed out with a notification."""
    relay = thread_relay()
    preset = signed_in_preset(qloop, relay.url, {"echo": Target("echo", "127.0.0.1", thread_echo_port)})
    gui = make_gui(preset=preset, tray_available=True)
    qtbot.waitUntil(lambda: gui.controller.agent_status.state is AgentState.CONNECTED, timeout=WAIT_MS)
    token = qloop.run(preset.store.get(relay.url, ACCOUNT))

    qloop.run(logout(relay.url, token))

    qtbot.waitUntil(lambda: gui.controller.view().state is ViewState.SIGNED_OUT, timeout=WAIT_MS)
    assert gui.tray is not None
    qtbot.waitUntil(lambda: any(title == "Sign-in needed" for title, _ in gui.tray.messages), timeout=WAIT_MS)


def test_demo_opens_connected_window(spawn, tmp_path):
    env = dict(os.environ)
    env["QT_QPA_PLATFORM"] = "offscreen"
    demo = spawn(python_module("app.demo"), env)
    tcp_port = int(demo.stdout.wait_for(r"nc 127\.0\.0\.1 (\d+)").group(1))
    demo.stdout.wait_for(r"press Ctrl-C here, to stop")
    demo.stderr.wait_for(r"connected to ws://\S+ as device 'demo-desktop'")

    with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as client:
        greeting = client.recv(4096)
    demo.send_signal(signal.SIGINT)

    assert greeting.startswith(b"HELLO")
    assert demo.wait() == 0, demo.output()
    assert "Deskbridge window stopped" in demo.stderr.text



def test_network_back_checks_link(make_gui, thread_relay, thread_echo_port, qloop, qtbot, monkeypatch):
    """The OS reporting the network back makes the agent check its link at once."""
    relay = thread_relay()
    gui = make_gui(preset=signed_in_preset(qloop, relay.url, {"echo": Target("echo", "127.0.0.1", thread_echo_port)}))
    qtbot.waitUntil(lambda: gui.controller.agent_status.state is AgentState.CONNECTED, timeout=WAIT_MS)
    agent = gui.controller.agent
    assert agent is not None
    reasons: list[str] = []

    async def record(why: str) -> None:
        reasons.append(why)

    monkeypatch.setattr(agent, "check_connection", record)

    gui.controller.network_changed(True)

    qtbot.waitUntil(lambda: bool(reasons), timeout=WAIT_MS)
    assert reasons == ["after the network changed"]
