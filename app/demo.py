"""``make demo``: an embedded relay, the demo desktop application and the agent.

Everything runs in this one process on loopback. The agent signs in to the
embedded relay with a demo account and keeps the token in memory only, so
the demo never touches the OS keyring. It prints what to run from the cloud
side, then runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import socket
import sys
from collections.abc import Sequence

from cloud_stub.accounts import Accounts
from cloud_stub.relay import Exposure, Relay, RelayConfig

from .core.agent import Agent
from .core.auth import RelayTokens, login
from .core.config import Target
from .core.credentials import MemoryStore
from .core.logs import configure_logging
from .core.paths import app_dirs
from .core.traffic import LoggingSink
from .demo_app import start_demo_app

logger = logging.getLogger("deskbridge.demo")

DEMO_ACCOUNT = "demo"
DEMO_DEVICE = "demo-desktop"
DEMO_TARGET = "quotes"
PREFERRED_PORTS = {"relay": 8765, "app": 7497, "expose": 7001}


def free_port(preferred: int) -> int:
    """Return ``preferred`` if it is free on 127.0.0.1, else 0 to let the OS pick."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            return 0
    return preferred


async def run_demo(stop: asyncio.Event) -> None:
    dirs = app_dirs().create()
    password = secrets.token_urlsafe(12)
    api_key = "demo-" + secrets.token_urlsafe(12)

    app_server = await start_demo_app("127.0.0.1", free_port(PREFERRED_PORTS["app"]))
    app_port = app_server.sockets[0].getsockname()[1]

    accounts = Accounts()
    accounts.add(DEMO_ACCOUNT, password)
    exposure = Exposure(DEMO_ACCOUNT, None, DEMO_TARGET, "127.0.0.1", free_port(PREFERRED_PORTS["expose"]))
    relay = Relay(
        RelayConfig(
            port=free_port(PREFERRED_PORTS["relay"]),
            accounts=accounts,
            api_keys=[api_key],
            exposures=[exposure],
            data_dir=dirs.data / "demo-relay",
        )
    )
    await relay.start()

    store = MemoryStore()
    tokens = await login(relay.url, DEMO_ACCOUNT, password)
    assert tokens.refresh_token is not None
    await store.set(relay.url, DEMO_ACCOUNT, tokens.refresh_token)
    agent = Agent(
        relay_url=relay.url,
        device=DEMO_DEVICE,
        targets={DEMO_TARGET: Target(DEMO_TARGET, "127.0.0.1", app_port)},
        tokens=RelayTokens(relay.url, DEMO_ACCOUNT, store),
        traffic=LoggingSink(logging.getLogger("deskbridge.traffic")),
    )
    runner = asyncio.ensure_future(agent.run())
    await agent.wait_connected()

    http = relay.url.replace("ws://", "http://")
    tcp_port = relay.expose_ports[exposure.name]
    print(
        f"""
Deskbridge demo is running: relay {relay.url}, demo desktop app on 127.0.0.1:{app_port},
agent '{DEMO_DEVICE}' signed in as '{DEMO_ACCOUNT}' and connected.

Try it from the "cloud" side, in another terminal:

  TCP port on the relay (type PING, QUOTE AAPL, SUBSCRIBE EURUSD, QUIT):
    nc 127.0.0.1 {tcp_port}      (or: telnet 127.0.0.1 {tcp_port})

  REST exchange (the reply starts with the greeting the app sends first):
    printf 'QUOTE AAPL\\n' | curl -s --data-binary @- -H 'Authorization: Bearer {api_key}' \\
      '{http}/v1/agents/{DEMO_ACCOUNT}/targets/{DEMO_TARGET}/exchange?until=idle&idle_ms=300'

  Connected agents:
    curl -s -H 'Authorization: Bearer {api_key}' {http}/v1/agents

  Raw WebSocket stream: {relay.url}/v1/agents/{DEMO_ACCOUNT}/targets/{DEMO_TARGET}/stream

Press Ctrl-C to stop.
""",
        flush=True,
    )
    await stop.wait()
    logger.info("stopping the demo")
    await agent.stop()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await relay.stop()
    app_server.close()
    await app_server.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.demo", description="Run the relay, a demo desktop application and the agent together.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    configure_logging(args.log_level, app_dirs().create().logs, "demo.log")

    async def main_async() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_demo(stop)

    asyncio.run(main_async())
    return 0


if __name__ == "__main__":
    sys.exit(main())
