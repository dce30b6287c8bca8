"""Command line of the desktop agent: ``deskbridge login``, ``logout`` and ``run``.

``deskbridge run`` opens the window unless ``--headless`` is given, and so
does ``deskbridge`` without a command.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import sys
from collections.abc import Sequence

from app import __version__

from .core.agent import Agent, AgentState, AgentStatus
from .core.auth import CodeRequired, RelayTokens, Tokens, login, logout
from .core.config import (
    AgentConfig,
    Target,
    load_config,
    save_config,
    validate_device_name,
    validate_relay_url,
    validate_seconds,
)
from .core.credentials import CredentialStore, KeyringStore, MemoryStore, proxy_entry
from .core.errors import ConfigError, CredentialError, DeskbridgeError, HandshakeError, SignInError, describe_os_error
from .core.logs import configure_logging
from .core.net import Connector, connector_from_settings
from .core.paths import app_dirs
from .core.traffic import LoggingSink
from .selftest import MODES as SELF_TEST_MODES

logger = logging.getLogger("deskbridge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deskbridge",
        description="Reach a desktop application's local socket API from the cloud through one outbound WebSocket.",
    )
    parser.add_argument("--version", action="version", version=f"deskbridge {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log detail (default INFO)")
    parser.add_argument(
        "--self-test",
        nargs="?",
        const="all",
        choices=SELF_TEST_MODES,
        metavar="CHECK",
        help="check the Qt platform plugin, OS keyring, TLS certificates and a loopback relay round trip, "
        "print each result and exit 0 only if all pass; CHECK runs one of qt, keyring, tls, relay, "
        "or 'startup' to open the window, print when it is painted, and quit",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    login_cmd = commands.add_parser("login", help="sign in to a relay and keep the token in the OS keyring")
    login_cmd.add_argument("--relay", required=True, help="relay URL, ws://HOST:PORT or wss://HOST")
    login_cmd.add_argument("--username", required=True, help="account name on the relay")
    login_cmd.add_argument("--password-stdin", action="store_true", help="read the password (and a one-time code, if needed, from the second line) from standard input")
    login_cmd.add_argument("--code", help="one-time code from the authenticator app, for accounts that need one")

    logout_cmd = commands.add_parser("logout", help="delete the saved sign-in token from the OS keyring")
    logout_cmd.add_argument("--relay", help="relay URL used at sign-in (default: the one in the config file)")
    logout_cmd.add_argument("--username", help="account name used at sign-in (default: the one in the config file)")

    proxy_cmd = commands.add_parser("proxy-password", help="save the password of the configured proxy user in the OS keyring")
    proxy_cmd.add_argument("--password-stdin", action="store_true", help="read the password from the first line of standard input")

    run_cmd = commands.add_parser("run", help="connect to the relay and serve the targets")
    run_cmd.add_argument("--headless", action="store_true", help="run without a window, logging to stderr and the log file")
    run_cmd.add_argument("--minimized", action="store_true", help="start with the window hidden in the tray (where a tray exists)")
    run_cmd.add_argument("--relay", help="relay URL (saved in the config file)")
    run_cmd.add_argument("--username", help="account name (saved in the config file)")
    run_cmd.add_argument("--device", help="this device's name at the relay (default: the host name)")
    run_cmd.add_argument(
        "--allow-remote-target",
        action="append",
        default=[],
        metavar="NAME",
        help="let target NAME be on another computer (targets must be on this computer otherwise; saved)",
    )
    run_cmd.add_argument(
        "--proxy",
        metavar="system|none|URL",
        help="proxy for reaching the relay: the system settings (default), none, or http://HOST:PORT or socks5://HOST:PORT (saved)",
    )
    run_cmd.add_argument("--proxy-user", metavar="NAME", help="user name for a --proxy URL; set its password with 'deskbridge proxy-password' (saved)")
    run_cmd.add_argument("--ca-file", metavar="FILE", help="extra PEM CA certificates to trust for a wss:// relay, besides the OS trust store (saved)")
    run_cmd.add_argument("--pin-sha256", metavar="PIN", help="accept only this relay public key: SHA-256 of its SubjectPublicKeyInfo, base64 (saved)")
    run_cmd.add_argument("--ping-interval", type=float, metavar="SECONDS", help="heartbeat ping interval (default 15; saved in the config file)")
    run_cmd.add_argument("--ping-timeout", type=float, metavar="SECONDS", help="time a heartbeat pong may take before the link counts as lost (default 10; saved)")
    run_cmd.add_argument("--grace", type=float, metavar="SECONDS", help="how long open streams wait for a lost relay connection to come back (default 120; saved)")
    run_cmd.add_argument(
        "--password-stdin",
        action="store_true",
        help="sign in for this run only, reading the password (and a one-time code, if needed) from standard input; nothing is saved",
    )
    run_cmd.add_argument("--code", help="one-time code for --password-stdin, for accounts that need one")
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
    if args.self_test:
        from .selftest import run_self_test

        return run_self_test(args.self_test)
    if args.command is None:
        # Without a command, open the window, as a desktop launcher does.
        args = parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "run"])
    dirs = app_dirs().create()
    if args.command == "run" and not args.headless:
        try:
            return _run_gui(args)
        except ConfigError as exc:
            print(f"deskbridge: {exc}", file=sys.stderr)
            return 2
    configure_logging(args.log_level, dirs.logs)
    try:
        if args.command == "login":
            return _login_command(args)
        if args.command == "logout":
            return asyncio.run(_logout(args))
        if args.command == "proxy-password":
            return asyncio.run(_proxy_password(args))
        return _run(args)
    except ConfigError as exc:
        print(f"deskbridge: {exc}", file=sys.stderr)
        return 2
    except (SignInError, CredentialError) as exc:
        print(f"deskbridge: {exc}", file=sys.stderr)
        return 1
    except HandshakeError as exc:
        print(f"deskbridge: {exc}; try again later", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"deskbridge: cannot reach the relay: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except DeskbridgeError as exc:
        print(f"deskbridge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _read_secret(args: argparse.Namespace, prompt: str) -> str:
    """Read a secret from the next line of standard input or from a hidden prompt."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return getpass.getpass(prompt)


async def _sign_in(args: argparse.Namespace, relay: str, username: str, connector: Connector | None = None) -> Tokens:
    """Sign in with a password, asking for a one-time code if the account needs one.

    With --password-stdin the code, if needed, is the second line of standard
    input unless --code gives it.
    """
    password = _read_secret(args, f"Password for {username} at {relay}: ")
    if not password:
        raise ConfigError("the password is empty; type it at the prompt or pipe it with --password-stdin")
    code = args.code
    try:
        return await login(relay, username, password, code, connector=connector)
    except CodeRequired:
        if code:
            raise
    code = _read_secret(args, "One-time code from your authenticator app: ").strip()
    if not code:
        raise SignInError("this account needs a one-time code; pass --code or type it at the prompt")
    return await login(relay, username, password, code, connector=connector)


def _login_command(args: argparse.Namespace) -> int:
    """Run ``deskbridge login``; prompts happen outside the event loop, so Ctrl-C stops them at once."""
    relay = validate_relay_url(args.relay)
    # Check the keyring first, so a password is never typed in vain.
    KeyringStore().check_backend()
    password = _read_secret(args, f"Password for {args.username} at {relay}: ")
    if not password:
        raise ConfigError("the password is empty; type it at the prompt or pipe it with --password-stdin")
    code = args.code
    try:
        return asyncio.run(_login(args, relay, password, code))
    except CodeRequired:
        if code:
            raise
    code = _read_secret(args, "One-time code from your authenticator app: ").strip()
    if not code:
        raise SignInError("this account needs a one-time code; pass --code, or give it on the next line with --password-stdin")
    return asyncio.run(_login(args, relay, password, code))


async def _login(args: argparse.Namespace, relay: str, password: str, code: str | None) -> int:
    store = KeyringStore()
    try:
        connector = await make_connector(load_config(app_dirs().config))
        tokens = await login(relay, args.username, password, code, connector=connector)
    except (OSError, HandshakeError) as exc:
        reason = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        print(f"deskbridge: cannot sign in at {relay}: {reason}", file=sys.stderr)
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
    config = load_config(app_dirs().config)
    if not (args.relay or config.relay_url) or not (args.username or config.account):
        raise ConfigError("no sign-in is configured; pass --relay URL and --username NAME")
    relay = validate_relay_url(args.relay or config.relay_url)
    args.username = args.username or config.account
    store = KeyringStore()
    saved = await store.get(relay, args.username)
    if saved is None:
        print(f"Not signed in to {relay} as {args.username}; nothing to do.")
        return 0
    status = 0
    try:
        await logout(relay, saved, await make_connector(load_config(app_dirs().config)))
    except (OSError, HandshakeError, SignInError) as exc:
        print(f"deskbridge: the relay could not revoke the sign-in ({exc}); deleting the local token anyway", file=sys.stderr)
        status = 1
    await store.delete(relay, args.username)
    print(f"Signed out of {relay} as {args.username}; the saved token is deleted.")
    return status


def _merge_run_options(args: argparse.Namespace, config: AgentConfig) -> bool:
    """Apply command-line values to the config; return whether anything changed."""
    changed = False

    # Account and device.
    if args.relay:
        config.relay_url = validate_relay_url(args.relay)
        changed = True
    if args.username:
        config.account = args.username
        changed = True
    if args.device:
        config.device = validate_device_name(args.device)
        changed = True

    # Network: proxy, TLS, heartbeat and resumption.
    if args.proxy is not None:
        if args.proxy in ("system", "none"):
            config.proxy_mode, config.proxy_url = args.proxy, ""
        else:
            config.proxy_mode, config.proxy_url = "manual", args.proxy
        changed = True
    for name in ("proxy_user", "ca_file", "pin_sha256"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, "proxy_username" if name == "proxy_user" else name, value)
            changed = True
    for name in ("ping_interval", "ping_timeout", "grace"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, validate_seconds(value, f"--{name.replace('_', '-')}", allow_zero=name == "grace"))
            changed = True

    # Targets: the allowlist, local unless a remote one is confirmed.
    if args.target:
        config.targets = {}
        for spec in args.target:
            target = Target.parse(spec)
            config.targets[target.name] = target
        changed = True
    for name in args.allow_remote_target:
        existing = config.targets.get(name)
        if existing is None:
            raise ConfigError(f"--allow-remote-target names {name!r}, which is not a target; add it with --target {name}=HOST:PORT")
        config.targets[name] = Target.create(existing.name, existing.host, existing.port, allow_remote=True)
        changed = True

    for target in config.targets.values():
        if not target.allow_remote and not target.is_loopback_host:
            raise ConfigError(
                f"target {target.name!r} points to {target.host}, which is not this computer; "
                f"if the cloud may reach it, confirm with --allow-remote-target {target.name}"
            )
    return changed


def _run_gui(args: argparse.Namespace) -> int:
    """Open the window; options given on the command line are saved to the config first."""
    if args.password_stdin:
        raise ConfigError("--password-stdin works only with --headless; the window asks for the password itself")
    from .gui.main import run_gui

    dirs = app_dirs()
    config = load_config(dirs.config)
    if _merge_run_options(args, config):
        save_config(dirs.config, config)
    return run_gui(dirs, minimized=args.minimized, log_level=args.log_level)


def _run(args: argparse.Namespace) -> int:
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
    return asyncio.run(run_headless(config, args))


async def _credential_store(config: AgentConfig, args: argparse.Namespace, connector: Connector) -> CredentialStore:
    """Return the keyring, or a memory store signed in for this run only with --password-stdin."""
    if args.password_stdin:
        store = MemoryStore()
        tokens = await _sign_in(args, config.relay_url, config.account, connector)
        assert tokens.refresh_token is not None
        await store.set(config.relay_url, config.account, tokens.refresh_token)
        logger.info("signed in as %s for this run only; nothing was saved", config.account)
        return store
    keyring_store = KeyringStore()
    try:
        keyring_store.check_backend()
    except CredentialError as exc:
        raise CredentialError(f"{exc} To sign in for this run only, add --password-stdin.") from None
    return keyring_store


async def make_connector(config: AgentConfig) -> Connector:
    """Build the connector from the settings, with the proxy password from the OS keyring."""
    password = ""
    if config.proxy_mode == "manual" and config.proxy_username:
        password = await KeyringStore().get(proxy_entry(config.proxy_url), config.proxy_username) or ""
        if not password:
            logger.warning(
                "no password saved for proxy user %s; save one with 'deskbridge proxy-password'", config.proxy_username
            )
    return connector_from_settings(
        config.proxy_mode, config.proxy_url, config.proxy_username, password, config.ca_file, config.pin_sha256
    )


async def _proxy_password(args: argparse.Namespace) -> int:
    config = load_config(app_dirs().config)
    if config.proxy_mode != "manual" or not config.proxy_username:
        raise ConfigError("no proxy user is configured; run 'deskbridge run --proxy URL --proxy-user NAME' first")
    password = _read_secret(args, f"Password for proxy user {config.proxy_username} at {config.proxy_url}: ")
    if not password:
        raise ConfigError("the password is empty; type it at the prompt or pipe it with --password-stdin")
    await KeyringStore().set(proxy_entry(config.proxy_url), config.proxy_username, password)
    print(f"Saved the password of proxy user {config.proxy_username} in the OS keyring.")
    return 0


async def run_headless(config: AgentConfig, args: argparse.Namespace) -> int:
    """Run the agent until SIGINT or SIGTERM."""
    connector = await make_connector(config)
    store = await _credential_store(config, args, connector)
    stop = asyncio.Event()
    exit_code = 0

    def on_status(status: AgentStatus) -> None:
        nonlocal exit_code
        # A sign-in for this run only cannot come back once the relay
        # rejects it, so waiting would never end; exit for a supervisor instead.
        if status.state is AgentState.SIGNED_OUT and isinstance(store, MemoryStore):
            logger.error("the relay rejected this run's sign-in; start again with --password-stdin")
            exit_code = 1
            stop.set()

    agent = Agent(
        relay_url=config.relay_url,
        device=config.device,
        targets=config.targets,
        tokens=RelayTokens(config.relay_url, config.account, store, connector),
        traffic=LoggingSink(logging.getLogger("deskbridge.traffic")),
        connector=connector,
        ping_interval=config.ping_interval,
        ping_timeout=config.ping_timeout,
        grace=config.grace,
        on_status=on_status,
    )
    loop = asyncio.get_running_loop()
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
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
