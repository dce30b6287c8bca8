"""Render every screen of the desktop window to docs/screenshots, at 100% and 200% scale.

    .venv/bin/python scripts/screenshots.py

starts its own Xvfb on a free display number, runs one capture pass per
scale (QT_SCALE_FACTOR=1 and 2) with the xcb platform, and stops Xvfb by
PID. Each pass runs the embedded relay and demo application from
``make demo`` in a temporary DESKBRIDGE_HOME, walks through the setup
wizard, makes some cloud traffic and grabs each window with ``QWidget.grab``.
``--pass SCALE`` runs one pass on the current display, which the
controlling process uses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "screenshots"
SCALES = (1, 2)
XVFB_START_TIMEOUT_S = 10.0
PASS_TIMEOUT_S = 180.0
WAIT_TIMEOUT_S = 20.0


# Controlling process: Xvfb and one subprocess per scale ------------------------------


def start_xvfb() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("Xvfb")
    if binary is None:
        raise SystemExit("Xvfb is not installed; on Debian or Ubuntu: apt-get install xvfb")
    for _attempt in range(10):
        number = random.randint(99, 599)
        if Path(f"/tmp/.X11-unix/X{number}").exists() or Path(f"/tmp/.X{number}-lock").exists():
            continue
        display = f":{number}"
        process = subprocess.Popen(
            [binary, display, "-screen", "0", "2600x1800x24", "-nolisten", "tcp"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + XVFB_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if Path(f"/tmp/.X11-unix/X{number}").exists():
                return process, display
            if process.poll() is not None:
                break
            time.sleep(0.1)
        stop(process)
    raise SystemExit("Xvfb did not start on any display tried")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def run_all() -> int:
    xvfb, display = start_xvfb()
    print(f"Xvfb {display} (PID {xvfb.pid})")
    try:
        for scale in SCALES:
            env = dict(os.environ, DISPLAY=display, QT_QPA_PLATFORM="xcb", QT_SCALE_FACTOR=str(scale))
            env.pop("WAYLAND_DISPLAY", None)
            with tempfile.TemporaryDirectory(prefix="deskbridge-shots-") as home:
                env["DESKBRIDGE_HOME"] = home
                result = subprocess.run([sys.executable, __file__, "--pass", str(scale)], env=env, timeout=PASS_TIMEOUT_S)
            if result.returncode != 0:
                print(f"the capture pass at {scale}x failed with exit code {result.returncode}", file=sys.stderr)
                return result.returncode
    finally:
        stop(xvfb)
    print(f"screenshots written to {OUT}")
    return 0


# One capture pass -------------------------------------------------------------------------


def capture_pass(scale: int) -> int:
    import qasync
    from PySide6.QtWidgets import QApplication

    from app.core.paths import app_dirs

    app = QApplication(sys.argv[:1])
    app.setApplicationName("Deskbridge")
    app.setQuitOnLastWindowClosed(False)
    dirs = app_dirs().create()
    OUT.mkdir(parents=True, exist_ok=True)
    with asyncio.Runner(loop_factory=lambda: qasync.QEventLoop(app)) as runner:
        runner.run(Capture(scale, dirs).run())
    return 0


class Capture:
    def __init__(self, scale: int, dirs) -> None:  # type: ignore[no-untyped-def]
        self.scale = scale
        self.dirs = dirs

    def save(self, widget, name: str) -> None:  # type: ignore[no-untyped-def]
        path = OUT / f"{name}-{self.scale}x.png"
        if not widget.grab().save(str(path)):
            raise SystemExit(f"cannot write {path}")
        print(f"wrote {path.relative_to(ROOT)}")

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def settle(self) -> None:
        """Let layouts and paints finish before a grab."""
        await asyncio.sleep(0.4)

    async def run(self) -> None:
        from app.core.logs import LOG_FORMAT, configure_logging
        from app.core.models import LogBuffer
        from app.demo import start_services
        from app.gui.application import GuiApp
        from app.gui.main import install_log_buffer

        configure_logging("INFO", self.dirs.logs)
        buffer = LogBuffer()
        install_log_buffer(buffer)
        assert LOG_FORMAT
        services = await start_services(self.dirs)
        gui = GuiApp(self.dirs, buffer, tray_available=False, probe_interval=2.0)
        try:
            await gui.start()
            await self.wizard(gui, services)
            await self.main_window(gui, services)
            await self.dialogs(gui)
            await self.reconnecting(gui, services)
        finally:
            await gui.shutdown()
            await services.stop()

    async def wizard(self, gui, services) -> None:  # type: ignore[no-untyped-def]
        from PySide6.QtWidgets import QWizard

        from app.gui.wizard import SIGN_IN_PAGE, TARGETS_PAGE

        wizard = gui.window.wizard
        assert wizard is not None
        wizard.move(40, 40)
        page = wizard.relay_page
        # Port 9 (discard) has no listener here, so the check fails on loopback without a DNS query.
        page.url_edit.setText("ws://127.0.0.1:9")
        await page.check()
        await self.settle()
        self.save(wizard, "wizard-relay-error")
        page.url_edit.setText(services.relay.url)
        wizard.button(QWizard.WizardButton.NextButton).click()
        await self.until(lambda: wizard.currentId() == SIGN_IN_PAGE, "the sign-in page")

        sign_in = wizard.sign_in_page
        sign_in.username_edit.setText("demo")
        sign_in.password_edit.setText("not the password")
        wizard.button(QWizard.WizardButton.NextButton).click()
        await self.until(lambda: "Wrong" in sign_in.result.text(), "the wrong-password message")
        await self.settle()
        self.save(wizard, "wizard-sign-in-error")
        sign_in.password_edit.setText(services.password)
        wizard.button(QWizard.WizardButton.NextButton).click()
        await self.until(lambda: wizard.currentId() == TARGETS_PAGE, "the targets page")

        editor = wizard.targets_page.editor
        wizard.targets_page.device_edit.setText("trading-laptop")
        first = editor.rows[0]
        first.name_edit.setText("quotes")
        first.port_spin.setValue(services.app_port)
        second = editor.add_row("trading", "127.0.0.1", 7496 if services.app_port != 7496 else 7495)
        await self.until(lambda: "listening on" in first.status_label.text(), "the probe of the quotes row")
        await self.until(lambda: "Nothing is listening" in second.status_label.text(), "the probe of the trading row")
        await self.settle()
        self.save(wizard, "wizard-targets")
        wizard.button(QWizard.WizardButton.FinishButton).click()
        await self.until(lambda: gui.window.wizard is None, "the wizard to close")

    async def main_window(self, gui, services) -> None:  # type: ignore[no-untyped-def]
        window = gui.window
        window.move(20, 20)
        await self.until(lambda: window.state_title.text() == "Connected", "the connection")
        port = services.relay.expose_ports[services.exposure.name]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        for command in (b"QUOTE AAPL\n", b"PING\n", b"SUBSCRIBE EURUSD\n"):
            writer.write(command)
            await reader.readline()
        for _tick in range(2):
            await reader.readline()
        writer.write(b"QUIT\n")
        await reader.read()
        writer.close()
        url = services.relay.url.replace("ws://", "http://") + "/v1/agents/demo/targets/trading/exchange"
        request = urllib.request.Request(url, data=b"HELLO\n", headers={"Authorization": f"Bearer {services.api_key}"})

        def exchange() -> None:
            try:
                urllib.request.urlopen(request, timeout=10).close()
            except OSError:
                pass  # The trading target is down on purpose: its error row is what the screenshot shows.

        await asyncio.to_thread(exchange)
        panel = window.traffic_panel
        await self.until(lambda: any(r.kind.value == "error" for r in panel.model.rows.rows), "the error row")
        await asyncio.sleep(1.2)
        data_rows = [index for index, r in enumerate(panel.model.rows.rows) if r.kind.value == "data" and b"QUOTE AAPL" in r.preview]
        panel.table.selectRow(data_rows[-1] if data_rows else 0)
        window.refresh_status()
        await self.settle()
        self.save(window, "main-traffic")
        window.tabs.setCurrentWidget(window.log_panel)
        await self.settle()
        self.save(window, "main-app-log")
        window.tabs.setCurrentWidget(panel)

    async def dialogs(self, gui) -> None:  # type: ignore[no-untyped-def]
        from PySide6.QtCore import QPoint

        from app.gui.tray import Tray

        window = gui.window
        settings = window.open_settings()
        settings.move(60, 60)
        await asyncio.sleep(1.0)
        await self.settle()
        self.save(settings, "settings")
        settings.reject()
        about = window.open_about()
        about.move(80, 80)
        await self.settle()
        self.save(about, "about")
        about.close()

        tray = Tray()
        view = gui.controller.view()
        tray.update_state(view.state, view.title, gui.controller.running)
        tray.menu.popup(QPoint(200, 200))
        await self.settle()
        self.save(tray.menu, "tray-menu")
        tray.menu.close()

    async def reconnecting(self, gui, services) -> None:  # type: ignore[no-untyped-def]
        window = gui.window
        await services.relay.stop()
        await self.until(lambda: window.state_title.text().startswith("Reconnecting"), "the reconnecting state")
        window.refresh_status()
        await self.settle()
        self.save(window, "main-reconnecting")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pass", dest="scale", type=int, choices=SCALES, help="run one capture pass on the current display")
    args = parser.parse_args()
    if args.scale is None:
        return run_all()
    return capture_pass(args.scale)


if __name__ == "__main__":
    sys.exit(main())
