"""Command line of the desktop agent: ``deskbridge login``, ``logout`` and ``run``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import sys
from collections.abc import Sequence

from app import __version__

from .core.agent import Agent
from .core.auth import RelayTokens, login
from .core.config import AgentConfig, Target, load_config, save_config, validate_relay_url
from .core.credentials import KeyringStore
from .core.errors import ConfigError, CredentialError, DeskbridgeError, SignInError
from .core.logs import configure_logging
from .core.paths import app_dirs
from .core.traffic import LoggingSink

logger = logging.getLogger("deskbridge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deskbridge",
        description="Reach a desktop application's local socket API from the cloud through one outbound WebSocket.",
    )
    parser.add_argument("--version", action="version", version=f"deskbridge {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log detail (default INFO)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    login_cmd = commands.add_parser("login", help="sign in to a relay and keep the token in the OS keyring")
    login_cmd.add_argument("--relay", required=True, help="relay URL, ws://HOST:PORT or wss://HOST")
    login_cmd.add_argument("--username", required=True, help="account name on the relay")
    login_cmd.add_argument("--password-stdin", action="store_true", help="read the password from the first line of standard input")

    logout_cmd = commands.add_parser("logout", help="delete the saved sign-in token from the OS keyring")
    logout_cmd.add_argument("--relay", required=True, help="relay URL used at sign-in")
    logout_cmd.add_argument("--username", required=True, help="account name used at sign-in")

    run_cmd = commands.add_parser("run", help="connect to the relay and serve the targets")
    run_cmd.add_argument("--headless", action="store_true", help="run without a window, logging to stderr and the log file")
    run_cmd.add_argument("--relay", help="relay URL (saved in the config file)")
    run_cmd.add_argument("--username", help="account name (saved in the config file)")
    run_cmd.add_argument("--device", help="this device's name at the relay (default: the host name)")
    run_cmd.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="allow the cloud to reach HOST:PORT under NAME; repeat for more (saved in the config file)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    dirs = app_dirs().create()
    configure_logging(args.log_level, dirs.logs)
    try:
        if args.command == "login":
            return asyncio.run(_login(args))
        if args.command == "logout":
            return asyncio.run(_logout(args))
        return _run(args)
    except ConfigError as exc:
        print(f"deskbridge: {exc}", file=sys.stderr)
        return 2
    except (SignInError, CredentialError) as exc:
        print(f"deskbridge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _login(args: argparse.Namespace) -> int:
    relay = validate_relay_url(args.relay)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {args.username} at {relay}: ")
    if not password:
        raise ConfigError("the password is empty; type it at the prompt or pipe it with --password-stdin")
    store = KeyringStore()
    store.check_backend()
    try:
        tokens = await login(relay, args.username, password)
    except DeskbridgeError:
        raise
    except OSError as exc:
        print(f"deskbridge: cannot reach the relay at {relay}: {exc}", file=sys.stderr)
        return 1
    assert tokens.refresh_token is not None
    await store.set(relay, tokens.account, tokens.refresh_token)

    dirs = app_dirs()
    config = load_config(dirs.config)
    config.relay_url, config.account = relay, tokens.account
    save_config(dirs.config, config)
    print(f"Signed in to {relay} as {tokens.account}; the token is in the OS keyring.")
    return 0


async def _logout(args: argparse.Namespace) -> int:
    relay = validate_relay_url(args.relay)
    await KeyringStore().delete(relay, args.username)
    print(f"Signed out of {relay} as {args.username}; the saved token is deleted.")
    return 0


def _merge_run_options(args: argparse.Namespace, config: AgentConfig) -> bool:
    """Apply command-line values to the config; return whether anything changed."""
    changed = False
    if args.relay:
        config.relay_url = validate_relay_url(args.relay)
        changed = True
    if args.username:
        config.account = args.username
        changed = True
    if args.device:
        config.device = args.device
        changed = True
    if args.target:
        config.targets = {}
        for spec in args.target:
            target = Target.parse(spec)
            config.targets[target.name] = target
        changed = True
    return changed


def _run(args: argparse.Namespace) -> int:
    if not args.headless:
        print("deskbridge: this version has no window yet; use 'deskbridge run --headless'", file=sys.stderr)
        return 2
    dirs = app_dirs()
    config = load_config(dirs.config)
    if _merge_run_options(args, config):
        path = save_config(dirs.config, config)
        logger.info("settings saved to %s", path)
    if not config.relay_url:
        raise ConfigError("no relay URL: pass --relay ws://HOST:PORT or sign in first with 'deskbridge login'")
    if not config.account:
        raise ConfigError("no account: pass --username NAME or sign in first with 'deskbridge login'")
    if not config.targets:
        raise ConfigError("no targets: pass --target NAME=HOST:PORT, for example --target quotes=127.0.0.1:7497")
    return asyncio.run(run_headless(config))


async def run_headless(config: AgentConfig) -> int:
    """Run the agent until SIGINT or SIGTERM."""
    store = KeyringStore()
    agent = Agent(
        relay_url=config.relay_url,
        device=config.device,
        targets=config.targets,
        tokens=RelayTokens(config.relay_url, config.account, store),
        traffic=LoggingSink(logging.getLogger("deskbridge.traffic")),
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    targets = ", ".join(f"{t.name}={t.address}" for t in config.targets.values())
    logger.info("Deskbridge %s agent starting: relay %s, account %s, device %s, targets %s", __version__, config.relay_url, config.account, config.device, targets)
    runner = asyncio.ensure_future(agent.run())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([runner, stopper], return_when=asyncio.FIRST_COMPLETED)
    logger.info("shutting down")
    await agent.stop()
    runner.cancel()
    stopper.cancel()
    await asyncio.gather(runner, stopper, return_exceptions=True)
    logger.info("agent stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
