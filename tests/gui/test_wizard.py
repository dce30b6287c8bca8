"""The setup wizard driven with qtbot against a real relay and redis-server as the desktop application."""

from __future__ import annotations

import json

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QWizard

from app.core.agent import AgentState
from app.core.credentials import KeyringStore
from app.core.models import Health, ViewState
from app.core.traffic import Direction, Kind
from app.gui.wizard import RELAY_PAGE, SIGN_IN_PAGE, TARGETS_PAGE, SetupWizard
from tests.conftest import ACCOUNT, PASSWORD, free_port
from tests.gui.helpers import redis_client
from tests.keyring_service import secret_service  # noqa: F401  (fixture)

WAIT_MS = 15_000


def click_next(qtbot, wizard: SetupWizard) -> None:
    qtbot.mouseClick(wizard.button(QWizard.WizardButton.NextButton), Qt.MouseButton.LeftButton)


def click_finish(qtbot, wizard: SetupWizard) -> None:
    qtbot.mouseClick(wizard.button(QWizard.WizardButton.FinishButton), Qt.MouseButton.LeftButton)


def fill_relay_and_sign_in(qtbot, wizard: SetupWizard, relay_url: str, password: str = PASSWORD) -> None:
    assert wizard.currentId() == RELAY_PAGE
    wizard.relay_page.url_edit.setText(relay_url)
    click_next(qtbot, wizard)
    qtbot.waitUntil(lambda: wizard.currentId() == SIGN_IN_PAGE, timeout=WAIT_MS)
    page = wizard.sign_in_page
    qtbot.keyClicks(page.username_edit, ACCOUNT)
    qtbot.keyClicks(page.password_edit, password)
    click_next(qtbot, wizard)


def test_wizard_connects_and_shows_traffic(make_gui, thread_relay, redis_server, workers, qtbot, dirs):
    relay = thread_relay(expose=("redis",))
    gui = make_gui()
    wizard = gui.window.wizard
    assert wizard is not None and wizard.isVisible()

    fill_relay_and_sign_in(qtbot, wizard, relay.url)
    qtbot.waitUntil(lambda: wizard.currentId() == TARGETS_PAGE, timeout=WAIT_MS)
    row = wizard.targets_page.editor.rows[0]
    row.name_edit.setText("redis")
    row.host_edit.setText("127.0.0.1")
    row.port_spin.setValue(redis_server)
    qtbot.waitUntil(lambda: "is listening" in row.status_label.text(), timeout=WAIT_MS)
    with qtbot.waitSignal(wizard.setup_done, timeout=WAIT_MS):
        click_finish(qtbot, wizard)

    controller = gui.controller
    qtbot.waitUntil(lambda: controller.agent_status.state is AgentState.CONNECTED, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: gui.window.state_title.text() == "Connected", timeout=WAIT_MS)
    saved = json.loads((dirs.config / "config.json").read_text(encoding="utf-8"))
    assert saved["relay_url"] == relay.url
    assert saved["account"] == ACCOUNT
    assert [(t["name"], t["host"], t["port"]) for t in saved["targets"]] == [("redis", "127.0.0.1", redis_server)]

    def cloud_client() -> tuple[bool, bytes | None]:
        client = redis_client(relay.port_of("redis"))
        try:
            return client.ping(), (client.set("greeting", "hello"), client.get("greeting"))[1]
        finally:
            client.close()

    result = workers.submit(cloud_client)
    qtbot.waitUntil(result.done, timeout=WAIT_MS)
    assert result.result() == (True, b"hello")

    model = gui.window.traffic_panel.model

    def data_rows() -> list[tuple[Direction | None, int, bytes]]:
        return [(r.direction, r.size, r.preview) for r in model.rows.rows if r.kind is Kind.DATA]

    qtbot.waitUntil(lambda: (Direction.TO_CLOUD, 11, b"$5\r\nhello\r\n") in data_rows(), timeout=WAIT_MS)
    rows = data_rows()
    assert (Direction.TO_DESKTOP, 14, b"*1\r\n$4\r\nPING\r\n") in rows
    assert (Direction.TO_CLOUD, 7, b"+PONG\r\n") in rows
    assert (Direction.TO_CLOUD, 5, b"+OK\r\n") in rows
    assert (Direction.TO_CLOUD, 11, b"$5\r\nhello\r\n") in rows
    kinds = [record.kind for record in model.rows.rows]
    assert kinds.index(Kind.OPENED) < kinds.index(Kind.DATA)
    assert model.rowCount() == len(model.rows.rows)
    assert gui.window.targets_tree.topLevelItem(0).text(0) == "redis"


def test_wrong_password_shows_relay_message(make_gui, thread_relay, qtbot):
    relay = thread_relay()
    gui = make_gui()
    wizard = gui.window.wizard
    assert wizard is not None

    fill_relay_and_sign_in(qtbot, wizard, relay.url, password="not the password")

    result = wizard.sign_in_page.result
    qtbot.waitUntil(lambda: "Wrong user name or password." in result.text(), timeout=WAIT_MS)
    assert wizard.currentId() == SIGN_IN_PAGE
    assert result.isVisible()
    assert not gui.controller.signed_in


def test_relay_page_reports_refused(make_gui, qtbot):
    gui = make_gui()
    wizard = gui.window.wizard
    assert wizard is not None
    port = free_port()

    wizard.relay_page.url_edit.setText(f"ws://127.0.0.1:{port}")
    click_next(qtbot, wizard)

    result = wizard.relay_page.result
    qtbot.waitUntil(lambda: "refused the connection" in result.text(), timeout=WAIT_MS)
    assert wizard.currentId() == RELAY_PAGE


def test_relay_page_rejects_http_url(make_gui, qtbot):
    gui = make_gui()
    wizard = gui.window.wizard
    assert wizard is not None

    wizard.relay_page.url_edit.setText("http://127.0.0.1:8765")
    click_next(qtbot, wizard)

    qtbot.waitUntil(lambda: "ws://" in wizard.relay_page.result.text(), timeout=WAIT_MS)
    assert wizard.currentId() == RELAY_PAGE


def test_one_time_code_field_appears(make_gui, thread_relay, qtbot):
    import pyotp

    secret = pyotp.random_base32()
    relay = thread_relay()
    assert relay.relay is not None
    relay.relay.config.accounts.set_totp(ACCOUNT, secret)
    gui = make_gui()
    wizard = gui.window.wizard
    assert wizard is not None
    page = wizard.sign_in_page
    assert not page.code_edit.isVisibleTo(page)

    fill_relay_and_sign_in(qtbot, wizard, relay.url)
    qtbot.waitUntil(lambda: page.code_edit.isVisibleTo(page), timeout=WAIT_MS)
    assert "6-digit code" in page.result.text()
    page.code_edit.setText(pyotp.TOTP(secret).now())
    click_next(qtbot, wizard)

    qtbot.waitUntil(lambda: wizard.currentId() == TARGETS_PAGE, timeout=WAIT_MS)


def test_unusable_keyring_continues_for_run(make_gui, thread_relay, redis_server, qtbot):
    relay = thread_relay()
    gui = make_gui()
    wizard = gui.window.wizard
    assert wizard is not None
    wizard.relay_page.url_edit.setText(relay.url)
    click_next(qtbot, wizard)
    page = wizard.sign_in_page
    qtbot.waitUntil(lambda: wizard.currentId() == SIGN_IN_PAGE, timeout=WAIT_MS)

    qtbot.waitUntil(lambda: "Remember me is not available" in page.keyring_note.text(), timeout=WAIT_MS)
    assert not page.remember_box.isChecked()
    assert not page.remember_box.isEnabled()
    page.username_edit.setText(ACCOUNT)
    page.password_edit.setText(PASSWORD)
    click_next(qtbot, wizard)
    qtbot.waitUntil(lambda: wizard.currentId() == TARGETS_PAGE, timeout=WAIT_MS)
    row = wizard.targets_page.editor.rows[0]
    row.name_edit.setText("redis")
    row.port_spin.setValue(redis_server)
    with qtbot.waitSignal(wizard.setup_done, timeout=WAIT_MS):
        click_finish(qtbot, wizard)

    qtbot.waitUntil(lambda: gui.controller.agent_status.state is AgentState.CONNECTED, timeout=WAIT_MS)
    assert not isinstance(gui.controller.store, KeyringStore)


def test_remember_me_uses_keyring(make_gui, thread_relay, redis_server, secret_service, qtbot, qloop):
    relay = thread_relay()
    store = KeyringStore(secret_service.backend())
    gui = make_gui(keyring=store)
    wizard = gui.window.wizard
    assert wizard is not None

    fill_relay_and_sign_in(qtbot, wizard, relay.url)
    qtbot.waitUntil(lambda: wizard.currentId() == TARGETS_PAGE, timeout=WAIT_MS)
    assert wizard.sign_in_page.remember_box.isChecked()
    row = wizard.targets_page.editor.rows[0]
    row.name_edit.setText("redis")
    row.port_spin.setValue(redis_server)
    with qtbot.waitSignal(wizard.setup_done, timeout=WAIT_MS):
        click_finish(qtbot, wizard)
    qtbot.waitUntil(lambda: gui.controller.agent_status.state is AgentState.CONNECTED, timeout=WAIT_MS)

    saved = qloop.run(store.get(relay.url, ACCOUNT))
    assert saved
    assert gui.controller.store is store

    qloop.run(gui.controller.sign_out())
    assert qloop.run(store.get(relay.url, ACCOUNT)) is None
    assert gui.controller.view().state is ViewState.SIGNED_OUT
    assert not gui.controller.signed_in


def test_target_health_follows_application(make_gui, thread_relay, redis_later, qtbot):
    relay = thread_relay()
    port = free_port()
    gui = make_gui()
    wizard = gui.window.wizard
    assert wizard is not None
    fill_relay_and_sign_in(qtbot, wizard, relay.url)
    qtbot.waitUntil(lambda: wizard.currentId() == TARGETS_PAGE, timeout=WAIT_MS)
    row = wizard.targets_page.editor.rows[0]
    row.name_edit.setText("trading")
    row.port_spin.setValue(port)

    qtbot.waitUntil(lambda: "Nothing is listening" in row.status_label.text(), timeout=WAIT_MS)
    assert "Start the application for trading and log in to it" in row.status_label.text()
    with qtbot.waitSignal(wizard.setup_done, timeout=WAIT_MS):
        click_finish(qtbot, wizard)
    window = gui.window
    health = gui.controller.health
    qtbot.waitUntil(lambda: health.statuses["trading"].health is Health.UNREACHABLE, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: "log in to it" in window.target_advice.text(), timeout=WAIT_MS)
    assert window.targets_tree.topLevelItem(0).text(2).startswith("Not reachable")

    redis_later(port)

    qtbot.waitUntil(lambda: health.statuses["trading"].health is Health.REACHABLE, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: window.targets_tree.topLevelItem(0).text(2).startswith("Reachable"), timeout=WAIT_MS)
    assert not window.target_advice.isVisible()
