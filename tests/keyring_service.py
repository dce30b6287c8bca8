"""A private, real Secret Service for tests: dbus-daemon plus gnome-keyring-daemon.

Each test that uses the ``secret_service`` fixture gets its own session bus
and its own keyring folder in a temp dir, so no test reads or writes the
person's keyring. The bus config lists no service folders, so D-Bus cannot
activate any other Secret Service provider behind the test's back. Both
daemons are stopped by PID when the test ends.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keyring.backends.SecretService
import pytest
import secretstorage
from jeepney import MatchRule
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection

SECRETS_BUS_NAME = "org.freedesktop.secrets"
KEYRING_PASSWORD = "test keyring password"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0

INSTALL_HINT = "install it with: apt-get install dbus-daemon gnome-keyring (.ci/run does this)"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={socket_dir}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@dataclass(frozen=True)
class SecretService:
    """A running private Secret Service and the environment that reaches it."""

    bus_address: str
    root: Path
    password: str

    def child_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Return an environment for subprocesses that use this Secret Service.

        XDG_CONFIG_HOME and XDG_DATA_HOME point into the temp dir so the
        keyring library finds no keyringrc.cfg of the person's, and
        PYTHON_KEYRING_BACKEND is removed so the child picks its backend
        itself, as it would for a person.
        """
        env = dict(os.environ if base is None else base)
        env.pop("PYTHON_KEYRING_BACKEND", None)
        env["DBUS_SESSION_BUS_ADDRESS"] = self.bus_address
        env["XDG_CONFIG_HOME"] = str(self.root / "client-config")
        env["XDG_DATA_HOME"] = str(self.root / "client-data")
        return env

    def backend(self) -> keyring.backends.SecretService.Keyring:
        """Return keyring's SecretService backend, which connects to the bus named in os.environ."""
        return keyring.backends.SecretService.Keyring()


def _require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed, so the Secret Service tests cannot run; {INSTALL_HINT}")
    return path


def _read_bus_address(bus: subprocess.Popen[str], log: Path) -> str:
    """Return the address that dbus-daemon prints once it listens."""
    assert bus.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(bus.stdout, selectors.EVENT_READ)
        if not selector.select(START_TIMEOUT_S):
            pytest.fail(
                f"dbus-daemon printed no bus address within {START_TIMEOUT_S:.0f} s; "
                f"its output:\n{log.read_text(errors='replace')}"
            )
    address = bus.stdout.readline().strip()
    if not address.startswith("unix:"):
        pytest.fail(
            f"dbus-daemon printed {address!r} instead of a unix: bus address (exit code {bus.poll()}); "
            f"its output:\n{log.read_text(errors='replace')}"
        )
    return address


def _name_has_owner(connection: DBusConnection, name: str) -> bool:
    reply = connection.send_and_get_reply(message_bus.NameHasOwner(name), timeout=START_TIMEOUT_S)
    return bool(reply.body[0])


def _wait_for_secrets_name(connection: DBusConnection, keyring_process: subprocess.Popen[bytes], log: Path) -> None:
    """Block until gnome-keyring owns org.freedesktop.secrets on the private bus.

    The match rule is added before the first NameHasOwner call, so a
    NameOwnerChanged signal sent between the two is queued, not lost.
    """
    rule = MatchRule(
        type="signal",
        sender="org.freedesktop.DBus",
        interface="org.freedesktop.DBus",
        member="NameOwnerChanged",
        path="/org/freedesktop/DBus",
    )
    rule.add_arg_condition(0, SECRETS_BUS_NAME)
    connection.send_and_get_reply(message_bus.AddMatch(rule), timeout=START_TIMEOUT_S)
    deadline = time.monotonic() + START_TIMEOUT_S
    with connection.filter(rule) as queue:
        while not _name_has_owner(connection, SECRETS_BUS_NAME):
            if keyring_process.poll() is not None:
                pytest.fail(
                    f"gnome-keyring-daemon exited with code {keyring_process.returncode} before it "
                    f"registered {SECRETS_BUS_NAME}; its output:\n{log.read_text(errors='replace')}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"gnome-keyring-daemon did not register {SECRETS_BUS_NAME} within {START_TIMEOUT_S:.0f} s; "
                    f"its output:\n{log.read_text(errors='replace')}"
                )
            try:
                # Wake on the signal, or after 0.5 s to notice a daemon that crashed.
                connection.recv_until_filtered(queue, timeout=min(remaining, 0.5))
            except TimeoutError:
                pass


def _check_login_collection(connection: secretstorage.DBusConnection) -> None:
    collection = secretstorage.get_default_collection(connection)
    if collection.is_locked():
        pytest.fail("the private gnome-keyring started with a locked default collection; --unlock did not unlock it")


def _stop(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """Terminate ``process`` by PID, killing it if it outlives STOP_TIMEOUT_S."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


@pytest.fixture
def secret_service(monkeypatch: pytest.MonkeyPatch) -> Iterator[SecretService]:
    """Start a private Secret Service and point DBUS_SESSION_BUS_ADDRESS at it for the test.

    Fails, never skips, when dbus-daemon or gnome-keyring-daemon is missing
    or does not start, because CI installs both.
    """
    dbus_daemon = _require_binary("dbus-daemon")
    keyring_daemon = _require_binary("gnome-keyring-daemon")

    # A short path under the system temp dir keeps the bus socket path below
    # the 108-byte limit of Unix socket addresses.
    root = Path(tempfile.mkdtemp(prefix="deskbridge-ss-"))
    (root / "bus").mkdir(mode=0o700)
    for name in ("home", "runtime", "data", "config", "cache", "client-config", "client-data"):
        (root / name).mkdir(mode=0o700)
    config_file = root / "bus.conf"
    config_file.write_text(BUS_CONFIG.format(socket_dir=root / "bus"), encoding="utf-8")

    bus_log_path = root / "dbus-daemon.log"
    bus_log = open(bus_log_path, "wb")
    bus = subprocess.Popen(
        [dbus_daemon, f"--config-file={config_file}", "--nofork", "--print-address=1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=bus_log,
        text=True,
    )
    keyring_process: subprocess.Popen[bytes] | None = None
    log_file = None
    try:
        address = _read_bus_address(bus, bus_log_path)

        watcher = open_dbus_connection(address)
        try:
            daemon_env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(root / "home"),
                "XDG_RUNTIME_DIR": str(root / "runtime"),
                "XDG_DATA_HOME": str(root / "data"),
                "XDG_CONFIG_HOME": str(root / "config"),
                "XDG_CACHE_HOME": str(root / "cache"),
                "DBUS_SESSION_BUS_ADDRESS": address,
            }
            log_path = root / "gnome-keyring.log"
            log_file = open(log_path, "wb")
            # --unlock reads the password from stdin up to end of file and
            # creates the "login" keyring with it when none exists yet.
            keyring_process = subprocess.Popen(
                [keyring_daemon, "--foreground", "--unlock", "--components=secrets"],
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=daemon_env,
            )
            assert keyring_process.stdin is not None
            keyring_process.stdin.write(KEYRING_PASSWORD.encode())
            keyring_process.stdin.close()
            _wait_for_secrets_name(watcher, keyring_process, log_path)
        finally:
            watcher.close()

        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", address)
        monkeypatch.delenv("PYTHON_KEYRING_BACKEND", raising=False)
        with secretstorage.dbus_init() as connection:
            _check_login_collection(connection)

        yield SecretService(bus_address=address, root=root, password=KEYRING_PASSWORD)
    finally:
        if keyring_process is not None:
            _stop(keyring_process)
        _stop(bus)
        if bus.stdout is not None:
            bus.stdout.close()
        bus_log.close()
        if log_file is not None:
            log_file.close()
        shutil.rmtree(root, ignore_errors=True)
