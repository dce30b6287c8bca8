"""Limits that keep hostile or broken clients from exhausting the relay.

The defaults here are the documented defaults of the ``deskbridge-relay``
flags (see docs/relay.md). This module also contains the per-address
connection rate limiter, the count of unauthenticated connections and a log
throttle, so that a flood is logged a few times rather than once per connection.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.core import frames
from app.core.errors import ConfigError

KIB = 1024
MIB = 1024 * 1024

# Streams open or waiting to open for one agent, over all cloud clients.
DEFAULT_MAX_STREAMS_PER_AGENT = 1000
# Resend log (sent, unacknowledged frames) of one agent session, and the write
# buffer of its connection.
DEFAULT_MAX_AGENT_BUFFER = 64 * MIB
# Agents may send messages slightly above the protocol's limit so that the
# tunnel parser, not the WebSocket layer, reports them with a clear reason.
DEFAULT_MAX_AGENT_MESSAGE = 4 * frames.MAX_MESSAGE_SIZE
DEFAULT_MAX_STREAM_MESSAGE = 1 * MIB
DEFAULT_MAX_HEADER_BYTES = 16 * KIB
DEFAULT_MAX_BODY_BYTES = 1 * MIB
DEFAULT_MAX_EXCHANGE_REPLY = 16 * MIB
DEFAULT_MAX_CONNECTIONS_PER_MINUTE = 1200
DEFAULT_MAX_PENDING_CONNECTIONS = 256
# A client must send a request head, and then its body, within this time; an
# idle keep-alive connection is closed after it too.
DEFAULT_HEADER_TIMEOUT_S = 10.0
# A client that reads none of a pending response for this long is dropped.
DEFAULT_SEND_TIMEOUT_S = 30.0

# Client addresses the rate limiter tracks at once; the least recently seen go first.
MAX_TRACKED_ADDRESSES = 10_000
# Seconds between two log lines about the same kind of rejection.
LOG_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class Rejection:
    """HTTP error that rejects a new connection, with its Retry-After in seconds."""

    status: int
    code: str
    message: str
    retry_after: int


class ConnectionRateLimiter:
    """Token bucket per client address: ``per_minute`` connections, refilled evenly.

    A new address starts with a full bucket, so it may open ``per_minute``
    connections at once and then one every ``60 / per_minute`` seconds.
    A ``per_minute`` of 0 turns the limit off.
    """

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        # address -> (tokens, time of the last update)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __repr__(self) -> str:
        return f"<ConnectionRateLimiter {self.per_minute}/min addresses={len(self._buckets)}>"

    def acquire(self, address: str) -> float:
        """Take a token for ``address``; return 0 on success, or the seconds until one is free."""
        if self.per_minute <= 0:
            return 0.0
        now = self._clock()
        rate = self.per_minute / 60.0
        tokens, updated = self._buckets.pop(address, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - updated) * rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / rate
        self._buckets[address] = (tokens, now)
        while len(self._buckets) > MAX_TRACKED_ADDRESSES:
            self._buckets.popitem(last=False)
        return wait


class PendingConnections:
    """Counts connections that have not yet authenticated, up to ``limit`` (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def __repr__(self) -> str:
        return f"<PendingConnections {self.count}/{self.limit}>"

    def try_acquire(self) -> bool:
        if self.limit > 0 and self.count >= self.limit:
            return False
        self.count += 1
        return True

    def release(self) -> None:
        self.count -= 1


class ConnectionGate:
    """Admits new connections: the per-address rate, then the pending-connection cap."""

    def __init__(self, rate: ConnectionRateLimiter, pending: PendingConnections | None, log: "LogThrottle") -> None:
        self.rate = rate
        self.pending = pending
        self._log = log

    def __repr__(self) -> str:
        return f"<ConnectionGate {self.rate!r} {self.pending!r}>"

    def admit(self, address: str, listener: str) -> Rejection | None:
        """Return None and count the connection as pending, or the reason to reject it."""
        wait = self.rate.acquire(address)
        if wait > 0:
            self._log.warning(
                ("rate", listener),
                "rejected a connection from %s on %s: more than %d connections per minute from that address",
                address, listener, self.rate.per_minute,
            )
            seconds = max(1, math.ceil(wait))
            return Rejection(
                429,
                "too_many_connections",
                f"more than {self.rate.per_minute} connections per minute from {address}; try again in {seconds} s",
                seconds,
            )
        if self.pending is not None and not self.pending.try_acquire():
            self._log.warning(
                ("pending", listener),
                "rejected a connection from %s on %s: %d connections have not authenticated yet, the limit",
                address, listener, self.pending.limit,
            )
            return Rejection(
                503,
                "too_many_pending_connections",
                f"the relay is serving {self.pending.limit} connections that have not authenticated yet; try again shortly",
                1,
            )
        return None

    def release(self) -> None:
        """End the pending state of an admitted connection: it authenticated or closed."""
        if self.pending is not None:
            self.pending.release()


class LogThrottle:
    """Logs a repeated event at most once per ``interval`` seconds per key.

    The next line logged for a key reports how many were skipped since the last one.
    """

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL_S, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        # key -> (time of the last line, events skipped since)
        self._state: dict[object, tuple[float, int]] = {}

    def __repr__(self) -> str:
        return f"<LogThrottle every {self._interval:g} s keys={len(self._state)}>"

    def warning(self, key: object, message: str, *args: object) -> None:
        now = self._clock()
        last, skipped = self._state.get(key, (-math.inf, 0))
        if now - last < self._interval:
            self._state[key] = (last, skipped + 1)
            return
        if len(self._state) >= MAX_TRACKED_ADDRESSES:
            self._state.clear()
        self._state[key] = (now, 0)
        if skipped:
            message += " (%d more like this in the last %.0f s)"
            args = (*args, skipped, now - last)
        self._logger.warning(message, *args)


# Command line ---------------------------------------------------------------

# (flag, RelayConfig field, type, default, smallest valid value, metavar, help)
_FLAGS: list[tuple[str, str, type, float, float, str, str]] = [
    ("--max-streams-per-agent", "max_streams_per_agent", int, DEFAULT_MAX_STREAMS_PER_AGENT, 1, "N",
     "streams open or opening at once for one agent; beyond it REST calls get 429, WebSockets a 429 handshake "
     "and exposed-port connections are closed"),
    ("--max-buffered-bytes-per-agent", "max_agent_buffer", int, DEFAULT_MAX_AGENT_BUFFER, 1 * MIB, "BYTES",
     "unacknowledged tunnel data the relay holds for one agent session, and unread bytes on its connection; "
     "beyond it the session is closed"),
    ("--max-agent-message", "max_agent_message", int, DEFAULT_MAX_AGENT_MESSAGE, frames.MAX_MESSAGE_SIZE, "BYTES",
     "largest WebSocket message from an agent; a larger one closes the session with code 1009"),
    ("--max-stream-message", "max_stream_message", int, DEFAULT_MAX_STREAM_MESSAGE, 1 * KIB, "BYTES",
     "largest WebSocket message on a cloud stream; a larger one closes that WebSocket with code 1009"),
    ("--max-header-bytes", "max_header_bytes", int, DEFAULT_MAX_HEADER_BYTES, 1 * KIB, "BYTES",
     "largest HTTP request line plus headers; a larger one gets 431"),
    ("--max-body-bytes", "max_body_bytes", int, DEFAULT_MAX_BODY_BYTES, 1 * KIB, "BYTES",
     "largest HTTP request body; a larger one gets 413"),
    ("--max-exchange-reply", "max_exchange_reply", int, DEFAULT_MAX_EXCHANGE_REPLY, 1, "BYTES",
     "largest reply the exchange call collects; a larger one gets 502 reply_too_large"),
    ("--max-connections-per-minute", "max_connections_per_minute", int, DEFAULT_MAX_CONNECTIONS_PER_MINUTE, 0, "N",
     "new connections per client address per minute over all ports, as a token bucket; beyond it HTTP gets 429 "
     "and exposed ports close at once; 0 turns the limit off"),
    ("--max-pending-connections", "max_pending_connections", int, DEFAULT_MAX_PENDING_CONNECTIONS, 0, "N",
     "HTTP connections that have not authenticated yet; beyond it new ones get 503; 0 turns the limit off"),
    ("--header-timeout", "header_timeout", float, DEFAULT_HEADER_TIMEOUT_S, 0, "SECONDS",
     "time a client has to send a request head and then its body, and the idle time of a keep-alive connection"),
    ("--send-timeout", "send_timeout", float, DEFAULT_SEND_TIMEOUT_S, 0, "SECONDS",
     "time an HTTP client may read none of a pending response before it is dropped"),
]


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every limit above, in an argument group of its own."""
    group = parser.add_argument_group("limits", "limits against hostile clients; docs/relay.md describes each")
    for flag, field_name, kind, default, _low, metavar, text in _FLAGS:
        default_text = f"{default:g}" if kind is float else str(default)
        group.add_argument(flag, dest=field_name, type=kind, default=default, metavar=metavar, help=f"{text} (default {default_text})")


def limits_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Return the RelayConfig fields of the limit flags; raise ConfigError for a value out of range."""
    values: dict[str, Any] = {}
    for flag, field_name, kind, _default, low, _metavar, _text in _FLAGS:
        value = getattr(args, field_name)
        too_small = value <= 0 if kind is float else value < low
        if too_small:
            expected = "a positive number of seconds" if kind is float else f"at least {int(low)}"
            raise ConfigError(f"{flag} {value} is invalid: it must be {expected}")
        values[field_name] = value
    return values
