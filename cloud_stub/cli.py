"""Command line of the relay: ``deskbridge-relay`` or ``python -m cloud_stub``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import platformdirs

from app import __version__
from app.core.errors import ConfigError
from app.core.logs import configure_logging

from .accounts import Accounts, PasswordHash
from .limits import add_limit_arguments, limits_from_args
from .signin import LOGIN_MAX_FAILURES, LOGIN_WINDOW_S
from .relay import GRACE_S, PING_INTERVAL_S, PING_TIMEOUT_S, Relay, RelayConfig, parse_exposures

logger = logging.getLogger("deskbridge.relay")

API_KEY_ENV = "DESKBRIDGE_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deskbridge-relay",
        description="Relay that Deskbridge agents connect to and cloud services reach desktop targets through.",
    )
    parser.add_argument("--version", action="version", version=f"deskbridge-relay {__version__}")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on for agents, REST and WebSocket clients (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port for agents, REST and WebSocket clients (default 8765; 0 picks a free one)")
    parser.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD", help="add an account; repeat for more")
    parser.add_argument(
        "--users-file",
        type=Path,
        metavar="FILE",
        help="JSON list of accounts: objects with name, password or password_hash, and optional totp_secret",
    )
    parser.add_argument(
        "--totp",
        action="append",
        default=[],
        metavar="NAME:BASE32SECRET",
        help="require a one-time code from an authenticator app for account NAME; repeat for more",
    )
    parser.add_argument("--hash-password", action="store_true", help="read a password from standard input, print its hash for --users-file, and exit")
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"API key that cloud services must send as 'Authorization: Bearer KEY'; repeat for more (also read from ${API_KEY_ENV})",
    )
    parser.add_argument(
        "--expose",
        action="append",
        default=[],
        metavar="ACCOUNT/TARGET=PORT",
        help="listen on TCP PORT and connect each client to TARGET of ACCOUNT's agent; also ACCOUNT/DEVICE/TARGET=HOST:PORT",
    )
    parser.add_argument("--expose-host", default="127.0.0.1", help="default address of --expose listeners (default 127.0.0.1)")
    parser.add_argument("--data-dir", type=Path, help="folder for the token signing key (default: the OS data folder)")
    parser.add_argument("--access-token-ttl", type=float, default=15 * 60, metavar="SECONDS", help="lifetime of access tokens (default 900)")
    parser.add_argument("--refresh-token-ttl", type=float, default=30 * 24 * 3600, metavar="SECONDS", help="lifetime of refresh tokens (default 30 days)")
    parser.add_argument("--login-max-failures", type=int, default=LOGIN_MAX_FAILURES, metavar="N", help=f"failed sign-ins per user name within --login-window before 429 (default {LOGIN_MAX_FAILURES}; per address 4 times that)")
    parser.add_argument("--login-window", type=float, default=LOGIN_WINDOW_S, metavar="SECONDS", help=f"window for counting failed sign-ins (default {LOGIN_WINDOW_S:.0f})")
    parser.add_argument("--ping-interval", type=float, default=PING_INTERVAL_S, metavar="SECONDS", help=f"heartbeat ping interval on agent connections (default {PING_INTERVAL_S:g})")
    parser.add_argument("--ping-timeout", type=float, default=PING_TIMEOUT_S, metavar="SECONDS", help=f"time a heartbeat pong may take before the connection counts as lost (default {PING_TIMEOUT_S:g})")
    parser.add_argument("--grace", type=float, default=GRACE_S, metavar="SECONDS", help=f"how long a lost agent's streams and cloud sockets wait for it to resume (default {GRACE_S:g})")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE", help="PEM certificate chain; with --tls-key, serve wss:// and https://")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    add_limit_arguments(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log detail (default INFO)")
    return parser


def config_from_args(args: argparse.Namespace) -> RelayConfig:
    accounts = Accounts()
    if args.users_file is not None:
        accounts.load_file(args.users_file)
    for spec in args.user:
        accounts.add_spec(spec)
    for spec in args.totp:
        accounts.add_totp_spec(spec)
    if args.ping_interval <= 0 or args.ping_timeout <= 0 or args.grace < 0:
        raise ConfigError("--ping-interval and --ping-timeout must be positive and --grace at least 0")
    if args.login_max_failures < 1 or args.login_window <= 0:
        raise ConfigError("--login-max-failures must be at least 1 and --login-window positive")
    api_keys = list(args.api_key)
    if os.environ.get(API_KEY_ENV):
        api_keys.append(os.environ[API_KEY_ENV])
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is outside 0 to 65535")
    if args.access_token_ttl <= 0 or args.refresh_token_ttl <= 0:
        raise ConfigError("token lifetimes must be positive numbers of seconds")
    data_dir = args.data_dir or Path(platformdirs.user_data_dir("Deskbridge Relay", appauthor=False))
    return RelayConfig(
        host=args.host,
        port=args.port,
        accounts=accounts,
        api_keys=api_keys,
        exposures=parse_exposures(args.expose, args.expose_host),
        data_dir=data_dir,
        access_ttl=args.access_token_ttl,
        refresh_ttl=args.refresh_token_ttl,
        login_max_failures=args.login_max_failures,
        login_window=args.login_window,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        grace=args.grace,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        **limits_from_args(args),
    )


async def serve(config: RelayConfig) -> None:
    relay = Relay(config)
    await relay.start()
    if not config.accounts.names:
        logger.warning("no accounts: agents cannot sign in; add one with --user NAME:PASSWORD")
    if not config.api_keys:
        logger.warning("no API keys: the REST API and WebSocket streams reject every request; add one with --api-key")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Tests and scripts read this line to learn the chosen port.
    print(f"relay ready on {relay.url}", flush=True)
    for name, port in relay.expose_ports.items():
        print(f"exposed {name} on port {port}", flush=True)
    await stop.wait()
    logger.info("shutting down")
    await relay.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hash_password:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            print("deskbridge-relay: --hash-password read an empty password from standard input", file=sys.stderr)
            return 2
        print(PasswordHash.create(password).encode())
        return 0
    configure_logging(args.log_level)
    try:
        config = config_from_args(args)
        asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"deskbridge-relay: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"deskbridge-relay: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
