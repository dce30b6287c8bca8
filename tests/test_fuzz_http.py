"""Property tests of the relay's HTTP front: random requests over real sockets.

Hypothesis draws methods, paths, query strings, headers and bodies, sends
each request over a new loopback connection to an in-process relay, and
checks that the relay sends a valid HTTP response that is not a server
fault, or closes the connection for bytes that are not HTTP. The relay runs
with an agent and an echo target on an event loop in a background thread, so
the tests themselves stay synchronous, as Hypothesis needs.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.core.agent import Agent
from app.core.auth import RelayTokens, login
from app.core.backoff import Backoff
from app.core.config import Target
from app.core.credentials import MemoryStore
from cloud_stub.accounts import Accounts
from cloud_stub.relay import Relay, RelayConfig
from conftest import ACCOUNT, API_KEY, DEVICE, PASSWORD, start_echo_server

HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0
REPLY_TIMEOUT_S = 15.0
EXAMPLES = 200

# 5xx statuses the relay uses for a target or agent it cannot reach, with
# their error codes (docs/openapi.yaml). Any other 5xx is a relay fault.
UPSTREAM_ERRORS = {
    502: {"target_refused", "target_unreachable", "target_closed", "stream_reset", "reply_too_large"},
    503: {"agent_offline"},
    504: {"timed_out"},
}
# 5xx statuses for requests the relay cannot parse: a transfer coding other
# than chunked gets 501 (RFC 9112, section 6.1).
PROTOCOL_ERRORS = {501: {"not_implemented"}}


class RelayThread:
    """A relay, an echo server and a connected agent on an event loop in a thread."""

    def __init__(self, data_dir: Path, **overrides: Any) -> None:
        self._data_dir = data_dir
        self._overrides = overrides
        self.loop = asyncio.new_event_loop()
        self.relay: Relay | None = None
        self.port = 0
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="relay thread", daemon=True)

    def __repr__(self) -> str:
        return f"<RelayThread port={self.port}>"

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise AssertionError(f"the relay thread was not ready within {START_TIMEOUT_S:g} s")
        if self._failure is not None:
            raise AssertionError(f"the relay thread failed to start: {self._failure!r}")

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT_S)
        if self._thread.is_alive():
            raise AssertionError(f"the relay thread did not stop within {START_TIMEOUT_S:g} s")

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = REPLY_TIMEOUT_S) -> Any:
        """Run ``coroutine`` on the relay's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        echo, echo_port = await start_echo_server()
        agent: Agent | None = None
        agent_task: asyncio.Task[None] | None = None
        try:
            accounts = Accounts()
            accounts.add(ACCOUNT, PASSWORD)
            config = RelayConfig(port=0, accounts=accounts, api_keys=[API_KEY], data_dir=self._data_dir)
            for key, value in self._overrides.items():
                setattr(config, key, value)
            self.relay = Relay(config)
            await self.relay.start()
            self.port = self.relay.port
            store = MemoryStore()
            tokens = await login(self.relay.url, ACCOUNT, PASSWORD)
            assert tokens.refresh_token is not None
            await store.set(self.relay.url, ACCOUNT, tokens.refresh_token)
            agent = Agent(
                relay_url=self.relay.url,
                device=DEVICE,
                # "quotes" is the target name in docs/openapi.yaml's examples.
                targets={name: Target(name, HOST, echo_port) for name in ("echo", "quotes")},
                tokens=RelayTokens(self.relay.url, ACCOUNT, store),
                backoff=Backoff(base=0.05, cap=0.5),
            )
            agent_task = asyncio.ensure_future(agent.run())
            await asyncio.wait_for(agent.wait_connected(), START_TIMEOUT_S)
        except BaseException as exc:
            self._failure = exc
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            if agent is not None:
                await agent.stop()
            if agent_task is not None:
                agent_task.cancel()
                await asyncio.gather(agent_task, return_exceptions=True)
            if self.relay is not None:
                await self.relay.stop()
            echo.close()
            await echo.wait_closed()


@pytest.fixture(scope="module")
def relay_thread(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayThread]:
    # Hypothesis opens hundreds of connections from 127.0.0.1 in seconds,
    # so the per-address connection rate limit is off here; test_hardening
    # checks it.
    thread = RelayThread(tmp_path_factory.mktemp("relay-data"), max_connections_per_minute=0, header_timeout=2.0)
    thread.start()
    yield thread
    thread.stop()


# Raw HTTP over blocking sockets ----------------------------------------------


@dataclass(frozen=True)
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes


STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [^\r\n]*")


def exchange_bytes(port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, and return everything the relay sends until it closes."""
    with socket.create_connection((HOST, port), timeout=REPLY_TIMEOUT_S) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            # The relay may reject and close before all of a large request is sent.
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def parse_reply(raw: bytes, *, head_request: bool) -> RawReply:
    """Parse one HTTP/1.1 response and fail with the raw bytes if it is invalid."""
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete response head in {raw[:300]!r}"
    status_line, *lines = head.split(b"\r\n")
    match = STATUS_LINE.fullmatch(status_line)
    assert match is not None, f"invalid status line {status_line!r}"
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        assert colon, f"header line without a colon: {line!r}"
        assert name, f"header line without a name: {line!r}"
        assert name.strip() == name, f"header name with whitespace: {line!r}"
        headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    assert "content-length" in headers, f"response without Content-Length: {head!r}"
    length = int(headers["content-length"])
    expected = 0 if head_request else length
    assert len(body) == expected, f"Content-Length {length}, but {len(body)} body bytes followed: {raw[:300]!r}"
    return RawReply(int(match.group(1)), headers, body)


def check_reply(reply: RawReply) -> None:
    """Assert the relay's contract: no server fault, and JSON errors with error and message."""
    error_code: str | None = None
    if reply.headers.get("content-type") == "application/json" and reply.body:
        payload = json.loads(reply.body.decode("utf-8"))
        if reply.status >= 400:
            assert isinstance(payload, dict), f"error body is not an object: {payload!r}"
            assert isinstance(payload.get("error"), str), f"error body without a string 'error': {payload!r}"
            assert isinstance(payload.get("message"), str), f"error body without a string 'message': {payload!r}"
            error_code = payload["error"]
    if reply.status >= 500:
        allowed = UPSTREAM_ERRORS.get(reply.status, set()) | PROTOCOL_ERRORS.get(reply.status, set())
        assert error_code in allowed, f"server fault {reply.status} {error_code!r}: {reply.body[:300]!r}"


def check_serving(relay: RelayThread) -> None:
    """Assert that the relay still passes a health check and carries an exchange to the agent."""
    health = parse_reply(exchange_bytes(relay.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"), head_request=False)
    assert health.status == 200, f"health check answered {health.status}"
    body = b"still here\n"
    request = (
        f"POST /v1/agents/{ACCOUNT}/targets/echo/exchange HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    echoed = parse_reply(exchange_bytes(relay.port, request), head_request=False)
    assert echoed.status == 200, f"exchange answered {echoed.status}: {echoed.body!r}"
    assert echoed.body == body, f"exchange returned {echoed.body!r}"


# Strategies ------------------------------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Visible ASCII, space and tab, and obs-text (0x80-0xFF: invalid UTF-8 on its own).
VALUE_BYTES = [b for b in range(0x20, 0x7F)] + [0x09] + list(range(0x80, 0x100))

methods = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE"]),
    st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12),
)
segments = st.one_of(
    st.text(max_size=20).map(lambda text: quote(text, safe="")),
    st.text(alphabet="abc%2F.-_~", max_size=12),
)
accounts = st.one_of(st.just(ACCOUNT), segments)
targets = st.one_of(st.sampled_from(["echo", "missing"]), segments)


@st.composite
def paths(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["health", "auth", "agents", "exchange", "stream", "agent", "other"]))
    if kind == "health":
        return "/healthz"
    if kind == "auth":
        return "/v1/auth/" + draw(st.sampled_from(["login", "refresh", "logout", "other"]))
    if kind == "agents":
        return "/v1/agents"
    if kind in ("exchange", "stream"):
        return f"/v1/agents/{draw(accounts)}/targets/{draw(targets)}/{kind}"
    if kind == "agent":
        return "/v1/agent"
    return "/" + "/".join(draw(st.lists(segments, max_size=4)))


query_values = st.one_of(
    st.sampled_from(["newline", "bytes", "idle", "eof", "", "0", "-1", "1e3", "99999999999999999999"]),
    st.integers(min_value=-10, max_value=20_000_000).map(str),
    st.text(max_size=12),
)


@st.composite
def queries(draw: st.DrawFn) -> str:
    """Draw a query string; timeout_ms stays at most 1.5 s so no exchange waits long."""
    keys = st.one_of(st.sampled_from(["until", "bytes", "idle_ms", "device"]), st.text(max_size=8))
    pairs = draw(st.lists(st.tuples(keys, query_values), max_size=5))
    if draw(st.booleans()):
        pairs.append(("timeout_ms", draw(st.one_of(st.integers(min_value=-5, max_value=1500).map(str), st.text(max_size=6)))))
    else:
        pairs.append(("timeout_ms", "1000"))
    return urlencode(pairs)


header_names = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=20)
header_values = st.lists(st.sampled_from(VALUE_BYTES), max_size=60).map(bytes).map(lambda value: value.strip(b" \t"))
special_headers = st.sampled_from([
    (b"Authorization", f"Bearer {API_KEY}".encode()),
    (b"Authorization", b"Bearer wrong-key"),
    (b"Authorization", b"Basic YWxpY2U6cGFzc3dvcmQ="),
    (b"Authorization", b"Bearer \xff\xfe"),
    (b"X-Api-Key", API_KEY.encode()),
    (b"Content-Type", b"application/json"),
    (b"Content-Type", b"application/octet-stream"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Version", b"13"),
    (b"Deskbridge-Device", b"\xc3\x28 bad utf-8"),
    (b"Expect", b"100-continue"),
])
headers = st.lists(st.one_of(st.tuples(header_names.map(str.encode), header_values), special_headers), max_size=8)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=2048),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries(
        {"username": st.one_of(st.just(ACCOUNT), st.text(max_size=10)), "password": st.one_of(st.text(max_size=10), st.integers())},
        optional={"code": st.one_of(st.text(max_size=8), st.integers()), "refresh_token": st.text(max_size=20)},
    ).map(lambda value: json.dumps(value).encode()),
    st.integers(min_value=1, max_value=5000).map(lambda depth: b"[" * depth + b"]" * depth),
)


# Properties ------------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=methods, path=paths(), query=queries(), extra=headers, body=bodies)
def test_requests_answered(relay_thread: RelayThread, method: str, path: str, query: str, extra: list[tuple[bytes, bytes]], body: bytes) -> None:
    lines = [f"{method} {path}?{query} HTTP/1.1".encode(), f"Host: {HOST}:{relay_thread.port}".encode()]
    lines += [name + b": " + value for name, value in extra]
    lines += [f"Content-Length: {len(body)}".encode(), b"Connection: close"]
    raw = exchange_bytes(relay_thread.port, b"\r\n".join(lines) + b"\r\n\r\n" + body)

    # Only a request that is invalid at the HTTP level (for example a
    # duplicate Content-Length from the drawn headers) may get an h11 400;
    # every request gets some response.
    assert raw, f"the relay closed without a response to {lines[0]!r}"
    reply = parse_reply(raw, head_request=method == "HEAD")
    check_reply(reply)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.one_of(
    st.binary(max_size=4096),
    st.binary(max_size=512).map(lambda noise: b"GET / HTTP/1.1\r\n" + noise),
    st.binary(max_size=512).map(lambda noise: b"POST /v1/auth/login HTTP/1.1\r\nContent-Length: 5\r\n" + noise),
))
def test_garbage_answered_or_closed(relay_thread: RelayThread, data: bytes) -> None:
    raw = exchange_bytes(relay_thread.port, data)
    if raw:
        reply = parse_reply(raw, head_request=False)
        check_reply(reply)


def test_serving_after_fuzzing(relay_thread: RelayThread) -> None:
    # Runs after the properties above in file order, on the same relay.
    check_serving(relay_thread)
    assert relay_thread.relay is not None
    agents = relay_thread.relay.agents
    assert len(agents) == 1, f"the relay lists {len(agents)} agents after fuzzing"
