"""Sign-in on the relay and the agent: codes, rate limits, rotation, renewal, sign-out."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pyotp
import pytest

from app.core import auth
from app.core.agent import AgentState
from app.core.errors import SignInError
from app.core.frames import CloseCode
from tests.conftest import ACCOUNT, API_KEY, PASSWORD

TOTP_SECRET = pyotp.random_base32()


def post(url: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


async def apost(url: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    return await asyncio.to_thread(post, url, payload)


async def test_login_wrong_password(start_relay):
    relay = await start_relay()
    status, body, _ = await apost(relay.http + "/v1/auth/login", {"username": ACCOUNT, "password": "nope"})
    assert status == 401
    assert body["error"] == "invalid_credentials"


async def test_login_unknown_user_same_error(start_relay):
    relay = await start_relay()
    status, body, _ = await apost(relay.http + "/v1/auth/login", {"username": "mallory", "password": "x"})
    assert status == 401
    assert body["error"] == "invalid_credentials"


@pytest.fixture
async def totp_relay(start_relay):
    relay = await start_relay()
    relay.config.accounts.set_totp(ACCOUNT, TOTP_SECRET)
    return relay


async def test_login_code_required(totp_relay):
    with pytest.raises(auth.CodeRequired, match="authenticator"):
        await auth.login(totp_relay.url, ACCOUNT, PASSWORD)


async def test_login_wrong_code(totp_relay):
    wrong = "000000" if pyotp.TOTP(TOTP_SECRET).now() != "000000" else "111111"
    status, body, _ = await apost(totp_relay.http + "/v1/auth/login", {"username": ACCOUNT, "password": PASSWORD, "code": wrong})
    assert status == 401
    assert body["error"] == "invalid_code"


async def test_login_code_works_once(totp_relay):
    code = pyotp.TOTP(TOTP_SECRET).now()
    tokens = await auth.login(totp_relay.url, ACCOUNT, PASSWORD, code)
    assert tokens.account == ACCOUNT
    with pytest.raises(SignInError, match="already used"):
        await auth.login(totp_relay.url, ACCOUNT, PASSWORD, code)


async def test_login_rate_limited(start_relay):
    relay = await start_relay(login_max_failures=3, login_window=60.0)
    url = relay.http + "/v1/auth/login"
    for _ in range(3):
        status, _body, _ = await apost(url, {"username": ACCOUNT, "password": "wrong"})
        assert status == 401
    status, body, headers = await apost(url, {"username": ACCOUNT, "password": PASSWORD})
    assert status == 429, "the right password must not bypass the limit"
    assert body["error"] == "too_many_attempts"
    assert 0 < int(headers["Retry-After"]) <= 60


async def test_refresh_rotates_token(start_relay):
    relay = await start_relay()
    first = await auth.login(relay.url, ACCOUNT, PASSWORD)
    assert first.refresh_token is not None
    second = await auth.refresh(relay.url, first.refresh_token)
    assert second.refresh_token not in (None, first.refresh_token)
    assert second.access_token != first.access_token


async def test_refresh_reuse_revokes_family(start_relay):
    relay = await start_relay()
    first = await auth.login(relay.url, ACCOUNT, PASSWORD)
    assert first.refresh_token is not None
    second = await auth.refresh(relay.url, first.refresh_token)
    assert second.refresh_token is not None
    third = await auth.refresh(relay.url, second.refresh_token)
    assert third.refresh_token is not None

    # The first token's successor was used, so this is not a retry but theft.
    with pytest.raises(SignInError, match="already used"):
        await auth.refresh(relay.url, first.refresh_token)
    with pytest.raises(SignInError, match="revoked"):
        await auth.refresh(relay.url, third.refresh_token)


async def test_refresh_retry_replaces_successor(start_relay):
    relay = await start_relay()
    first = await auth.login(relay.url, ACCOUNT, PASSWORD)
    assert first.refresh_token is not None
    lost = await auth.refresh(relay.url, first.refresh_token)
    assert lost.refresh_token is not None

    # The response carrying "lost" never arrived; the client retries.
    retried = await auth.refresh(relay.url, first.refresh_token)
    assert retried.refresh_token is not None
    assert retried.refresh_token != lost.refresh_token

    with pytest.raises(SignInError, match="unknown"):
        await auth.refresh(relay.url, lost.refresh_token)
    renewed = await auth.refresh(relay.url, retried.refresh_token)
    assert renewed.account == ACCOUNT


async def test_logout_revokes_and_disconnects(start_relay, start_agent, echo_port):
    relay = await start_relay()
    handle = await start_agent(relay.url, {"echo": ("127.0.0.1", echo_port)})
    saved = await handle.store.get(relay.url, ACCOUNT)
    assert saved is not None

    await auth.logout(relay.url, saved)

    async def signed_out() -> None:
        while handle.agent.status.state is not AgentState.SIGNED_OUT:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(signed_out(), 10)
    with pytest.raises(SignInError):
        await auth.refresh(relay.url, saved)


async def test_signed_out_close_code(start_relay, start_agent, echo_port):
    relay = await start_relay()
    handle = await start_agent(relay.url, {"echo": ("127.0.0.1", echo_port)})
    link = handle.agent.tunnel.link
    saved = await handle.store.get(relay.url, ACCOUNT)
    await auth.logout(relay.url, saved)
    await asyncio.wait_for(asyncio.shield(link.closed), 10)
    assert link.close_code == CloseCode.SIGNED_OUT


async def start_slow_sink() -> tuple[asyncio.Server, int, asyncio.Future[str]]:
    """A desktop app that reads at about 6 MB/s, then sends back the SHA-256 of what it read."""
    loop = asyncio.get_running_loop()
    digest: asyncio.Future[str] = loop.create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sha = hashlib.sha256()
        while chunk := await reader.read(65536):
            sha.update(chunk)
            await asyncio.sleep(0.01)
        writer.write(sha.hexdigest().encode())
        await writer.drain()
        writer.close()
        if not digest.done():
            digest.set_result(sha.hexdigest())

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], digest


async def test_transfer_spans_token_renewals(start_relay, start_agent):
    relay = await start_relay(expose=("sink",), access_ttl=2.0)
    server, port, _digest = await start_slow_sink()
    handle = await start_agent(relay.url, {"sink": ("127.0.0.1", port)}, record=True)
    sessions_before = handle.agent.sessions_started

    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port_of("sink"))
    sent = hashlib.sha256()
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    for index in range(800):  # 50 MiB
        chunk = bytes([index % 251]) + block[1:]
        sent.update(chunk)
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    server.close()

    assert reply.decode() == sent.hexdigest()
    assert handle.agent.token_renewals >= 3, "the transfer should span several renewals"
    assert handle.agent.sessions_started == sessions_before, "the session must survive every renewal"
    errors = [r for r in handle.traffic.records if r.kind.value == "error"]
    assert errors == []


class RefreshFaultProxy:
    """A TCP proxy in front of the relay that fails the first N refresh calls with 502."""

    def __init__(self, upstream_port: int, failures: int) -> None:
        self.upstream_port = upstream_port
        self.failures_left = failures
        self.refresh_calls = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        if head.startswith(b"POST /v1/auth/refresh"):
            self.refresh_calls += 1
            if self.failures_left > 0:
                self.failures_left -= 1
                body = b'{"error": "bad_gateway", "message": "upstream unavailable"}'
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
                await writer.drain()
                writer.close()
                return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        up_writer.write(head)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                dst.write_eof()
            except (ConnectionError, OSError):
                pass

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        writer.close()
        up_writer.close()


@pytest.fixture
async def fault_proxy() -> AsyncIterator[list[RefreshFaultProxy]]:
    proxies: list[RefreshFaultProxy] = []
    yield proxies
    for proxy in proxies:
        if proxy.server is not None:
            proxy.server.close()


async def test_refresh_recovers_after_502(start_relay, start_agent, echo_port, fault_proxy):
    relay = await start_relay(expose=("echo",), access_ttl=3.0)
    proxy = RefreshFaultProxy(relay.relay.port, failures=0)
    fault_proxy.append(proxy)
    proxy_port = await proxy.start()
    handle = await start_agent(f"ws://127.0.0.1:{proxy_port}", {"echo": ("127.0.0.1", echo_port)})
    sessions = handle.agent.sessions_started
    renewals = handle.agent.token_renewals
    calls = proxy.refresh_calls
    proxy.failures_left = 2

    async def renewed() -> None:
        while handle.agent.token_renewals == renewals:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(renewed(), 20)
    assert proxy.refresh_calls - calls == 3, "two 502 answers, then the successful call"
    assert handle.agent.sessions_started == sessions, "the session stays up while retrying"
    assert handle.agent.status.state is AgentState.CONNECTED


async def test_secrets_stay_out_of_logs(start_relay, start_agent, echo_port, caplog, deskbridge_home):
    caplog.set_level(logging.DEBUG)
    relay = await start_relay(expose=("echo",), access_ttl=2.0)
    handle = await start_agent(relay.url, {"echo": ("127.0.0.1", echo_port)})
    tokens = await handle.agent.tokens.access_token()

    async def renewed() -> None:
        while handle.agent.token_renewals < 1:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(renewed(), 10)
    refresh = await handle.store.get(relay.url, ACCOUNT)
    secrets = [PASSWORD, API_KEY, tokens.access_token, tokens.refresh_token, refresh]
    texts = [caplog.text, repr(tokens), repr(handle.agent), repr(handle.agent.tokens), repr(handle.store), repr(relay.config)]
    for path in deskbridge_home.rglob("*"):
        if path.is_file():
            texts.append(path.read_text(errors="replace"))
    for secret in secrets:
        assert secret
        for text in texts:
            assert secret not in text
