"""``deskbridge --self-test``: check that this installation can run, most often a frozen bundle.

Checks, each printed as PASS or FAIL with its detail:

- **qt**: a QApplication starts with the platform plugin Qt picks here
  (``QT_QPA_PLATFORM`` or the desktop's default) and the bundled icons load.
  It runs in a child process, because Qt aborts the whole process when the
  platform plugin cannot load.
- **keyring**: the keyring library's active backend is a real OS keyring
  (``KeyringStore.check_backend``), not the fail backend or a plaintext file.
- **tls**: a truststore SSL context loads the OS trust store, and the OS
  verifier rejects an untrusted self-signed certificate on a loopback server.
- **relay**: bytes make a round trip through an embedded relay, the agent and
  a loopback echo server, all in this process, with the token kept in memory.

``--self-test`` runs all four and exits 0 only when all pass.
``--self-test startup`` opens the real window with settings in a temp
folder, prints the monotonic clock when the window is first painted, and
quits. ``installer/measure_startup.py`` turns that into a launch time.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import platform
import secrets
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app import __version__

CHECKS = ("qt", "keyring", "tls", "relay")
MODES = ("all", *CHECKS, "startup")
QT_CHILD_TIMEOUT_S = 60.0
RELAY_TIMEOUT_S = 30.0
TLS_TIMEOUT_S = 15.0
ROUND_TRIP_BYTES = 256 * 1024
CHILD_OUTPUT_LINES = 15
STARTUP_MARKER = "window painted at monotonic"


class CheckFailed(Exception):
    """A self-test check failed; the message states what failed and how to fix it."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    passed: bool
    detail: str


TITLES = {
    "qt": "Qt platform plugin",
    "keyring": "OS keyring",
    "tls": "TLS certificates",
    "relay": "relay round trip",
}


def self_command(*args: str) -> list[str]:
    """Return the command that starts this program again: the frozen executable or ``python -m app``."""
    if getattr(sys, "frozen", False):
        return [sys.executable, *args]
    return [sys.executable, "-m", "app", *args]


# Qt ---------------------------------------------------------------------------


def check_qt_here() -> str:
    """Create the QApplication in this process and load the app icon; return the platform's name."""
    from PySide6.QtCore import qVersion
    from PySide6.QtWidgets import QApplication

    from app.gui.icons import app_icon, icon_dir
    from app.gui.main import display_problem

    problem = display_problem()
    if problem:
        raise CheckFailed(problem)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    icon = app_icon()
    if icon.isNull() or not icon.availableSizes():
        raise CheckFailed(f"the application icon did not load from {icon_dir()}")
    sizes = len(icon.availableSizes())
    return f"platform {app.platformName()!r}, Qt {qVersion()}, style {app.style().name()!r}, app icon in {sizes} sizes"


def check_qt() -> str:
    """Run ``check_qt_here`` in a child process and return its detail line."""
    command = self_command("--self-test", "qt")
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=QT_CHILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"the Qt check in a child process did not finish within {QT_CHILD_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        raise CheckFailed(f"starting {command[0]} for the Qt check failed: {exc}") from None
    prefix = f"PASS  {TITLES['qt']}: "
    for line in child.stdout.splitlines():
        if child.returncode == 0 and line.startswith(prefix):
            return line[len(prefix):]
    output = "\n".join((child.stdout + child.stderr).strip().splitlines()[-CHILD_OUTPUT_LINES:])
    raise CheckFailed(f"the Qt check exited with code {child.returncode}; its output ends with:\n{output}")


# Keyring ----------------------------------------------------------------------


def check_keyring() -> str:
    from app.core.credentials import KeyringStore
    from app.core.errors import CredentialError

    store = KeyringStore()
    try:
        store.check_backend()
    except CredentialError as exc:
        raise CheckFailed(str(exc)) from None
    backend = store.backend
    return f"{type(backend).__module__}.{type(backend).__name__}"


# TLS --------------------------------------------------------------------------


def _count_trust_store() -> str:
    """Describe how many CA certificates ``load_default_certs`` finds, where OpenSSL can tell.

    truststore's context does not report counts, so a plain context loads the
    same OS certificates: the Windows system stores, or OpenSSL's defaults.
    """
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain.load_default_certs()
    loaded = plain.cert_store_stats()["x509_ca"]
    if loaded:
        return f"{loaded} CA certificates loaded"
    if sys.platform == "darwin":
        return "certificates are checked by the macOS Security framework, which gives no count"
    if sys.platform == "win32":
        raise CheckFailed("the Windows certificate stores returned no CA certificate")
    return _count_openssl_defaults()


def _count_openssl_defaults() -> str:
    """Count the CA certificates OpenSSL finds in its default locations or in a known bundle file.

    OpenSSL reads a hashed certificate folder lazily, so the count above is 0
    on Debian. truststore then loads the first bundle file on its list of
    known paths, and so does this count.
    """
    paths = ssl.get_default_verify_paths()
    from truststore import _openssl

    candidates = [paths.cafile, *_openssl._CA_FILE_CANDIDATES]
    for cafile in candidates:
        if cafile and os.path.isfile(cafile):
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            probe.load_verify_locations(cafile=cafile)
            count = probe.cert_store_stats()["x509_ca"]
            if count:
                return f"{count} CA certificates in {cafile}"
    if paths.capath and os.path.isdir(paths.capath):
        hashed = [name for name in os.listdir(paths.capath) if _openssl._HASHED_CERT_FILENAME_RE.match(name)]
        if hashed:
            return f"{len(hashed)} CA certificates in {paths.capath}"
    raise CheckFailed(
        f"no CA certificates found (OpenSSL looks in {paths.openssl_cafile} and {paths.openssl_capath}); "
        "install the ca-certificates package"
    )


def _self_signed_context() -> ssl.SSLContext:
    """Return a server context with a fresh self-signed certificate for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Deskbridge self-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    with tempfile.TemporaryDirectory(prefix="deskbridge-selftest-") as folder:
        cert_path = Path(folder) / "cert.pem"
        key_path = Path(folder) / "key.pem"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
    return context


async def _expect_rejected_certificate() -> None:
    """Connect through the agent's Connector to a self-signed loopback server; the OS verifier must reject it."""
    from app.core.net import Connector, TlsFailure

    server = await asyncio.start_server(lambda _reader, writer: writer.close(), "127.0.0.1", 0, ssl=_self_signed_context())
    port = server.sockets[0].getsockname()[1]
    try:
        transport, _protocol = await Connector().open(asyncio.Protocol, f"wss://127.0.0.1:{port}", TLS_TIMEOUT_S)
    except TlsFailure:
        return
    finally:
        server.close()
    transport.abort()
    raise CheckFailed("the OS verifier accepted an untrusted self-signed certificate, so TLS verification does not work")


def check_tls() -> str:
    from app.core.net import Connector

    context = Connector().ssl_context()
    context.load_default_certs()
    count = _count_trust_store()
    asyncio.run(asyncio.wait_for(_expect_rejected_certificate(), TLS_TIMEOUT_S))
    return f"{type(context).__module__}.{type(context).__name__}, {count}; an untrusted certificate was rejected"


# Relay round trip -------------------------------------------------------------


class EchoServer:
    """A loopback TCP server that sends back every byte; ``closed`` is set when a connection ends."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.closed.set()


async def _relay_round_trip() -> str:
    from app.core.agent import Agent
    from app.core.auth import RelayTokens, login
    from app.core.config import Target
    from app.core.credentials import MemoryStore
    from cloud_stub.accounts import Accounts
    from cloud_stub.relay import Exposure, Relay, RelayConfig

    account, device, target = "selftest", "self-test", "echo"
    password = secrets.token_urlsafe(16)
    echo = EchoServer()
    echo_server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    echo_port = echo_server.sockets[0].getsockname()[1]
    accounts = Accounts()
    accounts.add(account, password)
    exposure = Exposure(account, None, target, "127.0.0.1", 0)
    with tempfile.TemporaryDirectory(prefix="deskbridge-selftest-") as data_dir:
        relay = Relay(RelayConfig(port=0, accounts=accounts, exposures=[exposure], data_dir=Path(data_dir)))
        await relay.start()
        agent: Agent | None = None
        runner: asyncio.Future[None] | None = None
        try:
            tokens = await login(relay.url, account, password)
            assert tokens.refresh_token is not None
            store = MemoryStore()
            await store.set(relay.url, account, tokens.refresh_token)
            agent = Agent(
                relay_url=relay.url,
                device=device,
                targets={target: Target(target, "127.0.0.1", echo_port)},
                tokens=RelayTokens(relay.url, account, store),
            )
            runner = asyncio.ensure_future(agent.run())
            await agent.wait_connected()

            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.expose_ports[exposure.name])
            payload = secrets.token_bytes(ROUND_TRIP_BYTES)
            writer.write(payload)
            writer.write_eof()
            received = await reader.readexactly(len(payload))
            # The relay closes the cloud side once the echo server's end of the
            # stream has come back, so the stream ends cleanly before the agent stops.
            trailing = await reader.read()
            elapsed = time.monotonic() - started
            writer.close()
            await echo.closed.wait()
            if trailing:
                raise CheckFailed(f"{len(trailing)} bytes more came back through the relay than were sent")
            if received != payload:
                raise CheckFailed("the bytes that came back through the relay differ from the bytes sent")
            return f"{len(payload)} bytes each way through {relay.url} and the agent in {elapsed:.2f} s"
        finally:
            if agent is not None:
                await agent.stop()
            if runner is not None:
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
            await relay.stop()
            echo_server.close()
            await echo_server.wait_closed()


def check_relay() -> str:
    async def bounded() -> str:
        try:
            return await asyncio.wait_for(_relay_round_trip(), RELAY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise CheckFailed(f"the round trip did not finish within {RELAY_TIMEOUT_S:.0f} s") from None

    return asyncio.run(bounded())


# Window start-up --------------------------------------------------------------


def measure_startup() -> int:
    """Open the window with settings in a temp folder, print when it is first painted, and quit."""
    from PySide6.QtCore import QEvent, QObject, QTimer
    from PySide6.QtWidgets import QApplication, QMainWindow

    from app.core.paths import AppDirs
    from app.gui.main import display_problem, run_gui

    problem = display_problem()
    if problem:
        print(f"deskbridge: {problem}", file=sys.stderr)
        return 2
    app = QApplication.instance() or QApplication(sys.argv[:1])

    class FirstPaint(QObject):
        """Prints the time of the main window's first paint, then requests the app to quit."""

        seen = False

        def eventFilter(self, watched: QObject, event: QEvent) -> bool:
            if not self.seen and event.type() == QEvent.Type.Paint and isinstance(watched, QMainWindow):
                self.seen = True
                # Runs after this paint event is handled and the frame is flushed.
                QTimer.singleShot(0, lambda: self._report(watched))
            return False

        def _report(self, window: QMainWindow) -> None:
            print(f"{STARTUP_MARKER} {time.monotonic():.4f} s", flush=True)
            window.controller.request_quit()  # type: ignore[attr-defined]

    watcher = FirstPaint()
    app.installEventFilter(watcher)
    with tempfile.TemporaryDirectory(prefix="deskbridge-startup-") as home:
        root = Path(home)
        status = run_gui(AppDirs(root / "config", root / "data", root / "logs"))
    app.removeEventFilter(watcher)
    if not watcher.seen:
        print("deskbridge: the main window was never painted", file=sys.stderr)
        return 1
    return status


# Runner -----------------------------------------------------------------------


def _run_check(name: str, check: Callable[[], str]) -> CheckResult:
    try:
        return CheckResult(name, True, check())
    except CheckFailed as exc:
        return CheckResult(name, False, str(exc))
    except Exception as exc:  # noqa: BLE001 - every unexpected error is a failed check, reported with its type
        return CheckResult(name, False, f"unexpected {type(exc).__name__}: {exc}")


def run_self_test(mode: str = "all") -> int:
    """Run the checks that ``mode`` names, print each result, and return the exit code."""
    if mode == "startup":
        return measure_startup()
    frozen = "frozen bundle" if getattr(sys, "frozen", False) else "source tree"
    print(f"Deskbridge {__version__} self-test ({frozen}, {platform.system()} {platform.machine()}, Python {platform.python_version()})")
    functions: dict[str, Callable[[], str]] = {
        "qt": check_qt_here if mode == "qt" else check_qt,
        "keyring": check_keyring,
        "tls": check_tls,
        "relay": check_relay,
    }
    names = CHECKS if mode == "all" else (mode,)
    results = [_run_check(name, functions[name]) for name in names]
    for result in results:
        print(f"{'PASS' if result.passed else 'FAIL'}  {TITLES[result.name]}: {result.detail}", flush=True)
    failed = [result.name for result in results if not result.passed]
    if failed:
        print(f"self-test failed: {', '.join(failed)} ({len(failed)} of {len(results)} checks)")
        return 1
    print(f"self-test passed: {len(results)} of {len(results)} checks")
    return 0
