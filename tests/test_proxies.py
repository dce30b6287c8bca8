"""Sign-in and the tunnel through real HTTP CONNECT and SOCKS5 proxies.

The proxies are tinyproxy, Squid and microsocks (see proxy_servers.py), each
binding its outgoing connections to 127.0.0.2. The relay logs the address
that each sign-in and each agent connection came from, so a connection
that went through a proxy is one from 127.0.0.2; a direct one comes from
127.0.0.1 (see test_direct_peer).

System proxy settings: ``Connector.proxy_for`` always reaches a loopback
relay directly in system mode, so a relay at 127.0.0.1 can never show that
HTTPS_PROXY was used. These tests give the relay the name relay.example
instead, which only Squid resolves, from a hosts file of its own. In this
process any lookup of a name under .example fails without a DNS query and
is recorded, so a test also shows that the agent never tried to reach the
relay directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from app.core.agent import Agent, AgentState, AgentStatus
from app.core.auth import RelayTokens, login
from app.core.backoff import Backoff
from app.core.config import Target
from app.core.credentials import MemoryStore
from app.core.errors import ConfigError
from app.core.net import Connector, ProxyFailure, ProxySettings, TlsFailure, TlsSettings
from conftest import ACCOUNT, DEVICE, PASSWORD, AgentHandle, RelayHandle, environment_timeout, free_port
from proxy_servers import (  # noqa: F401  (start_* are fixtures)
    PROXY_SOURCE,
    ProxyServer,
    start_microsocks,
    start_squid,
    start_tinyproxy,
)

TIMEOUT = environment_timeout(15.0)
PAYLOAD = b"through the proxy"
RELAY_NAME = "relay.example"
# tinyproxy 1.11 accepts only [-A-Za-z0-9._] in BasicAuth (see proxy_servers.py).
TINYPROXY_USER = ("deskbridge.user", "s3cret-pass_1.0")
SQUID_USER = ("jürgen@corp", "pä:ss@wörd")
# python-socks sends SOCKS5 credentials as ASCII, so ':' and '@' but no umlauts.
SOCKS_USER = ("jurgen@corp", "pa:ss@word")
RETRIES_SEEN = 3

StartRelay = Callable[..., Awaitable[RelayHandle]]
StartAgent = Callable[..., Awaitable[AgentHandle]]
StartProxy = Callable[..., ProxyServer]


# Environment ----------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every *_proxy variable of the person's environment, so that only the variables a test sets apply."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


@dataclass
class LocalNames:
    """Host names under .example as this process resolves them: ``addresses`` or not at all."""

    addresses: dict[str, str] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)


@pytest.fixture(autouse=True)
def local_names(monkeypatch: pytest.MonkeyPatch) -> LocalNames:
    """Resolve names under .example from a table and record each lookup; no DNS query leaves the machine."""
    names = LocalNames()
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        text = host.decode() if isinstance(host, bytes) else host
        if isinstance(text, str) and text.rstrip(".").lower().endswith(".example"):
            names.lookups.append(text)
            if text not in names.addresses:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real_getaddrinfo(names.addresses[text], port, *args, **kwargs)
        return real_getaddrinfo(host, port, *args, **kwargs)

    # asyncio's loop.getaddrinfo looks socket.getaddrinfo up at each call.
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


# Observations ---------------------------------------------------------------


SIGNED_IN_FROM = re.compile(r"signed in from (\S+)")


def host_of(peer: str) -> str:
    """Return the address of a ``host:port`` peer as the relay logs it."""
    return peer.rpartition(":")[0]


def signin_peers(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Return the addresses that the relay logged successful sign-ins from, oldest first."""
    peers = []
    for record in caplog.records:
        match = SIGNED_IN_FROM.search(record.getMessage()) if record.name == "cloud_stub.signin" else None
        if match:
            peers.append(host_of(match.group(1)))
    return peers


async def round_trip(port: int, payload: bytes = PAYLOAD) -> bytes:
    """Send ``payload`` to a port the relay exposes and read as many bytes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()


@dataclass
class TunnelUse:
    """Where the relay saw the sign-in and the agent come from, and what came back through the tunnel."""

    signin_peer: str
    agent_peer: str
    echoed: bytes


async def use_tunnel(
    relay: RelayHandle,
    start_agent: StartAgent,
    echo_port: int,
    connector: Connector,
    caplog: pytest.LogCaptureFixture,
    relay_url: str = "",
) -> TunnelUse:
    """Sign in, run an agent and send data through its tunnel, all with ``connector``."""
    caplog.set_level(logging.INFO, logger="cloud_stub.signin")
    url = relay_url or relay.url
    await asyncio.wait_for(login(url, ACCOUNT, PASSWORD, connector=connector), TIMEOUT)
    signin_peer = signin_peers(caplog)[-1]
    await start_agent(url, {"echo": ("127.0.0.1", echo_port)}, connector=connector)
    agent_peer = host_of(relay.relay.agents[(ACCOUNT, DEVICE)].remote)
    echoed = await round_trip(relay.port_of("echo"))
    return TunnelUse(signin_peer, agent_peer, echoed)


def manual(proxy: ProxyServer, username: str = "", password: str = "") -> Connector:
    return Connector(ProxySettings(mode="manual", url=proxy.url, username=username, password=password))


def closed_port() -> int:
    """Return a loopback port that nothing listens on (free a moment ago)."""
    return free_port()


def write_relay_tls(folder: Path, *names: str) -> tuple[Path, Path, Path]:
    """Write a test CA and a relay certificate for ``names``; return CA, chain and key files."""
    ca = trustme.CA()
    cert = ca.issue_cert(*names)
    folder.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "relay.pem", folder / "relay.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return ca_file, cert_file, key_file


# The tunnel through each proxy ------------------------------------------------


async def test_direct_peer(
    start_relay: StartRelay, start_agent: StartAgent, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a proxy the relay logs peers from 127.0.0.1, so 127.0.0.2 in the other tests means the proxy."""
    relay = await start_relay(("echo",))

    seen = await use_tunnel(relay, start_agent, echo_port, Connector(ProxySettings(mode="none")), caplog)

    assert seen.signin_peer == "127.0.0.1"
    assert seen.agent_peer == "127.0.0.1"
    assert seen.echoed == PAYLOAD


async def test_tinyproxy_tunnel(
    start_relay: StartRelay, start_agent: StartAgent, echo_port: int, start_tinyproxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await start_relay(("echo",))
    proxy = start_tinyproxy()

    seen = await use_tunnel(relay, start_agent, echo_port, manual(proxy), caplog)

    assert seen.signin_peer == PROXY_SOURCE
    assert seen.agent_peer == PROXY_SOURCE
    assert seen.echoed == PAYLOAD
    assert f"CONNECT 127.0.0.1:{relay.relay.port}" in proxy.log_text()


async def test_tinyproxy_basic_auth(
    start_relay: StartRelay, start_agent: StartAgent, echo_port: int, start_tinyproxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await start_relay(("echo",))
    proxy = start_tinyproxy(*TINYPROXY_USER)

    seen = await use_tunnel(relay, start_agent, echo_port, manual(proxy, *TINYPROXY_USER), caplog)

    assert seen.signin_peer == PROXY_SOURCE
    assert seen.agent_peer == PROXY_SOURCE
    assert seen.echoed == PAYLOAD


async def test_tinyproxy_wss(
    start_relay: StartRelay, start_agent: StartAgent, echo_port: int, start_tinyproxy: StartProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca_file, cert_file, key_file = write_relay_tls(tmp_path / "tls", "127.0.0.1")
    relay = await start_relay(("echo",), tls_cert=cert_file, tls_key=key_file)
    proxy = start_tinyproxy(*TINYPROXY_USER)
    connector = Connector(
        ProxySettings(mode="manual", url=proxy.url, username=TINYPROXY_USER[0], password=TINYPROXY_USER[1]),
        TlsSettings(ca_file=str(ca_file)),
    )

    seen = await use_tunnel(relay, start_agent, echo_port, connector, caplog)

    assert relay.url.startswith("wss://")
    assert seen.agent_peer == PROXY_SOURCE
    assert seen.echoed == PAYLOAD


async def test_tinyproxy_untrusted_relay(start_relay: StartRelay, start_tinyproxy: StartProxy, tmp_path: Path) -> None:
    """The certificate checks apply inside the tunnel too, as with a TLS-inspecting proxy's own CA."""
    _ca_file, cert_file, key_file = write_relay_tls(tmp_path / "tls", "127.0.0.1")
    relay = await start_relay(tls_cert=cert_file, tls_key=key_file)
    proxy = start_tinyproxy()

    with pytest.raises(TlsFailure) as caught:
        await login(relay.url, ACCOUNT, PASSWORD, connector=manual(proxy))

    assert "not trusted" in str(caught.value)
    assert f"CONNECT 127.0.0.1:{relay.relay.port}" in proxy.log_text()


@pytest.mark.parametrize("credentials_in", ["settings", "url"])
async def test_squid_utf8_credentials(
    start_relay: StartRelay,
    start_agent: StartAgent,
    echo_port: int,
    start_squid: StartProxy,
    caplog: pytest.LogCaptureFixture,
    credentials_in: str,
) -> None:
    """A user name and password with '@', ':' and umlauts, sent as UTF-8 as Squid expects."""
    relay = await start_relay(("echo",))
    proxy = start_squid(*SQUID_USER)
    if credentials_in == "settings":
        connector = manual(proxy, *SQUID_USER)
    else:
        connector = Connector(ProxySettings(mode="manual", url=proxy.url_with(*SQUID_USER)))

    seen = await use_tunnel(relay, start_agent, echo_port, connector, caplog)

    assert seen.signin_peer == PROXY_SOURCE
    assert seen.agent_peer == PROXY_SOURCE
    assert seen.echoed == PAYLOAD


async def test_socks5_tunnel(
    start_relay: StartRelay, start_agent: StartAgent, echo_port: int, start_microsocks: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await start_relay(("echo",))
    proxy = start_microsocks()

    seen = await use_tunnel(relay, start_agent, echo_port, manual(proxy), caplog)

    assert seen.signin_peer == PROXY_SOURCE
    assert seen.agent_peer == PROXY_SOURCE
    assert seen.echoed == PAYLOAD
    assert f"connected to 127.0.0.1:{relay.relay.port}" in proxy.log_text()


async def test_socks5_auth(
    start_relay: StartRelay, start_agent: StartAgent, echo_port: int, start_microsocks: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await start_relay(("echo",))
    proxy = start_microsocks(*SOCKS_USER)

    seen = await use_tunnel(relay, start_agent, echo_port, Connector(ProxySettings(mode="manual", url=proxy.url_with(*SOCKS_USER))), caplog)

    assert seen.signin_peer == PROXY_SOURCE
    assert seen.agent_peer == PROXY_SOURCE
    assert seen.echoed == PAYLOAD


# System proxy settings -------------------------------------------------------


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "ALL_PROXY"])
async def test_system_proxy_wss(
    start_relay: StartRelay,
    start_agent: StartAgent,
    echo_port: int,
    start_squid: StartProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_names: LocalNames,
    caplog: pytest.LogCaptureFixture,
    variable: str,
) -> None:
    ca_file, cert_file, key_file = write_relay_tls(tmp_path / "tls", RELAY_NAME)
    relay = await start_relay(("echo",), tls_cert=cert_file, tls_key=key_file)
    proxy = start_squid(hosts={RELAY_NAME: "127.0.0.1"})
    monkeypatch.setenv(variable, proxy.url)
    # HTTP_PROXY is for ws:// and http:// only; a wss:// relay must not use it.
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    connector = Connector(ProxySettings(), TlsSettings(ca_file=str(ca_file)))

    seen = await use_tunnel(relay, start_agent, echo_port, connector, caplog, f"wss://{RELAY_NAME}:{relay.relay.port}")

    assert seen.signin_peer == PROXY_SOURCE
    assert seen.agent_peer == PROXY_SOURCE
    assert seen.echoed == PAYLOAD
    assert local_names.lookups == []


async def test_system_proxy_ws(
    start_relay: StartRelay,
    start_agent: StartAgent,
    echo_port: int,
    start_squid: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    local_names: LocalNames,
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = await start_relay(("echo",))
    proxy = start_squid(*SQUID_USER, hosts={RELAY_NAME: "127.0.0.1"})
    monkeypatch.setenv("HTTP_PROXY", proxy.url_with(*SQUID_USER))
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed_port()}")

    seen = await use_tunnel(relay, start_agent, echo_port, Connector(), caplog, f"ws://{RELAY_NAME}:{relay.relay.port}")

    assert seen.signin_peer == PROXY_SOURCE
    assert seen.agent_peer == PROXY_SOURCE
    assert seen.echoed == PAYLOAD
    assert local_names.lookups == []


@pytest.mark.parametrize("no_proxy", [RELAY_NAME, ".example", "example", "other.test, RELAY.EXAMPLE", "*"])
async def test_no_proxy_honoured(
    start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
    local_names: LocalNames,
    caplog: pytest.LogCaptureFixture,
    no_proxy: str,
) -> None:
    """With NO_PROXY naming the relay, the unreachable proxy of HTTP_PROXY is never used."""
    caplog.set_level(logging.INFO, logger="cloud_stub.signin")
    relay = await start_relay()
    local_names.addresses[RELAY_NAME] = "127.0.0.1"
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("NO_PROXY", no_proxy)

    tokens = await login(f"ws://{RELAY_NAME}:{relay.relay.port}", ACCOUNT, PASSWORD, connector=Connector())

    assert tokens.account == ACCOUNT
    assert signin_peers(caplog) == ["127.0.0.1"]
    assert local_names.lookups == [RELAY_NAME]


async def test_no_proxy_other_host(start_relay: StartRelay, monkeypatch: pytest.MonkeyPatch, local_names: LocalNames) -> None:
    """The control for test_no_proxy_honoured: NO_PROXY for another host leaves the proxy in use."""
    relay = await start_relay()
    local_names.addresses[RELAY_NAME] = "127.0.0.1"
    proxy_port = closed_port()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
    monkeypatch.setenv("NO_PROXY", "other.example")

    with pytest.raises(ConnectionError) as caught:
        await login(f"ws://{RELAY_NAME}:{relay.relay.port}", ACCOUNT, PASSWORD, connector=Connector())

    assert f"cannot reach the proxy http://127.0.0.1:{proxy_port}" in str(caught.value)
    assert local_names.lookups == []


async def test_system_loopback_direct(start_relay: StartRelay, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """In system mode a relay on this machine is reached directly, even with a proxy set."""
    caplog.set_level(logging.INFO, logger="cloud_stub.signin")
    relay = await start_relay()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("ALL_PROXY", f"socks5://127.0.0.1:{closed_port()}")

    await login(relay.url, ACCOUNT, PASSWORD, connector=Connector())
    await login(f"ws://localhost:{relay.relay.port}", ACCOUNT, PASSWORD, connector=Connector())

    assert signin_peers(caplog) == ["127.0.0.1", "127.0.0.1"]


@pytest.mark.parametrize(
    ("environment", "scheme", "expected"),
    [
        ({"HTTPS_PROXY": "http://https-proxy:3128"}, "wss", "http://https-proxy:3128"),
        ({"HTTPS_PROXY": "http://https-proxy:3128"}, "https", "http://https-proxy:3128"),
        ({"HTTPS_PROXY": "http://https-proxy:3128"}, "ws", ""),
        ({"HTTP_PROXY": "http://http-proxy:3128"}, "ws", "http://http-proxy:3128"),
        ({"HTTP_PROXY": "http://http-proxy:3128"}, "wss", ""),
        ({"ALL_PROXY": "socks5://socks:1080"}, "wss", "socks5://socks:1080"),
        ({"ALL_PROXY": "socks5://socks:1080", "HTTPS_PROXY": "http://https-proxy:3128"}, "wss", "http://https-proxy:3128"),
        ({"https_proxy": "http://lower:3128"}, "wss", "http://lower:3128"),
        ({"HTTPS_PROXY": "http://https-proxy:3128", "NO_PROXY": "relay.example"}, "wss", ""),
        ({"HTTPS_PROXY": "http://https-proxy:3128", "no_proxy": ".example"}, "wss", ""),
        ({"HTTPS_PROXY": "http://https-proxy:3128", "NO_PROXY": "other.example"}, "wss", "http://https-proxy:3128"),
        ({}, "wss", ""),
    ],
)
def test_system_proxy_choice(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], scheme: str, expected: str) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    assert Connector().proxy_for(scheme, RELAY_NAME) == expected


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost", "localhost.", "relay.localhost", "::ffff:127.0.0.1"])
def test_system_loopback_bypass(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://https-proxy:3128")

    assert Connector().proxy_for("wss", host) == ""


@pytest.mark.parametrize("host", ["relay.example", "10.0.0.1", "localhost.example", "mylocalhost"])
def test_system_remote_proxied(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://https-proxy:3128")

    assert Connector().proxy_for("wss", host) == "http://https-proxy:3128"


def test_manual_ignores_system(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://https-proxy:3128")
    monkeypatch.setenv("NO_PROXY", "*")
    connector = Connector(ProxySettings(mode="manual", url="socks5://manual:1080"))

    assert connector.proxy_for("wss", "127.0.0.1") == "socks5://manual:1080"
    assert connector.proxy_for("wss", RELAY_NAME) == "socks5://manual:1080"


def test_none_ignores_system(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://https-proxy:3128")

    assert Connector(ProxySettings(mode="none")).proxy_for("wss", RELAY_NAME) == ""


# Authentication failures ------------------------------------------------------


async def proxy_failure(relay_url: str, connector: Connector) -> ProxyFailure:
    """Sign in through a proxy that must reject the request, and return the ProxyFailure."""
    with pytest.raises(ProxyFailure) as caught:
        await asyncio.wait_for(login(relay_url, ACCOUNT, PASSWORD, connector=connector), TIMEOUT)
    return caught.value


async def test_tinyproxy_wrong_password(start_relay: StartRelay, start_tinyproxy: StartProxy) -> None:
    relay = await start_relay()
    proxy = start_tinyproxy(*TINYPROXY_USER)

    failure = await proxy_failure(relay.url, manual(proxy, TINYPROXY_USER[0], "wrong-password"))

    # tinyproxy 1.11 responds to wrong credentials with 401, not 407.
    assert f"proxy authentication failed at {proxy.url} (HTTP 401)" in str(failure)
    assert "wrong-password" not in str(failure)


async def test_tinyproxy_missing_credentials(start_relay: StartRelay, start_tinyproxy: StartProxy) -> None:
    relay = await start_relay()
    proxy = start_tinyproxy(*TINYPROXY_USER)

    failure = await proxy_failure(relay.url, manual(proxy))

    assert f"proxy authentication required by {proxy.url} (HTTP 407)" in str(failure)


async def test_squid_wrong_password(start_relay: StartRelay, start_squid: StartProxy) -> None:
    relay = await start_relay()
    proxy = start_squid(*SQUID_USER)

    failure = await proxy_failure(relay.url, Connector(ProxySettings(mode="manual", url=proxy.url_with(SQUID_USER[0], "pä:ss@wörd!"))))

    assert "proxy authentication failed at http://***@127.0.0.1" in str(failure)
    assert "pä" not in str(failure)


async def test_squid_missing_credentials(start_relay: StartRelay, start_squid: StartProxy) -> None:
    relay = await start_relay()
    proxy = start_squid(*SQUID_USER)

    failure = await proxy_failure(relay.url, manual(proxy))

    assert f"proxy authentication required by {proxy.url} (HTTP 407)" in str(failure)


async def test_socks5_wrong_password(start_relay: StartRelay, start_microsocks: StartProxy) -> None:
    relay = await start_relay()
    proxy = start_microsocks(*SOCKS_USER)

    failure = await proxy_failure(relay.url, manual(proxy, SOCKS_USER[0], "wrong-password"))

    assert f"proxy authentication failed at {proxy.url}" in str(failure)
    assert "wrong-password" not in str(failure)


async def test_socks5_missing_credentials(start_relay: StartRelay, start_microsocks: StartProxy) -> None:
    relay = await start_relay()
    proxy = start_microsocks(*SOCKS_USER)

    failure = await proxy_failure(relay.url, manual(proxy))

    assert f"proxy authentication required by {proxy.url}" in str(failure)


async def test_agent_retries_proxy_failure(
    start_relay: StartRelay, start_tinyproxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent logs a rejected proxy login as an error and keeps retrying; it never exits."""
    caplog.set_level(logging.INFO)
    relay = await start_relay()
    proxy = start_tinyproxy(*TINYPROXY_USER)
    store = MemoryStore()
    tokens = await login(relay.url, ACCOUNT, PASSWORD, connector=Connector(ProxySettings(mode="none")))
    assert tokens.refresh_token is not None
    await store.set(relay.url, ACCOUNT, tokens.refresh_token)
    connector = manual(proxy, TINYPROXY_USER[0], "wrong-password")
    statuses: list[AgentStatus] = []
    agent = Agent(
        relay_url=relay.url,
        device=DEVICE,
        targets={"echo": Target("echo", "127.0.0.1", 9)},
        tokens=RelayTokens(relay.url, ACCOUNT, store, connector),
        on_status=statuses.append,
        backoff=Backoff(base=0.05, cap=0.2),
        connector=connector,
    )
    task = asyncio.ensure_future(agent.run())
    try:
        errors = await wait_for_agent_errors(caplog, "proxy authentication failed", RETRIES_SEEN)
        waiting = [status for status in statuses if status.state is AgentState.WAITING]

        assert len(errors) >= RETRIES_SEEN
        assert len(waiting) >= RETRIES_SEEN - 1
        assert not task.done()
        assert all(status.state is not AgentState.CONNECTED for status in statuses)
    finally:
        await agent.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def wait_for_agent_errors(caplog: pytest.LogCaptureFixture, text: str, count: int) -> list[logging.LogRecord]:
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


# Other proxy failures -------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "socks5"])
async def test_unreachable_proxy(start_relay: StartRelay, scheme: str) -> None:
    relay = await start_relay()
    url = f"{scheme}://127.0.0.1:{closed_port()}"

    with pytest.raises(ConnectionError) as caught:
        await login(relay.url, ACCOUNT, PASSWORD, connector=Connector(ProxySettings(mode="manual", url=url)))

    assert f"cannot reach the proxy {url}" in str(caught.value)


async def test_tinyproxy_relay_down(start_tinyproxy: StartProxy) -> None:
    proxy = start_tinyproxy()
    relay_port = closed_port()

    failure = await proxy_failure(f"ws://127.0.0.1:{relay_port}", manual(proxy))

    assert f"refused to connect to 127.0.0.1:{relay_port}" in str(failure)
    assert "authentication" not in str(failure)


async def test_socks5_relay_down(start_microsocks: StartProxy) -> None:
    proxy = start_microsocks()
    relay_port = closed_port()

    failure = await proxy_failure(f"ws://127.0.0.1:{relay_port}", manual(proxy))

    assert f"refused to connect to 127.0.0.1:{relay_port}" in str(failure)
    assert "authentication" not in str(failure)


async def start_socks5_stub(reply_code: int) -> asyncio.Server:
    """Start a SOCKS5 server without authentication that replies to every CONNECT request with ``reply_code``.

    microsocks sends code 1 (general failure) only when it cannot resolve the
    relay's name, which needs DNS, so this stand-in sends it instead.
    """

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _version, count = await reader.readexactly(2)
            await reader.readexactly(count)
            writer.write(b"\x05\x00")
            _version, _command, _reserved, address_type = await reader.readexactly(4)
            length = {1: 4, 4: 16}.get(address_type) or (await reader.readexactly(1))[0]
            await reader.readexactly(length + 2)
            writer.write(bytes([5, reply_code, 0, 1, 0, 0, 0, 0, 0, 0]))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.mark.parametrize("code", [1, 2, 5])
async def test_socks5_reply_not_authentication(code: int) -> None:
    """A failed SOCKS5 CONNECT reply is no authentication error, including 1 (general failure) and 2 (not allowed by ruleset)."""
    server = await start_socks5_stub(code)
    port = server.sockets[0].getsockname()[1]
    try:
        failure = await proxy_failure(f"ws://{RELAY_NAME}:8765", Connector(ProxySettings(mode="manual", url=f"socks5://127.0.0.1:{port}")))
    finally:
        server.close()
        await server.wait_closed()

    assert f"refused to connect to {RELAY_NAME}:8765" in str(failure)
    assert "authentication" not in str(failure)


# Settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        ProxySettings(mode="manual", url="http://proxy:3128", username="jürgen@corp", password="pä:ss@wörd"),
        ProxySettings(mode="manual", url="http://jürgen%40corp:p%C3%A4%3Ass%40w%C3%B6rd@proxy:3128"),
        ProxySettings(mode="manual", url="http://user:pä:ss@wörd@proxy:3128"),
        ProxySettings(mode="manual", url="user:pä:ss@wörd@proxy:3128"),
        ProxySettings(mode="manual", url="http://user:pä:ss@wörd@proxy:99999"),
        ProxySettings(mode="manual", url="http://user:pä/ss@wörd@proxy:3128"),
    ],
)
def test_settings_repr_hides_password(settings: ProxySettings) -> None:
    text = repr(settings)

    assert "ss@w" not in text
    assert "%3Ass" not in text
    assert "proxy" in text


def test_connector_repr_hides_password() -> None:
    connector = Connector(ProxySettings(mode="manual", url="http://user:pä:ss@wörd@proxy:3128", username="jürgen", password="geheim"))

    assert "geheim" not in repr(connector)
    assert "ss@w" not in repr(connector)


def test_settings_repr_shows_url() -> None:
    settings = ProxySettings(mode="manual", url="http://proxy:3128", username="jürgen", password="geheim")

    assert repr(settings) == "ProxySettings(mode='manual', url='http://proxy:3128', username='jürgen', password=***)"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (ProxySettings(mode="sytem"), "invalid proxy mode 'sytem'"),
        (ProxySettings(mode="manual"), "no proxy URL is set"),
        (ProxySettings(mode="manual", url="ftp://proxy:21"), "invalid proxy 'ftp://proxy:21'"),
        (ProxySettings(mode="manual", url="http://proxy:99999"), "invalid proxy 'http://proxy:99999'"),
        (ProxySettings(mode="manual", url="http://user:secret@proxy:port"), "invalid proxy 'http://***@proxy:port'"),
    ],
)
def test_invalid_settings(settings: ProxySettings, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Connector(settings)

    assert message in str(caught.value)


async def test_http_user_name_colon(start_relay: StartRelay, start_tinyproxy: StartProxy) -> None:
    relay = await start_relay()
    proxy = start_tinyproxy(*TINYPROXY_USER)

    with pytest.raises(ConfigError) as caught:
        await login(relay.url, ACCOUNT, PASSWORD, connector=manual(proxy, "domain:user", "secret"))

    assert "cannot take a ':' in the user name" in str(caught.value)


@pytest.mark.parametrize(("username", "password"), [("jürgen", "secret"), ("user", "pässword"), ("user", "x" * 256)])
async def test_socks5_credentials_rejected(start_relay: StartRelay, start_microsocks: StartProxy, username: str, password: str) -> None:
    relay = await start_relay()
    proxy = start_microsocks(*SOCKS_USER)

    with pytest.raises(ConfigError) as caught:
        await login(relay.url, ACCOUNT, PASSWORD, connector=manual(proxy, username, password))

    assert "invalid SOCKS5 proxy" in str(caught.value)
    assert password not in str(caught.value)

