"""Benchmark of session resumption: detection, recovery and throughput cost.

Run from the repository root::

    .venv/bin/python bench/bench_resume.py

Everything runs in this process on loopback: a relay, an agent, a fault proxy
between them (``tests/faultproxy.py``) and small desktop applications. The
script measures

1. how long the agent and the relay take to notice a blackholed link, with the
   default heartbeat (ping every 15 s, pong within 10 s) and with a 1 s / 1 s
   one;
2. how long data takes to flow again after a cut (TCP reset) and after a
   blackhole ends;
3. the throughput of one stream without faults and with cuts spread over the
   transfer, and the time each cut costs.

Each trial starts a fresh relay and agent, so the backoff and heartbeat phase
of one trial do not carry over to the next. The whole run takes about four
minutes and stops after ``RUN_LIMIT_S`` in any case.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from app.core.agent import CONNECT_TIMEOUT_S, Agent, AgentState, AgentStatus  # noqa: E402
from app.core.auth import RelayTokens, login  # noqa: E402
from app.core.backoff import Backoff  # noqa: E402
from app.core.config import Target  # noqa: E402
from app.core.credentials import MemoryStore  # noqa: E402
from cloud_stub.accounts import Accounts  # noqa: E402
from cloud_stub.relay import Exposure, Relay, RelayConfig  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402

ACCOUNT = "bench"
PASSWORD = "bench password 0123456789"
DEVICE = "bench-desktop"
MIB = 1024 * 1024
CHUNK = 256 * 1024
RUN_LIMIT_S = 420.0
WAIT_LIMIT_S = 60.0
# Gap between probe lines on the echo stream, which bounds the resolution of
# the "data flows again" times.
PROBE_INTERVAL_S = 0.005

DEFAULT_HEARTBEAT = (15.0, 10.0)
SHORT_HEARTBEAT = (1.0, 1.0)


# Desktop applications ---------------------------------------------------------


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class Sink:
    """A desktop application that counts the bytes of a connection and writes the total back after EOF."""

    def __init__(self) -> None:
        self.received = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    async def wait_received(self, count: int) -> None:
        """Wait until ``count`` bytes arrived in total, without polling."""
        if self.received < count:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append((count, waiter))
            await waiter

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(MIB):
                self.received += len(data)
                for count, waiter in [w for w in self._waiters if w[0] <= self.received]:
                    self._waiters.remove((count, waiter))
                    waiter.set_result(None)
            writer.write(f"{self.received}\n".encode())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


# One relay, proxy and agent -------------------------------------------------------


@dataclass
class Setup:
    """A relay, a fault proxy in front of it and an agent connected through the proxy."""

    relay: Relay
    proxy: FaultProxy
    agent: Agent
    task: asyncio.Task[None]
    sink: Sink
    servers: list[asyncio.Server]
    statuses: list[tuple[float, AgentStatus]] = field(default_factory=list)

    def port_of(self, target: str) -> int:
        return self.relay.expose_ports[f"{ACCOUNT}/{target}"]

    def relay_detached(self) -> bool:
        entry = self.relay.agents.get((ACCOUNT, DEVICE))
        return entry is not None and entry.tunnel.detached

    def link_up(self) -> bool:
        entry = self.relay.agents.get((ACCOUNT, DEVICE))
        tunnel = self.agent.tunnel
        return (
            self.agent.status.state is AgentState.CONNECTED
            and tunnel is not None
            and not tunnel.detached
            and entry is not None
            and entry.ready.done()
            and not entry.tunnel.detached
        )

    async def stop(self) -> None:
        await self.agent.stop()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.proxy.stop()
        await self.relay.stop()
        for server in self.servers:
            server.close()
            await server.wait_closed()


async def start_setup(
    data_dir: Path,
    *,
    heartbeat: tuple[float, float],
    connect_timeout: float = CONNECT_TIMEOUT_S,
    backoff: Backoff | None = None,
) -> Setup:
    sink = Sink()
    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    sink_server = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
    targets = {
        "echo": Target("echo", "127.0.0.1", echo_server.sockets[0].getsockname()[1]),
        "sink": Target("sink", "127.0.0.1", sink_server.sockets[0].getsockname()[1]),
    }
    accounts = Accounts()
    accounts.add(ACCOUNT, PASSWORD)
    config = RelayConfig(
        port=0,
        accounts=accounts,
        exposures=[Exposure(ACCOUNT, None, name, "127.0.0.1", 0) for name in targets],
        data_dir=data_dir,
        ping_interval=heartbeat[0],
        ping_timeout=heartbeat[1],
    )
    relay = Relay(config)
    await relay.start()
    proxy = await FaultProxy(relay.port).start()

    tokens = await login(proxy.url, ACCOUNT, PASSWORD)
    assert tokens.refresh_token is not None
    store = MemoryStore()
    await store.set(proxy.url, ACCOUNT, tokens.refresh_token)
    statuses: list[tuple[float, AgentStatus]] = []
    agent = Agent(
        relay_url=proxy.url,
        device=DEVICE,
        targets=targets,
        tokens=RelayTokens(proxy.url, ACCOUNT, store),
        on_status=lambda status: statuses.append((time.monotonic(), status)),
        backoff=backoff or Backoff(),
        ping_interval=heartbeat[0],
        ping_timeout=heartbeat[1],
        connect_timeout=connect_timeout,
    )
    task = asyncio.ensure_future(agent.run())
    setup = Setup(relay, proxy, agent, task, sink, [echo_server, sink_server], statuses)
    await wait_for(setup.link_up, "the agent to connect")
    return setup


async def wait_for(
    condition: Callable[[], bool], description: str, timeout: float = WAIT_LIMIT_S, interval: float = 0.001
) -> float:
    """Poll ``condition`` every ``interval`` seconds and return the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {description}")
        await asyncio.sleep(interval)
    return time.monotonic()


# 1. Detecting a blackholed link -------------------------------------------------------


@dataclass
class Detection:
    heartbeat: tuple[float, float]
    phase: float
    agent_s: float
    relay_s: float


async def measure_detection(data_dir: Path, heartbeat: tuple[float, float], phase: float) -> Detection:
    """Blackhole the link ``phase`` seconds after it came up and time until each side drops it."""
    setup = await start_setup(data_dir, heartbeat=heartbeat)
    try:
        await asyncio.sleep(phase)
        setup.proxy.blackhole()
        started = time.monotonic()
        relay_task = asyncio.ensure_future(wait_for(setup.relay_detached, "the relay to drop the link"))
        agent_at = await wait_for(lambda: setup.agent.status.state is not AgentState.CONNECTED, "the agent to drop the link")
        relay_at = await relay_task
        return Detection(heartbeat, phase, agent_at - started, relay_at - started)
    finally:
        await setup.stop()


# 2. Time until data flows again ------------------------------------------------------------


class Prober:
    """Writes a numbered line to the echo stream every few milliseconds and times each echo."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.sent_at: dict[int, float] = {}
        self.echoed_at: dict[int, float] = {}
        self._tasks = [asyncio.ensure_future(self._write()), asyncio.ensure_future(self._read())]

    async def _write(self) -> None:
        for seq in range(1_000_000):
            self.sent_at[seq] = time.monotonic()
            self.writer.write(f"{seq}\n".encode())
            await self.writer.drain()
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def _read(self) -> None:
        while line := await self.reader.readline():
            self.echoed_at[int(line)] = time.monotonic()

    def first_echo_sent_after(self, moment: float) -> float | None:
        """Return when the first echo arrived whose line was written after ``moment``."""
        times = [self.echoed_at[seq] for seq, sent in self.sent_at.items() if sent > moment and seq in self.echoed_at]
        return min(times) if times else None

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.writer.close()


@dataclass
class Recovery:
    scenario: str
    resumed_s: float
    data_s: float


async def measure_recovery(
    data_dir: Path, scenario: str, *, blackhole_s: float = 0.0, connect_timeout: float = CONNECT_TIMEOUT_S
) -> Recovery:
    """Break the link (a cut, or a blackhole of ``blackhole_s``); time from its return until data flows."""
    setup = await start_setup(data_dir, heartbeat=SHORT_HEARTBEAT, connect_timeout=connect_timeout)
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port_of("echo"))
    prober = Prober(reader, writer)
    try:
        await wait_for(lambda: len(prober.echoed_at) >= 20, "the first echoes")
        tunnel = setup.agent.tunnel
        assert tunnel is not None
        resumes = tunnel.resumes
        if blackhole_s:
            setup.proxy.blackhole()
            broken_at = time.monotonic()
            await asyncio.sleep(blackhole_s)
            setup.proxy.restore()
        else:
            broken_at = time.monotonic()
            setup.proxy.cut()
        returned_at = time.monotonic()
        resumed_at = await wait_for(lambda: tunnel.resumes > resumes and setup.link_up(), "the resume")
        await wait_for(lambda: prober.first_echo_sent_after(broken_at) is not None, "data to flow again")
        first_echo = prober.first_echo_sent_after(broken_at)
        assert first_echo is not None
        return Recovery(scenario, resumed_at - returned_at, first_echo - returned_at)
    finally:
        await prober.stop()
        await setup.stop()


# 3. Throughput with and without cuts --------------------------------------------------------


@dataclass
class Transfer:
    label: str
    cuts: int
    seconds: float
    mib_per_s: float
    # CPU time of this whole process (relay, agent, proxy, client and sink)
    # per MiB, which other load on the machine disturbs less than wall time.
    cpu_ms_per_mib: float
    resumes: int
    resent_mib: float


async def measure_transfer(data_dir: Path, label: str, size: int, cuts: int, backoff: Backoff | None = None) -> Transfer:
    """Send ``size`` bytes from a cloud client to the desktop sink, cutting the link ``cuts`` times."""
    setup = await start_setup(data_dir, heartbeat=DEFAULT_HEARTBEAT, backoff=backoff)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", setup.port_of("sink"))
        chunk = random.Random(1).randbytes(CHUNK)
        tunnel = setup.agent.tunnel
        assert tunnel is not None

        async def cut_during_transfer() -> None:
            for index in range(cuts):
                mark = size * (index + 1) // (cuts + 1)
                await asyncio.wait_for(setup.sink.wait_received(mark), WAIT_LIMIT_S)
                # A coarse poll, so the cut case pays little CPU for polling.
                await wait_for(setup.link_up, "the link to be up before a cut", interval=0.01)
                setup.proxy.cut()

        started = time.monotonic()
        cpu_started = time.process_time()
        cutter = asyncio.ensure_future(cut_during_transfer())
        for _ in range(size // CHUNK):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        reply = await asyncio.wait_for(reader.readline(), WAIT_LIMIT_S)
        seconds = time.monotonic() - started
        cpu_ms_per_mib = (time.process_time() - cpu_started) * 1000 / (size / MIB)
        await cutter
        writer.close()
        if int(reply) != size:
            raise RuntimeError(f"the sink received {int(reply)} bytes, expected {size}")
        relay_entry = setup.relay.agents[(ACCOUNT, DEVICE)]
        resent = tunnel.bytes_resent + relay_entry.tunnel.bytes_resent
        return Transfer(label, cuts, seconds, size / MIB / seconds, cpu_ms_per_mib, tunnel.resumes, resent / MIB)
    finally:
        await setup.stop()


# Report -------------------------------------------------------------------------------------


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, {platform.system()} {platform.release()}"


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} s, min {min(values):.2f} s, max {max(values):.2f} s (n={len(values)})"


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    print(f"# bench_resume on {machine()}, {datetime.date.today().isoformat()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        data_dir = Path(tmp)

        print("\n## 1. Detecting a blackholed link (time from the blackhole until a side drops the link)", flush=True)
        interval, timeout = DEFAULT_HEARTBEAT
        # The blackhole starts just after a pong (worst case) and just before a ping (best case).
        for phase in (0.2, interval - 1.0):
            result = await measure_detection(data_dir, DEFAULT_HEARTBEAT, phase)
            print(
                f"heartbeat {interval:g} s / {timeout:g} s, blackhole {phase:.1f} s after connect: "
                f"agent {result.agent_s:.2f} s, relay {result.relay_s:.2f} s",
                flush=True,
            )
        short_agent, short_relay = [], []
        for _ in range(args.trials):
            result = await measure_detection(data_dir, SHORT_HEARTBEAT, rng.uniform(0.1, SHORT_HEARTBEAT[0] + 0.1))
            short_agent.append(result.agent_s)
            short_relay.append(result.relay_s)
        print(f"heartbeat 1 s / 1 s, random phase: agent {summary(short_agent)}; relay {summary(short_relay)}", flush=True)

        print("\n## 2. From the link's return until data flows (short heartbeat; default backoff)", flush=True)
        # (name, blackhole seconds or 0 for a cut, agent connect time-out)
        scenarios = [
            ("cut (TCP reset)", 0.0, CONNECT_TIMEOUT_S),
            (f"blackhole 3 s, connect time-out {CONNECT_TIMEOUT_S:g} s (default)", 3.0, CONNECT_TIMEOUT_S),
            ("blackhole 3 s, connect time-out 2 s", 3.0, 2.0),
        ]
        for name, blackhole_s, connect_timeout in scenarios:
            resumed, data = [], []
            # Blackhole trials last up to a connect time-out longer, so they run half as often.
            trials = args.trials if not blackhole_s else max(3, args.trials // 2)
            for _ in range(trials):
                recovery = await measure_recovery(data_dir, name, blackhole_s=blackhole_s, connect_timeout=connect_timeout)
                resumed.append(recovery.resumed_s)
                data.append(recovery.data_s)
            print(f"{name}: resumed {summary(resumed)}; data flows {summary(data)}", flush=True)

        print(f"\n## 3. One stream, {args.size_mib} MiB cloud to desktop, through the fault proxy", flush=True)
        size = args.size_mib * MIB
        no_faults = "no faults"
        fast_cuts = f"{args.cuts} cuts, backoff 0.01 s to 0.05 s"
        results: dict[str, list[Transfer]] = {no_faults: [], fast_cuts: []}
        # The two cases alternate, so a change in other load on the machine
        # affects both alike. The fast backoff isolates the cost of the resume itself.
        for _ in range(args.repeats):
            results[no_faults].append(await measure_transfer(data_dir, no_faults, size, 0))
            results[fast_cuts].append(await measure_transfer(data_dir, fast_cuts, size, args.cuts, Backoff(base=0.01, cap=0.05)))
        # Cuts less than 10 s apart escalate the default backoff (0.5 s doubling
        # to 30 s), so this case takes long and runs once.
        default_cuts = f"{args.cuts} cuts, default backoff"
        results[default_cuts] = [await measure_transfer(data_dir, default_cuts, size, args.cuts)]
        for label, transfers in results.items():
            rates = [r.mib_per_s for r in transfers]
            print(
                f"{label}: median {statistics.median(rates):.1f} MiB/s "
                f"({statistics.median(r.seconds for r in transfers):.2f} s), "
                f"range {min(rates):.1f} to {max(rates):.1f} MiB/s; "
                f"CPU median {statistics.median(r.cpu_ms_per_mib for r in transfers):.2f} ms/MiB; "
                f"resumes {[r.resumes for r in transfers]}, resent MiB {[round(r.resent_mib, 1) for r in transfers]}",
                flush=True,
            )


def main() -> int:
    parser = argparse.ArgumentParser(description="Measure heartbeat detection, recovery time and throughput cost of session resumption.")
    parser.add_argument("--size-mib", type=int, default=256, help="bytes per throughput run, in MiB (default 256)")
    parser.add_argument("--cuts", type=int, default=8, help="cuts spread over a throughput run (default 8)")
    parser.add_argument("--repeats", type=int, default=7, help="runs of each throughput case with no faults or with fast-backoff cuts (default 7)")
    parser.add_argument("--trials", type=int, default=8, help="trials of each short detection and recovery case (default 8)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random blackhole phases (default 1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(asyncio.wait_for(run(args), RUN_LIMIT_S))
    return 0


if __name__ == "__main__":
    sys.exit(main())
