"""Real proxy servers for the proxy tests: tinyproxy, microsocks and Squid on loopback.

Each factory fixture starts its daemon in the foreground on a free port of
127.0.0.1, with its configuration in a temporary folder, and stops it by PID
when the test ends. Every proxy binds its outgoing connections to
PROXY_SOURCE, so a server can tell a tunnelled connection (from 127.0.0.2)
from a direct one (from 127.0.0.1).

Credentials each daemon accepts, as found with the Debian 12 packages:

- tinyproxy 1.11.1 ``BasicAuth`` takes only ``[-A-Za-z0-9._]+`` for the user
  name and the password. Any other character is a syntax error in its
  configuration, so tinyproxy cannot test ':', '@' or non-ASCII letters.
- Squid 5.7 with ``basic_ncsa_auth`` takes any bytes except ':' in the user
  name, and any bytes in the password. These tests use UTF-8 there.
- microsocks 1.0.3 compares the bytes of ``-u`` and ``-P``.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from conftest import free_port

PROXY_SOURCE = "127.0.0.2"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
# Debian runs Squid as this user when it is started as root.
SQUID_USER = "proxy"
SQUID_AUTH_HELPER = Path("/usr/lib/squid/basic_ncsa_auth")


@dataclass
class ProxyServer:
    """A running proxy daemon: its kind, port and the file that collects its output."""

    name: str
    scheme: str
    port: int
    process: subprocess.Popen[bytes]
    output: Path

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def url_with(self, username: str, password: str) -> str:
        """Return the proxy URL with percent-encoded credentials, as in HTTPS_PROXY."""
        return f"{self.scheme}://{quote(username, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.output.read_text("utf-8", "replace")


def require_binary(name: str, package: str, fallback: Path | None = None) -> str:
    """Return the path of a program, or fail the test with the command that installs it."""
    path = shutil.which(name)
    if path is None and fallback is not None and fallback.exists():
        path = str(fallback)
    if path is None:
        pytest.fail(f"{name} is not installed; install it with: apt-get install -y {package} (.ci/run does)")
    return path


def _start(name: str, scheme: str, args: Sequence[str], port: int, folder: Path) -> ProxyServer:
    """Start a daemon and wait until it accepts TCP connections on ``port``."""
    output = folder / f"{name}.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, cwd=folder)
    server = ProxyServer(name, scheme, port, process, output)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"{name} exited with code {process.returncode} before it listened; output:\n{server.log_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return server
        except OSError:
            pass
        if time.monotonic() >= deadline:
            _stop(server)
            pytest.fail(f"{name} did not listen on 127.0.0.1:{port} within {READY_TIMEOUT_S:g} s; output:\n{server.log_text()}")
        time.sleep(POLL_INTERVAL_S)


def _stop(server: ProxyServer) -> None:
    """Stop the daemon by PID: SIGTERM, then SIGKILL if it is still running after STOP_TIMEOUT_S."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(STOP_TIMEOUT_S)


@pytest.fixture
def start_tinyproxy(tmp_path: Path) -> Iterator[Callable[..., ProxyServer]]:
    """Start tinyproxy (HTTP CONNECT), with Basic authentication when ``username`` is given."""
    binary = require_binary("tinyproxy", "tinyproxy")
    servers: list[ProxyServer] = []

    def start(username: str = "", password: str = "") -> ProxyServer:
        folder = tmp_path / f"tinyproxy-{len(servers)}"
        folder.mkdir()
        port = free_port()
        lines = [
            f"Port {port}",
            "Listen 127.0.0.1",
            f"Bind {PROXY_SOURCE}",
            "Allow 127.0.0.1",
            "Timeout 60",
            "MaxClients 50",
            "LogLevel Connect",
            "DisableViaHeader Yes",
        ]
        if username:
            lines.append(f"BasicAuth {username} {password}")
        config = folder / "tinyproxy.conf"
        config.write_text("\n".join(lines) + "\n", "utf-8")
        server = _start("tinyproxy", "http", [binary, "-d", "-c", str(config)], port, folder)
        servers.append(server)
        return server

    yield start
    for server in servers:
        _stop(server)


@pytest.fixture
def start_microsocks(tmp_path: Path) -> Iterator[Callable[..., ProxyServer]]:
    """Start microsocks (SOCKS5), with user name and password authentication when ``username`` is given."""
    binary = require_binary("microsocks", "microsocks")
    servers: list[ProxyServer] = []

    def start(username: str = "", password: str = "") -> ProxyServer:
        folder = tmp_path / f"microsocks-{len(servers)}"
        folder.mkdir()
        port = free_port()
        args = [binary, "-i", "127.0.0.1", "-p", str(port), "-b", PROXY_SOURCE]
        if username:
            args += ["-u", username, "-P", password]
        server = _start("microsocks", "socks5", args, port, folder)
        servers.append(server)
        return server

    yield start
    for server in servers:
        _stop(server)


@pytest.fixture
def start_squid() -> Iterator[Callable[..., ProxyServer]]:
    """Start Squid (HTTP CONNECT), with Basic authentication when ``username`` is given.

    ``hosts`` maps host names to addresses for Squid alone (its ``hosts_file``),
    so a relay can have a name that only the proxy resolves. Squid sends DNS
    queries only to 127.0.0.1.
    """
    binary = require_binary("squid", "squid", fallback=Path("/usr/sbin/squid"))
    if not SQUID_AUTH_HELPER.exists():
        pytest.fail(f"{SQUID_AUTH_HELPER} is missing; install it with: apt-get install -y squid")
    servers: list[ProxyServer] = []
    folders: list[Path] = []

    def start(username: str = "", password: str = "", hosts: dict[str, str] | None = None) -> ProxyServer:
        # Squid started as root runs as SQUID_USER, which cannot enter pytest's
        # private tmp folders, so it gets a folder of its own under /tmp.
        folder = Path(tempfile.mkdtemp(prefix="deskbridge-squid-"))
        folders.append(folder)
        port = free_port()

        hosts_file = folder / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{address} {name}\n" for name, address in (hosts or {}).items()), "utf-8")
        lines = [
            f"http_port 127.0.0.1:{port}",
            "visible_hostname deskbridge-test",
            f"pid_filename {folder / 'squid.pid'}",
            f"cache_log {folder / 'cache.log'}",
            f"access_log stdio:{folder / 'access.log'}",
            "netdb_filename none",
            f"coredump_dir {folder}",
            "cache deny all",
            "cache_mem 8 MB",
            "pinger_enable off",
            "icp_port 0",
            "htcp_port 0",
            "shutdown_lifetime 0 seconds",
            f"hosts_file {hosts_file}",
            "dns_nameservers 127.0.0.1",
            f"tcp_outgoing_address {PROXY_SOURCE}",
        ]
        if username:
            # basic_ncsa_auth accepts an unsalted MD5 hex digest of the password bytes.
            digest = hashlib.md5(password.encode("utf-8")).hexdigest()
            (folder / "passwd").write_bytes(f"{username}:{digest}\n".encode())
            lines += [
                f"auth_param basic program {SQUID_AUTH_HELPER} {folder / 'passwd'}",
                "auth_param basic realm deskbridge-test",
                "acl authenticated proxy_auth REQUIRED",
                "http_access allow authenticated",
            ]
        else:
            lines.append("http_access allow all")
        lines.append("http_access deny all")

        config = folder / "squid.conf"
        config.write_text("\n".join(lines) + "\n", "utf-8")
        folder.chmod(0o755)
        if os.geteuid() == 0:
            user = pwd.getpwnam(SQUID_USER)
            for path in (folder, *folder.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)

        server = _start("squid", "http", [binary, "-N", "-f", str(config)], port, folder)
        servers.append(server)
        return server

    yield start
    for server in servers:
        _stop(server)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
