"""Tray menu, close-to-tray, notifications and the single-instance handshake."""

from __future__ import annotations

import os

from app.core.agent import AgentState
from app.core.config import Target
from app.core.models import ViewState
from app.gui.single_instance import instance_key
from tests.gui.helpers import signed_in_preset
from tests.processes import python_module, spawn, thread_echo_port  # noqa: F401  (fixtures)

WAIT_MS = 15_000


def connected_gui(make_gui, thread_relay, qloop, qtbot, echo_port: int, **options):
    relay = thread_relay()
    preset = signed_in_preset(qloop, relay.url, {"echo": Target("echo", "127.0.0.1", echo_port)})
    gui = make_gui(preset=preset, **options)
    qtbot.waitUntil(lambda: gui.controller.agent_status.state is AgentState.CONNECTED, timeout=WAIT_MS)
    return gui, relay


def test_tray_menu_actions(make_gui, thread_relay, thread_echo_port, qloop, qtbot):
    gui, _relay = connected_gui(make_gui, thread_relay, qloop, qtbot, thread_echo_port, tray_available=True)
    tray = gui.tray
    assert tray is not None
    qtbot.waitUntil(lambda: tray.connect_action.text() == "Disconnect", timeout=WAIT_MS)
    assert tray.icon.toolTip() == "Deskbridge: Connected"

    gui.window.hide()
    tray.show_action.trigger()
    assert gui.window.isVisible()

    tray.connect_action.trigger()
    qtbot.waitUntil(lambda: gui.controller.view().state is ViewState.DISCONNECTED, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: tray.connect_action.text() == "Connect", timeout=WAIT_MS)
    assert not gui.controller.running

    tray.connect_action.trigger()
    qtbot.waitUntil(lambda: gui.controller.agent_status.state is AgentState.CONNECTED, timeout=WAIT_MS)

    tray.quit_action.trigger()
    assert gui.quit_event.is_set()


def test_close_keeps_running_in_tray(make_gui, thread_relay, thread_echo_port, qloop, qtbot):
    gui, _relay = connected_gui(make_gui, thread_relay, qloop, qtbot, thread_echo_port, tray_available=True)
    assert gui.window.isVisible()

    gui.window.close()

    assert not gui.window.isVisible()
    assert not gui.quit_event.is_set()
    assert gui.controller.running
    assert gui.tray is not None
    assert gui.tray.messages[-1][0] == "Deskbridge is still running"


def test_close_quits_without_tray(make_gui, qtbot):
    gui = make_gui(tray_available=False)

    gui.window.close()

    assert gui.quit_event.is_set()


def test_notifies_on_drop_and_return(make_gui, thread_relay, thread_echo_port, qloop, qtbot):
    gui, relay = connected_gui(make_gui, thread_relay, qloop, qtbot, thread_echo_port, tray_available=True)
    tray = gui.tray
    assert tray is not None
    port = int(relay.url.rsplit(":", 1)[1])

    relay.stop()
    qtbot.waitUntil(lambda: any(title == "Connection lost" for title, _ in tray.messages), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: gui.window.state_title.text().startswith("Reconnecting in"), timeout=WAIT_MS)
    assert "Retry now" == gui.window.retry_button.text()
    thread_relay(port=port, data_dir=relay.config.data_dir)

    qtbot.waitUntil(lambda: any(title == "Connected again" for title, _ in tray.messages), timeout=WAIT_MS)
    assert gui.controller.agent_status.state is AgentState.CONNECTED


def test_second_launch_shows_window(make_gui, dirs, spawn, qtbot):
    gui = make_gui(tray_available=True, instance_key=instance_key(dirs))
    gui.window.hide()
    env = dict(os.environ)
    env["QT_QPA_PLATFORM"] = "offscreen"

    second = spawn(python_module("app"), env)

    qtbot.waitUntil(gui.window.isVisible, timeout=30_000)
    assert second.wait() == 0, second.output()
    assert "already running" in second.stdout.text
