"""``python -m app.demo`` as a person runs it: relay, demo app and agent in one process."""

from __future__ import annotations

import os
import signal
import socket
import time

from tests.processes import python_module, spawn  # noqa: F401  (fixture)

PROMPT_EXIT_S = 5.0
READY_LINE = r"Press Ctrl-C to stop"
TCP_PORT_LINE = r"nc 127\.0\.0\.1 (\d+)"


def read_line(client: socket.socket, buffer: bytearray) -> bytes:
    """Return the next newline-terminated line from ``client``, keeping the rest in ``buffer``."""
    while b"\n" not in buffer:
        chunk = client.recv(4096)
        if not chunk:
            raise AssertionError(f"connection closed before a full line; received {bytes(buffer)!r}")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line + b"\n"


def test_demo_answers_ping_and_stops(spawn, deskbridge_home):
    demo = spawn(python_module("app.demo", "--headless"), dict(os.environ))
    demo.stdout.wait_for(READY_LINE)
    tcp_port = int(demo.stdout.wait_for(TCP_PORT_LINE).group(1))

    with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as client:
        buffer = bytearray()
        greeting = read_line(client, buffer)
        client.sendall(b"PING\n")
        reply = read_line(client, buffer)

    signalled = time.monotonic()
    demo.send_signal(signal.SIGINT)
    code = demo.wait()
    elapsed = time.monotonic() - signalled

    assert greeting.startswith(b"HELLO")
    assert reply == b"PONG\n"
    assert code == 0, demo.output()
    assert elapsed < PROMPT_EXIT_S
    assert (deskbridge_home / "logs" / "demo.log").is_file()


def test_demo_never_uses_keyring(spawn, tmp_path):
    """The demo keeps its token in memory, so it must run with no Secret Service at all."""
    env = dict(os.environ)
    env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={tmp_path / 'no-bus-here'}"
    env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"

    demo = spawn(python_module("app.demo", "--headless"), env)
    demo.stdout.wait_for(READY_LINE)
    demo.send_signal(signal.SIGINT)

    assert demo.wait() == 0, demo.output()
