"""A demo desktop application: a line-based quote feed on a local socket.

It behaves like the terminals Deskbridge is built for: it greets first,
answers commands and pushes unsolicited updates. Lines end with ``\\n``.

Commands: ``HELP``, ``PING``, ``QUOTE SYMBOL``, ``SUBSCRIBE SYMBOL``,
``UNSUBSCRIBE SYMBOL``, ``ECHO TEXT``, ``QUIT``.

Run it alone with ``python -m app.demo_app --port 7497``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
from collections.abc import Sequence

logger = logging.getLogger(__name__)

GREETING = "HELLO Deskbridge demo quote feed 1.0; type HELP"
MAX_LINE_BYTES = 4096
TICK_INTERVAL_S = 1.0
SYMBOLS = {"AAPL": 231.40, "MSFT": 415.10, "EURUSD": 1.0842, "BTCUSD": 67250.0, "ES": 5611.25}

HELP_LINES = [
    "COMMANDS:",
    "  PING                  -> PONG",
    "  QUOTE SYMBOL          -> QUOTE SYMBOL PRICE",
    "  SUBSCRIBE SYMBOL      -> TICK lines every second",
    "  UNSUBSCRIBE SYMBOL",
    "  ECHO TEXT             -> ECHO TEXT",
    "  QUIT",
    f"SYMBOLS: {' '.join(sorted(SYMBOLS))}",
]


class QuoteFeed:
    """Prices that drift a little on every tick."""

    def __init__(self, seed: int | None = None) -> None:
        self.prices = dict(SYMBOLS)
        self._rng = random.Random(seed)

    def tick(self, symbol: str) -> float:
        price = self.prices[symbol] * (1 + self._rng.gauss(0, 0.0005))
        self.prices[symbol] = price
        return price


def format_price(symbol: str, price: float) -> str:
    return f"{price:.4f}" if price < 10 else f"{price:.2f}"


class DemoServer:
    def __init__(self, feed: QuoteFeed | None = None) -> None:
        self.feed = feed or QuoteFeed()
        self.clients = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self.clients += 1
        subscriptions: set[str] = set()
        ticker = asyncio.ensure_future(self._push_ticks(writer, subscriptions))
        logger.info("client %s connected", peer)
        try:
            writer.write(f"{GREETING}\n".encode())
            await writer.drain()
            while True:
                try:
                    raw = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    break
                except asyncio.LimitOverrunError:
                    writer.write(f"ERROR line longer than {MAX_LINE_BYTES} bytes\n".encode())
                    break
                line = raw.decode("utf-8", "replace").strip()
                replies = self.answer(line, subscriptions)
                if replies is None:
                    writer.write(b"BYE\n")
                    break
                writer.write("".join(f"{reply}\n" for reply in replies).encode())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            ticker.cancel()
            self.clients -= 1
            writer.close()
            logger.info("client %s disconnected", peer)

    def answer(self, line: str, subscriptions: set[str]) -> list[str] | None:
        """Return the reply lines for one command, or None to end the session."""
        command, _, argument = line.partition(" ")
        command = command.upper()
        symbol = argument.strip().upper()
        if command == "PING":
            return ["PONG"]
        if command == "HELP":
            return HELP_LINES
        if command == "ECHO":
            return [f"ECHO {argument}"]
        if command == "QUIT":
            return None
        if command in ("QUOTE", "SUBSCRIBE", "UNSUBSCRIBE"):
            if symbol not in self.feed.prices:
                return [f"ERROR unknown symbol {symbol or '(none)'}; try one of {' '.join(sorted(SYMBOLS))}"]
            if command == "QUOTE":
                return [f"QUOTE {symbol} {format_price(symbol, self.feed.prices[symbol])}"]
            if command == "SUBSCRIBE":
                subscriptions.add(symbol)
                return [f"SUBSCRIBED {symbol}"]
            subscriptions.discard(symbol)
            return [f"UNSUBSCRIBED {symbol}"]
        if not command:
            return ["ERROR empty command; type HELP"]
        return [f"ERROR unknown command {command}; type HELP"]

    async def _push_ticks(self, writer: asyncio.StreamWriter, subscriptions: set[str]) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL_S)
            for symbol in sorted(subscriptions):
                price = self.feed.tick(symbol)
                writer.write(f"TICK {symbol} {format_price(symbol, price)}\n".encode())


async def start_demo_app(host: str = "127.0.0.1", port: int = 7497) -> asyncio.Server:
    server = DemoServer()
    return await asyncio.start_server(server.handle, host, port, limit=MAX_LINE_BYTES)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.demo_app", description="Demo desktop application: a line-based quote feed.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7497, help="port to listen on (default 7497)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    async def serve() -> None:
        server = await start_demo_app(args.host, args.port)
        print(f"demo desktop application listening on {args.host}:{server.sockets[0].getsockname()[1]}", flush=True)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"demo app: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
