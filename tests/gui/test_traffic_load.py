"""The window stays responsive while 100 MiB go through the tunnel and back."""

from __future__ import annotations

import hashlib
import socket
import time

import pytest
from PySide6.QtCore import QTimer

from app.core.agent import AgentState
from app.core.config import Target
from app.core.models import GuiSettings, save_gui_settings
from tests.gui.helpers import signed_in_preset
from tests.processes import thread_echo_port  # noqa: F401  (fixture)

TOTAL_BYTES = 100 * 1024 * 1024
CHUNK_BYTES = 256 * 1024
# 100 MiB each way make about 3,200 DATA records of 64 KiB, so this bound must drop some.
HISTORY_BOUND = 2_000
# Generous: the view applies batches ten times a second and must never freeze.
MAX_TIMER_GAP_S = 1.0
TRANSFER_TIMEOUT_MS = 240_000


def send_all(port: int, done: list[socket.socket]) -> str:
    """Send TOTAL_BYTES of a repeating pattern to the echo target; return its SHA-256."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    done.append(sock)
    digest = hashlib.sha256()
    block = bytes(range(256)) * (CHUNK_BYTES // 256)
    sent = 0
    while sent < TOTAL_BYTES:
        sock.sendall(block)
        digest.update(block)
        sent += len(block)
    return digest.hexdigest()


def receive_all(done: list[socket.socket]) -> str:
    """Read TOTAL_BYTES back from the socket ``send_all`` opened; return their SHA-256."""
    deadline = time.monotonic() + 60
    while not done:
        if time.monotonic() > deadline:
            raise AssertionError("the sender did not connect within 60 s")
        time.sleep(0.01)
    sock = done[0]
    digest = hashlib.sha256()
    received = 0
    try:
        while received < TOTAL_BYTES:
            chunk = sock.recv(1024 * 1024)
            if not chunk:
                raise AssertionError(f"connection closed after {received} of {TOTAL_BYTES} bytes")
            digest.update(chunk)
            received += len(chunk)
    finally:
        sock.close()
    return digest.hexdigest()


@pytest.mark.slow
def test_view_responsive_during_transfer(make_gui, thread_relay, thread_echo_port, workers, qloop, qtbot, dirs):
    save_gui_settings(dirs.config, GuiSettings(history_events=HISTORY_BOUND))
    relay = thread_relay(expose=("echo",))
    preset = signed_in_preset(qloop, relay.url, {"echo": Target("echo", "127.0.0.1", thread_echo_port)})
    gui = make_gui(preset=preset)
    controller = gui.controller
    qtbot.waitUntil(lambda: controller.agent_status.state is AgentState.CONNECTED, timeout=15_000)
    history = controller.history
    assert history.max_events == HISTORY_BOUND

    ticks: list[float] = []
    largest_history = [0]

    def tick() -> None:
        ticks.append(time.monotonic())
        largest_history[0] = max(largest_history[0], len(history))

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    timer.start()
    sockets: list[socket.socket] = []
    started = time.monotonic()
    sent = workers.submit(send_all, relay.port_of("echo"), sockets)
    received = workers.submit(receive_all, sockets)
    qtbot.waitUntil(lambda: sent.done() and received.done(), timeout=TRANSFER_TIMEOUT_MS)
    elapsed = time.monotonic() - started
    timer.stop()

    assert sent.result() == received.result()
    gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
    longest = max(gaps)
    print(
        f"\n100 MiB each way through the tunnel in {elapsed:.1f} s; "
        f"longest gap between 10 ms timer ticks: {longest * 1000:.0f} ms over {len(ticks)} ticks; "
        f"history kept {len(history)} events, dropped {history.dropped}"
    )
    assert longest < MAX_TIMER_GAP_S
    assert largest_history[0] <= HISTORY_BOUND
    assert history.dropped > 0
    assert history.bytes_to_desktop >= TOTAL_BYTES
    assert history.bytes_to_cloud >= TOTAL_BYTES
    panel = gui.window.traffic_panel
    qtbot.waitUntil(lambda: panel.model.rowCount() == len(history), timeout=5_000)
    assert panel.model.rowCount() <= HISTORY_BOUND
    qtbot.waitUntil(lambda: f"{history.dropped:,} dropped" in panel.count_label.text(), timeout=5_000)
