"""TLS between the agent and a relay that serves wss:// and https://.

A test CA made with trustme issues the relay's certificates, which are
written to PEM files for ``RelayConfig.tls_cert`` and ``tls_key``. The agent's
``Connector`` trusts that CA through ``TlsSettings(ca_file=...)``, as an
office would add its company CA, and the system trust store otherwise.
Sign-in (REST) and the tunnel (WebSocket) both go through the Connector, so
each failure is checked on both paths.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from app.core.agent import Agent, AgentState, AgentStatus
from app.core.auth import RelayTokens, login
from app.core.backoff import Backoff
from app.core.config import Target
from app.core.credentials import MemoryStore
from app.core.errors import ConfigError
from app.core.net import Connector, TlsFailure, TlsSettings, parse_pin
from app.core.wslink import connect
from conftest import ACCOUNT, DEVICE, PASSWORD, AgentHandle, RelayHandle, environment_timeout
from tests.processes import Child, python_module, spawn  # noqa: F401  (spawn is a fixture)

TIMEOUT = environment_timeout(10.0)
# Short enough that the tests see several reconnection attempts quickly.
TEST_BACKOFF = Backoff(base=0.05, cap=0.2)
RETRIES_SEEN = 3
AGENT_PATH = "/v1/agent"
ONE_DAY = datetime.timedelta(days=1)

StartRelay = Callable[..., Awaitable[RelayHandle]]
StartAgent = Callable[..., Awaitable[AgentHandle]]


# Certificates -----------------------------------------------------------------


@dataclass
class TlsFiles:
    """PEM files of a test CA and of one certificate it issued."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    cert: trustme.LeafCert

    @property
    def pin(self) -> str:
        """Return the certificate's public-key pin: base64 SHA-256 of its SubjectPublicKeyInfo."""
        return base64.b64encode(spki_digest(self.cert)).decode()


def spki_digest(cert: trustme.LeafCert) -> bytes:
    certificate = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    return hashlib.sha256(certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()


def write_tls_files(folder: Path, ca: trustme.CA, *names: str, **issue_options: datetime.datetime) -> TlsFiles:
    """Issue a certificate for ``names`` and write CA, chain and key as PEM files into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(*names, **issue_options)
    files = TlsFiles(folder / "ca.pem", folder / "relay.pem", folder / "relay.key", cert)
    ca.cert_pem.write_to_path(str(files.ca_file))
    cert.private_key_and_cert_chain_pem.write_to_path(str(files.cert_file))
    cert.private_key_pem.write_to_path(str(files.key_file))
    return files


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def good_tls(tmp_path: Path, ca: trustme.CA) -> TlsFiles:
    return write_tls_files(tmp_path / "good", ca, "127.0.0.1", "localhost")


def trusting(files: TlsFiles, pin: str = "") -> Connector:
    """Return a Connector that trusts the test CA (and checks ``pin`` if given)."""
    return Connector(tls=TlsSettings(ca_file=str(files.ca_file), pin_sha256=pin))


async def start_tls_relay(start_relay: StartRelay, files: TlsFiles, expose: tuple[str, ...] = ()) -> RelayHandle:
    return await start_relay(expose, tls_cert=files.cert_file, tls_key=files.key_file)


# Connection attempts --------------------------------------------------------


async def sign_in(relay_url: str, connector: Connector) -> None:
    await login(relay_url, ACCOUNT, PASSWORD, connector=connector)


async def open_websocket(relay_url: str, connector: Connector) -> None:
    """Open the agent's WebSocket without a token; the TLS checks come before the relay's 401."""
    link = await connect(relay_url + AGENT_PATH, {}, timeout=TIMEOUT, max_message_size=1 << 20, connector=connector)
    link.abort()


ATTEMPTS = {"sign-in": sign_in, "websocket": open_websocket}


async def tls_failure(attempt: str, relay_url: str, connector: Connector) -> TlsFailure:
    """Run one connection attempt that must fail with TlsFailure, and return the failure."""
    with pytest.raises(TlsFailure) as caught:
        await asyncio.wait_for(ATTEMPTS[attempt](relay_url, connector), TIMEOUT)
    return caught.value


async def round_trip(port: int, payload: bytes) -> bytes:
    """Send ``payload`` to a port the relay exposes and read as many bytes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()


# Good chain -----------------------------------------------------------------


async def test_good_chain_login(start_relay: StartRelay, good_tls: TlsFiles) -> None:
    relay = await start_tls_relay(start_relay, good_tls)

    tokens = await login(relay.url, ACCOUNT, PASSWORD, connector=trusting(good_tls))

    assert relay.url.startswith("wss://")
    assert tokens.account == ACCOUNT


async def test_good_chain_tunnel(
    start_relay: StartRelay, start_agent: StartAgent, echo_port: int, good_tls: TlsFiles
) -> None:
    relay = await start_tls_relay(start_relay, good_tls, expose=("echo",))

    handle = await start_agent(relay.url, {"echo": ("127.0.0.1", echo_port)}, connector=trusting(good_tls))
    echoed = await round_trip(relay.port_of("echo"), b"over wss")

    assert echoed == b"over wss"
    assert handle.agent.tunnel is not None
    transport = handle.agent.tunnel.link.transport
    assert transport is not None
    assert transport.get_extra_info("ssl_object") is not None
    assert (ACCOUNT, DEVICE) in relay.relay.agents


async def test_good_chain_by_name(start_relay: StartRelay, good_tls: TlsFiles) -> None:
    relay = await start_tls_relay(start_relay, good_tls)

    tokens = await login(f"wss://localhost:{relay.relay.port}", ACCOUNT, PASSWORD, connector=trusting(good_tls))

    assert tokens.account == ACCOUNT


# Certificate failures ---------------------------------------------------------


@pytest.mark.parametrize("attempt", ATTEMPTS)
async def test_untrusted_chain(start_relay: StartRelay, good_tls: TlsFiles, attempt: str) -> None:
    relay = await start_tls_relay(start_relay, good_tls)

    failure = await tls_failure(attempt, relay.url, Connector())

    assert "not trusted" in str(failure)
    assert "127.0.0.1" in str(failure)


@pytest.mark.parametrize("attempt", ATTEMPTS)
async def test_wrong_address(start_relay: StartRelay, tmp_path: Path, ca: trustme.CA, attempt: str) -> None:
    files = write_tls_files(tmp_path, ca, "relay.example")
    relay = await start_tls_relay(start_relay, files)

    failure = await tls_failure(attempt, relay.url, trusting(files))

    assert "does not match the address 127.0.0.1" in str(failure)


@pytest.mark.parametrize("attempt", ATTEMPTS)
async def test_wrong_name(start_relay: StartRelay, tmp_path: Path, ca: trustme.CA, attempt: str) -> None:
    files = write_tls_files(tmp_path, ca, "relay.example")
    relay = await start_tls_relay(start_relay, files)

    failure = await tls_failure(attempt, f"wss://localhost:{relay.relay.port}", trusting(files))

    assert "does not match the name localhost" in str(failure)


@pytest.mark.parametrize("attempt", ATTEMPTS)
async def test_expired_certificate(start_relay: StartRelay, tmp_path: Path, ca: trustme.CA, attempt: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    files = write_tls_files(tmp_path, ca, "127.0.0.1", not_before=now - 2 * ONE_DAY, not_after=now - ONE_DAY)
    relay = await start_tls_relay(start_relay, files)

    failure = await tls_failure(attempt, relay.url, trusting(files))

    assert "has expired" in str(failure)


async def test_future_certificate(start_relay: StartRelay, tmp_path: Path, ca: trustme.CA) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    files = write_tls_files(tmp_path, ca, "127.0.0.1", not_before=now + ONE_DAY, not_after=now + 2 * ONE_DAY)
    relay = await start_tls_relay(start_relay, files)

    failure = await tls_failure("sign-in", relay.url, trusting(files))

    assert "not valid yet" in str(failure)


async def test_missing_ca_file(tmp_path: Path) -> None:
    connector = Connector(tls=TlsSettings(ca_file=str(tmp_path / "missing.pem")))

    with pytest.raises(ConfigError) as caught:
        await login("wss://127.0.0.1:9", ACCOUNT, PASSWORD, connector=connector)

    assert "missing.pem" in str(caught.value)


# Public-key pin -------------------------------------------------------------


@pytest.mark.parametrize("form", ["base64", "prefixed", "hex"])
async def test_pin_match(start_relay: StartRelay, good_tls: TlsFiles, form: str) -> None:
    pin = {
        "base64": good_tls.pin,
        "prefixed": f"sha256/{good_tls.pin}",
        "hex": spki_digest(good_tls.cert).hex(),
    }[form]
    relay = await start_tls_relay(start_relay, good_tls)

    tokens = await login(relay.url, ACCOUNT, PASSWORD, connector=trusting(good_tls, pin))

    assert tokens.account == ACCOUNT


async def test_pin_match_tunnel(
    start_relay: StartRelay, start_agent: StartAgent, echo_port: int, good_tls: TlsFiles
) -> None:
    relay = await start_tls_relay(start_relay, good_tls, expose=("echo",))

    await start_agent(relay.url, {"echo": ("127.0.0.1", echo_port)}, connector=trusting(good_tls, good_tls.pin))
    echoed = await round_trip(relay.port_of("echo"), b"pinned")

    assert echoed == b"pinned"


@pytest.mark.parametrize("attempt", ATTEMPTS)
async def test_pin_mismatch(start_relay: StartRelay, good_tls: TlsFiles, tmp_path: Path, ca: trustme.CA, attempt: str) -> None:
    other = write_tls_files(tmp_path / "other", ca, "127.0.0.1")
    relay = await start_tls_relay(start_relay, good_tls)

    failure = await tls_failure(attempt, relay.url, trusting(good_tls, other.pin))

    assert f"pinned key sha256/{other.pin}" in str(failure)
    assert f"127.0.0.1 is sha256/{good_tls.pin}" in str(failure)


@pytest.mark.parametrize(
    "pin",
    [
        "not a pin",
        base64.b64encode(bytes(16)).decode(),
        bytes(31).hex(),
        "sha1/" + base64.b64encode(bytes(32)).decode(),
    ],
)
def test_pin_syntax(pin: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Connector(tls=TlsSettings(pin_sha256=pin))

    assert "invalid public-key pin" in str(caught.value)
    assert repr(pin) in str(caught.value)


def test_pin_forms_agree() -> None:
    digest = hashlib.sha256(b"key").digest()

    assert parse_pin(base64.b64encode(digest).decode()) == digest
    assert parse_pin("sha256/" + base64.b64encode(digest).decode()) == digest
    assert parse_pin(digest.hex()) == digest
    assert parse_pin(digest.hex().upper()) == digest


# The agent on a rejected certificate ---------------------------------------


async def run_agent(relay_url: str, store: MemoryStore, tokens_connector: Connector, connector: Connector) -> tuple[Agent, asyncio.Task[None], list[AgentStatus]]:
    statuses: list[AgentStatus] = []
    agent = Agent(
        relay_url=relay_url,
        device=DEVICE,
        targets={"echo": Target("echo", "127.0.0.1", 9)},
        tokens=RelayTokens(relay_url, ACCOUNT, store, tokens_connector),
        on_status=statuses.append,
        backoff=TEST_BACKOFF,
        connector=connector,
    )
    return agent, asyncio.ensure_future(agent.run()), statuses


async def wait_for_errors(caplog: pytest.LogCaptureFixture, text: str, count: int) -> list[logging.LogRecord]:
    """Wait until ``count`` ERROR records from the agent contain ``text``; return them (fewer on timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT

    def matching() -> list[logging.LogRecord]:
        return [
            record
            for record in caplog.records
            if record.name == "app.core.agent" and record.levelno == logging.ERROR and text in record.getMessage()
        ]

    while len(matching()) < count and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return matching()


@pytest.mark.parametrize("stage", ["sign-in", "websocket"])
async def test_agent_retries_rejected_certificate(
    start_relay: StartRelay, good_tls: TlsFiles, tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture, stage: str
) -> None:
    """The agent logs the TLS failure as an error and keeps retrying; it never exits or connects."""
    caplog.set_level(logging.INFO)
    relay = await start_tls_relay(start_relay, good_tls)
    good = trusting(good_tls)
    store = MemoryStore()
    tokens = await login(relay.url, ACCOUNT, PASSWORD, connector=good)
    assert tokens.refresh_token is not None
    await store.set(relay.url, ACCOUNT, tokens.refresh_token)
    mismatched = trusting(good_tls, write_tls_files(tmp_path / "other", ca, "127.0.0.1").pin)
    # "sign-in": the token refresh (REST) meets the certificate first; "websocket": the tunnel does.
    tokens_connector = mismatched if stage == "sign-in" else good

    agent, task, statuses = await run_agent(relay.url, store, tokens_connector, mismatched)
    try:
        errors = await wait_for_errors(caplog, "does not match the pinned key", RETRIES_SEEN)
        waiting = [status for status in statuses if status.state is AgentState.WAITING]

        assert len(errors) >= RETRIES_SEEN
        assert f"cannot connect to relay {relay.url}" in errors[0].getMessage()
        assert len(waiting) >= RETRIES_SEEN - 1
        assert not task.done()
        assert all(status.state is not AgentState.CONNECTED for status in statuses)
        assert (ACCOUNT, DEVICE) not in relay.relay.agents
    finally:
        await agent.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# Relay command line ---------------------------------------------------------


@pytest.mark.parametrize("given", ["--tls-cert", "--tls-key"])
def test_relay_cli_half_tls(spawn: Callable[..., Child], good_tls: TlsFiles, tmp_path: Path, given: str) -> None:
    path = good_tls.cert_file if given == "--tls-cert" else good_tls.key_file
    child: Child = spawn(
        python_module("cloud_stub", "--port", "0", given, str(path), "--data-dir", str(tmp_path / "data")),
        dict(os.environ),
    )

    code = child.wait()

    assert code == 2, child.output()
    assert "TLS needs both --tls-cert and --tls-key" in child.stderr.text
    assert "Traceback" not in child.stderr.text
    assert "relay ready" not in child.stdout.text


def test_relay_cli_tls(spawn: Callable[..., Child], good_tls: TlsFiles, tmp_path: Path) -> None:
    args = ["--port", "0", "--tls-cert", str(good_tls.cert_file), "--tls-key", str(good_tls.key_file)]
    child: Child = spawn(python_module("cloud_stub", *args, "--data-dir", str(tmp_path / "data")), dict(os.environ))

    match = child.stdout.wait_for(r"relay ready on (\S+)")

    assert match.group(1).startswith("wss://127.0.0.1:")
