"""``make demo``: an embedded relay, the demo desktop application and the agent.

Everything runs in this one process on loopback. The agent signs in to the
embedded relay with a demo account and keeps the token in memory only, so
the demo never touches the OS keyring. It prints what to run from the cloud
side, then runs until Ctrl-C or, with the window, until Quit.

By default the demo opens the desktop window, already signed in and
connected; ``--headless`` runs the agent without a window and logs instead.
The window keeps its settings in a demo folder, so the demo never changes
the person's own Deskbridge settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from cloud_stub.accounts import Accounts
from cloud_stub.relay import Exposure, Relay, RelayConfig

from .core.agent import Agent
from .core.auth import RelayTokens, login
from .core.config import AgentConfig, Target
from .core.credentials import MemoryStore
from .core.logs import configure_logging
from .core.paths import AppDirs, app_dirs
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


@dataclass
class DemoServices:
    """The embedded relay and demo application, and a sign-in kept in memory."""

    relay: Relay
    app_server: asyncio.Server
    app_port: int
    exposure: Exposure
    api_key: str = field(repr=False)
    password: str = field(repr=False)
    store: MemoryStore = field(repr=False)

    @property
    def config(self) -> AgentConfig:
        target = Target(DEMO_TARGET, "127.0.0.1", self.app_port)
        return AgentConfig(self.relay.url, DEMO_ACCOUNT, DEMO_DEVICE, {DEMO_TARGET: target})

    async def stop(self) -> None:
        await self.relay.stop()
        self.app_server.close()
        await self.app_server.wait_closed()


async def start_services(dirs: AppDirs) -> DemoServices:
    """Start the demo application and the relay on loopback and sign the demo account in."""
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
    return DemoServices(relay, app_server, app_port, exposure, api_key, password, store)


def instructions(services: DemoServices, agent_line: str, stop_line: str) -> str:
    """Return what to try from the cloud side, with this run's ports and API key."""
    relay = services.relay
    http = relay.url.replace("ws://", "http://")
    tcp_port = relay.expose_ports[services.exposure.name]
    api_key = services.api_key
    return f"""
Deskbridge demo is running: relay {relay.url}, demo desktop app on 127.0.0.1:{services.app_port},
{agent_line}

Try it from the "cloud" side, in another terminal:

  TCP port on the relay (type PING, QUOTE AAPL, SUBSCRIBE EURUSD, QUIT):
    nc 127.0.0.1 {tcp_port}      (or: telnet 127.0.0.1 {tcp_port})

  REST exchange (the reply starts with the greeting the app sends first):
    printf 'QUOTE AAPL\\n' | curl -s --data-binary @- -H 'Authorization: Bearer {api_key}' \\
      '{http}/v1/agents/{DEMO_ACCOUNT}/targets/{DEMO_TARGET}/exchange?until=idle&idle_ms=300'

  Connected agents:
    curl -s -H 'Authorization: Bearer {api_key}' {http}/v1/agents

  Raw WebSocket stream: {relay.url}/v1/agents/{DEMO_ACCOUNT}/targets/{DEMO_TARGET}/stream

{stop_line}
"""


async def run_demo(stop: asyncio.Event) -> None:
    """Run the demo without a window until ``stop`` is set."""
    dirs = app_dirs().create()
    services = await start_services(dirs)
    config = services.config
    agent = Agent(
        relay_url=config.relay_url,
        device=config.device,
        targets=config.targets,
        tokens=RelayTokens(config.relay_url, DEMO_ACCOUNT, services.store),
        traffic=LoggingSink(logging.getLogger("deskbridge.traffic")),
    )
    runner = asyncio.ensure_future(agent.run())
    await agent.wait_connected()

    agent_line = f"agent '{DEMO_DEVICE}' signed in as '{DEMO_ACCOUNT}' and connected."
    print(instructions(services, agent_line, "Press Ctrl-C to stop."), flush=True)
    await stop.wait()
    logger.info("stopping the demo")
    await agent.stop()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await services.stop()


def demo_gui_dirs(dirs: AppDirs) -> AppDirs:
    """Folders for the demo window: its own settings, the person's log folder."""
    root = dirs.data / "demo-window"
    return AppDirs(root / "config", root / "data", dirs.logs)


def run_demo_gui(log_level: str) -> int:
    """Open the window against the embedded relay and demo application, signed in and connected."""
    from .gui.controller import Preset
    from .gui.main import run_gui

    dirs = app_dirs().create()

    @contextlib.asynccontextmanager
    async def demo_preset() -> AsyncIterator[Preset]:
        services = await start_services(dirs)
        agent_line = f"and the Deskbridge window with agent '{DEMO_DEVICE}' signed in as '{DEMO_ACCOUNT}'."
        stop_line = "Quit from the window's File menu or its tray icon, or press Ctrl-C here, to stop."
        print(instructions(services, agent_line, stop_line), flush=True)
        try:
            yield Preset(services.config, services.store)
        finally:
            logger.info("stopping the demo")
            await services.stop()

    return run_gui(demo_gui_dirs(dirs), log_level=log_level, log_file="demo.log", preset_factory=demo_preset)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.demo", description="Run the relay, a demo desktop application and the agent together.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--headless", action="store_true", help="run the agent without a window and log what it does")
    args = parser.parse_args(argv)
    if not args.headless:
        return run_demo_gui(args.log_level)
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
