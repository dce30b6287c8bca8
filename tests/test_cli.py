"""The command-line tools as a person runs them: relay, login, logout and the headless agent.

Every tool runs as a subprocess with DESKBRIDGE_HOME in the test's temp dir
and the private Secret Service's bus in its environment, so the agent keeps
its token in a real keyring.
"""

from __future__ import annotations

import json
import os
import subprocess
import signal
import socket
import stat
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import keyring.backends.SecretService
import pytest

from tests.keyring_service import SecretService, secret_service  # noqa: F401  (fixture)
from tests.processes import Child, python_module, spawn, thread_echo_port  # noqa: F401  (fixtures)

ACCOUNT = "alice"
PASSWORD = "pa:ss wörd"
API_KEY = "cli-test-api-key"
KEYRING_SERVICE = "Deskbridge"
PROMPT_EXIT_S = 5.0
RELAY_READY = r"relay ready on (ws://\S+)"
EXPOSED_ECHO = rf"exposed {ACCOUNT}/echo on port (\d+)"
AGENT_CONNECTED = r"connected to ws://\S+ as device"


@dataclass
class RelayProcess:
    child: Child
    url: str
    port: int
    echo_port: int


@dataclass
class SignedIn:
    relay: RelayProcess
    login: Child
    token: str | None


@pytest.fixture
def env(secret_service: SecretService) -> dict[str, str]:
    """The environment for every tool: DESKBRIDGE_HOME (set by conftest) and the private bus."""
    return secret_service.child_env()


def start_relay(spawn, env: dict[str, str], data_dir: Path, port: int = 0) -> RelayProcess:
    child = spawn(
        python_module(
            "cloud_stub",
            "--port", str(port),
            "--user", f"{ACCOUNT}:{PASSWORD}",
            "--api-key", API_KEY,
            "--expose", f"{ACCOUNT}/echo=0",
            "--data-dir", str(data_dir),
        ),
        env,
    )
    url = child.stdout.wait_for(RELAY_READY).group(1)
    echo_port = int(child.stdout.wait_for(EXPOSED_ECHO).group(1))
    return RelayProcess(child, url, int(url.rsplit(":", 1)[1]), echo_port)


def run_login(spawn, env: dict[str, str], relay_url: str, password: str) -> Child:
    child = spawn(
        python_module("app", "login", "--relay", relay_url, "--username", ACCOUNT, "--password-stdin"),
        env,
        stdin_text=password + "\n",
    )
    child.wait()
    return child


def saved_token(relay_url: str) -> str | None:
    """Read the agent's token through keyring's SecretService backend, as another program would."""
    return keyring.backends.SecretService.Keyring().get_password(KEYRING_SERVICE, f"{ACCOUNT}@{relay_url}")


def refresh_status(relay_url: str, token: str) -> int:
    http = relay_url.replace("ws://", "http://")
    request = urllib.request.Request(
        f"{http}/v1/auth/refresh",
        data=json.dumps({"refresh_token": token}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def echo_through(port: int, payload: bytes) -> bytes:
    """Send ``payload`` to 127.0.0.1:port and return what comes back, up to its length or end of file."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = client.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


def start_agent(spawn, env: dict[str, str], echo_port: int, *extra: str) -> Child:
    return spawn(python_module("app", "run", "--headless", "--target", f"echo=127.0.0.1:{echo_port}", *extra), env)


@pytest.fixture
def relay(spawn, env, tmp_path) -> RelayProcess:
    return start_relay(spawn, env, tmp_path / "relay-data")


@pytest.fixture
def signed_in(spawn, env, relay) -> SignedIn:
    login = run_login(spawn, env, relay.url, PASSWORD)
    assert login.process.returncode == 0, login.output()
    return SignedIn(relay, login, saved_token(relay.url))


# Sign-in ----------------------------------------------------------------------


def test_login_prints_confirmation(signed_in):
    assert f"Signed in to {signed_in.relay.url} as {ACCOUNT}" in signed_in.login.stdout.text


def test_login_token_in_secret_service(signed_in):
    assert signed_in.token is not None
    assert refresh_status(signed_in.relay.url, signed_in.token) == 200


def test_login_writes_no_secret_to_files(signed_in, deskbridge_home):
    secrets = [PASSWORD.encode()] + ([signed_in.token.encode()] if signed_in.token else [])
    files = [path for path in deskbridge_home.rglob("*") if path.is_file()]
    leaking = [str(path) for path in files if any(secret in path.read_bytes() for secret in secrets)]

    assert files, "login wrote no file at all under DESKBRIDGE_HOME"
    assert leaking == []


def test_login_config_file_private(signed_in, deskbridge_home):
    config_file = deskbridge_home / "config" / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))

    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert config["relay_url"] == signed_in.relay.url
    assert config["account"] == ACCOUNT


def test_login_wrong_password_exits_1(spawn, env, relay):
    login = run_login(spawn, env, relay.url, "wrong password")

    assert login.process.returncode == 1, login.output()
    assert "wrong user name or password" in login.stderr.text
    assert saved_token(relay.url) is None


def test_login_unreachable_relay_exits_1(spawn, env):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    login = run_login(spawn, env, f"ws://127.0.0.1:{closed_port}", PASSWORD)

    assert login.process.returncode == 1, login.output()
    assert "connection refused" in login.stderr.text.lower()


def test_logout_deletes_token(spawn, env, signed_in):
    logout = spawn(python_module("app", "logout", "--relay", signed_in.relay.url, "--username", ACCOUNT), env)

    assert logout.wait() == 0, logout.output()
    assert saved_token(signed_in.relay.url) is None


# The headless agent -------------------------------------------------------------


def test_run_echoes_and_stops_on_sigterm(spawn, env, signed_in, thread_echo_port, deskbridge_home):
    agent = start_agent(spawn, env, thread_echo_port)
    agent.stderr.wait_for(AGENT_CONNECTED)

    reply = echo_through(signed_in.relay.echo_port, b"hello from the cloud \xe2\x9c\x93\n")

    signalled = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    code = agent.wait()
    elapsed = time.monotonic() - signalled

    assert reply == b"hello from the cloud \xe2\x9c\x93\n"
    assert code == 0, agent.output()
    assert elapsed < PROMPT_EXIT_S
    assert agent.stderr.count(r"agent stopped") == 1
    assert (deskbridge_home / "logs" / "deskbridge.log").is_file()
    assert "agent stopped" in (deskbridge_home / "logs" / "deskbridge.log").read_text(encoding="utf-8")


def test_run_saves_targets_to_config(spawn, env, signed_in, thread_echo_port, deskbridge_home):
    agent = start_agent(spawn, env, thread_echo_port)
    agent.stderr.wait_for(AGENT_CONNECTED)
    agent.send_signal(signal.SIGTERM)
    agent.wait()

    config = json.loads((deskbridge_home / "config" / "config.json").read_text(encoding="utf-8"))

    assert config["targets"] == [{"name": "echo", "host": "127.0.0.1", "port": thread_echo_port, "allow_remote": False}]


def test_run_without_login_logs_hint(spawn, env, relay, thread_echo_port):
    agent = start_agent(spawn, env, thread_echo_port, "--relay", relay.url, "--username", ACCOUNT)

    line = agent.stderr.wait_for(r"not signed in to ").string
    agent.send_signal(signal.SIGTERM)

    assert f"deskbridge login --relay {relay.url} --username {ACCOUNT}" in line
    assert agent.wait() == 0, agent.output()


def test_agent_retries_until_relay_starts(spawn, env, signed_in, thread_echo_port, tmp_path):
    relay_port = signed_in.relay.port
    signed_in.relay.child.send_signal(signal.SIGTERM)
    assert signed_in.relay.child.wait() == 0, signed_in.relay.child.output()

    agent = start_agent(spawn, env, thread_echo_port)
    agent.stderr.wait_for(r"cannot reach relay ws://\S+: connection refused", occurrence=2)
    restarted = start_relay(spawn, env, tmp_path / "relay-data", port=relay_port)
    agent.stderr.wait_for(AGENT_CONNECTED)

    reply = echo_through(restarted.echo_port, b"after the relay came back\n")

    assert reply == b"after the relay came back\n"


# Invalid input --------------------------------------------------------------------


def test_run_without_relay_exits_2(spawn, env):
    agent = spawn(python_module("app", "run", "--headless"), env)

    assert agent.wait() == 2, agent.output()
    assert "--relay" in agent.stderr.text


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("echo", "expected NAME=HOST:PORT"),
        ("echo=127.0.0.1", "expected HOST:PORT"),
        ("echo=127.0.0.1:http", "expected a number from 1 to 65535"),
        ("echo=127.0.0.1:70000", "expected a number from 1 to 65535"),
        ("echo=::1:7497", "put an IPv6 host in brackets"),
        ("bad name=127.0.0.1:7497", "invalid target name 'bad name'"),
    ],
)
def test_run_invalid_target_exits_2(spawn, env, deskbridge_home, spec, expected):
    agent = spawn(python_module("app", "run", "--headless", "--relay", "ws://127.0.0.1:1", "--target", spec), env)

    assert agent.wait() == 2, agent.output()
    assert expected in agent.stderr.text
    assert not (deskbridge_home / "config" / "config.json").exists()


def test_relay_invalid_expose_exits_2(spawn, env):
    script = Path(sys.executable).parent / "deskbridge-relay"
    assert script.is_file(), f"{script} is missing; reinstall the project with pip install -e ."

    relay = spawn([str(script), "--port", "0", "--expose", "bad"], env)

    assert relay.wait() == 2, relay.output()
    assert "ACCOUNT/TARGET=PORT" in relay.stderr.text


def test_remote_target_needs_consent(tmp_path, deskbridge_home):
    result = subprocess.run(
        [sys.executable, "-m", "app", "run", "--headless", "--relay", "ws://127.0.0.1:1", "--username", "alice",
         "--target", "files=192.0.2.10:445"],
        env={**os.environ, "DESKBRIDGE_HOME": str(deskbridge_home)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--allow-remote-target files" in result.stderr


async def test_agent_skips_remote_address(echo_port):
    from app.core.agent import TargetUnreachable, connect_target
    from app.core.bridge import SocketBridge
    from app.core.config import Target
    from app.core.traffic import Direction

    bridge = SocketBridge(target="remote", inbound=Direction.TO_DESKTOP)
    # A host name whose address is not loopback must not be reached without consent.
    target = Target("remote", "192.0.2.10", echo_port)
    with pytest.raises(TargetUnreachable, match="remote targets are not allowed"):
        await connect_target(bridge, target, timeout=1)
